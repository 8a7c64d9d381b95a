"""Helpers shared by the test modules: tiny configurations and the location of `../shared` data."""

from pathlib import Path

import pytest

from configuration_pix2seq import Pix2SeqConfig


# Read-only data beside the repository (reference fixtures, BCCD); never copied into it.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
TF_FIXTURES_DIR = SHARED_DIR / "reference" / "pix2seq_tf_fixtures"
BCCD_DIR = SHARED_DIR / "data" / "bccd"


def require_shared(path):
    """Skips the calling test, naming the missing folder, when `path` (under `../shared`) is absent."""
    if not Path(path).exists():
        pytest.skip(f"{path} is absent: these tests need the read-only `shared/` folder beside the repository.")
    return Path(path)


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
