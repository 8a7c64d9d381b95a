"""
CPU benchmark of Pix2Seq generation at the official size (ResNet-50, 6+6 layers of width 256, 8 heads, FFN 1024,
random weights): the decode loop with a KV cache, without one, and the seed project's loop; then end-to-end
inference (processor + encoder + generate + post-processing) next to HF DETR-R50 on the same BCCD images.

Run from the repository root (prints a table, writes JSON):

    .venv/bin/python -m benchmarks.bench_generate --output benchmarks/bench_generate_cpu.json
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch
import transformers
from PIL import Image
from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

from configuration_pix2seq import Pix2SeqConfig
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


BCCD = Path("/work/shared/data/bccd")


def machine_info():
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }


def official_config(image_size, eos_mode=False):
    # COCO's category ids 1..90, as the official vocabulary writes them; every other setting is the official default.
    return Pix2SeqConfig(image_size=image_size, eos_mode=eos_mode, id2label={i: f"class_{i}" for i in range(1, 91)})


def best_time(name, function, repeats):
    """Shortest wall time of `repeats` calls (the least disturbed by other work on the machine) and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    print(f"  {name}: {min(times):.2f} s", file=sys.stderr, flush=True)
    return min(times), result


@torch.no_grad()
def seed_style_generate(model, pixel_values, num_tokens):
    """The seed project's decoding: no KV cache, so the decoder re-reads the whole prefix at every step."""
    encoder_outputs = model.get_encoder()(pixel_values)
    tokens = torch.full((len(pixel_values), 1), model.config.task_token_id)
    for _ in range(num_tokens):
        logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


def bench_decoding(model, image_size, num_tokens, repeats):
    pixel_values = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        encoder_seconds, _ = best_time("encoder", lambda: model.get_encoder()(pixel_values), repeats)
    greedy = {"do_sample": False, "max_new_tokens": num_tokens}
    methods = {
        "generate, static cache (Pix2Seq loop)": (
            lambda: model.generate(pixel_values, cache_implementation="static", **greedy),
            repeats,
        ),
        "generate, dynamic cache (GenerationMixin)": (lambda: model.generate(pixel_values, **greedy), repeats),
        "generate, no cache (GenerationMixin)": (lambda: model.generate(pixel_values, use_cache=False, **greedy), 1),
        "seed-style loop (no cache, no generate)": (lambda: seed_style_generate(model, pixel_values, num_tokens), 1),
    }
    rows, reference = [], None
    for name, (function, method_repeats) in methods.items():
        seconds, tokens = best_time(name, function, method_repeats)
        reference = tokens if reference is None else reference
        rows.append(
            {
                "method": name,
                "batch_size": 1,
                "new_tokens": tokens.shape[1] - 1,
                "seconds_with_encoder": seconds,
                "decode_ms_per_token": (seconds - encoder_seconds) / (tokens.shape[1] - 1) * 1e3,
                # The seed loop has no grammar, so only the generate variants must agree token for token.
                "tokens_equal_static": bool(torch.equal(tokens, reference)),
                "repeats": method_repeats,
            }
        )
    baseline = rows[0]["decode_ms_per_token"]
    for row in rows:
        row["slowdown_vs_static"] = row["decode_ms_per_token"] / baseline
    return encoder_seconds, rows


def load_bccd_images(count):
    annotations = json.loads((BCCD / "annotations" / "instances_all.json").read_text())
    images = sorted(annotations["images"], key=lambda image: image["id"])[:count]
    objects = {image["id"]: 0 for image in images}
    for annotation in annotations["annotations"]:
        if annotation["image_id"] in objects:
            objects[annotation["image_id"]] += 1
    pil_images = [Image.open(BCCD / "images" / image["file_name"]).convert("RGB") for image in images]
    return pil_images, [objects[image["id"]] for image in images]


