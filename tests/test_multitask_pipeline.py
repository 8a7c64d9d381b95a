"""
Pix2Seq v2 end to end on a tiny random multi-task model saved to a folder: `pipeline("image-segmentation")`,
`pipeline("keypoint-detection")` and `pipeline("object-detection")` built from the folder's `custom_pipelines`, the
documented processor + model calls, caller-given boxes and images without any box.
"""

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from testing_utils import TINY_MULTITASK_TASKS, run_isolated, tiny_multitask_config
from transformers import pipeline

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection
from pipeline_pix2seq import COCO_KEYPOINT_NAMES


ID2LABEL = {1: "person", 2: "bicycle", 3: "car"}


def multitask_config():
    tasks = copy.deepcopy(TINY_MULTITASK_TASKS)
    # A person's 17 points are 34 tokens, whatever the model.
    tasks["keypoint_detection"]["max_new_tokens"] = 34
    return tiny_multitask_config(id2label=ID2LABEL, tasks=tasks, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pix2seq-multitask")
    config = multitask_config()
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(config)
    # Sampled detection, as the official multi-task folders detect, so that an untrained model finds boxes.
    model.generation_config.update(do_sample=True, top_p=0.4, top_k=0)
    model.save_pretrained(folder)
    Pix2SeqImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def segmenter(model_folder):
    return pipeline("image-segmentation", model=str(model_folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def pose_estimator(model_folder):
    return pipeline("keypoint-detection", model=str(model_folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def test_a_multitask_folder_names_a_pipeline_for_each_task(model_folder, segmenter, pose_estimator):
    pipelines = json.loads((model_folder / "config.json").read_text())["custom_pipelines"]
    assert set(pipelines) == {"object-detection", "image-segmentation", "keypoint-detection"}
    assert type(segmenter).__name__ == "Pix2SeqImageSegmentationPipeline"
    assert type(pose_estimator).__name__ == "Pix2SeqKeypointDetectionPipeline"


def test_segmentation_pipeline_masks_the_detectors_top_boxes_with_their_labels_and_scores(
    model_folder, segmenter, image
):
    detector = pipeline("object-detection", model=str(model_folder), trust_remote_code=True)
    detections = detector(image, threshold=0.0)
    assert detections, "the tiny detector must find boxes for this test to say anything"
    segments = segmenter(image, threshold=0.0)
    # The official evaluation segments the 10 best-scored boxes, with the detector's class and score.
    expected = sorted(((d["score"], d["label"]) for d in detections), reverse=True)[:10]
    assert [s["label"] for s in segments] == [label for _, label in expected]
    assert [s["score"] for s in segments] == pytest.approx([score for score, _ in expected])
    for segment in segments:
        assert set(segment) == {"score", "label", "mask"}
        assert segment["mask"].mode == "L" and segment["mask"].size == image.size
        assert set(np.unique(np.asarray(segment["mask"]))) <= {0, 255}
    # Sampled from a fixed seed: the same image gives the same masks.
    again = segmenter(image, threshold=0.0)
    assert [np.asarray(s["mask"]).tolist() for s in again] == [np.asarray(s["mask"]).tolist() for s in segments]


def test_segmentation_pipeline_segments_the_boxes_the_caller_gives(segmenter, image):
    detections = {"boxes": [[5.0, 4.0, 40.0, 30.0], [10, 10, 20, 45]], "labels": [3, 1], "scores": [0.7, 0.9]}
    segments = segmenter(image, detections=detections, threshold=0.0)
    assert [(s["label"], s["score"]) for s in segments] == [
        ("person", pytest.approx(0.9)),
        ("car", pytest.approx(0.7)),
    ]
    # Ground-truth boxes have no scores: they count as 1, and the threshold keeps them.
    segments = segmenter(image, detections={"boxes": [[5.0, 4.0, 40.0, 30.0]], "labels": [2]})
    assert [(s["label"], s["score"]) for s in segments] == [("bicycle", 1.0)]


def test_no_box_gives_no_segment_and_no_person(segmenter, pose_estimator, image):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert segmenter(image, detections=empty) == []
    assert pose_estimator(image, detections=empty) == []
    # No detection scores above 1.
    assert segmenter(image, threshold=1.0) == []
    assert pose_estimator(image, threshold=1.0) == []
    assert segmenter([]) == [] and pose_estimator([]) == []


def test_keypoint_pipeline_places_17_named_points_per_person_box(pose_estimator, image):
    detections = {"boxes": [[5.0, 4.0, 40.0, 30.0], [30, 10, 60, 47], [0, 0, 10, 10]], "labels": [1, 1, 3]}
    detections["scores"] = [0.6, 0.8, 0.9]
    persons = pose_estimator(image, detections=detections, threshold=0.0)
    assert [person["box"] for person in persons] == [
        {"xmin": 30.0, "ymin": 10.0, "xmax": 60.0, "ymax": 47.0},
        {"xmin": 5.0, "ymin": 4.0, "xmax": 40.0, "ymax": 30.0},
    ]
    for person in persons:
        assert set(person) == {"score", "box", "keypoints"} and 0 <= person["score"] <= 1
        assert [point["label"] for point in person["keypoints"]] == list(COCO_KEYPOINT_NAMES)
        for point in person["keypoints"]:
            assert set(point) == {"label", "x", "y", "score", "visible"}
            assert isinstance(point["visible"], bool) and 0 <= point["score"] <= 1
    assert pose_estimator(image, detections=detections, threshold=0.0) == persons


def test_documented_keypoint_calls_give_the_pipelines_points(model_folder, pose_estimator, image):
    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    processor = Pix2SeqImageProcessor.from_pretrained(model_folder)
    detections = [{"boxes": torch.tensor([[5.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    persons = processor.prepare_keypoint_detection([image], detections)
    outputs = model.detect(
        persons["pixel_values"], task="keypoint_detection", decoder_input_ids=persons["decoder_input_ids"]
    )
    assert outputs.sequences.shape == (1, 34)
    (people,) = processor.post_process_keypoint_detection(outputs, persons, generator=torch.Generator().manual_seed(0))
    (person,) = people
    assert person["keypoints"].shape == (17, 2) and person["scores"].shape == (17,)
    assert person["labels"].tolist() == list(range(17))
    torch.testing.assert_close(person["bbox"], torch.tensor([5.0, 4.0, 40.0, 30.0]))
    (expected,) = pose_estimator(image, detections=detections[0], threshold=0.0)
    points = [[point["x"], point["y"]] for point in expected["keypoints"]]
    np.testing.assert_allclose(points, person["keypoints"].numpy(), rtol=0, atol=1e-4)
    assert expected["score"] == pytest.approx(float(person["score"]))


def test_documented_segmentation_calls_give_the_pipelines_masks(model_folder, segmenter, image):
    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    processor = Pix2SeqImageProcessor.from_pretrained(model_folder)
    size = [(image.height, image.width)]
    inputs = processor(image, return_tensors="pt")
    detections = processor.post_process_object_detection(model(**inputs), threshold=0.0, target_sizes=size)
    instances = processor.prepare_instance_segmentation(detections, size)
    torch.manual_seed(0)  # the pipeline's seed
    sequences = model.generate(
        **inputs, task="instance_segmentation", decoder_input_ids=instances["decoder_input_ids"]
    )
    (result,) = processor.post_process_instance_segmentation(
        sequences[:, 6:], instances, threshold=0.0, target_sizes=size, return_binary_maps=True
    )
    segments = segmenter(image, threshold=0.0)
    assert [info["score"] for info in result["segments_info"]] == pytest.approx([s["score"] for s in segments])
    assert result["segmentation"].shape == (len(segments), image.height, image.width)
    for mask, segment in zip(result["segmentation"], segments):
        np.testing.assert_array_equal(mask.numpy(), np.asarray(segment["mask"]) > 0)


def test_object_detection_on_a_multitask_folder_is_the_models_detection(model_folder, image):
    detector = pipeline("object-detection", model=str(model_folder), trust_remote_code=True)
    assert type(detector).__name__ == "Pix2SeqObjectDetectionPipeline"
    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    processor = Pix2SeqImageProcessor.from_pretrained(model_folder)
    outputs = model.detect(processor(image, return_tensors="pt")["pixel_values"], task="object_detection")
    (expected,) = processor.post_process_object_detection(outputs, 0.0, [(image.height, image.width)])
    assert [d["score"] for d in detector(image, threshold=0.0)] == pytest.approx(expected["scores"].tolist())


def test_a_saved_multitask_folder_segments_in_a_fresh_offline_process(model_folder, tmp_path, image):
    path = tmp_path / "image.png"
    image.save(path)
    script = """
        from transformers import pipeline
        segmenter = pipeline("image-segmentation", model=FOLDER, trust_remote_code=True)
        segments = segmenter(sys.argv[2], threshold=0.0)
        print(type(segmenter).__name__, len(segments), segments[0]["mask"].size if segments else None)
        """
    name, count, *_ = run_isolated(script, model_folder, tmp_path, path).split()
    assert name == "Pix2SeqImageSegmentationPipeline" and int(count) > 0
