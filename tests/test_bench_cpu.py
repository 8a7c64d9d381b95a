"""`benchmarks/bench_cpu.py` times the released architectures: its embedded official settings build the same models as
the released config files, and its `--smoke` run writes every case and the decode-step profile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import TF_FIXTURES_DIR, require_shared

from benchmarks.bench_cpu import MODELS, RELEASED_TASK, official_settings
from convert_pix2seq_tf_checkpoint import COCO_CATEGORY_NAMES, config_from_official, detection_task


REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASED_DIR = TF_FIXTURES_DIR / "released_configs_2022" / "coco_det_finetune"


@pytest.mark.parametrize("family, folder", [("resnet50", "resnet_640x640"), ("vit_b", "vit_b_640x640")])
def test_benchmark_builds_the_released_architecture_and_decoding(family, folder):
    released = json.loads(require_shared(RELEASED_DIR / folder / "config.json").read_text())
    expected = config_from_official(released, dict(COCO_CATEGORY_NAMES)).to_dict()
    assert (
        config_from_official(official_settings(family, smoke=False), dict(COCO_CATEGORY_NAMES)).to_dict() == expected
    )
    task = detection_task(released)
    assert {key: task[key] for key in RELEASED_TASK} == RELEASED_TASK


def test_smoke_run_writes_every_case_and_a_decode_step_profile(tmp_path):
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks.bench_cpu", "--smoke", "--repeats", "1", "--threads", "1"]
    completed = subprocess.run(
        [*command, "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    cases = {(row["model"], row["style"], row["batch_size"]) for row in results["cases"]}
    assert {model for model, _, _ in cases} == set(MODELS) and len(cases) == 14
    assert {row["new_tokens_or_queries"] for row in results["cases"] if row["style"] == "generate"} == {10, 36}
    assert results["profile"]["top_ops"] and "aten::" in (tmp_path / "bench_profile.txt").read_text()
    assert "| HF DETR-R50 | forward + post_process | 2 |" in completed.stdout
