"""
Pix2Seq against DETR-R50 on BCCD (real blood-cell photographs): both from random initialisation (no weights can be
downloaded here), trained by the same `Trainer` on the same augmented stream for the same wall-clock budget, scored
by the same COCO mAP on the test split. Prints a table and writes JSON.

    python benchmarks/bccd_vs_detr.py --minutes 4
    python benchmarks/bccd_vs_detr.py --minutes 4 --device cuda --bf16 true   # on a GPU
"""

import argparse
import json
import os
import platform
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor  # noqa: E402

import run_detection  # noqa: E402
from image_processing_pix2seq import Pix2SeqImageProcessor  # noqa: E402
from training.detection_data import (  # noqa: E402
    EvalCollator,
    ImageReader,
    TrainAugmentation,
    TrainTransform,
    coco_split,
    train_stream,
)


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def common_flags(args, output_dir):
    return [
        "--output_dir",
        output_dir,
        "--max_train_minutes",
        str(args.minutes),
        "--use_cpu",
        str(args.device == "cpu"),
        "--bf16",
        str(args.bf16),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--save_strategy",
        "no",
        "--per_device_eval_batch_size",
        str(args.batch_size),
        "--logging_steps",
        "10",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        str(args.workers),
        "--report_to",
        "none",
        "--overwrite_output_dir",
        # Far more steps than the budget allows, and a short warmup: the rate stays near its peak for the whole
        # budget, as a fixed-time run wants.
        "--max_steps",
        "100000",
        "--warmup_steps",
        "20",
    ]


def data_flags(args):
    annotations = os.path.join(args.data, "annotations")
    images = os.path.join(args.data, "images")
    return [
        "--train_images",
        images,
        "--train_annotations",
        os.path.join(annotations, "instances_train.json"),
        "--eval_images",
        images,
        "--eval_annotations",
        os.path.join(annotations, f"instances_{args.eval_split}.json"),
    ]


def run_pix2seq(args):
    argv = (
        common_flags(args, os.path.join(args.output_dir, "pix2seq"))
        + data_flags(args)
        + [
            # One bin per pixel; the demo vocabulary ends with its coordinates, so it grows with them.
            "--config_overrides",
            f"image_size={args.image_size},num_bins={args.image_size},"
            f"vocab_size={run_detection.DEFAULT_MODEL['coord_token_offset'] + args.image_size}",
            "--learning_rate",
            "1e-3",
            "--num_prediction_images",
            "0",
        ]
    )
    return run_detection.main(argv)


class DetrTrainer(run_detection.DetectionTrainer):
    def detect_batch(self, model, pixel_values, target_sizes):
        outputs = model(pixel_values=pixel_values)
        # DETR's boxes are relative to the square canvas, which covers max(h, w) original pixels on each side.
        canvas_sizes = target_sizes.amax(dim=1, keepdim=True).expand(-1, 2)
        results = DetrImageProcessor().post_process_object_detection(outputs, threshold=0.0, target_sizes=canvas_sizes)
        for result, (height, width) in zip(results, target_sizes.tolist()):
            result["boxes"] = torch.minimum(
                result["boxes"], result["boxes"].new_tensor([width, height, width, height])
            )
        return results


class DetrTrainTransform(TrainTransform):
    """The same decoding and augmentation, with DETR's targets: cxcywh boxes normalised to the canvas."""

    def model_inputs(self, crops, objects):
        pixel_values = self.image_processor(crops, do_resize=False, do_rescale=False, return_tensors="pt")
        side = self.image_processor.image_size
        labels = [
            {"class_labels": classes, "boxes": torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1) / side}
            for b, classes in objects
        ]
        return {"pixel_values": list(pixel_values["pixel_values"]), "labels": labels}


def collate_detr(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": [e["labels"] for e in examples],
    }


