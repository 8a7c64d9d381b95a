"""
Saved folders, `generate()` and the image processor against careless or hostile settings: bounds known at load time
are checked before anything is allocated, a folder missing a weight is refused by name, and a path that is no
regular file is never read (a FIFO would block forever).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import tiny_config, unblocked_after

import generation_pix2seq
from image_processing_pix2seq import (
    MAX_CANVAS_SIDE,
    InvalidImageError,
    NotARegularFileError,
    Pix2SeqImageProcessor,
    open_regular_file,
    read_image,
)
from modeling_pix2seq import Pix2SeqForObjectDetection, Pix2SeqModel


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pix2seq")
    Pix2SeqForObjectDetection(tiny_config()).save_pretrained(folder)
    Pix2SeqImageProcessor(size={"longest_edge": 64}).save_pretrained(folder)
    return folder


# Finding 7: max_new_tokens beyond the position table.


class NoStaticCache:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a static cache was allocated before the generation length was checked")


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("max_new_tokens", [33, 10**9])
def test_max_new_tokens_beyond_the_position_table_is_refused_at_load_and_before_allocation(
    model_folder, tmp_path, monkeypatch, max_new_tokens, cache_implementation
):
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in model_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update(max_new_tokens=max_new_tokens, cache_implementation=cache_implementation)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    message = rf"max_new_tokens={max_new_tokens} .* max_position_embeddings=32"
    with pytest.raises(ValueError, match=message):
        Pix2SeqForObjectDetection.from_pretrained(folder)
    # Set after loading, or per call: refused by generate() and detection, before a cache is allocated.
    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    model.generation_config.update(max_new_tokens=max_new_tokens, cache_implementation=cache_implementation)
    monkeypatch.setattr(generation_pix2seq, "StaticCache", NoStaticCache)
    pixel_values = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match=message):
        model.generate(pixel_values)
    with pytest.raises(ValueError, match=message):
        model(pixel_values=pixel_values)  # detection, as the pipeline calls it


def test_max_new_tokens_up_to_the_position_table_generates(model_folder):
    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    assert model.generate(torch.rand(1, 3, 64, 64), max_new_tokens=32).shape == (1, 33)


@pytest.mark.parametrize("max_new_tokens", [2.5, 1e9])  # JSON's 1e9 is a float
def test_max_new_tokens_that_is_no_integer_is_refused_by_name(model_folder, max_new_tokens):
    model = Pix2SeqForObjectDetection.from_pretrained(model_folder).eval()
    with pytest.raises(ValueError, match=rf"max_new_tokens={max_new_tokens!r} .* must be a positive integer"):
        model.generate(torch.rand(1, 3, 64, 64), max_new_tokens=max_new_tokens)


# Finding 8: a canvas size that would take terabytes.


@pytest.mark.parametrize(
    "size",
    [{"longest_edge": 20000}, {"longest_edge": 10**6}, {"max_height": 10**6, "max_width": 10**6}, {"longest_edge": 0}],
)
def test_a_canvas_beyond_the_bound_is_refused_when_built_loaded_or_called(tmp_path, size):
    side = next(iter(size.values()))
    message = rf"size=.*{side}.*the canvas side must be an integer from 1 to {MAX_CANVAS_SIDE}"
    with pytest.raises(ValueError, match=message):
        Pix2SeqImageProcessor(size=size)
    Pix2SeqImageProcessor(size={"longest_edge": 64}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "size": size}))
    with pytest.raises(ValueError, match=message):
        Pix2SeqImageProcessor.from_pretrained(tmp_path)
    processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    with pytest.raises(ValueError, match=message):
        processor(torch.zeros(3, 8, 8), size=size, return_tensors="pt")


def test_the_largest_allowed_canvas_is_accepted():
    assert Pix2SeqImageProcessor(size={"longest_edge": MAX_CANVAS_SIDE}).image_size == MAX_CANVAS_SIDE


# Finding 9: a weights file missing a tensor.


def test_a_folder_missing_a_weight_is_refused_naming_it(model_folder, tmp_path):
    for path in model_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.decoder.embed_positions.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"missing 1 weight.*model\.decoder\.embed_positions\.weight"):
        Pix2SeqForObjectDetection.from_pretrained(tmp_path)


def test_a_complete_folder_loads_with_its_tied_output_weight_stored_once(model_folder):
    assert "lm_head.weight" not in load_file(model_folder / "model.safetensors")
    model, info = Pix2SeqForObjectDetection.from_pretrained(model_folder, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


def test_a_detection_head_over_a_base_model_folder_loads_as_transformers_does(tmp_path):
    Pix2SeqModel(tiny_config()).save_pretrained(tmp_path)
    model, info = Pix2SeqForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert "lm_head.bias" in info["missing_keys"]


# No hang: only regular files are read.


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    link = tmp_path / "image.png"
    link.symlink_to(path)
    return link


def test_read_image_refuses_a_fifo_naming_it_instead_of_hanging(fifo):
    with unblocked_after(fifo), pytest.raises(InvalidImageError, match=rf"{fifo}.* is a FIFO.*not a regular file"):
        read_image(fifo)


def test_the_processor_refuses_a_fifo_path_naming_it(fifo):
    with unblocked_after(fifo), pytest.raises(InvalidImageError, match="not a regular file"):
        Pix2SeqImageProcessor(size={"longest_edge": 64})(str(fifo), return_tensors="pt")


@pytest.mark.parametrize("path, kind", [("/dev/zero", "character device"), (".", "folder")])
def test_devices_and_folders_are_not_regular_files(path, kind):
    with pytest.raises(NotARegularFileError, match=f"is a {kind}, not a regular file"):
        open_regular_file(path)


def test_a_regular_file_through_a_symbolic_link_is_read(tmp_path):
    (tmp_path / "file").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with open_regular_file(tmp_path / "link") as file:
        assert file.read() == b"data"
