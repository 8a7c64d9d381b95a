"""
Train or fine-tune Pix2Seq with the Hugging Face `Trainer`, evaluating COCO mAP by generation.

With no data flags it runs the embedded demo: a small Pix2Seq learns the synthetic shapes (`synthetic_shapes.py`)
on a CPU within `--max_train_minutes` (10), reports COCO mAP on held-out images, saves the model folder and draws
its predictions into `<output_dir>/predictions/`:

    python run_detection.py

A COCO folder (or `--coco_root` with the COCO 2017 layout, or a Hub parquet data set with `--dataset_name`):

    python run_detection.py --train_images DIR --train_annotations FILE --eval_images DIR --eval_annotations FILE \
        --config_overrides "backbone=resnet50,image_size=640,num_bins=640" --max_steps 100000 --output_dir OUT

Several processes: `torchrun --nproc_per_node N run_detection.py ...` or `accelerate launch run_detection.py ...`.
"""

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import evaluate
import torch
import torchvision
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.optimization import get_wsd_schedule
from transformers.trainer_utils import SchedulerType

from configuration_pix2seq import Pix2SeqConfig
from detection_data import (
    EvalCollator,
    ImageReader,
    TrainAugmentation,
    TrainTransform,
    coco_split,
    collate_train,
    hub_split,
    synthetic_split,
    train_stream,
)
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection
from training_safety import NonFiniteLossCallback, last_complete_checkpoint


logger = logging.getLogger(__name__)

COCO_MAP_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco_map")

# A model small enough to learn the synthetic demo on a 2-core CPU: 96 px, a ResNet-18 cut at stride 16, one encoder
# and two decoder layers, EOS mode. What made it learn faster on this CPU (benchmarks/RESULTS.md has the runs): no
# dropout or stochastic depth on a 10-minute schedule, 48 bins (2 px each), sin-cos initialised coordinate embeddings,
# and a 248-token vocabulary (classes from 100, coordinates from 200) instead of the official 3000.
DEFAULT_MODEL = dict(
    backbone="resnet18",
    backbone_kwargs={"out_indices": (3,)},
    image_size=96,
    num_bins=48,
    coord_token_offset=200,
    vocab_size=248,
    coordinate_embedding_init="sincos",
    d_model=256,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=1024,
    decoder_ffn_dim=1024,
    dropout=0.0,
    drop_path_rate=0.0,
    eos_mode=True,
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved Pix2Seq folder or Hub id to fine-tune; a new model if not given."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config settings over the defaults or the loaded config, e.g. "
                          "'backbone=resnet50,image_size=640,d_model=256,max_instances=100'."},
    )
    use_pretrained_backbone: bool = field(
        default=False, metadata={"help": "Start a new model from the timm backbone's pretrained weights."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "'sdpa' (default) or 'eager'. The CPU demo defaults to 'eager': on its 31-token sequences "
                          "PyTorch's CPU flash-attention backward costs more than plain matrix products."},
    )


