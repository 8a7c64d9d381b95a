"""
Guards for long training runs with the transformers `Trainer`.

- `NonFiniteLossCallback` stops training with `NonFiniteLossError`, naming the step, at the first NaN or infinite
  loss, before the optimizer applies it. The Trainer itself does not stop: with `logging_nan_inf_filter` (the
  default) it even hides such losses from the logs.
- `last_complete_checkpoint(output_dir)` is the checkpoint to resume from. The Trainer (5.x) writes a checkpoint in
  place, into its final `checkpoint-<step>` folder, and `trainer_utils.get_last_checkpoint` returns the highest step
  folder whether or not its files were all written. A run killed during a save therefore leaves a half-written
  folder that a plain `resume_from_checkpoint=True` would pick. Older checkpoints are safe: a save never touches
  them, and rotation (`save_total_limit`) deletes them only after the new checkpoint's last file is written.

- `check_output_dir(output_dir, resuming, overwrite)` refuses to train into a folder that already holds a saved
  model or checkpoints, unless the run resumes from it or overwrites it on purpose: the Trainer itself writes over
  `model.safetensors` and rotates (deletes) checkpoints it did not write.
- `OutputDirLock(output_dir)` keeps a second run out of a folder in use, naming the process that holds it.
- `resolve_resume(requested, output_dir, max_steps)` turns `--resume_from_checkpoint` into a checkpoint folder:
  `last` with nothing to resume from says so at WARNING, a broken explicit checkpoint fails naming the broken file,
  and a `max_steps` the checkpoint has already reached is an error (the Trainer would train one step past it and
  overwrite the final model).

Use: `trainer.add_callback(NonFiniteLossCallback())` and
`trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))` (`None` starts from scratch).
"""

