import numpy as np
import PIL.Image
import pytest
import torch

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqObjectDetectionOutput


def test_images_of_any_size_become_one_square_canvas_padded_bottom_right():
    processor = Pix2SeqImageProcessor(image_size=64)
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
    processor = Pix2SeqImageProcessor(image_size=64, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    pixel_values = processor(image)["pixel_values"]
    assert torch.allclose(pixel_values[0, :, 0, 0], torch.tensor(2.0))
    assert torch.allclose(pixel_values[0, :, -1, -1], torch.tensor((0.3 - 0.5) / 0.25))


def test_coco_annotations_become_canvas_normalised_xyxy_targets():
    processor = Pix2SeqImageProcessor(image_size=64)
    image = PIL.Image.new("RGB", (200, 100))
    annotations = {
        "image_id": 7,
        "annotations": [
            {"bbox": [20, 10, 40, 30], "category_id": 3, "iscrowd": 0},
            {"bbox": [0, 0, 50, 50], "category_id": 1, "iscrowd": 1},
            {"bbox": [190, 90, 30, 30], "category_id": 2, "iscrowd": 0},
        ],
    }
    labels = processor(image, annotations=annotations)["labels"][0]
    # Normalised by the longest side (200): the padded canvas covers 200 x 200 original pixels.
    torch.testing.assert_close(labels["boxes"], torch.tensor([[0.1, 0.05, 0.3, 0.2], [0.95, 0.45, 1.0, 0.5]]))
    assert labels["class_labels"].tolist() == [3, 2]
    assert labels["image_id"] == 7 and labels["orig_size"].tolist() == [100, 200]
    assert labels["num_dropped"] == 1


def detections(boxes, scores, labels):
    return Pix2SeqObjectDetectionOutput(
        pred_boxes=torch.tensor([boxes], dtype=torch.float32),
        pred_scores=torch.tensor([scores], dtype=torch.float32),
        pred_labels=torch.tensor([labels]),
    )


def test_post_processing_returns_known_boxes_in_original_pixels_of_a_non_square_image():
    processor = Pix2SeqImageProcessor(image_size=64)
    # An image 300 wide, 150 high: the canvas spans 300 x 300 original pixels.
    outputs = detections([[0.1, 0.2, 0.5, 0.4], [0.0, 0.6, 0.2, 0.9]], [0.9, 0.8], [1, 0])
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(150, 300)])[0]
    # The second box lies in the padding below the image (y > 150 px) and is dropped.
    torch.testing.assert_close(result["boxes"], torch.tensor([[30.0, 60.0, 150.0, 120.0]]))
    assert result["labels"].tolist() == [1] and result["scores"].tolist() == pytest.approx([0.9])


def test_post_processing_thresholds_sorts_and_drops_empty_slots():
    processor = Pix2SeqImageProcessor(image_size=64)
    outputs = detections(
        [[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.6, 0.6]], [0.4, 0.9, 0.0, 0.7], [0, 1, -1, 2]
    )
    result = processor.post_process_object_detection(outputs, threshold=0.5)[0]
    assert result["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert result["labels"].tolist() == [1, 2]
    everything = processor.post_process_object_detection(outputs, threshold=0.0)[0]
    assert everything["labels"].tolist() == [1, 2, 0]


def test_processed_image_and_post_processing_agree_on_geometry():
    """A box drawn on an image, read back from the processed canvas, maps to the same original pixels."""
    processor = Pix2SeqImageProcessor(image_size=64)
    image = np.zeros((120, 240, 3), dtype=np.uint8)
    image[30:90, 60:180] = 255  # x 60..180, y 30..90
    canvas = processor(PIL.Image.fromarray(image))["pixel_values"][0, 0]
    ys, xs = torch.nonzero(canvas > 0.65, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32) / 64
    outputs = Pix2SeqObjectDetectionOutput(pred_boxes=box[None], pred_scores=torch.ones(1, 1), pred_labels=torch.zeros(1, 1, dtype=torch.long))
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(120, 240)])[0]
    torch.testing.assert_close(result["boxes"], torch.tensor([[60.0, 30.0, 180.0, 90.0]]), atol=4.0, rtol=0)


def test_processor_saves_and_loads_its_settings(tmp_path):
    processor = Pix2SeqImageProcessor(image_size=96, pad_value=0.5, do_normalize=True)
    processor.save_pretrained(tmp_path)
    loaded = Pix2SeqImageProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.pad_value, loaded.do_normalize) == (96, 0.5, True)
