"""The Pix2Seq v2 multi-task sequences: polygons, keypoints and captions to tokens and back.

This module owns the pure codecs of the three tasks that Pix2Seq v2 adds to detection (the box codec stays in
`tokenization_pix2seq.py`): no model, no image, only token ids, logits and geometry, so that the image processor can
call them on either side of `generate()`.

- Instance segmentation (prompt 11): the conditioning prompt of a box, polygon tokens -> polygons in original pixels
  -> masks (pycocotools' polygon rasteriser), the vote over the samples of one box, and the training sequences.
- Keypoints (prompt 12): the official crop around a person box, the suppression of the invisible token, tokens -> 17
  points in original pixels with their visibility and the official score, and the training sequences.
- Captions (prompt 13): token ids <-> text with a SentencePiece model given by path.

The decoding rules are those of the official evaluation (google-research/pix2seq), including its corner cases: every
token is dequantized as a coordinate, tokens 0, 40 and 41 become the reserved values -1 (end), -2 (separator) and -3
(invisible), and the reserved values are read before rescaling. The one deliberate difference is the re-draw of
invisible keypoint tokens, which filters each position on its own (see `suppress_invisible_keypoints`).
"""

from functools import lru_cache

import numpy as np
import torch
from pycocotools import mask as mask_utils
from transformers.generation import TopKLogitsWarper


# Relative import for a saved model folder (`trust_remote_code`); the fallback for the repository root.
try:
    from .generation_pix2seq import Pix2SeqTopPLogitsWarper
except ImportError:
    from generation_pix2seq import Pix2SeqTopPLogitsWarper


PAD_TOKEN_ID = 0
PROMPT_TOKEN_IDS = {"object_detection": 10, "instance_segmentation": 11, "keypoint_detection": 12, "captioning": 13}
SEPARATOR_TOKEN_ID = 40
INVISIBLE_TOKEN_ID = 41
CLASS_TOKEN_OFFSET = 100
COORD_TOKEN_OFFSET = 1000
NUM_BINS = 1000
TEXT_TOKEN_OFFSET = 3000
CAPTION_EOS_TOKEN_ID = 3001
PERSON_CLASS_ID = 1
NUM_KEYPOINTS = 17
MAX_POLYGON_POINTS = 128

# What the reserved tokens dequantize to; the official decoders compare these values, not the tokens.
END_VALUE = -1.0
SEPARATOR_VALUE = -2.0
INVISIBLE_VALUE = -3.0
RESERVED_VALUES = (END_VALUE, SEPARATOR_VALUE, INVISIBLE_VALUE)


# Shared geometry


def quantize(values, num_bins=NUM_BINS, coord_token_offset=COORD_TOKEN_OFFSET):
    """Coordinate tokens of values normalised to the padded canvas: clipped to [0, 1], rounded half to even."""
    values = np.asarray(values, dtype=np.float32)
    bins = np.clip(np.round(values * np.float32(num_bins - 1)), 0, num_bins - 1)
    return bins.astype(np.int64) + coord_token_offset


