import json
import os
import subprocess
import sys

import pytest
import torch

import run_detection
from coco_map.coco_map import coco_metrics
from detection_data import TrainTransform, synthetic_split
from tests.test_detection_data import write_coco


TINY_MODEL = (
    "image_size=64,num_bins=48,d_model=32,encoder_layers=1,decoder_layers=1,encoder_attention_heads=4,"
    "decoder_attention_heads=4,encoder_ffn_dim=64,decoder_ffn_dim=64"
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run_args(output_dir, *extra):
    return [
        "--output_dir", str(output_dir), "--config_overrides", TINY_MODEL, "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "3", "--synthetic_eval_images", "5", "--logging_steps", "1",
        "--dataloader_num_workers", "0", "--num_prediction_images", "2", "--disable_tqdm", "true",
        "--shuffle_buffer_size", "8", *extra,
    ]


def test_streamed_trainer_run_saves_a_servable_model_and_reports_coco_map(tmp_path):
    trainer = run_detection.main(tiny_run_args(tmp_path, "--max_steps", "3", "--save_steps", "3"))
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_map", "eval_map_50", "eval_map_75", "eval_map_small", "eval_map_medium", "eval_map_large",
            "eval_mar_100"} <= set(results)
    assert sorted(p["image_id"] for p in trainer.last_predictions) == sorted(synthetic_split(False, 5).dataset["image_id"])
    assert len(os.listdir(tmp_path / "predictions")) <= 2
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_pix2seq.py"):
        assert (tmp_path / name).exists() and (tmp_path / "checkpoint-3" / name).exists()

    from transformers import pipeline
    detector = pipeline("object-detection", model=str(tmp_path), trust_remote_code=True)
    from synthetic_shapes import draw_example
    detections = detector(draw_example(0)[0], threshold=0.0)
    assert all(d["label"] in {"circle", "rectangle", "triangle", "ring"} for d in detections)


def test_recipe_defaults_follow_the_official_fine_tune_config():
    parser = run_detection.HfArgumentParser(run_detection.Pix2SeqTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--use_cpu", "true"])
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 0.05)
    assert args.max_grad_norm > 0 and not args.remove_unused_columns and args.min_lr_ratio == 0.01


def test_learning_rate_warms_up_then_decays_linearly_to_the_floor(tmp_path):
    args = run_detection.Pix2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, warmup_steps=10, learning_rate=1.0)
    parameter = torch.nn.Parameter(torch.zeros(1))
    trainer = run_detection.DetectionTrainer(model=torch.nn.Linear(1, 1), args=args)
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = trainer.create_scheduler(110, optimizer)
    rates = []
    for _ in range(111):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[5] < rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(1.0 - 0.99 * 0.5)
    assert rates[110] == pytest.approx(0.01)


def test_time_budget_stops_training_and_saves_once_spent():
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(global_step=7), TrainerControl()
    generous = run_detection.TrainingTimeBudgetCallback(max_minutes=60)
    generous.on_train_begin(None, state, control)
    generous.on_step_end(None, state, control)
    assert not control.should_training_stop
    spent = run_detection.TrainingTimeBudgetCallback(max_minutes=0)
    spent.on_train_begin(None, state, control)
    spent.on_step_end(None, state, control)
    assert control.should_training_stop and control.should_save


def test_time_budget_leaves_out_evaluation_time():
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(global_step=7), TrainerControl()
    budget = run_detection.TrainingTimeBudgetCallback(max_minutes=1)
    budget.on_train_begin(None, state, control)
    budget.start -= 90  # 90 s have passed, 60 of them evaluating
    budget.on_evaluate(None, state, control, metrics={"eval_map": 0.5, "eval_runtime": 60.0})
    budget.on_step_end(None, state, control)
    assert not control.should_training_stop
    budget.on_evaluate(None, state, control, metrics={"eval_runtime": -60.0})  # as if no evaluation had happened
    budget.on_step_end(None, state, control)
    assert control.should_training_stop


def test_resume_continues_the_step_count(tmp_path):
    run_detection.main(tiny_run_args(tmp_path, "--max_steps", "2", "--save_steps", "2", "--synthetic_eval_images", "1"))
    trainer = run_detection.main(tiny_run_args(
        tmp_path, "--max_steps", "4", "--save_steps", "2", "--synthetic_eval_images", "1",
        "--resume_from_checkpoint", "last",
    ))
    assert trainer.state.global_step == 4
    logged_steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's state, 3-4 from this run
    optimizer_state = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=False)["state"]
    assert next(iter(optimizer_state.values()))["step"] == 4


def test_coco_folder_run_evaluates_against_the_original_annotations(tmp_path):
    images = {i: (48, 40) for i in range(1, 7)}
    annotations = [{"image_id": i, "category_id": 1 + 6 * (i % 2), "bbox": [4, 4, 20, 16]} for i in images]
    folder, path = write_coco(tmp_path, images, annotations)
    trainer = run_detection.main(tiny_run_args(
        tmp_path / "out", "--train_images", str(folder), "--train_annotations", str(path), "--eval_images",
        str(folder), "--eval_annotations", str(path), "--max_steps", "2", "--save_strategy", "no",
    ))
    assert trainer.model.config.id2label == {0: "cat", 1: "dog"}
    assert trainer.model.config.max_instances == 1
    assert {label for p in trainer.last_predictions for label in p["labels"]} <= {1, 7}
    assert sorted(p["image_id"] for p in trainer.last_predictions) == list(images)


def run_rank(output_dir, argv):
    """One torchrun rank: trains one pass over the stream while recording the images it reads, then evaluates."""
    seen = []
    transform = TrainTransform.__call__

    def recording(self, batch):
        seen.extend(batch["image_id"])
        return transform(self, batch)

    TrainTransform.__call__ = recording
    trainer = run_detection.main(argv)
    rank = trainer.args.process_index
    record = {"seen": seen, "predictions": trainer.last_predictions, "world_size": trainer.args.world_size}
    (output_dir / f"rank{rank}.json").write_text(json.dumps(record))


def test_two_process_run_reads_disjoint_images_and_gathers_each_prediction_once(tmp_path):
    # 32 training images, 4 per rank per step, 2 ranks: 4 steps are exactly one pass. 7 evaluation images in batches
    # of 3 make the ranks pad with repeated images, which the gathering must count once.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(tmp_path),
        *tiny_run_args(tmp_path / "out", "--max_train_samples", "32", "--max_steps", "4", "--save_strategy", "no",
                       "--synthetic_eval_images", "7", "--ddp_backend", "gloo"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    subprocess.run(command, check=True, cwd=REPO, env=env, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    seen = [set(r["seen"]) for r in ranks]
    assert len(ranks[0]["seen"]) == len(seen[0]) == 16 and len(ranks[1]["seen"]) == len(seen[1]) == 16
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(32))

    predictions = ranks[0]["predictions"]
    assert sorted(p["image_id"] for p in predictions) == sorted(synthetic_split(False, 7).dataset["image_id"])
    single_process = coco_metrics(predictions, synthetic_split(False, 7).references)
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_map"] == pytest.approx(round(single_process["map"], 4))
    assert results["eval_map_50"] == pytest.approx(round(single_process["map_50"], 4))


if __name__ == "__main__":
    from pathlib import Path

    run_rank(Path(sys.argv[1]), sys.argv[2:])
