import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sparsezo.assets import assets_dir  # noqa: E402


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
