"""
`run_detection.py` never loses a model and never reports success on nothing: steps run only when asked for, output
folders are protected, runs with no usable data fail before saving, and evaluation survives unreadable images.
"""

import hashlib
import json
import logging
import socket
import subprocess
import sys

import pytest
from testing_utils import TINY_MODEL, tiny_run_args, write_coco
from transformers.trainer import logger as trainer_logger

import run_detection
from configuration_pix2seq import Pix2SeqConfig
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection
from training.detection_data import NoTrainingDataError
from training.synthetic_shapes import SHAPE_CLASSES
from training.training_safety import LOCK_FILE_NAME, OutputDirInUseError


def save_demo_model(folder):
    """A tiny model of the synthetic demo's classes, saved as `run_detection.py` saves one."""
    config = Pix2SeqConfig(**run_detection.DEFAULT_MODEL, max_instances=4, id2label=dict(enumerate(SHAPE_CLASSES)))
    config.update_from_string(TINY_MODEL)
    config = Pix2SeqConfig.from_dict(config.to_dict())
    Pix2SeqForObjectDetection(config).save_pretrained(folder)
    Pix2SeqImageProcessor(image_size=config.image_size).save_pretrained(folder)
    return folder


def weights_digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def coco_folder(tmp_path, num_images=6, size=(48, 40)):
    images = dict.fromkeys(range(1, num_images + 1), size)
    annotations = [{"image_id": i, "category_id": 1 + 6 * (i % 2), "bbox": [4, 4, 20, 16]} for i in images]
    return write_coco(tmp_path, images, annotations)


def coco_flags(images, annotations, evaluation=True):
    flags = ["--train_images", str(images), "--train_annotations", str(annotations)]
    if evaluation:
        flags += ["--eval_images", str(images), "--eval_annotations", str(annotations)]
    return flags


def test_do_eval_on_a_saved_model_evaluates_without_training_or_touching_its_weights(tmp_path):
    model_dir = save_demo_model(tmp_path / "model")
    before = weights_digest(model_dir)
    trainer = run_detection.main(
        tiny_run_args(
            model_dir,
            "--model_name_or_path",
            str(model_dir),
            "--do_eval",
            "--max_steps",
            "2",
            "--synthetic_eval_images",
            "2",
        )
    )
    assert trainer.state.global_step == 0
    assert weights_digest(model_dir) == before
    assert "eval_map" in json.loads((model_dir / "eval_results.json").read_text())
    assert not (model_dir / "predictions.json").exists()  # --do_predict was not asked for


def test_do_train_without_training_data_is_an_error(tmp_path):
    images, annotations = coco_folder(tmp_path)
    with pytest.raises(ValueError, match="--do_train needs training data"):
        run_detection.main(
            tiny_run_args(
                tmp_path / "out",
                "--do_train",
                "--eval_images",
                str(images),
                "--eval_annotations",
                str(annotations),
                "--max_steps",
                "1",
            )
        )


def test_output_folder_holding_a_model_is_refused_unless_overwritten(tmp_path):
    model_dir = save_demo_model(tmp_path / "model")
    before = weights_digest(model_dir)
    with pytest.raises(FileExistsError, match="already holds a saved model.*--overwrite_output_dir"):
        run_detection.main(tiny_run_args(model_dir, "--max_steps", "1", "--synthetic_eval_images", "1"))
    assert weights_digest(model_dir) == before
    trainer = run_detection.main(
        tiny_run_args(
            model_dir,
            "--max_steps",
            "1",
            "--synthetic_eval_images",
            "1",
            "--save_strategy",
            "no",
            "--overwrite_output_dir",
        )
    )
    assert trainer.state.global_step == 1 and weights_digest(model_dir) != before


def test_a_folder_in_use_by_another_run_is_refused_naming_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        output_dir = tmp_path / "out"
        output_dir.mkdir()
        (output_dir / LOCK_FILE_NAME).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "now"})
        )
        with pytest.raises(OutputDirInUseError, match=f"in use by process {holder.pid}"):
            run_detection.main(tiny_run_args(output_dir, "--max_steps", "1", "--synthetic_eval_images", "1"))
        assert not (output_dir / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone its lock is stale: the next run takes it over and releases it at the end.
    run_detection.main(
        tiny_run_args(output_dir, "--max_steps", "1", "--synthetic_eval_images", "1", "--save_strategy", "no")
    )
    assert not (output_dir / LOCK_FILE_NAME).exists()


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("folder missing", "images missing"),
        ("files unreadable", "images unreadable"),
        ("no annotations", "images without objects dropped"),
    ],
)
def test_no_usable_training_image_fails_before_saving_with_the_counts(tmp_path, damage, reason):
    images, annotations = coco_folder(tmp_path)
    if damage == "folder missing":
        images = tmp_path / "no-such-folder"
    elif damage == "files unreadable":
        for path in images.iterdir():
            path.write_bytes(path.read_bytes()[:60])  # the header reads; the pixels do not
    else:
        coco = json.loads(annotations.read_text())
        annotations.write_text(json.dumps({**coco, "annotations": []}))
    output_dir = tmp_path / "out"
    with pytest.raises(NoTrainingDataError, match=f"6 {reason}"):
        run_detection.main(
            tiny_run_args(
                output_dir, *coco_flags(images, annotations, evaluation=False), "--max_steps", "2", "--do_train"
            )
        )
    assert not (output_dir / "model.safetensors").exists()


