"""
What a CPU decode step's matrix products cost, and what the ways to make them cheaper would change.

A decode step of the released ResNet-50 (batch 2) runs 37 matrix products of 2 rows by the decoder's weights (each
layer's fused query/key/value projection, the self-attention output, the cross-attention query and output, the two
MLP layers; then the output layer). This script takes those very weights (random, seed 0, the official sizes) and
times, for the 37 products in turn as one step runs them:

- `F.linear(x, W, b)`, as the model runs them (the reference numbers);
- other ways to compute the same products in fp32: a pre-transposed weight (`addmm(b, x, W^T contiguous)`), the
  weight first (`weight_first_linear`, `(W @ x^T)^T`, what the decode loop now runs), MKL's pre-packed weights
  (`torch.ops.mkl._mkl_linear`);
- fewer bytes per weight: bf16 weights and activations, and the opt-in int8 decoder's dynamically quantized layers;

each with its time, the weight bytes it reads per second, and how far its outputs are from the reference's (max
absolute difference, and whether every bit is equal); then `F.linear` against the weight-first product at other row
counts (`--rows`: a batch of images, or several rows per image). Beside them, the read bandwidth this core reaches on a tensor
as large as the weights (`sum`), and on one of 400 MB: what a product bound by reading its weights could reach.

`--compile` adds the compiled decode step (transformers' own route: `cache_implementation="static"` with a
`CompileConfig` that allows the CPU), each run in a fresh process with an empty, then a filled inductor cache: first
call, steady time per step, and how many of the sampled tokens equal the eager default's for the same seeds; a last
run draws inductor's random numbers as eager code does (`fallback_random`), so that only rounding tells it apart.

    .venv/bin/python -m benchmarks.bench_decode_kernels --threads 2 --compile --output benchmarks/bench_decode_kernels.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from benchmarks.bench_cpu import REPO_ROOT, load_average, machine_info, official_model
from modeling_pix2seq import weight_first_linear


def step_products(model):
    """`(weight, bias)` of the matrix products of one decode step, in the order a step runs them."""
    products = []
    for layer in model.model.decoder.layers:
        attention = layer.self_attn
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        products.append(
            (torch.cat([p.weight for p in projections]).detach(), torch.cat([p.bias for p in projections]).detach())
        )
        for linear in (attention.out_proj, layer.cross_attn.q_proj, layer.cross_attn.out_proj, layer.mlp.fc1):
            products.append((linear.weight.detach(), linear.bias.detach()))
        products.append((layer.mlp.fc2.weight.detach(), layer.mlp.fc2.bias.detach()))
    products.append((model.lm_head.weight.detach(), model.lm_head.bias.detach()))
    return products


def timed(function, repeats):
    for _ in range(repeats // 5):
        function()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


def kernel_variants(products, batch_size):
    generator = torch.Generator().manual_seed(0)
    inputs = {weight.shape[1]: torch.randn(batch_size, weight.shape[1], generator=generator) for weight, _ in products}

    def run(products_, project, cast=lambda x: x):
        return lambda: [project(cast(inputs[weight.shape[1]]), weight, bias) for weight, bias in products_]

    transposed = [(weight.t().contiguous(), bias) for weight, bias in products]
    variants = {
        "F.linear (the model's)": run(products, nn.functional.linear),
        "addmm, pre-transposed weight": lambda: [
            torch.addmm(bias, inputs[weight.shape[0]], weight) for weight, bias in transposed
        ],
        "weight first (weight_first_linear: the decode loop)": run(products, weight_first_linear),
    }
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = [
            (torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_size), weight, bias) for weight, bias in products
        ]
        variants["MKL pre-packed weight"] = lambda: [
            torch.ops.mkl._mkl_linear(inputs[weight.shape[1]], pack, weight, bias, batch_size)
            for pack, weight, bias in packed
        ]
    bf16 = [(weight.bfloat16(), bias.bfloat16()) for weight, bias in products]
    variants["bf16 weights and activations"] = run(bf16, nn.functional.linear, lambda x: x.bfloat16())
    layers = nn.ModuleList(nn.Linear(weight.shape[1], weight.shape[0]) for weight, _ in products)
    with torch.no_grad():
        for layer, (weight, bias) in zip(layers, products):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    with warnings.catch_warnings():  # PyTorch's deprecation notices of its quantized tensors
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8)
    variants["int8 dynamic (quantize_decoder_int8)"] = lambda: [
        layer(inputs[weight.shape[1]]) for layer, (weight, _) in zip(quantized, products)
    ]
    bytes_per_weight = {"bf16 weights and activations": 2, "int8 dynamic (quantize_decoder_int8)": 1}
    weights = sum(weight.numel() for weight, _ in products)
    reference = variants["F.linear (the model's)"]()
    rows = []
    for name, function in variants.items():
        outputs = [output.float() for output in function()]
        seconds = timed(function, 100)
        weight_bytes = weights * bytes_per_weight.get(name, 4)
        rows.append(
            {
                "variant": name,
                "ms_per_step": seconds * 1e3,
                "weight_megabytes": weight_bytes / 1e6,
                "weight_gigabytes_per_second": weight_bytes / seconds / 1e9,
                "max_abs_difference": max(float((a - b).abs().max()) for a, b in zip(outputs, reference)),
                "bit_equal": all(torch.equal(a, b) for a, b in zip(outputs, reference)),
            }
        )
    return rows, weights


def rows_sweep(products, rows_list):
    """
    ms for the step's products at each row count: `F.linear`, the plain weight-first product
    (`addmm(b, W, x^T)^T`, at any count), and `weight_first_linear` as the decode loop runs it (one row computed as
    two, `F.linear` above `WEIGHT_FIRST_MAX_ROWS`).
    """
    generator = torch.Generator().manual_seed(0)
    rows = []
    for count in rows_list:
        inputs = {weight.shape[1]: torch.randn(count, weight.shape[1], generator=generator) for weight, _ in products}
        plain = timed(lambda: [nn.functional.linear(inputs[w.shape[1]], w, b) for w, b in products], 20)
        weight_first = timed(
            lambda: [torch.addmm(b.unsqueeze(1), w, inputs[w.shape[1]].t()).t().contiguous() for w, b in products], 20
        )
        loop = timed(lambda: [weight_first_linear(inputs[w.shape[1]], w, b) for w, b in products], 20)
        rows.append(
            {
                "rows": count,
                "linear_ms": plain * 1e3,
                "weight_first_ms": weight_first * 1e3,
                "weight_first_linear_ms": loop * 1e3,
            }
        )
    return rows


def read_bandwidth(megabytes):
    tensor = torch.rand(int(megabytes * 1e6) // 4)
    seconds = timed(tensor.sum, 10)
    return tensor.numel() * 4 / seconds / 1e9


def compiled_run(variant, tokens, seeds, output):
    """In this (fresh) process: decode `tokens` tokens for each seed, eagerly or compiled; times and tokens to JSON."""
    from transformers import CompileConfig

    model = official_model("resnet50")
    pixel_values = torch.rand(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        encoder_output = model.model.encoder(pixel_values)
    model.model.encoder.forward = lambda *args, **kwargs: encoder_output  # only decoding is timed
    settings = {}
    if variant == "compiled-eager-random":
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True  # the eager random numbers: only the rounding differs
    if variant.startswith("compiled"):
        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # transformers' switch to compile on a CPU
        settings = {"cache_implementation": "static", "compile_config": compile_config}
    seconds, sequences = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        start = time.perf_counter()
        sequences.append(model.generate(pixel_values, max_new_tokens=tokens, **settings).tolist())
        seconds.append(time.perf_counter() - start)
    Path(output).write_text(json.dumps({"seconds": seconds, "sequences": sequences}))


def compiled_rows(threads, tokens, seeds):
    directory = Path(tempfile.mkdtemp())
    cache = directory / "inductor_cache"
    runs = {}
    variants = (
        ("eager (the default)", "eager"),
        ("compiled, empty cache", "compiled"),
        ("compiled, filled cache", "compiled"),
        ("compiled, eager random numbers", "compiled-eager-random"),
    )
    for name, variant in variants:
        output = directory / f"{len(runs)}.json"
        command = [sys.executable, "-m", "benchmarks.bench_decode_kernels", "--threads", str(threads)]
        command += ["--worker", variant, "--tokens", str(tokens), "--seeds", str(seeds), "--output", str(output)]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO_ROOT),
            "TORCHINDUCTOR_CACHE_DIR": str(cache),
        }
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.exit(f"bench_decode_kernels: the {name} process failed:\n{completed.stderr[-3000:]}")
        runs[name] = {**json.loads(output.read_text()), "process_seconds": time.perf_counter() - start}
    eager = torch.tensor(runs["eager (the default)"]["sequences"])
    rows = []
    for name, run in runs.items():
        sequences = torch.tensor(run["sequences"])
        rows.append(
            {
                "run": name,
                "process_seconds": run["process_seconds"],
                "first_call_seconds": run["seconds"][0],
                "steady_ms_per_step": statistics.median(run["seconds"][1:]) / tokens * 1e3,
                "new_tokens_equal_to_eager": float(sequences[:, :, 1:].eq(eager[:, :, 1:]).float().mean()),
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode step (minutes)")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per call in the --compile runs")
    parser.add_argument("--seeds", type=int, default=4, help="calls (one seed each) per --compile run")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 80], help="rows to sweep")
    parser.add_argument("--output", default="benchmarks/bench_decode_kernels.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return compiled_run(args.worker, args.tokens, args.seeds, args.output)
    load_before = load_average()
    products = step_products(official_model("resnet50"))
    rows, weights = kernel_variants(products, args.batch_size)
    sweep = rows_sweep(products, args.rows)
    weight_megabytes = weights * 4 / 1e6
    bandwidth = {
        f"sum over {weight_megabytes:.0f} MB (GB/s)": read_bandwidth(weight_megabytes),
        "sum over 400 MB (GB/s)": read_bandwidth(400),
    }
    print(f"{len(products)} products of {args.batch_size} rows per step, {weights / 1e6:.2f} M weights")
    print(f"{'variant':<54} {'ms/step':>8} {'MB':>6} {'GB/s':>6} {'max |diff|':>11} {'same bits':>9}")
    for row in rows:
        print(
            f"{row['variant']:<54} {row['ms_per_step']:>8.3f} {row['weight_megabytes']:>6.1f} "
            f"{row['weight_gigabytes_per_second']:>6.1f} {row['max_abs_difference']:>11.2e} {str(row['bit_equal']):>9}"
        )
    print("rows: F.linear / weight first / weight_first_linear, ms for the step's products")
    for row in sweep:
        print(
            f"  {row['rows']:>4}: {row['linear_ms']:.2f} / {row['weight_first_ms']:.2f} / "
            f"{row['weight_first_linear_ms']:.2f}"
        )
    for name, value in bandwidth.items():
        print(f"read bandwidth, {name}: {value:.1f}")
    compiled = compiled_rows(args.threads, args.tokens, args.seeds) if args.compile else None
    for row in compiled or []:
        print(
            f"{row['run']:<24} process {row['process_seconds']:6.1f} s, first call {row['first_call_seconds']:6.2f} s, "
            f"steady {row['steady_ms_per_step']:.2f} ms per step, tokens equal to eager: "
            f"{row['new_tokens_equal_to_eager']:.1%}"
        )
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_decode_kernels", *sys.argv[1:]]),
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": load_average()},
        "settings": {
            "threads": args.threads,
            "batch_size": args.batch_size,
            "tokens": args.tokens,
            "seeds": args.seeds,
        },
        "products_per_step": len(products),
        "weights": weights,
        "variants": rows,
        "rows_sweep": sweep,
        "read_bandwidth": bandwidth,
        "compiled_decode_step": compiled,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
