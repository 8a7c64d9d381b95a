import pytest
import torch
from transformers import CompileConfig, LogitsProcessor

from modeling_pix2seq import Pix2SeqForObjectDetection, Pix2SeqGrammarLogitsProcessor


@pytest.fixture
def model(config):
    return Pix2SeqForObjectDetection(config).eval()


@pytest.fixture
def pixel_values(config):
    return torch.rand(3, 3, config.image_size, config.image_size)


def cpu_compile_config(backend):
    # transformers compiles the static-cache decode step on CUDA only; this opts the CPU in, as the tests need.
    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None if backend != "inductor" else "default")
    compile_config._compile_all_devices = True
    return compile_config


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
    torch.testing.assert_close(static.pred_canvas_boxes, dynamic.pred_canvas_boxes, rtol=0, atol=0)
    torch.testing.assert_close(static.pred_labels, dynamic.pred_labels, rtol=0, atol=0)
    torch.testing.assert_close(static.pred_scores, dynamic.pred_scores)


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
    tokenizer = model.tokenizer
    samples = [
        model.generate(pixel_values, do_sample=True, top_p=1.0, cache_implementation="static")[:, 1:] for _ in range(2)
    ]
    for tokens in samples:
        objects = tokens.reshape(len(tokens), -1, 5)
        coordinates = objects[..., :4] - tokenizer.coord_token_offset
        assert ((coordinates >= 0) & (coordinates < tokenizer.num_bins)).all()
        assert torch.isin(objects[..., 4], tokenizer.class_token_ids).all()
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
    grammar = Pix2SeqGrammarLogitsProcessor(model.tokenizer, model.config.vocab_size)
    scores = torch.zeros(2, model.config.vocab_size)
    class_step = torch.zeros(2, 5, dtype=torch.long)  # the task token, then 4 coordinates
    masked = grammar(class_step, scores)
    assert grammar.blocked.device == scores.device
    allowed = torch.isfinite(masked[0]).nonzero().squeeze(1)
    torch.testing.assert_close(allowed, model.tokenizer.class_token_ids)


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
