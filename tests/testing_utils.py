"""Helpers shared by the test modules: tiny configurations and the location of `../shared` data."""

import contextlib
import os
import threading
from pathlib import Path

import pytest
import torch

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
    settings = {
        "backbone": "resnet18",
        "image_size": 64,
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_instances": 4,
        "num_bins": 64,
        "max_position_embeddings": 32,
        "id2label": {0: "circle", 1: "square", 2: "triangle"},
    }
    settings.update(overrides)
    return Pix2SeqConfig(**settings)


class Pix2SeqModelTester:
    """
    Builds a tiny configuration and the inputs of the model tests in one place, as transformers' `ModelTester`
    classes do: per-image targets as the image processor writes them, and the token batch a data pipeline builds.
    """

    def __init__(self, batch_size=2, **config_overrides):
        self.batch_size = batch_size
        self.config_overrides = config_overrides

    def get_config(self):
        return tiny_config(**self.config_overrides)

    def prepare_pixel_values(self, config, seed=0):
        generator = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, config.num_channels, config.image_size, config.image_size)
        return torch.rand(shape, generator=generator)

    def prepare_targets(self):
        """Two objects per image: class indices and `(center_x, center_y, width, height)` boxes on the canvas."""
        boxes = torch.tensor([[0.3, 0.4, 0.4, 0.4], [0.6, 0.25, 0.6, 0.3]])
        return [{"class_labels": torch.tensor([0, 2]), "boxes": boxes.clone()} for _ in range(self.batch_size)]

    def prepare_config_and_inputs(self):
        """The config and DETR-style training inputs: `pixel_values` and per-image `labels`."""
        config = self.get_config()
        return config, {"pixel_values": self.prepare_pixel_values(config), "labels": self.prepare_targets()}

    def prepare_token_inputs(self, model):
        """Training inputs with the token labels, decoder inputs and weights built beforehand (a fixed seed)."""
        batch = model.tokenizer.build_training_batch(self.prepare_targets(), torch.Generator().manual_seed(0))
        batch["pixel_values"] = self.prepare_pixel_values(model.config)
        return batch


@contextlib.contextmanager
def unblocked_after(fifo, seconds=10.0):
    """
    Opens the write end of `fifo` once `seconds` have passed and a reader waits on it, so that code blocked reading
    it (the behaviour under test) returns instead of hanging the test run.
    """
    stop = threading.Event()

    def unblock():
        if stop.wait(seconds):
            return
        while not stop.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader yet
                stop.wait(0.05)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
