"""
No lost training work: a non-finite loss stops the run with its step, and resuming never picks a half-written
checkpoint. The slow tests SIGKILL a real training process (this file is also that process: see `main`).
"""

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testing_utils import tiny_config
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modeling_pix2seq import Pix2SeqForObjectDetection
from tokenization_pix2seq import Pix2SeqTokenizer
from training.training_safety import (
    LOCK_FILE_NAME,
    NonFiniteLossCallback,
    NonFiniteLossError,
    OutputDirInUseError,
    OutputDirLock,
    check_output_dir,
    checkpoint_problem,
    last_complete_checkpoint,
    resolve_resume,
)


REPO_ROOT = Path(__file__).resolve().parent.parent


class SyntheticDetection(torch.utils.data.Dataset):
    """Random images with random boxes, turned into Pix2Seq training sequences; item `i` is always the same."""

    def __init__(self, tokenizer, size=32, nan_from_call=None):
        self.tokenizer = tokenizer
        self.size = size
        self.nan_from_call = nan_from_call
        self.calls = 0

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.calls += 1
        generator = torch.Generator().manual_seed(index)
        corners = torch.rand(3, 2, 2, generator=generator).sort(dim=1).values  # (N, 2 corners, xy)
        item = self.tokenizer.build_training_sequence(
            corners.flatten(1), torch.randint(0, 3, (3,), generator=generator), generator
        )
        item["pixel_values"] = torch.rand(3, 64, 64, generator=generator)
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            item["pixel_values"] = torch.full_like(item["pixel_values"], math.nan)
        return item


def make_trainer(output_dir, max_steps, save_steps=2, save_total_limit=None, nan_from_call=None, callbacks=()):
    # ResNet-18 cut after its second stage (stride 8, 0.8M parameters) keeps every step and save fast.
    config = tiny_config(dropout=0.0, drop_path_rate=0.0, backbone_kwargs={"out_indices": (2,)})
    torch.manual_seed(0)  # the same initial weights in the test and in a killed training process
    model = Pix2SeqForObjectDetection(config)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    dataset = SyntheticDetection(Pix2SeqTokenizer.from_config(config), nan_from_call=nan_from_call)
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[NonFiniteLossCallback(), *callbacks])


def test_non_finite_loss_stops_training_at_its_step_before_the_weights_change(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, nan_from_call=5)  # batches of 2: the 3rd step's batch is NaN
    with pytest.raises(NonFiniteLossError, match=r"Training loss is nan at step 3 .*Resume from .*checkpoint-2"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(parameter).all() for parameter in trainer.model.parameters())
    assert not trainer.model._forward_hooks


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("complete_run")
    trainer = make_trainer(output_dir, max_steps=4, save_steps=2)
    trainer.train()
    assert not trainer.model._forward_hooks  # the loss guard cleans up after a finite run
    return output_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# What a kill (or a full disk) can leave in the newest checkpoint folder.
DAMAGES = {
    "weights cut short": lambda folder: truncate(folder / "model.safetensors"),
    "optimizer cut short": lambda folder: truncate(folder / "optimizer.pt"),
    "rng state cut short": lambda folder: truncate(folder / "rng_state.pth"),
    "state cut short": lambda folder: truncate(folder / "trainer_state.json"),
    "killed before the optimizer": lambda folder: [
        (folder / name).unlink() for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
    ],
    "killed before the state": lambda folder: (folder / "trainer_state.json").unlink(),
    "weights deleted by an interrupted rotation": lambda folder: (folder / "model.safetensors").unlink(),
}


def test_a_finished_runs_checkpoints_are_complete(complete_run):
    assert checkpoint_problem(complete_run / "checkpoint-2") is None
    assert last_complete_checkpoint(complete_run) == str(complete_run / "checkpoint-4")


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_skips_a_damaged_newest_checkpoint_that_the_trainer_would_pick(complete_run, tmp_path, damage):
    output_dir = tmp_path / "run"
    shutil.copytree(complete_run, output_dir)
    DAMAGES[damage](output_dir / "checkpoint-4")
    assert get_last_checkpoint(output_dir) == str(output_dir / "checkpoint-4")
    assert checkpoint_problem(output_dir / "checkpoint-4") is not None
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")


