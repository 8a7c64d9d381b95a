"""
The image processor's Pix2Seq v2 side: boxes -> segmentation prompts and keypoint crops, generated tokens -> masks in
transformers' instance-segmentation format and keypoints in VitPose's format. The official post-processing reference
(`multitask_postprocess_reference`) goes through these methods end to end; the format rules hold for any input.
"""

import numpy as np
import pytest
import torch
from testing_utils import multitask_postprocess_reference

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqObjectDetectionOutput


KEYPOINT_CASES = ["kpA", "kpA_nosuppress", "kpA_colab", "kpB", "kpC_nosuppress", "kpD", "kpD_nosuppress"]


@pytest.fixture(scope="module")
def reference():
    return multitask_postprocess_reference()


@pytest.fixture(scope="module")
def processor():
    # The post-processing reference uses the official 640 canvas.
    return Pix2SeqImageProcessor(size={"longest_edge": 640})


def image_sizes(case):
    return [(image["height"], image["width"]) for image in case["images"]]


def detector_results(case):
    """The case's detections as a transformers detector returns them: xyxy pixel boxes, labels, scores."""
    results = []
    for image in case["images"]:
        found = case["detections_json"][str(image["id"])]
        xywh = np.array([box for _, box, _ in found], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        labels = torch.tensor([label for label, _, _ in found])
        results.append(
            {"boxes": torch.from_numpy(boxes), "labels": labels, "scores": torch.tensor([s for *_, s in found])}
        )
    return results


@pytest.mark.parametrize("name", ["segA", "segB", "segC"])
def test_segmentation_through_the_processor_gives_the_official_prompts_and_masks(reference, processor, name):
    arrays, cases = reference
    case = cases[name]
    sizes = image_sizes(case)
    instances = processor.prepare_instance_segmentation(detector_results(case), sizes, threshold=0.0)
    official_prompts = arrays[f"{name}_prompt"]
    slots = instances["decoder_input_ids"].shape[1]
    assert slots == min(10, max(len(found) for found in case["detections_json"].values()))
    np.testing.assert_array_equal(instances["decoder_input_ids"].numpy(), official_prompts[:, :slots])
    assert not official_prompts[:, slots:].any()

    # The official evaluation decodes all 10 slots; the processor reads only the slots it prepared.
    tokens = arrays[f"{name}_pred_seq"].reshape(len(sizes), 10, case["num_samples"], -1)[:, :slots]
    outputs = Pix2SeqObjectDetectionOutput(sequences=torch.from_numpy(tokens.reshape(-1, tokens.shape[-1])))
    results = processor.post_process_instance_segmentation(
        outputs, instances, threshold=0.0, target_sizes=sizes, return_binary_maps=True
    )
    for index, result in enumerate(results):
        labels = arrays[f"{name}_labels"][index]
        scores = arrays[f"{name}_scores_in"][index]
        official = [slot for slot in np.argsort(-scores, kind="stable") if labels[slot] > 0]
        assert [info["label_id"] for info in result["segments_info"]] == labels[official].tolist()
        assert [info["score"] for info in result["segments_info"]] == scores[official].tolist()
        assert [info["id"] for info in result["segments_info"]] == list(range(len(official)))
        np.testing.assert_array_equal(result["segmentation"].numpy(), arrays[f"{name}_img{index}_masks"][official])


@pytest.mark.parametrize("name", KEYPOINT_CASES)
def test_keypoints_through_the_processor_give_the_official_crops_points_and_scores(reference, processor, name):
    arrays, cases = reference
    case = cases[name]
    ((height, width),) = image_sizes(case)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    persons = processor.prepare_keypoint_detection([image], detector_results(case))
    np.testing.assert_array_equal(persons["crop_offsets"].numpy(), arrays[f"{name}_crop_offset"])
    np.testing.assert_array_equal(persons["crop_sizes"].numpy(), arrays[f"{name}_crop_size"])
    np.testing.assert_array_equal(persons["person_boxes"].numpy(), arrays[f"{name}_boxes"])
    np.testing.assert_array_equal(persons["person_scores"].numpy(), arrays[f"{name}_det_scores"])
    np.testing.assert_array_equal(persons["decoder_input_ids"].numpy(), arrays[f"{name}_prompt"][:, 0])
    assert persons["pixel_values"].shape == (len(arrays[f"{name}_boxes"]), 3, 640, 640)

    overrides = case["config_overrides"]
    outputs = Pix2SeqObjectDetectionOutput(
        sequences=torch.from_numpy(arrays[f"{name}_stub_seq"]), logits=torch.from_numpy(arrays[f"{name}_stub_logits"])
    )
    (people,) = processor.post_process_keypoint_detection(
        outputs,
        persons,
        suppress_invisible=overrides.get("eval_suppress_invisible_token", True),
        top_p=overrides.get("top_p", 0.1),
        points_score_weight=overrides.get("points_score_weight", 1.0),
        generator=torch.Generator().manual_seed(0),
    )
    expected_xy = arrays[f"{name}_points_rescaled"].reshape(-1, 17, 2)[..., ::-1]
    assert len(people) == len(expected_xy)
    for person, expected, score, bbox in zip(
        people, expected_xy, arrays[f"{name}_scores"], persons["person_bboxes"].numpy()
    ):
        assert set(person) == {"keypoints", "scores", "labels", "bbox", "score", "visible"}
        np.testing.assert_allclose(person["keypoints"].numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(person["score"].numpy(), score, rtol=0, atol=1e-5)
        assert person["labels"].tolist() == list(range(17))
        assert person["scores"].shape == (17,) and person["visible"].shape == (17,)
        np.testing.assert_array_equal(person["bbox"].numpy(), bbox)


def test_person_boxes_are_the_given_person_detections_best_first(processor):
    detections = [
        {
            "boxes": torch.tensor(
                [[10.0, 10, 50, 90], [60, 5, 90, 70], [0, 0, 30, 30], [5, 5, 5, 40], [20, 20, 60, 60]]
            ),
            "labels": torch.tensor([1, 1, 3, 1, 1]),
            "scores": torch.tensor([0.2, 0.9, 0.99, 0.8, 0.5]),
            "iscrowd": torch.tensor([0, 0, 0, 0, 1]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    images = [np.zeros((100, 120, 3), np.uint8), np.zeros((40, 30, 3), np.uint8)]
    persons = processor.prepare_keypoint_detection(images, detections)
    # The car (3), the box without width and the crowd box are dropped; the rest come best first.
    torch.testing.assert_close(persons["person_bboxes"], torch.tensor([[60.0, 5, 90, 70], [10, 10, 50, 90]]))
    assert persons["person_image_index"].tolist() == [0, 0]
    assert persons["image_sizes"].tolist() == [[100, 120], [40, 30]]
    assert (persons["decoder_input_ids"][:, [0, 5]] == torch.tensor([12, 101])).all()
    outputs = Pix2SeqObjectDetectionOutput(
        sequences=torch.full((2, 34), 1500), logits=torch.zeros(2, 34, 2000).index_fill_(-1, torch.tensor(1500), 20.0)
    )
    results = processor.post_process_keypoint_detection(outputs, persons, threshold=0.5)
    assert [len(people) for people in results] == [2, 0]
    for person in results[0]:
        assert person["keypoints"].shape == (17, 2) and (person["scores"] > 0.5).all()
    assert processor.post_process_keypoint_detection(outputs, persons, threshold=1.0)[0][0]["keypoints"].shape == (
        0,
        2,
    )


def square_polygon_tokens(top, left, bottom, right, length=16):
    """Tokens of one square polygon on the canvas (values in [0, 1]), padded with 0."""
    corners = [(top, left), (top, right), (bottom, right), (bottom, left)]
    tokens = [1000 + round(value * 999) for corner in corners for value in corner]
    return tokens + [0] * (length - len(tokens))


def test_segmentation_map_keeps_the_best_instance_where_masks_overlap(processor):
    detections = [{"boxes": torch.tensor([[0.0, 0, 64, 64], [0, 0, 32, 32]]), "labels": torch.tensor([2, 5])}]
    detections[0]["scores"] = torch.tensor([0.6, 0.8])
    instances = processor.prepare_instance_segmentation(detections, [(64, 64)])
    assert instances["instance_labels"].tolist() == [[5, 2]]
    # Both samples of the best box draw the top-left quarter, both of the other the whole image.
    best, other = square_polygon_tokens(0, 0, 0.05, 0.05), square_polygon_tokens(0, 0, 0.1, 0.1)
    outputs = torch.tensor([best, best, other, other])
    processor_64 = Pix2SeqImageProcessor(size={"longest_edge": 64})
    (result,) = processor_64.post_process_instance_segmentation(
        outputs, instances, threshold=0.0, target_sizes=[(64, 64)]
    )
    assert result["segments_info"] == [
        {"id": 0, "label_id": 5, "score": pytest.approx(0.8)},
        {"id": 1, "label_id": 2, "score": pytest.approx(0.6)},
    ]
    segmentation = result["segmentation"]
    assert segmentation.shape == (64, 64) and segmentation.dtype == torch.int32
    assert (segmentation[:3, :3] == 0).all() and (segmentation[10:, 10:] == -1).all()
    assert ((segmentation == 1).sum() > 0) and set(segmentation.unique().tolist()) == {-1, 0, 1}
    (binary,) = processor_64.post_process_instance_segmentation(
        outputs, instances, threshold=0.0, target_sizes=[(64, 64)], return_binary_maps=True
    )
    assert binary["segmentation"].shape == (2, 64, 64) and binary["segmentation"][1][:3, :3].all()
    (above,) = processor_64.post_process_instance_segmentation(
        outputs, instances, threshold=0.7, target_sizes=[(64, 64)]
    )
    assert [info["label_id"] for info in above["segments_info"]] == [5]


def test_no_boxes_give_no_prompts_and_empty_results(processor):
    detections = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    instances = processor.prepare_instance_segmentation(detections, [(30, 40), (50, 20)])
    assert instances["decoder_input_ids"].shape == (2, 0, 6)
    results = processor.post_process_instance_segmentation(
        torch.zeros(0, 5), instances, target_sizes=[(30, 40), (50, 20)]
    )
    assert [result["segments_info"] for result in results] == [[], []]
    assert results[0]["segmentation"].shape == (30, 40) and (results[0]["segmentation"] == -1).all()


def test_an_image_with_fewer_boxes_gets_empty_slots(processor):
    detections = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([3]), "scores": torch.tensor([0.4])},
    ]
    instances = processor.prepare_instance_segmentation(detections, [(20, 20), (20, 20)])
    assert instances["instance_mask"].tolist() == [[True, True], [True, False]]
    assert not instances["decoder_input_ids"][1, 1].any()
    assert instances["decoder_input_ids"][1, 0, -1] == 103


def test_boxes_scoring_below_the_threshold_or_of_class_zero_are_not_prompted(processor):
    detections = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 8, 8]]),
            "labels": torch.tensor([1, 2, 0]),
            "scores": torch.tensor([0.3, 0.6, 0.9]),
        }
    ]
    instances = processor.prepare_instance_segmentation(detections, [(20, 20)], threshold=0.5)
    assert instances["instance_labels"].tolist() == [[2]]
    assert instances["instance_scores"].tolist() == [[pytest.approx(0.6)]]
