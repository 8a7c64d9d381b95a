"""The settings the official checkpoints need (TF padding, the ViT patch stem, a wider encoder, a saved no-grammar
default) are driven by the config; models without them are built as before."""

import json

import pytest
import torch
from testing_utils import tiny_config
from timm.layers.pool2d_same import MaxPool2dSame

from configuration_pix2seq import Pix2SeqConfig
from modeling_pix2seq import Pix2SeqForObjectDetection


def vit_config(**overrides):
    settings = {
        "backbone": None,
        "patch_size": 16,
        "encoder_hidden_size": 48,
        "encoder_ffn_dim": 192,
        "image_size": 64,
    }
    settings.update(overrides)
    return tiny_config(**settings)


def test_defaults_leave_the_model_as_before():
    config = Pix2SeqConfig()
    assert (config.backbone_tf_padding, config.patch_size, config.encoder_hidden_size) == (False, None, None)
    model = Pix2SeqForObjectDetection(tiny_config())
    encoder = model.model.encoder
    assert type(encoder.backbone.timm_model.maxpool) is torch.nn.MaxPool2d
    assert encoder.output_mlp.fc1.out_features == model.config.encoder_ffn_dim
    assert encoder.input_proj.out_features == model.config.d_model


def test_a_folder_saved_without_the_new_settings_still_loads(tmp_path):
    Pix2SeqForObjectDetection(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for name in ("backbone_tf_padding", "patch_size", "encoder_hidden_size"):
        config.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    assert not model.config.backbone_tf_padding and model.config.patch_size is None


def test_tf_padding_uses_the_same_max_pool_and_any_image_size_with_the_ceil_grid():
    with pytest.raises(ValueError, match="backbone_tf_padding=True"):
        Pix2SeqForObjectDetection(tiny_config(image_size=100))
    model = Pix2SeqForObjectDetection(tiny_config(image_size=100, backbone_tf_padding=True)).eval()
    assert isinstance(model.model.encoder.backbone.timm_model.maxpool, MaxPool2dSame)
    with torch.no_grad():
        encoded = model.model.encoder(torch.rand(1, 3, 100, 100)).last_hidden_state
    assert encoded.shape == (1, 4 * 4, model.config.d_model)


def test_vit_patch_stem_with_a_wider_encoder_round_trips(tmp_path):
    model = Pix2SeqForObjectDetection(vit_config(image_size=72)).eval()
    encoder = model.model.encoder
    assert encoder.backbone.projection.weight.shape == (48, 3, 16, 16) and encoder.backbone.projection.bias is not None
    assert encoder.layers[0].self_attn.q_proj.weight.shape == (48, 48)
    assert encoder.output_proj.weight.shape == (model.config.d_model, 48)
    # The official rule: the projection MLP keeps the encoder's MLP ratio (192 / 48) at the decoder width.
    assert encoder.output_mlp.fc1.out_features == 4 * model.config.d_model
    pixel_values = torch.rand(2, 3, 72, 72)
    with torch.no_grad():
        hidden_states, grid = encoder.encode(pixel_values)
        logits = model(pixel_values=pixel_values, decoder_input_ids=torch.full((2, 3), 10)).logits
    assert grid == (4, 4) and hidden_states.shape == (2, 16, 48)  # floor(72 / 16), as TF's "VALID" patch conv
    model.save_pretrained(tmp_path)
    reloaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(pixel_values=pixel_values, decoder_input_ids=torch.full((2, 3), 10)).logits
    torch.testing.assert_close(reloaded_logits, logits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backbone": "resnet18"}, "set backbone=None"),
        ({"backbone_tf_padding": True}, "apply to a timm backbone"),
        ({"patch_size": 128}, "patch_size must be a positive integer up to image_size"),
        ({"encoder_attention_heads": 5}, "encoder width 48"),
    ],
)
def test_inconsistent_patch_stem_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        vit_config(**overrides)


def test_generate_reads_the_saved_grammar_default(tmp_path):
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    model.generation_config.update(do_sample=False, max_new_tokens=10)
    pixel_values = torch.rand(1, 3, 64, 64)
    with_grammar = model.generate(pixel_values=pixel_values, use_grammar=True)
    without_grammar = model.generate(pixel_values=pixel_values, use_grammar=False)
    assert not torch.equal(with_grammar, without_grammar)
    assert torch.equal(model.generate(pixel_values=pixel_values), with_grammar)
    model.generation_config.use_grammar = False
    assert torch.equal(model.generate(pixel_values=pixel_values), without_grammar)
    assert torch.equal(model(pixel_values=pixel_values).sequences, without_grammar[:, 1:])
    assert torch.equal(model.generate(pixel_values=pixel_values, use_grammar=True), with_grammar)
