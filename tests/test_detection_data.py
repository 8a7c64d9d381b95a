import hashlib
import io
import json
import logging
from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from testing_utils import write_coco

import training.detection_data
from image_processing_pix2seq import Pix2SeqImageProcessor
from tokenization_pix2seq import Pix2SeqTokenizer
from training.detection_data import (
    ImageReader,
    TrainAugmentation,
    TrainTransform,
    clean_objects,
    coco_split,
    collate_train,
    hub_split,
    infer_bbox_format,
    load_coco_annotations,
    shards_for,
    synthetic_split,
    train_stream,
)
from training.synthetic_shapes import EVAL_INDEX_OFFSET, draw_example


def test_malformed_json_error_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 1"):
        load_coco_annotations(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("annotations"), "field 'annotations': missing"),
        (lambda c: c["images"][0].pop("width"), r"images\[0\] field 'width'"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\] field 'bbox'"),
        (lambda c: c["annotations"][0].update(image_id=99), r"annotations\[0\] field 'image_id'"),
    ],
)
def test_invalid_fields_are_named_in_the_error(tmp_path, change, message):
    _, path = write_coco(tmp_path, {1: (32, 32)}, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=message) as error:
        load_coco_annotations(path)
    assert "instances.json" in str(error.value)


def test_category_ids_missing_from_label_map_are_listed(tmp_path):
    annotations = [{"image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for c in (1, 3, 5, 3)]
    _, path = write_coco(tmp_path, {1: (32, 32)}, annotations)
    with pytest.raises(ValueError, match=r"category ids \[3, 5\] that are not in 'categories' \[1, 7\]"):
        load_coco_annotations(path)


def test_boxes_are_clipped_and_empty_or_crowd_ones_dropped_and_counted():
    stats = Counter()
    boxes = [[-5, -5, 10, 10], [20, 20, 0, 5], [20, 20, -3, 5], [40, 40, 5, 5], [5, 5, 4, 4], [1, 1, 30, 30]]
    crowd = [0, 0, 0, 0, 0, 1]
    kept, categories = clean_objects(boxes, list(range(6)), crowd, 32, 32, stats)
    assert kept == [[0.0, 0.0, 5.0, 5.0], [5, 5, 4, 4]]
    assert categories == [0, 4]
    assert stats == {"boxes_clipped": 1, "empty_boxes_dropped": 3, "crowd_boxes_dropped": 1}


def test_training_drops_images_without_objects_and_evaluation_keeps_original_annotations(tmp_path):
    annotations = [
        {"image_id": 1, "category_id": 7, "bbox": [30, 30, 10, 10]},  # leaves the 32x32 image: clipped
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 32, 32], "iscrowd": 1},
    ]
    images, path = write_coco(tmp_path, {1: (32, 32), 2: (32, 32)}, annotations)
    train = coco_split(images, path, train=True, streaming=False)
    assert train.dataset["image_id"] == [1]
    assert train.dataset[0]["objects"] == {"bbox": [[30.0, 30.0, 2.0, 2.0]], "category": [1]}
    assert train.stats["images_without_objects_dropped"] == 1
    evaluation = coco_split(images, path, train=False, streaming=False)
    assert evaluation.dataset["image_id"] == [1, 2]
    assert evaluation.references[0]["boxes"] == [[30, 30, 10, 10], [0, 0, 32, 32]]
    assert evaluation.references[0]["labels"] == [7, 1]
    assert evaluation.references[0]["iscrowd"] == [0, 1]
    assert evaluation.label_map.category_ids == [1, 7]


