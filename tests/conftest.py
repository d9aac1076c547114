import os

os.environ.setdefault("BLURCTL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def embedded():
    """The embedded benchmark, built once (about 2 minutes on 2 cores) and cached."""
    from blurctl.bench.build import ensure_benchmark

    return ensure_benchmark()
