import pytest
import torch
from testing_utils import cpu_compile_config, trained_tiny_model
from transformers import LogitsProcessor

from generation_pix2seq import Pix2SeqGrammarLogitsProcessor, Pix2SeqTopPLogitsWarper, class_token_ids


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
