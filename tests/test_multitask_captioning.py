"""Captions through the model: `generate(task="captioning")` decodes greedily until the end-of-text token, and
`Pix2SeqCaptionCodec` turns the tokens into text with a SentencePiece model given by path (a tiny one trained here;
the official `c4_en_32k_spm.model` is not downloadable from this project's machines)."""

import pytest
import torch
from testing_utils import tiny_multitask_config, tiny_sentencepiece_model

from modeling_pix2seq import Pix2SeqForObjectDetection
from tokenization_pix2seq_multitask import Pix2SeqCaptionCodec


CAPTION = "a dog on the beach"
TRAINING_TEXT = [CAPTION] * 8 + ["two cats", "a man on a horse", "a red bus on the street", "two dogs on a sofa"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A tiny SentencePiece model with the official special ids (`testing_utils.tiny_sentencepiece_model`)."""
    return tiny_sentencepiece_model(TRAINING_TEXT * 4, 40, tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def captioner(vocab_file):
    """A tiny multi-task model (ViT patch stem) fitted to write one caption."""
    torch.manual_seed(0)
    config = tiny_multitask_config(backbone=None, patch_size=16, dropout=0.0, drop_path_rate=0.0)
    model = Pix2SeqForObjectDetection(config)
    labels = torch.tensor([Pix2SeqCaptionCodec(vocab_file).encode(CAPTION)] * 2)  # ends with 3001
    decoder_input_ids = torch.cat([torch.full((2, 1), 13), labels[:, :-1]], dim=1)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(70):
        model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), pixel_values, labels


def test_captions_are_generated_greedily_until_their_end_and_decoded_from_the_vocab_file(captioner, vocab_file):
    model, pixel_values, labels = captioner
    sequences = model.generate(pixel_values, task="captioning")
    assert torch.equal(sequences[:, 0], torch.tensor([13, 13]))
    # Greedy: generation stops once every row wrote 3001, and the fitted caption comes back as text.
    assert torch.equal(sequences[:, 1:], labels)
    assert Pix2SeqCaptionCodec(vocab_file).batch_decode(sequences[:, 1:]) == [CAPTION, CAPTION]
    assert torch.equal(model.generate(pixel_values, task="captioning"), sequences)


def test_caption_length_is_the_task_setting_unless_the_call_says_otherwise(captioner):
    model, pixel_values, labels = captioner
    assert model.generate(pixel_values, task="captioning", eos_token_id=None).shape == (2, 1 + 15)  # the task's 15
    # 3001 ends a caption (the task's eos_token_id) before a longer limit; without it, decoding runs to the limit.
    assert model.generate(pixel_values, task="captioning", max_new_tokens=20).shape == (2, 1 + labels.shape[1])
    assert model.generate(pixel_values, task="captioning", max_new_tokens=20, eos_token_id=None).shape == (2, 21)
