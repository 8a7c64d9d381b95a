"""An embedded synthetic detection data set: coloured shapes on cluttered backgrounds, drawn on demand.

Every image is a pure function of its index, so the training stream needs no files and held-out images are simply
indices the training stream never draws. Boxes are the tight bounds of what is drawn, in COCO `[x, y, w, h]` pixels.
"""

import math
import random

import numpy as np
import PIL.Image
import PIL.ImageDraw


SHAPE_CLASSES = ("circle", "rectangle", "triangle", "ring")
# Held-out indices start here; training draws from below it, so the two never meet.
EVAL_INDEX_OFFSET = 10**9
MAX_OBJECTS = 6


def _background(rng, size):
    """A colour gradient with pixel noise and distractor strokes, so that "not a uniform region" is not "an object"."""
    corners = np.array([[rng.randint(0, 255) for _ in range(3)] for _ in range(2)], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    weight = (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])[..., None]
    # The gradient is one row (or column) broadcast over the noise, and the noise is `normal(0, 12)` written as
    # 12 * standard normal, in place: the same numbers (and pixels) as full-size arrays, without their copies.
    gradient = corners[0] * (1 - weight) + corners[1] * weight
    pixels = np.random.default_rng(rng.getrandbits(32)).standard_normal((size, size, 3))
    pixels *= 12.0
    pixels += gradient
    image = PIL.Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        points = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(points, fill=_colour(rng), width=rng.randint(1, 2))
    return image, draw


def _colour(rng):
    return tuple(rng.randint(0, 255) for _ in range(3))


def _draw_shape(draw, rng, label, box, colour):
    x0, y0, x1, y1 = box
    if label == 0:
        draw.ellipse(box, fill=colour)
    elif label == 1:
        draw.rectangle(box, fill=colour)
    elif label == 2:
        apex = rng.uniform(x0, x1)
        draw.polygon([(apex, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(2, round((x1 - x0) / 6)))


def _covered_fraction(a, b):
    """The fraction of the smaller of boxes `a` and `b` that their intersection covers."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def area(box):
        return (box[2] - box[0]) * (box[3] - box[1])

    return inter_w * inter_h / min(area(a), area(b))


def _contrasting_colour(rng, image, box, min_distance=100.0):
    """A colour at least `min_distance` (RGB Euclidean) from the mean of what `image` shows under `box`, so that every
    annotated shape can be seen; the most distant of 20 draws if none is that far."""
    x0, y0, x1, y1 = (int(v) for v in box)
    under = (
        np.asarray(image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))), dtype=np.float32)
        .reshape(-1, 3)
        .mean(axis=0)
    )
    best, best_distance = None, -1.0
    for _ in range(20):
        colour = _colour(rng)
        distance = float(np.linalg.norm(np.asarray(colour, dtype=np.float32) - under))
        if distance >= min_distance:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def draw_example(index, image_size=96, max_objects=MAX_OBJECTS, min_size=10, max_covered=0.3):
    """
    The image of `index`: 1 to `max_objects` shapes of side `min_size` to half the image, which may overlap (later
    shapes on top, covering at most `max_covered` of the smaller box of any pair, so no annotated shape is hidden),
    each in a colour that stands out from what lies under it, over a cluttered background.

    Returns `(image, boxes, labels)`: a PIL RGB image, COCO `[x, y, w, h]` boxes and class indices into
    `SHAPE_CLASSES`.
    """
    rng = random.Random(index)
    image, draw = _background(rng, image_size)
    boxes, labels = [], []
    for _ in range(rng.randint(1, max_objects)):
        for _attempt in range(10):
            # Log-uniform sizes spread objects over the small/medium range instead of crowding the large end.
            side = math.exp(rng.uniform(math.log(min_size), math.log(image_size / 2)))
            width, height = side * rng.uniform(0.75, 1.25), side * rng.uniform(0.75, 1.25)
            x0, y0 = rng.uniform(0, image_size - width), rng.uniform(0, image_size - height)
            box = (x0, y0, x0 + width, y0 + height)
            if all(_covered_fraction(box, other) <= max_covered for other in boxes):
                break
        else:
            continue
        label = rng.randrange(len(SHAPE_CLASSES))
        colour = _contrasting_colour(rng, image, box)
        _draw_shape(draw, rng, label, box, colour)
        boxes.append(box)
        labels.append(label)
    return image, [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes], labels
