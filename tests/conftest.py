import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic by default so CI never flakes; `--hypothesis-profile=explore` searches afresh.
settings.register_profile(
    "default",
    deadline=None,
    derandomize=True,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", parent=settings.get_profile("default"), derandomize=False, max_examples=300)
settings.load_profile("default")

# The benchmark scripts are importable by the tests (their smoke runs, and the models they time).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# The tests use small tensors, where extra threads only add synchronisation; on a shared
# 2-core machine they made the suite many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
