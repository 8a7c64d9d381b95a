"""Converted official checkpoints compute what the official TF model computes: the fixtures hold tiny official models
of every family (random weights) with the official model's outputs on given pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import TF_FIXTURES_DIR, require_shared
from torch import nn

from conversion.tf_checkpoint_reader import TFCheckpointReader
from convert_pix2seq_tf_checkpoint import (
    COCO_CATEGORY_NAMES,
    config_from_official,
    load_checkpoint_into,
    set_official_decoding,
)
from generation_pix2seq import Pix2SeqTopPLogitsWarper
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


FIXTURES = ["resnet", "resnet_odd", "resnet_c4", "vit", "resnet_c4_fullwidth"]
TOLERANCE = 1e-4
CONFIG_FILES = ["config.json", "config_2022.json"]


def narrow_resnet_stem(model, width):
    """
    Gives the timm ResNet the stem of a width-multiplier fixture: timm's 7x7 stem is 64 channels wide whatever the
    stage widths (`channels`), while the tiny fixtures' is `width`. Replaces the stem and the first block's two
    convolutions that read it; the converter then loads every weight as usual.
    """
    backbone = model.model.encoder.backbone.timm_model
    backbone.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    backbone.bn1 = nn.BatchNorm2d(width)
    block = backbone.layer1[0]
    block.conv1 = nn.Conv2d(width, block.conv1.out_channels, 1, bias=False)
    block.downsample[0] = nn.Conv2d(width, block.downsample[0].out_channels, 1, bias=False)


def official_model(variant, config_file="config.json", **config_overrides):
    folder = require_shared(TF_FIXTURES_DIR / variant)
    official = json.loads((folder / config_file).read_text())
    config = config_from_official(official, COCO_CATEGORY_NAMES)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    model = Pix2SeqForObjectDetection(config)
    width = official["model"].get("resnet_width_multiplier", 1)
    if width != 1:
        narrow_resnet_stem(model, int(64 * width))
    return load_checkpoint_into(model, TFCheckpointReader(folder / "ckpt-1")).eval()


def reference(variant):
    data = np.load(require_shared(TF_FIXTURES_DIR / f"{variant}_reference.npz"))
    return {name: torch.from_numpy(data[name]) for name in data.files}


def max_diff(actual, expected):
    return float((actual - expected).abs().max())


# Each fixture's run configuration in today's official layout and in the 2022 release's (the released folders' own).
@pytest.fixture(scope="module", params=[(variant, name) for variant in FIXTURES for name in CONFIG_FILES])
def converted(request):
    variant, config_file = request.param
    ref = reference(variant)
    model = official_model(variant, config_file)
    pixel_values = ref["images"].permute(0, 3, 1, 2)  # official images are channels last
    with torch.no_grad():
        encoder_output, _ = model.model.encoder.encode(pixel_values)
        encoded = model.model.encoder(pixel_values).last_hidden_state
        logits = model(pixel_values=pixel_values, decoder_input_ids=ref["seq"]).logits
        greedy = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=10, use_grammar=False)
    return variant, ref, {"encoder_output": encoder_output, "encoded": encoded, "logits": logits, "greedy": greedy}


def test_encoder_output_matches_the_official_model(converted):
    _, ref, outputs = converted
    assert outputs["encoder_output"].shape == ref["encoder_output"].shape
    assert max_diff(outputs["encoder_output"], ref["encoder_output"]) < TOLERANCE


def test_projected_encoding_matches_the_official_model(converted):
    _, ref, outputs = converted
    assert outputs["encoded"].shape == ref["encoded"].shape
    assert max_diff(outputs["encoded"], ref["encoded"]) < TOLERANCE


def test_teacher_forced_logits_match_the_official_model(converted):
    _, ref, outputs = converted
    assert outputs["logits"].shape == ref["logits"].shape
    assert max_diff(outputs["logits"], ref["logits"]) < TOLERANCE


def test_greedy_tokens_without_grammar_equal_the_official_ones(converted):
    _, ref, outputs = converted
    assert torch.equal(outputs["greedy"][:, 0], torch.full((2,), 10))
    assert torch.equal(outputs["greedy"][:, 1:], ref["pred_seq"])


def test_timm_max_pool_padding_misses_the_official_features():
    """The TF "SAME" stem max-pool is what makes the ResNet exact: timm's symmetric padding shifts every feature."""
    ref = reference("resnet")
    model = official_model("resnet", backbone_tf_padding=False)
    with torch.no_grad():
        encoder_output, _ = model.model.encoder.encode(ref["images"].permute(0, 3, 1, 2))
    assert max_diff(encoder_output, ref["encoder_output"]) > 100 * TOLERANCE


