"""
The Pix2Seq v2 codecs: every case of the official post-processing reference (`multitask_postprocess_reference`)
reproduced, the official training sequences rebuilt, and the rules that hold for any input.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import multitask_postprocess_reference, tiny_sentencepiece_model

import tokenization_pix2seq_multitask as codec


CANVAS = 640  # the post-processing reference uses the official configuration
SEGMENTATION_CASES = ["segA", "segB", "segC"]
KEYPOINT_CASES = ["kpA", "kpA_nosuppress", "kpA_colab", "kpB", "kpC_nosuppress", "kpD", "kpD_nosuppress"]


@pytest.fixture(scope="module")
def reference():
    return multitask_postprocess_reference()


def image_size(case, index=0):
    image = case["images"][index]
    return image["height"], image["width"]


def detections(case, index=0):
    """The detector's results of one image: `(x, y, w, h)` pixel boxes, classes and scores."""
    results = case["detections_json"][str(case["images"][index]["id"])]
    return [r[1] for r in results], [r[0] for r in results], [r[2] for r in results]


# Instance segmentation


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_detector_boxes_become_the_official_top_10_prompts(reference, name):
    arrays, cases = reference
    for index in range(len(cases[name]["images"])):
        size = image_size(cases[name], index)
        boxes, labels, scores = detections(cases[name], index)
        boxes, labels, scores = codec.select_instances(
            codec.detections_to_canvas_boxes(boxes, size, CANVAS), labels, scores
        )
        np.testing.assert_array_equal(boxes, arrays[f"{name}_boxes"][index])
        np.testing.assert_array_equal(labels, arrays[f"{name}_labels"][index])
        np.testing.assert_array_equal(scores, arrays[f"{name}_scores_in"][index])
        np.testing.assert_array_equal(
            codec.instance_segmentation_prompt(boxes, labels), arrays[f"{name}_prompt"][index]
        )


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_polygon_tokens_decode_to_the_official_points_and_polygons(reference, name):
    arrays, cases = reference
    tokens = arrays[f"{name}_pred_seq"]
    points = codec.dequantize(tokens)
    np.testing.assert_array_equal(points, arrays[f"{name}_points"])

    rows_per_image = len(tokens) // len(cases[name]["images"])
    for row, expected in enumerate(cases[name]["split_polygons_xy_pixels"]):
        index = row // rows_per_image
        scale = codec.canvas_to_pixel_scale(
            arrays[f"{name}_unpadded_size"][index], arrays[f"{name}_orig_size"][index], CANVAS
        )
        pixels = codec.rescale_points(points[row], scale)
        np.testing.assert_array_equal(pixels, arrays[f"{name}_points_rescaled"][row])
        polygons = codec.split_polygons(pixels)
        assert [polygon.reshape(-1).tolist() for polygon in polygons] == [
            np.float32(part).tolist() for part in expected
        ], f"row {row}"


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_instance_masks_match_the_official_sample_and_voted_masks(reference, name):
    arrays, cases = reference
    case = cases[name]
    num_samples = case["num_samples"]
    rows_per_image = len(arrays[f"{name}_pred_seq"]) // len(case["images"])
    for index in range(len(case["images"])):
        rows = arrays[f"{name}_pred_seq"][index * rows_per_image : (index + 1) * rows_per_image]
        masks, sample_masks = codec.decode_instance_masks(
            rows, image_size(case, index), arrays[f"{name}_unpadded_size"][index], CANVAS, num_samples
        )
        np.testing.assert_array_equal(sample_masks, arrays[f"{name}_img{index}_sample_masks"])
        np.testing.assert_array_equal(masks, arrays[f"{name}_img{index}_masks"])


def test_mask_vote_keeps_a_pixel_covered_by_four_of_eight_samples(reference):
    arrays, _ = reference
    samples = arrays["segB_img0_sample_masks"][:8]
    counts = samples.sum(axis=0)
    voted = codec.vote_masks(samples)
    assert voted[counts == 4].all() and not voted[counts == 3].any()
    assert (counts == 4).any() and (counts == 3).any()


# Keypoints


def keypoint_inputs(arrays, cases, name):
    """The person crops of a keypoint case, built from its detections as the official evaluation does."""
    case = cases[name]
    size = image_size(case)
    boxes, labels, scores = detections(case)
    people = sorted((score, box) for box, label, score in zip(boxes, labels, scores) if label == 1)[::-1]
    offsets, sizes, crop_boxes = [], [], []
    for _, box in people:
        image_box = codec.detections_to_image_boxes(box, size)[0]
        offset, crop_size = codec.keypoint_crop(image_box, size)
        offsets.append(offset)
        sizes.append(crop_size)
        crop_boxes.append(codec.box_to_crop_canvas(image_box, size, offset, crop_size, CANVAS))
    return (
        np.array(offsets),
        np.array(sizes),
        np.array(crop_boxes),
        np.array([score for score, _ in people], np.float32),
    )


