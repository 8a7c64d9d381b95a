"""
Decoding speed of two source trees of this repository, measured in one run: the decoding of
`benchmarks/bench_generate.py` (the official model size with random weights, batch 1, greedy, `--tokens` new tokens,
static cache and `GenerationMixin`'s dynamic cache), each repetition in a fresh process, alternating between the trees
so that a busy machine slows both alike. Prints the median per tree and writes JSON.

    .venv/bin/python -m benchmarks.bench_generate_ab --before /tmp/old-checkout --after . --rounds 5
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


# Run inside each tree: the same model, image and settings as `bench_generate.bench_decoding`.
WORKER = """
import json, sys, time, torch
sys.path.insert(0, ".")
from configuration_pix2seq import Pix2SeqConfig
from modeling_pix2seq import Pix2SeqForObjectDetection
torch.set_num_threads(1)
torch.manual_seed(0)
image_size, tokens = int(sys.argv[1]), int(sys.argv[2])
config = Pix2SeqConfig(image_size=image_size, id2label={i: f"class_{i}" for i in range(1, 91)})
model = Pix2SeqForObjectDetection(config).eval()
pixel_values = torch.rand(1, 3, image_size, image_size)
greedy = {"do_sample": False, "max_new_tokens": tokens}
with torch.no_grad():
    model.get_encoder()(pixel_values)
    start = time.perf_counter()
    model.get_encoder()(pixel_values)
    encoder = time.perf_counter() - start
result = {"encoder_seconds": encoder}
for name, kwargs in (("static", {"cache_implementation": "static"}), ("dynamic", {})):
    start = time.perf_counter()
    sequences = model.generate(pixel_values, **greedy, **kwargs)
    seconds = time.perf_counter() - start
    result[name + "_decode_ms_per_token"] = (seconds - encoder) / (sequences.shape[1] - 1) * 1e3
    result[name + "_tokens"] = sequences[0].tolist()
print(json.dumps(result))
"""


def run_once(tree, image_size, tokens):
    output = subprocess.run(
        [sys.executable, "-c", WORKER, str(image_size), str(tokens)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="source tree of the reference revision")
    parser.add_argument("--after", default=".", help="source tree of the revision under test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--output", default="benchmarks/bench_generate_ab.json")
    args = parser.parse_args()
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    runs = {name: [] for name in trees}
    start = time.perf_counter()
    for round_index in range(args.rounds):
        # Alternate which tree goes first, so that neither always follows the other's leftovers.
        order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
        for name in order:
            result = run_once(trees[name], args.image_size, args.tokens)
            runs[name].append(result)
            print(
                f"round {round_index} {name}: static {result['static_decode_ms_per_token']:.2f} ms/token, "
                f"dynamic {result['dynamic_decode_ms_per_token']:.2f} ms/token",
                file=sys.stderr,
                flush=True,
            )
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            key: statistics.median(result[key] for result in results)
            for key in ("encoder_seconds", "static_decode_ms_per_token", "dynamic_decode_ms_per_token")
        }
    same_tokens = all(
        a[key] == b[key] for a, b in zip(runs["before"], runs["after"]) for key in ("static_tokens", "dynamic_tokens")
    )
    ratios = {
        key: summary["after"][key] / summary["before"][key]
        for key in ("static_decode_ms_per_token", "dynamic_decode_ms_per_token")
    }
    print(f"\n{'tree':8} {'encoder s':>10} {'static ms/token':>16} {'dynamic ms/token':>17}")
    for name, row in summary.items():
        print(
            f"{name:8} {row['encoder_seconds']:10.3f} {row['static_decode_ms_per_token']:16.2f} "
            f"{row['dynamic_decode_ms_per_token']:17.2f}"
        )
    print(f"after / before: static {ratios['static_decode_ms_per_token']:.3f}, ", end="")
    print(f"dynamic {ratios['dynamic_decode_ms_per_token']:.3f}; same tokens: {same_tokens}")
    for results in runs.values():
        for result in results:
            result.pop("static_tokens"), result.pop("dynamic_tokens")
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_generate_ab", *sys.argv[1:]]),
        "trees": trees,
        "medians": summary,
        "after_over_before": ratios,
        "same_tokens": same_tokens,
        "runs": runs,
        "total_seconds": time.perf_counter() - start,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
