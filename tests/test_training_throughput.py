import torch
from testing_utils import Pix2SeqModelTester

from modeling_pix2seq import Pix2SeqForObjectDetection


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