import json
import logging
import os
import re
import socket
import time
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LOCK_FILE_NAME = "_run.lock"
# What `save_pretrained` and the Trainer leave in a folder that holds a model.
SAVED_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "trainer_state.json")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossCallback(TrainerCallback):
    """
    Raises `NonFiniteLossError` at the first optimizer step whose loss (of any accumulated micro-batch) is not finite,
    before the optimizer step, so the weights and every checkpoint stay finite.

    Callbacks are not given the loss, so a forward hook on the model records the `loss` of every training forward
    pass; the check costs one host sync per optimizer step, which the Trainer already pays for its own logging.
    """

    def __init__(self):
        self.losses = []
        self.hook = None

    def record_loss(self, module, inputs, outputs):
        loss = getattr(outputs, "loss", None)
        if module.training and loss is not None:
            self.losses.append(loss.detach().float().flatten())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.losses = []
        self.hook = model.register_forward_hook(self.record_loss)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        losses, self.losses = self.losses, []
        if not losses:
            return
        losses = torch.cat(losses)
        if torch.isfinite(losses).all():
            return
        self.remove_hook()
        raise NonFiniteLossError(
            f"Training loss is {losses[~torch.isfinite(losses)][0].item()} at step {state.global_step + 1} "
            f"(epoch {state.epoch or 0:.2f}); training stopped before the optimizer applied it. Resume from "
            f"{last_complete_checkpoint(args.output_dir)} with a lower learning rate or stronger gradient clipping, "
            "or look for a bad example in the data."
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hook()

    def remove_hook(self):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def checkpoint_problem(checkpoint, require_optimizer=True):
    """
    Why the Trainer checkpoint folder `checkpoint` cannot be resumed from, or `None` when it is complete.

    Complete means: `trainer_state.json` (which the Trainer writes last) parses and names the folder's step; the
    weights are safetensors whose headers parse and whose data covers the file; `optimizer.pt` and `scheduler.pt`
    exist when `require_optimizer` (set it to `False` for `save_only_model=True` runs); every `.pt`/`.pth` file is a
    readable zip archive (what `torch.save` writes), which a truncated file is not.
    """
    checkpoint = Path(checkpoint)
    match = CHECKPOINT_PATTERN.match(checkpoint.name)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json, which the Trainer writes last"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"trainer_state.json is not valid JSON ({error})"
    if match and state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json is for step {state.get('global_step')}"

    index_file = checkpoint / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as error:
            return f"model.safetensors.index.json is unreadable ({error!r})"
    else:
        weight_files = ["model.safetensors"]
    for name in weight_files:
        if not (checkpoint / name).is_file():
            return f"no {name}"
        try:
            with safe_open(checkpoint / name, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{name} is truncated or corrupt ({error})"

    if require_optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (checkpoint / name).is_file():
                return f"no {name}"
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as error:
            return f"{path.name} is truncated or corrupt ({error})"
    return None


def last_complete_checkpoint(output_dir, require_optimizer=True):
    """
    The `checkpoint-<step>` folder of `output_dir` with the highest step that `checkpoint_problem` accepts, as a
    string, or `None` when there is none. Every newer folder that is skipped is logged with the reason.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {
        int(match.group(1)): path
        for path in output_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
    }
    for step in sorted(steps, reverse=True):
        problem = checkpoint_problem(steps[step], require_optimizer=require_optimizer)
        if problem is None:
            return str(steps[step])
        logger.warning("Not resuming from %s: %s.", steps[step], problem)
    return None


def checkpoint_step(checkpoint):
    """The `global_step` that the checkpoint's `trainer_state.json` records."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def resolve_resume(requested, output_dir, max_steps=-1, require_optimizer=True):
    """
    The checkpoint folder that `--resume_from_checkpoint requested` resumes from, or `None` to start from scratch.

    `requested` is `None`, `"last"` (also `True`: the newest complete checkpoint of `output_dir`) or a folder. Raises
    `ValueError` for an explicit folder that `checkpoint_problem` rejects (the message names the broken file) and when
    `max_steps` (if positive) is at or below the checkpoint's step.
    """
    if requested in (None, False, ""):
        return None
    if requested in (True, "last", "True", "true"):
        checkpoint = last_complete_checkpoint(output_dir, require_optimizer=require_optimizer)
        if checkpoint is None:
            logger.warning(
                "--resume_from_checkpoint last: %s holds no complete checkpoint; training starts from scratch.",
                output_dir,
            )
            return None
    else:
        checkpoint = str(requested)
        problem = checkpoint_problem(checkpoint, require_optimizer) if Path(checkpoint).is_dir() else "no such folder"
        if problem is not None:
            raise ValueError(f"Cannot resume from {checkpoint}: {problem}.")
    step = checkpoint_step(checkpoint)
    if max_steps is not None and 0 < max_steps <= step:
        raise ValueError(
            f"--max_steps {max_steps} is at or below step {step} of {checkpoint}: resuming would have nothing to "
            "train. Raise --max_steps, or evaluate the checkpoint without --do_train."
        )
    return checkpoint


def saved_model_contents(output_dir):
    """The names of the saved-model files and checkpoint folders in `output_dir` (empty when it holds none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(
        path.name
        for path in output_dir.iterdir()
        if path.name in SAVED_MODEL_FILES or (path.is_dir() and CHECKPOINT_PATTERN.match(path.name))
    )


def check_output_dir(output_dir, resuming=False, overwrite=False):
    """
    Raises `FileExistsError` when `output_dir` already holds a saved model or checkpoints and the run neither resumes
    from it nor was asked to overwrite it.
    """
    found = saved_model_contents(output_dir)
    if found and not resuming and not overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise FileExistsError(
            f"Output folder {output_dir} already holds a saved model or checkpoints ({shown}); training would "
            "overwrite them. Use --resume_from_checkpoint last to continue that run, --overwrite_output_dir to "
            "replace it, or another --output_dir."
        )


class OutputDirInUseError(RuntimeError):
    """Another run holds the output folder's lock file."""


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """
    A lock file (`_run.lock`, holding the host, process id and start time) that keeps a second run out of an output
    folder in use, as a context manager. Creating the file is atomic (`O_CREAT | O_EXCL`), so of two runs started at
    once exactly one gets it; the other raises `OutputDirInUseError` naming the holder. A lock left by a process that
    no longer runs on this host (a killed run) is taken over with a warning; one held from another host must be
    removed by hand once that run is known to be gone.
    """

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE_NAME
        self.held = False

    def holder(self):
        """The lock file's contents, or `None` when it is absent or unreadable (being written, or removed)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.holder()
                if holder and holder.get("host") == record["host"] and not _process_alive(holder.get("pid", -1)):
                    logger.warning(
                        "Taking over %s, left by process %s, which no longer runs.", self.path, holder["pid"]
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                if holder is None:
                    # The holder is still writing its record: give it a moment before reading again.
                    time.sleep(0.1)
                    holder = self.holder() or {}
                raise OutputDirInUseError(
                    f"{self.path.parent} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"(started {holder.get('started', '?')}; lock file {self.path}). Wait for it to finish or use "
                    "another --output_dir; if that process is gone, delete the lock file."
                ) from None
            with os.fdopen(descriptor, "w") as file:
                json.dump(record, file)
            self.held = True
            return self
        raise OutputDirInUseError(f"Could not take the lock file {self.path}.")

    def __exit__(self, *exc_info):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


__all__ = [
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "OutputDirInUseError",
    "OutputDirLock",
    "check_output_dir",
    "checkpoint_problem",
    "checkpoint_step",
    "last_complete_checkpoint",
    "resolve_resume",
    "saved_model_contents",
]
