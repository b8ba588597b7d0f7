# The suite's pytest plugin, for a plain checkout. An installed package registers the same plugin through its
# `pytest11` entry point under the same name, and pytest then skips this line.
pytest_plugins = ["conformance.plugin"]
