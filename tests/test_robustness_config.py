"""Inconsistent settings fail when the config is built, with a message that says what to change."""

import pytest
from testing_utils import tiny_config

from configuration_pix2seq import backbone_stride
from modeling_pix2seq import Pix2SeqForObjectDetection


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"id2label": {0: "a", 950: "b"}}, "overlaps the coordinate tokens"),
        ({"coord_token_offset": 101}, "overlaps the coordinate tokens"),  # coordinate bins start inside the classes
        ({"num_bins": 2500}, "need vocab_size >= 3500"),
        ({"fake_class_token_id": 150}, "must lie below class_token_offset"),
        ({"max_instances": 7}, "max_position_embeddings=32"),
        ({"image_size": 48}, "not divisible by the stride 32 of backbone 'resnet18'"),
        ({"image_size": 0}, "positive integer"),
        ({"backbone": "resnet_does_not_exist"}, "Unknown timm backbone 'resnet_does_not_exist'"),
    ],
)
def test_inconsistent_setting_fails_at_config_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_stride_follows_the_backbone_kwargs():
    assert backbone_stride("resnet18") == 32
    assert backbone_stride("resnet18", backbone_kwargs={"out_indices": (3,)}) == 16
    assert tiny_config(image_size=48, backbone_kwargs={"out_indices": (3,)}).image_size == 48


def test_setting_changed_after_construction_is_caught_when_saving(tmp_path):
    config = tiny_config()
    config.image_size = 48
    with pytest.raises(ValueError, match="not divisible by the stride"):
        config.save_pretrained(tmp_path)


def test_model_still_checks_the_stride_of_a_config_changed_after_construction():
    config = tiny_config()
    config.image_size = 48
    with pytest.raises(ValueError, match="not divisible by the stride"):
        Pix2SeqForObjectDetection(config)
