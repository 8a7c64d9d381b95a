import copy

import pytest
import torch
from testing_utils import cpu_compile_config, trained_tiny_model
from transformers import LogitsProcessor
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

import modeling_pix2seq
from generation_pix2seq import (
    Pix2SeqGrammarLogitsProcessor,
    Pix2SeqTopPLogitsWarper,
    PreallocatedLayer,
    cache_field,
    class_token_ids,
)
from modeling_pix2seq import quantize_decoder_int8, weight_first_linear


@pytest.fixture
def trained():
    return trained_tiny_model()


@pytest.fixture
def model(trained):
    return trained[0]


@pytest.fixture
def pixel_values(trained):
    """The two images the model was fitted on, and a third it has not seen."""
    pixel_values = trained[1]["pixel_values"]
    return torch.cat(
        [pixel_values, torch.rand(1, *pixel_values.shape[1:], generator=torch.Generator().manual_seed(5))]
    )


def test_the_fitted_model_writes_varied_tokens(model, pixel_values):
    """The cache tests below compare real decodings: coordinates and classes that change from step to step."""
    tokens = model.generate(pixel_values, do_sample=False)[:2, 1:]
    objects = tokens.reshape(2, -1, 5)
    assert objects[..., :4].unique().numel() >= 6
    assert objects[..., 4].unique().numel() >= 2
    assert not torch.equal(tokens[0], tokens[1])


def test_greedy_generation_is_the_same_with_dynamic_cache_without_cache_and_with_static_cache(model, pixel_values):
    dynamic = model.generate(pixel_values, do_sample=False)
    uncached = model.generate(pixel_values, do_sample=False, use_cache=False)
    static = model.generate(pixel_values, do_sample=False, cache_implementation="static")
    assert dynamic.shape == (3, 1 + model.config.sequence_length)
    torch.testing.assert_close(uncached, dynamic, rtol=0, atol=0)
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_static_detections_equal_dynamic_detections(model, pixel_values):
    dynamic = model.detect(pixel_values, do_sample=False)
    static = model.detect(pixel_values, do_sample=False, cache_implementation="static")
    torch.testing.assert_close(static.sequences, dynamic.sequences, rtol=0, atol=0)
    torch.testing.assert_close(static.logits, dynamic.logits, rtol=1e-4, atol=1e-4)


def test_static_generation_twice_reuses_its_buffers_and_repeats_itself(model, pixel_values):
    first = model.generate(pixel_values, do_sample=False, cache_implementation="static")
    cache = model._static_decoding_buffers[0]
    second = model.generate(pixel_values, do_sample=False, cache_implementation="static")
    assert model._static_decoding_buffers[0] is cache
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_static_sampling_with_a_tiny_top_p_is_greedy(model, pixel_values):
    # The official top-p always keeps the most likely token, so a top_p below every probability leaves only it.
    greedy = model.generate(pixel_values, do_sample=False)
    sampled = model.generate(pixel_values, do_sample=True, top_p=1e-9, cache_implementation="static")
    torch.testing.assert_close(sampled, greedy, rtol=0, atol=0)


def test_static_sampling_follows_the_grammar_and_varies(model, pixel_values):
    config = model.config
    samples = [
        model.generate(pixel_values, do_sample=True, top_p=1.0, cache_implementation="static")[:, 1:] for _ in range(2)
    ]
    for tokens in samples:
        objects = tokens.reshape(len(tokens), -1, 5)
        coordinates = objects[..., :4] - config.coord_token_offset
        assert ((coordinates >= 0) & (coordinates < config.num_bins)).all()
        assert torch.isin(objects[..., 4], class_token_ids(config)).all()
    assert not torch.equal(samples[0], samples[1])


class CountingProcessor(LogitsProcessor):
    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores


def test_static_cache_with_settings_the_static_loop_lacks_goes_through_generation_mixin(model, pixel_values):
    processor = CountingProcessor()
    model.generate(pixel_values, do_sample=False, cache_implementation="static", logits_processor=[processor])
    assert processor.calls == model.config.sequence_length
    scored = model.generate(
        pixel_values, do_sample=False, cache_implementation="static", return_dict_in_generate=True, output_scores=True
    )
    assert len(scored.scores) == model.config.sequence_length


def test_grammar_processor_keeps_its_mask_on_the_scores_device_and_masks_the_class_step(model):
    grammar = Pix2SeqGrammarLogitsProcessor(model.config)
    scores = torch.zeros(2, model.config.vocab_size)
    class_step = torch.zeros(2, 5, dtype=torch.long)  # the task token, then 4 coordinates
    masked = grammar(class_step, scores)
    assert grammar.blocked.device == scores.device
    allowed = torch.isfinite(masked[0]).nonzero().squeeze(1)
    torch.testing.assert_close(allowed, class_token_ids(model.config))