def dequantize(tokens, num_bins=NUM_BINS, coord_token_offset=COORD_TOKEN_OFFSET):
    """
    Values of tokens as the official decoders read them, `(token - offset) / (num_bins - 1)` in float32 for every
    token, then 0 -> -1 (end), 40 -> -2 (separator), 41 -> -3 (invisible). Class and text tokens therefore give values
    outside [0, 1], and token 1 gives exactly -1, an end.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    values = (tokens - coord_token_offset).astype(np.float32) / np.float32(num_bins - 1)
    values[tokens == PAD_TOKEN_ID] = END_VALUE
    values[tokens == SEPARATOR_TOKEN_ID] = SEPARATOR_VALUE
    values[tokens == INVISIBLE_TOKEN_ID] = INVISIBLE_VALUE
    return values


def resized_size(height, width, canvas_size):
    """
    `(height, width)` of an image resized with its aspect ratio kept so that its longest side fills the canvas,
    computed in float32 and rounded half to even as the official preprocessing does. `Pix2SeqImageProcessor` resizes
    to this size, so that the decoders map tokens back through the canvas the model saw.
    """
    scale = np.float32(canvas_size) / np.float32(max(height, width))
    return tuple(max(1, int(np.round(scale * np.float32(side)))) for side in (height, width))


def canvas_ratio(size, canvas_size):
    """Per-axis `(y, x)` ratio of the resized image to the canvas, which maps image-normalised values onto it."""
    return np.asarray(resized_size(*size, canvas_size), dtype=np.float32) / np.float32(canvas_size)


def normalize_to_image(values, size):
    """`(..., 2 K)` pixel values in `(y, x)` pairs -> normalised to the image, as the official parser does."""
    values = np.asarray(values, dtype=np.float32)
    pairs = values.reshape(*values.shape[:-1], values.shape[-1] // 2, 2)
    return (pairs * (np.float32(1) / np.asarray(size, dtype=np.float32))).reshape(values.shape)


def canvas_to_pixel_scale(unpadded_size, original_size, canvas_size):
    """Per-axis `(y, x)` factors from values normalised to the padded canvas to pixels of the original image."""
    unpadded = np.asarray(unpadded_size, dtype=np.float32)
    return np.float32(canvas_size) / unpadded * np.asarray(original_size, dtype=np.float32)


def rescale_points(points, scale, offset=(0.0, 0.0)):
    """
    `(..., 2 K)` values in `(y, x)` pairs times the per-axis `scale` plus `offset`, in float32; the reserved values
    -1/-2/-3 are kept as they are.
    """
    points = np.asarray(points, dtype=np.float32)
    pairs = points.reshape(*points.shape[:-1], points.shape[-1] // 2, 2)
    rescaled = pairs * np.asarray(scale, dtype=np.float32) + np.asarray(offset, dtype=np.float32)
    rescaled = np.where(np.isin(pairs, RESERVED_VALUES), pairs, rescaled)
    return rescaled.reshape(points.shape)


def detections_to_image_boxes(boxes, original_size):
    """
    `(N, 4)` boxes as `(x, y, width, height)` in original pixels (a COCO detection result) -> `(N, 4)` boxes as
    `(y_min, x_min, y_max, x_max)` normalised to the image.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    # The official tfrecords hold the corners in pixels, added in float64 and stored as float32.
    corners = np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], axis=1)
    return normalize_to_image(corners.astype(np.float32), original_size)


def detections_to_canvas_boxes(boxes, original_size, canvas_size):
    """`detections_to_image_boxes`, then normalised to the padded canvas: the frame of the segmentation prompts."""
    image_boxes = detections_to_image_boxes(boxes, original_size)
    return image_boxes * np.tile(canvas_ratio(original_size, canvas_size), 2)


def select_instances(boxes, labels, scores, max_instances=10):
    """
    The conditioning boxes of one image as the official evaluation takes them: sorted by score, the top
    `max_instances` kept, padded to `max_instances` slots with label 0 and score 0.

    Returns `(boxes (max_instances, 4), labels (max_instances,), scores (max_instances,))`.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:max_instances]
    padding = max_instances - len(order)
    return (
        np.concatenate([boxes[order], np.zeros((padding, 4), np.float32)]),
        np.concatenate([labels[order], np.zeros(padding, np.int64)]),
        np.concatenate([scores[order], np.zeros(padding, np.float32)]),
    )


def instance_segmentation_prompt(boxes, labels):
    """
    `(N, 6)` prompts `[11, y_min, x_min, y_max, x_max, 100 + label]` of `(N, 4)` canvas boxes (yxyx) and their
    labels; an empty slot (label 0) gets an all-zero prompt, as officially.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    prompt = np.concatenate(
        [
            np.full((len(labels), 1), PROMPT_TOKEN_IDS["instance_segmentation"]),
            quantize(boxes),
            (labels + CLASS_TOKEN_OFFSET)[:, None],
        ],
        axis=1,
    )
    return np.where((labels > 0)[:, None], prompt, PAD_TOKEN_ID)


