"""
Train or fine-tune Pix2Seq with the Hugging Face `Trainer`, evaluating COCO mAP by generation.

With no data flags it runs the embedded demo: a small Pix2Seq learns the synthetic shapes (`synthetic_shapes.py`)
on a CPU within `--max_train_minutes` (10), reports COCO mAP on held-out images, saves the model folder and draws
its predictions into `<output_dir>/predictions/`:

    python run_detection.py

A COCO folder (or `--coco_root` with the COCO 2017 layout, or a Hub parquet data set with `--dataset_name`):

    python run_detection.py --train_images DIR --train_annotations FILE --eval_images DIR --eval_annotations FILE \
        --config_overrides "backbone=resnet50,image_size=640,num_bins=640" --max_steps 100000 --output_dir OUT

The steps follow transformers' examples: `--do_train`, `--do_eval` and `--do_predict` run only the steps they name.
Without any of them, the run trains when it has training data and evaluates (and draws predictions) when it has
evaluation data; without data flags, the data is the synthetic demo's. An output folder that already holds a model
or checkpoints is refused unless the run resumes from it or is given `--overwrite_output_dir`, and a lock file keeps
a second run out of a folder in use.

Several processes: `torchrun --nproc_per_node N run_detection.py ...` or `accelerate launch run_detection.py ...`.
"""

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

import datasets
import evaluate
import torch
import torchvision
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForObjectDetection,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.modelcard import TrainingSummary
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import SchedulerType

from configuration_pix2seq import Pix2SeqConfig
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection
from training.detection_data import (
    EvalCollator,
    ImageReader,
    NoTrainingDataError,
    TrainAugmentation,
    TrainTransform,
    coco_split,
    collate_train,
    describe_counts,
    hub_split,
    synthetic_split,
    train_stream,
)
from training.training_safety import (
    NonFiniteLossCallback,
    OutputDirLock,
    check_output_dir,
    checkpoint_step,
    finish_interrupted_save,
    irregular_file_problem,
    named_write_errors,
    resolve_resume,
    resume_config_changes,
    staged_save,
)


logger = logging.getLogger(__name__)

COCO_MAP_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluation", "coco_map")

# A model small enough to learn the synthetic demo on a 2-core CPU: 96 px, a ResNet-18 cut at stride 16, one encoder
# and two decoder layers, EOS mode. What made it learn faster on this CPU (benchmarks/RESULTS.md has the runs): no
# dropout or stochastic depth on a 10-minute schedule, 48 bins (2 px each), sin-cos initialised coordinate embeddings,
# and a 248-token vocabulary (classes from 100, coordinates from 200) instead of the official 3000.
DEFAULT_MODEL = {
    "backbone": "resnet18",
    "backbone_kwargs": {"out_indices": (3,)},
    "image_size": 96,
    "num_bins": 48,
    "coord_token_offset": 200,
    "vocab_size": 248,
    "coordinate_embedding_init": "sincos",
    "d_model": 256,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "eos_mode": True,
}


