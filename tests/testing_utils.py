"""
Helpers shared by the test modules (no test module imports another): tiny configurations, the model tester, a tiny
model trained for a few steps, COCO folders, the tiny `run_detection.py` run and the location of `../shared` data.
"""

import contextlib
import copy
import functools
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CompileConfig

from configuration_pix2seq import Pix2SeqConfig
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


# Read-only data beside the repository (reference fixtures, BCCD); never copied into it.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
TF_FIXTURES_DIR = SHARED_DIR / "reference" / "pix2seq_tf_fixtures"
V2_FIXTURES_DIR = SHARED_DIR / "reference" / "pix2seq_v2_fixtures"
BCCD_DIR = SHARED_DIR / "data" / "bccd"
# The files that travel with a model folder as remote code.
REMOTE_CODE_FILES = [
    "configuration_pix2seq.py",
    "modeling_pix2seq.py",
    "image_processing_pix2seq.py",
    "tokenization_pix2seq.py",
    "tokenization_pix2seq_multitask.py",
    "pipeline_pix2seq.py",
    "generation_pix2seq.py",
]


def require_shared(path):
    """Skips the calling test, naming the missing folder, when `path` (under `../shared`) is absent."""
    if not Path(path).exists():
        pytest.skip(f"{path} is absent: these tests need the read-only `shared/` folder beside the repository.")
    return Path(path)


def multitask_postprocess_reference():
    """
    The official Pix2Seq v2 post-processing reference: its arrays and its cases (inputs, settings, expected results),
    skipping the calling test without `../shared`.
    """
    folder = require_shared(V2_FIXTURES_DIR)
    arrays = np.load(folder / "multitask_postprocess_reference.npz")
    return arrays, json.loads((folder / "multitask_postprocess_reference.json").read_text())["cases"]


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
    classes do: pixels, and the token targets the image processor makes of two objects per image.
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

    def prepare_objects(self, config):
        """Two objects per image: `(x_min, y_min, x_max, y_max)` pixel boxes of the processed image and classes."""
        side = config.image_size
        boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]]) * side
        return [(boxes.clone(), torch.tensor([0, 2])) for _ in range(self.batch_size)]

    def prepare_token_inputs(self, config, augment=True, seed=0):
        """Training inputs: pixels and the processor's token targets (`labels`, `decoder_input_ids`, weights)."""
        processor = Pix2SeqImageProcessor.from_model_config(config)
        batch = processor.encode_objects(
            self.prepare_objects(config),
            do_sequence_augmentation=augment,
            generator=torch.Generator().manual_seed(seed),
        )
        batch["pixel_values"] = self.prepare_pixel_values(config)
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


