"""
`pipeline("object-detection", model=folder, trust_remote_code=True)` builds Pix2Seq's own pipeline class (the
folder's `custom_pipelines`): 16-bit images reach the processor unconverted, boxes without area are dropped, a
threshold that is no number in [0, 1] is refused by name and an empty batch gives an empty list.
"""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from testing_utils import run_isolated, tiny_config
from transformers import pipeline

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection, Pix2SeqObjectDetectionOutput


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny folder that samples, as converted official folders do, so that an untrained model finds boxes."""
    folder = tmp_path_factory.mktemp("pix2seq-pipeline")
    model = Pix2SeqForObjectDetection(tiny_config())
    model.generation_config.update(do_sample=True, top_p=0.4, top_k=0)
    model.save_pretrained(folder)
    Pix2SeqImageProcessor(size={"longest_edge": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detector(model_folder):
    return pipeline("object-detection", model=str(model_folder), trust_remote_code=True)


def dark_sixteen_bit_png(path):
    """A 16-bit grayscale PNG whose values (500 to 9500 of 65535) all lie above 255: 8-bit reading saturates it."""
    values = (np.arange(48 * 40).reshape(40, 48) * 7 % 9000 + 500).astype(np.uint16)
    PIL.Image.fromarray(values).save(path)
    assert PIL.Image.open(path).mode == "I;16"
    return path


def test_saved_folder_names_the_pix2seq_pipeline_and_ships_its_code(model_folder, detector):
    config = json.loads((model_folder / "config.json").read_text())
    assert config["custom_pipelines"]["object-detection"]["impl"] == "pipeline_pix2seq.Pix2SeqObjectDetectionPipeline"
    assert (model_folder / "pipeline_pix2seq.py").is_file()
    assert type(detector).__name__ == "Pix2SeqObjectDetectionPipeline"


def test_a_sixteen_bit_png_gives_the_pipeline_the_processors_pixels(detector, model_folder, tmp_path):
    path = dark_sixteen_bit_png(tmp_path / "dark.png")
    processor = Pix2SeqImageProcessor.from_pretrained(model_folder)
    expected = processor(str(path), return_tensors="pt")["pixel_values"]
    for image in (str(path), PIL.Image.open(path)):
        pixels = detector.preprocess(image)["pixel_values"]
        torch.testing.assert_close(pixels, expected)
    # Read as 8 bits, every value above 255 would be white; the image is dark.
    assert pixels[0, :, :40, :48].mean() < 0.2
    assert detector(str(path), threshold=0.0) == detector(PIL.Image.open(path), threshold=0.0)


def test_a_one_pixel_image_gives_no_box_without_area(detector):
    detections = detector(PIL.Image.new("RGB", (1, 1), (120, 30, 200)), threshold=0.0)
    for detection in detections:
        box = detection["box"]
        assert 0 <= box["xmin"] < box["xmax"] <= 1 and 0 <= box["ymin"] < box["ymax"] <= 1


def test_boxes_are_rounded_to_whole_pixels_and_those_left_without_area_dropped(detector):
    # A 1 x 1 image: canvas boxes scale by 1 pixel. The first covers most of the pixel, the second a sliver of it.
    codec = detector.image_processor.box_codec()
    sequences = codec.encode([[0.1, 0.2, 0.9, 0.8], [0.1, 0.1, 0.3, 0.4]], [0, 1]).unsqueeze(0)  # (1, 10)
    vocab_size = detector.model.config.vocab_size
    logits = torch.zeros(1, 10, vocab_size)
    for position, (token, probability) in enumerate(zip(sequences[0, 4::5].tolist(), (0.9, 0.8))):
        # The class token's softmax probability over the whole vocabulary is the detection's score.
        logits[0, 5 * position + 4, token] = math.log(probability * (vocab_size - 1) / (1 - probability))
    outputs = Pix2SeqObjectDetectionOutput(sequences=sequences, logits=logits)
    outputs["target_size"] = torch.IntTensor([[1, 1]])
    detections = detector.postprocess(outputs, threshold=0.5)
    whole_pixel = {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}
    assert detections == [{"score": pytest.approx(0.9, abs=1e-4), "label": "circle", "box": whole_pixel}]


@pytest.mark.parametrize("images", [[], ()])
def test_an_empty_batch_gives_an_empty_list(detector, images):
    assert detector(images) == []
    assert detector(images, threshold=0.3) == []


@pytest.mark.parametrize("threshold", [-1, 2, math.nan, math.inf, -0.01])
def test_a_threshold_outside_zero_to_one_is_refused_by_name(detector, threshold):
    with pytest.raises(ValueError, match=r"threshold must be a number from 0 to 1"):
        detector(PIL.Image.new("RGB", (40, 30)), threshold=threshold)
    with pytest.raises(ValueError, match=r"threshold must be a number from 0 to 1"):
        detector([], threshold=threshold)


@pytest.mark.parametrize("threshold", ["0.5", None, True, [0.5]])
def test_a_threshold_that_is_not_a_number_is_refused_by_name(detector, threshold):
    with pytest.raises(TypeError, match=r"threshold must be a number from 0 to 1, got"):
        detector(PIL.Image.new("RGB", (40, 30)), threshold=threshold)


@pytest.mark.parametrize("threshold", [0, 0.0, 1, np.float32(0.5)])
def test_thresholds_from_zero_to_one_are_accepted(detector, threshold):
    assert isinstance(detector(PIL.Image.new("RGB", (40, 30)), threshold=threshold), list)


def test_the_saved_folder_builds_its_pipeline_in_a_fresh_offline_process(model_folder, tmp_path):
    path = dark_sixteen_bit_png(tmp_path / "dark.png")
    script = """
        from transformers import pipeline
        detector = pipeline("object-detection", model=FOLDER, trust_remote_code=True)
        print(type(detector).__name__, round(float(detector.preprocess(sys.argv[2])["pixel_values"].mean()), 3))
        print(detector([]))
        """
    stdout = run_isolated(script, model_folder, tmp_path, path)
    name, mean = stdout.split()[:2]
    assert name == "Pix2SeqObjectDetectionPipeline" and float(mean) < 0.5
    assert stdout.splitlines()[1] == "[]"
