"""COCO detection mAP as an `evaluate` metric: pycocotools `COCOeval` on per-image predictions and references."""

import contextlib
import io

import datasets
import evaluate
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


_DESCRIPTION = """
The 12 COCO box metrics of pycocotools `COCOeval` (AP over IoU 0.5:0.95, AP50, AP75, AP small/medium/large and AR at
1/10/100 detections, AR small/medium/large). Each image counts once: inputs with a repeated `image_id` are an error.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image: `image_id`, `boxes` (`[x, y, w, h]` in the image's pixels), `scores`, `labels`
        (category ids, as in the references).
    references: one dict per image, the original annotations: `image_id`, `boxes` (`[x, y, w, h]` pixels), `labels`,
        `iscrowd` (crowd regions are ignored, as COCO does), `area` (decides small/medium/large; the box area if the
        data set has no segmentation area).
    class_metrics (`bool`, *optional*, defaults to `False`): also return `map_per_class`.
Returns:
    `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`, `mar_small`,
    `mar_medium`, `mar_large`: floats, -1 where the set has no ground truth of that kind (pycocotools' convention).
    With `class_metrics`, `map_per_class`: `{category_id: AP over IoU 0.5:0.95}` for every category of the
    references (0 for one never detected).
Example:
    >>> metric = evaluate.load("coco_map")
    >>> reference = {"image_id": 1, "boxes": [[10, 10, 20, 20]], "labels": [1], "iscrowd": [0], "area": [400.0]}
    >>> prediction = {"image_id": 1, "boxes": [[10, 10, 20, 20]], "scores": [0.9], "labels": [1]}
    >>> round(metric.compute(predictions=[prediction], references=[reference])["map"], 6)
    1.0
"""

STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def coco_ground_truth(references):
    """A pycocotools `COCO` built in memory from per-image references."""
    images, annotations, categories = [], [], set()
    for reference in references:
        images.append({"id": int(reference["image_id"])})
        for box, label, crowd, area in zip(
            reference["boxes"], reference["labels"], reference["iscrowd"], reference["area"]
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(reference["image_id"]),
                    "bbox": list(map(float, box)),
                    "category_id": int(label),
                    "iscrowd": int(crowd),
                    "area": float(area),
                }
            )
            categories.add(int(label))
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c} for c in sorted(categories)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(predictions, references, class_metrics=False):
    """
    The 12 COCOeval statistics (see `STAT_NAMES`) of per-image predictions against per-image references and, with
    `class_metrics`, `map_per_class` (`{category_id: AP}`, the AP of each category of the references).
    """
    for name, items in (("predictions", predictions), ("references", references)):
        ids = [int(item["image_id"]) for item in items]
        if len(ids) != len(set(ids)):
            raise ValueError(f"Each image must appear once in the {name}; repeated image_id values found.")
    ground_truth = coco_ground_truth(references)
    results = [
        {
            "image_id": int(p["image_id"]),
            "bbox": list(map(float, box)),
            "score": float(score),
            "category_id": int(label),
        }
        for p in predictions
        for box, score, label in zip(p["boxes"], p["scores"], p["labels"])
    ]
    if not results or not ground_truth.dataset["annotations"]:
        # pycocotools cannot load an empty result list; nothing detected is AP 0 (and no ground truth is -1).
        empty = 0.0 if ground_truth.dataset["annotations"] else -1.0
        metrics = dict.fromkeys(STAT_NAMES, empty)
        if class_metrics:
            metrics["map_per_class"] = {category["id"]: empty for category in ground_truth.dataset["categories"]}
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes(results)
        evaluator = COCOeval(ground_truth, detections, iouType="bbox")
        evaluator.params.imgIds = [int(r["image_id"]) for r in references]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, np.asarray(evaluator.stats))}
    if class_metrics:
        # precision: (IoU thresholds, recall points, categories, area ranges, max detections); -1 marks no data.
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        metrics["map_per_class"] = {}
        for index, category_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, index]
            values = values[values > -1]
            metrics["map_per_class"][int(category_id)] = float(values.mean()) if values.size else -1.0
    return metrics


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoMap(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "image_id": datasets.Value("int64"),
                        "boxes": boxes,
                        "scores": datasets.Sequence(datasets.Value("float64")),
                        "labels": datasets.Sequence(datasets.Value("int64")),
                    },
                    "references": {
                        "image_id": datasets.Value("int64"),
                        "boxes": boxes,
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "iscrowd": datasets.Sequence(datasets.Value("int64")),
                        "area": datasets.Sequence(datasets.Value("float64")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, class_metrics=False):
        return coco_metrics(predictions, references, class_metrics=class_metrics)