def test_odd_image_size_gives_the_official_ceil_grid():
    ref = reference("resnet_odd")
    model = official_model("resnet_odd")
    assert model.config.image_size == 100
    with torch.no_grad():
        _, grid = model.model.encoder.encode(ref["images"].permute(0, 3, 1, 2))
    assert grid == (4, 4) and ref["encoder_output"].shape[1] == 16


@pytest.mark.parametrize("canvas", [96, 100, 128])
def test_image_processor_reproduces_the_official_preprocessing(canvas):
    data = np.load(require_shared(TF_FIXTURES_DIR / "preprocess_reference.npz"))
    processor = Pix2SeqImageProcessor(size={"longest_edge": canvas}, do_normalize=False)
    for index in range(5):
        pixel_values = processor(data[f"in_{canvas}_{index}"], return_tensors="pt")["pixel_values"]
        expected = torch.from_numpy(data[f"out_{canvas}_{index}"]).permute(2, 0, 1)
        assert max_diff(pixel_values[0], expected) < TOLERANCE, index


@pytest.mark.parametrize("top_p", [0.1, 0.4, 0.9])
def test_top_p_warper_keeps_the_tokens_the_official_filter_keeps(top_p):
    data = np.load(require_shared(TF_FIXTURES_DIR / "top_p_ref.npz"))
    logits = torch.from_numpy(data["logits"])
    kept = torch.from_numpy(data[f"p{top_p}"])
    warper = Pix2SeqTopPLogitsWarper(top_p)
    # The whole batch, and each row alone: rows whose cut falls among the `candidates` most likely tokens take the
    # shortcut, the others (and a batch holding one of them) the full sort.
    shortcuts = 0
    for rows in [slice(None)] + [slice(index, index + 1) for index in range(len(logits))]:
        filtered = warper(None, logits[rows])
        assert torch.equal(filtered.isfinite(), kept[rows])
        assert torch.equal(filtered[kept[rows]], logits[rows][kept[rows]])
        shortcuts += warper._filter_among_candidates(logits[rows]) is not None
    assert shortcuts > 0
    if top_p == 0.9:
        assert shortcuts < len(logits)


DECODING_TOKENS = json.loads((Path(__file__).parent / "fixtures" / "decoding_tokens.json").read_text())


@pytest.fixture(scope="module", params=FIXTURES)
def official_decoder(request):
    variant = request.param
    model = official_model(variant)
    set_official_decoding(model, json.loads((TF_FIXTURES_DIR / variant / "config.json").read_text())["task"])
    return variant, model, reference(variant)["images"].permute(0, 3, 1, 2)


@pytest.mark.parametrize("decoding", ["detect", *DECODING_TOKENS["decodings"]])
def test_greedy_and_seeded_sampled_tokens_are_those_recorded_before_the_decode_step_was_optimised(
    official_decoder, decoding
):
    """`fixtures/decoding_tokens.json` holds what each decoding wrote before the decode step was made faster (see
    `fixtures/make_decoding_tokens.py`): the same seed must still give the same tokens, token for token."""
    variant, model, pixel_values = official_decoder
    if decoding == "detect":
        tokens = model.detect(pixel_values).sequences
    else:
        seed, arguments = DECODING_TOKENS["decodings"][decoding]
        if seed is not None:
            torch.manual_seed(seed)
        tokens = model.generate(pixel_values=pixel_values, **arguments)[:, 1:]
    assert tokens.tolist() == DECODING_TOKENS["tokens"][variant][decoding]
