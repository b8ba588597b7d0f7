# The suite's pytest plugin, for a plain checkout. An installed package registers the same plugin through its
# `pytest11` entry point under the same name, and pytest then skips this line.
pytest_plugins = ["conformance.plugin"]


def pytest_configure(config):
    """In the suite's own checkout the run asks for the suite: its markers and options are checked up front."""
    from conformance.plugin import activate

    activate(config)