# The demo's step budget (it stops on its time budget near a third of these steps; learning needs the rate to stay
# high). Other runs train for `--max_steps` or `--num_train_epochs`.
DEMO_MAX_STEPS = 6000


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved Pix2Seq folder or Hub id to fine-tune; a new model if not given."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "A config (folder or Hub id) to use instead of the model's own."}
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "An image processor (folder or Hub id) to use instead of the model's own."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where models and data sets downloaded from the Hub are stored."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use: a branch name, tag name or commit id."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "The Hub token for private models and data sets (`hf auth login` stores one otherwise)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Load the config, model and image processor through the Auto classes with the code saved "
            "in their folder or Hub repository instead of this repository's classes. Use it only for "
            "repositories you trust and whose code you have read."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config settings over the defaults or the loaded config, e.g. "
            "'backbone=resnet50,image_size=640,d_model=256,max_instances=100'."
        },
    )
    use_pretrained_backbone: bool = field(
        default=False, metadata={"help": "Start a new model from the timm backbone's pretrained weights."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "'sdpa' (default) or 'eager'. The CPU demo defaults to 'eager': on its 31-token sequences "
            "PyTorch's CPU flash-attention backward costs more than plain matrix products."
        },
    )

    @property
    def hub_kwargs(self):
        """What every `from_pretrained` call passes on."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token}


@dataclass
class DataTrainingArguments:
    train_images: str | None = field(default=None, metadata={"help": "Folder of the training images (COCO format)."})
    train_annotations: str | None = field(
        default=None, metadata={"help": "COCO instances JSON of the training images."}
    )
    eval_images: str | None = field(default=None, metadata={"help": "Folder of the evaluation images."})
    eval_annotations: str | None = field(
        default=None, metadata={"help": "COCO instances JSON of the evaluation images."}
    )
    coco_root: str | None = field(
        default=None,
        metadata={"help": "COCO 2017 root: images/{train2017,val2017}, annotations/instances_{train,val}2017.json."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A parquet detection data set (Hub id or folder); schemas in training/detection_data.py."},
    )
    dataset_config_name: str | None = field(default=None)
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    train_val_split: float | None = field(
        default=0.15,
        metadata={
            "help": "With training data and no evaluation data (no --eval_annotations, or no --eval_split in "
            "the data set), the fraction of the training images held out for evaluation; 0 holds out "
            "none."
        },
    )
    image_square_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square canvas every image is resized and padded to (the config's "
            "`image_size`): the model's own by default, 96 for a new demo model."
        },
    )
    bbox_format: str = field(
        default="auto", metadata={"help": "Box format of --dataset_name: xywh, xyxy or auto (checked at run time)."}
    )
    streaming: bool = field(
        default=True, metadata={"help": "Stream the training data (decode images as they are read)."}
    )
    shuffle_buffer_size: int = field(default=1000)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    synthetic_train_images: int = field(
        default=1_000_000, metadata={"help": "Synthetic training images (drawn on demand; more than a run reads)."}
    )
    synthetic_eval_images: int = field(default=200, metadata={"help": "Held-out synthetic images for evaluation."})
    synthetic_image_size: int = field(default=96, metadata={"help": "Side of the synthetic images, in pixels."})
    min_scale: float | None = field(
        default=None,
        metadata={"help": "Scale jitter range, as a fraction of the canvas: 0.3 (official), 1.0 for the demo."},
    )
    max_scale: float | None = field(
        default=None, metadata={"help": "Upper end of the scale jitter: 2.0 (official), 1.0 for the demo."}
    )
    fail_on_bad_records: bool = field(
        default=False, metadata={"help": "Stop at the first unreadable image instead of skipping it with a warning."}
    )
    num_prediction_images: int = field(
        default=8,
        metadata={
            "help": "With --do_predict: evaluation images drawn with their predicted boxes into "
            "<output_dir>/predictions (all predictions go to <output_dir>/predictions.json)."
        },
    )

    @property
    def uses_synthetic_data(self):
        return not (self.train_annotations or self.eval_annotations or self.coco_root or self.dataset_name)

    @property
    def has_training_data(self):
        return bool(self.uses_synthetic_data or self.train_annotations or self.coco_root or self.dataset_name)


@dataclass
class Pix2SeqTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the official Pix2Seq recipe as defaults (AdamW betas (0.9, 0.95), weight decay 0.05,
    warmup then linear decay to `min_lr_ratio` of the rate, gradient clipping), and the example script's
    `overwrite_output_dir`, which transformers 5 no longer has."""

    output_dir: str | None = field(default="pix2seq-output")
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output folder that already holds a model or checkpoints, replacing them."},
    )
    # Not given (`None`) means: train when there is training data, evaluate and predict when there is evaluation data.
    do_train: bool | None = field(default=None, metadata={"help": "Run training."})
    do_eval: bool | None = field(default=None, metadata={"help": "Run evaluation (COCO mAP) on the evaluation data."})
    do_predict: bool | None = field(
        default=None, metadata={"help": "Write the evaluation images' detections (predictions.json, drawn PNGs)."}
    )
    # A high rate for training a small model from scratch; the official COCO fine-tune of a pretrained one uses 3e-5.
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_beta2: float = 0.95
    warmup_steps: float = 100
    # transformers' polynomial schedule with power 1 is the official one: linear warmup, then linear decay to a floor
    # (`lr_end`, which `min_lr_ratio` sets unless `--lr_scheduler_kwargs` gives it).
    lr_scheduler_type: SchedulerType | str = field(
        default="polynomial",
        metadata={
            "help": "transformers' schedule name. The default, 'polynomial' (power 1), is the official "
            "linear warmup then linear decay to --min_lr_ratio of the rate; 'linear' decays to 0."
        },
    )
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    # Decoding and augmenting in a worker process overlaps with the training step instead of stalling it.
    dataloader_num_workers: int = 1
    remove_unused_columns: bool = False
    logging_steps: float = 50
    save_steps: float = 500
    save_total_limit: int | None = 2
    metric_for_best_model: str | None = field(
        default="map", metadata={"help": "The evaluation metric --load_best_model_at_end keeps the best of."}
    )
    min_lr_ratio: float = field(
        default=0.01, metadata={"help": "The polynomial (linear) schedule decays to this fraction of the rate."}
    )
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop training after this wall-clock time (the demo defaults to 10)."}
    )

    def __post_init__(self):
        super().__post_init__()
        kwargs = self.lr_scheduler_kwargs or {}
        if self.lr_scheduler_type == SchedulerType.POLYNOMIAL and "lr_end" not in kwargs:
            self.lr_scheduler_kwargs = {**kwargs, "lr_end": self.learning_rate * self.min_lr_ratio}


