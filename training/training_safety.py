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

- `read_json(path)` reads a JSON file that must be a regular file, with one `ValueError` naming the file for any
  problem (malformed, not UTF-8, nested too deeply for the parser).
- `staged_save(output_dir)` makes the final save atomic: files are written into a folder beside them and moved in
  only once all are written; `finish_interrupted_save(output_dir)` completes or drops a save a kill interrupted.
- `named_write_errors(folder)` turns a failed save (a full disk, a quota, a read-only file system) into one
  `OutputWriteError` naming the folder and the cause, where torch and safetensors name neither.
- `resume_config_changes(checkpoint, config)` lists the token-layout and architecture settings that a resumed run
  would change: with them, the tokens the model learnt would change meaning.

Use: `trainer.add_callback(NonFiniteLossCallback())` and
`trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))` (`None` starts from scratch).
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from image_processing_pix2seq import NotARegularFileError, open_regular_file


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LOCK_FILE_NAME = "_run.lock"
# The final save is written here (inside the output folder, so that moving the files in is a rename) and moved in
# once complete; the marker says it is.
STAGING_DIR_NAME = ".final-save-in-progress"
STAGING_COMPLETE_MARKER = ".complete"
# Settings a resumed run must share with its checkpoint: the meaning of every token and the network's layout.
RESUME_SETTINGS = (
    "image_size",
    "num_bins",
    "coord_token_offset",
    "class_token_offset",
    "vocab_size",
    "pad_token_id",
    "eos_token_id",
    "task_token_id",
    "fake_class_token_id",
    "max_instances",
    "eos_mode",
    "id2label",
    "backbone",
    "backbone_kwargs",
    "backbone_tf_padding",
    "patch_size",
    "num_channels",
    "d_model",
    "encoder_hidden_size",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "max_position_embeddings",
)
# Below this many free bytes after a failed write, the disk is taken to be full (a write fails once it fills it).
FULL_DISK_BYTES = 16 * 2**20
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


def read_json(path):
    """
    The JSON value in the file at `path`. Raises `ValueError` naming the file when it is no regular file (a FIFO
    would block the read forever), is malformed, is not UTF-8 text or nests deeper than the parser recurses (a
    200,000-deep list would raise `RecursionError`, naming nothing); `FileNotFoundError` when it is missing.
    """
    try:
        with open_regular_file(path) as file:
            return json.loads(file.read().decode("utf-8"))
    except NotARegularFileError as error:
        raise ValueError(str(error)) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read (more than about 1000 levels)") from None


def irregular_file_problem(folder):
    """Why `folder` cannot be read safely (an entry that is a FIFO, device or socket), or `None`."""
    for path in sorted(Path(folder).iterdir()):
        try:
            mode = path.stat().st_mode
        except OSError as error:
            return f"{path.name} cannot be read ({error.strerror})"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return f"{path.name} is not a regular file"
    return None


