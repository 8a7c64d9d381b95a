"""
Detection data for Pix2Seq training: COCO folders, Hub parquet data sets and the synthetic shapes as `datasets`
streams in one schema, the box-aware training augmentation, and the collators.

Every source becomes records of one schema (`RECORD_FEATURES`): `image_id`, `image` (the `Image()` feature, not
decoded until a record is used, so a stream holds paths or bytes), `width`, `height` and `objects` with COCO
`[x, y, w, h]` pixel boxes (clipped to the image) and contiguous class indices. Evaluation keeps the *original*
annotations beside it (`DetectionSplit.references`) so COCO mAP is measured against the file, not against the
cleaned records.

Supported Hub schemas (`--dataset_name`, parquet): columns `image` (`Image()`), `width`, `height`, optional
`image_id`, and `objects` holding `bbox` (4 numbers per object, COCO `xywh` as in `cppe-5`, or `xyxy` as some
exports of `detection-datasets/coco` write it: `bbox_format="auto"` checks the boxes against the image size at run
time) and `category` (a `ClassLabel`, whose names become `id2label`), optionally `iscrowd`/`is_crowd`.
"""

import io
import logging
import math
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import datasets
import torch
from datasets import ClassLabel, Features, Image, IterableDataset, List, Value
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from image_processing_pix2seq import InvalidImageError, image_file_size, read_image
from training.synthetic_shapes import EVAL_INDEX_OFFSET, MAX_OBJECTS, SHAPE_CLASSES, draw_example
from training.training_safety import read_json


logger = logging.getLogger(__name__)

RECORD_FEATURES = Features(
    {
        "image_id": Value("int64"),
        "image": Image(decode=False),
        "width": Value("int32"),
        "height": Value("int32"),
        "objects": {"bbox": List(List(Value("float32"), length=4)), "category": List(Value("int64"))},
    }
)


@dataclass
class LabelMap:
    """Contiguous class indices (the model's `id2label` keys) and the data set's own category ids, index for index."""

    names: list
    category_ids: list

    @property
    def id2label(self):
        return dict(enumerate(self.names))

    @property
    def class_index(self):
        return {category_id: index for index, category_id in enumerate(self.category_ids)}


@dataclass
class DetectionSplit:
    """
    One split: `dataset` holds records of `RECORD_FEATURES`; `references` (evaluation splits) the original
    annotations per image for `coco_map` (`image_id`, `boxes` xywh, `labels` as category ids, `iscrowd`, `area`);
    `stats` counts what cleaning dropped or changed; `num_examples` is the number of records, where known.
    """

    dataset: object
    label_map: LabelMap
    references: list | None = None
    stats: Counter = field(default_factory=Counter)
    max_objects: int | None = None
    num_examples: int | None = None


def _fail(path, where, message):
    raise ValueError(f"{path}: {where}: {message}")


