"""`benchmarks/bench_train_cpu.py` times the demo's training in two source trees, alternating, and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_times_both_trees_and_writes_json(tmp_path):
    output = tmp_path / "bench.json"
    tiny = (
        "--per_device_train_batch_size 2 --dataloader_num_workers 0 --synthetic_image_size 32 --image_square_size 32"
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_train_cpu",
            "--before",
            str(REPO_ROOT),
            "--warmup",
            "1",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--threads",
            "1",
            f"--args={tiny} --config_overrides num_bins=16",
            "--output",
            str(output),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads(output.read_text())
    for name in ("before", "after"):
        (run,) = record["runs"][name]
        assert run["images_per_second"] > 0 and run["cpu_ms_per_image"] > 0 and run["threads"] == 1
    assert "after / before" in completed.stdout


def test_benchmark_refuses_a_folder_without_the_script(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train_cpu", "--before", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 1
    assert str(tmp_path) in completed.stderr and "Traceback" not in completed.stderr