def weights_problem(folder):
    """Why the safetensors weights of `folder` cannot be loaded (missing, truncated, corrupt), or `None`."""
    folder = Path(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_files = sorted(set(read_json(index_file)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return f"model.safetensors.index.json is unreadable ({error!r})"
    else:
        weight_files = ["model.safetensors"]
    for name in weight_files:
        if not (folder / name).is_file():
            return f"no {name}"
        try:
            with safe_open(folder / name, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{name} is truncated or corrupt ({error})"
    return None


def saved_model_problem(folder):
    """Why `folder` holds no complete saved model (its `config.json` and weights), or `None` when it does."""
    folder = Path(folder)
    problem = irregular_file_problem(folder) if folder.is_dir() else "no such folder"
    if problem is None and (folder / "config.json").is_file():
        try:
            read_json(folder / "config.json")
        except ValueError as error:
            problem = f"config.json is not valid JSON ({error})"
    elif problem is None:
        problem = "no config.json"
    return problem or weights_problem(folder)


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
    problem = irregular_file_problem(checkpoint)
    if problem is not None:
        return problem
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json, which the Trainer writes last"
    try:
        state = read_json(state_file)
    except ValueError as error:
        return f"trainer_state.json is not valid JSON ({error})"
    if not isinstance(state, dict):
        return "trainer_state.json holds no trainer state"
    if match and state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json is for step {state.get('global_step')}"
    problem = weights_problem(checkpoint)
    if problem is not None:
        return problem

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
    return read_json(Path(checkpoint) / "trainer_state.json")["global_step"]


def resolve_resume(requested, output_dir, max_steps=-1, require_optimizer=True, final_save=False):
    """
    The checkpoint folder that `--resume_from_checkpoint requested` resumes from, or `None` to start from scratch.

    `requested` is `None`, `"last"` (also `True`: the newest complete checkpoint of `output_dir`) or a folder. Raises
    `ValueError` for an explicit folder that `checkpoint_problem` rejects (the message names the broken file) and when
    `max_steps` (if positive) is at or below the checkpoint's step. With `final_save` (runs that end by saving their
    model into `output_dir`), a checkpoint at exactly `max_steps` is returned when `output_dir` holds no complete
    final model: the run was stopped during its final save, which the caller then makes from the checkpoint.
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
    if final_save and max_steps is not None and 0 < max_steps == step and (problem := saved_model_problem(output_dir)):
        # The run reached its last step, saved this checkpoint, and was stopped before its final model was whole.
        logger.warning(
            "%s holds no complete final model (%s): the run was stopped during its final save. %s is at --max_steps "
            "%d: it becomes the final model, without training.",
            output_dir,
            problem,
            checkpoint,
            max_steps,
        )
        return checkpoint
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
        problem = saved_model_problem(output_dir)
        stopped = (
            f" but no complete final model ({problem}): a run stopped before its end or during its final save"
            if problem and any(CHECKPOINT_PATTERN.match(name) for name in found)
            else ""
        )
        raise FileExistsError(
            f"Output folder {output_dir} already holds a saved model or checkpoints ({shown}){stopped}; training "
            "would overwrite them. Use --resume_from_checkpoint last to continue that run (a checkpoint at "
            "--max_steps becomes the final model without training), --overwrite_output_dir to replace it, or "
            "another --output_dir."
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
    folder in use, as a context manager. The run holds an exclusive `flock` on the file for as long as it runs, and
    the kernel releases it when the process ends, however it ends: of any number of runs started at once, over a
    stale lock or none, exactly one gets it; the others raise `OutputDirInUseError` naming the holder. A lock file
    left by a killed run is taken over with a warning. One whose record names a process that still runs on this host
    without holding the lock (a run of an older version) is refused too; one from another host that does not hold
    the lock (a file system without working `flock` across hosts) must be removed by hand once that run is known to be
    gone.
    """

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE_NAME
        self.descriptor = None

    def holder(self):
        """The lock file's record, or `None` when it is absent, empty or unreadable."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def _refuse(self, holder):
        holder = holder or {}
        return OutputDirInUseError(
            f"{self.path.parent} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')}; lock file {self.path}). Wait for it to finish or use "
            "another --output_dir; if that process is gone, delete the lock file."
        )

    def _lock_file_at_path(self):
        """A descriptor of the file now at `self.path`, locked, or raises `OutputDirInUseError`."""
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                # The holder writes its record right after locking: give it a moment to name itself.
                for _ in range(20):
                    holder = self.holder()
                    if holder and _process_alive(holder.get("pid", -1)):
                        break
                    time.sleep(0.05)
                raise self._refuse(holder) from None
            except BaseException:
                os.close(descriptor)
                raise
            # A holder that released the lock removed the file first: lock the file now at the path, or try again.
            try:
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    return descriptor
            except FileNotFoundError:
                pass
            os.close(descriptor)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        descriptor = self._lock_file_at_path()
        try:
            previous = self.holder()
            if previous and previous.get("pid") != record["pid"]:
                if previous.get("host") != record["host"] or _process_alive(previous.get("pid", -1)):
                    raise self._refuse(previous)
                logger.warning("Taking over %s, left by process %s, which no longer runs.", self.path, previous["pid"])
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(descriptor)
            raise
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info):
        if self.descriptor is not None:
            # Removed while still locked, so that a run locking the old file sees it is gone and tries again.
            self.path.unlink(missing_ok=True)
            os.close(self.descriptor)
            self.descriptor = None


@contextlib.contextmanager
def staged_save(output_dir, writer=True):
    """
    Makes a save into `output_dir` atomic. Yields a staging folder inside `output_dir` to write every file into; once
    the block ends without error, marks the staging folder complete and moves its files into `output_dir` (renames,
    replacing older files of the same names). A block that raises leaves `output_dir` as it was. After a kill,
    `finish_interrupted_save` (at the next start) finishes the moves if the marker was written, and otherwise drops
    the staging folder. Non-writing processes (`writer=False`, other ranks of a distributed run) get the same path
    and touch nothing.
    """
    staging = Path(output_dir) / STAGING_DIR_NAME
    if not writer:
        yield staging
        return
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in staging.iterdir():
            if path.is_file():
                _fsync(path)
        marker = staging / STAGING_COMPLETE_MARKER
        marker.write_text("")
        _fsync(marker)
        _fsync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_staged_files(staging, Path(output_dir))


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _move_staged_files(staging, output_dir):
    for path in sorted(staging.iterdir()):
        if path.name == STAGING_COMPLETE_MARKER:
            continue
        target = output_dir / path.name
        if path.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    _fsync(output_dir)
    shutil.rmtree(staging)


def finish_interrupted_save(output_dir):
    """
    Completes a `staged_save` that a kill interrupted while moving its files in (its staging folder is marked
    complete), or drops one interrupted while writing (`output_dir` then holds what it held before). Returns what was
    done, for the log, or `None` when there was nothing to do.
    """
    staging = Path(output_dir) / STAGING_DIR_NAME
    if not staging.is_dir():
        return None
    if (staging / STAGING_COMPLETE_MARKER).is_file():
        _move_staged_files(staging, Path(output_dir))
        return f"completed the final save that was interrupted while its files were moved into {output_dir}"
    shutil.rmtree(staging)
    return f"dropped the incomplete final save that was interrupted while it was written into {staging}"


class OutputWriteError(OSError):
    """A save failed for a reason of the file system (full disk, quota, read-only, permissions)."""


def _existing_parent(path):
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_failure_cause(error, folder):
    """
    Why a save into `folder` failed, in words, when `error` is a file-system failure, else `None`. torch reports a
    full disk as `basic_ios::clear: iostream error` or `unexpected pos`, with no errno: the free space left tells.
    """
    causes = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EIO: "input/output error of the device",
    }
    text = str(error)
    if isinstance(error, OSError) and error.errno is not None:
        cause = causes.get(error.errno, error.strerror)
    elif "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
        cause = causes[errno.ENOSPC]
    elif "Disk quota exceeded" in text or "os error 122" in text:
        cause = causes[errno.EDQUOT]
    elif isinstance(error, (SafetensorError, RuntimeError)) and any(
        sign in text for sign in ("iostream error", "unexpected pos", "file write failed", "I/O error", "IoError")
    ):
        cause = f"a write failed ({text.strip()})"
    else:
        return None
    try:
        free = shutil.disk_usage(_existing_parent(folder)).free
    except OSError:
        return cause
    if free < FULL_DISK_BYTES and cause != causes[errno.EDQUOT]:
        cause = causes[errno.ENOSPC]
    return f"{cause} ({free / 2**20:.1f} MiB free)"


@contextlib.contextmanager
def named_write_errors(folder, output_dir=None):
    """
    Turns a file-system failure of the save into `folder` into one `OutputWriteError` naming the folder, the cause
    and, when `output_dir` is given, the checkpoint to resume from once the cause is fixed.
    """
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        cause = write_failure_cause(error, folder)
        if cause is None:
            raise
        resume = last_complete_checkpoint(output_dir) if output_dir else None
        advice = (
            f"then rerun with --resume_from_checkpoint last (it resumes from {resume})"
            if resume
            else "then rerun (no complete checkpoint to resume from yet)"
        )
        raise OutputWriteError(
            f"Cannot save to {folder}: {cause}. Free space there or use another --output_dir, {advice}."
        ) from error


def resume_config_changes(checkpoint, config):
    """
    The `RESUME_SETTINGS` whose values differ between the checkpoint's `config.json` and `config` (the run's), as
    `"name checkpoint value -> run value"` strings; empty when the run continues what the checkpoint learnt.
    """

    def comparable(name, value):
        if name == "backbone_kwargs" and value:
            # A local weights file of a new model is never saved; it does not change what the model learnt.
            value = {key: item for key, item in value.items() if key != "pretrained_cfg_overlay"}
        # As `config.json` holds it: tuples as lists, integer keys (of `id2label`) as strings.
        return json.loads(json.dumps(value, default=str))

    saved = read_json(Path(checkpoint) / "config.json")
    current = config.to_dict()
    changes = []
    for name in RESUME_SETTINGS:
        before, after = comparable(name, saved.get(name)), comparable(name, current.get(name))
        if before != after:
            changes.append(f"{name} {saved.get(name)!r} -> {current.get(name)!r}")
    return changes


__all__ = [
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "OutputDirInUseError",
    "OutputDirLock",
    "OutputWriteError",
    "check_output_dir",
    "checkpoint_problem",
    "checkpoint_step",
    "finish_interrupted_save",
    "last_complete_checkpoint",
    "named_write_errors",
    "read_json",
    "resolve_resume",
    "resume_config_changes",
    "saved_model_contents",
    "saved_model_problem",
    "staged_save",
]