def _is_number(value):
    # JSON `true`/`false` load as bool, a subclass of int; NaN and Infinity load as floats.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco_annotations(path):
    """
    Reads a COCO instances file and checks the fields training needs; every error names the file, the record and the
    field: a path that is no regular file, malformed or too deeply nested JSON, missing lists, an empty `categories`,
    repeated image ids, boxes that are not 4 finite numbers (booleans and NaN included), annotations of unknown
    images or categories.
    """
    coco = read_json(path)
    if not isinstance(coco, dict):
        _fail(path, "top level", f"expected a JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            _fail(path, f"field '{key}'", "missing or not a list")
    if not coco["categories"]:
        _fail(path, "field 'categories'", "empty: the model needs at least one class")
    first_index = {}
    for index, image in enumerate(coco["images"]):
        for key in ("id", "width", "height"):
            if not isinstance(image.get(key), int) or isinstance(image.get(key), bool):
                _fail(path, f"images[{index}] field '{key}'", f"expected an integer, got {image.get(key)!r}")
        if not isinstance(image.get("file_name"), str):
            _fail(path, f"images[{index}] field 'file_name'", f"expected a string, got {image.get('file_name')!r}")
        if image["id"] in first_index:
            _fail(
                path,
                f"images[{index}] field 'id'",
                f"{image['id']} repeats the id of images[{first_index[image['id']]}] (their annotations would mix)",
            )
        first_index[image["id"]] = index
    for index, category in enumerate(coco["categories"]):
        if not isinstance(category.get("id"), int) or isinstance(category.get("id"), bool):
            _fail(path, f"categories[{index}] field 'id'", f"expected an integer, got {category.get('id')!r}")
    for index, annotation in enumerate(coco["annotations"]):
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            _fail(path, f"annotations[{index}] field 'bbox'", f"expected 4 finite numbers [x, y, w, h], got {bbox!r}")
        if annotation.get("image_id") not in first_index:
            _fail(path, f"annotations[{index}] field 'image_id'", f"{annotation.get('image_id')!r} is not in 'images'")
        category_id = annotation.get("category_id")
        if not isinstance(category_id, int) or isinstance(category_id, bool):
            _fail(path, f"annotations[{index}] field 'category_id'", f"expected an integer, got {category_id!r}")
    known = {category["id"] for category in coco["categories"]}
    missing = sorted({annotation["category_id"] for annotation in coco["annotations"]} - known)
    if missing:
        _fail(
            path,
            "field 'category_id'",
            f"annotations use category ids {missing} that are not in 'categories' {sorted(known)}",
        )
    return coco


def clean_objects(boxes, categories, crowd, width, height, stats):
    """
    Boxes a model can learn from: crowd regions dropped, boxes clipped to the image, boxes with no area left (zero or
    negative width/height, or wholly outside) dropped. `stats` counts each case. Returns xywh boxes and categories.
    """
    kept_boxes, kept_categories = [], []
    for (x, y, w, h), category, is_crowd in zip(boxes, categories, crowd):
        if is_crowd:
            stats["crowd_boxes_dropped"] += 1
            continue
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            stats["empty_boxes_dropped"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            stats["boxes_clipped"] += 1
        kept_boxes.append([x0, y0, x1 - x0, y1 - y0])
        kept_categories.append(category)
    return kept_boxes, kept_categories


def shards_for(num_items, world_size=1, num_workers=0):
    """Enough shards that every rank and every DataLoader worker gets whole shards of equal count (when possible)."""
    readers = world_size * max(num_workers, 1)
    return max(1, min(num_items, 8 * readers))


def _stream(generate, num_shards, **kwargs):
    # A list in `gen_kwargs` is split into shards, one element each: pass shard numbers, iterate inside.
    return IterableDataset.from_generator(
        generate,
        gen_kwargs={"shards": list(range(num_shards)), "num_shards": num_shards, **kwargs},
        features=RECORD_FEATURES,
    )


def _coco_records(shards, num_shards, records):
    for shard in shards:
        yield from records[shard::num_shards]


class NoTrainingDataError(ValueError):
    """A training split with no usable example; the message says what was skipped and why."""


def describe_counts(stats, empty="nothing skipped"):
    """Cleaning counts in words (`"2 images missing, 1 boxes clipped"`), or `empty` when none is above zero."""
    return ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in sorted(stats.items()) if count) or empty


def held_out_ids(image_ids, fraction, seed=0):
    """The image ids (a seeded random `fraction` of `image_ids`, at least one) held out of training for evaluation."""
    image_ids = sorted(image_ids)
    count = min(len(image_ids), max(1, round(len(image_ids) * fraction)))
    return set(random.Random(seed).sample(image_ids, count))


def coco_split(
    images_dir,
    annotations_file,
    train,
    streaming=True,
    max_samples=None,
    world_size=1,
    num_workers=0,
    hold_out_fraction=0.0,
    held_out=False,
):
    """
    A COCO folder as a split. Every image file's header is read first (in threads; no pixels are decoded): missing
    and unreadable files are skipped and counted, and a file whose size differs from the JSON `width`/`height` is
    used at its real size, with a warning naming the record. Training drops images left without objects (as the
    official recipe does) and raises `NoTrainingDataError`, with the counts of what was skipped, when nothing is
    left; evaluation keeps images without objects (their false positives count), and keeps the references of the
    skipped images, so that evaluation can say how many it could not read. Images are referenced by path and decoded
    only when used; a stream has shards for `world_size` ranks of `num_workers` DataLoader workers.

    With `hold_out_fraction`, the file's images are split in two (`held_out_ids`): the split holds the held-out
    images when `held_out`, the others otherwise.
    """
    coco = load_coco_annotations(annotations_file)
    categories = sorted(coco["categories"], key=lambda category: category["id"])
    label_map = LabelMap([c.get("name", str(c["id"])) for c in categories], [c["id"] for c in categories])
    class_index = label_map.class_index
    per_image = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        per_image[annotation["image_id"]].append(annotation)
    position = {image["id"]: index for index, image in enumerate(coco["images"])}
    images = sorted(coco["images"], key=lambda image: image["id"])
    if hold_out_fraction:
        held = held_out_ids(per_image, hold_out_fraction)
        images = [image for image in images if (image["id"] in held) == held_out]
    images = images[:max_samples]
    paths = [os.path.join(images_dir, image["file_name"]) for image in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        file_sizes = list(pool.map(image_file_size, paths))

    stats, records, references, resized, irregular = Counter(), [], [], [], []
    for image, path, file_size in zip(images, paths, file_sizes):
        annotations = per_image[image["id"]]
        if not train:
            references.append(
                {
                    "image_id": image["id"],
                    "boxes": [a["bbox"] for a in annotations],
                    "labels": [a["category_id"] for a in annotations],
                    "iscrowd": [int(a.get("iscrowd", 0)) for a in annotations],
                    "area": [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in annotations],
                }
            )
        if file_size is None:
            if not os.path.exists(path):
                stats["images_missing"] += 1
            elif not os.path.isfile(path):
                stats["images_not_regular_files"] += 1
                irregular.append(path)
            else:
                stats["images_unreadable"] += 1
            continue
        width, height = file_size
        if (width, height) != (image["width"], image["height"]):
            stats["image_sizes_corrected"] += 1
            resized.append(
                f"images[{position[image['id']]}] ({image['file_name']}): JSON width x height "
                f"{image['width']}x{image['height']}, file {width}x{height}"
            )
        boxes, categories = clean_objects(
            [a["bbox"] for a in annotations],
            [class_index[a["category_id"]] for a in annotations],
            [a.get("iscrowd", 0) for a in annotations],
            width,
            height,
            stats,
        )
        if train and not boxes:
            stats["images_without_objects_dropped"] += 1
            continue
        records.append(
            {
                "image_id": image["id"],
                "image": path,
                "width": width,
                "height": height,
                "objects": {"bbox": boxes, "category": categories},
            }
        )
    if irregular:
        logger.warning(
            "%s: skipped %d image paths that are no regular files (FIFOs, devices, sockets or folders, which a read "
            "could block on forever): %s.",
            annotations_file,
            len(irregular),
            ", ".join(irregular[:3]) + (" ..." if len(irregular) > 3 else ""),
        )
    if resized:
        logger.warning(
            "%s: %d images are not the size their 'width'/'height' fields say; using the files' sizes. First: %s.",
            annotations_file,
            len(resized),
            "; ".join(resized[:3]),
        )
    if stats:
        logger.info("%s: %s", annotations_file, dict(stats))
    if train and not records:
        raise NoTrainingDataError(
            f"{annotations_file}: no usable training image among {len(images)} in {images_dir}: {describe_counts(stats)}."
        )
    if streaming:
        dataset = _stream(_coco_records, shards_for(len(records), world_size, num_workers), records=tuple(records))
    else:
        dataset = datasets.Dataset.from_list(records, features=RECORD_FEATURES)
    max_objects = max((len(record["objects"]["bbox"]) for record in records), default=0)
    return DetectionSplit(dataset, label_map, None if train else references, stats, max_objects, len(records))


def _raw_image_bytes(image):
    """
    A PIL image as the `Image()` feature's `{"bytes", "path"}` value in PPM, raw 8-bit RGB: lossless like the PNG
    the feature writes for a PIL image, at a tenth of the cost to write and read (no compression), which the demo's
    stream pays for every image it draws.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PPM")
    return {"bytes": buffer.getvalue(), "path": None}


def _synthetic_record(index, image_size):
    image, boxes, labels = draw_example(index, image_size, MAX_OBJECTS)
    return {
        "image_id": index,
        "image": _raw_image_bytes(image),
        "width": image_size,
        "height": image_size,
        "objects": {"bbox": boxes, "category": labels},
    }


def _synthetic_records(shards, num_shards, num_images, image_size):
    for shard in shards:
        for index in range(shard, num_images, num_shards):
            yield _synthetic_record(index, image_size)


def synthetic_split(train, num_images, image_size=96, world_size=1, num_workers=0):
    """
    The synthetic shapes (`synthetic_shapes.py`): training streams images `0 .. num_images - 1`, drawn as they are
    read; evaluation holds `num_images` images from `EVAL_INDEX_OFFSET` on, which training never draws.
    """
    label_map = LabelMap(list(SHAPE_CLASSES), list(range(len(SHAPE_CLASSES))))
    if train:
        num_shards = shards_for(num_images, world_size, num_workers)
        dataset = _stream(_synthetic_records, num_shards, num_images=num_images, image_size=image_size)
        return DetectionSplit(dataset, label_map, max_objects=MAX_OBJECTS, num_examples=num_images)
    records = [_synthetic_record(EVAL_INDEX_OFFSET + i, image_size) for i in range(num_images)]
    references = [
        {
            "image_id": r["image_id"],
            "boxes": r["objects"]["bbox"],
            "labels": r["objects"]["category"],
            "iscrowd": [0] * len(r["objects"]["bbox"]),
            "area": [w * h for _, _, w, h in r["objects"]["bbox"]],
        }
        for r in records
    ]
    return DetectionSplit(datasets.Dataset.from_list(records, features=RECORD_FEATURES), label_map, references)


def infer_bbox_format(rows, declared="auto"):
    """
    Which of `xywh` / `xyxy` the boxes of `rows` (Hub records with `width`, `height`, `objects.bbox`) are in: the one
    whose boxes stay inside the image with positive size. A declared format the boxes contradict is an error.
    """
    violations = Counter()
    for row in rows:
        limit_w, limit_h = row["width"] + 1, row["height"] + 1
        for x, y, a, b in row["objects"]["bbox"]:
            violations["xywh"] += a < 0 or b < 0 or x + a > limit_w or y + b > limit_h
            violations["xyxy"] += a < x or b < y or a > limit_w or b > limit_h
    candidates = [name for name in ("xywh", "xyxy") if violations[name] == 0]
    if declared != "auto":
        if violations[declared]:
            raise ValueError(
                f"bbox_format={declared!r} but {violations[declared]} boxes of the first {len(rows)} records leave the "
                f"image or have negative size in that format; the boxes fit {candidates or 'neither format'}."
            )
        return declared
    if not candidates:
        raise ValueError(f"The boxes fit neither xywh nor xyxy inside the image ({dict(violations)} violations).")
    if len(candidates) == 2:
        logger.warning("Boxes of the first %d records fit both xywh and xyxy; assuming COCO xywh.", len(rows))
    return candidates[0]


def hub_split(
    name, split, train, config_name=None, streaming=True, bbox_format="auto", max_samples=None, **load_kwargs
):
    """
    A parquet detection data set (Hub id or local folder) in one of the schemas in the module docstring. `split` may
    slice (`"train[:85%]"`, read without streaming); `load_kwargs` go to `datasets.load_dataset`.
    """
    dataset = datasets.load_dataset(name, config_name, split=split, streaming=streaming or None, **load_kwargs)
    objects = (dataset.features or {}).get("objects")
    category = objects.get("category") if isinstance(objects, dict) else None
    category = getattr(category, "feature", category)
    if not {"image", "width", "height"} <= set(dataset.features or {}) or not isinstance(category, ClassLabel):
        raise ValueError(
            f"{name}: expected columns image, width, height and objects.bbox / objects.category (a ClassLabel); got "
            f"{dataset.features}. See detection_data.py for the supported schemas."
        )
    if max_samples is not None:
        dataset = dataset.take(max_samples) if streaming else dataset.select(range(min(max_samples, len(dataset))))
    dataset = dataset.cast_column("image", Image(decode=False))
    bbox_format = infer_bbox_format(list(dataset.take(64)), bbox_format)
    label_map = LabelMap(list(category.names), list(range(len(category.names))))
    stats = Counter()

    def to_record(row, index):
        boxes = (
            [[x, y, a - x, b - y] for x, y, a, b in row["objects"]["bbox"]]
            if bbox_format == "xyxy"
            else row["objects"]["bbox"]
        )
        crowd = row["objects"].get("iscrowd", row["objects"].get("is_crowd", [0] * len(boxes)))
        kept_boxes, categories = clean_objects(
            boxes, row["objects"]["category"], crowd, row["width"], row["height"], stats
        )
        return {
            "image_id": row.get("image_id", index),
            "image": row["image"],
            "width": row["width"],
            "height": row["height"],
            "objects": {"bbox": kept_boxes, "category": categories},
            "reference": {
                "boxes": boxes,
                "labels": list(row["objects"]["category"]),
                "iscrowd": [int(c) for c in crowd],
            },
        }

    dataset = dataset.map(to_record, with_indices=True, remove_columns=list(dataset.features))
    references = None
    if not train:
        references = [
            {
                "image_id": row["image_id"],
                **row["reference"],
                "area": [w * h for _, _, w, h in row["reference"]["boxes"]],
            }
            for row in dataset
        ]
    dataset = dataset.remove_columns("reference")
    if train:
        dataset = dataset.filter(lambda row: len(row["objects"]["bbox"]) > 0)
    num_examples = None if streaming else len(dataset)
    return DetectionSplit(dataset, label_map, references, stats, num_examples=num_examples)


class ImageReader:
    """
    `read_image` (the image processor's one image reader) over the `image` value of a record, with the training
    run's policy for bad files: an unreadable image (missing, truncated, not an image) is skipped with a warning and
    counted, or, with `fail_on_bad_records`, raises naming the file.
    """

    def __init__(self, fail_on_bad_records=False):
        self.fail_on_bad_records = fail_on_bad_records
        self.num_skipped = 0

    def __call__(self, value):
        read = self.read(value)
        return None if read is None else read[0]

    def read(self, value, max_size=None):
        """`read_image` of a record's `{"path", "bytes"}` value: `(image, original_size)`, or `None` if skipped."""
        try:
            return read_image(value.get("bytes") or value["path"], max_size)
        except InvalidImageError as error:
            if self.fail_on_bad_records:
                raise ValueError(f"Cannot read image {value.get('path') or '<image bytes>'}: {error}") from error
            self.num_skipped += 1
            logger.warning(
                "Skipped unreadable image %s (%s); %d skipped so far in this process.",
                value.get("path") or "<image bytes>",
                error,
                self.num_skipped,
            )
            return None


class TrainAugmentation:
    """
    The official detection training augmentation, box-aware through torchvision `transforms.v2`: scale jitter of the
    canvas size by U(`min_scale`, `max_scale`) with the aspect ratio kept, a random crop of at most the canvas and a
    horizontal flip. Boxes leaving the crop are clipped, and dropped once nothing is left. The image processor then
    pads the crop to the canvas, as at inference. Images of any shape go through: a side never shrinks below 1 pixel
    (a 1x600 image stays 1 pixel high), where torchvision's `ScaleJitter` would ask for a 0-pixel side and fail.
    """

    def __init__(self, image_size, min_scale=0.3, max_scale=2.0, flip_probability=0.5):
        self.image_size = image_size
        self.min_scale, self.max_scale = min_scale, max_scale
        self.flip = v2.RandomHorizontalFlip(flip_probability)
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1.0)

    @property
    def max_image_size(self):
        """The longest side the jitter can resize an image to: a larger one can be decoded at this size."""
        return math.ceil(self.image_size * self.max_scale)

    def jitter(self, image, boxes):
        height, width = image.shape[-2:]
        scale = self.min_scale + (self.max_scale - self.min_scale) * float(torch.rand(()))
        ratio = self.image_size * scale / max(height, width)
        size = [max(1, round(height * ratio)), max(1, round(width * ratio))]
        return F.resize(image, size, antialias=True), F.resize(boxes, size)

    def __call__(self, image, boxes, labels):
        """`(3, H, W)` image, `(N, 4)` xyxy pixel boxes, `(N,)` labels -> crop of at most `S` x `S`, boxes, labels."""
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, boxes = self.jitter(tv_tensors.Image(image), boxes)
        height, width = image.shape[-2:]
        crop_height, crop_width = min(height, self.image_size), min(width, self.image_size)
        top = int(torch.randint(0, height - crop_height + 1, ()))
        left = int(torch.randint(0, width - crop_width + 1, ()))
        image, boxes = (
            F.crop(image, top, left, crop_height, crop_width),
            F.crop(boxes, top, left, crop_height, crop_width),
        )
        sample = self.sanitize(self.flip({"image": image, "boxes": F.clamp_bounding_boxes(boxes), "labels": labels}))
        return sample["image"].as_subclass(torch.Tensor), sample["boxes"].as_subclass(torch.Tensor), sample["labels"]


class TrainTransform:
    """
    Record batch -> model inputs, for `IterableDataset.map(batched=True)`: decode and augment each image, then the
    image processor puts the crops on its canvas (padding, normalisation) without resizing them (the augmentation
    scaled them) and turns their boxes into token targets with the official sequence augmentation, the same code as
    `model(**processor(images, annotations=...))`. Unreadable records are left out of the batch.

    A box is converted once at each boundary: the record's COCO `[x, y, w, h]` pixels become `(x_min, y_min, x_max,
    y_max)` pixels here, which the augmentation and the processor keep until the codec writes tokens.
    """

    def __init__(self, image_processor, augmentation, reader):
        self.image_processor = image_processor
        self.augmentation = augmentation
        self.reader = reader

    def __call__(self, batch):
        crops, objects = [], []
        for value, record_objects in zip(batch["image"], batch["objects"]):
            read = self.reader.read(value, self.augmentation.max_image_size)
            if read is None:
                continue
            image, (height, width) = read
            xywh = torch.tensor(record_objects["bbox"], dtype=torch.float32).reshape(-1, 4)
            # A large image is decoded smaller: its boxes follow.
            scale = torch.tensor([image.shape[-1] / width, image.shape[-2] / height] * 2)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1) * scale
            labels = torch.tensor(record_objects["category"], dtype=torch.long)
            crop, boxes, labels = self.augmentation(image, boxes, labels)
            crops.append(crop)
            objects.append((boxes, labels))
        return self.model_inputs(crops, objects)

    def model_inputs(self, crops, objects):
        """Crops and their `(boxes, labels)` -> per-example `pixel_values` and token targets (lists of tensors)."""
        if not crops:
            return {"pixel_values": [], "labels": [], "decoder_input_ids": [], "token_weights": []}
        # The reader's pixels are in [0, 1] already.
        pixel_values = self.image_processor(crops, do_resize=False, do_rescale=False, return_tensors="pt")
        targets = self.image_processor.encode_objects(objects, do_sequence_augmentation=True)
        return {"pixel_values": list(pixel_values["pixel_values"]), **{key: list(v) for key, v in targets.items()}}


def train_stream(split, transform, seed=0, shuffle_buffer_size=1000, batch_size=16):
    """Shuffled (shard order and a buffer, one seed on every rank so that shards stay disjoint), then transformed."""
    dataset = split.dataset
    if not isinstance(dataset, IterableDataset):
        dataset = dataset.to_iterable_dataset(num_shards=shards_for(len(dataset)))
    dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return dataset.map(transform, batched=True, batch_size=batch_size, remove_columns=list(RECORD_FEATURES))


def collate_train(examples):
    """Stacks transformed examples; pixels in channels-last, the layout convolutions run fastest in."""
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
    return batch


class EvalCollator:
    """Records -> `pixel_values` through the image processor, plus `image_ids` and original `target_sizes` (h, w)."""

    def __init__(self, image_processor, reader):
        self.image_processor = image_processor
        self.reader = reader

    def __call__(self, rows):
        images, image_ids, sizes = [], [], []
        for row in rows:
            # Decoded at most at the canvas size; predictions are mapped back to the original size.
            read = self.reader.read(row["image"], self.image_processor.image_size)
            if read is not None:
                images.append(read[0])
                sizes.append(read[1])
                image_ids.append(row["image_id"])
        if not images:
            return {
                "pixel_values": None,
                "image_ids": torch.zeros(0, dtype=torch.long),
                "target_sizes": torch.zeros(0, 2),
            }
        # The reader's pixels are in [0, 1] already.
        pixel_values = self.image_processor(images=images, do_rescale=False, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": pixel_values.contiguous(memory_format=torch.channels_last),
            "image_ids": torch.tensor(image_ids),
            "target_sizes": torch.tensor(sizes),
        }
