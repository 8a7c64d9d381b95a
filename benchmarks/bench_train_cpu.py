"""
Training throughput of the synthetic demo (`python run_detection.py`, no data flags) for two source trees of this
repository, measured in one run: each repetition is a fresh process that runs the demo's training, as the demo
configures it (model, batch 32, bf16 where the CPU has it, DataLoader worker, data stream), for `--warmup` + `--steps`
optimizer steps, alternating between the trees (A B A B) so that a busy machine slows both alike. Images per second
are counted over the `--steps` steps after the warm-up; CPU time per image adds the main process and its DataLoader
workers (with one intra-op thread, a measure of the work that other jobs on the machine change little; threads that
spin while waiting for each other inflate it). Prints a table and writes JSON, with the load average.

    git worktree add /tmp/old-checkout <commit>     # or: mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old
    .venv/bin/python -m benchmarks.bench_train_cpu --before /tmp/old-checkout --after . --rounds 2

`--threads N` sets `OMP_NUM_THREADS` for both trees' runs (`--before_threads`, `--after_threads` for one): on cores
shared with other jobs, two intra-op threads that wait for each other slow down many times (benchmarks/RESULTS.md).
`--args` adds `run_detection.py` options to both trees' runs (e.g. `--args="--dataloader_num_workers 0"`);
`--before_args` and `--after_args` to one of them, to compare two settings of the same tree.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


# Run inside each tree: the demo's `main` with a callback that times the optimizer steps.
WORKER = """
import json, os, sys, time
sys.path.insert(0, ".")
import psutil
from transformers import TrainerCallback
import run_detection

import torch

warmup, steps, output_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def cpu_seconds():
    processes = [psutil.Process()] + psutil.Process().children(recursive=True)
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class StepTimer(TrainerCallback):
    marks = {}
    threads = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (warmup, warmup + steps):
            self.marks[state.global_step] = (time.perf_counter(), cpu_seconds(), os.getloadavg()[0])
            StepTimer.threads = torch.get_num_threads()


original_init = run_detection.DetectionTrainer.__init__


def init_with_timer(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(StepTimer())


run_detection.DetectionTrainer.__init__ = init_with_timer
trainer = run_detection.main(
    ["--output_dir", output_dir, "--do_train", "--max_steps", str(warmup + steps), "--save_strategy", "no",
     "--report_to", "none", "--logging_steps", str(warmup + steps), "--log_level", "warning"] + sys.argv[4:]
)
(start, cpu_start, load_start), (end, cpu_end, load_end) = StepTimer.marks[warmup], StepTimer.marks[warmup + steps]
images = steps * trainer.args.per_device_train_batch_size
print(json.dumps({
    "images_per_second": images / (end - start),
    "cpu_ms_per_image": (cpu_end - cpu_start) / images * 1e3,
    "load_average": [load_start, load_end],
    "threads": StepTimer.threads,
}))
"""


def run_once(tree, warmup, steps, threads, extra_args):
    with tempfile.TemporaryDirectory() as output_dir:
        environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if threads:
            environment["OMP_NUM_THREADS"] = str(threads)
        completed = subprocess.run(
            [sys.executable, "-c", WORKER, str(warmup), str(steps), output_dir, *extra_args],
            cwd=tree,
            capture_output=True,
            text=True,
            env=environment,
        )
    if completed.returncode:
        sys.exit(f"bench_train_cpu: the run in {tree} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="source tree A (e.g. a checkout of the older commit)")
    parser.add_argument("--after", default=".", help="source tree B (default: this one)")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps run before timing starts")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps timed (32 images each)")
    parser.add_argument("--rounds", type=int, default=2, help="A B repetitions, each a fresh process")
    for prefix, whose in (("", "both trees'"), ("before_", "tree A's"), ("after_", "tree B's")):
        parser.add_argument(
            f"--{prefix}threads",
            type=int,
            default=0,
            help=f"OMP_NUM_THREADS of {whose} training processes (0: unset, the tree's own choice, as the demo runs)",
        )
    parser.add_argument("--args", default="", help="run_detection.py options for both trees' runs")
    parser.add_argument("--before_args", default="", help="run_detection.py options for tree A only")
    parser.add_argument("--after_args", default="", help="run_detection.py options for tree B only")
    parser.add_argument("--output", default="benchmarks/bench_train_cpu.json")
    args = parser.parse_args()
    for tree in (args.before, args.after):
        if not os.path.isfile(os.path.join(tree, "run_detection.py")):
            sys.exit(f"bench_train_cpu: {tree} holds no run_detection.py (expected a source tree of this repository)")

    arms = {
        "before": (args.before, args.before_threads or args.threads, shlex.split(args.args + " " + args.before_args)),
        "after": (args.after, args.after_threads or args.threads, shlex.split(args.args + " " + args.after_args)),
    }
    runs = {name: [] for name in arms}
    started = time.time()
    for round_index in range(args.rounds):
        for name, (tree, threads, extra_args) in arms.items():
            result = run_once(tree, args.warmup, args.steps, threads, extra_args)
            runs[name].append(result)
            print(
                f"round {round_index + 1} {name:6s}: {result['images_per_second']:6.1f} img/s, "
                f"{result['cpu_ms_per_image']:5.2f} CPU ms/img, {result['threads']} threads, "
                f"load {result['load_average'][0]:.2f}",
                flush=True,
            )

    summary = {
        name: {
            "median_images_per_second": statistics.median(r["images_per_second"] for r in results),
            "median_cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in results),
        }
        for name, results in runs.items()
    }
    ratio = summary["after"]["median_images_per_second"] / summary["before"]["median_images_per_second"]
    print("\n| tree | threads | img/s (median) | CPU ms per image (median) | runs |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in summary.items():
        tree, _, extra_args = arms[name]
        print(
            f"| {name} ({' '.join([tree, *extra_args])}) | {runs[name][0]['threads']} "
            f"| {values['median_images_per_second']:.1f} | {values['median_cpu_ms_per_image']:.2f} | {args.rounds} |"
        )
    print(f"\nafter / before: x{ratio:.3f} images per second")
    record = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "minutes": round((time.time() - started) / 60, 1),
        "runs": runs,
        "summary": summary,
        "after_over_before_images_per_second": ratio,
    }
    with open(args.output, "w") as file:
        json.dump(record, file, indent=2)


if __name__ == "__main__":
    main()
