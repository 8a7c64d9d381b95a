"""
The decode step alone, two source trees of this repository in one process: the released ResNet-50 architecture
(random weights, the same in both) with the official decoding converted folders carry (top-p 0.4, top-k 0, no
grammar), called as users call it (`model.generate(pixel_values)`, no decoding argument), with the encoder's output
computed once and reused, so that only the decode loop is timed. The trees take turns call by call, so that a busy
machine slows both alike; both draw from the same seed, and the script reports whether they wrote the same tokens.
On shared cores, the process's CPU time (`time.process_time`, reported beside wall time) is the steadier figure: it
leaves out the time the process waited for a core.

    .venv/bin/python -m benchmarks.bench_decode_ab --before /tmp/old-checkout --after . --rounds 5
"""

import argparse
import copy
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_cpu import official_settings
from convert_pix2seq_tf_checkpoint import COCO_CATEGORY_NAMES, config_from_official, set_official_decoding


def import_tree(tree, name, directory):
    """The tree's modeling module, imported as package `name` (its relative imports keep it apart from the other)."""
    (Path(directory) / name).symlink_to(Path(tree).resolve(), target_is_directory=True)
    return importlib.import_module(f"{name}.modeling_pix2seq")


def build(modeling, config, state_dict, generation_config, encoder_output):
    config = modeling.Pix2SeqForObjectDetection.config_class(**config.to_dict())
    model = modeling.Pix2SeqForObjectDetection(config).eval()
    model.load_state_dict(state_dict)
    model.generation_config = copy.deepcopy(generation_config)
    # Only the decode loop is timed: the encoder returns the output computed once.
    model.model.encoder.forward = lambda *args, **kwargs: encoder_output
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="source tree of the reference revision")
    parser.add_argument("--after", default=".", help="source tree of the revision under test")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per tree, taking turns")
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per call")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--after-int8", action="store_true", help="quantize the after tree's decoder (`quantize_decoder_int8`)"
    )
    parser.add_argument("--output", default="benchmarks/bench_decode_ab.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    official = official_settings("resnet50", smoke=False)
    config = config_from_official(official, dict(COCO_CATEGORY_NAMES))
    directory = tempfile.mkdtemp()
    sys.path.insert(0, directory)
    trees = {"before": import_tree(args.before, "pix2seq_before", directory)}
    trees["after"] = import_tree(args.after, "pix2seq_after", directory)
    torch.manual_seed(0)
    reference = trees["after"].Pix2SeqForObjectDetection(trees["after"].Pix2SeqConfig(**config.to_dict())).eval()
    set_official_decoding(reference, official["task"])
    pixel_values = torch.rand(args.batch_size, 3, config.image_size, config.image_size)
    with torch.no_grad():
        encoder_output = reference.model.encoder(pixel_values)
    models = {
        name: build(modeling, config, reference.state_dict(), reference.generation_config, encoder_output)
        for name, modeling in trees.items()
    }
    if args.after_int8:
        trees["after"].quantize_decoder_int8(models["after"])
    seconds = {name: [] for name in models}
    cpu_seconds = {name: [] for name in models}
    tokens = {}
    for round_index in range(1 + args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            torch.manual_seed(round_index)
            start, start_cpu = time.perf_counter(), time.process_time()
            sequences = models[name].generate(pixel_values, max_new_tokens=args.tokens)
            if round_index:  # the first round warms both up
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - start_cpu)
            tokens.setdefault(round_index, {})[name] = sequences.tolist()
    same_tokens = all(pair["before"] == pair["after"] for pair in tokens.values())
    token_agreement = statistics.mean(
        float(torch.tensor(pair["before"]).eq(torch.tensor(pair["after"])).float().mean()) for pair in tokens.values()
    )
    ms_per_step = {name: statistics.median(values) / args.tokens * 1e3 for name, values in seconds.items()}
    cpu_ms_per_step = {name: statistics.median(values) / args.tokens * 1e3 for name, values in cpu_seconds.items()}
    ratio = ms_per_step["after"] / ms_per_step["before"]
    cpu_ratio = cpu_ms_per_step["after"] / cpu_ms_per_step["before"]
    for name in models:
        print(
            f"{name:7} {ms_per_step[name]:6.2f} ms per decode step, {cpu_ms_per_step[name]:6.2f} ms of CPU time "
            f"(batch {args.batch_size}, median of {args.rounds})"
        )
    print(f"after / before: {ratio:.3f} wall, {cpu_ratio:.3f} CPU time; same tokens for the same seeds: {same_tokens}")
    if not same_tokens:
        print(f"tokens that agree: {token_agreement:.1%}")
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_decode_ab", *sys.argv[1:]]),
        "trees": {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())},
        "settings": {
            "tokens": args.tokens,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "after_int8": args.after_int8,
        },
        "ms_per_step": ms_per_step,
        "cpu_ms_per_step": cpu_ms_per_step,
        "after_over_before": ratio,
        "cpu_after_over_before": cpu_ratio,
        "same_tokens": same_tokens,
        "token_agreement": token_agreement,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
