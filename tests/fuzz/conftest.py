"""Hypothesis profiles for the parser fuzz tests: "ci" (derandomized, so every run tries the same inputs) when the
CI environment variable is set, "dev" otherwise. Both keep no example database, so a run leaves no files behind."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Sized so that the whole tests/fuzz run stays well under a minute on a busy 2-core machine. The per-call time
# limit in test_parsers.py, not Hypothesis' deadline, is what turns a hang into a failure: a deadline would make
# a slow, loaded machine look like a bug.
_COMMON = dict(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
settings.register_profile("ci", derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", **_COMMON)
# A long hunt, by hand: QIMG_FUZZ_PROFILE=deep python -m pytest tests/fuzz (several minutes).
settings.register_profile("deep", **{**_COMMON, "max_examples": 5000})
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("QIMG_FUZZ_PROFILE", "dev"))
