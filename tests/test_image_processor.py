import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqObjectDetectionOutput


def test_images_of_any_size_become_one_square_canvas_padded_bottom_right():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    wide = PIL.Image.new("RGB", (200, 100), (255, 255, 255))
    tall = PIL.Image.new("RGB", (30, 120), (0, 0, 0))
    pixel_values = processor([wide, tall], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 64, 64)
    # Wide image: 64 x 32 of white on top, the 0.3 canvas below.
    assert torch.allclose(pixel_values[0, :, :32, :], torch.tensor(1.0))
    assert torch.allclose(pixel_values[0, :, 32:, :], torch.tensor(0.3))
    # Tall image: 16 x 64 of black on the left, canvas on the right.
    assert torch.allclose(pixel_values[1, :, :, :16], torch.tensor(0.0))
    assert torch.allclose(pixel_values[1, :, :, 16:], torch.tensor(0.3))


def test_normalisation_is_optional_and_applies_after_padding():
    image = PIL.Image.new("RGB", (64, 32), (255, 255, 255))
    processor = Pix2SeqImageProcessor(
        size={"longest_edge": 64}, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    pixel_values = processor(image)["pixel_values"]
    assert torch.allclose(pixel_values[0, :, 0, 0], torch.tensor(2.0))
    assert torch.allclose(pixel_values[0, :, -1, -1], torch.tensor((0.3 - 0.5) / 0.25))


ANNOTATIONS = {
    "image_id": 7,
    "annotations": [
        {"bbox": [20, 10, 40, 30], "category_id": 3, "iscrowd": 0},
        {"bbox": [0, 0, 50, 50], "category_id": 1, "iscrowd": 1},
        {"bbox": [190, 90, 30, 30], "category_id": 2, "iscrowd": 0},
    ],
}


def test_coco_annotations_become_detr_style_targets_normalised_to_the_canvas():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    labels = processor(PIL.Image.new("RGB", (200, 100)), annotations=ANNOTATIONS)["labels"][0]
    # The padded canvas covers 200 x 200 original pixels; the crowd box is dropped, the last one clipped.
    xyxy = torch.tensor([[0.1, 0.05, 0.3, 0.2], [0.95, 0.45, 1.0, 0.5]])
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    torch.testing.assert_close(labels["boxes"], cxcywh)
    assert labels["class_labels"].tolist() == [3, 2] and labels["iscrowd"].tolist() == [0, 0]
    assert labels["image_id"].tolist() == [7] and labels["orig_size"].tolist() == [100, 200]
    assert labels["size"].tolist() == [64, 64]
    pixels = processor(PIL.Image.new("RGB", (200, 100)), annotations=ANNOTATIONS, do_convert_annotations=False)
    torch.testing.assert_close(pixels["labels"][0]["boxes"], xyxy * 64)


def test_return_tensors_np_gives_numpy_arrays_for_pixels_and_labels():
    outputs = Pix2SeqImageProcessor(size={"longest_edge": 32})(
        [PIL.Image.new("RGB", (200, 100))], annotations=[ANNOTATIONS], return_tensors="np"
    )
    assert isinstance(outputs["pixel_values"], np.ndarray) and outputs["pixel_values"].shape == (1, 3, 32, 32)
    assert isinstance(outputs["labels"][0]["boxes"], np.ndarray)


def test_call_time_settings_take_effect():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    image = PIL.Image.new("RGB", (40, 20), (255, 255, 255))
    assert processor(image, size={"longest_edge": 32})["pixel_values"].shape == (1, 3, 32, 32)
    assert processor(image, size=48)["pixel_values"].shape == (1, 3, 48, 48)
    # Not resized: the 40 x 20 image keeps its pixels in the corner of the canvas.
    unresized = processor(image, do_resize=False)["pixel_values"][0]
    assert unresized[:, :20, :40].min() == 1.0 and unresized[:, 20:, :].max() == pytest.approx(0.3)
    normalized = processor(image, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)["pixel_values"]
    assert normalized[0, :, 0, 0].tolist() == pytest.approx([1.0] * 3)
    assert processor(image, pad_value=0.0)["pixel_values"][0, :, -1, -1].tolist() == [0.0] * 3
    with pytest.raises(ValueError, match="does not fit"):
        processor(PIL.Image.new("RGB", (100, 20)), do_resize=False)


def test_unknown_arguments_and_unsupported_formats_are_reported():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 32})
    image = PIL.Image.new("RGB", (40, 20))
    with pytest.raises(TypeError, match="image_sizee"):
        processor(image, image_sizee=64)
    with pytest.raises(ValueError, match="coco_panoptic"):
        processor(image, annotations=ANNOTATIONS, format="coco_panoptic")
    with pytest.raises(ValueError, match="square canvas"):
        processor(image, size={"height": 32, "width": 48})