def test_stream_shards_cover_every_image_once_for_every_rank_and_worker(tmp_path):
    images = dict.fromkeys(range(1, 41), (16, 16))
    annotations = [{"image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4]} for i in images]
    folder, path = write_coco(tmp_path, images, annotations)
    split = coco_split(folder, path, train=True, world_size=2, num_workers=2)
    assert split.dataset.n_shards % 4 == 0
    shuffled = split.dataset.shuffle(seed=3, buffer_size=8)
    per_rank = [[row["image_id"] for row in shuffled.shard(num_shards=2, index=rank)] for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(images)
    assert shards_for(3, world_size=2, num_workers=4) == 3


def test_unreadable_image_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    reader = ImageReader()
    with caplog.at_level(logging.WARNING):
        assert reader({"path": str(bad), "bytes": None}) is None
        assert reader({"path": str(tmp_path / "missing.png"), "bytes": None}) is None
    assert reader.num_skipped == 2
    assert "bad.jpg" in caplog.text and "2 skipped" in caplog.text


def test_unreadable_image_fails_fast_with_its_name_under_the_flag(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(ValueError, match="bad.jpg"):
        ImageReader(fail_on_bad_records=True)({"path": str(bad), "bytes": None})


def processor(size=32, max_instances=6):
    codec = Pix2SeqTokenizer(class_ids=range(4), num_bins=64, max_instances=max_instances, eos_mode=True).to_dict()
    return Pix2SeqImageProcessor(size={"longest_edge": size}, codec=codec)


def test_stream_skips_a_bad_record_and_continues(tmp_path):
    images = dict.fromkeys(range(1, 5), (32, 32))
    annotations = [{"image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in images]
    folder, path = write_coco(tmp_path, images, annotations)
    # A header that reads (the split keeps the image) and pixel data that does not (decoding skips it).
    (folder / "3.png").write_bytes((folder / "3.png").read_bytes()[:60])
    reader = ImageReader()
    transform = TrainTransform(processor(), TrainAugmentation(32), reader)
    examples = list(train_stream(coco_split(folder, path, train=True), transform, batch_size=2))
    assert len(examples) == 3
    assert reader.num_skipped == 1
    batch = collate_train(examples)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert batch["labels"].shape == (3, 5 * 6 + 1)
    assert batch["decoder_input_ids"].shape == batch["token_weights"].shape == (3, 5 * 6 + 1)


def test_flip_moves_boxes_with_the_pixels():
    image = torch.zeros(3, 32, 32)
    image[:, 4:12, 2:10] = 1.0  # a white block at x 2..10, y 4..12
    augmentation = TrainAugmentation(32, min_scale=1.0, max_scale=1.0, flip_probability=1.0)
    canvas, boxes, labels = augmentation(image, torch.tensor([[2.0, 4.0, 10.0, 12.0]]), torch.tensor([3]))
    assert boxes.tolist() == [[22.0, 4.0, 30.0, 12.0]]
    assert labels.tolist() == [3]
    assert canvas[0, 4:12, 22:30].min() == 1.0 and canvas[0].sum() == 64


def test_scale_jitter_and_crop_keep_boxes_on_the_canvas():
    torch.manual_seed(1)
    augmentation = TrainAugmentation(64)
    image = torch.rand(3, 48, 80)
    boxes = torch.tensor([[0.0, 0.0, 80.0, 48.0], [10.0, 10.0, 30.0, 40.0], [60.0, 5.0, 79.0, 20.0]])
    for _ in range(20):
        canvas, out, labels = augmentation(image, boxes, torch.tensor([0, 1, 2]))
        assert canvas.shape[0] == 3 and max(canvas.shape[1:]) <= 64
        assert len(out) == len(labels) <= 3
        assert (out >= 0).all() and (out <= 64).all()
        assert (out[:, 2:] > out[:, :2]).all()


def test_synthetic_images_are_deterministic_and_held_out_ones_never_trained_on():
    image, boxes, labels = draw_example(7)
    again, boxes_again, _ = draw_example(7)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and boxes == boxes_again
    assert all(0 <= x and 0 <= y and x + w <= 96 and y + h <= 96 for x, y, w, h in boxes)
    evaluation = synthetic_split(False, 5)
    assert min(evaluation.dataset["image_id"]) >= EVAL_INDEX_OFFSET
    assert (
        len(evaluation.references) == 5
        and evaluation.references[0]["labels"] == evaluation.dataset[0]["objects"]["category"]
    )
    train = synthetic_split(True, 12, world_size=2)
    assert sorted(row["image_id"] for row in train.dataset) == list(range(12))


# The pixels, boxes and labels of synthetic images 0-99 and of the first 20 held-out ones, as drawn when the demo's
# figures in benchmarks/RESULTS.md were measured. A change of the drawing changes what the demo learns and how it
# scores: its learning curve must then be measured again, and this digest updated with it.
SYNTHETIC_IMAGES_SHA256 = "c36a55abc50288f15e031db34d5cb439a68027ea0351aa25e20e9eff1033f6ab"


def test_synthetic_images_are_the_ones_the_demo_figures_were_measured_on():
    digest = hashlib.sha256()
    for index in [*range(100), *range(EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + 20)]:
        image, boxes, labels = draw_example(index)
        digest.update(np.asarray(image).tobytes())
        digest.update(repr((boxes, labels)).encode())
    assert digest.hexdigest() == SYNTHETIC_IMAGES_SHA256


def demo_examples(count=40):
    """The first transformed examples of the demo's training stream (96 px, no jitter), seeded."""
    torch.manual_seed(0)
    codec = Pix2SeqTokenizer(class_ids=range(4), num_bins=48, max_instances=6, eos_mode=True).to_dict()
    transform = TrainTransform(
        Pix2SeqImageProcessor(size={"longest_edge": 96}, codec=codec), TrainAugmentation(96, 1.0, 1.0), ImageReader()
    )
    stream = train_stream(synthetic_split(True, 100), transform, batch_size=8)
    return [example for _, example in zip(range(count), stream)]


def test_demo_stream_gives_the_examples_it_gave_with_png_records(monkeypatch):
    examples = demo_examples()
    # The records as they were: the PIL image itself, which the `Image()` feature stores as PNG.
    monkeypatch.setattr(training.detection_data, "_raw_image_bytes", lambda image: image)
    assert synthetic_split(True, 1).dataset.features["image"] == datasets.Image(decode=False)
    for example, png_example in zip(examples, demo_examples(), strict=True):
        for key, value in png_example.items():
            torch.testing.assert_close(example[key], value, rtol=0, atol=0, msg=key)


def test_synthetic_evaluation_records_decode_to_the_drawn_pixels():
    reader = ImageReader()
    for row in synthetic_split(False, 4).dataset:
        drawn, boxes, labels = draw_example(row["image_id"])
        assert torch.equal(reader(row["image"]), reader(datasets.Image().encode_example(drawn)))
        assert row["objects"]["category"] == labels
        np.testing.assert_allclose(row["objects"]["bbox"], boxes, rtol=1e-6)


def hub_stand_in(tmp_path, boxes, fmt_name="cppe"):
    """A local parquet data set with the `cppe-5` schema (what `--dataset_name` reads from the Hub)."""
    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=["Coverall", "Mask"])),
            },
        }
    )
    rows = [
        {
            "image_id": i,
            "image": PIL.Image.new("RGB", (40, 30)),
            "width": 40,
            "height": 30,
            "objects": {"bbox": b, "category": [i % 2] * len(b)},
        }
        for i, b in enumerate(boxes)
    ]
    folder = tmp_path / fmt_name
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / f"{split}-00000.parquet"))
    return str(folder)


