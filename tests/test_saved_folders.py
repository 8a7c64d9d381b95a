"""Folders saved before the processor owned the codec still load, and compute what they computed then."""

import json
import shutil
from pathlib import Path

import PIL.Image
import torch
from testing_utils import REMOTE_CODE_FILES
from transformers import pipeline

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


# Saved by commit d618524 (the model owned the tokenizer; the processor held no codec settings): a tiny model with
# the ViT patch stem, fitted for 60 AdamW steps to one token sequence so that it writes two different boxes, its
# processor, and what that code computed with them (`expected_outputs.json`). The remote-code files are left out:
# the folder is loaded with this repository's classes.
FOLDER = Path(__file__).parent / "fixtures" / "saved_d618524"
REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED = json.loads((FOLDER / "expected_outputs.json").read_text())


def image():
    return (torch.arange(3 * 40 * 56).reshape(3, 40, 56) * 7 % 256).to(torch.uint8)


def test_a_folder_saved_before_detects_what_it_detected_then():
    model = Pix2SeqForObjectDetection.from_pretrained(FOLDER).eval()
    processor = Pix2SeqImageProcessor.from_pretrained(FOLDER)
    outputs = model(**processor(image(), return_tensors="pt"))
    assert outputs.sequences.tolist() == EXPECTED["sequences"]
    (result,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(40, 56)])
    expected = EXPECTED["detections"]
    assert len(expected["scores"]) == 2
    assert result["labels"].tolist() == expected["labels"]
    torch.testing.assert_close(result["boxes"], torch.tensor(expected["boxes"]))
    torch.testing.assert_close(result["scores"], torch.tensor(expected["scores"]))


def test_a_folder_saved_before_gives_the_same_teacher_forced_loss():
    model = Pix2SeqForObjectDetection.from_pretrained(FOLDER).eval()
    processor = Pix2SeqImageProcessor.from_pretrained(FOLDER)
    tokens = {key: torch.tensor(value) for key, value in EXPECTED["teacher_forcing"].items() if key != "loss"}
    loss = model(**processor(image(), return_tensors="pt"), **tokens).loss
    assert loss.item() == torch.tensor(EXPECTED["teacher_forcing"]["loss"]).item()


def test_a_folder_saved_before_serves_the_object_detection_pipeline_with_todays_code(tmp_path):
    folder = shutil.copytree(FOLDER, tmp_path / "model")
    for name in REMOTE_CODE_FILES:
        shutil.copy(REPO_ROOT / name, folder / name)
    detector = pipeline("object-detection", model=str(folder), trust_remote_code=True)
    detections = detector(PIL.Image.fromarray(image().permute(1, 2, 0).numpy()), threshold=0.0)
    assert [d["label"] for d in detections] == ["circle", "square"]
    # Today's configuration code names Pix2Seq's own pipeline, which rounds boxes to whole pixels (transformers'
    # class truncates them: ymin 3, ymax 19).
    assert type(detector).__name__ == "Pix2SeqObjectDetectionPipeline"
    assert detections[0]["box"] == {"xmin": 9, "ymin": 4, "xmax": 23, "ymax": 20}
