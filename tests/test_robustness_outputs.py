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
PROCESSOR = Pix2SeqImageProcessor(image_size=CONFIG.image_size)
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

    outputs = SimpleNamespace(
        pred_canvas_boxes=detections["boxes"], pred_scores=detections["scores"], pred_labels=detections["labels"]
    )
    target_sizes = sizes[: tokens.shape[0]]
    results = PROCESSOR.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)
    assert len(results) == tokens.shape[0]
    for result, (height, width) in zip(results, target_sizes):
        assert_valid_detections(result, height, width)
    for result in PROCESSOR.post_process_object_detection(outputs, threshold=0.0):
        assert_valid_detections(result, 1.0, 1.0)


garbage_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 3))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.lists(garbage_floats, min_size=4, max_size=4), garbage_floats, st.sampled_from([-1, 0, 3, 7])),
        max_size=6,
    ),
    size=st.tuples(st.integers(1, 4000), st.integers(1, 4000)),
    threshold=st.floats(-1, 1),
)
def test_post_processing_of_arbitrary_boxes_and_scores_returns_only_valid_detections(rows, size, threshold):
    outputs = SimpleNamespace(
        pred_canvas_boxes=torch.tensor([row[0] for row in rows], dtype=torch.float32).reshape(1, -1, 4),
        pred_scores=torch.tensor([row[1] for row in rows], dtype=torch.float32).reshape(1, -1),
        pred_labels=torch.tensor([row[2] for row in rows], dtype=torch.long).reshape(1, -1),
    )
    (result,) = PROCESSOR.post_process_object_detection(outputs, threshold=threshold, target_sizes=[size])
    assert_valid_detections(result, *size)


def one_detection(box, score=0.9, label=3):
    return SimpleNamespace(
        pred_canvas_boxes=torch.tensor([[box]], dtype=torch.float32),
        pred_scores=torch.tensor([[score]]),
        pred_labels=torch.tensor([[label]]),
    )


def test_inverted_box_is_put_back_in_order():
    (result,) = PROCESSOR.post_process_object_detection(one_detection([0.5, 0.4, 0.1, 0.2]), target_sizes=[(100, 100)])
    assert result["boxes"][0].tolist() == pytest.approx([10.0, 20.0, 50.0, 40.0])


def test_box_reaching_outside_the_image_is_clipped_to_it():
    (result,) = PROCESSOR.post_process_object_detection(one_detection([-0.2, 0.1, 1.3, 0.3]), target_sizes=[(50, 100)])
    assert result["boxes"][0].tolist() == pytest.approx([0.0, 10.0, 100.0, 30.0])


@pytest.mark.parametrize(
    "box, score",
    [
        ([float("nan"), 0.1, 0.5, 0.5], 0.9),
        ([-float("inf"), 0.1, float("inf"), 0.5], 0.9),  # clipping would turn it into a whole-width box
        ([0.1, 0.1, 0.5, 0.5], float("inf")),
        ([0.1, 0.1, 0.5, 0.5], float("nan")),
        ([1.2, 0.1, 1.5, 0.5], 0.9),  # wholly outside the canvas
    ],
)
def test_detection_with_a_non_finite_or_unrepairable_value_is_dropped(box, score):
    (result,) = PROCESSOR.post_process_object_detection(one_detection(box, score), threshold=0.5)
    assert len(result["scores"]) == 0


def test_scores_above_one_are_clipped():
    (result,) = PROCESSOR.post_process_object_detection(one_detection([0.1, 0.1, 0.5, 0.5], score=1.5))
    assert result["scores"].tolist() == [1.0]


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
