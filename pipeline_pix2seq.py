"""
`pipeline("object-detection")` for Pix2Seq: transformers' `ObjectDetectionPipeline` with the input and output rules
of this model. Saved folders name it in `config.json` (`custom_pipelines`), so that
`pipeline("object-detection", model=folder, trust_remote_code=True)` builds it.

What it changes:
- Images reach the image processor as they are stored: transformers' `load_image` converts every image to 8-bit RGB
  first, which saturates a 16-bit PNG to white; the processor reads 16-bit images as 16-bit.
- Boxes are rounded to whole pixels (transformers truncates them), and a box left without area is dropped: on a
  1 x 1 image every box would otherwise come out as `{xmin: 0, ymin: 0, xmax: 0, ymax: 0}`.
- `threshold` must be a number from 0 to 1; anything else is refused by name instead of returning everything,
  nothing, or failing deep inside.
- An empty list of images gives an empty list.
"""

import base64
import binascii
import numbers
import os
import urllib.request

import PIL.Image
import PIL.ImageOps
import torch
from transformers.pipelines.object_detection import ObjectDetectionPipeline


try:
    from .image_processing_pix2seq import InvalidImageError, read_image
except ImportError:
    from image_processing_pix2seq import InvalidImageError, read_image


def check_threshold(threshold):
    """Raises `TypeError` for a `threshold` that is not a number and `ValueError` for one outside [0, 1] (or NaN)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number from 0 to 1, got {threshold!r} ({type(threshold).__name__}).")
    if not 0 <= threshold <= 1:
        raise ValueError(
            f"threshold must be a number from 0 to 1 (detections scoring above it are kept), got {threshold!r}."
        )


def _read_bytes(data, source):
    try:
        return read_image(data)
    except InvalidImageError as error:
        raise InvalidImageError(f"Cannot read image {source}: {error.__cause__ or error}") from error


def load_pipeline_image(image, timeout=None):
    """
    `(image, (height, width))` from what the object-detection pipeline accepts: a PIL image (turned upright by its
    EXIF orientation, its mode kept for the processor), or a local path, an http(s) URL or a base64 string (optionally
    a `data:image/` URL), read by the image processor's one reader; the size is that of the upright original image.
    """
    if isinstance(image, PIL.Image.Image):
        image = PIL.ImageOps.exif_transpose(image)
        return image, (image.height, image.width)
    if isinstance(image, os.PathLike) or (isinstance(image, str) and os.path.exists(image)):
        return read_image(os.fspath(image))
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=timeout) as response:
            return _read_bytes(response.read(), image)
    if isinstance(image, str):
        try:
            data = base64.b64decode(image.split(",", 1)[1] if image.startswith("data:image/") else image)
        except (binascii.Error, ValueError) as error:
            raise ValueError(
                "An image must be a PIL image, a path to an existing file, an http(s) URL or a base64 string; got "
                f"{image[:80]!r}."
            ) from error
        return _read_bytes(data, "given as base64")
    raise TypeError(
        "An image must be a PIL image, a path to an existing file, an http(s) URL or a base64 string; got "
        f"{type(image).__name__}."
    )


class Pix2SeqObjectDetectionPipeline(ObjectDetectionPipeline):
    """
    Object detection with Pix2Seq; called as transformers' `ObjectDetectionPipeline` is (see the module docstring for
    what differs). Returns, per image, a list of `{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}` with
    boxes in whole pixels of the original (upright) image, each of positive width and height.
    """

    def __call__(self, *args, **kwargs):
        images = args[0] if args else kwargs.get("inputs", kwargs.get("images"))
        if isinstance(images, (list, tuple)) and not images:
            self._sanitize_parameters(**kwargs)
            return []
        return super().__call__(*args, **kwargs)

    def _sanitize_parameters(self, **kwargs):
        if "threshold" in kwargs:
            check_threshold(kwargs["threshold"])
        return super()._sanitize_parameters(**kwargs)

    def preprocess(self, image, timeout=None):
        image, original_size = load_pipeline_image(image, timeout)
        inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        inputs["target_size"] = torch.IntTensor([original_size])
        return inputs

    def postprocess(self, model_outputs, threshold=0.5):
        target_size = model_outputs["target_size"]
        result = self.image_processor.post_process_object_detection(model_outputs, threshold, target_size)[0]
        detections = []
        for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].round()):
            xmin, ymin, xmax, ymax = box.int().tolist()
            if xmax > xmin and ymax > ymin:
                box = {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}
                detections.append({"score": score, "label": self.model.config.id2label[label], "box": box})
        return detections


__all__ = ["Pix2SeqObjectDetectionPipeline", "check_threshold", "load_pipeline_image"]