@pytest.mark.parametrize("name", KEYPOINT_CASES)
def test_person_boxes_become_the_official_crops_and_prompts(reference, name):
    arrays, cases = reference
    offsets, sizes, boxes, scores = keypoint_inputs(arrays, cases, name)
    np.testing.assert_array_equal(offsets, arrays[f"{name}_crop_offset"])
    np.testing.assert_array_equal(sizes, arrays[f"{name}_crop_size"])
    np.testing.assert_array_equal([codec.resized_size(*s, CANVAS) for s in sizes], arrays[f"{name}_unpadded_size"])
    np.testing.assert_array_equal(boxes, arrays[f"{name}_boxes"])
    np.testing.assert_array_equal(scores, arrays[f"{name}_det_scores"])
    np.testing.assert_array_equal(codec.keypoint_prompt(boxes), arrays[f"{name}_prompt"][:, 0])


@pytest.mark.parametrize("name", KEYPOINT_CASES)
def test_keypoint_tokens_decode_to_the_official_points_and_scores(reference, name):
    arrays, cases = reference
    overrides = cases[name]["config_overrides"]
    output = codec.post_process_keypoints(
        torch.from_numpy(arrays[f"{name}_stub_seq"]),
        torch.from_numpy(arrays[f"{name}_stub_logits"]),
        arrays[f"{name}_boxes"],
        arrays[f"{name}_crop_offset"],
        arrays[f"{name}_crop_size"],
        arrays[f"{name}_det_scores"],
        CANVAS,
        suppress_invisible=overrides.get("eval_suppress_invisible_token", True),
        top_p=overrides.get("top_p", 0.1),
        points_score_weight=overrides.get("points_score_weight", 1.0),
        generator=torch.Generator().manual_seed(0),
    )
    np.testing.assert_array_equal(output["tokens"].numpy(), arrays[f"{name}_pred_seq"])
    expected_xy = arrays[f"{name}_points_rescaled"].reshape(-1, 17, 2)[..., ::-1]
    np.testing.assert_allclose(output["keypoints"].numpy(), expected_xy, rtol=0, atol=1e-5)
    np.testing.assert_allclose(output["scores"].numpy(), arrays[f"{name}_scores"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(
        output["visible"].numpy(), (arrays[f"{name}_stub_seq"] != 41).reshape(-1, 17, 2).all(axis=-1)
    )


@pytest.mark.parametrize("name", ["p0.1", "p0.4", "k1"])
def test_redraw_filter_is_the_intended_per_position_one_not_the_official_3d_one(reference, name):
    """
    The official keypoint re-draw hands `(B, 34, V)` logits to a `(B, V)` filter; the reference shows which tokens
    each reading keeps. Ours keeps the per-position set, which differs from the official one in these logits.
    """
    arrays, _ = reference
    logits = torch.from_numpy(arrays["filter3d_logits"])
    top_k, top_p = (1, 1.0) if name == "k1" else (0, float(name[1:]))
    kept = torch.isfinite(codec.filter_logits(logits, top_k=top_k, top_p=top_p)).numpy()
    np.testing.assert_array_equal(kept, arrays[f"filter3d_{name}_per_row"])
    assert (arrays[f"filter3d_{name}_per_row"] != arrays[f"filter3d_{name}_official"]).any()


# Training sequences


def test_segmentation_training_sequences_match_the_official_ones(reference):
    arrays, cases = reference
    case = cases["encseg"]
    size = image_size(case)
    objects = [annotation for annotation in case["annotations"] if not annotation["iscrowd"]]
    polygons = np.stack([codec.join_polygons(a["segmentation"], size, CANVAS) for a in objects])
    boxes = codec.detections_to_canvas_boxes([a["bbox"] for a in objects], size, CANVAS)
    np.testing.assert_array_equal(polygons, arrays["encseg_polygons"][0, : len(objects)])
    np.testing.assert_array_equal(boxes, arrays["encseg_boxes"][0, : len(objects)])

    sequences = codec.build_instance_segmentation_sequences(
        arrays["encseg_polygons"][0], arrays["encseg_boxes"][0], arrays["encseg_labels"][0]
    )
    np.testing.assert_array_equal(sequences["decoder_input_ids"], arrays["encseg_input_seq"][0])
    np.testing.assert_array_equal(sequences["labels"], arrays["encseg_target_seq"][0])
    np.testing.assert_array_equal(sequences["token_weights"], arrays["encseg_token_weights"][0])


def test_keypoint_training_sequences_match_the_official_ones(reference):
    arrays, cases = reference
    case = cases["enckp"]
    size = image_size(case)
    box = codec.detections_to_image_boxes(case["annotations"][0]["bbox"], size)[0]
    offset, crop_size = codec.keypoint_crop(box, size)
    crop_box = codec.box_to_crop_canvas(box, size, offset, crop_size, CANVAS)
    keypoints = codec.keypoints_to_crop_canvas(
        case["keypoint_annotations"][0]["keypoints"], size, offset, crop_size, CANVAS
    )
    np.testing.assert_array_equal(offset, arrays["enckp_crop_offset"][0])
    np.testing.assert_array_equal(crop_size, arrays["enckp_crop_size"][0])
    np.testing.assert_array_equal(crop_box, arrays["enckp_boxes"][0, 0])
    np.testing.assert_array_equal(keypoints, arrays["enckp_keypoints"][0, 0])

    sequences = codec.build_keypoint_sequences(keypoints[None], crop_box[None], generator=torch.Generator())
    np.testing.assert_array_equal(sequences["labels"], arrays["enckp_target_seq"][0])
    np.testing.assert_array_equal(sequences["token_weights"], arrays["enckp_token_weights"][0])
    # The input corruption is random: the official draw cannot be replayed, only its rule.
    official_input = arrays["enckp_input_seq_randomly_masked"][0]
    inputs = sequences["decoder_input_ids"]
    np.testing.assert_array_equal(inputs[:, :6], official_input[:, :6])
    teacher = np.concatenate([official_input[:, :6], arrays["enckp_target_seq"][0][:, 5:-1]], axis=1)
    assert ((inputs == teacher) | (inputs == codec.INVISIBLE_TOKEN_ID)).all()


# Rules for any input


@settings(deadline=None)
@given(st.lists(st.integers(1000, 1999), min_size=1, max_size=64))
def test_coordinate_tokens_survive_dequantize_then_quantize(tokens):
    np.testing.assert_array_equal(codec.quantize(codec.dequantize(tokens)), tokens)


polygon_strategy = st.lists(
    st.lists(st.tuples(st.integers(1000, 1999), st.integers(1000, 1999)), min_size=1, max_size=48),
    min_size=0,
    max_size=4,
)


@settings(deadline=None)
@given(polygon_strategy, st.sampled_from([0, 1]))
def test_polygons_joined_by_separators_split_back_whatever_ends_them(polygons, end_token):
    tokens = []
    for polygon in polygons:
        if tokens:
            tokens += [codec.SEPARATOR_TOKEN_ID, codec.SEPARATOR_TOKEN_ID]
        tokens += [token for point in polygon for token in point]
    tokens = tokens[:256]
    tokens += [end_token] * (256 - len(tokens))
    decoded = codec.split_polygons(codec.dequantize(tokens))
    kept = _cut(polygons, 256)
    assert [polygon[:, ::-1].tolist() for polygon in decoded] == [
        [list(codec.dequantize(point)) for point in polygon] for polygon in kept if polygon
    ]


def _cut(polygons, length):
    """The polygons that fit in `length` tokens once joined by separator pairs (the last one possibly cut)."""
    kept, used = [], 0
    for polygon in polygons:
        if kept:
            used += 2
        room = max(0, (length - used) // 2)
        kept.append(polygon[:room])
        used += 2 * len(polygon)
    return kept


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_vote_keeps_pixels_covered_by_at_least_half_of_the_samples(num_samples, seed):
    masks = np.random.default_rng(seed).random((num_samples, 7, 5)) < 0.5
    np.testing.assert_array_equal(codec.vote_masks(masks), 2 * masks.sum(axis=0) >= num_samples)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.1, 0.4, 0.9]), st.sampled_from([0, 1, 3]))