def bench_end_to_end(image_size, num_images, repeats):
    images, object_counts = load_bccd_images(num_images)
    target_sizes = [(image.height, image.width) for image in images]
    fixed = Pix2SeqForObjectDetection(official_config(image_size)).eval()
    processor = Pix2SeqImageProcessor.from_model_config(fixed.config)
    eos = Pix2SeqForObjectDetection(official_config(image_size, eos_mode=True)).eval()

    def pix2seq(model, **generate_kwargs):
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        outputs = model.detect(pixel_values, **generate_kwargs)
        return processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=target_sizes
        ), outputs.sequences.shape[1]

    # Random weights never choose EOS: an EOS-mode model that stops after the annotated objects writes exactly
    # 5 * max(objects in the batch) + 1 tokens (the batch runs until its last image ends), so that is what is timed.
    eos_tokens = 5 * max(object_counts) + 1
    detr_processor = DetrImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size})
    detr = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False)).eval()

    @torch.no_grad()
    def detr_inference():
        inputs = detr_processor(images, return_tensors="pt")
        outputs = detr(**inputs)
        return detr_processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=target_sizes
        ), detr.config.num_queries

    methods = {
        "Pix2Seq fixed 500 tokens, static loop": lambda: pix2seq(fixed, cache_implementation="static"),
        "Pix2Seq fixed 500 tokens, GenerationMixin": lambda: pix2seq(fixed),
        "Pix2Seq EOS mode, static loop": lambda: pix2seq(
            eos, cache_implementation="static", max_new_tokens=eos_tokens
        ),
        "HF DETR-R50 forward": detr_inference,
    }
    rows = []
    for name, function in methods.items():
        seconds, (_, tokens) = best_time(name, function, repeats)
        rows.append(
            {
                "method": name,
                "images": len(images),
                "batch_size": len(images),
                "tokens_or_queries": tokens,
                "seconds": seconds,
                "images_per_second": len(images) / seconds,
                "repeats": repeats,
            }
        )
    return object_counts, rows


def print_table(title, rows, columns):
    text = [
        [f"{row[column]:.3f}" if isinstance(row[column], float) else str(row[column]) for column in columns]
        for row in rows
    ]
    widths = [max(len(cell) for cell in [column, *(line[i] for line in text)]) for i, column in enumerate(columns)]
    print(f"\n{title}")
    for line in [columns, *text]:
        print(
            " | ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--tokens", type=int, default=500, help="new tokens per image in the decoding comparison")
    parser.add_argument("--images", type=int, default=4, help="BCCD images in the end-to-end comparison (one batch)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per fast method; the best time is kept")
    # One thread by default: on a CPU shared with other work, intra-op threads that wait for each other slow every
    # method several-fold (measured here: 5x on 2 busy cores) and make the comparison noise.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", default="benchmarks/bench_generate_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    model = Pix2SeqForObjectDetection(official_config(args.image_size)).eval()
    encoder_seconds, decoding = bench_decoding(model, args.image_size, args.tokens, args.repeats)
    object_counts, end_to_end = bench_end_to_end(args.image_size, args.images, args.repeats)

    results = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_generate", *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": vars(args),
        "encoder_seconds_batch_1": encoder_seconds,
        "decoding": decoding,
        "bccd_objects_per_image": object_counts,
        "end_to_end": end_to_end,
        "total_seconds": time.perf_counter() - start,
    }
    print(json.dumps(results["machine"]))
    print_table(
        f"Decoding {args.tokens} tokens, batch 1, {args.image_size} px (encoder alone: {encoder_seconds:.3f} s)",
        decoding,
        [
            "method",
            "new_tokens",
            "seconds_with_encoder",
            "decode_ms_per_token",
            "slowdown_vs_static",
            "tokens_equal_static",
        ],
    )
    print_table(
        f"End to end on {args.images} BCCD images in one batch ({object_counts} objects)",
        end_to_end,
        ["method", "tokens_or_queries", "seconds", "images_per_second"],
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {args.output} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
