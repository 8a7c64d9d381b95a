import json
import os
import subprocess
import sys

import pytest
import torch
from testing_utils import tiny_run_args, write_coco

import run_detection
from evaluation.coco_map.coco_map import coco_metrics
from training.detection_data import TrainTransform, synthetic_split


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_streamed_trainer_run_saves_a_servable_model_and_reports_coco_map(tmp_path):
    trainer = run_detection.main(tiny_run_args(tmp_path, "--max_steps", "3", "--save_steps", "3"))
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {
        "eval_map",
        "eval_map_50",
        "eval_map_75",
        "eval_map_small",
        "eval_map_medium",
        "eval_map_large",
        "eval_mar_100",
    } <= set(results)
    assert sorted(p["image_id"] for p in trainer.last_predictions) == sorted(
        synthetic_split(False, 5).dataset["image_id"]
    )
    assert len(os.listdir(tmp_path / "predictions")) <= 2
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_pix2seq.py"):
        assert (tmp_path / name).exists() and (tmp_path / "checkpoint-3" / name).exists()

    from transformers import pipeline

    detector = pipeline("object-detection", model=str(tmp_path), trust_remote_code=True)
    from training.synthetic_shapes import draw_example

    detections = detector(draw_example(0)[0], threshold=0.0)
    assert all(d["label"] in {"circle", "rectangle", "triangle", "ring"} for d in detections)


def test_recipe_defaults_follow_the_official_fine_tune_config():
    parser = run_detection.HfArgumentParser(run_detection.Pix2SeqTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--use_cpu", "true"])
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 0.05)
    assert args.max_grad_norm > 0 and not args.remove_unused_columns and args.min_lr_ratio == 0.01


def test_learning_rate_warms_up_then_decays_linearly_to_the_floor(tmp_path):
    args = run_detection.Pix2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, warmup_steps=10, learning_rate=1.0
    )
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
    run_detection.main(
        tiny_run_args(tmp_path, "--max_steps", "2", "--save_steps", "2", "--synthetic_eval_images", "1")
    )
    trainer = run_detection.main(
        tiny_run_args(
            tmp_path,
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--synthetic_eval_images",
            "1",
            "--resume_from_checkpoint",
            "last",
        )
    )
    assert trainer.state.global_step == 4
    logged_steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's state, 3-4 from this run
    optimizer_state = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=False)["state"]
    assert next(iter(optimizer_state.values()))["step"] == 4


def test_coco_folder_run_evaluates_against_the_original_annotations(tmp_path):
    images = dict.fromkeys(range(1, 7), (48, 40))
    annotations = [{"image_id": i, "category_id": 1 + 6 * (i % 2), "bbox": [4, 4, 20, 16]} for i in images]
    folder, path = write_coco(tmp_path, images, annotations)
    trainer = run_detection.main(
        tiny_run_args(
            tmp_path / "out",
            "--train_images",
            str(folder),
            "--train_annotations",
            str(path),
            "--eval_images",
            str(folder),
            "--eval_annotations",
            str(path),
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
        )
    )
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
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp_path),
        *tiny_run_args(
            tmp_path / "out",
            "--max_train_samples",
            "32",
            "--max_steps",
            "4",
            "--save_strategy",
            "no",
            "--synthetic_eval_images",
            "7",
            "--ddp_backend",
            "gloo",
        ),
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


EXAMPLE_OPTIONS = (
    "--image_square_size",
    "--trust_remote_code",
    "--cache_dir",
    "--model_revision",
    "--token",
    "--image_processor_name",
    "--config_name",
    "--train_val_split",
    "--do_train",
    "--do_eval",
    "--do_predict",
    "--overwrite_output_dir",
    "--push_to_hub",
    "--lr_scheduler_type",
    "--metric_for_best_model",
    "--num_train_epochs",
)


def test_help_shows_the_example_scripts_options():
    result = subprocess.run(
        [sys.executable, "run_detection.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert [option for option in EXAMPLE_OPTIONS if option not in result.stdout] == []


def test_lr_scheduler_type_is_respected(tmp_path):
    args = run_detection.Pix2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, warmup_steps=10, learning_rate=1.0, lr_scheduler_type="linear"
    )
    trainer = run_detection.DetectionTrainer(model=torch.nn.Linear(1, 1), args=args)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = trainer.create_scheduler(110, optimizer)
    for _ in range(110):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0)  # transformers' linear decays to 0, not to the floor


def test_num_train_epochs_sets_the_steps_outside_the_demo(tmp_path):
    images = dict.fromkeys(range(1, 7), (48, 40))
    annotations = [{"image_id": i, "category_id": 1, "bbox": [4, 4, 20, 16]} for i in images]
    folder, path = write_coco(tmp_path, images, annotations)
    trainer = run_detection.main(
        tiny_run_args(
            tmp_path / "out",
            "--train_images",
            str(folder),
            "--train_annotations",
            str(path),
            "--num_train_epochs",
            "2",
            "--save_strategy",
            "no",
            "--do_train",
            "--max_train_minutes",
            "0.5",
        )
    )
    assert trainer.state.global_step == 3  # 6 images x 2 epochs in batches of 4


