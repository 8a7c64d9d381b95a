"""The saved folder is what users get: it must load and detect through the Auto classes and the pipeline in a fresh
process that cannot import the repository, offline."""

import json
import math

import pytest
from testing_utils import run_isolated, tiny_config

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny folder that samples as converted official folders do (greedy decoding of an untrained model finds
    nothing to check)."""
    folder = tmp_path_factory.mktemp("pix2seq-tiny")
    model = Pix2SeqForObjectDetection(tiny_config())
    model.generation_config.update(do_sample=True, top_p=0.4, top_k=0)
    model.save_pretrained(folder)
    Pix2SeqImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


def test_saved_folder_holds_code_auto_map_and_no_tokenizer(model_folder):
    files = {path.name for path in model_folder.iterdir()}
    assert {
        "configuration_pix2seq.py",
        "modeling_pix2seq.py",
        "generation_pix2seq.py",
        "tokenization_pix2seq.py",
        "image_processing_pix2seq.py",
    } <= files
    assert {"model.safetensors", "generation_config.json", "preprocessor_config.json"} <= files
    # A tokenizer that AutoTokenizer can load would send the object-detection pipeline down its LayoutLM branch.
    assert not any(name.startswith("tokenizer") for name in files)
    auto_map = json.loads((model_folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForObjectDetection"}
    processor_map = json.loads((model_folder / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoImageProcessor": "image_processing_pix2seq.Pix2SeqImageProcessor"}


def test_auto_classes_load_the_folder_in_a_fresh_offline_process(model_folder, tmp_path):
    output = run_isolated(
        """
        import torch
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection
        config = AutoConfig.from_pretrained(FOLDER, trust_remote_code=True)
        model = AutoModelForObjectDetection.from_pretrained(FOLDER, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(FOLDER, trust_remote_code=True)
        pixel_values = processor(torch.rand(3, 40, 70))["pixel_values"]
        outputs = model(pixel_values=pixel_values)
        print(config.model_type, type(model).__name__, type(base).__name__, type(processor).__name__)
        detections = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(40, 70)])
        print(tuple(outputs.sequences.shape), len(detections))
        """,
        model_folder,
        tmp_path,
    )
    assert "pix2seq Pix2SeqForObjectDetection Pix2SeqModel Pix2SeqImageProcessor" in output
    assert "(1, 20) 1" in output


def test_pipeline_detects_in_original_pixels_with_batches_of_mixed_sizes(model_folder, tmp_path):
    output = run_isolated(
        """
        import json
        import numpy as np, PIL.Image
        from transformers import pipeline
        detector = pipeline("object-detection", model=FOLDER, trust_remote_code=True)
        sizes = [(50, 80), (90, 40), (33, 33)]
        images = [PIL.Image.fromarray(np.random.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        batched = detector(images, threshold=0.0, batch_size=2)
        strict = detector(images[0], threshold=0.99)
        print(json.dumps({"batched": batched, "strict": strict, "sizes": sizes, "labels": detector.model.config.id2label}))
        """,
        model_folder,
        tmp_path,
    )
    result = json.loads(output.strip().splitlines()[-1])
    labels = set(result["labels"].values())
    assert len(result["batched"]) == 3
    assert sum(len(detections) for detections in result["batched"]) > 0
    for detections, (height, width) in zip(result["batched"], result["sizes"]):
        for detection in detections:
            assert detection["label"] in labels and 0 <= detection["score"] <= 1
            box = detection["box"]
            assert 0 <= box["xmin"] <= box["xmax"] <= width and 0 <= box["ymin"] <= box["ymax"] <= height
    # An untrained model has no confident detections.
    assert result["strict"] == []


def test_pipeline_accepts_a_model_object_and_an_image_processor(model_folder):
    import numpy as np
    import PIL.Image
    from transformers import pipeline

    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    detector = pipeline(
        "object-detection", model=model, image_processor=Pix2SeqImageProcessor.from_pretrained(model_folder)
    )
    detections = detector(PIL.Image.fromarray(np.zeros((20, 60, 3), dtype=np.uint8)), threshold=0.0)
    assert len(detections) > 0
    assert all(0 <= d["box"]["xmax"] <= 60 and 0 <= d["box"]["ymax"] <= 20 for d in detections)


def test_a_transformers_user_gets_the_conventions_a_quiet_reproducible_pipeline_and_a_loss(model_folder, tmp_path):
    """The issue's "done when", in a process that cannot import the repository, with every log captured."""
    output = run_isolated(
        """
        import json, logging, warnings
        import numpy as np, PIL.Image, torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
        from transformers.utils import logging as transformers_logging

        records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: records.append(f"{record.levelname}: {record.getMessage()[:200]}")
        transformers_logging.get_logger().addHandler(handler)
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            processor = AutoImageProcessor.from_pretrained(FOLDER, trust_remote_code=True)
            image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 255, (50, 80, 3), dtype=np.uint8))
            as_numpy = processor(image, return_tensors="np")["pixel_values"]
            small = processor(image, size={"longest_edge": 32}, return_tensors="pt")["pixel_values"]
            try:
                processor(image, do_normalise=True)
                unknown = ""
            except TypeError as error:
                unknown = str(error)
            detector = pipeline("object-detection", model=FOLDER, trust_remote_code=True)
            torch.manual_seed(1)
            first = detector(image, threshold=0.0)
            torch.manual_seed(2)
            second = detector(image, threshold=0.0)
            batched = detector([image, image], threshold=0.0, batch_size=2)
            model = AutoModelForObjectDetection.from_pretrained(FOLDER, trust_remote_code=True)
            annotations = {"image_id": 0, "annotations": [{"bbox": [10, 5, 30, 20], "category_id": 1}]}
            loss = model(**processor(images=image, annotations=annotations, return_tensors="pt")).loss
        print(json.dumps({
            "numpy": type(as_numpy).__module__, "small": list(small.shape), "unknown": unknown,
            "first": first, "second": second, "batched": len(batched), "loss": loss.item(),
            "logs": records, "warnings": [str(w.message)[:200] for w in caught],
        }))
        """,
        model_folder,
        tmp_path,
    )
    result = json.loads(output.strip().splitlines()[-1])
    assert result["numpy"] == "numpy"
    assert result["small"] == [1, 3, 32, 32]
    assert "do_normalise" in result["unknown"]
    assert result["first"] == result["second"] and len(result["first"]) > 0
    assert result["batched"] == 2
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["logs"] == [] and result["warnings"] == []
