import os

import evaluate
import pytest

from evaluation.coco_map.coco_map import coco_metrics


COCO_MAP_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "coco_map")


def references():
    return [
        {
            "image_id": 1,
            "boxes": [[10, 10, 40, 30], [60, 50, 20, 20]],
            "labels": [1, 3],
            "iscrowd": [0, 0],
            "area": [1200.0, 400.0],
        },
        {"image_id": 2, "boxes": [[0, 0, 100, 80]], "labels": [2], "iscrowd": [0], "area": [8000.0]},
    ]


def predictions_from(refs, shift=0.0):
    return [
        {
            "image_id": r["image_id"],
            "boxes": [[x + shift, y + shift, w, h] for x, y, w, h in r["boxes"]],
            "scores": [0.9] * len(r["boxes"]),
            "labels": r["labels"],
        }
        for r in refs
    ]


def test_perfect_predictions_give_ap_one():
    metrics = coco_metrics(predictions_from(references()), references())
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["mar_100"] == pytest.approx(1.0)


def test_shifted_predictions_score_lower_and_strict_iou_suffers_most():
    metrics = coco_metrics(predictions_from(references(), shift=4.0), references())
    assert metrics["map"] < 0.9
    assert metrics["map_75"] <= metrics["map_50"]
    far = coco_metrics(predictions_from(references(), shift=30.0), references())
    assert far["map"] < metrics["map"]


def test_wrong_class_is_a_miss():
    predictions = predictions_from(references())
    predictions[1]["labels"] = [1]
    assert coco_metrics(predictions, references())["map"] < 1.0


def test_detection_on_crowd_region_is_not_a_false_positive():
    refs = references()
    refs[1] = {
        "image_id": 2,
        "boxes": [[0, 0, 100, 80], [200, 200, 50, 50]],
        "labels": [2, 2],
        "iscrowd": [0, 1],
        "area": [8000.0, 2500.0],
    }
    predictions = predictions_from(references())
    predictions[1]["boxes"].append([200, 200, 50, 50])
    predictions[1]["scores"].append(0.95)
    predictions[1]["labels"].append(2)
    assert coco_metrics(predictions, refs)["map"] == pytest.approx(1.0)


def test_no_detections_give_zero_not_an_error():
    empty = [{"image_id": r["image_id"], "boxes": [], "scores": [], "labels": []} for r in references()]
    assert coco_metrics(empty, references())["map"] == 0.0


def test_repeated_image_is_rejected():
    predictions = predictions_from(references())
    with pytest.raises(ValueError, match="once"):
        coco_metrics(predictions + predictions[:1], references())


def test_evaluate_module_loads_offline_and_matches_pycocotools_wrapper():
    metric = evaluate.load(COCO_MAP_PATH, keep_in_memory=True)
    predictions = predictions_from(references(), shift=3.0)
    assert metric.compute(predictions=predictions, references=references()) == pytest.approx(
        coco_metrics(predictions, references())
    )
