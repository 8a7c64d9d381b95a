"""The released checkpoints' `config.json`, in the layout the 2022 release wrote (and the multi-task files), convert as
released: every file of `released_configs_2022/` builds the published architecture, and every tiny fixture converts
from its `config_2022.json` exactly as from today's layout."""

import copy
import json
import logging
from pathlib import Path

import pytest
from testing_utils import SHARED_DIR, TF_FIXTURES_DIR, assert_official_parity, require_shared

from convert_pix2seq_tf_checkpoint import (
    COCO_CATEGORY_NAMES,
    check_settings_against_checkpoint,
    config_from_official,
    convert,
    dataset_kind,
    default_id2label,
    derived_weights,
    detection_task,
    is_skipped,
    map_checkpoint_keys,
    meta_model,
    released_family,
)


RELEASED_DIR = TF_FIXTURES_DIR / "released_configs_2022"
MULTITASK_FULL_SIZE = SHARED_DIR / "reference" / "pix2seq_v2_fixtures" / "full_size_multitask_vit-b_variables.txt"
# Folder-name prefix -> (full-size key list, family, published parameters in millions).
FAMILIES = {
    "resnet_": ("resnet", "ResNet-50", 36.6),
    "resnetc_": ("resnet-c", "ResNet-50-C4", 84.7),
    "vit_b_": ("vit-b", "ViT-B", 115.2),
    "vit_l_": ("vit-l", "ViT-L", 341.2),
}
RELEASED = [f"coco_det_finetune/{family}{size}x{size}" for family in FAMILIES for size in (640, 1024, 1333)] + [
    f"obj365_pretrain/{family}640x640_b256_s400k" for family in FAMILIES
]
# The multi-task ViT-B: the ViT-B keys, with the 35,000-token vocabulary (official count of the v2 fixtures' README).
MULTITASK = {"multi_task/vit_b_640x640": 640, "multi_task/vit_b_1024x1024": 1024}
MULTITASK_PARAMETERS = 131_585_976
FIXTURES = ["resnet", "resnet_odd", "resnet_c4", "vit", "resnet_c4_fullwidth"]


def listed_shapes(path):
    lines = require_shared(path).read_text().splitlines()
    return {name: tuple(json.loads(shape)) for name, shape in (line.split("\t") for line in lines if line)}


def family_of(folder):
    name = Path(folder).name
    return next(FAMILIES[prefix] for prefix in sorted(FAMILIES, key=len, reverse=True) if name.startswith(prefix))


def released_config(folder):
    return json.loads(require_shared(RELEASED_DIR / folder / "config.json").read_text())


def build_on_meta(official, shapes, folder):
    """What the converter builds for `official` against the key list `shapes`: the model on the meta device."""
    check_settings_against_checkpoint(official["model"], shapes)
    config = config_from_official(official, default_id2label(official, folder=Path(folder)))
    model = meta_model(config)
    mapping = map_checkpoint_keys(shapes, model)
    assert set(mapping) == {key for key in shapes if not is_skipped(key)}
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) | derived_weights(model) == set(model.state_dict())
    return model


@pytest.mark.parametrize("folder", RELEASED)
def test_every_released_config_builds_the_published_architecture(folder):
    key_list, family, millions = family_of(folder)
    official = released_config(folder)
    shapes = listed_shapes(TF_FIXTURES_DIR / "full_size_variables" / f"{key_list}_variables.txt")
    model = build_on_meta(official, shapes, folder)
    assert round(sum(parameter.numel() for parameter in model.parameters()) / 1e6, 1) == millions
    assert released_family(official) == family
    size = int(folder.split("/")[1].split("_")[-1].split("x")[0]) if folder.startswith("coco") else 640
    assert model.config.image_size == size
    assert model.config.task_token_id == 10 and model.config.num_bins == 1000 and model.config.max_instances == 100
    if folder.startswith("coco"):
        assert model.config.id2label == COCO_CATEGORY_NAMES
    else:
        assert len(model.config.id2label) == 365 and model.config.id2label[365] == "LABEL_365"


@pytest.mark.parametrize("folder", list(MULTITASK))
def test_multi_task_configs_convert_all_four_tasks_at_35000_tokens(folder):
    official = released_config(folder)
    shapes = listed_shapes(TF_FIXTURES_DIR / "full_size_variables" / "vit-b_variables.txt")
    for key in ("model/decoder/ar_decoder.Stoken_embedding", "model/decoder/ar_decoder.Soutp_bias"):
        key += "/.ATTRIBUTES/VARIABLE_VALUE"
        shapes[key] = (35000, *shapes[key][1:])
    if MULTITASK_FULL_SIZE.exists():  # the official multi-task key list, where the v2 fixtures are at hand
        assert shapes == listed_shapes(MULTITASK_FULL_SIZE)
    model = build_on_meta(official, shapes, folder)
    assert sum(parameter.numel() for parameter in model.parameters()) == MULTITASK_PARAMETERS
    assert (model.config.vocab_size, model.config.task_token_id, model.config.image_size) == (
        35000,
        10,
        MULTITASK[folder],
    )
    assert model.config.id2label == COCO_CATEGORY_NAMES
    assert [task["name"] for task in official["tasks"]][1:] == [
        "instance_segmentation",
        "keypoint_detection",
        "captioning",
    ]
    assert detection_task(official)["top_p"] == 0.4  # the detection task's decoding, not the others'
    config = model.config
    assert (config.text_token_offset, config.polygon_separator_token_id, config.invisible_keypoint_token_id) == (
        3000,
        40,
        41,
    )
    assert {name: task["prompt_token_id"] for name, task in config.tasks.items()} == {
        "object_detection": 10,
        "instance_segmentation": 11,
        "keypoint_detection": 12,
        "captioning": 13,
    }
    assert [config.tasks[name]["max_new_tokens"] for name in config.tasks] == [500, 256, 34, 511]
    assert config.tasks["instance_segmentation"]["num_samples"] == 8
    assert config.tasks["captioning"]["do_sample"] is False and config.tasks["captioning"]["eos_token_id"] == 3001