def test_hub_schema_adapter_reads_xywh_and_keeps_class_names(tmp_path):
    folder = hub_stand_in(tmp_path, [[[5, 5, 30, 20]], [[0, 0, 10, 10], [20, 2, 19, 27]], []])
    train = hub_split(folder, "train", train=True, streaming=True)
    rows = list(train.dataset)
    assert train.label_map.names == ["Coverall", "Mask"]
    assert [row["image_id"] for row in rows] == [0, 1]  # the image without objects is not trained on
    assert rows[1]["objects"]["bbox"] == [[0, 0, 10, 10], [20, 2, 19, 27]]
    evaluation = hub_split(folder, "validation", train=False, streaming=False)
    assert [r["image_id"] for r in evaluation.references] == [0, 1, 2]


def test_hub_adapter_detects_xyxy_boxes_and_converts_them(tmp_path):
    folder = hub_stand_in(tmp_path, [[[5, 5, 35, 25]], [[30, 2, 39, 29]]], "xyxy")
    train = hub_split(folder, "train", train=True, streaming=False)
    assert list(train.dataset)[0]["objects"]["bbox"] == [[5, 5, 30, 20]]
    with pytest.raises(ValueError, match="bbox_format='xywh'"):
        hub_split(folder, "train", train=True, bbox_format="xywh")