def split_polygons(points):
    """
    The polygons of one decoded sequence: `(2 K,)` values in `(y, x)` pairs (pixels or canvas units, with the
    reserved values) -> a list of `(M, 2)` float32 arrays of `(x, y)` vertices.

    The first pair with -1 in either coordinate ends the sequence (a dangling single value before it is dropped), a
    pair with -2 in either coordinate starts a new polygon, -3 is an ordinary coordinate, and empty polygons are
    dropped.
    """
    points = np.asarray(points, dtype=np.float32)
    pairs = points[: len(points) // 2 * 2].reshape(-1, 2)
    polygons, current = [], []
    for y, x in pairs:
        if y == END_VALUE or x == END_VALUE:
            break
        if y == SEPARATOR_VALUE or x == SEPARATOR_VALUE:
            polygons.append(current)
            current = []
        else:
            current.append((x, y))
    polygons.append(current)
    return [np.asarray(polygon, dtype=np.float32) for polygon in polygons if polygon]


def polygons_to_mask(polygons, height, width):
    """
    The union of the polygons' masks as pycocotools rasterises COCO polygons; polygons of one or two vertices draw
    nothing, and no polygon gives an all-false mask. Returns a `(height, width)` bool array.
    """
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        if len(polygon) < 3:
            continue
        rle = mask_utils.frPyObjects([np.asarray(polygon, dtype=np.float64).reshape(-1).tolist()], height, width)
        mask |= mask_utils.decode(rle)[..., 0].astype(bool)
    return mask


def vote_masks(sample_masks, threshold=0.5):
    """
    One mask from the `(S, H, W)` masks of the samples of one box: a pixel is kept where the share of samples that
    cover it is at least `threshold` (the official `ensemble_threshold`, 0.5: at least 4 of 8). Empty samples count.
    """
    return np.mean(np.asarray(sample_masks, dtype=bool), axis=0, dtype=np.float32) >= threshold


def decode_instance_masks(tokens, original_size, unpadded_size, canvas_size, num_samples=8, threshold=0.5):
    """
    The masks of one image from its generated polygon tokens.

    Args:
        tokens (`array` of shape `(num_instances * num_samples, T)`): the tokens generated after each prompt, rows
            ordered (instance, sample).
        original_size (`tuple[int, int]`): `(height, width)` of the original image; the masks have this size.
        unpadded_size (`tuple[int, int]`): `(height, width)` of the resized image inside the canvas.
        canvas_size (`int`): side of the padded square canvas.
        num_samples (`int`): samples per instance (8 in the official evaluation).
        threshold (`float`): share of the samples that must cover a pixel.

    Returns:
        `(masks, sample_masks)`: `(num_instances, H, W)` voted masks and the `(num_instances * num_samples, H, W)`
        mask of every sample, bool.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    height, width = (int(side) for side in original_size)
    points = dequantize(tokens)
    # The reserved values are read on the canvas values: a pixel coordinate can never be mistaken for one.
    scale = canvas_to_pixel_scale(unpadded_size, original_size, canvas_size)
    pixels = rescale_points(points, scale)
    sample_masks = np.stack([polygons_to_mask(split_polygons(row), height, width) for row in pixels])
    grouped = sample_masks.reshape(-1, num_samples, height, width)
    masks = np.stack([vote_masks(group, threshold) for group in grouped])
    return masks, sample_masks


def join_polygons(polygons, original_size, canvas_size, max_points=MAX_POLYGON_POINTS):
    """
    The polygon response of one training object: COCO polygons (lists of `x, y` pixel values) -> `(2 max_points,)`
    float32 values in `(y, x)` pairs normalised to the padded canvas, polygons joined by a `(-2, -2)` pair and padded
    with -1. Longer responses are cut at `2 max_points` values, as the official dataset parser does.
    """
    ratio = canvas_ratio(original_size, canvas_size)
    parts = []
    for polygon in polygons:
        yx = normalize_to_image(np.asarray(polygon, dtype=np.float32).reshape(-1, 2)[:, ::-1], original_size)
        if parts:
            parts.append(np.full(2, SEPARATOR_VALUE, np.float32))
        parts.append((yx * ratio).reshape(-1))
    values = np.concatenate(parts)[: 2 * max_points] if parts else np.zeros(0, np.float32)
    return np.concatenate([values, np.full(2 * max_points - len(values), END_VALUE, np.float32)])


def values_to_tokens(values):
    """Tokens of `(y, x)` values with the reserved values: -1 -> 0, -2 -> 40, -3 -> 41, the rest quantized."""
    values = np.asarray(values, dtype=np.float32)
    tokens = quantize(values)
    tokens[values == END_VALUE] = PAD_TOKEN_ID
    tokens[values == SEPARATOR_VALUE] = SEPARATOR_TOKEN_ID
    tokens[values == INVISIBLE_VALUE] = INVISIBLE_TOKEN_ID
    return tokens


def build_instance_segmentation_sequences(polygons, boxes, labels):
    """
    The teacher-forcing sequences of the objects of one image, one per object, as the official training builds them.

    Args:
        polygons (`array` of shape `(N, 2 P)`): `join_polygons` of each object.
        boxes (`array` of shape `(N, 4)`): yxyx boxes normalised to the padded canvas.
        labels (`array` of shape `(N,)`): class ids; 0 marks an empty slot, whose sequence is all zeros.

    Returns:
        `dict` of `(N, 5 + 2 P)` arrays: `decoder_input_ids` (prompt and response but the last token), `labels` (the
        next tokens) and `token_weights` (0 where the target is still the prompt, else 1; all 1 in an empty slot).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    prompt = instance_segmentation_prompt(boxes, labels)
    response = np.where((labels > 0)[:, None], values_to_tokens(polygons), PAD_TOKEN_ID)
    sequence = np.concatenate([prompt, response], axis=1)
    weights = np.ones(sequence[:, 1:].shape, dtype=np.float32)
    weights[labels > 0, : prompt.shape[1] - 1] = 0.0
    return {"decoder_input_ids": sequence[:, :-1], "labels": sequence[:, 1:], "token_weights": weights}


# Keypoints


def keypoint_crop(box, original_size, pad_scale=0.5):
    """
    The official crop around a person box: its integer extent (floor/ceil of the box times `size - 1`), grown on each
    side by `pad_scale` times its size and clipped to the image.

    Args:
        box (`array` of shape `(4,)`): `(y_min, x_min, y_max, x_max)` normalised to the original image.
        original_size (`tuple[int, int]`): `(height, width)` of the image.

    Returns:
        `(offset, size)`: `(y, x)` of the crop's top-left pixel and its `(height, width)`, both int.
    """
    box = np.asarray(box, dtype=np.float32)
    limits = np.asarray(original_size, dtype=np.float32) - 1
    low = np.floor(box[:2] * limits).astype(np.int64)
    high = np.ceil(box[2:] * limits).astype(np.int64)
    pad = ((high - low + 1) * pad_scale).astype(np.int64)
    low = np.maximum(low - pad, 0)
    high = np.minimum(high + pad, limits.astype(np.int64))
    return low, high - low + 1


def to_crop(values, original_size, crop_offset, crop_size):
    """`(..., 2 K)` `(y, x)` values normalised to the image -> normalised to the crop, as the official crop does."""
    values = np.asarray(values, dtype=np.float32)
    original = np.asarray(original_size, dtype=np.float32)
    offset = np.asarray(crop_offset, dtype=np.float32) / original
    scale = original / np.asarray(crop_size, dtype=np.float32)
    pairs = values.reshape(*values.shape[:-1], values.shape[-1] // 2, 2)
    return ((pairs - offset) * scale).reshape(values.shape)


def box_to_crop_canvas(box, original_size, crop_offset, crop_size, canvas_size):
    """A `(4,)` yxyx box normalised to the original image -> normalised to the padded canvas of its crop."""
    in_crop = to_crop(box, original_size, crop_offset, crop_size).reshape(2, 2)
    return (in_crop * canvas_ratio(crop_size, canvas_size)).reshape(4)


def keypoint_prompt(boxes):
    """`(N, 6)` prompts `[12, y_min, x_min, y_max, x_max, 101]` of `(N, 4)` yxyx boxes on the crop canvas."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    person = np.full((len(boxes), 1), CLASS_TOKEN_OFFSET + PERSON_CLASS_ID)
    return np.concatenate(
        [np.full((len(boxes), 1), PROMPT_TOKEN_IDS["keypoint_detection"]), quantize(boxes), person], axis=1
    )


def filter_logits(logits, top_k=0, top_p=1.0, temperature=1.0):
    """
    The official sampling filter applied to each position on its own: logits divided by `temperature`, then only the
    `top_k` largest (0: no limit) and the most likely tokens whose cumulative probability is at most `top_p` (always
    the most likely one, the decoding's own `Pix2SeqTopPLogitsWarper`); the others are set to -inf. `logits` may have
    any leading dimensions.
    """
    logits = logits / temperature
    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = Pix2SeqTopPLogitsWarper(top_p)(None, logits)
    return logits


def suppress_invisible_keypoints(tokens, logits, top_k=0, top_p=0.1, temperature=1.0, generator=None):
    """
    The official `eval_suppress_invisible_token`: token 41's logit is lowered by 1e9 at every position, each position
    is drawn again from those logits, and the new draw replaces every emitted 41.

    Officially the re-draw passes the `(B, 34, V)` logits to a filter written for `(B, V)`: its keep-the-top-1 guard
    then reads the first position instead of the first sorted column, so top-p keeps nearly every high token id, and
    top-k 1 keeps what beats the top logit of the last position. Here each position is filtered on its own, the
    intended top-p/top-k. Both agree when the kept set is one token (a dominant logit, or temperature towards 0).

    Args:
        tokens (`torch.LongTensor` of shape `(B, 34)`): the generated keypoint tokens.
        logits (`torch.FloatTensor` of shape `(B, 34, V)`): the raw logits that produced them.
        generator (`torch.Generator`, *optional*): for the re-draw.

    Returns:
        `(tokens, logits)`: the tokens with every 41 replaced, and the lowered logits (those that score the points).
    """
    logits = logits.float().clone()
    logits[..., INVISIBLE_TOKEN_ID] -= 1e9
    probs = filter_logits(logits, top_k, top_p, temperature).softmax(dim=-1)
    redraw = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(tokens.shape)
    return torch.where(tokens == INVISIBLE_TOKEN_ID, redraw, tokens), logits


def emitted_token_probabilities(tokens, logits):
    """`(B, T)` probability of each emitted token under the softmax of its `(B, T, V)` logits."""
    return logits.float().softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def keypoint_scores(tokens, logits, detection_scores, points_score_weight=1.0):
    """
    The official keypoint score: `w` times the mean probability of the emitted non-padding tokens plus `1 - w` times
    the detector's score (`w = points_score_weight`, 1.0 in the official configuration). NaN when every token is
    padding, as officially.
    """
    probs = emitted_token_probabilities(tokens, logits)
    emitted = tokens != PAD_TOKEN_ID
    mean = (probs * emitted).sum(dim=-1) / emitted.sum(dim=-1)
    detection_scores = torch.as_tensor(detection_scores, dtype=mean.dtype, device=mean.device)
    return points_score_weight * mean + (1 - points_score_weight) * detection_scores


def decode_keypoints(tokens, boxes, crop_offsets, crop_sizes, canvas_size):
    """
    17 points per person in original pixels from their tokens.

    Args:
        tokens (`array` of shape `(B, 34)`): `(y, x)` tokens of the 17 COCO keypoints.
        boxes (`array` of shape `(B, 4)`): the prompt boxes, yxyx normalised to the crop canvas.
        crop_offsets, crop_sizes (`array` of shape `(B, 2)`): `(y, x)` offset and `(height, width)` of each crop.
        canvas_size (`int`): side of the padded square canvas.

    Returns:
        `(B, 17, 2)` float32 `(x, y)` points. A -3 (invisible) coordinate becomes that coordinate of the box centre,
        each coordinate on its own; -1 (end, token 0 or 1) and -2 (separator) stay literal values, as officially.
    """
    points = dequantize(tokens).reshape(len(tokens), NUM_KEYPOINTS, 2)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 2, 2)
    centres = (boxes[:, 0] + boxes[:, 1]) / np.float32(2)
    points = np.where(points == INVISIBLE_VALUE, centres[:, None], points).reshape(len(tokens), -1)
    crop_sizes = np.asarray(crop_sizes)
    unpadded = np.asarray([resized_size(*size, canvas_size) for size in crop_sizes])
    scale = canvas_to_pixel_scale(unpadded, crop_sizes, canvas_size)[:, None]
    offsets = np.asarray(crop_offsets, dtype=np.float32)[:, None]
    pixels = rescale_points(points, scale, offsets).reshape(len(tokens), NUM_KEYPOINTS, 2)
    return pixels[..., ::-1].copy()


def post_process_keypoints(
    tokens,
    logits,
    boxes,
    crop_offsets,
    crop_sizes,
    detection_scores,
    canvas_size,
    suppress_invisible=True,
    top_k=0,
    top_p=0.1,
    temperature=1.0,
    points_score_weight=1.0,
    generator=None,
):
    """
    Keypoints of person crops from their generated tokens, as the official evaluation decodes them.

    Args:
        tokens (`torch.LongTensor` of shape `(B, 34)`) and logits (`torch.FloatTensor` of shape `(B, 34, V)`): the
            generated tokens after each prompt and their raw logits.
        boxes (`array` of shape `(B, 4)`): the prompt boxes, yxyx normalised to each crop's canvas.
        crop_offsets, crop_sizes (`array` of shape `(B, 2)`): from `keypoint_crop`.
        detection_scores (`array` of shape `(B,)`): the detector's score of each person.
        canvas_size (`int`): side of the padded square canvas.
        suppress_invisible (`bool`): re-draw the invisible tokens (`suppress_invisible_keypoints`), officially on,
            with the sampling settings `top_k`, `top_p`, `temperature` of the keypoint task.
        points_score_weight (`float`): weight of the token probabilities in the score (1.0 official, 0.1 colab).

    Returns:
        `dict` with `keypoints` `(B, 17, 2)` `(x, y)` pixels of the original image, `visible` `(B, 17)` (neither
        token of the point was the invisible token as generated; the official COCO result marks every point
        visible), `scores` `(B,)`, `tokens` `(B, 34)` (after the suppression) and `token_scores` `(B, 34)` (the
        probability of each of these tokens under the logits that score them).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    logits = torch.as_tensor(logits)
    visible = (tokens != INVISIBLE_TOKEN_ID).reshape(len(tokens), NUM_KEYPOINTS, 2).all(dim=-1)
    if suppress_invisible:
        tokens, logits = suppress_invisible_keypoints(tokens, logits, top_k, top_p, temperature, generator)
    return {
        "keypoints": torch.from_numpy(
            decode_keypoints(tokens.cpu().numpy(), boxes, crop_offsets, crop_sizes, canvas_size)
        ),
        "visible": visible,
        "scores": keypoint_scores(tokens, logits, detection_scores, points_score_weight),
        "tokens": tokens,
        "token_scores": emitted_token_probabilities(tokens, logits),
    }


def keypoints_to_crop_canvas(keypoints, original_size, crop_offset, crop_size, canvas_size):
    """
    COCO keypoints `[x, y, v] * 17` in original pixels -> `(34,)` float32 `(y, x)` values normalised to the padded
    canvas of the crop. A point with `v == 0`, or with a coordinate at or beyond the crop's edges (<= 0 or >= 1 in
    the crop), becomes `(-3, -3)`; `v == 1` and `v == 2` are both kept, as officially.
    """
    keypoints = np.asarray(keypoints, dtype=np.float32).reshape(NUM_KEYPOINTS, 3)
    yx = to_crop(normalize_to_image(keypoints[:, 1::-1], original_size), original_size, crop_offset, crop_size)
    invisible = (keypoints[:, 2] == 0) | ((yx <= 0) | (yx >= 1)).any(axis=1)
    points = np.where(invisible[:, None], INVISIBLE_VALUE, yx * canvas_ratio(crop_size, canvas_size))
    return points.reshape(-1).astype(np.float32)


def build_keypoint_sequences(keypoints, boxes, invisible_token_weight=0.1, generator=None):
    """
    The teacher-forcing sequences of person crops, as the official training builds them.

    Args:
        keypoints (`array` of shape `(B, 34)`): `keypoints_to_crop_canvas` of each person.
        boxes (`array` of shape `(B, 4)`): yxyx person boxes normalised to the crop canvas.
        invisible_token_weight (`float`): weight of an invisible target (official 0.1).
        generator (`torch.Generator`, *optional*): for the input corruption.

    Returns:
        `dict` of `(B, 39)` arrays: `labels` (box, 101, the 34 point tokens), `token_weights` (0 for the box and
        101, `invisible_token_weight` for a 41, else 1) and `decoder_input_ids` (prompt and the first 33 point
        tokens, a uniformly drawn share of whose positions is replaced by 41 in each sequence).
    """
    prompt = keypoint_prompt(boxes)
    sequence = np.concatenate([prompt, values_to_tokens(keypoints)], axis=1)
    labels = sequence[:, 1:]
    weights = np.where(labels == INVISIBLE_TOKEN_ID, np.float32(invisible_token_weight), np.float32(1.0))
    weights[:, : prompt.shape[1] - 1] = 0.0
    inputs = torch.from_numpy(sequence[:, :-1].copy())
    response = inputs[:, prompt.shape[1] :]
    share = torch.rand(len(inputs), 1, generator=generator)
    hidden = torch.rand(response.shape, generator=generator) < share
    inputs[:, prompt.shape[1] :] = response.masked_fill(hidden, INVISIBLE_TOKEN_ID)
    return {"decoder_input_ids": inputs.numpy(), "labels": labels, "token_weights": weights.astype(np.float32)}


# Captions


@lru_cache(maxsize=4)
def _load_sentencepiece(vocab_file):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))


class Pix2SeqCaptionCodec:
    r"""
    Caption text <-> Pix2Seq v2 tokens: SentencePiece ids shifted by `text_token_offset` (3000), SentencePiece id 1
    (`</s>`, token 3001) ending a caption.

    Args:
        vocab_file (`str` or `os.PathLike`): the SentencePiece model (the official `c4_en_32k_spm.model`).
        text_token_offset (`int`, *optional*, defaults to 3000): the first text token.
        eos_token_id (`int`, *optional*, defaults to 3001): the token that ends a caption.
    """

    def __init__(self, vocab_file, text_token_offset=TEXT_TOKEN_OFFSET, eos_token_id=CAPTION_EOS_TOKEN_ID):
        self.sp_model = _load_sentencepiece(str(vocab_file))
        self.text_token_offset = text_token_offset
        self.eos_token_id = eos_token_id

    def encode(self, text):
        """Tokens of a caption, ending with the EOS token (the official model adds `</s>`)."""
        ids = self.sp_model.encode(text, out_type=int)
        return [piece + self.text_token_offset for piece in ids] + [self.eos_token_id]

    def decode(self, tokens):
        """
        The caption of one generated sequence (without the prompt): read up to the first EOS, non-text tokens
        dropped, text tokens beyond the SentencePiece vocabulary clipped to its last id, as officially.

        The official decoder reads past the EOS (every token is detokenized); stopping there is the intended reading
        and what a greedy model that keeps writing after its EOS needs.
        """
        tokens = [int(token) for token in tokens]
        if self.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.eos_token_id)]
        last_id = self.sp_model.get_piece_size() - 1
        ids = [min(token - self.text_token_offset, last_id) for token in tokens if token >= self.text_token_offset]
        return self.sp_model.decode(ids)

    def batch_decode(self, sequences):
        return [self.decode(tokens) for tokens in sequences]


__all__ = [
    "Pix2SeqCaptionCodec",
    "build_instance_segmentation_sequences",
    "build_keypoint_sequences",
    "decode_instance_masks",
    "decode_keypoints",
    "dequantize",
    "detections_to_canvas_boxes",
    "emitted_token_probabilities",
    "filter_logits",
    "instance_segmentation_prompt",
    "join_polygons",
    "keypoint_crop",
    "keypoint_prompt",
    "keypoint_scores",
    "keypoints_to_crop_canvas",
    "polygons_to_mask",
    "post_process_keypoints",
    "quantize",
    "select_instances",
    "split_polygons",
    "suppress_invisible_keypoints",
    "vote_masks",
]