class TrainingTimeBudgetCallback(TrainerCallback):
    """Stops training (and saves) once `max_minutes` of wall-clock training time have passed since training began.
    Evaluations during training (`--eval_strategy steps`) do not count against the budget."""

    def __init__(self, max_minutes, world_size=1):
        self.max_seconds = max_minutes * 60
        # Every rank must stop at the same step, so with several processes rank 0 decides, every few steps.
        self.check_every = 1 if world_size == 1 else 10
        self.world_size = world_size
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.start is not None and metrics:
            self.start += sum(value for name, value in metrics.items() if name.endswith("_runtime"))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.check_every:
            return
        over_budget = [time.monotonic() - self.start > self.max_seconds]
        if self.world_size > 1:
            broadcast_object_list(over_budget)
        if over_budget[0]:
            logger.info(
                "Training time budget of %.1f minutes reached at step %d.", self.max_seconds / 60, state.global_step
            )
            control.should_training_stop = True
            control.should_save = True


class DetectionTrainer(Trainer):
    """
    A `Trainer` whose evaluation generates detections, with the decoding settings of the model's
    `generation_config` (what `pipeline("object-detection")` uses on the saved folder), and scores them with COCO
    mAP (`coco_map/`, per class too: `map_<label>`) against the original annotations, in original pixels. Images
    that cannot be read are left out of the score and counted (`<prefix>_images_skipped`). With several processes
    each rank detects its share of the images and the predictions are gathered, each image counted once.

    Every folder it saves (the final model and each checkpoint) gets a model card (`README.md`).
    """

    def __init__(
        self, *args, eval_collator=None, eval_references=None, category_ids=None, model_card_kwargs=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.eval_references = eval_references
        self.category_ids = category_ids
        self.model_card_kwargs = model_card_kwargs or {}
        self.last_predictions = None

    def save_model(self, output_dir=None, _internal_call=False):
        """
        Saves as the Trainer does, with a model card. The final save (into `args.output_dir`) is atomic: it is written
        beside and moved in once whole (`training_safety.staged_save`), so a kill never leaves a truncated file in the
        folder users load. A file-system failure (e.g. a full disk) raises one error naming the folder and the cause.
        """
        final = output_dir is None or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        output_dir = output_dir or self.args.output_dir
        with named_write_errors(output_dir, self.args.output_dir):
            if not final:
                super().save_model(output_dir, _internal_call)
                self._write_model_card(output_dir)
                return
            with staged_save(output_dir, writer=self.args.should_save) as staging:
                super().save_model(str(staging), _internal_call=True)
                self._write_model_card(staging)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _write_model_card(self, folder):
        if self.is_world_process_zero():
            card = TrainingSummary.from_trainer(self, **self.model_card_kwargs).to_model_card()
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
                file.write(card)

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with named_write_errors(folder, self.args.output_dir):
            super()._save_checkpoint(model, trial)

    def save_state(self):
        """`trainer_state.json` of the output folder, written beside and renamed into place."""
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, "trainer_state.json")
            with named_write_errors(self.args.output_dir, self.args.output_dir):
                self.state.save_to_json(path + ".tmp")
                os.replace(path + ".tmp", path)

    def finish_from_checkpoint(self, checkpoint):
        """The final model and state of a run whose last checkpoint is at `max_steps`, without training."""
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))

    def _issue_warnings_after_load(self, load_result):
        # A checkpoint stores a tied weight once (lm_head.weight is the token embedding): its absence is expected.
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def detect_batch(self, model, pixel_values, target_sizes):
        """Per-image `boxes` (xyxy, original pixels), `scores`, `labels` (class indices): generated, then decoded."""
        outputs = model.detect(pixel_values)
        # Threshold 0: every generated object is ranked, as the official evaluation does.
        return self.processing_class.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)

    def predict_detections(self, dataset):
        """Detections (`image_id`, xyxy `boxes` in original pixels, `scores`, `labels` as category ids) of every image."""
        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare_data_loader(loader)
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        # The progress callback draws its evaluation bar from these events, as in `Trainer.evaluation_loop`.
        self.callback_handler.eval_dataloader = loader
        predictions = []
        for batch in loader:
            if batch["pixel_values"] is not None:
                with torch.no_grad(), self.accelerator.autocast():
                    results = self.detect_batch(model, batch["pixel_values"], batch["target_sizes"])
                for image_id, result in zip(batch["image_ids"].tolist(), results):
                    predictions.append(
                        {
                            "image_id": image_id,
                            "boxes": result["boxes"].float().cpu().tolist(),
                            "scores": result["scores"].float().cpu().tolist(),
                            "labels": [self.category_ids[label] for label in result["labels"].tolist()],
                        }
                    )
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        # Ranks may repeat images to even out their batches: keep one prediction per image.
        return list({p["image_id"]: p for p in gather_object(predictions)}.values())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.time()
        predictions = self.predict_detections(eval_dataset if eval_dataset is not None else self.eval_dataset)
        read = {p["image_id"] for p in predictions}
        references = [r for r in self.eval_references if r["image_id"] in read]
        skipped = len(self.eval_references) - len(references)
        if not references:
            raise ValueError(f"No evaluation image could be read: all {skipped} were skipped (see the warnings).")
        if skipped:
            logger.warning(
                "Evaluation skipped %d of %d images that could not be read; mAP covers the other %d.",
                skipped,
                len(self.eval_references),
                len(references),
            )
        metric = evaluate.load(COCO_MAP_PATH, keep_in_memory=True)
        scores = metric.compute(predictions=coco_boxes(predictions), references=references, class_metrics=True)
        runtime = time.time() - start
        per_class = scores.pop("map_per_class")
        id2label = self.model.config.id2label
        for index, category_id in enumerate(self.category_ids):
            # -1 for a class without ground truth in the evaluated images, as pycocotools marks it.
            scores[f"map_{id2label[index]}"] = per_class.get(category_id, -1.0)
        metrics = {f"{metric_key_prefix}_{name}": round(value, 4) for name, value in scores.items()}
        metrics[f"{metric_key_prefix}_images_skipped"] = skipped
        metrics[f"{metric_key_prefix}_runtime"] = round(runtime, 2)
        metrics[f"{metric_key_prefix}_samples_per_second"] = round(len(predictions) / runtime, 2)
        self.last_predictions = predictions
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_splits(data_args, training_args, model_args=None, do_train=True, do_eval=True):
    """The training and evaluation `DetectionSplit`s the run needs (`None` for a step it does not run)."""
    readers = {"world_size": training_args.world_size, "num_workers": training_args.dataloader_num_workers}
    hub_kwargs = {"cache_dir": model_args.cache_dir, "token": model_args.token} if model_args else {}
    train = evaluation = None
    if data_args.dataset_name:
        common = dict(config_name=data_args.dataset_config_name, bbox_format=data_args.bbox_format, **hub_kwargs)
        train_split, eval_split, streaming = data_args.train_split, data_args.eval_split, data_args.streaming
        if (
            do_eval
            and data_args.train_val_split
            and eval_split
            not in datasets.get_dataset_split_names(
                data_args.dataset_name, data_args.dataset_config_name, **hub_kwargs
            )
        ):
            # Slices of a split are read whole, not streamed.
            percent = round(100 * (1 - data_args.train_val_split))
            train_split, eval_split, streaming = f"{train_split}[:{percent}%]", f"{train_split}[{percent}%:]", False
        if do_train:
            train = hub_split(
                data_args.dataset_name,
                train_split,
                True,
                streaming=streaming,
                max_samples=data_args.max_train_samples,
                **common,
            )
        if do_eval:
            evaluation = hub_split(
                data_args.dataset_name,
                eval_split,
                False,
                streaming=False,
                max_samples=data_args.max_eval_samples,
                **common,
            )
        return train, evaluation
    if data_args.uses_synthetic_data:
        size = data_args.synthetic_image_size
        if do_train:
            train = synthetic_split(
                True, data_args.max_train_samples or data_args.synthetic_train_images, size, **readers
            )
        if do_eval:
            evaluation = synthetic_split(False, data_args.max_eval_samples or data_args.synthetic_eval_images, size)
        return train, evaluation
    if data_args.coco_root:
        root = data_args.coco_root
        data_args.train_images = data_args.train_images or os.path.join(root, "images", "train2017")
        data_args.train_annotations = data_args.train_annotations or os.path.join(
            root, "annotations", "instances_train2017.json"
        )
        data_args.eval_images = data_args.eval_images or os.path.join(root, "images", "val2017")
        data_args.eval_annotations = data_args.eval_annotations or os.path.join(
            root, "annotations", "instances_val2017.json"
        )
    for images, annotations, name in (
        (data_args.train_images, data_args.train_annotations, "train"),
        (data_args.eval_images, data_args.eval_annotations, "eval"),
    ):
        if bool(images) != bool(annotations):
            raise ValueError(f"--{name}_images and --{name}_annotations go together; got only one of them.")
    hold_out = {}
    if do_eval and not data_args.eval_annotations and data_args.train_val_split:
        hold_out = {"hold_out_fraction": data_args.train_val_split}
    if do_train:
        train = coco_split(
            data_args.train_images,
            data_args.train_annotations,
            True,
            streaming=data_args.streaming,
            max_samples=data_args.max_train_samples,
            **hold_out,
            **readers,
        )
    if do_eval:
        images, annotations = (
            (data_args.eval_images, data_args.eval_annotations)
            if not hold_out
            else (data_args.train_images, data_args.train_annotations)
        )
        evaluation = coco_split(
            images,
            annotations,
            False,
            streaming=False,
            max_samples=data_args.max_eval_samples,
            held_out=bool(hold_out),
            **hold_out,
        )
    return train, evaluation