@dataclass
class DataTrainingArguments:
    train_images: str | None = field(default=None, metadata={"help": "Folder of the training images (COCO format)."})
    train_annotations: str | None = field(default=None, metadata={"help": "COCO instances JSON of the training images."})
    eval_images: str | None = field(default=None, metadata={"help": "Folder of the evaluation images."})
    eval_annotations: str | None = field(default=None, metadata={"help": "COCO instances JSON of the evaluation images."})
    coco_root: str | None = field(
        default=None,
        metadata={"help": "COCO 2017 root: images/{train2017,val2017}, annotations/instances_{train,val}2017.json."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A parquet detection data set (Hub id or folder); schemas in detection_data.py."}
    )
    dataset_config_name: str | None = field(default=None)
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    bbox_format: str = field(
        default="auto", metadata={"help": "Box format of --dataset_name: xywh, xyxy or auto (checked at run time)."}
    )
    streaming: bool = field(default=True, metadata={"help": "Stream the training data (decode images as they are read)."})
    shuffle_buffer_size: int = field(default=1000)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    synthetic_train_images: int = field(
        default=1_000_000, metadata={"help": "Synthetic training images (drawn on demand; more than a run reads)."}
    )
    synthetic_eval_images: int = field(default=200, metadata={"help": "Held-out synthetic images for evaluation."})
    synthetic_image_size: int = field(default=96, metadata={"help": "Side of the synthetic images, in pixels."})
    min_scale: float | None = field(
        default=None, metadata={"help": "Scale jitter range, as a fraction of the canvas: 0.3 (official), 1.0 for the demo."}
    )
    max_scale: float | None = field(default=None, metadata={"help": "Upper end of the scale jitter: 2.0 (official), 1.0 for the demo."})
    fail_on_bad_records: bool = field(
        default=False, metadata={"help": "Stop at the first unreadable image instead of skipping it with a warning."}
    )
    eval_do_sample: bool = field(
        default=False, metadata={"help": "Evaluate with the model's nucleus sampling instead of greedy decoding."}
    )
    num_prediction_images: int = field(
        default=8, metadata={"help": "Held-out images drawn with their predicted boxes into <output_dir>/predictions."}
    )

    @property
    def uses_synthetic_data(self):
        return not (self.train_annotations or self.eval_annotations or self.coco_root or self.dataset_name)


@dataclass
class Pix2SeqTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the official Pix2Seq recipe as defaults (AdamW betas (0.9, 0.95), weight decay 0.05,
    warmup then linear decay to `min_lr_ratio`, gradient clipping) and the demo's schedule."""

    output_dir: str | None = field(default="pix2seq-output")
    # A high rate for training a small model from scratch; the official COCO fine-tune of a pretrained one uses 3e-5.
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_beta2: float = 0.95
    warmup_steps: float = 100
    # The demo stops on its time budget near a third of these steps: learning needs the rate to stay high.
    max_steps: int = 6000
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    # Decoding and augmenting in a worker process overlaps with the training step instead of stalling it.
    dataloader_num_workers: int = 1
    remove_unused_columns: bool = False
    logging_steps: float = 50
    save_steps: float = 500
    save_total_limit: int | None = 2
    min_lr_ratio: float = field(default=0.01, metadata={"help": "The linear schedule decays to this fraction of the rate."})
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop training after this wall-clock time (the demo defaults to 10)."}
    )


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
            logger.info("Training time budget of %.1f minutes reached at step %d.", self.max_seconds / 60, state.global_step)
            control.should_training_stop = True
            control.should_save = True


