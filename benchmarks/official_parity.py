"""
Parity of converted official checkpoints with the official TF model, on every fixture of
`../shared/reference/pix2seq_tf_fixtures` (tiny models of each family, random weights): max |diff| of the encoder
output, the projected encoding and the teacher-forced logits, greedy-token equality, the reader's time to read every
tensor, the conversion's time, and the official preprocessing's max |diff|. Prints a table and writes JSON.

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
from testing_utils import TF_FIXTURES_DIR  # noqa: E402

from conversion.tf_checkpoint_reader import TFCheckpointReader  # noqa: E402
from convert_pix2seq_tf_checkpoint import convert  # noqa: E402
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
        encoder_output, _ = model.model.encoder.encode(pixel_values)
        encoded = model.model.encoder(pixel_values).last_hidden_state
        logits = model(pixel_values=pixel_values, decoder_input_ids=ref["seq"]).logits
        greedy = model.generate(pixel_values=pixel_values, do_sample=False, max_new_tokens=10, use_grammar=False)
    return {
        "fixture": variant,
        "encoder_output": max_diff(encoder_output, ref["encoder_output"]),
        "encoded": max_diff(encoded, ref["encoded"]),
        "logits": max_diff(logits, ref["logits"]),
        "greedy_equal": bool(torch.equal(greedy[:, 1:], ref["pred_seq"])),
        "tensors": len(reader),
        "reader_s": reader_seconds,
        "convert_s": convert_seconds,
    }


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
    with open(args.output, "w") as file:
        json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
