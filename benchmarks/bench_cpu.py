"""
CPU inference as users run it: Pix2Seq at the released architectures against HF DETR-R50, on the same two 480x640
images at 640 px (longest side), with 2 torch threads, batch 1 and batch 2.

- Pix2Seq (random weights): the released ResNet-50 (TF-padded stem, 640 canvas, vocabulary 3000) and ViT-B 640
  architectures, built from their official settings by the converter (`config_from_official`), saved with
  `save_pretrained` together with the official decoding converted folders carry (top-p 0.4, top-k 0, 500 new tokens,
  no grammar mask) and the converter's image processor, then loaded through the Auto classes with
  `trust_remote_code=True`. Each folder is timed two ways, without any decoding argument:
  `pipeline("object-detection", model=folder, trust_remote_code=True)(images, batch_size=b)` and
  `model.generate(**processor(images, return_tensors="pt"))`.
- EOS mode: the ResNet-50 with `eos_mode=True` and a controlled object count. Random weights never choose to stop,
  so the saved `max_new_tokens` is what a model that stops after 7 objects per image writes (5 * 7 tokens and the
  EOS token, 36): every call writes exactly that many tokens (the table shows the count it measured).
- HF DETR-R50: `DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False))` (timm ResNet-50, random weights),
  `DetrImageProcessor` resizing to longest side 640, forward + `post_process_object_detection`.

Every case runs in a fresh process: its first call (cold: nothing compiled, cached or warmed up) is reported apart
from the median of the calls after it (steady). Loading (`from_pretrained` / `pipeline(...)`) is timed separately.
Batch 1 times the two images one after the other; batch 2 times them in one call. A `torch.profiler` table of one
decode step (ResNet-50, `model.generate`, batch 2, the average of `--profile-steps` steps after `--profile-step`
tokens) is written beside the JSON.

Run from the repository root (prints a markdown table, writes JSON and the profile):

    .venv/bin/python -m benchmarks.bench_cpu --output benchmarks/bench_cpu.json

On cores shared with other work, `--threads 1`: there, two intra-op threads that wait for each other slowed the
decode loop 30-fold (benchmarks/RESULTS.md).

`--smoke` runs every case with tiny models and tiny images in one child process, in seconds.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import transformers
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parents[1]
# The released checkpoints' official settings (coco_det_finetune/{resnet,vit_b}_640x640/config.json), as far as the
# converter reads them; tests/test_bench_cpu.py checks them against the released files where `../shared` is at hand.
SHARED_MODEL_SETTINGS = {
    "coord_vocab_shift": 1000,
    "dec_proj_mode": "mlp",
    "decoder_output_bias": True,
    "drop_att": 0.0,
    "drop_path": 0.1,
    "drop_units": 0.1,
    "image_size": 640,
    "max_seq_len": 512,
    "num_decoder_layers": 6,
    "patch_size": 16,
    "shared_decoder_embedding": True,
    "use_cls_token": False,
    "vocab_size": 3000,
}
RELEASED_MODEL_SETTINGS = {
    "resnet50": {
        **SHARED_MODEL_SETTINGS,
        "dim_att": 256,
        "dim_att_dec": 256,
        "dim_mlp": 1024,
        "dim_mlp_dec": 1024,
        "num_encoder_layers": 6,
        "num_heads": 8,
        "num_heads_dec": 8,
        "resnet_depth": 50,
        "resnet_sk_ratio": 0.0,
        "resnet_variant": "standard",
        "resnet_width_multiplier": 1,
    },
    "vit_b": {
        **SHARED_MODEL_SETTINGS,
        "dim_att": 768,
        "dim_att_dec": 512,
        "dim_mlp": 3072,
        "dim_mlp_dec": 2048,
        "num_encoder_layers": 12,
        "num_heads": 12,
        "num_heads_dec": 16,
        "resnet_variant": "c1",
    },
}
RELEASED_TASK = {
    "name": "object_detection",
    "max_instances_per_image_test": 100,
    "quantization_bins": 1000,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 0.4,
    "vocab_id": 10,
}
# Tiny stand-ins for `--smoke`: the same code paths in seconds.
SMOKE_MODEL_SETTINGS = {
    "image_size": 64,
    "dim_att": 32,
    "dim_att_dec": 32,
    "dim_mlp": 64,
    "dim_mlp_dec": 64,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "num_heads": 2,
    "num_heads_dec": 2,
}
EOS_OBJECTS_PER_IMAGE = 7  # COCO's mean number of objects per image, rounded
IMAGE_HEIGHT, IMAGE_WIDTH = 480, 640
# Table labels of the timed models, in table order.
MODELS = {
    "detr": "HF DETR-R50",
    "resnet50": "Pix2Seq ResNet-50, official decoding (500 tokens)",
    "vit_b": "Pix2Seq ViT-B, official decoding (500 tokens)",
    "resnet50_eos": f"Pix2Seq ResNet-50, EOS mode, {EOS_OBJECTS_PER_IMAGE} objects per image",
}


def machine_info():
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }


def make_images(smoke):
    """Two fixed-seed RGB images of 480x640 (48x64 in `--smoke`): speed does not depend on their content."""
    scale = 10 if smoke else 1
    generator = np.random.default_rng(0)
    return [
        Image.fromarray(generator.integers(0, 256, (IMAGE_HEIGHT // scale, IMAGE_WIDTH // scale, 3), dtype=np.uint8))
        for _ in range(2)
    ]


def official_settings(family, smoke):
    model_settings = dict(RELEASED_MODEL_SETTINGS[family])
    if smoke:
        model_settings.update(SMOKE_MODEL_SETTINGS)
    return {"model": model_settings, "task": dict(RELEASED_TASK)}


def official_model(family, smoke=False, eos_mode=False):
    """The released `family` architecture as the converter builds it, random weights (seed 0), with the official
    decoding converted folders carry."""
    from convert_pix2seq_tf_checkpoint import COCO_CATEGORY_NAMES, config_from_official, set_official_decoding
    from modeling_pix2seq import Pix2SeqForObjectDetection

    official = official_settings(family, smoke)
    config = config_from_official(official, dict(COCO_CATEGORY_NAMES))
    if eos_mode:
        config.eos_mode = True
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(config).eval()
    set_official_decoding(model, official["task"])
    return model


def save_pix2seq_folder(folder, family, smoke, eos_objects=None):
    """A folder as the converter writes one for the released `family` (random weights); in EOS mode, one whose saved
    `max_new_tokens` is what a model stopping after `eos_objects` objects writes."""
    from image_processing_pix2seq import Pix2SeqImageProcessor

    model = official_model(family, smoke, eos_mode=eos_objects is not None)
    if eos_objects is not None:
        model.generation_config.max_new_tokens = 5 * eos_objects + 1
    elif smoke:
        model.generation_config.max_new_tokens = 10
    model.save_pretrained(folder)
    Pix2SeqImageProcessor.from_model_config(model.config, pad_value=0.3, do_normalize=False).save_pretrained(folder)
    return folder


def detr(smoke):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    size = 64 if smoke else 640
    tiny = {"backbone": "resnet18", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "num_queries": 10}
    torch.manual_seed(0)
    model = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, **(tiny if smoke else {}))).eval()
    return model, DetrImageProcessor(size={"shortest_edge": size, "longest_edge": size})


def load_case(case):
    """The callable a case times (taking a list of images, returning the number of tokens each image got)."""
    if case["model"] == "detr":
        model, processor = detr(case["smoke"])

        @torch.no_grad()
        def run(images):
            outputs = model(**processor(images, return_tensors="pt"))
            sizes = [(image.height, image.width) for image in images]
            processor.post_process_object_detection(outputs, target_sizes=sizes)
            return model.config.num_queries

        return run
    if case["style"] == "pipeline":
        from transformers import pipeline

        detector = pipeline("object-detection", model=case["folder"], trust_remote_code=True)
        # The pipeline returns detections, not tokens: its token count is the `generate` row's.
        return lambda images: detector(images, batch_size=len(images)) and None
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(case["folder"], trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(case["folder"], trust_remote_code=True)
    return lambda images: model.generate(**processor(images, return_tensors="pt")).shape[1] - 1


def time_case(case, images):
    """Load time, the first call (cold) and every later call, for the two images at `case["batch_size"]`."""
    start = time.perf_counter()
    run = load_case(case)
    load_seconds = time.perf_counter() - start
    batches = [images[i : i + case["batch_size"]] for i in range(0, len(images), case["batch_size"])]
    times, tokens = [], None
    for _ in range(1 + case["repeats"]):
        start = time.perf_counter()
        tokens = [run(batch) for batch in batches][-1]
        times.append(time.perf_counter() - start)
    return {
        **{key: case[key] for key in ("model", "style", "batch_size")},
        "load_seconds": load_seconds,
        "first_call_seconds": times[0],
        "steady_seconds": times[1:],
        "steady_median_seconds": statistics.median(times[1:]),
        "new_tokens_or_queries": tokens,
    }


def profile_decode_step(folder, images, step, output_path, steps=20, top_ops=15):
    """A `torch.profiler` table of decode steps of `model.generate` (batch 2), per step: `steps` consecutive steps are
    recorded and their times divided by `steps` (one step alone is at the mercy of a busy machine). A forward pre-hook
    on the decoder marks each step, so each recorded window is one step, decoder to the next decoder call (logits
    processors, sampling, stopping and cache bookkeeping included). The `top_ops` costliest operators are returned
    (all of them, with the profiler's step marker, when `top_ops` is None)."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images, return_tensors="pt")
    model.generate(**inputs)  # warm-up: the profiled call is a steady one
    # Profiler step k (k >= 1) starts at decoder call k, which writes new token k: after `step` waiting steps and one
    # warm-up step, the active window is the steps that write tokens `step + 1` to `step + steps`.
    window = schedule(wait=step, warmup=1, active=steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=window) as profiler:
        hook = model.model.decoder.register_forward_pre_hook(lambda *_: profiler.step())
        model.generate(**inputs)
        hook.remove()
    # The profiler's own step marker holds its bookkeeping and the Python between operators, not an operator.
    events = profiler.key_averages()
    operators = [event for event in events if not event.key.startswith("ProfilerStep")]
    rows = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:30]
    lines = [f"{'op':<56} {'calls per step':>14} {'self CPU ms per step':>21} {'share':>7}"]
    total = sum(event.self_cpu_time_total for event in events)
    for event in rows:
        lines.append(
            f"{event.key[:56]:<56} {event.count / steps:>14.1f} {event.self_cpu_time_total / steps / 1e3:>21.3f} "
            f"{event.self_cpu_time_total / total:>7.1%}"
        )
    Path(output_path).write_text(
        f"Decode steps of model.generate(**processor(images)) at batch {len(images)}, the {steps} steps after {step} "
        f"tokens ({torch.get_num_threads()} threads), per step (totals / {steps}), ops by self CPU time "
        f"(ProfilerStep*: Python between operators and the profiler's bookkeeping); {total / steps / 1e3:.2f} ms "
        f"per step in all:\n\n" + "\n".join(lines) + "\n"
    )
    chosen = events if top_ops is None else operators
    top = sorted(chosen, key=lambda event: event.self_cpu_time_total, reverse=True)[:top_ops]
    return {
        "batch_size": len(images),
        "after_tokens": step,
        "profiled_steps": steps,
        "step_cpu_ms": total / steps / 1e3,
        "step_self_cpu_ms": sum(event.self_cpu_time_total for event in operators) / steps / 1e3,
        "top_ops": [
            {
                "name": event.key,
                "calls_per_step": event.count / steps,
                "self_cpu_ms": event.self_cpu_time_total / steps / 1e3,
            }
            for event in top
        ],
        "table": str(output_path),
    }


