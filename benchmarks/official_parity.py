"""
Parity of converted official checkpoints with the official TF model, on every fixture of
`../shared/reference/pix2seq_tf_fixtures` (tiny models of each family, random weights): max |diff| of the encoder
output, the projected encoding and the teacher-forced logits (from today's `config.json` layout and from the 2022
release's `config_2022.json`), greedy-token equality, the reader's time to read every tensor (crc32c checked), the
conversion's time, and the official preprocessing's max |diff|. The multi-task (Pix2Seq v2) fixture of
`../shared/reference/pix2seq_v2_fixtures` likewise, per task: the teacher-forced logits' max |diff| (the stored columns
and the log-sum-exp over the whole vocabulary) and whether greedy generation gives every official token, with the
conversion's time. Then, for every released folder
(`released_configs_2022/`), the command that converts it and what the converter builds from its likely `config.json`
against the family's full-size key list, on the meta device: family, image size, parameters, labels. Prints tables
and writes JSON.

    python benchmarks/official_parity.py --output benchmarks/official_parity.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_convert_parity import FIXTURES, official_model, reference  # noqa: E402
from testing_utils import SHARED_DIR, TF_FIXTURES_DIR  # noqa: E402

from conversion.tf_checkpoint_reader import TFCheckpointReader  # noqa: E402
from convert_pix2seq_tf_checkpoint import (  # noqa: E402
    check_settings_against_checkpoint,
    config_from_official,
    convert,
    dataset_kind,
    default_id2label,
    map_checkpoint_keys,
    meta_model,
    released_family,
)
from image_processing_pix2seq import Pix2SeqImageProcessor  # noqa: E402


def max_diff(actual, expected):
    return float((actual - expected).abs().max())


def measure(variant):
    start = time.perf_counter()
    reader = TFCheckpointReader(TF_FIXTURES_DIR / variant / "ckpt-1")
    for key in reader.keys():
        reader.read(key)
    reader_seconds = time.perf_counter() - start
    convert_seconds = None
    if variant in ("vit", "resnet_c4_fullwidth"):  # width 1: the command line converts them as released
        with tempfile.TemporaryDirectory() as output_dir:
            start = time.perf_counter()
            model = convert(TF_FIXTURES_DIR / variant, output_dir)
            convert_seconds = time.perf_counter() - start
    else:
        model = official_model(variant)
    ref = reference(variant)
    pixel_values = ref["images"].permute(0, 3, 1, 2)
    with torch.no_grad():
        logits_2022 = official_model(variant, "config_2022.json")(
            pixel_values=pixel_values, decoder_input_ids=ref["seq"]
        ).logits
        encoder_output, _ = model.model.encoder.encode(pixel_values)
        encoded = model.model.encoder(pixel_values).last_hidden_state
        logits = model(pixel_values=pixel_values, decoder_input_ids=ref["seq"]).logits
        greedy = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=10, use_grammar=False)
    return {
        "fixture": variant,
        "encoder_output": max_diff(encoder_output, ref["encoder_output"]),
        "encoded": max_diff(encoded, ref["encoded"]),
        "logits": max_diff(logits, ref["logits"]),
        "logits_from_config_2022": max_diff(logits_2022, ref["logits"]),
        "greedy_equal": bool(torch.equal(greedy[:, 1:], ref["pred_seq"])),
        "tensors": len(reader),
        "reader_s": reader_seconds,
        "convert_s": convert_seconds,
    }


V2_FIXTURES = SHARED_DIR / "reference" / "pix2seq_v2_fixtures"
# Per task: its name, the teacher-forced input and the greedy case (prompts, samples per prompt, official tokens).
MULTITASK_CASES = [
    ("object_detection", "det", "det_seq", "det", None, 1),
    ("instance_segmentation", "seg", "seg_seq", "seg", "seg_prompt", 2),
    ("keypoint_detection", "kp", "kp_seq", "kp_raw", "kp_prompt", 1),
    ("keypoint_detection (crops)", None, None, "kpe2e_raw", "kpe2e_prompt", 1),
    ("captioning", "cap", "cap_seq", "cap", None, 1),
]


def measure_multitask():
    """The multi-task fixture converted by the command line's `convert`, compared with the official model per task."""
    data = np.load(V2_FIXTURES / "multitask_vit_reference.npz")
    ref = {name: torch.from_numpy(data[name]) for name in data.files}
    ref["kp_prompt"] = ref["kp_seq"][..., :6]
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        model = convert(V2_FIXTURES / "multitask_vit", output_dir)
        convert_seconds = time.perf_counter() - start
    model.eval()
    columns = ref["logits_columns"]
    rows = []
    for task, logits_name, sequence, greedy_name, prompt, samples in MULTITASK_CASES:
        images = ref["kpe2e_images" if greedy_name == "kpe2e_raw" else "images"].permute(0, 3, 1, 2)
        row = {"task": task}
        with torch.no_grad():
            if logits_name is not None:
                logits = model(pixel_values=images, decoder_input_ids=ref[sequence]).logits
                row["logits"] = max_diff(logits[..., columns], ref[f"{logits_name}_logits_sub"])
                row["logsumexp"] = max_diff(logits.logsumexp(dim=-1), ref[f"{logits_name}_logits_lse"])
            expected = ref[f"{greedy_name}_pred_seq"]
            start = time.perf_counter()
            generated = model.detect(
                images,
                task=task.split(" ")[0],
                decoder_input_ids=None if prompt is None else ref[prompt],
                num_samples=samples,
                do_sample=False,
                max_new_tokens=expected.shape[1],
                eos_token_id=None,
            )
            row["greedy_s"] = time.perf_counter() - start
        row["greedy_tokens"] = list(expected.shape)
        row["greedy_equal"] = bool(torch.equal(generated.sequences, expected))
        rows.append(row)
    return {"convert_s": convert_seconds, "tasks": rows}


