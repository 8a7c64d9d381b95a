"""
One-shot GPU benchmark (prepared for one H100 run): Pix2Seq at the official size (ResNet-50, 6+6 layers of width 256,
640 px, random weights, bf16) next to HF DETR-R50 and stock transformers generation, all measured in the same run.

- Inference, end to end (processor + encoder + generate + post-processing), images/s at batch 1, 32 and 128: Pix2Seq
  fixed 500-token mode and EOS mode with COCO-like object counts (static decode loop, compiled, CUDA graphs), HF
  DETR-R50 (processor + forward + post-processing), and Pix2Seq through stock `GenerationMixin.generate` (dynamic
  cache; and static cache with transformers' own auto-compile) at batch 32.
- Training images/s at batch 16 (bf16 autocast, fused AdamW, channels-last) for Pix2Seq and DETR-R50.

Every measurement is written to the JSON output as soon as it is done, so a run cut short keeps what it measured;
a measurement that fails is recorded with its error and the run goes on.

    python3 -m benchmarks.bench_gpu --output $OUT/bench_gpu.json      # on the GPU machine
    .venv/bin/python -m benchmarks.bench_gpu --smoke                  # tiny sizes, any machine, to check the script
"""

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import timm
import torch
import transformers
from transformers import CompileConfig, DetrConfig, DetrForObjectDetection, DetrImageProcessor, GenerationMixin

from configuration_pix2seq import Pix2SeqConfig
from generation_pix2seq import Pix2SeqGrammarLogitsProcessor
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


# COCO val2017: 36,781 boxes on 4,952 images. Object counts are drawn from a geometric law with that mean (truncated
# to [1, 100]), a stand-in for the real long-tailed histogram, which is not available offline.
COCO_MEAN_OBJECTS = 36781 / 4952


def settings(smoke):
    if smoke:
        return {
            "image_size": 64,
            "batch_sizes": [1, 4],
            "generate_batch_size": 4,
            "train_batch_size": 4,
            "image_height_width": (48, 64),
            "timed_runs": 2,
            "train_steps": 2,
            "pix2seq": {
                "backbone": "resnet18",
                "image_size": 64,
                "d_model": 32,
                "encoder_layers": 1,
                "decoder_layers": 2,
                "encoder_attention_heads": 4,
                "decoder_attention_heads": 4,
                "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64,
                "max_instances": 10,
                "num_bins": 64,
                "max_position_embeddings": 64,
            },
            "detr": {
                "d_model": 32,
                "encoder_layers": 1,
                "decoder_layers": 1,
                "encoder_attention_heads": 4,
                "decoder_attention_heads": 4,
                "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64,
                "num_queries": 10,
            },
        }
    return {
        "image_size": 640,
        "batch_sizes": [1, 32, 128],
        "generate_batch_size": 32,
        "train_batch_size": 16,
        "image_height_width": (480, 640),
        "timed_runs": 3,
        "train_steps": 10,
        "pix2seq": {"image_size": 640},
        "detr": {},
    }


class Benchmark:
    """Times callables with device syncs and keeps every result in one JSON file, rewritten after each measurement."""

    def __init__(self, output, device, timed_runs):
        self.output = Path(output)
        self.device = device
        self.timed_runs = timed_runs
        self.results = {"command": " ".join(sys.argv), "machine": machine_info(device), "rows": []}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, section, name, batch_size, function, warmup=1, runs=None, images=None, **extra):
        """Best wall time of `runs` calls after `warmup` calls; `images` per call defaults to the batch size."""
        row = {
            "section": section,
            "name": name,
            "batch_size": batch_size,
            "images_per_call": images or batch_size,
            **extra,
        }
        try:
            start = time.perf_counter()
            for _ in range(warmup):
                function()
            self.sync()
            row["warmup_seconds"] = time.perf_counter() - start
            times = []
            for _ in range(runs or self.timed_runs):
                start = time.perf_counter()
                info = function()
                self.sync()
                times.append(time.perf_counter() - start)
            row.update(info or {})
            row["seconds"] = min(times)
            row["images_per_second"] = row["images_per_call"] / row["seconds"]
        except Exception as error:  # a failure is a result too: record it and go on with the next measurement
            row["error"] = "".join(traceback.format_exception_only(error)).strip()
            row["traceback"] = traceback.format_exc()[-3000:]
        self.results["rows"].append(row)
        self.write()
        shown = (
            f"{row['images_per_second']:10.1f} img/s  {row['seconds'] * 1e3:9.1f} ms"
            if "seconds" in row
            else row["error"][:200]
        )
        print(f"{section:10} {name:52} batch {batch_size:4}  {shown}", flush=True)
        return row

    def write(self):
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.results, indent=2, default=str) + "\n")


