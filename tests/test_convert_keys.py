"""The converter maps the complete key list of every released family and refuses any checkpoint it cannot map fully."""

import copy
import json
import re

import pytest
import torch
from testing_utils import SHARED_DIR, TF_FIXTURES_DIR, require_shared
from transformers import initialization as init

from conversion.tf_checkpoint_reader import TFCheckpointReader
from convert_pix2seq_tf_checkpoint import (
    COCO_CATEGORY_NAMES,
    CheckpointMappingError,
    checkpoint_prefix,
    config_from_official,
    convert,
    default_id2label,
    derived_weights,
    is_skipped,
    map_checkpoint_keys,
    model_card,
    released_family,
)
from modeling_pix2seq import Pix2SeqForObjectDetection


# The released architectures (official README and the official configs), and their published parameter counts.
FULL_SIZE = {
    "resnet": (
        "ResNet-50",
        {
            "resnet_variant": "standard",
            "resnet_depth": 50,
            "resnet_width_multiplier": 1,
            "num_encoder_layers": 6,
            "dim_att": 256,
            "num_heads": 8,
            "dim_mlp": 1024,
            "num_decoder_layers": 6,
            "dim_att_dec": 256,
            "num_heads_dec": 8,
            "dim_mlp_dec": 1024,
        },
        36.6,
    ),
    "resnet-c": (
        "ResNet-50-C4",
        {
            "resnet_variant": "c4",
            "resnet_depth": 50,
            "resnet_width_multiplier": 1,
            "num_encoder_layers": 12,
            "dim_att": 512,
            "num_heads": 16,
            "dim_mlp": 2048,
            "num_decoder_layers": 8,
            "dim_att_dec": 512,
            "num_heads_dec": 16,
            "dim_mlp_dec": 2048,
        },
        84.7,
    ),
    "vit-b": (
        "ViT-B",
        {
            "resnet_variant": "c1",
            "num_encoder_layers": 12,
            "dim_att": 768,
            "num_heads": 12,
            "dim_mlp": 3072,
            "num_decoder_layers": 6,
            "dim_att_dec": 512,
            "num_heads_dec": 16,
            "dim_mlp_dec": 2048,
        },
        115.2,
    ),
    "vit-l": (
        "ViT-L",
        {
            "resnet_variant": "c1",
            "num_encoder_layers": 24,
            "dim_att": 1024,
            "num_heads": 16,
            "dim_mlp": 4096,
            "num_decoder_layers": 8,
            "dim_att_dec": 512,
            "num_heads_dec": 16,
            "dim_mlp_dec": 2048,
        },
        341.2,
    ),
}


def fixture_official_config(variant="vit"):
    return json.loads(require_shared(TF_FIXTURES_DIR / variant / "config.json").read_text())


def full_size_official_config(family, image_size=640):
    """A fixture's official run config with the architecture of a released family at full size."""
    official = fixture_official_config()
    official["model"] = {key: value for key, value in official["model"].items() if not key.startswith("resnet_")}
    official["model"].update(
        FULL_SIZE[family][1], image_size=[image_size, image_size], max_seq_len=512, vocab_size=3000
    )
    official["task"].update(quantization_bins=1000, max_instances_per_image_test=100)
    return official


def listed_shapes(path):
    lines = require_shared(path).read_text().splitlines()
    return {name: tuple(json.loads(shape)) for name, shape in (line.split("\t") for line in lines if line)}


def meta_model(config):
    """The model without weights, built as `from_pretrained` builds it."""
    with torch.device("meta"), init.meta_device_safe_creation_ops():
        return Pix2SeqForObjectDetection(config)


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_every_released_key_maps_to_one_weight_and_every_weight_is_set(family):
    shapes = listed_shapes(TF_FIXTURES_DIR / "full_size_variables" / f"{family}_variables.txt")
    official = full_size_official_config(family)
    model = meta_model(config_from_official(official, COCO_CATEGORY_NAMES))
    mapping = map_checkpoint_keys(shapes, model)
    assert set(mapping) == {key for key in shapes if not is_skipped(key)}
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) | derived_weights(model) == set(model.state_dict())
    millions = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    assert round(millions, 1) == FULL_SIZE[family][2]
    assert released_family(official) == FULL_SIZE[family][0]


def test_optimizer_state_is_skipped_and_the_weights_still_map():
    shapes = listed_shapes(TF_FIXTURES_DIR / "full_size_variables" / "resnet_with_adamw_state_variables.txt")
    model = meta_model(config_from_official(full_size_official_config("resnet"), COCO_CATEGORY_NAMES))
    mapping = map_checkpoint_keys(shapes, model)
    assert len(mapping) == len([key for key in shapes if not key.startswith("optimizer/")]) - 3  # bookkeeping
    older_slot = "model/proj/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    assert map_checkpoint_keys({**shapes, older_slot: (256, 256)}, model) == mapping