def test_filter_keeps_the_most_likely_tokens_within_top_p_and_top_k(seed, top_p, top_k):
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(seed)) * 3
    kept = torch.isfinite(codec.filter_logits(logits, top_k=top_k, top_p=top_p))
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    kept_sorted = kept.gather(-1, order)
    count = kept_sorted.sum(dim=-1)
    assert kept_sorted[..., 0].all()
    assert (kept_sorted.cumsum(dim=-1) == torch.arange(1, 51).clamp(max=count.unsqueeze(-1))).all()
    mass = (probs * kept_sorted).sum(dim=-1)
    assert ((count == 1) | (mass <= top_p + 1e-6)).all()
    if top_k:
        assert (count <= top_k).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_suppression_replaces_only_invisible_tokens_and_never_writes_one(seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(42, 64, (2, 34), generator=generator)
    tokens[torch.rand(2, 34, generator=generator) < 0.3] = codec.INVISIBLE_TOKEN_ID
    logits = torch.randn(2, 34, 64, generator=generator)
    logits[..., codec.INVISIBLE_TOKEN_ID] += 20
    redrawn, lowered = codec.suppress_invisible_keypoints(tokens, logits, top_p=0.5, generator=generator)
    assert not (redrawn == codec.INVISIBLE_TOKEN_ID).any()
    keep = tokens != codec.INVISIBLE_TOKEN_ID
    assert torch.equal(redrawn[keep], tokens[keep])
    assert torch.equal(lowered[..., :41], logits[..., :41])


def test_invisible_coordinates_become_the_box_centre_each_on_its_own():
    tokens = np.full((1, 34), 1500)
    tokens[0, 0] = codec.INVISIBLE_TOKEN_ID  # y of the nose only
    box = np.array([[0.2, 0.4, 0.6, 0.8]], np.float32)
    points = codec.decode_keypoints(tokens, box, [[10, 20]], [[640, 640]], CANVAS)
    np.testing.assert_allclose(points[0, 0], [np.float32(500 / 999) * 640 + 20, 0.4 * 640 + 10], rtol=1e-6)
    np.testing.assert_allclose(
        points[0, 1], [np.float32(500 / 999) * 640 + 20, np.float32(500 / 999) * 640 + 10], rtol=1e-6
    )


# Captions

CAPTIONS = [
    "a man riding a horse on a beach",
    "two dogs playing with a ball in the park",
    "a plate of food with broccoli and rice",
    "a red bus parked on the side of the street",
    "a cat sleeping on a laptop keyboard",
]


@pytest.fixture(scope="module")
def caption_codec(tmp_path_factory):
    """A tiny SentencePiece model with the official special ids (`testing_utils.tiny_sentencepiece_model`)."""
    path = tiny_sentencepiece_model(CAPTIONS * 4, 60, tmp_path_factory.mktemp("spm"))
    return codec.Pix2SeqCaptionCodec(path)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(sorted({word for caption in CAPTIONS for word in caption.split()})), min_size=1))
