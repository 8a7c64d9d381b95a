"""
`run_detection.py` against careless or hostile input: paths that are no regular files, simultaneous starts over a
stale lock, a kill during the final save, a resume that would change what the tokens mean, a full disk and
deeply nested JSON. Each ends with the behaviour users expect or one message naming the file, folder or setting.
"""

import errno
import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import PIL.Image
import pytest
import testing_utils
import torch
from safetensors.torch import load_file
from testing_utils import TINY_MODEL, unblocked_after

import run_detection
from image_processing_pix2seq import Pix2SeqImageProcessor
from training import training_safety
from training.detection_data import ImageReader, coco_split, load_coco_annotations
from training.training_safety import (
    LOCK_FILE_NAME,
    STAGING_DIR_NAME,
    OutputDirInUseError,
    OutputDirLock,
    OutputWriteError,
    checkpoint_problem,
    finish_interrupted_save,
    named_write_errors,
    staged_save,
)


REPO = Path(__file__).resolve().parent.parent


def tiny_run_args(output_dir, *extra):
    # One evaluation image and no prediction drawings keep these many short runs fast.
    return testing_utils.tiny_run_args(output_dir, *extra, synthetic_eval_images=1, num_prediction_images=0)


def write_coco(folder, num_images=6):
    (folder / "images").mkdir()
    for image_id in range(1, num_images + 1):
        PIL.Image.new("RGB", (48, 40), (90, 120, 150)).save(folder / "images" / f"{image_id}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 48, "height": 40} for i in range(1, num_images + 1)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1 + 6 * (i % 2), "bbox": [4, 4, 20, 16]}
            for i in range(1, num_images + 1)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    (folder / "instances.json").write_text(json.dumps(coco))
    return folder / "images", folder / "instances.json"


def make_fifo(path):
    """A FIFO at `path`, reached through a symbolic link (as a careless user might point at one)."""
    target = path.parent.parent / f"{path.parent.name}-{path.name}.fifo"
    os.mkfifo(target)
    path.unlink(missing_ok=True)
    path.symlink_to(target)
    return path


def deeply_nested_json(path, depth=200_000):
    path.write_text("[" * depth + "]" * depth)
    return path


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("two_steps")
    run_detection.main(tiny_run_args(output_dir, "--max_steps", "2", "--save_steps", "2", "--do_train"))
    return output_dir


# Finding 1: a FIFO among the inputs hangs the run.


def test_a_training_image_that_is_a_fifo_is_skipped_naming_it_and_the_run_ends(tmp_path, caplog):
    images, annotations = write_coco(tmp_path)
    fifo = make_fifo(images / "3.png")
    output_dir = tmp_path / "out"
    with unblocked_after(fifo), caplog.at_level(logging.WARNING):
        trainer = run_detection.main(
            tiny_run_args(
                output_dir,
                "--train_images",
                str(images),
                "--train_annotations",
                str(annotations),
                "--do_train",
                "--max_steps",
                "1",
                "--save_strategy",
                "no",
            )
        )
    assert trainer.state.global_step == 1
    assert "image paths that are no regular files (FIFOs" in caplog.text and str(fifo) in caplog.text
    assert "1 images not regular files" in caplog.text
    assert not (output_dir / LOCK_FILE_NAME).exists()


def test_coco_split_counts_a_fifo_image_as_no_regular_file(tmp_path):
    images, annotations = write_coco(tmp_path)
    fifo = make_fifo(images / "2.png")
    with unblocked_after(fifo):
        split = coco_split(images, annotations, train=False, streaming=False)
    assert split.stats["images_not_regular_files"] == 1 and split.stats["images_unreadable"] == 0


def test_the_image_reader_skips_or_refuses_a_fifo_naming_it(tmp_path, caplog):
    fifo = make_fifo(tmp_path / "image.png")
    with unblocked_after(fifo), caplog.at_level(logging.WARNING):
        assert ImageReader().read({"path": str(fifo), "bytes": None}) is None
    assert f"Skipped unreadable image {fifo}" in caplog.text and "not a regular file" in caplog.text
    with unblocked_after(fifo), pytest.raises(ValueError, match=rf"Cannot read image {fifo}: .*not a regular file"):
        ImageReader(fail_on_bad_records=True).read({"path": str(fifo), "bytes": None})


def test_an_annotation_file_that_is_a_fifo_is_refused_naming_it(tmp_path):
    fifo = make_fifo(tmp_path / "instances.json")
    with unblocked_after(fifo), pytest.raises(ValueError, match=rf"{fifo} is a FIFO .*not a regular file"):
        load_coco_annotations(fifo)


def test_a_checkpoint_holding_a_fifo_is_not_resumed_from(two_step_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(two_step_run / "checkpoint-2", checkpoint)
    assert checkpoint_problem(checkpoint) is None
    fifo = make_fifo(checkpoint / "optimizer.pt")
    with unblocked_after(fifo):
        assert checkpoint_problem(checkpoint) == "optimizer.pt is not a regular file"
    with unblocked_after(fifo), pytest.raises(ValueError, match="optimizer.pt is not a regular file"):
        run_detection.main(
            tiny_run_args(tmp_path / "out", "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint))
        )


def test_a_model_folder_holding_a_fifo_is_refused_naming_it(two_step_run, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(two_step_run / "checkpoint-2", folder)
    fifo = make_fifo(folder / "config.json")
    with (
        unblocked_after(fifo),
        pytest.raises(ValueError, match=rf"Cannot load {folder}: config.json is not a regular"),
    ):
        run_detection.main(tiny_run_args(tmp_path / "out", "--model_name_or_path", str(folder), "--max_steps", "1"))


# Finding 2: two runs started at once over a stale lock must not both hold it.


def _start_run(output_dir, start, results, release):
    start.wait()
    try:
        with OutputDirLock(output_dir):
            results.put("held")
            release.wait(60)  # held until every other start has tried
    except OutputDirInUseError:
        results.put("refused")


def test_many_simultaneous_starts_over_a_stale_lock_let_exactly_one_in(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    alive = training_safety._process_alive

    def slow_liveness_check(pid):  # as on a loaded machine: the window between reading and taking over widens
        time.sleep(0.02)
        return alive(pid)

    monkeypatch.setattr(training_safety, "_process_alive", slow_liveness_check)
    context = multiprocessing.get_context("fork")
    for trial in range(10):
        output_dir = tmp_path / f"trial-{trial}"
        output_dir.mkdir()
        stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}
        (output_dir / LOCK_FILE_NAME).write_text(json.dumps(stale))
        start, release, results = context.Event(), context.Event(), context.Queue()
        starts = [context.Process(target=_start_run, args=(output_dir, start, results, release)) for _ in range(4)]
        for process in starts:
            process.start()
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in starts)
        release.set()
        for process in starts:
            process.join(60)
        assert outcomes == ["held"] + ["refused"] * 3, f"trial {trial}: {outcomes}"
        assert not (output_dir / LOCK_FILE_NAME).exists()


# Finding 3: a kill during the final save.

KILL_DURING_FINAL_SAVE = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from transformers import PretrainedConfig
import run_detection

def dying_to_json_file(self, json_file_path, use_diff=True):
    text = self.to_json_string(use_diff=use_diff)
    final = "checkpoint-" not in os.path.abspath(json_file_path)
    with open(json_file_path, "w") as file:
        file.write(text[: len(text) // 2] if final else text)
    if final:  # killed halfway through writing the final folder's config.json
        os.kill(os.getpid(), signal.SIGKILL)

PretrainedConfig.to_json_file = dying_to_json_file
run_detection.main(sys.argv[1:])
"""


def test_a_kill_during_the_final_save_leaves_no_truncated_file_and_resume_finishes_it(tmp_path):
    output_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = tiny_run_args(output_dir, "--max_steps", "2", "--save_steps", "2", "--do_train")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_FINAL_SAVE, *args], cwd=REPO, env=env, capture_output=True, timeout=600
    )
    assert killed.returncode == -9, killed.stderr.decode()[-3000:]
    # Nothing of the interrupted save is in the folder users load.
    assert not (output_dir / "config.json").exists() and not (output_dir / "model.safetensors").exists()

    with pytest.raises(
        FileExistsError, match=r"no complete final model.*--resume_from_checkpoint last to continue that run"
    ):
        run_detection.main(args)
    run_detection.main([*args, "--resume_from_checkpoint", "last"])
    assert not (output_dir / STAGING_DIR_NAME).exists()
    json.loads((output_dir / "config.json").read_text())
    final, checkpoint = (
        load_file(output_dir / "model.safetensors"),
        load_file(output_dir / "checkpoint-2" / "model.safetensors"),
    )
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2


def test_a_staged_save_that_fails_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "config.json").write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt), staged_save(tmp_path) as staging:
        (staging / "config.json").write_text('{"new": ')
        raise KeyboardInterrupt
    assert (tmp_path / "config.json").read_text() == '{"old": true}'
    assert not (tmp_path / STAGING_DIR_NAME).exists()


def test_a_staged_save_interrupted_while_moving_in_is_finished_at_the_next_start(tmp_path):
    staging = tmp_path / STAGING_DIR_NAME
    staging.mkdir()
    (staging / "config.json").write_text('{"new": true}')
    (staging / ".complete").write_text("")
    (tmp_path / "model.safetensors").write_text("moved in before the kill")
    assert "completed the final save" in finish_interrupted_save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"new": True}
    assert not staging.exists()
    staging.mkdir()
    (staging / "config.json").write_text('{"half')
    assert "dropped the incomplete final save" in finish_interrupted_save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"new": True}


# Finding 4: resuming with a changed token layout.


@pytest.mark.parametrize(
    "extra, change",
    [
        (["--config_overrides", TINY_MODEL.replace("num_bins=48", "num_bins=40")], "num_bins 48 -> 40"),
        (["--config_overrides", TINY_MODEL + ",eos_mode=false"], "eos_mode True -> False"),
        (["--image_square_size", "96"], "image_size 64 -> 96"),
    ],
)
def test_resuming_with_a_changed_token_layout_is_refused_naming_the_setting(two_step_run, tmp_path, extra, change):
    checkpoint = two_step_run / "checkpoint-2"
    args = tiny_run_args(tmp_path, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint), *extra)
    with pytest.raises(ValueError, match=rf"Cannot resume from {checkpoint}: .*checkpoint -> this run: {change}\)"):
        run_detection.main(args)
    assert not (tmp_path / "checkpoint-3").exists() and not (tmp_path / "model.safetensors").exists()


# Finding 5: a full disk.


def test_a_full_disk_during_a_checkpoint_names_the_folder_and_the_cause(tmp_path, monkeypatch):
    def full_disk_save(*args, **kwargs):  # what torch's writer reports when the disk fills
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(training_safety.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
    with pytest.raises(OutputWriteError, match=rf"Cannot save to {tmp_path / 'checkpoint-1'}: no space left on the"):
        run_detection.main(tiny_run_args(tmp_path, "--max_steps", "1", "--save_steps", "1", "--do_train"))


def test_a_full_disk_during_the_final_save_names_the_folder_and_leaves_it_untouched(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Pix2SeqImageProcessor, "save_pretrained", no_space)
    with pytest.raises(OutputWriteError, match=rf"Cannot save to {tmp_path}: no space left on the device"):
        run_detection.main(tiny_run_args(tmp_path, "--max_steps", "1", "--save_strategy", "no", "--do_train"))
    assert not (tmp_path / "config.json").exists() and not (tmp_path / STAGING_DIR_NAME).exists()


def test_a_failed_save_that_is_no_file_system_error_is_left_as_it_is(tmp_path):
    with pytest.raises(RuntimeError, match="a bug, not a disk"), named_write_errors(tmp_path):
        raise RuntimeError("a bug, not a disk")


# Finding 6: deeply nested JSON.


def test_a_deeply_nested_annotation_file_is_refused_naming_it(tmp_path):
    path = deeply_nested_json(tmp_path / "deep.json")
    with pytest.raises(ValueError, match=rf"{path}: JSON nested too deeply"):
        load_coco_annotations(path)


def test_a_checkpoint_with_a_deeply_nested_trainer_state_is_not_resumed_from(two_step_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(two_step_run / "checkpoint-2", checkpoint)
    deeply_nested_json(checkpoint / "trainer_state.json")
    assert "trainer_state.json is not valid JSON" in checkpoint_problem(checkpoint)


def test_the_command_line_answers_bad_input_with_one_message_and_exit_status_1(tmp_path):
    images, _ = write_coco(tmp_path)
    path = deeply_nested_json(tmp_path / "deep.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["--train_images", str(images), "--train_annotations", str(path), "--max_steps", "1", "--do_train"]
    result = subprocess.run(
        [sys.executable, "run_detection.py", *tiny_run_args(tmp_path / "out", *args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"run_detection.py: error: ValueError: {path}: JSON nested too deeply to read (more than about 1000 levels)"
    )
    assert not (tmp_path / "out" / LOCK_FILE_NAME).exists()


def test_sigterm_ends_a_command_line_run_releasing_its_lock(tmp_path):
    output_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        sys.path.insert(0, os.getcwd())
        import run_detection
        run_detection.run = lambda *args: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(30)
        sys.argv = ["run_detection.py", *sys.argv[1:]]
        sys.exit(run_detection.cli())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *tiny_run_args(output_dir, "--max_steps", "1")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 128 + 15, result.stderr[-2000:]
    assert (output_dir).is_dir() and not (output_dir / LOCK_FILE_NAME).exists()