def resolve_steps(data_args, training_args):
    """
    `(do_train, do_eval, do_predict)`. Flags given run exactly their steps, each needing its data; with none given,
    the run trains when it has training data and evaluates and predicts when it has evaluation data (given, held out
    by `--train_val_split`, or the demo's).
    """
    has_eval_data = bool(
        data_args.uses_synthetic_data
        or data_args.eval_annotations
        or data_args.coco_root
        or (data_args.has_training_data and data_args.train_val_split)
        or data_args.dataset_name
    )
    flags = (training_args.do_train, training_args.do_eval, training_args.do_predict)
    if all(flag is None for flag in flags):
        return data_args.has_training_data, has_eval_data, has_eval_data and data_args.num_prediction_images > 0
    do_train, do_eval, do_predict = (bool(flag) for flag in flags)
    # Evaluating during training (`--eval_strategy`) needs the evaluation data too.
    do_eval = do_eval or training_args.eval_strategy != "no"
    if do_train and not data_args.has_training_data:
        raise ValueError(
            "--do_train needs training data: --train_images/--train_annotations, --coco_root or "
            "--dataset_name (or no data flag at all for the synthetic demo)."
        )
    if (do_eval or do_predict) and not has_eval_data:
        raise ValueError(
            "--do_eval and --do_predict need evaluation data: --eval_images/--eval_annotations, "
            "--coco_root, --dataset_name or --train_val_split with training data."
        )
    return do_train, do_eval, do_predict


