import json
import logging
import math

import numpy as np
import PIL.Image
import pytest
import torch
from testing_utils import tiny_config
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqObjectDetectionOutput


CONFIG = tiny_config(id2label={0: "zero", 1: "one", 2: "two", 3: "three"}, num_bins=201)


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


def test_coco_annotations_become_token_targets_of_boxes_on_the_canvas():
    processor = Pix2SeqImageProcessor.from_model_config(CONFIG, size={"longest_edge": 64})
    inputs = processor(PIL.Image.new("RGB", (200, 100)), annotations=ANNOTATIONS, return_tensors="pt")
    # The padded canvas covers 200 x 200 original pixels; the crowd box is dropped, the last one clipped. The tokens
    # are y_min, x_min, y_max, x_max (200 bins: one per original pixel here), then the class.
    first = [CONFIG.coord_token_offset + round(v * 200) for v in (0.05, 0.1, 0.2, 0.3)]
    second = [CONFIG.coord_token_offset + round(v * 200) for v in (0.45, 0.95, 0.5, 1.0)]
    expected = [*first, CONFIG.class_token_offset + 3, *second, CONFIG.class_token_offset + 2]
    assert inputs["labels"][0, :10].tolist() == expected
    assert (inputs["labels"][0, 10:] == CONFIG.pad_token_id).all()
    assert inputs["decoder_input_ids"][0, :11].tolist() == [CONFIG.task_token_id, *expected]
    assert inputs["token_weights"][0, :10].tolist() == [1.0] * 10
    assert inputs["token_weights"][0, 10:].tolist() == pytest.approx([CONFIG.eos_token_weight] * 10)
    # Without augmentation the targets are the same on every call; with it they are noised and vary.
    again = processor(PIL.Image.new("RGB", (200, 100)), annotations=ANNOTATIONS, return_tensors="pt")
    assert torch.equal(again["labels"], inputs["labels"])
    augmented = [
        processor(PIL.Image.new("RGB", (200, 100)), annotations=ANNOTATIONS, do_sequence_augmentation=True)
        for _ in range(4)
    ]
    assert all((a["labels"][0, 10:] != CONFIG.pad_token_id).any() for a in augmented)
    assert len({tuple(a["decoder_input_ids"][0].tolist()) for a in augmented}) > 1


def test_a_processor_without_codec_settings_says_how_to_get_them():
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    with pytest.raises(ValueError, match="from_model_config"):
        processor(PIL.Image.new("RGB", (200, 100)), annotations=ANNOTATIONS)


def test_return_tensors_np_gives_numpy_arrays_for_pixels_and_labels():
    outputs = Pix2SeqImageProcessor.from_model_config(CONFIG, size={"longest_edge": 32})(
        [PIL.Image.new("RGB", (200, 100))], annotations=[ANNOTATIONS], return_tensors="np"
    )
    assert isinstance(outputs["pixel_values"], np.ndarray) and outputs["pixel_values"].shape == (1, 3, 32, 32)
    assert isinstance(outputs["labels"], np.ndarray) and outputs["labels"].shape == (1, CONFIG.sequence_length)


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
    """Generated tokens of canvas boxes (xyxy) and logits whose class probability is `score` (label -1: no object)."""
    processor = Pix2SeqImageProcessor.from_model_config(CONFIG)
    codec = processor.box_codec()
    tokens = codec.encode(torch.tensor(boxes), torch.tensor(labels).clamp(min=0)).reshape(len(boxes), 5)
    tokens[torch.tensor(labels) < 0, 0] = CONFIG.pad_token_id  # a slot without its coordinates
    logits = torch.zeros(len(boxes), 5, CONFIG.vocab_size)
    for index, (score, label) in enumerate(zip(scores, labels)):
        # softmax over the vocabulary: e^L / (e^L + V - 1) = score
        logits[index, 4, CONFIG.class_token_offset + max(label, 0)] = (
            math.log(score * (CONFIG.vocab_size - 1) / (1 - score)) if score else -50.0
        )
    return Pix2SeqObjectDetectionOutput(
        sequences=tokens.reshape(1, -1), logits=logits.reshape(1, -1, CONFIG.vocab_size)
    )


def test_post_processing_returns_known_boxes_in_original_pixels_of_a_non_square_image():
    processor = Pix2SeqImageProcessor.from_model_config(CONFIG, size={"longest_edge": 64})
    # An image 300 wide, 150 high: the canvas spans 300 x 300 original pixels.
    outputs = detections([[0.1, 0.2, 0.5, 0.4], [0.0, 0.6, 0.2, 0.9]], [0.9, 0.8], [1, 0])
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(150, 300)])[0]
    # The second box lies in the padding below the image (y > 150 px) and is dropped.
    torch.testing.assert_close(result["boxes"], torch.tensor([[30.0, 60.0, 150.0, 120.0]]))
    assert result["labels"].tolist() == [1] and result["scores"].tolist() == pytest.approx([0.9], abs=1e-5)


def test_post_processing_thresholds_sorts_and_drops_empty_slots():
    processor = Pix2SeqImageProcessor.from_model_config(CONFIG, size={"longest_edge": 64})
    outputs = detections(
        [[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]],
        [0.4, 0.9, 0.8, 0.7],
        [0, 1, -1, 2],
    )
    result = processor.post_process_object_detection(outputs, threshold=0.5)[0]
    assert result["scores"].tolist() == pytest.approx([0.9, 0.7], abs=1e-5)
    assert result["labels"].tolist() == [1, 2]
    everything = processor.post_process_object_detection(outputs, threshold=0.0)[0]
    assert everything["labels"].tolist() == [1, 2, 0]


def test_processed_image_and_post_processing_agree_on_geometry():
    """A box drawn on an image, read back from the processed canvas, maps to the same original pixels."""
    processor = Pix2SeqImageProcessor.from_model_config(CONFIG, size={"longest_edge": 64})
    image = np.zeros((120, 240, 3), dtype=np.uint8)
    image[30:90, 60:180] = 255  # x 60..180, y 30..90
    canvas = processor(PIL.Image.fromarray(image))["pixel_values"][0, 0]
    ys, xs = torch.nonzero(canvas > 0.65, as_tuple=True)
    box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) / 64
    outputs = detections([box.tolist()], [0.9], [0])
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


def test_codec_settings_are_saved_with_the_processor_and_folders_without_them_read_config_json(tmp_path):
    processor = Pix2SeqImageProcessor.from_model_config(CONFIG)
    processor.save_pretrained(tmp_path / "new")
    assert Pix2SeqImageProcessor.from_pretrained(tmp_path / "new").codec == processor.codec
    # A folder saved before the processor held the codec: the model's config.json beside it has the settings.
    Pix2SeqImageProcessor(size={"longest_edge": 64}).save_pretrained(tmp_path / "old")
    CONFIG.save_pretrained(tmp_path / "old")
    assert Pix2SeqImageProcessor.from_pretrained(tmp_path / "old").codec == processor.codec