def test_best_model_per_class_map_and_model_cards(tmp_path):
    trainer = run_detection.main(
        tiny_run_args(
            tmp_path,
            "--max_steps",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--save_steps",
            "1",
            "--load_best_model_at_end",
            "--synthetic_eval_images",
            "2",
        )
    )
    assert trainer.args.metric_for_best_model == "map" and trainer.state.best_metric is not None
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_map_circle", "eval_map_rectangle", "eval_map_triangle", "eval_map_ring"} <= set(results)
    for folder in (tmp_path, tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"):
        assert "generated_from_trainer" in (folder / "README.md").read_text()


def test_push_to_hub_uploads_the_output_folder_with_its_model_card(tmp_path, monkeypatch):
    calls = []

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            card = open(os.path.join(folder_path, "README.md")).read()
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), card))

    monkeypatch.setattr("transformers.trainer.hf_api", FakeHub)
    run_detection.main(
        tiny_run_args(
            tmp_path / "out",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            "--synthetic_eval_images",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "me/pix2seq",
        )
    )
    assert calls[0] == ("create_repo", "me/pix2seq")
    assert calls[-1][:2] == ("upload_folder", "me/pix2seq")
    assert {"README.md", "model.safetensors", "config.json", "generation_config.json"} <= set(calls[-1][2])
    assert "- pix2seq" in calls[-1][3] and "object-detection" in calls[-1][3]  # the card as the example writes it


def saved_tiny_model(folder, **generation):
    from tests.test_run_detection_guards import save_demo_model

    save_demo_model(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **generation}))
    return folder


def test_evaluation_decodes_as_the_saved_generation_config_says(tmp_path, monkeypatch):
    from modeling_pix2seq import Pix2SeqForObjectDetection

    seen = []
    generate = Pix2SeqForObjectDetection.generate

    def recording(self, *args, **kwargs):
        settings = self.generation_config.to_dict()
        seen.append({key: kwargs.get(key, settings.get(key)) for key in ("do_sample", "top_p")})
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Pix2SeqForObjectDetection, "generate", recording)
    for do_sample, top_p in ((True, 0.3), (False, 1.0)):
        model_dir = saved_tiny_model(tmp_path / f"model-{do_sample}", do_sample=do_sample, top_p=top_p)
        seen.clear()
        run_detection.main(
            tiny_run_args(
                tmp_path / f"out-{do_sample}",
                "--model_name_or_path",
                str(model_dir),
                "--do_eval",
                "--synthetic_eval_images",
                "2",
            )
        )
        assert seen and all(s == {"do_sample": do_sample, "top_p": top_p} for s in seen)


def test_evaluation_reports_a_progress_step_per_batch(tmp_path):
    from transformers import TrainerCallback

    class Counter(TrainerCallback):
        steps = 0

        def on_prediction_step(self, args, state, control, **kwargs):
            Counter.steps += 1

    trainer = run_detection.main(
        tiny_run_args(tmp_path / "out", "--model_name_or_path", str(saved_tiny_model(tmp_path / "model")), "--do_eval")
    )
    trainer.add_callback(Counter)
    trainer.evaluate()
    assert Counter.steps == 2  # 5 images in batches of 3


def test_model_loading_options_of_the_example(tmp_path, monkeypatch):
    from transformers import HfArgumentParser

    from image_processing_pix2seq import Pix2SeqImageProcessor

    model_dir = saved_tiny_model(tmp_path / "model")
    Pix2SeqImageProcessor(image_size=64, pad_value=0.5).save_pretrained(tmp_path / "processor")
    parser = HfArgumentParser((run_detection.ModelArguments, run_detection.DataTrainingArguments))
    model_args, data_args = parser.parse_args_into_dataclasses(
        [
            "--model_name_or_path",
            str(model_dir),
            "--image_processor_name",
            str(tmp_path / "processor"),
            "--image_square_size",
            "32",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--model_revision",
            "main",
        ]
    )
    label_map = synthetic_split(False, 1).label_map
    model = run_detection.build_model(model_args, data_args, label_map, max_instances=4)
    processor = run_detection.build_image_processor(model_args, model.config)
    assert type(model).__module__ == "modeling_pix2seq"  # this repository's class, not the folder's copy
    assert model.config.image_size == 32 and processor.image_size == 32 and processor.pad_value == 0.5

    loaded = []
    auto_class = run_detection.AutoModelForObjectDetection
    monkeypatch.setattr(auto_class, "from_pretrained", lambda *args, **kwargs: loaded.append(kwargs) or model)
    model_args.trust_remote_code = True
    run_detection.build_model(model_args, data_args, label_map, max_instances=4)
    assert loaded and loaded[0]["trust_remote_code"] and loaded[0]["cache_dir"] == str(tmp_path / "cache")