def test_no_checkpoint_means_starting_from_scratch(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoint-3").mkdir()
    assert last_complete_checkpoint(tmp_path) is None


def test_resuming_from_the_last_complete_checkpoint_finishes_the_run(complete_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(complete_run, output_dir)
    DAMAGES["killed before the state"](output_dir / "checkpoint-4")
    trainer = make_trainer(output_dir, max_steps=6)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(output_dir))
    # Steps 1-2 come from checkpoint-2's history; the steps after it ran once more, none twice.
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_problem(output_dir / "checkpoint-4") is None  # rewritten whole by the resumed run


# Real processes, killed with SIGKILL.


class PauseAtStep(TrainerCallback):
    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.marker.write_text(str(state.global_step))
            time.sleep(600)


def main():
    """The training process that the slow tests kill: it waits at a known point, writing `marker` when there."""
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("marker", type=Path)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-total-limit", type=int)
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--hang-in-save-at-step", type=int)
    options = parser.parse_args()
    callbacks = [PauseAtStep(options.pause_at_step, options.marker)] if options.pause_at_step else []
    if options.hang_in_save_at_step:
        save_optimizer = Trainer._save_optimizer_and_scheduler

        def hang_between_weights_and_optimizer(self, output_dir):
            if self.state.global_step == options.hang_in_save_at_step:
                options.marker.write_text(output_dir)
                time.sleep(600)
            save_optimizer(self, output_dir)

        Trainer._save_optimizer_and_scheduler = hang_between_weights_and_optimizer
    make_trainer(
        options.output_dir, options.max_steps, save_total_limit=options.save_total_limit, callbacks=callbacks
    ).train()


def run_and_kill(output_dir, *options):
    """Starts `main` in a new process, waits until it reaches its marker and SIGKILLs it."""
    marker = output_dir.parent / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    process = subprocess.Popen(
        [sys.executable, __file__, str(output_dir), str(marker), *options], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"Training process ended before its kill point:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("Training process did not reach its kill point in 300 s.")
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    return process.returncode


@pytest.mark.slow
def test_run_killed_mid_training_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path):
    output_dir = tmp_path / "run"
    assert run_and_kill(output_dir, "--pause-at-step", "5") == -signal.SIGKILL
    resume_from = last_complete_checkpoint(output_dir)
    assert resume_from == str(output_dir / "checkpoint-4")  # 1 step lost, less than the 2-step save interval

    resumed = make_trainer(output_dir, max_steps=8)
    resumed.train(resume_from_checkpoint=resume_from)
    uninterrupted = make_trainer(tmp_path / "uninterrupted", max_steps=8)
    uninterrupted.train()
    for (name, expected), actual in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_skips_the_half_written_one(tmp_path):
    output_dir = tmp_path / "run"
    killed = run_and_kill(output_dir, "--hang-in-save-at-step", "4", "--save-total-limit", "1")
    assert killed == -signal.SIGKILL
    half_written = output_dir / "checkpoint-4"
    assert (half_written / "model.safetensors").is_file() and not (half_written / "optimizer.pt").exists()
    assert get_last_checkpoint(output_dir) == str(half_written)  # what `resume_from_checkpoint=True` would use
    assert checkpoint_problem(output_dir / "checkpoint-2") is None  # untouched by the save, and not rotated away

    resume_from = last_complete_checkpoint(output_dir)
    assert resume_from == str(output_dir / "checkpoint-2")
    trainer = make_trainer(output_dir, max_steps=6, save_total_limit=1)
    trainer.train(resume_from_checkpoint=resume_from)
    assert trainer.state.global_step == 6
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-6")
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-6"]


if __name__ == "__main__":
    main()


def test_a_second_lock_on_a_folder_in_use_fails_naming_the_holder(tmp_path):
    with OutputDirLock(tmp_path / "out"):
        with pytest.raises(OutputDirInUseError, match=rf"in use by process {os.getpid()} on "):
            OutputDirLock(tmp_path / "out").__enter__()
    assert not (tmp_path / "out" / LOCK_FILE_NAME).exists()  # released on exit
    with OutputDirLock(tmp_path / "out"):
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    (tmp_path / LOCK_FILE_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid}))
    with caplog.at_level("WARNING"), OutputDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["pid"] == os.getpid()
    assert f"left by process {dead_pid}" in caplog.text


def test_output_dir_with_a_model_or_checkpoints_is_refused_unless_resumed_or_overwritten(tmp_path):
    check_output_dir(tmp_path / "missing")
    check_output_dir(tmp_path)  # empty
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileExistsError, match=r"already holds a saved model or checkpoints \(checkpoint-2\)"):
        check_output_dir(tmp_path)
    check_output_dir(tmp_path, resuming=True)
    check_output_dir(tmp_path, overwrite=True)


def test_resolve_resume(complete_run, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert resolve_resume("last", tmp_path) is None
    assert "holds no complete checkpoint" in caplog.text
    assert resolve_resume("last", complete_run, max_steps=6) == str(complete_run / "checkpoint-4")
    with pytest.raises(ValueError, match="--max_steps 4 is at or below step 4"):
        resolve_resume("last", complete_run, max_steps=4)
    broken = tmp_path / "checkpoint-4"
    shutil.copytree(complete_run / "checkpoint-4", broken)
    truncate(broken / "optimizer.pt")
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-4: optimizer.pt is truncated"):
        resolve_resume(str(broken), tmp_path)