@functools.lru_cache(maxsize=4)
def _trained_tiny_model(steps, overrides):
    torch.manual_seed(0)
    config = tiny_config(dropout=0.0, drop_path_rate=0.0, **dict(overrides))
    model = Pix2SeqForObjectDetection(config)
    tester = Pix2SeqModelTester(batch_size=2)
    batch = tester.prepare_token_inputs(config, augment=False)
    # Two different images with different objects, so that tokens vary within and between sequences.
    processor = Pix2SeqImageProcessor.from_model_config(config)
    side = config.image_size
    objects = [
        (torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]]) * side, torch.tensor([0, 2])),
        (torch.tensor([[0.6, 0.5, 0.8, 0.95]]) * side, torch.tensor([1])),
    ]
    batch.update(processor.encode_objects(objects, do_sequence_augmentation=False))
    # Images bright on the left and on the right half, which a few steps suffice to tell apart.
    pixel_values = batch["pixel_values"] * 0.2
    pixel_values[0, :, :, : side // 2] += 0.8
    pixel_values[1, :, :, side // 2 :] += 0.8
    batch["pixel_values"] = pixel_values
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), batch


def trained_tiny_model(steps=80, **overrides):
    """
    A tiny model fitted for `steps` AdamW steps to the token targets of two images (a copy, in `eval()` mode), and
    that batch. Greedy decoding of an untrained model repeats one token, which hides cache and batching bugs; this
    one writes varied coordinates and classes.
    """
    model, batch = _trained_tiny_model(steps, tuple(sorted(overrides.items())))
    return copy.deepcopy(model), {key: value.clone() for key, value in batch.items()}


TINY_MODEL = (
    "image_size=64,num_bins=48,d_model=32,encoder_layers=1,decoder_layers=1,encoder_attention_heads=4,"
    "decoder_attention_heads=4,encoder_ffn_dim=64,decoder_ffn_dim=64"
)


def tiny_run_args(output_dir, *extra, synthetic_eval_images=5, num_prediction_images=2):
    """Command-line arguments of a tiny `run_detection.py` run into `output_dir`, then `extra`."""
    return [
        "--output_dir",
        str(output_dir),
        "--config_overrides",
        TINY_MODEL,
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "3",
        "--synthetic_eval_images",
        str(synthetic_eval_images),
        "--logging_steps",
        "1",
        "--dataloader_num_workers",
        "0",
        "--num_prediction_images",
        str(num_prediction_images),
        "--disable_tqdm",
        "true",
        "--shuffle_buffer_size",
        "8",
        *extra,
    ]


def write_coco(folder, images, annotations, categories=None):
    """A COCO folder: `images` maps an id to (width, height); every image is a real PNG."""
    (folder / "images").mkdir(exist_ok=True)
    for image_id, (width, height) in images.items():
        PIL.Image.new("RGB", (width, height), (90, 120, 150)).save(folder / "images" / f"{image_id}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in images.items()],
        "annotations": [{"id": n + 1, **a} for n, a in enumerate(annotations)],
        "categories": categories or [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = folder / "instances.json"
    path.write_text(json.dumps(coco))
    return folder / "images", path


def cpu_compile_config(backend):
    # transformers compiles the static-cache decode step on CUDA only; this opts the CPU in, as the tests need.
    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None if backend != "inductor" else "default")
    compile_config._compile_all_devices = True
    return compile_config


def offline_env(tmp_path):
    """The environment of a fresh process that cannot import the repository and reaches no Hub."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONDONTWRITEBYTECODE="1")
    return env


def run_isolated(script, folder, tmp_path, *args):
    """
    Runs `script` in a fresh Python process in `tmp_path`, where only a saved model folder's own code can be used
    (`FOLDER`, also `sys.argv[1]`; `args` follow it in `sys.argv`), and returns what it printed.
    """
    prelude = textwrap.dedent(
        """
        import importlib.util, sys
        assert importlib.util.find_spec("modeling_pix2seq") is None, "the repository must not be importable here"
        FOLDER = sys.argv[1]
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), str(folder), *map(str, args)],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def assert_official_parity(output_dir, variant):
    """
    The model saved in `output_dir` reproduces the official logits of fixture `variant` to 1e-4 and its greedy
    tokens; returns the model.
    """
    reference = np.load(require_shared(TF_FIXTURES_DIR / f"{variant}_reference.npz"))
    model = Pix2SeqForObjectDetection.from_pretrained(output_dir).eval()
    pixel_values = torch.from_numpy(reference["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=torch.from_numpy(reference["seq"])).logits
        greedy = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=10)
    assert float((logits - torch.from_numpy(reference["logits"])).abs().max()) < 1e-4
    assert torch.equal(greedy[:, 1:], torch.from_numpy(reference["pred_seq"]))
    return model


# The official evaluation's settings of each task, as the fixture's configuration states them (captioning greedy).
OFFICIAL_MULTITASK_TASKS = {
    "object_detection": {
        "prompt_token_id": 10,
        "max_new_tokens": 500,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.4,
        "temperature": 1.0,
    },
    "instance_segmentation": {
        "prompt_token_id": 11,
        "max_new_tokens": 256,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "temperature": 1.0,
        "num_samples": 8,
        "max_instances": 10,
    },
    "keypoint_detection": {
        "prompt_token_id": 12,
        "max_new_tokens": 34,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.1,
        "temperature": 1.0,
        "person_class_token_id": 101,
        "crop_pad_scale": 0.5,
        "points_score_weight": 1.0,
        "suppress_invisible": True,
    },
    "captioning": {"prompt_token_id": 13, "max_new_tokens": 511, "do_sample": False, "eos_token_id": 3001},
}

# The same, shortened so that a tiny model decodes in a moment.
TINY_MULTITASK_TASKS = {
    name: {**settings, **shortened}
    for (name, settings), shortened in zip(
        OFFICIAL_MULTITASK_TASKS.items(),
        (
            {"max_new_tokens": 20},
            {"max_new_tokens": 12, "num_samples": 3},
            {"max_new_tokens": 8},
            {"max_new_tokens": 15},
        ),
        strict=True,
    )
}


def tiny_multitask_config(**overrides):
    """A tiny multi-task (Pix2Seq v2 layout) config: text tokens from 3000 in a 3,100-token vocabulary."""
    settings = {
        "vocab_size": 3100,
        "text_token_offset": 3000,
        "polygon_separator_token_id": 40,
        "invisible_keypoint_token_id": 41,
        "tasks": copy.deepcopy(TINY_MULTITASK_TASKS),
    }
    settings.update(overrides)
    return tiny_config(**settings)


def tiny_sentencepiece_model(texts, vocab_size, folder):
    """
    A tiny SentencePiece model trained on `texts`, written to `folder/tiny.model`, with the official caption model's
    special ids: 0 padding, 1 `</s>`, 2 unknown, no BOS. Skips the test where `sentencepiece` is not installed.
    """
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = Path(folder) / "tiny.model"
    path.write_bytes(model.getvalue())
    return path