def test_evaluation_scores_the_readable_images_and_counts_the_skipped_ones(tmp_path, caplog):
    images, annotations = coco_folder(tmp_path)
    (images / "3.png").unlink()
    (images / "4.png").write_bytes((images / "4.png").read_bytes()[:60])
    with caplog.at_level(logging.WARNING):
        trainer = run_detection.main(
            tiny_run_args(
                tmp_path / "out",
                "--model_name_or_path",
                str(save_coco_model(tmp_path / "model")),
                "--eval_images",
                str(images),
                "--eval_annotations",
                str(annotations),
            )
        )
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_images_skipped"] == 2
    assert sorted(p["image_id"] for p in trainer.last_predictions) == [1, 2, 5, 6]
    assert "Evaluation skipped 2 of 6 images" in caplog.text


def save_coco_model(folder):
    config = tiny_config_for({0: "cat", 1: "dog"})
    Pix2SeqForObjectDetection(config).save_pretrained(folder)
    Pix2SeqImageProcessor(image_size=config.image_size).save_pretrained(folder)
    return folder


def tiny_config_for(id2label):
    config = Pix2SeqConfig(**run_detection.DEFAULT_MODEL, max_instances=2, id2label=id2label)
    config.update_from_string(TINY_MODEL)
    return Pix2SeqConfig.from_dict(config.to_dict())


def test_degenerate_training_images_train_without_crashing(tmp_path):
    images = {1: (1, 600), 2: (600, 1), 3: (1, 1), 4: (48, 40)}
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 100, 1, 200]},
        {"image_id": 2, "category_id": 7, "bbox": [100, 0, 200, 1]},
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]},
        {"image_id": 4, "category_id": 7, "bbox": [4, 4, 20, 16]},
    ]
    folder, path = write_coco(tmp_path, images, annotations)
    trainer = run_detection.main(
        tiny_run_args(
            tmp_path / "out",
            *coco_flags(folder, path, evaluation=False),
            "--max_steps",
            "3",
            "--save_strategy",
            "no",
            "--min_scale",
            "0.3",
            "--max_scale",
            "2.0",
            "--do_train",
        )
    )
    assert trainer.state.global_step == 3


def test_resume_last_with_nothing_to_resume_says_so_at_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_detection.main(
            tiny_run_args(
                tmp_path,
                "--max_steps",
                "1",
                "--synthetic_eval_images",
                "1",
                "--save_strategy",
                "no",
                "--resume_from_checkpoint",
                "last",
            )
        )
    assert "holds no complete checkpoint; training starts from scratch" in caplog.text


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("two_steps")
    run_detection.main(
        tiny_run_args(output_dir, "--max_steps", "2", "--save_steps", "2", "--synthetic_eval_images", "1")
    )
    return output_dir


def test_a_broken_explicit_checkpoint_fails_naming_the_broken_file(two_step_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for path in (two_step_run / "checkpoint-2").iterdir():
        checkpoint.joinpath(path.name).write_bytes(path.read_bytes())
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-2: model.safetensors is truncated"):
        run_detection.main(
            tiny_run_args(
                tmp_path / "out",
                "--max_steps",
                "4",
                "--synthetic_eval_images",
                "1",
                "--resume_from_checkpoint",
                str(checkpoint),
            )
        )


@pytest.mark.parametrize("max_steps", ["1", "2"])
def test_max_steps_at_or_below_the_checkpoints_step_is_an_error(two_step_run, max_steps):
    before = weights_digest(two_step_run)
    with pytest.raises(ValueError, match=f"--max_steps {max_steps} is at or below step 2"):
        run_detection.main(
            tiny_run_args(
                two_step_run,
                "--max_steps",
                max_steps,
                "--synthetic_eval_images",
                "1",
                "--resume_from_checkpoint",
                "last",
            )
        )
    assert weights_digest(two_step_run) == before


def test_resuming_logs_nothing_about_the_tied_output_weight(two_step_run, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(trainer_logger, "warning", lambda message, *args: warnings.append(str(message)))
    run_detection.main(
        tiny_run_args(
            tmp_path,
            "--max_steps",
            "3",
            "--save_strategy",
            "no",
            "--synthetic_eval_images",
            "1",
            "--resume_from_checkpoint",
            str(two_step_run / "checkpoint-2"),
        )
    )
    assert not [message for message in warnings if "missing keys" in message]


def test_data_cleaning_is_summarised_in_one_warning(tmp_path, caplog):
    images = {1: (32, 32), 2: (32, 32)}
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 30, 30]},  # clipped
        {"image_id": 2, "category_id": 7, "bbox": [40, 40, 5, 5]},
    ]  # outside: dropped
    folder, path = write_coco(tmp_path, images, annotations)
    with caplog.at_level(logging.WARNING):
        run_detection.main(
            tiny_run_args(
                tmp_path / "out",
                *coco_flags(folder, path, evaluation=False),
                "--max_steps",
                "1",
                "--save_strategy",
                "no",
                "--do_train",
            )
        )
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data cleaning")]
    assert len(summaries) == 1
    assert "1 boxes clipped" in summaries[0] and "1 empty boxes dropped" in summaries[0]
    assert "1 images without objects dropped" in summaries[0]