def test_compiled_static_generation_matches_eager_generation(model, pixel_values):
    # `aot_eager` traces exactly what inductor would (one full graph per decode step) in seconds on a CPU.
    reference = model.generate(pixel_values, do_sample=False)
    compiled = model.generate(
        pixel_values, do_sample=False, cache_implementation="static", compile_config=cpu_compile_config("aot_eager")
    )
    torch.testing.assert_close(compiled, reference, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiled_static_generation_matches_eager_generation(model, pixel_values):
    reference = model.generate(pixel_values, do_sample=False)
    compiled = model.generate(
        pixel_values, do_sample=False, cache_implementation="static", compile_config=cpu_compile_config("inductor")
    )
    torch.testing.assert_close(compiled, reference, rtol=0, atol=0)


def test_bfloat16_static_generation_matches_bfloat16_dynamic_generation(model, pixel_values):
    model = model.to(torch.bfloat16)
    pixel_values = pixel_values.to(torch.bfloat16)
    dynamic = model.generate(pixel_values, do_sample=False)
    static = model.generate(pixel_values, do_sample=False, cache_implementation="static")
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_official_top_p_keeps_only_the_top_token_when_it_already_exceeds_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    filtered = Pix2SeqTopPLogitsWarper(top_p=0.4)(None, scores)
    assert torch.isfinite(filtered).tolist() == [[True, False, False]]
    filtered = Pix2SeqTopPLogitsWarper(top_p=0.85)(None, scores)
    assert torch.isfinite(filtered).tolist() == [[True, True, False]]


class Unchanged(LogitsProcessor):
    """Changes no score; its presence alone sends `generate` to `GenerationMixin`."""

    def __call__(self, input_ids, scores):
        return scores


@pytest.mark.parametrize(
    "decoding",
    [
        {"do_sample": True, "top_p": 0.4, "top_k": 0, "use_grammar": False},  # the official decoding
        {"do_sample": True, "top_p": 0.9, "top_k": 0, "use_grammar": True},
        {"do_sample": True, "top_p": 1.0, "top_k": 0, "temperature": 2.0, "use_grammar": False},
        {"do_sample": False, "use_grammar": True},
    ],
)
def test_cpu_default_generation_runs_the_decode_loop_and_writes_what_generation_mixin_writes(
    model, pixel_values, decoding, monkeypatch
):
    loop_calls = []
    generate_static = modeling_pix2seq.generate_static
    monkeypatch.setattr(
        modeling_pix2seq, "generate_static", lambda *args: loop_calls.append(1) or generate_static(*args)
    )
    outputs = {}
    for name, processors in (("loop", None), ("generation_mixin", [Unchanged()])):
        torch.manual_seed(3)
        outputs[name] = model.generate(
            pixel_values, logits_processor=processors, return_dict_in_generate=True, output_logits=True, **decoding
        )
    assert len(loop_calls) == 1
    torch.testing.assert_close(outputs["loop"].sequences, outputs["generation_mixin"].sequences, rtol=0, atol=0)
    # The loop computes the decoder's products weight first (`decoding_projections`): the logits differ by rounding.
    torch.testing.assert_close(outputs["loop"].logits, outputs["generation_mixin"].logits, rtol=0, atol=1e-5)


def test_cpu_generation_with_a_setting_the_loop_lacks_goes_through_generation_mixin(model, pixel_values, monkeypatch):
    monkeypatch.setattr(modeling_pix2seq, "generate_static", None)  # would fail if called
    model.generate(pixel_values, do_sample=False, repetition_penalty=1.5)
    model.generate(pixel_values, do_sample=False, use_cache=False)


def test_the_exponential_race_draws_what_torch_multinomial_draws_for_one_sample():
    """The decode loop samples by the exponential race (which CUDA graphs can capture); on a CPU it gives the tokens
    of `GenerationMixin`'s `torch.multinomial(probabilities, 1)` for the same seed."""
    probabilities = torch.rand(4, 3000, generator=torch.Generator().manual_seed(0)).pow(8).softmax(dim=-1)
    for seed in range(20):
        torch.manual_seed(seed)
        multinomial = torch.multinomial(probabilities, num_samples=1).squeeze(1)
        torch.manual_seed(seed)
        race = (probabilities / torch.empty_like(probabilities).exponential_()).argmax(dim=-1)
        assert torch.equal(race, multinomial)


def decode_step_inputs(model, pixel_values):
    """The inputs of one decoding step of 3 rows after a 4-token prompt, and the cache the prompt left."""
    outputs = model(
        pixel_values=pixel_values, decoder_input_ids=torch.full((3, 4), model.config.task_token_id), use_cache=True
    )
    step_inputs = {
        "decoder_input_ids": torch.full((3, 1), 7),
        "encoder_outputs": BaseModelOutput(last_hidden_state=outputs.encoder_last_hidden_state),
        "use_cache": True,
    }
    return step_inputs, getattr(outputs, cache_field())


def test_fused_qkv_projections_give_the_numbers_of_three_projections_and_never_outlive_the_call(model, pixel_values):
    """In the decode loop, the self-attentions project queries, keys and values in one product: a step computes the
    same numbers as with the three projections, and weights changed between calls (here in place, through `.data`,
    which leaves no trace on the parameter) are used by the next call."""
    decoder = model.model.decoder
    with torch.no_grad():
        step_inputs, cache = decode_step_inputs(model, pixel_values)
        separate = model(**step_inputs, cache=copy.deepcopy(cache)).logits
        with decoder.fused_qkv_projections():
            assert decoder.layers[0].self_attn.fused_qkv is not None
            fused = model(**step_inputs, cache=copy.deepcopy(cache)).logits
    assert all(layer.self_attn.fused_qkv is None for layer in decoder.layers)
    torch.testing.assert_close(fused, separate, rtol=0, atol=0)

    before = model.generate(pixel_values, do_sample=False)
    decoder.layers[0].self_attn.k_proj.weight.data.mul_(-3.0)
    after = model.generate(pixel_values, do_sample=False)
    reference = model.generate(pixel_values, do_sample=False, logits_processor=[Unchanged()])
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, reference, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 48), (2, 256), (3, 1, 48), (2, 5, 48), (160, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_first_linear_is_linear_to_rounding(shape, bias):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(*shape, generator=generator)
    weight = torch.randn(40, shape[-1], generator=generator) / shape[-1] ** 0.5  # outputs of about unit scale
    bias = torch.randn(40, generator=generator) if bias else None
    expected = torch.nn.functional.linear(inputs, weight, bias)
    torch.testing.assert_close(weight_first_linear(inputs, weight, bias), expected, rtol=0, atol=1e-5)


def test_decoding_projections_change_only_the_rounding_and_leave_every_layer_as_it_was(model, pixel_values):
    """Within `decoding_projections` (the decode loop's), the decoder's products are computed weight first: a step's
    logits are the plain forward's to rounding. A Linear layer that another tool wraps through an instance `forward`
    (as accelerate's hooks do) keeps its wrapper; on exit no other layer keeps an instance `forward`."""
    decoder = model.model.decoder
    wrapped = decoder.layers[0].mlp.fc1
    wrapper_calls = []
    wrapped_forward = wrapped.forward
    wrapped.forward = lambda inputs: wrapper_calls.append(1) or wrapped_forward(inputs)
    linears = [module for module in (*decoder.modules(), model.lm_head) if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        step_inputs, cache = decode_step_inputs(model, pixel_values)
        plain = model(**step_inputs, cache=copy.deepcopy(cache)).logits
        with model.decoding_projections():
            assert "forward" in vars(model.lm_head) and "forward" in vars(decoder.layers[-1].mlp.fc2)
            weight_first = model(**step_inputs, cache=copy.deepcopy(cache)).logits
    assert len(wrapper_calls) == 3  # the prompt, then the step plain and weight first
    assert [module for module in linears if "forward" in vars(module)] == [wrapped]
    assert all(layer.self_attn.fused_qkv is None for layer in decoder.layers)
    torch.testing.assert_close(weight_first, plain, rtol=0, atol=1e-5)


def test_preallocated_layer_holds_what_a_dynamic_layer_holds():
    """The decode loop's self-attention cache layer writes into buffers made once: after every update, and after
    growing past its capacity, a crop, a batch selection or repetition, it holds exactly what transformers'
    `DynamicLayer` holds."""
    generator = torch.Generator().manual_seed(0)
    preallocated, dynamic = PreallocatedLayer(capacity=6), DynamicLayer()
    buffers = []

    def update(length, batch_size=3):
        keys, values = (torch.randn(batch_size, 2, length, 4, generator=generator) for _ in range(2))
        returned = preallocated.update(keys, values)
        expected = dynamic.update(keys, values)
        for got, want in zip((*returned, preallocated.keys, preallocated.values), (*expected, *expected)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        buffers.append(preallocated.key_buffer.data_ptr())

    for length in (4, 1, 1):
        update(length)
    assert len(set(buffers)) == 1  # written in place, no new allocation
    update(1)  # 7 positions: past the capacity of 6
    assert preallocated.key_buffer.shape[-2] >= 7
    preallocated.crop(-2)
    dynamic.crop(-2)
    update(1)
    preallocated.batch_select_indices(torch.tensor([2, 0]))
    dynamic.batch_select_indices(torch.tensor([2, 0]))
    update(1, batch_size=2)
    preallocated.batch_repeat_interleave(2)
    dynamic.batch_repeat_interleave(2)
    update(1, batch_size=4)
    assert preallocated.get_seq_length() == dynamic.get_seq_length() == 8


def test_int8_decoder_writes_nearly_the_same_tokens(model, pixel_values):
    reference = model.generate(pixel_values, do_sample=False)
    quantize_decoder_int8(model)
    assert type(model.model.decoder.layers[0].mlp.fc1) is not torch.nn.Linear
    assert type(model.lm_head) is not torch.nn.Linear
    assert type(model.model.encoder.output_proj) is torch.nn.Linear
    quantized = model.generate(pixel_values, do_sample=False)
    assert quantized.eq(reference).float().mean() > 0.9
