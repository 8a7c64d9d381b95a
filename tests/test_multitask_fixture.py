"""
The converted official multi-task fixture (`multitask_vit`: a tiny official-format Pix2Seq v2 checkpoint with the full
35,000-token vocabulary) through the processor side: `pipeline("image-segmentation")` on the fixture's images, the
official masks rebuilt from the model's own greedy polygons, and the official keypoint path (crops, prompts, points,
scores) through the documented calls.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from testing_utils import V2_FIXTURES_DIR, require_shared
from transformers import pipeline

from convert_pix2seq_tf_checkpoint import convert
from image_processing_pix2seq import Pix2SeqImageProcessor


@pytest.fixture(scope="module")
def reference():
    data = np.load(require_shared(V2_FIXTURES_DIR / "multitask_vit_reference.npz"))
    return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multitask-vit")
    model = convert(require_shared(V2_FIXTURES_DIR / "multitask_vit"), folder).eval()
    return folder, model, Pix2SeqImageProcessor.from_pretrained(folder)


def official_pixels(reference):
    """The official evaluation's preprocessing of the fixture images (what the model saw in the reference)."""
    return torch.from_numpy(reference["images"]).permute(0, 3, 1, 2)


def test_the_processor_gives_the_official_canvas_of_the_fixture_images(reference, converted):
    _, _, processor = converted
    images = [reference["orig_image_0"], reference["orig_image_1"]]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 64, 64)
    torch.testing.assert_close(pixel_values, official_pixels(reference), rtol=0, atol=1e-5)
    for index, (height, width) in enumerate(reference["unpadded_image_size"]):
        assert (pixel_values[index, :, height:] == 0.3).all() and (pixel_values[index, :, :, width:] == 0.3).all()


def test_segmentation_pipeline_runs_on_the_fixture_images(reference, converted):
    folder, model, _ = converted
    segmenter = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    # The official settings but fewer polygon tokens and samples, for the time of a default test run.
    generate_kwargs = {"max_new_tokens": 24, "num_samples": 2}
    image = PIL.Image.fromarray(reference["orig_image_0"])
    segments = segmenter(image, threshold=0.0, generate_kwargs=generate_kwargs)
    assert 1 <= len(segments) <= 10
    assert [segment["score"] for segment in segments] == sorted((s["score"] for s in segments), reverse=True)
    # Image 1 with the boxes of the official reference (normalised to its canvas), as a caller gives them.
    image = PIL.Image.fromarray(reference["orig_image_1"])
    scale = 64 / reference["unpadded_image_size"][1] * reference["orig_image_size"][1]
    boxes = reference["seg_boxes"][1, :1] * np.tile(scale, 2)
    detections = {"boxes": boxes[:, [1, 0, 3, 2]], "labels": [1], "scores": [0.95]}
    segments += segmenter(image, detections=detections, generate_kwargs=generate_kwargs)
    assert segments[-1]["label"] == "person" and segments[-1]["score"] == pytest.approx(0.95)
    for segment, size in zip(segments, [(64, 48)] * (len(segments) - 1) + [(50, 80)]):
        assert set(segment) == {"score", "label", "mask"} and segment["label"] in model.config.id2label.values()
        assert segment["mask"].size == size and segment["mask"].mode == "L"
        assert set(np.unique(np.asarray(segment["mask"]))) <= {0, 255}


def test_the_models_greedy_polygons_give_the_official_masks(reference, converted):
    _, model, processor = converted
    prompts = torch.from_numpy(reference["seg_prompt"])  # (2 images, 2 slots, 6); image 1 slot 1 is empty
    with torch.no_grad():
        sequences = model.generate(
            **processor([reference["orig_image_0"], reference["orig_image_1"]], return_tensors="pt"),
            task="instance_segmentation",
            decoder_input_ids=prompts,
            num_samples=2,
            do_sample=False,
        )
    tokens = sequences[:, 6:]
    np.testing.assert_array_equal(tokens.numpy(), reference["seg_pred_seq"])
    instances = {
        "instance_mask": prompts[..., 0] == 11,
        "instance_labels": prompts[..., 5] - 100,
        "instance_scores": torch.from_numpy(reference["seg_mask_scores"]).reshape(2, 2),
    }
    sizes = reference["orig_image_size"].tolist()
    results = processor.post_process_instance_segmentation(
        tokens, instances, threshold=0.0, target_sizes=sizes, return_binary_maps=True
    )
    official = [[0, 1], [2]]  # rows of seg_mask_* per image, best score first; the empty slot is not recorded
    for result, rows in zip(results, official):
        assert [info["label_id"] for info in result["segments_info"]] == reference["seg_mask_classes"][rows].tolist()
        for mask, row in zip(result["segmentation"], rows):
            np.testing.assert_array_equal(mask.numpy(), reference[f"seg_mask_{row}"])
    assert results[1]["segmentation"][0].sum() > 0


def test_the_documented_keypoint_calls_give_the_official_points_and_scores(reference, converted):
    _, model, processor = converted
    height, width = reference["orig_image_1"].shape[:2]
    boxes = reference["kpe2e_orig_boxes"] * np.array([height, width, height, width], dtype=np.float32)
    detections = [{"boxes": torch.from_numpy(boxes[:, [1, 0, 3, 2]]), "labels": [1, 1], "scores": [0.9, 0.8]}]
    persons = processor.prepare_keypoint_detection([reference["orig_image_1"]], detections)
    np.testing.assert_array_equal(persons["crop_offsets"].numpy(), reference["kpe2e_crop_offset"])
    np.testing.assert_array_equal(persons["crop_sizes"].numpy(), reference["kpe2e_crop_size"])
    np.testing.assert_array_equal(persons["decoder_input_ids"].numpy(), reference["kpe2e_prompt"][:, 0])
    official_crops = torch.from_numpy(reference["kpe2e_images"]).permute(0, 3, 1, 2)
    torch.testing.assert_close(persons["pixel_values"], official_crops, rtol=0, atol=1e-5)

    outputs = model.detect(
        persons["pixel_values"],
        task="keypoint_detection",
        decoder_input_ids=persons["decoder_input_ids"],
        do_sample=False,
    )
    np.testing.assert_array_equal(outputs.sequences.numpy(), reference["kpe2e_raw_pred_seq"])
    (people,) = processor.post_process_keypoint_detection(outputs, persons, temperature=1e-7)
    expected = reference["kpe2e_pred_points_rescaled"].reshape(-1, 17, 2)[..., ::-1]
    for person, points, score in zip(people, expected, reference["kpe2e_pred_scores"]):
        np.testing.assert_allclose(person["keypoints"].numpy(), points, rtol=0, atol=1e-4)
        np.testing.assert_allclose(float(person["score"]), score, rtol=0, atol=1e-5)