def test_captions_round_trip_through_text_tokens(caption_codec, words):
    text = " ".join(words)
    tokens = caption_codec.encode(text)
    assert tokens[-1] == codec.CAPTION_EOS_TOKEN_ID
    assert all(token >= codec.TEXT_TOKEN_OFFSET for token in tokens)
    assert caption_codec.decode(tokens) == text


def test_caption_ends_at_the_first_eos_and_skips_non_text_tokens(caption_codec):
    first, second = (caption_codec.encode(text) for text in CAPTIONS[:2])
    generated = [0, 13, *first[:-1], 40, 1500, codec.CAPTION_EOS_TOKEN_ID, *second, 0, 0]
    assert caption_codec.decode(generated) == CAPTIONS[0]
    assert caption_codec.batch_decode([first, second]) == CAPTIONS[:2]


def test_caption_tokens_beyond_the_vocabulary_read_as_its_last_piece(caption_codec):
    last = caption_codec.sp_model.get_piece_size() - 1
    beyond = codec.TEXT_TOKEN_OFFSET + last + 100
    assert caption_codec.decode([beyond]) == caption_codec.decode([codec.TEXT_TOKEN_OFFSET + last])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_keypoint_training_input_hides_only_response_tokens_behind_the_invisible_token(seed):
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(4, 34, generator=generator).numpy()
    boxes = np.tile(np.float32([0.1, 0.2, 0.7, 0.6]), (4, 1))
    sequences = codec.build_keypoint_sequences(keypoints, boxes, generator=generator)
    inputs, labels = sequences["decoder_input_ids"], sequences["labels"]
    teacher = np.concatenate([codec.keypoint_prompt(boxes), labels[:, 5:-1]], axis=1)
    np.testing.assert_array_equal(inputs[:, :6], teacher[:, :6])
    assert ((inputs == teacher) | (inputs == codec.INVISIBLE_TOKEN_ID)).all()
