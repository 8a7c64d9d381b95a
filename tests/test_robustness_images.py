"""Messy image files: every one is converted as a viewer shows it, or rejected with an error naming the file."""

import numpy as np
import PIL.Image
import pytest
import torch

from image_processing_pix2seq import InvalidImageError, Pix2SeqImageProcessor, read_image, to_rgb_tensor


RED, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)


def pixel(tensor, y, x):
    return tuple(round(v, 2) for v in tensor[:, y, x].tolist())


def saved(image, path, **save_kwargs):
    image.save(path, **save_kwargs)
    return read_image(path)[0]


def test_grayscale_becomes_three_equal_channels(tmp_path):
    tensor = to_rgb_tensor(saved(PIL.Image.new("L", (5, 3), 51), tmp_path / "gray.png"))
    assert tensor.shape == (3, 3, 5)
    assert pixel(tensor, 1, 1) == (0.2, 0.2, 0.2)


def test_transparent_pixels_of_rgba_and_gray_alpha_are_shown_over_white(tmp_path):
    image = PIL.Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 255, 0))  # a colour no viewer shows: it is fully transparent
    tensor = to_rgb_tensor(saved(image, tmp_path / "rgba.png"))
    assert pixel(tensor, 0, 0) == RED
    assert pixel(tensor, 0, 1) == WHITE
    gray_alpha = to_rgb_tensor(saved(PIL.Image.new("LA", (1, 1), (0, 0)), tmp_path / "la.png"))
    assert pixel(gray_alpha, 0, 0) == WHITE


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images_take_their_palette_colours_and_transparency(tmp_path, transparent):
    image = PIL.Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    save_kwargs = {"transparency": 1} if transparent else {}
    tensor = to_rgb_tensor(saved(image, tmp_path / "palette.png", **save_kwargs))
    assert pixel(tensor, 0, 0) == RED
    assert pixel(tensor, 0, 1) == (WHITE if transparent else BLUE)


def test_sixteen_bit_grayscale_keeps_its_range_even_when_dark(tmp_path):
    array = np.array([[200, 60000]], dtype=np.uint16)  # a dark pixel would read as 8-bit 0.78 if guessed by range
    PIL.Image.fromarray(array).save(tmp_path / "depth.png")
    assert PIL.Image.open(tmp_path / "depth.png").mode.startswith("I;16")
    tensor = read_image(tmp_path / "depth.png")[0]
    assert tensor[:, 0, 0].tolist() == pytest.approx([200 / 65535] * 3)
    assert tensor[:, 0, 1].tolist() == pytest.approx([60000 / 65535] * 3)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    PIL.Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert PIL.Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    red, green, blue = read_image(tmp_path / "cmyk.jpg")[0][:, 4, 4].tolist()
    assert red < 0.1 and green > 0.9 and blue > 0.9  # pure cyan


# EXIF orientation -> where the stored top-left corner appears on screen, and whether width and height swap.
ORIENTATIONS = {
    1: ("top", "left", False),
    2: ("top", "right", False),  # mirrored
    3: ("bottom", "right", False),  # rotated 180
    6: ("top", "right", True),  # shown rotated 90 clockwise
    8: ("bottom", "left", True),  # shown rotated 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_exif_rotated_jpeg_comes_out_as_a_viewer_shows_it(tmp_path, orientation):
    stored = PIL.Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red marks the stored top-left corner
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    tensor = to_rgb_tensor(saved(stored, tmp_path / "photo.jpg", exif=exif, quality=95))

    vertical, horizontal, swapped = ORIENTATIONS[orientation]
    assert tensor.shape[1:] == ((64, 32) if swapped else (32, 64))
    height, width = tensor.shape[1:]
    y = 4 if vertical == "top" else height - 5
    x = 4 if horizontal == "left" else width - 5
    assert tensor[0, y, x] > 0.9 and tensor[2, y, x] < 0.1
    assert tensor[0, height - 1 - y, width - 1 - x] < 0.1  # the opposite corner is blue


@pytest.mark.parametrize("size", [(1, 1), (4000, 1), (1, 4000)])
def test_tiny_and_extreme_aspect_images_fill_at_least_one_canvas_pixel(tmp_path, size):
    processor = Pix2SeqImageProcessor(image_size=64, pad_value=0.3)
    image = saved(PIL.Image.new("RGB", size, (255, 0, 0)), tmp_path / "thin.png")
    canvas = processor(image)["pixel_values"][0]
    width, height = size
    expected_height, expected_width = max(1, round(64 * height / max(size))), max(1, round(64 * width / max(size)))
    assert canvas.shape == (3, 64, 64)
    assert torch.allclose(canvas[:, :expected_height, :expected_width], torch.tensor(RED).view(3, 1, 1), atol=1e-3)
    assert torch.all(canvas[:, expected_height:, :] == 0.3) and torch.all(canvas[:, :, expected_width:] == 0.3)


def test_one_pixel_high_numpy_array_is_read_channels_last():
    array = np.zeros((1, 4000, 3), dtype=np.uint8)
    array[..., 0] = 255
    tensor = to_rgb_tensor(array)
    assert tensor.shape == (3, 1, 4000)
    assert pixel(tensor, 0, 3999) == RED


@pytest.mark.parametrize("layout", ["numpy", "tensor"])
def test_two_dimensional_arrays_are_grayscale_whatever_their_width(layout):
    array = np.zeros((5, 3), dtype=np.uint8)  # a width of 3 must not be read as 3 channels
    array[0, 2] = 255
    tensor = to_rgb_tensor(array if layout == "numpy" else torch.from_numpy(array))
    assert tensor.shape == (3, 5, 3)
    assert pixel(tensor, 0, 2) == WHITE


def test_image_with_an_empty_side_is_rejected():
    with pytest.raises(InvalidImageError, match="empty side"):
        to_rgb_tensor(PIL.Image.new("RGB", (0, 5)))


def test_truncated_jpeg_is_rejected_with_its_file_name(tmp_path):
    path = tmp_path / "cut_short.jpg"
    PIL.Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:800])
    with pytest.raises(InvalidImageError, match="cut_short.jpg"):
        read_image(path)


@pytest.mark.parametrize("content", [b"", b"id,label\n1,cat\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_non_image_files_are_rejected_with_their_file_name(tmp_path, content):
    path = tmp_path / "not_an_image.png"
    path.write_bytes(content)
    with pytest.raises(InvalidImageError, match="not_an_image.png"):
        read_image(path)


def test_every_handled_file_kind_goes_through_the_processor_to_a_valid_canvas(tmp_path):
    palette = PIL.Image.new("P", (9, 7), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    images = {
        "gray.png": PIL.Image.new("L", (9, 7), 80),
        "rgba.png": PIL.Image.new("RGBA", (9, 7), (10, 20, 30, 100)),
        "palette.gif": palette,
        "bilevel.png": PIL.Image.new("1", (9, 7), 1),
        "depth.png": PIL.Image.fromarray(np.full((7, 9), 65535, dtype=np.uint16)),
        "cmyk.jpg": PIL.Image.new("CMYK", (9, 7), (0, 0, 0, 255)),
    }
    processor = Pix2SeqImageProcessor(image_size=32)
    batch = processor([saved(image, tmp_path / name) for name, image in images.items()])["pixel_values"]
    assert batch.shape == (len(images), 3, 32, 32)
    assert torch.isfinite(batch).all() and batch.min() >= 0 and batch.max() <= 1
