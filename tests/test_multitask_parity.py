"""The tiny official multi-task (Pix2Seq v2) checkpoint converts with its four tasks, and the converted model computes
what the official model computes for each task's prompt: teacher-forced logits and greedy tokens
(`../shared/reference/pix2seq_v2_fixtures`, made with the official code)."""

import json
import shutil

import numpy as np
import pytest
import torch
from testing_utils import OFFICIAL_MULTITASK_TASKS, SHARED_DIR, require_shared, run_isolated

import convert_pix2seq_tf_checkpoint as converter
from modeling_pix2seq import Pix2SeqForObjectDetection


V2_FIXTURES = SHARED_DIR / "reference" / "pix2seq_v2_fixtures"
TOLERANCE = 1e-4


def checkpoint_copy(destination, config_file=None):
    """The fixture's checkpoint files in `destination`, with `config_file` as its `config.json` (none if `None`)."""
    source = require_shared(V2_FIXTURES / "multitask_vit")
    destination.mkdir(parents=True)
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001", "checkpoint"):
        shutil.copyfile(source / name, destination / name)
    if config_file is not None:
        shutil.copyfile(source / config_file, destination / "config.json")
    return destination


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The fixture converted with the documented command (its `config.json`, today's official layout)."""
    require_shared(V2_FIXTURES / "multitask_vit")
    output = tmp_path_factory.mktemp("converted") / "pix2seq-multitask"
    converter.main(["--checkpoint_dir", str(V2_FIXTURES / "multitask_vit"), "--output_dir", str(output)])
    return output


@pytest.fixture(scope="module")
def model(folder):
    return Pix2SeqForObjectDetection.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def reference():
    data = np.load(require_shared(V2_FIXTURES / "multitask_vit_reference.npz"))
    return {name: torch.from_numpy(data[name]) for name in data.files}


def pixels(images):
    return images.permute(0, 3, 1, 2)  # the official images are channels last


def test_the_converted_config_holds_the_vocabulary_layout_and_every_task(folder):
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["text_token_offset"], config["task_token_id"]) == (35000, 3000, 10)
    assert (config["polygon_separator_token_id"], config["invisible_keypoint_token_id"]) == (40, 41)
    assert (config["coord_token_offset"], config["num_bins"]) == (1000, 1000)
    assert config["tasks"] == OFFICIAL_MULTITASK_TASKS
    # Detection decodes as on a detection-only folder: the official detection decoding in the generation config.
    generation = json.loads((folder / "generation_config.json").read_text())
    assert {key: generation[key] for key in ("do_sample", "top_p", "top_k", "max_new_tokens", "use_grammar")} == {
        "do_sample": True,
        "top_p": 0.4,
        "top_k": 0,
        "max_new_tokens": 500,
        "use_grammar": False,
    }
    assert "instance_segmentation" in (folder / "README.md").read_text()