def machine_info(device):
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def coco_like_object_counts(batch_size, generator, max_instances):
    uniform = torch.rand(batch_size, generator=generator)
    counts = torch.ceil(torch.log1p(-uniform) / math.log1p(-1 / COCO_MEAN_OBJECTS))
    return counts.clamp(1, max_instances).long().tolist()


def pix2seq_inference(model, processor, images, target_sizes, **generate_kwargs):
    def run():
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        outputs = model.detect(pixel_values, **generate_kwargs)
        processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)
        return {"generated_tokens": outputs.sequences.shape[1]}

    return run


def detr_inference(model, processor, images, target_sizes):
    @torch.no_grad()
    def run():
        inputs = processor(images, return_tensors="pt").to(model.device)
        pixel_values = inputs["pixel_values"].to(model.dtype).contiguous(memory_format=torch.channels_last)
        outputs = model(pixel_values=pixel_values, pixel_mask=inputs["pixel_mask"])
        processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)
        return {"queries": model.config.num_queries}

    return run


def stock_generate(model, processor, images, **generate_kwargs):
    """transformers' own decoding loop over the same model and grammar, bypassing Pix2Seq's `generate` override."""

    @torch.no_grad()
    def run():
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        grammar = Pix2SeqGrammarLogitsProcessor(model.config)
        sequences = GenerationMixin.generate(
            model, pixel_values, logits_processor=[grammar], do_sample=False, **generate_kwargs
        )
        return {"generated_tokens": sequences.shape[1] - 1}

    return run


def training_steps(model, optimizer, batch, dtype, steps):
    def run():
        for _ in range(steps):
            with torch.autocast(device_type=batch["pixel_values"].device.type, dtype=dtype):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def pix2seq_training_batch(model, batch_size, image_size, device, generator):
    processor = Pix2SeqImageProcessor.from_model_config(model.config, size={"longest_edge": image_size})
    objects = []
    for _ in range(batch_size):
        count = coco_like_object_counts(1, generator, model.config.max_instances)[0]
        corners = torch.rand(count, 2, 2, generator=generator).sort(dim=1).values  # (N, 2 corners, xy)
        objects.append((corners.reshape(count, 4) * image_size, torch.randint(1, 91, (count,), generator=generator)))
    targets = processor.encode_objects(objects, do_sequence_augmentation=True, generator=generator)
    batch = {key: value.to(device) for key, value in targets.items()}
    pixel_values = torch.rand(batch_size, 3, image_size, image_size, generator=generator).to(device)
    batch["pixel_values"] = pixel_values.contiguous(memory_format=torch.channels_last)
    return batch


