"""
One decode step, before and after: the `torch.profiler` table that `bench_cpu` writes for the released ResNet-50
(random weights, the official decoding converted folders carry, `model.generate(**processor(images))` on its two
480x640 images at batch 2, the average of `--steps` consecutive steps after `--step` tokens), for two source trees of
this repository side by side.

Each tree saves its own folder (its remote code, the same random weights: both seed 0) in a fresh process; this tree's
`bench_cpu.profile_decode_step` then profiles each folder in a fresh process, the trees taking turns for `--rounds`
rounds. The table gives, per operator, its calls per step and the median over the rounds of its self CPU time per
step; `ProfilerStep*` is the Python between operators (and the profiler's bookkeeping). Run it on an idle machine:
on shared cores the self times mostly show when the process waited for a core.

    .venv/bin/python -m benchmarks.profile_decode_ab --before /tmp/old-checkout --after . \\
        --output benchmarks/bench_cpu_profile_before_after.txt
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_cpu import REPO_ROOT, load_average, machine_info, make_images, profile_decode_step


SAVE_FOLDER = "import sys; from benchmarks.bench_cpu import save_pix2seq_folder; save_pix2seq_folder(sys.argv[1], 'resnet50', False)"


def run(command, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd)}
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"profile_decode_ab: {' '.join(command[:4])} in {cwd} failed:\n{completed.stderr[-3000:]}")


def profile_in_fresh_process(folder, args, output_path):
    command = [sys.executable, "-m", "benchmarks.profile_decode_ab", "--worker", str(folder), "--output", output_path]
    command += ["--threads", str(args.threads), "--step", str(args.step), "--steps", str(args.steps)]
    run(command, REPO_ROOT)
    return json.loads(Path(output_path).read_text())


def worker(args):
    torch.set_num_threads(args.threads)
    table = Path(args.output).with_suffix(".txt")
    profile = profile_decode_step(args.worker, make_images(False), args.step, table, args.steps, top_ops=None)
    Path(args.output).write_text(json.dumps(profile))


def median_ops(profiles):
    """`{op: (calls per step, median self CPU ms per step)}` over the rounds (an op missing from a round counts 0)."""
    names = {op["name"] for profile in profiles for op in profile["top_ops"]}
    table = {}
    for name in names:
        rows = [next((op for op in profile["top_ops"] if op["name"] == name), None) for profile in profiles]
        calls = max(row["calls_per_step"] for row in rows if row is not None)
        table[name] = (calls, statistics.median(row["self_cpu_ms"] if row else 0.0 for row in rows))
    return table


def comparison_table(before, after, rows=30):
    names = sorted(
        set(before) | set(after), key=lambda name: -max(before.get(name, (0, 0))[1], after.get(name, (0, 0))[1])
    )
    lines = [
        f"{'op':<52} {'calls before':>12} {'calls after':>11} {'ms before':>10} {'ms after':>9}",
    ]
    for name in names[:rows]:
        calls_before, ms_before = before.get(name, (0, 0.0))
        calls_after, ms_after = after.get(name, (0, 0.0))
        lines.append(f"{name[:52]:<52} {calls_before:>12.1f} {calls_after:>11.1f} {ms_before:>10.3f} {ms_after:>9.3f}")
    rest_before = sum(ms for name, (_, ms) in before.items() if name not in names[:rows])
    rest_after = sum(ms for name, (_, ms) in after.items() if name not in names[:rows])
    lines.append(f"{'(the other ops)':<52} {'':>12} {'':>11} {rest_before:>10.3f} {rest_after:>9.3f}")
    lines.append(
        f"{'step (all of the above)':<52} {'':>12} {'':>11} {sum(ms for _, ms in before.values()):>10.3f} "
        f"{sum(ms for _, ms in after.values()):>9.3f}"
    )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="source tree of the reference revision")
    parser.add_argument("--after", default=".", help="source tree of the revision under test")
    parser.add_argument("--rounds", type=int, default=3, help="profiles per tree, the trees taking turns")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--step", type=int, default=250, help="tokens written before the profiled steps")
    parser.add_argument("--steps", type=int, default=20, help="consecutive decode steps profiled")
    parser.add_argument("--output", default="benchmarks/bench_cpu_profile_before_after.txt")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.before:
        parser.error("--before is required")
    for name in ("before", "after"):
        tree = Path(getattr(args, name))
        if not (tree / "modeling_pix2seq.py").is_file() or not (tree / "benchmarks" / "bench_cpu.py").is_file():
            sys.exit(f"profile_decode_ab: --{name} {tree} is not a source tree of this repository")
    load_before = load_average()
    directory = Path(tempfile.mkdtemp())
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    folders = {}
    for name, tree in trees.items():
        folders[name] = directory / f"pix2seq_{name}"
        run([sys.executable, "-c", SAVE_FOLDER, str(folders[name])], tree)
    profiles = {name: [] for name in trees}
    for round_index in range(args.rounds):
        for name in trees if round_index % 2 == 0 else reversed(trees):
            output_path = directory / f"{name}_{round_index}.json"
            profiles[name].append(profile_in_fresh_process(folders[name], args, str(output_path)))
            step_ms = profiles[name][-1]["step_cpu_ms"]
            print(f"round {round_index} {name:6}: {step_ms:.2f} ms per step (profiler on)")
    tables = {name: median_ops(profiles[name]) for name in trees}
    steps_ms = {name: statistics.median(profile["step_cpu_ms"] for profile in profiles[name]) for name in trees}
    header = (
        f"One decode step before ({trees['before']}) and after ({trees['after']}): model.generate(**processor(images)) "
        f"on the released ResNet-50 (random weights, official decoding), batch 2, the {args.steps} steps after "
        f"{args.step} tokens, {args.threads} threads; per step, the median over {args.rounds} profiles per tree in fresh "
        f"processes, the trees taking turns (`{Path(sys.executable).name} -m benchmarks.profile_decode_ab "
        f"{' '.join(sys.argv[1:])}`). Self CPU ms per step by op; ProfilerStep* is the Python between operators and "
        f"the profiler's bookkeeping. Median step with the profiler on: {steps_ms['before']:.2f} ms before, "
        f"{steps_ms['after']:.2f} ms after. Machine: {machine_info()}; load average {load_before} before the run, "
        f"{load_average()} after it.\n\n"
    )
    output = Path(args.output)
    output.write_text(header + comparison_table(tables["before"], tables["after"]) + "\n")
    output.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "profiles": profiles}, indent=1) + "\n")
    print(output.read_text())


if __name__ == "__main__":
    main()
