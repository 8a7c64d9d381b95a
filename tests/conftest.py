import os

# Set before transformers/datasets are imported anywhere: offline flags are read at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest
import torch

from configuration_pix2seq import Pix2SeqConfig


def tiny_config(**overrides):
    """A Pix2Seq small enough for CPU tests that run in seconds."""
    settings = dict(
        backbone="resnet18",
        image_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_instances=4,
        num_bins=64,
        max_position_embeddings=32,
        id2label={0: "circle", 1: "square", 2: "triangle"},
    )
    settings.update(overrides)
    return Pix2SeqConfig(**settings)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