@pytest.fixture(scope="module")
def vit_checkpoint():
    reader = TFCheckpointReader(require_shared(TF_FIXTURES_DIR / "vit") / "ckpt-1")
    shapes = {key: reader.shape(key) for key in reader.keys()}
    model = meta_model(config_from_official(fixture_official_config("vit"), COCO_CATEGORY_NAMES))
    return shapes, model


PROJ_KERNEL = "model/proj/kernel/.ATTRIBUTES/VARIABLE_VALUE"


def test_a_missing_key_fails_naming_the_weight_left_unset(vit_checkpoint):
    shapes, model = vit_checkpoint
    shapes = {key: shape for key, shape in shapes.items() if key != PROJ_KERNEL}
    with pytest.raises(CheckpointMappingError, match=r"left unset\): \['model\.encoder\.output_proj\.weight'\]"):
        map_checkpoint_keys(shapes, model)


def test_an_unknown_key_fails_naming_it(vit_checkpoint):
    shapes, model = vit_checkpoint
    unknown = "model/encoder/extra_ln/gamma/.ATTRIBUTES/VARIABLE_VALUE"
    with pytest.raises(CheckpointMappingError, match=f"Unknown checkpoint key '{unknown}'"):
        map_checkpoint_keys({**shapes, unknown: (48,)}, model)


def test_a_key_of_a_layer_the_model_lacks_fails_naming_it(vit_checkpoint):
    shapes, model = vit_checkpoint
    extra = "model/encoder/transformer_encoder/enc_layers/2/mha_ln/gamma/.ATTRIBUTES/VARIABLE_VALUE"
    message = f"'{extra}' maps to 'model.encoder.layers.2.self_attn_layer_norm.weight', which this model does not have"
    with pytest.raises(CheckpointMappingError, match=re.escape(message)):
        map_checkpoint_keys({**shapes, extra: (48,)}, model)


def test_a_shape_mismatch_fails_naming_the_key(vit_checkpoint):
    shapes, model = vit_checkpoint
    with pytest.raises(CheckpointMappingError, match=f"Shape mismatch for '{PROJ_KERNEL}'"):
        map_checkpoint_keys({**shapes, PROJ_KERNEL: (48, 16)}, model)


def test_coco_names_are_the_coco_2017_categories_by_id():
    categories = json.loads(require_shared(SHARED_DIR / "reference" / "coco_categories.json").read_text())
    assert COCO_CATEGORY_NAMES == {category["id"]: category["name"] for category in categories}


def test_labels_follow_the_dataset_or_the_labels_file(tmp_path):
    official = fixture_official_config()
    assert default_id2label(official) == COCO_CATEGORY_NAMES
    objects365 = copy.deepcopy(official)
    objects365["dataset"]["name"] = "objects365"
    labels = default_id2label(objects365)
    assert len(labels) == 365 and min(labels) == 1 and max(labels) == 365
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps({"1": "person", "5": "car"}))
    assert default_id2label(objects365, labels_file) == {1: "person", 5: "car"}
    objects365["dataset"]["name"] = "my_data"
    with pytest.raises(ValueError, match="--labels FILE"):
        default_id2label(objects365)


def test_model_card_names_the_published_ap_of_a_released_fine_tune():
    official = full_size_official_config("vit-l", image_size=1333)
    config = meta_model(config_from_official(official, COCO_CATEGORY_NAMES)).config
    card = model_card("vit_l_1333x1333/ckpt-1", "ViT-L", official, config)
    assert "`vit_l_1333x1333/ckpt-1`" in card and "**50.0**" in card
    tiny = fixture_official_config()
    assert released_family(tiny) is None
    assert "no AP is published" in model_card("vit/ckpt-1", None, tiny, config)


def test_official_settings_reach_the_config():
    config = config_from_official(full_size_official_config("vit-b"), COCO_CATEGORY_NAMES)
    assert (config.backbone, config.patch_size, config.encoder_hidden_size, config.d_model) == (None, 16, 768, 512)
    assert (config.max_instances, config.num_bins, config.vocab_size) == (100, 1000, 3000)
    assert config.max_position_embeddings == 512
    resnet = config_from_official(full_size_official_config("resnet-c", image_size=1333), COCO_CATEGORY_NAMES)
    assert resnet.backbone_tf_padding and resnet.backbone_kwargs == {"out_indices": [3]} and resnet.image_size == 1333
    unsupported = full_size_official_config("resnet")
    unsupported["model"]["use_cls_token"] = True
    with pytest.raises(ValueError, match="use_cls_token=True is not supported"):
        config_from_official(unsupported, COCO_CATEGORY_NAMES)


def test_checkpoint_step_comes_from_the_checkpoint_file_unless_given():
    folder = require_shared(TF_FIXTURES_DIR / "vit")
    assert checkpoint_prefix(folder) == folder / "ckpt-1"
    assert checkpoint_prefix(folder, "ckpt-20") == folder / "ckpt-20"


def test_a_width_multiplier_checkpoint_is_refused_before_any_weight_is_read(tmp_path):
    with pytest.raises(ValueError, match="resnet_width_multiplier=0.125"):
        convert(require_shared(TF_FIXTURES_DIR / "resnet"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
