"""The command line converts an official checkpoint folder into a folder that another process loads through the Auto
classes, offline, and that reproduces the official model and serves the pipeline."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from testing_utils import TF_FIXTURES_DIR, offline_env, require_shared, run_isolated


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["vit", "resnet_c4_fullwidth"])
def converted_folder(request, tmp_path_factory):
    variant = request.param
    checkpoint_dir = require_shared(TF_FIXTURES_DIR / variant)
    output_dir = tmp_path_factory.mktemp(f"converted-{variant}")
    result = subprocess.run(
        [
            sys.executable,
            "convert_pix2seq_tf_checkpoint.py",
            "--checkpoint_dir",
            str(checkpoint_dir),
            "--output_dir",
            str(output_dir),
        ],
        cwd=REPOSITORY,
        env=offline_env(output_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return variant, output_dir


def test_converted_folder_is_complete(converted_folder):
    _, folder = converted_folder
    files = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "README.md",
        "configuration_pix2seq.py",
        "modeling_pix2seq.py",
        "tokenization_pix2seq.py",
        "image_processing_pix2seq.py",
    } <= files
    assert "tf_checkpoint_reader.py" not in files
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"]["1"] == "person" and config["id2label"]["90"] == "toothbrush"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["do_sample"] and generation["top_p"] == 0.4 and generation["use_grammar"] is False
    assert generation["max_new_tokens"] == 5 * config["max_instances"]
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"longest_edge": config["image_size"]} and processor["do_normalize"] is False
    assert "Converted from the official Pix2Seq TensorFlow checkpoint" in (folder / "README.md").read_text()


def test_another_process_loads_it_and_reproduces_the_official_model(converted_folder, tmp_path):
    variant, folder = converted_folder
    script = textwrap.dedent(
        """
        import json
        import numpy as np, PIL.Image, torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
        folder, reference = FOLDER, np.load(sys.argv[2])
        model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        pixel_values = torch.from_numpy(reference["images"]).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits = model(pixel_values=pixel_values, decoder_input_ids=torch.from_numpy(reference["seq"])).logits
            greedy = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=10)
            model.generation_config.do_sample = False
            detected = model(pixel_values=pixel_values).sequences
        detector = pipeline("object-detection", model=folder, trust_remote_code=True)
        image = PIL.Image.fromarray((reference["images"][0] * 255).astype(np.uint8)).resize((90, 50))
        print(json.dumps({
            "logits_diff": float((logits - torch.from_numpy(reference["logits"])).abs().max()),
            "greedy": greedy[:, 1:].tolist(),
            "detected": detected[:, :10].tolist(),
            "official": reference["pred_seq"].tolist(),
            "processor": type(processor).__name__,
            "detections": detector(image, threshold=0.0),
        }))
        """
    )
    reference = require_shared(TF_FIXTURES_DIR / f"{variant}_reference.npz")
    stdout = run_isolated(script, folder, tmp_path, reference)
    outputs = json.loads(stdout.strip().splitlines()[-1])
    assert outputs["logits_diff"] < 1e-4
    # The saved `use_grammar: false` is what `generate()` and the pipeline's path (`forward` -> `detect`) decode with.
    assert outputs["greedy"] == outputs["official"]
    assert outputs["detected"] == outputs["official"]
    assert outputs["processor"] == "Pix2SeqImageProcessor"
    assert isinstance(outputs["detections"], list)
    for detection in outputs["detections"]:
        assert set(detection) == {"score", "label", "box"} and 0 <= detection["box"]["xmax"] <= 90
