from types import SimpleNamespace

import pytest
import torch
from testing_utils import Pix2SeqModelTester

from modeling_pix2seq import Pix2SeqForObjectDetection
from run_detection import demo_dataloader_workers, threads_beside_workers


TESTER = Pix2SeqModelTester(dropout=0.0, drop_path_rate=0.0)


def deterministic_model():
    return Pix2SeqForObjectDetection(TESTER.get_config()).train()


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_channels_last_backbone_gives_the_same_loss_and_gradients():
    model = deterministic_model()
    batch = TESTER.prepare_token_inputs(model.config)
    loss, gradients = loss_and_gradients(model, batch)
    model.to(memory_format=torch.channels_last)
    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
    channels_last_loss, channels_last_gradients = loss_and_gradients(model, batch)
    torch.testing.assert_close(channels_last_loss, loss)
    for name, gradient in gradients.items():
        torch.testing.assert_close(channels_last_gradients[name], gradient, rtol=1e-4, atol=1e-5, msg=name)


def test_the_backbone_convolves_channels_last_pixels_on_a_cpu():
    """On a CPU the backbone hands timm channels-last pixels (oneDNN's faster layout), whatever layout it gets: the
    features of the plain layout, to rounding."""
    model = deterministic_model().eval()
    backbone = model.model.encoder.backbone
    pixel_values = TESTER.prepare_token_inputs(model.config)["pixel_values"]
    with torch.no_grad():
        expected = backbone.timm_model(pixel_values)[-1]
        layouts = []
        hook = backbone.timm_model.register_forward_pre_hook(
            lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
        )
        features = backbone(pixel_values)
        hook.remove()
    assert pixel_values.is_contiguous() and layouts == [True]
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "workers, environment, expected",
    [(1, {}, 2), (2, {}, 1), (5, {}, 1), (0, {}, 3), (1, {"OMP_NUM_THREADS": "3"}, 3)],
)
def test_cpu_training_leaves_a_core_to_each_dataloader_worker(monkeypatch, workers, environment, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    args = SimpleNamespace(use_cpu=True, dataloader_num_workers=workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with threads_beside_workers(args):
            assert torch.get_num_threads() == expected
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_gpu_training_keeps_its_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    with threads_beside_workers(SimpleNamespace(use_cpu=False, dataloader_num_workers=4)):
        assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "synthetic, use_cpu, argv, expected",
    [
        (True, True, [], 0),
        (True, True, ["--dataloader_num_workers", "1"], 1),
        (True, True, ["--dataloader-num-workers=1"], 1),
        (False, True, [], 1),
        (True, False, [], 1),
    ],
)
def test_the_cpu_demo_draws_its_images_in_the_training_process(synthetic, use_cpu, argv, expected):
    training_args = SimpleNamespace(use_cpu=use_cpu, dataloader_num_workers=1)
    demo_dataloader_workers(SimpleNamespace(uses_synthetic_data=synthetic), training_args, argv)
    assert training_args.dataloader_num_workers == expected
