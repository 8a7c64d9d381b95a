import logging
import math

import pytest
import torch
from testing_utils import cpu_compile_config, tiny_config
from transformers import LogitsProcessor
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


PATHS = [{}, {"cache_implementation": "static"}]


def model_with_eos_bias(eos_mode, eos_bias, max_instances=6):
    config = tiny_config(eos_mode=eos_mode, max_instances=max_instances, max_position_embeddings=64)
    model = Pix2SeqForObjectDetection(config).eval()
    with torch.no_grad():
        model.lm_head.bias[config.pad_token_id] = eos_bias
    return model


@pytest.mark.parametrize("path", PATHS, ids=["generation_mixin", "static"])
def test_eos_mode_stops_after_one_token_when_eos_is_certain_at_the_first_object(path):
    model = model_with_eos_bias(eos_mode=True, eos_bias=1e4)
    pixel_values = torch.rand(3, 3, 64, 64)
    sequences = model.generate(pixel_values, do_sample=False, **path)
    assert sequences.tolist() == [[model.config.task_token_id, model.config.pad_token_id]] * 3
    detections = model.detect(pixel_values, do_sample=False, **path)
    processor = Pix2SeqImageProcessor.from_model_config(model.config)
    assert all(len(result["boxes"]) == 0 for result in processor.post_process_object_detection(detections, 0.0))


def test_batched_generation_with_pad_equal_to_eos_logs_no_attention_mask_warning():
    model = model_with_eos_bias(eos_mode=True, eos_bias=0.0)
    # `warning_once` remembers what it said in this process.
    logging.Logger.warning_once.cache_clear()
    with CaptureLogger(transformers_logging.get_logger("transformers.generation.utils")) as captured:
        model.generate(torch.rand(2, 3, 64, 64), do_sample=False)
    assert captured.out == ""


@pytest.mark.parametrize("path", PATHS, ids=["generation_mixin", "static"])
def test_fixed_mode_writes_every_object_even_when_eos_is_most_likely(path):
    model = model_with_eos_bias(eos_mode=False, eos_bias=1e4)
    sequences = model.generate(torch.rand(3, 3, 64, 64), do_sample=False, **path)
    assert sequences.shape == (3, 1 + 5 * model.config.max_instances)
    assert (sequences[:, 1:] != model.config.pad_token_id).all()


@pytest.mark.parametrize("path", PATHS, ids=["generation_mixin", "static"])
def test_eos_mode_batch_runs_until_its_last_sequence_ends_and_pads_the_ended_ones(path):
    # With near-zero coordinate logits, a bias of log(num_bins) makes EOS as likely as all coordinates together at
    # every object start: the sequences end at different objects.
    model = model_with_eos_bias(eos_mode=True, eos_bias=math.log(tiny_config().num_bins), max_instances=12)
    pad = model.config.pad_token_id
    tokens = model.generate(torch.rand(8, 3, 64, 64), do_sample=True, top_p=1.0, **path)[:, 1:]
    ends = [(row == pad).nonzero()[0].item() if (row == pad).any() else None for row in tokens]
    assert len(set(ends)) > 1
    for row, end in zip(tokens, ends):
        if end is not None:
            assert end % 5 == 0, "EOS may only start an object"
            assert (row[end:] == pad).all()
            assert (row[:end] != pad).all()
    if None not in ends:
        assert max(ends) == tokens.shape[1] - 1, "generation must stop right after the last sequence ends"
    else:
        assert tokens.shape[1] == model.config.sequence_length


class Unchanged(LogitsProcessor):
    """Changes no score; its presence alone sends `generate` to `GenerationMixin`."""

    def __call__(self, input_ids, scores):
        return scores


# At half of log(num_bins), EOS beats each coordinate token but not their mass: the greedy stop decision on masses
# (with the grammar only) and token by token (without) disagree.
@pytest.mark.parametrize("eos_bias", [0.0, math.log(tiny_config().num_bins) / 2])
@pytest.mark.parametrize("use_grammar", [True, False])
def test_eos_mode_greedy_decode_loop_equals_generation_mixin(use_grammar, eos_bias):
    model = model_with_eos_bias(eos_mode=True, eos_bias=eos_bias)
    pixel_values = torch.rand(3, 3, 64, 64)
    reference = model.generate(pixel_values, do_sample=False, use_grammar=use_grammar, logits_processor=[Unchanged()])
    for path in PATHS:
        tokens = model.generate(pixel_values, do_sample=False, use_grammar=use_grammar, **path)
        torch.testing.assert_close(tokens, reference, rtol=0, atol=0)