def test_the_2022_layout_differences_are_read_as_released():
    guess = json.loads(require_shared(RELEASED_DIR / "guesses" / "coco_det_finetune_resnet_640x640.json").read_text())
    assert "vocab_id" not in guess["task"] and guess["dataset"]["name"] == "object_detection"
    assert detection_task(guess)["vocab_id"] == 10
    assert dataset_kind(guess) == "coco"
    objects365 = released_config("obj365_pretrain/resnet_640x640_b256_s400k")
    assert "tasks" not in objects365 and "vocab_id" not in objects365["task"]
    assert dataset_kind(objects365) == "objects365"
    # Where the dataset section names nothing, the folder's name tells.
    silent = copy.deepcopy(objects365)
    silent["dataset"] = {"name": "object_detection"}
    del silent["datasets"]
    assert dataset_kind(silent, Path("cache/pix2seq/obj365_pretrain/resnet_640x640_b256_s400k")) == "objects365"
    assert dataset_kind(silent, Path("somewhere/my_run")) is None
    for name in ("coco/2017_object_detection", "object_detection"):
        coco = {"dataset": {"name": name, "tfds_name": "coco/2017"}}
        assert dataset_kind(coco) == "coco"
    assert dataset_kind({"dataset": {"name": "object_detection", "val_filename": "instances_val2017.json"}}) == "coco"


@pytest.mark.parametrize("variant", FIXTURES)
def test_a_fixture_config_gives_the_same_model_config_in_either_layout(variant):
    folder = require_shared(TF_FIXTURES_DIR / variant)
    today = json.loads((folder / "config.json").read_text())
    released = json.loads((folder / "config_2022.json").read_text())
    assert isinstance(released["model"]["image_size"], int) and released["dataset"]["name"] == "object_detection"
    configs = [config_from_official(official, default_id2label(official)) for official in (today, released)]
    assert configs[0].to_dict() == configs[1].to_dict()


def copy_checkpoint(variant, destination, config):
    """A fixture's checkpoint files in `destination` with `config` as its `config.json`."""
    source = require_shared(TF_FIXTURES_DIR / variant)
    destination.mkdir(parents=True)
    for path in source.glob("ckpt-1.*"):
        (destination / path.name).write_bytes(path.read_bytes())
    (destination / "checkpoint").write_bytes((source / "checkpoint").read_bytes())
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("variant", ["vit", "resnet_c4_fullwidth"])
def test_a_fixture_converts_from_its_2022_config_with_no_flag(variant, tmp_path):
    released = json.loads(require_shared(TF_FIXTURES_DIR / variant / "config_2022.json").read_text())
    folder = copy_checkpoint(variant, tmp_path / variant, released)
    convert(folder, tmp_path / "out")
    model = assert_official_parity(tmp_path / "out", variant)
    assert model.config.id2label == COCO_CATEGORY_NAMES


def objects365_config(variant):
    """`released_configs_2022/obj365_pretrain/`'s layout (no `task.vocab_id`, no `tasks`) with a fixture's model."""
    official = released_config("obj365_pretrain/vit_b_640x640_b256_s400k")
    fixture = json.loads(require_shared(TF_FIXTURES_DIR / variant / "config_2022.json").read_text())
    official["model"] = fixture["model"]
    official["model"].pop("name")
    official["task"]["quantization_bins"] = fixture["task"]["quantization_bins"]
    return official


def test_an_objects365_fixture_converts_with_numbered_labels(tmp_path, caplog):
    official = objects365_config("vit")
    assert "tasks" not in official and "vocab_id" not in official["task"] and "name" not in official["model"]
    folder = copy_checkpoint("vit", tmp_path / "obj365", official)
    with caplog.at_level(logging.INFO, logger="convert_pix2seq_tf_checkpoint"):
        convert(folder, tmp_path / "out")
    said = [record for record in caplog.records if "task.vocab_id" in record.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and "the official 10" in said[0].getMessage()
    model = assert_official_parity(tmp_path / "out", "vit")
    assert model.config.id2label == {index: f"LABEL_{index}" for index in range(1, 366)}
    assert "Objects365" in (tmp_path / "out" / "README.md").read_text()


def test_an_objects365_folder_is_recognised_by_its_name_when_the_dataset_says_nothing(tmp_path):
    official = objects365_config("vit")
    official["dataset"] = {"name": "object_detection"}
    del official["datasets"]
    folder = copy_checkpoint("vit", tmp_path / "obj365_pretrain" / "vit_tiny", official)
    model = convert(folder, tmp_path / "out")
    assert len(model.config.id2label) == 365