def detr_training_batch(batch_size, image_size, device, generator):
    labels = []
    for _ in range(batch_size):
        count = coco_like_object_counts(1, generator, max_instances=100)[0]
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(1, 91, (count,), generator=generator).to(device),
                "boxes": torch.cat([centers, sizes], dim=1).to(device),
            }
        )
    pixel_values = torch.rand(batch_size, 3, image_size, image_size, generator=generator).to(device)
    return {"pixel_values": pixel_values.contiguous(memory_format=torch.channels_last), "labels": labels}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the script anywhere")
    parser.add_argument("--output", default="benchmarks/bench_gpu.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fixed", "eos", "detr", "stock", "train"])
    args = parser.parse_args()
    config = settings(args.smoke)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(0)
    bench = Benchmark(args.output, device, config["timed_runs"])
    bench.results["settings"] = {**config, "smoke": args.smoke, "dtype": str(dtype)}

    # One compiled graph per batch size (`dynamic=False`): CUDA graphs need static shapes anyway. Off the GPU
    # (smoke runs) `aot_eager` still traces the same full graph.
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    if device.type != "cuda":
        compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
        compile_config._compile_all_devices = True

    id2label = {i: f"class_{i}" for i in range(1, 91)}
    fixed = Pix2SeqForObjectDetection(Pix2SeqConfig(id2label=id2label, **config["pix2seq"]))
    fixed = fixed.to(device, dtype).eval().to(memory_format=torch.channels_last)
    eos = Pix2SeqForObjectDetection(Pix2SeqConfig(id2label=id2label, eos_mode=True, **config["pix2seq"]))
    eos.load_state_dict(fixed.state_dict())
    eos = eos.to(device, dtype).eval().to(memory_format=torch.channels_last)
    processor = Pix2SeqImageProcessor.from_model_config(fixed.config)
    detr_config = DetrConfig(use_pretrained_backbone=False, num_labels=91, **config["detr"])
    detr = DetrForObjectDetection(detr_config).to(device, dtype).eval().to(memory_format=torch.channels_last)
    detr_processor = DetrImageProcessor(
        size={"shortest_edge": config["image_size"], "longest_edge": config["image_size"]}
    )

    # Decoded images as uint8 tensors already on the device, COCO's typical 640x480: JPEG decoding is left out
    # for every model alike.
    height, width = config["image_height_width"]
    max_batch = max(config["batch_sizes"])
    all_images = torch.randint(0, 256, (max_batch, 3, height, width), dtype=torch.uint8, generator=generator).to(
        device
    )
    fast = {"cache_implementation": "static", "compile_config": compile_config}

    for batch_size in config["batch_sizes"]:
        images = list(all_images[:batch_size])
        target_sizes = [(height, width)] * batch_size
        if "fixed" not in args.skip:
            name = f"Pix2Seq fixed {fixed.config.sequence_length} tokens, static loop"
            row = bench.measure(
                "inference",
                name,
                batch_size,
                pix2seq_inference(fixed, processor, images, target_sizes, **fast),
                warmup=2,
            )
            if "error" in row:
                # Still a figure for the static loop if compilation fails on this machine.
                bench.measure(
                    "inference",
                    f"{name}, not compiled",
                    batch_size,
                    pix2seq_inference(
                        fixed, processor, images, target_sizes, cache_implementation="static", disable_compile=True
                    ),
                )
        if "eos" not in args.skip:
            # Random weights never choose EOS: a model that stops after each image's objects writes
            # 5 * max(objects in the batch) + 1 tokens, since the batch runs until its last image ends.
            counts = [round(COCO_MEAN_OBJECTS)]
            if batch_size > 1:
                counts = coco_like_object_counts(batch_size, generator, eos.config.max_instances)
            bench.measure(
                "inference",
                "Pix2Seq EOS mode, COCO-like counts, static loop",
                batch_size,
                pix2seq_inference(eos, processor, images, target_sizes, max_new_tokens=5 * max(counts) + 1, **fast),
                warmup=2,
                max_objects_in_batch=max(counts),
                mean_objects=sum(counts) / len(counts),
            )
        if "detr" not in args.skip:
            bench.measure(
                "inference",
                "HF DETR-R50 (processor + forward + post-process)",
                batch_size,
                detr_inference(detr, detr_processor, images, target_sizes),
                warmup=3,
            )

    if "train" not in args.skip:
        batch_size = config["train_batch_size"]
        steps = config["train_steps"]
        trainee = Pix2SeqForObjectDetection(Pix2SeqConfig(id2label=id2label, **config["pix2seq"]))
        trainee = trainee.to(device).train().to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4, fused=device.type == "cuda")
        batch = pix2seq_training_batch(trainee, batch_size, config["image_size"], device, generator)
        bench.measure(
            "training",
            f"Pix2Seq train step ({steps} steps timed as one)",
            batch_size,
            training_steps(trainee, optimizer, batch, dtype, steps),
            runs=1,
            images=batch_size * steps,
        )
        del trainee, optimizer
        detr_trainee = DetrForObjectDetection(detr_config).to(device).train().to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(detr_trainee.parameters(), lr=1e-4, fused=device.type == "cuda")
        batch = detr_training_batch(batch_size, config["image_size"], device, generator)
        bench.measure(
            "training",
            f"HF DETR-R50 train step ({steps} steps timed as one)",
            batch_size,
            training_steps(detr_trainee, optimizer, batch, dtype, steps),
            runs=1,
            images=batch_size * steps,
        )

    # Last: the slowest, and only a reference.
    if "stock" not in args.skip:
        batch_size = config["generate_batch_size"]
        images = list(all_images[:batch_size])
        bench.measure(
            "inference",
            "stock GenerationMixin.generate, dynamic cache",
            batch_size,
            stock_generate(fixed, processor, images),
            runs=1,
        )
        bench.measure(
            "inference",
            "stock GenerationMixin.generate, static cache + auto-compile",
            batch_size,
            stock_generate(fixed, processor, images, cache_implementation="static", compile_config=compile_config),
            runs=1,
        )

    if device.type == "cuda":
        bench.results["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        bench.write()
    print(f"written {bench.output}")


if __name__ == "__main__":
    main()
