"""The profiles (budgets), in one place: each name with the test-set caps it applies.

A method's budget per profile is in its own `PROFILES` dict (methods/<name>.py); the caps on the
task's images are here, the same for every method and seed:
- ``paper``: the published settings, the whole task;
- ``quick``: a CPU budget; every normal test image and 5,000 sampled anomalies;
- ``smoke``: seconds per job, for tests; a few hundred images.
"""
from __future__ import annotations

from benchmark.splits import Subsample

PROFILE_SUBSAMPLE: dict[str, Subsample] = {
    "paper": Subsample(),
    "quick": Subsample(max_test_anomalous=5000),
    "smoke": Subsample(max_train=200, max_test_normal=100, max_test_anomalous=200),
}
#: The profile names, in order of budget (largest first).
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILE_SUBSAMPLE)