def build_model(model_args, data_args, label_map, max_instances, train=True):
    """
    A new Pix2Seq (`DEFAULT_MODEL` + overrides) or a saved one. A model that trains takes the data's label set; one
    that only evaluates keeps its own, which must be the data's.
    """
    labels = {"id2label": label_map.id2label, "label2id": {name: i for i, name in label_map.id2label.items()}}
    config_class, model_class, hub_kwargs = Pix2SeqConfig, Pix2SeqForObjectDetection, model_args.hub_kwargs
    if model_args.trust_remote_code:
        # The Auto classes run the code saved with the model (its `auto_map`).
        config_class, model_class = AutoConfig, AutoModelForObjectDetection
        hub_kwargs = {**hub_kwargs, "trust_remote_code": True}
    config_source = model_args.config_name or model_args.model_name_or_path
    for source in (config_source, model_args.model_name_or_path):
        problem = irregular_file_problem(source) if source and os.path.isdir(source) else None
        if problem:
            raise ValueError(f"Cannot load {source}: {problem} (a FIFO or device could block the read forever).")
    if config_source:
        config = config_class.from_pretrained(config_source, **hub_kwargs, **(labels if train else {}))
        if not train and list(config.id2label.values()) != label_map.names:
            raise ValueError(
                f"{config_source} detects {list(config.id2label.values())} but the evaluation data's classes are "
                f"{label_map.names}; evaluate it on data with its classes, or fine-tune it with --do_train."
            )
    else:
        config = Pix2SeqConfig(
            **DEFAULT_MODEL,
            max_instances=max_instances,
            use_pretrained_backbone=model_args.use_pretrained_backbone,
            **labels,
        )
    overrides = model_args.config_overrides
    if data_args.image_square_size:
        overrides = ",".join(filter(None, [overrides, f"image_size={data_args.image_square_size}"]))
    if overrides:
        config.update_from_string(overrides)
        # Re-validate the overridden settings (vocabulary overlaps, position table) through the constructor.
        config = type(config).from_dict(config.to_dict())
    if model_args.model_name_or_path:
        return model_class.from_pretrained(model_args.model_name_or_path, config=config, **hub_kwargs)
    return Pix2SeqForObjectDetection(config)