def test_float_pixels_above_one_are_warned_about_not_silently_clipped():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 32})
    logger = transformers_logging.get_logger("image_processing_pix2seq")
    # `warning_once` remembers what it said in this process.
    logging.Logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        processor(np.full((20, 40, 3), 0.5, dtype=np.float32))
    assert captured.out == ""
    with CaptureLogger(logger) as captured:
        clipped = processor(np.full((20, 40, 3), 200.0, dtype=np.float32))["pixel_values"]
    assert "outside [0, 1]" in captured.out and clipped.max() == 1.0
    kept = processor(np.full((20, 40, 3), 200.0, dtype=np.float32), do_rescale=False)["pixel_values"]
    assert kept.max() == 200.0
    rescaled = processor(np.full((20, 40, 3), 51, dtype=np.uint8))["pixel_values"]
    assert rescaled[0, :, 0, 0].tolist() == pytest.approx([0.2] * 3)


def detections(boxes, scores, labels):
    return Pix2SeqObjectDetectionOutput(
        pred_canvas_boxes=torch.tensor([boxes], dtype=torch.float32),
        pred_scores=torch.tensor([scores], dtype=torch.float32),
        pred_labels=torch.tensor([labels]),
    )


def test_post_processing_returns_known_boxes_in_original_pixels_of_a_non_square_image():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    # An image 300 wide, 150 high: the canvas spans 300 x 300 original pixels.
    outputs = detections([[0.1, 0.2, 0.5, 0.4], [0.0, 0.6, 0.2, 0.9]], [0.9, 0.8], [1, 0])
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(150, 300)])[0]
    # The second box lies in the padding below the image (y > 150 px) and is dropped.
    torch.testing.assert_close(result["boxes"], torch.tensor([[30.0, 60.0, 150.0, 120.0]]))
    assert result["labels"].tolist() == [1] and result["scores"].tolist() == pytest.approx([0.9])


def test_post_processing_thresholds_sorts_and_drops_empty_slots():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    outputs = detections(
        [[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.6, 0.6]],
        [0.4, 0.9, 0.0, 0.7],
        [0, 1, -1, 2],
    )
    result = processor.post_process_object_detection(outputs, threshold=0.5)[0]
    assert result["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert result["labels"].tolist() == [1, 2]
    everything = processor.post_process_object_detection(outputs, threshold=0.0)[0]
    assert everything["labels"].tolist() == [1, 2, 0]


def test_processed_image_and_post_processing_agree_on_geometry():
    """A box drawn on an image, read back from the processed canvas, maps to the same original pixels."""
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    image = np.zeros((120, 240, 3), dtype=np.uint8)
    image[30:90, 60:180] = 255  # x 60..180, y 30..90
    canvas = processor(PIL.Image.fromarray(image))["pixel_values"][0, 0]
    ys, xs = torch.nonzero(canvas > 0.65, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32) / 64
    outputs = Pix2SeqObjectDetectionOutput(
        pred_canvas_boxes=box[None], pred_scores=torch.ones(1, 1), pred_labels=torch.zeros(1, 1, dtype=torch.long)
    )
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(120, 240)])[0]
    torch.testing.assert_close(result["boxes"], torch.tensor([[60.0, 30.0, 180.0, 90.0]]), atol=4.0, rtol=0)


def test_processor_saves_and_loads_its_settings(tmp_path):
    processor = Pix2SeqImageProcessor(size={"longest_edge": 96}, pad_value=0.5, do_normalize=True)
    processor.save_pretrained(tmp_path)
    loaded = Pix2SeqImageProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.pad_value, loaded.do_normalize) == (96, 0.5, True)
    assert loaded(PIL.Image.new("RGB", (50, 30)))["pixel_values"].shape == (1, 3, 96, 96)


def test_from_pretrained_size_as_the_transformers_example_passes_it_takes_effect(tmp_path):
    Pix2SeqImageProcessor(size={"longest_edge": 96}).save_pretrained(tmp_path)
    loaded = Pix2SeqImageProcessor.from_pretrained(
        tmp_path,
        do_resize=True,
        size={"max_height": 48, "max_width": 48},
        do_pad=True,
        pad_size={"height": 48, "width": 48},
    )
    assert loaded(PIL.Image.new("RGB", (50, 30)))["pixel_values"].shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match="square canvas"):
        Pix2SeqImageProcessor.from_pretrained(tmp_path, size={"max_height": 48, "max_width": 64})


def test_folders_saved_with_image_size_still_load(tmp_path):
    legacy = {"image_processor_type": "Pix2SeqImageProcessor", "image_size": 40, "pad_value": 0.3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    loaded = Pix2SeqImageProcessor.from_pretrained(tmp_path)
    assert loaded.image_size == 40
    assert loaded(PIL.Image.new("RGB", (50, 30)))["pixel_values"].shape == (1, 3, 40, 40)
