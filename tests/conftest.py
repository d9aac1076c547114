import os

os.environ.setdefault("BLURCTL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def embedded():
    """The embedded benchmark, set up once from the shipped, checksummed copy."""
    from blurctl.data.bench.build import ensure_benchmark

    return ensure_benchmark()