def released_table():
    """For every folder of `released_configs_2022/`: the command and what the converter builds (meta device)."""
    released_dir = TF_FIXTURES_DIR / "released_configs_2022"
    key_lists = {"resnet_": "resnet", "resnetc_": "resnet-c", "vit_b_": "vit-b", "vit_l_": "vit-l"}
    rows = []
    for config_path in sorted(released_dir.glob("*/*/config.json")):
        folder = config_path.parent.relative_to(released_dir)
        official = json.loads(config_path.read_text())
        prefix = max((prefix for prefix in key_lists if folder.name.startswith(prefix)), key=len)
        shapes = {}
        for line in (TF_FIXTURES_DIR / "full_size_variables" / f"{key_lists[prefix]}_variables.txt").open():
            name, shape = line.rstrip("\n").split("\t")
            shapes[name] = tuple(json.loads(shape))
        vocab_size = official["model"]["vocab_size"]
        for key in ("model/decoder/ar_decoder.Stoken_embedding", "model/decoder/ar_decoder.Soutp_bias"):
            key += "/.ATTRIBUTES/VARIABLE_VALUE"
            shapes[key] = (vocab_size, *shapes[key][1:])
        check_settings_against_checkpoint(official["model"], shapes, config_path)
        config = config_from_official(official, default_id2label(official, folder=folder), config_path)
        model = meta_model(config)
        map_checkpoint_keys(shapes, model)
        kind = dataset_kind(official, folder)
        multi_task = folder.parts[0] == "multi_task"
        # The multi-task folders are `multi_task/ckpt/...` in the bucket; their config comes with --config (README).
        bucket_path = f"multi_task/ckpt/{folder.name}" if multi_task else str(folder)
        command = f"python convert_pix2seq_tf_checkpoint.py --checkpoint_dir gs://pix2seq/{bucket_path} "
        command += f"--output_dir pix2seq-{folder.parts[0].split('_')[0]}-{folder.name.replace('_', '-')}"
        if multi_task:
            command += f" --config multi_task_{folder.name}.json"
        rows.append(
            {
                "folder": bucket_path,
                "command": command,
                "family": released_family(official),
                "image_size": config.image_size,
                "parameters": sum(parameter.numel() for parameter in model.parameters()),
                "vocab_size": vocab_size,
                "labels": f"{len(config.id2label)} {'COCO names' if kind == 'coco' else 'numbered (LABEL_n)'}",
                "prompt": config.task_token_id,
                "tasks": list(config.tasks or ["object_detection"]),
            }
        )
    return rows


def preprocessing_diff():
    data = np.load(TF_FIXTURES_DIR / "preprocess_reference.npz")
    worst = 0.0
    for canvas in (96, 100, 128):
        processor = Pix2SeqImageProcessor(size={"longest_edge": canvas}, do_normalize=False)
        for index in range(5):
            pixel_values = processor(data[f"in_{canvas}_{index}"], return_tensors="pt")["pixel_values"][0]
            expected = torch.from_numpy(data[f"out_{canvas}_{index}"]).permute(2, 0, 1)
            worst = max(worst, max_diff(pixel_values, expected))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "official_parity.json"))
    args = parser.parse_args()
    rows = [measure(variant) for variant in FIXTURES]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "fixtures": rows,
        "preprocessing_max_diff": preprocessing_diff(),
        "multitask": measure_multitask(),
        "released": released_table(),
    }
    header = f"{'fixture':<20} {'encoder out':>11} {'encoded':>9} {'logits':>9} {'greedy':>6} "
    header += f"{'reader s':>8} {'convert s':>9}"
    print(header)
    for row in rows:
        convert_seconds = f"{row['convert_s']:.2f}" if row["convert_s"] is not None else "-"
        print(
            f"{row['fixture']:<20} {row['encoder_output']:>11.1e} {row['encoded']:>9.1e} {row['logits']:>9.1e} "
            f"{str(row['greedy_equal']):>6} {row['reader_s']:>8.3f} {convert_seconds:>9}"
        )
    print(f"official preprocessing, 15 cases: max |diff| {result['preprocessing_max_diff']:.1e}")
    print(
        "logits from config_2022.json: max |diff| "
        + ", ".join(f"{row['fixture']} {row['logits_from_config_2022']:.1e}" for row in rows)
    )
    multitask = result["multitask"]
    print()
    print(f"multi-task fixture (converted in {multitask['convert_s']:.2f} s)")
    print(f"{'task':<28} {'logits':>9} {'logsumexp':>9} {'greedy tokens':>14} {'equal':>6} {'greedy s':>8}")
    for row in multitask["tasks"]:
        logits = f"{row['logits']:.1e}" if "logits" in row else "-"
        logsumexp = f"{row['logsumexp']:.1e}" if "logsumexp" in row else "-"
        tokens = "x".join(map(str, row["greedy_tokens"]))
        print(
            f"{row['task']:<28} {logits:>9} {logsumexp:>9} {tokens:>14} {str(row['greedy_equal']):>6} "
            f"{row['greedy_s']:>8.1f}"
        )
    print()
    print("| released folder | command | family | image size | parameters | labels |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in result["released"]:
        print(
            f"| `{row['folder']}` | `{row['command']}` | {row['family']} | {row['image_size']} | "
            f"{row['parameters']:,} | {row['labels']} (prompt {row['prompt']}, vocabulary {row['vocab_size']}) |"
        )
    with open(args.output, "w") as file:
        json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