def worker(spec_path):
    """Runs the cases of a spec file in this (fresh) process and writes their results beside it."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    images = make_images(spec["smoke"])
    results = [time_case(case, images) for case in spec["cases"]]
    profile = None
    if spec.get("profile"):
        profile = profile_decode_step(spec["profile"]["folder"], images, **spec["profile"]["settings"])
    Path(spec_path).with_suffix(".out.json").write_text(json.dumps({"cases": results, "profile": profile}))


def run_in_fresh_process(spec, directory, name):
    spec_path = Path(directory) / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "benchmarks.bench_cpu", "--worker", str(spec_path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"bench_cpu: the case process {name} failed:\n{completed.stderr[-3000:]}")
    return json.loads(spec_path.with_suffix(".out.json").read_text())


def load_average():
    return [round(value, 2) for value in os.getloadavg()]


def markdown_table(results):
    detr_steady = {
        row["batch_size"]: row["steady_median_seconds"] for row in results["cases"] if row["model"] == "detr"
    }
    lines = [
        "| model | call | batch | tokens (queries) | load s | first call s | steady s (median) | steady / DETR |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["cases"]:
        ratio = row["steady_median_seconds"] / detr_steady[row["batch_size"]]
        lines.append(
            f"| {MODELS[row['model']]} | {row['style']} | {row['batch_size']} | {row['new_tokens_or_queries'] or '-'} "
            f"| {row['load_seconds']:.2f} | {row['first_call_seconds']:.2f} | {row['steady_median_seconds']:.2f} "
            f"| {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/bench_cpu.json", help="JSON results (profile beside it)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3, help="steady calls after the first; the median is kept")
    parser.add_argument("--profile-step", type=int, default=250, help="tokens written before the profiled steps")
    parser.add_argument("--profile-steps", type=int, default=20, help="decode steps profiled (per-step averages)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and images, every case in one process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    start = time.perf_counter()
    load_before = load_average()
    output = Path(args.output)
    cases = [{"model": "detr", "style": "forward + post_process", "batch_size": b} for b in (1, 2)] + [
        {"model": model, "style": style, "batch_size": b}
        for model in ("resnet50", "vit_b", "resnet50_eos")
        for style in ("pipeline", "generate")
        for b in (1, 2)
    ]
    profile_step = min(args.profile_step, 2) if args.smoke else args.profile_step
    with tempfile.TemporaryDirectory() as directory:
        folders = {
            "resnet50": save_pix2seq_folder(Path(directory) / "resnet50", "resnet50", args.smoke),
            "vit_b": save_pix2seq_folder(Path(directory) / "vit_b", "vit_b", args.smoke),
            "resnet50_eos": save_pix2seq_folder(
                Path(directory) / "resnet50_eos", "resnet50", args.smoke, eos_objects=EOS_OBJECTS_PER_IMAGE
            ),
        }
        for case in cases:
            case.update(folder=str(folders.get(case["model"], "")), repeats=args.repeats, smoke=args.smoke)
        base = {"threads": args.threads, "smoke": args.smoke}
        profile_spec = {
            "folder": str(folders["resnet50"]),
            "settings": {
                "step": profile_step,
                "steps": 5 if args.smoke else args.profile_steps,
                "output_path": str(output.with_name(output.stem + "_profile.txt")),
            },
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        if args.smoke:
            finished = run_in_fresh_process({**base, "cases": cases, "profile": profile_spec}, directory, "all")
            rows, profile = finished["cases"], finished["profile"]
        else:
            rows = []
            for index, case in enumerate(cases):
                print(f"{case['model']} {case['style']} batch {case['batch_size']}", file=sys.stderr, flush=True)
                rows += run_in_fresh_process({**base, "cases": [case]}, directory, f"case{index}")["cases"]
            profile = run_in_fresh_process({**base, "cases": [], "profile": profile_spec}, directory, "profile")
            profile = profile["profile"]

    results = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_cpu", *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": {
            "threads": args.threads,
            "steady_repeats": args.repeats,
            "images": f"2 fixed-seed RGB images of {IMAGE_HEIGHT}x{IMAGE_WIDTH}" + (" / 10" if args.smoke else ""),
            "fresh_process_per_case": not args.smoke,
            "eos_objects_per_image": EOS_OBJECTS_PER_IMAGE,
            "smoke": args.smoke,
        },
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cases": rows,
        "profile": profile,
        "total_seconds": time.perf_counter() - start,
    }
    output.write_text(json.dumps(results, indent=2) + "\n")
    machine = results["machine"]
    print(
        f"\nMachine: {machine['cpu']}, {machine['cpu_count']} cores, {args.threads} torch threads, Python "
        f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, timm {machine['timm']}"
        f"; load average {load_before} before, {results['load_average_after']} after.\n"
    )
    print(markdown_table(results))
    top = ", ".join(f"{op['name']} {op['self_cpu_ms']:.2f} ms" for op in profile["top_ops"][:5])
    print(
        f"\nOne decode step: {profile['step_cpu_ms']:.2f} ms CPU, {profile['step_self_cpu_ms']:.2f} ms in operators; {top}"
    )
    print(f"written {output} and {profile['table']} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