def test_bbox_format_that_fits_both_readings_defaults_to_coco_xywh():
    rows = [{"width": 100, "height": 100, "objects": {"bbox": [[10, 10, 20, 20]]}}]
    assert infer_bbox_format(rows) == "xywh"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["images"].append({**c["images"][0], "file_name": "other.png"}),
            r"images\[1\] field 'id': 1 repeats the id of images\[0\]",
        ),
        (lambda c: c["annotations"][0].update(bbox=[float("nan"), 5, 3, 10]), r"annotations\[0\] field 'bbox'.*nan"),
        (lambda c: c["annotations"][0].update(bbox=[1, 1, float("inf"), 10]), r"annotations\[0\] field 'bbox'.*inf"),
        (lambda c: c["annotations"][0].update(bbox=[True, 5, 3, 10]), r"annotations\[0\] field 'bbox'.*True"),
        (lambda c: c.update(categories=[]), "field 'categories': empty"),
    ],
)
def test_bad_annotation_values_are_named_with_file_record_and_field(tmp_path, change, message):
    _, path = write_coco(tmp_path, {1: (32, 32)}, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))  # Python's json writes NaN and Infinity, as some exporters do
    with pytest.raises(ValueError, match=message) as error:
        coco_split(path.parent / "images", path, train=True)
    assert "instances.json" in str(error.value)


def test_json_size_that_disagrees_with_the_file_warns_and_the_real_size_is_used(tmp_path, caplog):
    images, path = write_coco(tmp_path, {1: (40, 20)}, [{"image_id": 1, "category_id": 1, "bbox": [10, 2, 25, 15]}])
    coco = json.loads(path.read_text())
    coco["images"][0].update(width=20, height=40)
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):
        split = coco_split(images, path, train=True, streaming=False)
    assert "images[0] (1.png): JSON width x height 20x40, file 40x20" in caplog.text
    record = split.dataset[0]
    assert (record["width"], record["height"]) == (40, 20)
    assert record["objects"]["bbox"] == [[10, 2, 25, 15]]  # clipped to the file's 40x20, not the JSON's 20x40
    assert split.stats["image_sizes_corrected"] == 1