def test_eos_mode_trains_on_sequences_one_token_longer():
    model = model_with_eos_bias(eos_mode=True, eos_bias=0.0).train()
    processor = Pix2SeqImageProcessor.from_model_config(model.config)
    batch = processor.encode_objects([(torch.tensor([[6.0, 12.0, 32.0, 38.0]]), torch.tensor([1]))], True)
    output = model(pixel_values=torch.rand(1, 3, 64, 64), **batch)
    assert output.logits.shape[1] == model.config.sequence_length == 5 * model.config.max_instances + 1
    assert torch.isfinite(output.loss)


def test_compiled_static_sampling_in_eos_mode_ends_like_eager_sampling_with_the_same_seed():
    # Sequences end inside compiled steps (EOS after 1, 2 or 4 objects here), where the finished flags are updated in
    # place: the compiled graph must stop the batch exactly where eager decoding does.
    model = model_with_eos_bias(eos_mode=True, eos_bias=math.log(tiny_config().num_bins), max_instances=12)
    pixel_values = torch.rand(8, 3, 64, 64)
    torch.manual_seed(1)
    eager = model.generate(pixel_values, do_sample=True, top_p=1.0, cache_implementation="static")
    torch.manual_seed(1)
    compiled = model.generate(
        pixel_values,
        do_sample=True,
        top_p=1.0,
        cache_implementation="static",
        compile_config=cpu_compile_config("aot_eager"),
    )
    assert (eager[:, 6:] == model.config.pad_token_id).any(), "some sequence must end inside a compiled step"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_object_start_weighs_eos_against_the_whole_coordinate_mass():
    from generation_pix2seq import choose_stop_or_object

    coordinates = slice(1000, 1064)
    scores = torch.full((3, 3000), -float("inf"))
    scores[:, coordinates] = -1.0  # 64 equally likely bins: log-mass -1 + log(64), about 3.16
    scores[:, 0] = torch.tensor([2.0, 5.0, 2.0])  # EOS: the single likeliest token in every row
    scores[2, coordinates] = -float("inf")  # a row where only EOS is allowed stays as it is
    chosen = choose_stop_or_object(scores, eos_token_id=0, coordinate_tokens=coordinates)
    assert chosen[0, 0] == -float("inf") and torch.all(chosen[0, coordinates] == -1.0), "more mass on a box: write it"
    assert chosen[1, 0] == 5.0 and torch.isinf(chosen[1, 1:]).all(), "more mass on EOS: stop"
    assert torch.equal(chosen[2], scores[2])
    # Steps where EOS is not allowed are left alone.
    inner = scores.clone()
    inner[:, 0] = -float("inf")
    assert torch.equal(choose_stop_or_object(inner, 0, coordinates), inner)


@pytest.mark.parametrize("path", PATHS, ids=["generation_mixin", "static"])
def test_greedy_eos_mode_writes_boxes_while_eos_is_likeliest_alone_but_not_against_all_coordinates(path):
    # Coordinate logits are near zero: a bias of log(num_bins) - 1 makes EOS the single likeliest token at every object
    # start, yet about e times less likely than starting a box. Greedy decoding must keep writing boxes.
    model = model_with_eos_bias(eos_mode=True, eos_bias=math.log(tiny_config().num_bins) - 1.0)
    pixel_values = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        first_logits = model(pixel_values=pixel_values, decoder_input_ids=torch.full((2, 1), 10)).logits[:, -1]
    assert (first_logits.argmax(dim=-1) == model.config.pad_token_id).all()
    sequences = model.generate(pixel_values, do_sample=False, **path)
    assert sequences.shape == (2, 1 + model.config.sequence_length)
    assert (sequences[:, 1 : 1 + 5 * model.config.max_instances] != model.config.pad_token_id).all()
