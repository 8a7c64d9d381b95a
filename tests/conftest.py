import os


# Set before transformers/datasets are imported anywhere: offline flags are read at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest
import torch
from testing_utils import tiny_config


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
