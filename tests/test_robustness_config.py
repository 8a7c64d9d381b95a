"""Inconsistent settings fail when the config is built, with a message that says what to change."""

import pytest
import timm
from testing_utils import tiny_config

from modeling_pix2seq import Pix2SeqForObjectDetection


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"id2label": {0: "a", 950: "b"}}, "overlaps the coordinate tokens"),
        ({"coord_token_offset": 101}, "overlaps the coordinate tokens"),  # coordinate bins start inside the classes
        ({"num_bins": 2500}, "need vocab_size >= 3500"),
        ({"fake_class_token_id": 150}, "must lie below class_token_offset"),
        ({"max_instances": 7}, "max_position_embeddings=32"),
        ({"image_size": 0}, "positive integer"),
        ({"backbone": "resnet_does_not_exist"}, "Unknown timm backbone 'resnet_does_not_exist'"),
    ],
)
def test_inconsistent_setting_fails_at_config_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_the_stride_is_checked_when_the_model_is_built_and_follows_the_backbone_kwargs():
    with pytest.raises(
        ValueError, match="not divisible by the stride 32 of backbone 'resnet18': use a multiple of 32"
    ):
        Pix2SeqForObjectDetection(tiny_config(image_size=48))
    model = Pix2SeqForObjectDetection(tiny_config(image_size=48, backbone_kwargs={"out_indices": (3,)}))
    assert model.model.encoder.backbone.stride == 16


def test_building_a_config_builds_no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a config must validate its values without building a model")

    monkeypatch.setattr(timm, "create_model", refuse)
    assert tiny_config(backbone="resnet50", image_size=96).backbone == "resnet50"
