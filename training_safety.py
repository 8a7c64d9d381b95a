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

Use: `trainer.add_callback(NonFiniteLossCallback())` and
`trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))` (`None` starts from scratch).
"""

import json
import logging
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


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


__all__ = ["NonFiniteLossCallback", "NonFiniteLossError", "checkpoint_problem", "last_complete_checkpoint"]