def run_detr(args):
    parser = run_detection.HfArgumentParser(run_detection.Pix2SeqTrainingArguments)
    # DETR's own recipe: AdamW 1e-4, weight decay 1e-4, gradient clipping 0.1.
    flags = common_flags(args, os.path.join(args.output_dir, "detr")) + [
        "--learning_rate",
        "1e-4",
        "--weight_decay",
        "1e-4",
        "--max_grad_norm",
        "0.1",
        "--adam_beta2",
        "0.999",
        "--max_train_minutes",
        str(args.minutes),
    ]
    (training_args,) = parser.parse_args_into_dataclasses(flags)
    training_args.accelerator_config.dispatch_batches = False
    annotations = os.path.join(args.data, "annotations")
    images = os.path.join(args.data, "images")
    train = coco_split(images, os.path.join(annotations, "instances_train.json"), True)
    evaluation = coco_split(
        images, os.path.join(annotations, f"instances_{args.eval_split}.json"), False, streaming=False
    )
    config = DetrConfig(
        use_pretrained_backbone=False,
        id2label=train.label_map.id2label,
        label2id={name: i for i, name in train.label_map.id2label.items()},
    )
    model = DetrForObjectDetection(config)
    processor = Pix2SeqImageProcessor(image_size=args.image_size, do_normalize=True)
    reader = ImageReader()
    transform = DetrTrainTransform(processor, TrainAugmentation(args.image_size), reader)
    trainer = DetrTrainer(
        model=model,
        args=training_args,
        train_dataset=train_stream(train, transform, seed=training_args.seed),
        eval_dataset=evaluation.dataset,
        processing_class=processor,
        data_collator=collate_detr,
        callbacks=[run_detection.TrainingTimeBudgetCallback(args.minutes)],
        eval_collator=EvalCollator(processor, reader),
        eval_references=evaluation.references,
        category_ids=train.label_map.category_ids,
    )
    trainer.train()
    trainer.evaluate()
    return trainer


def summarise(name, trainer, batch_size):
    train_log = next(entry for entry in reversed(trainer.state.log_history) if "train_runtime" in entry)
    eval_log = next(entry for entry in reversed(trainer.state.log_history) if "eval_map" in entry)
    steps = trainer.state.global_step
    return {
        "model": name,
        "parameters_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),
        "steps": steps,
        "train_minutes": round(train_log["train_runtime"] / 60, 2),
        "train_images_per_s": round(steps * batch_size / train_log["train_runtime"], 1),
        "eval_images_per_s": eval_log["eval_samples_per_second"],
        "map": eval_log["eval_map"],
        "map_50": eval_log["eval_map_50"],
        "map_75": eval_log["eval_map_75"],
        "mar_100": eval_log["eval_mar_100"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bccd")
    )
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget per model")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", type=lambda v: v.lower() == "true", default=run_detection.bf16_default())
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--models", nargs="+", default=["pix2seq", "detr"], choices=("pix2seq", "detr"))
    parser.add_argument("--output_dir", default="bccd_benchmark")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "bccd_vs_detr.json"))
    args = parser.parse_args()

    runners = {"pix2seq": ("Pix2Seq (R18/16, 1+2 layers)", run_pix2seq), "detr": ("DETR-R50 (6+6 layers)", run_detr)}
    rows = []
    for key in args.models:
        name, run = runners[key]
        start = time.time()
        rows.append(
            {**summarise(name, run(args), args.batch_size), "wall_minutes": round((time.time() - start) / 60, 2)}
        )
    header = (
        "model",
        "parameters_M",
        "steps",
        "train_minutes",
        "train_images_per_s",
        "eval_images_per_s",
        "map",
        "map_50",
        "map_75",
        "mar_100",
    )
    print(
        f"BCCD {args.eval_split} split, {args.image_size} px, batch {args.batch_size}, {args.minutes} min budget, "
        f"{args.device}{' bf16' if args.bf16 else ''}: {machine(args.device)}"
    )
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    with open(args.json, "w") as file:
        json.dump({"machine": machine(args.device), "settings": vars(args), "results": rows}, file, indent=2)


if __name__ == "__main__":
    main()
