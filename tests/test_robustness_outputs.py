"""Whatever the model generates, decoding and post-processing return only valid detections and never raise."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import tiny_config

from image_processing_pix2seq import Pix2SeqImageProcessor
from tokenization_pix2seq import Pix2SeqTokenizer


CONFIG = tiny_config(id2label={0: "a", 3: "b", 7: "c"})  # sparse class indices: labels must be keys, not positions
TOKENIZER = Pix2SeqTokenizer.from_config(CONFIG)
PROCESSOR = Pix2SeqImageProcessor.from_model_config(CONFIG)
SPECIAL_VALUES = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0]

coordinate_tokens = st.integers(CONFIG.coord_token_offset, CONFIG.coord_token_offset + CONFIG.num_bins - 1)
any_tokens = st.integers(-(2**40), 2**40)


@st.composite
def generations(draw):
    """A batch of token ids (valid coordinates, classes and garbage mixed) and logits with NaN/inf poked in."""
    batch_size = draw(st.integers(0, 3))
    length = draw(st.integers(0, 23))
    token_ids = st.one_of(
        coordinate_tokens, coordinate_tokens, st.sampled_from(TOKENIZER.class_token_ids.tolist()), any_tokens
    )
    tokens = torch.tensor(draw(st.lists(token_ids, min_size=batch_size * length, max_size=batch_size * length)))
    logits_length = draw(st.sampled_from([length, max(length - 3, 0), length + 2]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = torch.randn(batch_size, logits_length, CONFIG.vocab_size, generator=generator) * draw(
        st.sampled_from([1.0, 50.0])
    )
    if batch_size and logits_length:
        for _ in range(draw(st.integers(0, 8))):
            b, t = draw(st.integers(0, batch_size - 1)), draw(st.integers(0, logits_length - 1))
            where = draw(st.one_of(st.integers(0, CONFIG.vocab_size - 1), st.just(slice(None))))
            logits[b, t, where] = draw(st.sampled_from(SPECIAL_VALUES))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return tokens.reshape(batch_size, length), logits.to(dtype)


def assert_valid_detections(result, height, width):
    boxes, scores, labels = result["boxes"], result["scores"], result["labels"]
    assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
    assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] < boxes[:, 3]).all() and (boxes[:, 3] <= height).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert set(labels.tolist()) <= set(CONFIG.id2label)


@settings(max_examples=150, deadline=None)
@given(
    generation=generations(),
    sizes=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=3, max_size=3),
)
def test_any_generation_decodes_and_post_processes_to_valid_detections(generation, sizes):
    tokens, logits = generation
    detections = TOKENIZER.decode(tokens, logits)
    num_objects = min(tokens.shape[1], logits.shape[1]) // 5
    assert detections["boxes"].shape == (tokens.shape[0], num_objects, 4)
    empty = detections["labels"] == -1
    assert (detections["scores"][empty] == 0).all()
    assert_valid_detections({key: value[~empty] for key, value in detections.items()}, height=1.0, width=1.0)

    outputs = SimpleNamespace(sequences=tokens, logits=logits)
    target_sizes = sizes[: tokens.shape[0]]
    results = PROCESSOR.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)
    assert len(results) == tokens.shape[0]
    for result, (height, width) in zip(results, target_sizes):
        assert_valid_detections(result, height, width)
    for result in PROCESSOR.post_process_object_detection(outputs, threshold=0.0):
        assert_valid_detections(result, 1.0, 1.0)


def one_detection(box, label=3, class_logit=10.0):
    """The tokens of one object (`box` as `(x_min, y_min, x_max, y_max)` on the canvas, written as it is) and logits
    that make `label` its class."""
    tokens = TOKENIZER.encode(torch.tensor([box]), torch.tensor([label]))[None]
    logits = torch.zeros(1, 5, CONFIG.vocab_size)
    logits[0, 4, CONFIG.class_token_offset + label] = class_logit
    return SimpleNamespace(sequences=tokens, logits=logits)


def test_inverted_box_is_put_back_in_order():
    (result,) = PROCESSOR.post_process_object_detection(one_detection([0.5, 0.4, 0.1, 0.2]), target_sizes=[(100, 100)])
    expected = [TOKENIZER.dequantize(TOKENIZER.quantize(torch.tensor(v))).item() * 100 for v in (0.1, 0.2, 0.5, 0.4)]
    assert result["boxes"][0].tolist() == pytest.approx(expected)


def test_box_reaching_past_the_image_into_the_padding_is_clipped_to_it():
    # A 50 x 100 image fills the top half of the canvas: y = 0.8 of the canvas is 80 pixels, past its 50 rows.
    (result,) = PROCESSOR.post_process_object_detection(one_detection([0.0, 0.1, 1.0, 0.8]), target_sizes=[(50, 100)])
    assert result["boxes"][0].tolist() == pytest.approx(
        [0.0, 100 * TOKENIZER.dequantize(TOKENIZER.quantize(torch.tensor(0.1))).item(), 100.0, 50.0]
    )


def test_box_wholly_in_the_padding_is_dropped():
    (result,) = PROCESSOR.post_process_object_detection(one_detection([0.1, 0.6, 0.5, 0.9]), target_sizes=[(50, 100)])
    assert len(result["scores"]) == 0


@pytest.mark.parametrize("class_logit", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_give_a_finite_score_in_zero_one(class_logit):
    (result,) = PROCESSOR.post_process_object_detection(
        one_detection([0.1, 0.1, 0.5, 0.5], class_logit=class_logit), 0.0
    )
    assert torch.isfinite(result["scores"]).all() and ((result["scores"] >= 0) & (result["scores"] <= 1)).all()


def test_post_processing_rejects_target_sizes_that_do_not_match_the_batch():
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        PROCESSOR.post_process_object_detection(one_detection([0.1, 0.1, 0.5, 0.5]), target_sizes=[(10, 10), (20, 20)])


def test_decode_with_fewer_logits_than_tokens_decodes_the_steps_that_have_both():
    tokens = TOKENIZER.encode(torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.2, 0.2, 0.4, 0.4]]), torch.tensor([3, 7]))[None]
    logits = torch.zeros(1, 5, CONFIG.vocab_size)
    logits[0, 4, CONFIG.class_token_offset + 3] = 10.0
    detections = TOKENIZER.decode(tokens, logits)
    assert detections["labels"].tolist() == [[3]]


def test_decode_rejects_logits_of_a_smaller_vocabulary_with_a_clear_message():
    with pytest.raises(ValueError, match="different vocabularies"):
        TOKENIZER.decode(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, CONFIG.class_token_offset))