def build_image_processor(model_args, config):
    """
    The model's image processor: the saved one's image settings (normalisation, padding value), with the canvas and
    the codec (classes, vocabulary) of `config`, which a fine-tuning run may have changed.
    """
    source = model_args.image_processor_name or model_args.model_name_or_path
    if source:
        try:
            if model_args.trust_remote_code:
                saved = AutoImageProcessor.from_pretrained(source, **model_args.hub_kwargs, trust_remote_code=True)
            else:
                saved = Pix2SeqImageProcessor.from_pretrained(source, **model_args.hub_kwargs)
            settings = {key: getattr(saved, key) for key in ("do_normalize", "image_mean", "image_std", "pad_value")}
            return type(saved).from_model_config(config, **settings)
        except OSError:
            if model_args.image_processor_name:
                raise
            logger.warning("No image processor saved with %s; using the default one.", source)
    # ImageNet-pretrained timm backbones expect normalised pixels; a backbone trained here learns from [0, 1].
    return Pix2SeqImageProcessor.from_model_config(config, do_normalize=model_args.use_pretrained_backbone)


def draw_predictions(dataset, predictions, id2label, category_ids, output_dir, num_images, score_threshold=0.3):
    """Writes PNGs of the first `num_images` evaluation images with their predictions above `score_threshold`."""
    os.makedirs(output_dir, exist_ok=True)
    by_image = {p["image_id"]: p for p in predictions}
    names = {category_id: id2label[i] for i, category_id in enumerate(category_ids)}
    reader = ImageReader()
    for row in dataset.select(range(min(num_images, len(dataset)))):
        image = reader(row["image"])
        prediction = by_image.get(row["image_id"])
        if image is None or prediction is None:
            continue
        keep = [i for i, score in enumerate(prediction["scores"]) if score >= score_threshold]
        boxes = torch.tensor([prediction["boxes"][i] for i in keep], dtype=torch.float32).reshape(-1, 4)
        captions = [f"{names[prediction['labels'][i]]} {prediction['scores'][i]:.2f}" for i in keep]
        drawn = (image * 255).to(torch.uint8)
        # torchvision warns on an empty box list: an image with nothing found is written as it is.
        if keep:
            drawn = torchvision.utils.draw_bounding_boxes(drawn, boxes, captions, colors="yellow")
        torchvision.io.write_png(drawn, os.path.join(output_dir, f"{row['image_id']}.png"))


def bf16_default():
    """bf16 mixed precision where the hardware computes in it: recent GPUs, and CPUs with bf16 units (AVX512-BF16, AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def summarize_data_cleaning(splits):
    """One WARNING for the run: what cleaning the annotations dropped, clipped or corrected, per split."""
    parts = [
        f"{name}: {describe_counts(split.stats)}"
        for name, split in splits.items()
        if split is not None and any(split.stats.values())
    ]
    if parts:
        logger.warning("Data cleaning (details at INFO): %s.", "; ".join(parts))


def check_training_data(split, reader):
    """
    Raises `NoTrainingDataError`, with the counts of what was skipped, unless some training record has an image that
    decodes. Reads records in order until one does (at a small size: JPEGs decode at 1/8 scale).
    """
    for record in split.dataset:
        if reader.read(record["image"], max_size=32) is not None:
            return
    stats = dict(split.stats, images_unreadable_when_decoded=reader.num_skipped)
    raise NoTrainingDataError(
        f"No usable training example: {describe_counts(stats, empty='the training data is empty')}."
    )


def option_given(argv, name):
    """Whether the command line `argv` sets the option `--name` (either spelling, with or without `=value`)."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(str(arg).split("=", 1)[0] in spellings for arg in argv)


def demo_dataloader_workers(data_args, training_args, argv):
    """
    The synthetic demo on a CPU loads its data in the training process unless `--dataloader_num_workers` is given:
    an image costs about a millisecond to draw and encode, so a worker process would hold a core for little work
    while the model step, the limit, could use it (on the 2-core demo machine: 181 against 135 images/s,
    benchmarks/RESULTS.md). Real data, slower to decode, keeps its worker.
    """
    if data_args.uses_synthetic_data and training_args.use_cpu and not option_given(argv, "dataloader_num_workers"):
        training_args.dataloader_num_workers = 0