class DetectionTrainer(Trainer):
    """
    A `Trainer` whose evaluation generates detections and scores them with COCO mAP (`coco_map/`) against the
    original annotations, in original pixels. With several processes each rank detects its share of the images and
    the predictions are gathered, each image counted once.
    """

    def __init__(self, *args, eval_collator=None, eval_references=None, category_ids=None, generation_kwargs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.eval_references = eval_references
        self.category_ids = category_ids
        self.generation_kwargs = generation_kwargs or {}
        self.last_predictions = None

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None and self.args.lr_scheduler_type == SchedulerType.LINEAR:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = get_wsd_schedule(
                optimizer or self.optimizer, num_warmup_steps=warmup, num_stable_steps=0,
                num_decay_steps=num_training_steps - warmup, decay_type="linear", min_lr_ratio=self.args.min_lr_ratio,
            )
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def detect_batch(self, model, pixel_values, target_sizes):
        """Per-image `boxes` (xyxy, original pixels), `scores`, `labels` (class indices)."""
        outputs = model.detect(pixel_values, **self.generation_kwargs)
        # Threshold 0: every generated object is ranked, as the official evaluation does.
        return self.processing_class.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)

    def predict_detections(self, dataset):
        """COCO-style detections (`image_id`, xywh `boxes`, `scores`, `labels` as category ids) for every image."""
        loader = DataLoader(
            dataset, batch_size=self.args.eval_batch_size, collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        loader = self.accelerator.prepare_data_loader(loader)
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        predictions = []
        for batch in loader:
            if batch["pixel_values"] is None:
                continue
            with torch.no_grad(), self.accelerator.autocast():
                results = self.detect_batch(model, batch["pixel_values"], batch["target_sizes"])
            for image_id, result in zip(batch["image_ids"].tolist(), results):
                xyxy = result["boxes"].float().cpu()
                predictions.append({
                    "image_id": image_id,
                    "boxes": torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist(),
                    "scores": result["scores"].float().cpu().tolist(),
                    "labels": [self.category_ids[label] for label in result["labels"].tolist()],
                })
        # Ranks may repeat images to even out their batches: keep one prediction per image.
        return list({p["image_id"]: p for p in gather_object(predictions)}.values())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.time()
        predictions = self.predict_detections(eval_dataset if eval_dataset is not None else self.eval_dataset)
        metric = evaluate.load(COCO_MAP_PATH, keep_in_memory=True)
        scores = metric.compute(predictions=predictions, references=self.eval_references)
        runtime = time.time() - start
        metrics = {f"{metric_key_prefix}_{name}": round(value, 4) for name, value in scores.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(runtime, 2)
        metrics[f"{metric_key_prefix}_samples_per_second"] = round(len(predictions) / runtime, 2)
        self.last_predictions = predictions
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_splits(data_args, training_args):
    """The training and evaluation `DetectionSplit`s the data flags ask for (either may be None)."""
    readers = dict(world_size=training_args.world_size, num_workers=training_args.dataloader_num_workers)
    if data_args.dataset_name:
        common = dict(config_name=data_args.dataset_config_name, bbox_format=data_args.bbox_format)
        train = hub_split(data_args.dataset_name, data_args.train_split, True, streaming=data_args.streaming,
                          max_samples=data_args.max_train_samples, **common)
        evaluation = hub_split(data_args.dataset_name, data_args.eval_split, False, streaming=False,
                               max_samples=data_args.max_eval_samples, **common)
        return train, evaluation
    if data_args.uses_synthetic_data:
        size = data_args.synthetic_image_size
        return (
            synthetic_split(True, data_args.max_train_samples or data_args.synthetic_train_images, size, **readers),
            synthetic_split(False, data_args.max_eval_samples or data_args.synthetic_eval_images, size),
        )
    if data_args.coco_root:
        root = data_args.coco_root
        data_args.train_images = data_args.train_images or os.path.join(root, "images", "train2017")
        data_args.train_annotations = data_args.train_annotations or os.path.join(root, "annotations", "instances_train2017.json")
        data_args.eval_images = data_args.eval_images or os.path.join(root, "images", "val2017")
        data_args.eval_annotations = data_args.eval_annotations or os.path.join(root, "annotations", "instances_val2017.json")
    train = evaluation = None
    if data_args.train_annotations:
        train = coco_split(data_args.train_images, data_args.train_annotations, True, streaming=data_args.streaming,
                           max_samples=data_args.max_train_samples, **readers)
    if data_args.eval_annotations:
        evaluation = coco_split(data_args.eval_images, data_args.eval_annotations, False, streaming=False,
                                max_samples=data_args.max_eval_samples)
    return train, evaluation


def build_model(model_args, label_map, max_instances):
    """A new Pix2Seq (`DEFAULT_MODEL` + overrides) or a saved one, with the data's label set."""
    labels = dict(id2label=label_map.id2label, label2id={name: i for i, name in label_map.id2label.items()})
    if model_args.model_name_or_path:
        config = Pix2SeqConfig.from_pretrained(model_args.model_name_or_path, **labels)
    else:
        config = Pix2SeqConfig(**DEFAULT_MODEL, max_instances=max_instances,
                               use_pretrained_backbone=model_args.use_pretrained_backbone, **labels)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        # Re-validate the overridden settings (vocabulary overlaps, position table) through the constructor.
        config = Pix2SeqConfig.from_dict(config.to_dict())
    if model_args.model_name_or_path:
        return Pix2SeqForObjectDetection.from_pretrained(model_args.model_name_or_path, config=config)
    return Pix2SeqForObjectDetection(config)


def build_image_processor(model_args, config):
    if model_args.model_name_or_path:
        try:
            processor = Pix2SeqImageProcessor.from_pretrained(model_args.model_name_or_path)
            processor.image_size = config.image_size
            return processor
        except OSError:
            logger.warning("No image processor saved with %s; using the default one.", model_args.model_name_or_path)
    # ImageNet-pretrained timm backbones expect normalised pixels; a backbone trained here learns from [0, 1].
    return Pix2SeqImageProcessor(image_size=config.image_size, do_normalize=model_args.use_pretrained_backbone)


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
        boxes[:, 2:] += boxes[:, :2]
        captions = [f"{names[prediction['labels'][i]]} {prediction['scores'][i]:.2f}" for i in keep]
        drawn = torchvision.utils.draw_bounding_boxes((image * 255).to(torch.uint8), boxes, captions, colors="yellow")
        torchvision.io.write_png(drawn, os.path.join(output_dir, f"{row['image_id']}.png"))


def bf16_default():
    """bf16 mixed precision where the hardware computes in it: recent GPUs, and CPUs with bf16 units (AVX512-BF16, AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Pix2SeqTrainingArguments))
    # The Trainer refuses bf16 without a GPU unless told it runs on the CPU.
    parser.set_defaults(bf16=bf16_default(), use_cpu=not torch.cuda.is_available())
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level())
    # Batches hold per-rank augmented tensors; dispatching them from rank 0 would make rank 0 do all data work.
    if training_args.accelerator_config.dispatch_batches is None:
        training_args.accelerator_config.dispatch_batches = False
    if data_args.uses_synthetic_data and training_args.max_train_minutes is None:
        training_args.max_train_minutes = 10.0
    # Every synthetic image is new, so the demo needs no scale jitter; and crops that cut away every object teach
    # a short run to end its sequences at once (greedy decoding then writes no box at all).
    default_scales = (1.0, 1.0) if data_args.uses_synthetic_data else (0.3, 2.0)
    min_scale = default_scales[0] if data_args.min_scale is None else data_args.min_scale
    max_scale = default_scales[1] if data_args.max_scale is None else data_args.max_scale
    set_seed(training_args.seed)

    train_split, eval_split = build_splits(data_args, training_args)
    label_map = (train_split or eval_split).label_map
    # A new model writes as many objects as the densest training image holds (at most the official 100).
    max_instances = min(100, train_split.max_objects or 100) if train_split else 100
    model = build_model(model_args, label_map, max_instances)
    attn_implementation = model_args.attn_implementation
    if attn_implementation is None and data_args.uses_synthetic_data and not torch.cuda.is_available():
        attn_implementation = "eager"
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    image_processor = build_image_processor(model_args, model.config)
    reader = ImageReader(data_args.fail_on_bad_records)

    train_dataset = None
    if train_split is not None:
        augmentation = TrainAugmentation(model.config.image_size, min_scale, max_scale)
        # More objects than `max_instances`: the tokenizer shuffles them and keeps the first ones (a random subset).
        transform = TrainTransform(image_processor, model.tokenizer.encode_target, augmentation, reader)
        train_dataset = train_stream(train_split, transform, seed=training_args.seed,
                                     shuffle_buffer_size=data_args.shuffle_buffer_size)
    callbacks = [NonFiniteLossCallback()]
    if training_args.max_train_minutes:
        callbacks.append(TrainingTimeBudgetCallback(training_args.max_train_minutes, training_args.world_size))
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
        generation_kwargs={} if data_args.eval_do_sample else {"do_sample": False},
    )

    if train_dataset is not None:
        resume = training_args.resume_from_checkpoint
        if resume == "last":
            # The newest checkpoint whose files were all written: a run killed while saving leaves a partial one.
            resume = last_complete_checkpoint(training_args.output_dir)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if eval_split is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero() and data_args.num_prediction_images:
            draw_predictions(eval_split.dataset, trainer.last_predictions, model.config.id2label, label_map.category_ids,
                             os.path.join(training_args.output_dir, "predictions"), data_args.num_prediction_images)
    return trainer


if __name__ == "__main__":
    main()