def test_the_nov_2022_layout_given_with_config_converts_to_the_same_folder(folder, tmp_path):
    checkpoint = checkpoint_copy(tmp_path / "multitask_vit")
    converter.main(
        [
            "--checkpoint_dir",
            str(checkpoint),
            "--config",
            str(V2_FIXTURES / "multitask_vit" / "config_nov2022.json"),
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
        assert json.loads((tmp_path / "out" / name).read_text()) == json.loads((folder / name).read_text()), name
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_an_unknown_task_in_a_multi_task_configuration_is_refused_naming_it(tmp_path, capsys):
    checkpoint = checkpoint_copy(tmp_path / "multitask_vit", "config.json")
    official = json.loads((checkpoint / "config.json").read_text())
    official["tasks"][3]["name"] = "panoptic_segmentation"
    (checkpoint / "config.json").write_text(json.dumps(official))
    with pytest.raises(SystemExit) as exit_info:
        converter.main(["--checkpoint_dir", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in message
    assert "config.json: the run's tasks ['panoptic_segmentation'] are not supported" in message


# (task, teacher-forced input); instance segmentation's input is rank 3, (image, instance, length).
TEACHER_FORCED = [("det", "det_seq"), ("seg", "seg_seq"), ("kp", "kp_seq"), ("cap", "cap_seq")]


@pytest.mark.parametrize("task, sequence", TEACHER_FORCED)
def test_teacher_forced_logits_of_every_task_match_the_official_model(model, reference, task, sequence):
    with torch.no_grad():
        logits = model(pixel_values=pixels(reference["images"]), decoder_input_ids=reference[sequence]).logits
    columns = reference["logits_columns"]
    assert logits.shape[:2] == reference[f"{task}_logits_lse"].shape
    assert float((logits[..., columns] - reference[f"{task}_logits_sub"]).abs().max()) < TOLERANCE
    assert float((logits.logsumexp(dim=-1) - reference[f"{task}_logits_lse"]).abs().max()) < TOLERANCE
    assert torch.equal(logits.argmax(dim=-1), reference[f"{task}_logits_argmax"])
    if task == "det":  # stored over the whole vocabulary
        assert float((logits - reference["det_logits"]).abs().max()) < TOLERANCE


def greedy_case(reference, case):
    """(pixel_values, prompts, num_samples, official greedy tokens) of a greedy fixture."""
    images = pixels(reference["images"])
    return {
        "det": (images, torch.full((2, 1), 10), 1, reference["det_pred_seq"]),
        "seg": (images, reference["seg_prompt"], 2, reference["seg_pred_seq"]),
        "kp": (images, reference["kp_seq"][..., :6], 1, reference["kp_raw_pred_seq"]),
        "kpe2e": (pixels(reference["kpe2e_images"]), reference["kpe2e_prompt"], 1, reference["kpe2e_raw_pred_seq"]),
        "cap": (images, torch.full((2, 1), 13), 1, reference["cap_pred_seq"]),
    }[case]


GREEDY = ["det", "seg", "kp", "kpe2e", "cap"]
# The name of each case's arrays in the fixture (keypoints: before the invisible-token re-draw).
PREFIX = {"det": "det", "seg": "seg", "kp": "kp_raw", "kpe2e": "kpe2e_raw", "cap": "cap"}
TASK_OF = {"det": None, "seg": "instance_segmentation", "kp": "keypoint_detection", "kpe2e": "keypoint_detection"}
TASK_OF["cap"] = "captioning"


@pytest.mark.parametrize("case", GREEDY)
def test_the_official_greedy_tokens_are_the_argmax_after_each_of_them(model, reference, case):
    """Over every official greedy token (500 for detection, 256 x 8 rows for segmentation, 511 for captioning): the
    converted model, fed the official prompt and tokens, puts each next official token first, with its logit."""
    pixel_values, prompts, samples, expected = greedy_case(reference, case)
    rows = prompts.reshape(prompts.shape[0], -1, prompts.shape[-1]).repeat_interleave(samples, dim=1)
    tokens = expected.reshape(rows.shape[0], rows.shape[1], -1)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=torch.cat([rows, tokens[..., :-1]], -1)).logits
    step_logits = logits[:, rows.shape[-1] - 1 :]  # (rows, new tokens, vocabulary)
    assert torch.equal(step_logits.argmax(dim=-1), expected)
    emitted = step_logits.gather(-1, expected.unsqueeze(-1)).squeeze(-1)
    assert float((emitted - reference[f"{PREFIX[case]}_pred_logit"]).abs().max()) < TOLERANCE
    assert float((step_logits.logsumexp(dim=-1) - reference[f"{PREFIX[case]}_pred_lse"]).abs().max()) < TOLERANCE


# Tokens generated per case in the default suite (all of them with `-m slow`): enough to cross several objects,
# polygon points and words, in a few seconds.
SHORT = {"det": 30, "seg": 20, "kp": 34, "kpe2e": 34, "cap": 30}


def generate_greedy(model, reference, case, max_new_tokens=None):
    pixel_values, prompts, samples, expected = greedy_case(reference, case)
    new_tokens = max_new_tokens or expected.shape[1]
    with torch.no_grad():
        generated = model.detect(
            pixel_values,
            task=TASK_OF[case],
            decoder_input_ids=None if case in ("det", "cap") else prompts,
            num_samples=samples,
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=None,  # the official decoding never stops early
        )
    return generated, expected[:, :new_tokens]


@pytest.mark.parametrize("case", GREEDY)
def test_greedy_generation_of_every_task_gives_the_official_tokens(model, reference, case):
    generated, expected = generate_greedy(model, reference, case, SHORT[case])
    assert torch.equal(generated.sequences, expected)
    first_steps = generated.logits[:, :3]
    official = reference[f"{PREFIX[case]}_pred_logits_first3"]
    if case == "seg":  # stored for rows 0, 2, 4, 6
        first_steps = first_steps[::2]
    assert float((first_steps - official).abs().max()) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("case", ["det", "seg", "cap"])
def test_greedy_generation_gives_every_official_token(model, reference, case):
    generated, expected = generate_greedy(model, reference, case)
    assert torch.equal(generated.sequences, expected)


def official_pipeline_detections(reference, index, id2label, slots):
    """
    The official greedy detections of image `index` (its first `slots` objects) as the object-detection pipeline
    reports them (this project's documented post-processing): boxes in original pixels with their corners in order,
    clipped to the image and rounded; objects with a non-coordinate token among their 4 coordinates (the official
    decoding reads any token as a coordinate), empty boxes and classes without a name dropped.
    """
    height, width = reference[f"orig_image_{index}"].shape[:2]
    coordinates = reference["det_pred_seq"][index][: 5 * slots].reshape(slots, 5)[:, :4]
    detections = []
    for box, label, score, tokens in zip(
        reference["det_pred_boxes_rescaled"][index][:slots].tolist(),
        reference["det_pred_classes"][index][:slots].tolist(),
        reference["det_pred_scores"][index][:slots].tolist(),
        coordinates.tolist(),
    ):
        (ymin, ymax), (xmin, xmax) = sorted(box[0::2]), sorted(box[1::2])
        xmin, xmax = (round(min(max(value, 0), width)) for value in (xmin, xmax))
        ymin, ymax = (round(min(max(value, 0), height)) for value in (ymin, ymax))
        is_object = all(1000 <= token < 2000 for token in tokens)
        if is_object and label in id2label and xmax > xmin and ymax > ymin:
            box = {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}
            detections.append({"score": score, "label": id2label[label], "box": box})
    return sorted(detections, key=lambda detection: -detection["score"])


ISOLATED_SCRIPT = """
import json
import numpy as np
import PIL.Image
import torch
from transformers import AutoModelForObjectDetection, pipeline

reference = np.load(sys.argv[2])
model = AutoModelForObjectDetection.from_pretrained(FOLDER, trust_remote_code=True).eval()
pixel_values = torch.from_numpy(reference["images"]).permute(0, 3, 1, 2)
with torch.no_grad():
    logits = model(pixel_values=pixel_values, decoder_input_ids=torch.from_numpy(reference["seg_seq"])).logits
    keypoints = model.generate(
        pixel_values, task="keypoint_detection", decoder_input_ids=torch.from_numpy(reference["kp_seq"][..., :6]),
        do_sample=False,
    )
columns = reference["logits_columns"]
detector = pipeline("object-detection", model=FOLDER, trust_remote_code=True)
generation = detector.model.generation_config.to_dict()
# Greedy, as the reference was decoded, over the first 10 objects.
detector.model.generation_config.update(do_sample=False, max_new_tokens=50)
greedy = [detector(PIL.Image.fromarray(reference[f"orig_image_{i}"]), threshold=0.0) for i in range(2)]
print(json.dumps({
    "class": type(model).__name__,
    "seg_logits_diff": float(np.abs(logits[..., columns].numpy() - reference["seg_logits_sub"]).max()),
    "keypoint_tokens": keypoints[:, 6:].tolist(),
    "generation": {key: generation[key] for key in ("do_sample", "top_p", "max_new_tokens", "use_grammar")},
    "greedy": greedy,
}))
"""


def test_the_folder_serves_the_auto_class_and_the_detection_pipeline_from_another_process(folder, tmp_path):
    reference_file = require_shared(V2_FIXTURES / "multitask_vit_reference.npz")
    result = json.loads(run_isolated(ISOLATED_SCRIPT, folder, tmp_path, reference_file).splitlines()[-1])
    reference = np.load(reference_file)
    assert result["class"] == "Pix2SeqForObjectDetection"
    assert result["seg_logits_diff"] < TOLERANCE
    assert result["keypoint_tokens"] == reference["kp_raw_pred_seq"].tolist()
    id2label = {
        int(index): name for index, name in json.loads((folder / "config.json").read_text())["id2label"].items()
    }
    for index in range(2):
        expected = official_pipeline_detections(reference, index, id2label, slots=10)
        assert expected, "the first objects should hold a named, non-empty box"
        got = result["greedy"][index]
        assert [(d["label"], d["box"]) for d in got] == [(d["label"], d["box"]) for d in expected]
        assert np.allclose([d["score"] for d in got], [d["score"] for d in expected], atol=TOLERANCE)
    # Unless told otherwise, the pipeline decodes as the official detection evaluation, as on a detection folder.
    assert result["generation"] == {"do_sample": True, "top_p": 0.4, "max_new_tokens": 500, "use_grammar": False}