@contextlib.contextmanager
def threads_beside_workers(training_args):
    """
    On a CPU, this process's intra-op threads and its DataLoader workers share the cores: while the run lasts, the
    process keeps `torch.get_num_threads()` minus the workers (at least 1), unless `OMP_NUM_THREADS` sets the count.
    Oversubscribed, the threads of one operator wait for each other at every barrier, behind a worker that holds
    their core: on the 2-core demo machine, shared with other jobs, 2 threads and a worker trained many times slower
    than 1 thread and a worker (benchmarks/RESULTS.md).
    """
    threads = torch.get_num_threads()
    workers = training_args.dataloader_num_workers
    if not training_args.use_cpu or not workers or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    torch.set_num_threads(max(1, threads - workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def coco_boxes(predictions):
    """The boundary to COCO: the detections with `[x, y, w, h]` boxes instead of `(x_min, y_min, x_max, y_max)`."""
    return [dict(p, boxes=[[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in p["boxes"]]) for p in predictions]


def write_predictions(predictions, path):
    """The detections as a COCO results file (`image_id`, `category_id`, `bbox` xywh, `score`)."""
    results = [
        {"image_id": p["image_id"], "category_id": label, "bbox": box, "score": score}
        for p in coco_boxes(predictions)
        for box, score, label in zip(p["boxes"], p["scores"], p["labels"])
    ]
    with open(path, "w") as file:
        json.dump(results, file)


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Pix2SeqTrainingArguments))
    # The Trainer refuses bf16 without a GPU unless told it runs on the CPU.
    parser.set_defaults(bf16=bf16_default(), use_cpu=not torch.cuda.is_available())
    # `--do_train` alone means true, as for other boolean flags (HfArgumentParser asks a `bool | None` for a value).
    for action in parser._actions:
        if action.dest in ("do_train", "do_eval", "do_predict"):
            action.nargs, action.const = "?", True
    command_line = sys.argv[1:] if argv is None else list(argv)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        with open(sys.argv[1], encoding="utf-8") as file:
            settings = json.load(file)
        model_args, data_args, training_args = parser.parse_dict(settings)
        command_line = [f"--{key}" for key in settings]
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    do_train, do_eval, do_predict = resolve_steps(data_args, training_args)
    training_args.do_train, training_args.do_eval, training_args.do_predict = do_train, do_eval, do_predict
    # Batches hold per-rank augmented tensors; dispatching them from rank 0 would make rank 0 do all data work.
    if training_args.accelerator_config.dispatch_batches is None:
        training_args.accelerator_config.dispatch_batches = False
    if data_args.uses_synthetic_data and training_args.max_train_minutes is None:
        training_args.max_train_minutes = 10.0
    demo_dataloader_workers(data_args, training_args, command_line)
    # Every synthetic image is new, so the demo needs no scale jitter; and crops that cut away every object teach
    # a short run to end its sequences at once (greedy decoding then writes no box at all).
    default_scales = (1.0, 1.0) if data_args.uses_synthetic_data else (0.3, 2.0)
    min_scale = default_scales[0] if data_args.min_scale is None else data_args.min_scale
    max_scale = default_scales[1] if data_args.max_scale is None else data_args.max_scale
    set_seed(training_args.seed)

    # Only the first process writes results and models, so only it holds the folder.
    lock = OutputDirLock(training_args.output_dir) if training_args.process_index == 0 else contextlib.nullcontext()
    with lock, threads_beside_workers(training_args):
        if training_args.process_index == 0:
            done = finish_interrupted_save(training_args.output_dir)
            if done:
                logger.warning("%s: %s.", training_args.output_dir, done)
        resume = None
        if do_train:
            resume = resolve_resume(
                training_args.resume_from_checkpoint,
                training_args.output_dir,
                training_args.max_steps,
                require_optimizer=not training_args.save_only_model,
                final_save=True,
            )
            check_output_dir(
                training_args.output_dir, resuming=resume is not None, overwrite=training_args.overwrite_output_dir
            )
        return run(model_args, data_args, training_args, resume, (min_scale, max_scale))


def run(model_args, data_args, training_args, resume, scales):
    """The run's steps, once its arguments are settled and its output folder is held."""
    do_train, do_eval, do_predict = training_args.do_train, training_args.do_eval, training_args.do_predict
    train_split, eval_split = build_splits(data_args, training_args, model_args, do_train, do_eval or do_predict)
    summarize_data_cleaning({"training": train_split, "evaluation": eval_split})
    label_map = (train_split or eval_split).label_map
    # A new model writes as many objects as the densest training image holds (at most the official 100).
    max_instances = min(100, train_split.max_objects or 100) if train_split else 100
    model = build_model(model_args, data_args, label_map, max_instances, train=do_train)
    if resume:
        changes = resume_config_changes(resume, model.config)
        if changes:
            raise ValueError(
                f"Cannot resume from {resume}: this run changes settings the checkpoint was trained with "
                f"(checkpoint -> this run: {'; '.join(changes)}). The tokens and layers it learnt would change "
                "meaning. Resume with the checkpoint's settings (drop the --config_overrides or --image_square_size "
                f"that change them), or start a new run from its weights: --model_name_or_path {resume}."
            )
    attn_implementation = model_args.attn_implementation
    if attn_implementation is None and data_args.uses_synthetic_data and not torch.cuda.is_available():
        attn_implementation = "eager"
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    image_processor = build_image_processor(model_args, model.config)
    reader = ImageReader(data_args.fail_on_bad_records)

    train_dataset = None
    if do_train:
        check_training_data(train_split, reader)
        augmentation = TrainAugmentation(model.config.image_size, *scales)
        # More objects than `max_instances`: the codec shuffles them and keeps the first ones (a random subset).
        transform = TrainTransform(image_processor, augmentation, reader)
        train_dataset = train_stream(
            train_split, transform, seed=training_args.seed, shuffle_buffer_size=data_args.shuffle_buffer_size
        )
        if training_args.max_steps <= 0:
            training_args.max_steps = epochs_to_steps(data_args, training_args, train_split)
    callbacks = [NonFiniteLossCallback()]
    if training_args.max_train_minutes:
        callbacks.append(TrainingTimeBudgetCallback(training_args.max_train_minutes, training_args.world_size))
    model_card_kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "object-detection",
        "dataset": data_args.dataset_name or ("synthetic shapes" if data_args.uses_synthetic_data else None),
        "tags": ["pix2seq", "object-detection", "vision"],
    }
    trainer = DetectionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_split.dataset if eval_split else None,
        processing_class=image_processor,
        data_collator=collate_train,
        callbacks=callbacks,
        eval_collator=EvalCollator(image_processor, reader),
        eval_references=eval_split.references if eval_split else None,
        category_ids=label_map.category_ids,
        model_card_kwargs=model_card_kwargs,
    )

    if do_train and resume and 0 < training_args.max_steps <= checkpoint_step(resume):
        # `resolve_resume` allows this only for a run stopped during its final save: the checkpoint is the model.
        trainer.finish_from_checkpoint(resume)
        trainer.save_model()
        trainer.save_state()
    elif do_train:
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if do_predict:
        predictions = trainer.last_predictions or trainer.predict_detections(eval_split.dataset)
        if trainer.is_world_process_zero():
            write_predictions(predictions, os.path.join(training_args.output_dir, "predictions.json"))
            if data_args.num_prediction_images:
                draw_predictions(
                    eval_split.dataset,
                    predictions,
                    model.config.id2label,
                    label_map.category_ids,
                    os.path.join(training_args.output_dir, "predictions"),
                    data_args.num_prediction_images,
                )
    if training_args.push_to_hub:
        trainer.push_to_hub(**model_card_kwargs)
    return trainer


def epochs_to_steps(data_args, training_args, split):
    """`--num_train_epochs` as steps (a stream has no length for the Trainer to count); the demo's step budget."""
    if data_args.uses_synthetic_data:
        return DEMO_MAX_STEPS
    if split.num_examples is None:
        raise ValueError(
            "This streamed data set does not say how many examples it holds: give --max_steps, or "
            "--streaming false so that --num_train_epochs can be counted."
        )
    examples_per_step = (
        training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )
    return max(1, math.ceil(split.num_examples * training_args.num_train_epochs / examples_per_step))


def cli():
    """
    `main` for the command line: an error ends the run with one message on stderr and exit status 1 (and the
    traceback with `--log_level debug`), and SIGTERM ends it as Ctrl-C does, releasing the output folder's lock.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    name = os.path.basename(sys.argv[0])
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        argv = sys.argv[1:]
        level = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--log_level=")), None)
        if "--log_level" in argv:
            level = (argv[argv.index("--log_level") + 1 :] or [None])[0]
        if level == "debug":
            traceback.print_exc()
        print(f"{name}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