def test_train_val_split_holds_out_disjoint_images(tmp_path):
    images = dict.fromkeys(range(1, 21), (16, 16))
    annotations = [{"image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4]} for i in images]
    folder, path = write_coco(tmp_path, images, annotations)
    train = coco_split(folder, path, train=True, streaming=False, hold_out_fraction=0.15)
    evaluation = coco_split(folder, path, train=False, streaming=False, hold_out_fraction=0.15, held_out=True)
    trained, evaluated = set(train.dataset["image_id"]), {r["image_id"] for r in evaluation.references}
    assert len(evaluated) == 3 and not trained & evaluated and trained | evaluated == set(images)


@pytest.mark.parametrize("shape", [(1, 600), (600, 1), (1, 1), (2, 5000)])
def test_scale_jitter_takes_images_with_a_one_pixel_side(shape):
    torch.manual_seed(0)
    augmentation = TrainAugmentation(64, min_scale=0.3, max_scale=2.0)
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    height, width = shape
    for _ in range(10):
        crop, boxes, labels = augmentation(
            torch.rand(3, height, width), torch.tensor([[0.0, 0.0, width, height]]), torch.tensor([1])
        )
        assert min(crop.shape[-2:]) >= 1 and max(crop.shape[-2:]) <= 64 and len(boxes) == len(labels)
        canvas = processor(crop, do_resize=False, do_rescale=False, return_tensors="pt")["pixel_values"]
        assert canvas.shape == (1, 3, 64, 64)


def jpeg_bytes(width, height, **save_kwargs):
    image = PIL.Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (width // 2, height // 4, width, height // 2))  # white block at the top right
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save_kwargs)
    return buffer.getvalue()


def test_reader_decodes_a_large_image_at_reduced_size_with_its_original_size():
    image, original_size = ImageReader().read({"bytes": jpeg_bytes(4000, 3000), "path": None}, max_size=200)
    assert image.shape == (3, 150, 200) and original_size == (3000, 4000)
    assert image[:, 40:70, 110:190].mean() > 0.9 and image[:, 90:, :].mean() < 0.1
    full, full_size = ImageReader().read({"bytes": jpeg_bytes(400, 300), "path": None}, max_size=1000)
    assert full.shape == (3, 300, 400) and full_size == (300, 400)


def test_reader_turns_a_reduced_image_upright_once():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored turned; a viewer turns it 90 degrees clockwise
    value = {"bytes": jpeg_bytes(800, 400, exif=exif.tobytes()), "path": None}
    reduced, size = ImageReader().read(value, max_size=100)
    full = ImageReader()(value)
    assert size == (800, 400) and full.shape == (3, 800, 400) and reduced.shape == (3, 100, 50)
    small = torch.nn.functional.interpolate(full[None], size=(100, 50), mode="area")[0]
    assert (reduced - small).abs().mean() < 0.05


def test_training_boxes_follow_an_image_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "large.jpg"
    path.write_bytes(jpeg_bytes(4000, 3000))  # white block: x 2000-4000, y 750-1500
    augmentation = TrainAugmentation(64, min_scale=1.0, max_scale=1.0, flip_probability=0.0)
    transform = TrainTransform(processor(size=64), augmentation, ImageReader())
    outputs = transform(
        {
            "image_id": [1],
            "image": [{"path": str(path), "bytes": None}],
            "objects": [{"bbox": [[2000, 750, 2000, 750]], "category": [0]}],
        }
    )
    # The box on the canvas: x 32-64, y 12-24 of 64 pixels, the tokens y_min, x_min, y_max, x_max of 64 bins.
    bins = [round(v / 64 * 63) for v in (12, 32, 24, 64)]
    assert outputs["labels"][0][:4].tolist() == [1000 + b for b in bins]
    assert outputs["pixel_values"][0][:, 13:23, 33:63].min() > 0.9


@pytest.mark.slow
def test_a_100_megapixel_jpeg_is_read_for_training_and_evaluation_within_1_5_gb(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "huge.jpg"
    PIL.Image.new("RGB", (10000, 10000), (120, 60, 30)).save(path, quality=90)
    script = (
        "import resource, sys; from training.detection_data import ImageReader; reader = ImageReader(); "
        f"value = {{'path': {str(path)!r}, 'bytes': None}}; "
        "train = reader.read(value, max_size=1280); evaluation = reader.read(value, max_size=640); "
        "assert train[1] == evaluation[1] == (10000, 10000), (train[1], evaluation[1]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_gb = int(result.stdout.split()[-1]) / 2**20  # ru_maxrss is in KiB on Linux
    assert peak_gb <= 1.5
