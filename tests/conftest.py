# Hypothesis settings profiles for the harness' own tests; choose one with --hypothesis-profile=ci|dev|nightly.
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("nightly", max_examples=2000, deadline=None)
