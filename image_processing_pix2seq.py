"""
The Pix2Seq image processor. It owns "image + boxes <-> canvas + tokens", both ways: images are read, resized on their
longest side and padded bottom-right to the square canvas; COCO annotations become the model's token targets through
the box <-> token codec (`tokenization_pix2seq.py`); generated tokens become boxes, scores and labels in original
pixels (`post_process_object_detection`).
"""

import io
import os
import stat

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as F
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AnnotationFormat,
    PILImageResampling,
    SizeDict,
    validate_annotations,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


# Relative import for a saved model folder (`trust_remote_code`); the fallback for the repository root.
try:
    from .configuration_pix2seq import Pix2SeqConfig
    from .tokenization_pix2seq import Pix2SeqTokenizer
    from .tokenization_pix2seq_multitask import (
        NUM_KEYPOINTS,
        box_to_crop_canvas,
        decode_instance_masks,
        detections_to_canvas_boxes,
        detections_to_image_boxes,
        instance_segmentation_prompt,
        keypoint_crop,
        keypoint_prompt,
        post_process_keypoints,
        resized_size,
        select_instances,
    )
except ImportError:
    from configuration_pix2seq import Pix2SeqConfig
    from tokenization_pix2seq import Pix2SeqTokenizer
    from tokenization_pix2seq_multitask import (
        NUM_KEYPOINTS,
        box_to_crop_canvas,
        decode_instance_masks,
        detections_to_canvas_boxes,
        detections_to_image_boxes,
        instance_segmentation_prompt,
        keypoint_crop,
        keypoint_prompt,
        post_process_keypoints,
        resized_size,
        select_instances,
    )


logger = logging.get_logger(__name__)

# The largest canvas side a processor accepts: a float canvas takes 12 * S^2 bytes per image (0.2 GB at 4096), and a
# `size` read from a folder must not ask for terabytes. The released models use 640 to 1333.
MAX_CANVAS_SIDE = 4096

_FILE_KINDS = {
    stat.S_IFDIR: "folder",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class InvalidImageError(ValueError):
    """An image file that cannot be decoded, or an image with an empty side."""


class NotARegularFileError(OSError):
    """A path that is a FIFO, device, socket or folder where a regular file is read."""


def open_regular_file(path, mode="rb"):
    """
    Opens `path` for reading only if it is a regular file (symbolic links followed). Reading a FIFO blocks until
    something writes to it, and a device such as /dev/zero never ends; raises `NotARegularFileError` naming the path
    and what it is. The check is made on the opened file (opened without blocking), so it cannot be raced.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
        if kind != stat.S_IFREG:
            raise NotARegularFileError(
                f"{path} is a {_FILE_KINDS.get(kind, 'special file')}, not a regular file; only regular files are read"
            )
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, mode)
    except BaseException:
        os.close(descriptor)
        raise


# EXIF orientations that turn the stored image by 90 degrees, so that the upright image swaps width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
# PIL reports bad data as OSError (truncated, unidentified), SyntaxError (broken PNG chunks), ValueError or EOFError
# depending on the decoder, and a decompression bomb as its own error class.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


def header_orientation(image):
    """
    The EXIF orientation stored in an opened image's header (`None` if none). `getexif()` would decode a whole PNG
    to look for an EXIF chunk after the pixels; the header's EXIF (JPEG, WebP, PNG before the pixels) is enough.
    """
    if not image.info.get("exif"):
        return None
    exif = PIL.Image.Exif()
    exif.load(image.info["exif"])
    return exif.get(0x0112)


def _upright_size(image):
    """`(width, height)` of an opened image once turned upright by its EXIF orientation, from its header."""
    width, height = image.size
    return (height, width) if header_orientation(image) in _TRANSPOSING_ORIENTATIONS else (width, height)


def image_file_size(path):
    """
    `(width, height)` of the image file at `path` as it is read (upright), from its header without decoding the
    pixels; `None` when the file is missing or not an image.
    """
    try:
        with open_regular_file(path) as file, PIL.Image.open(file) as image:
            return _upright_size(image)
    except _DECODE_ERRORS:
        return None


def read_image(source, max_size=None):
    """
    The one image reader: an image file (a path, or its bytes) -> `(image, original_size)`, the upright `(3, H, W)`
    float tensor in [0, 1] (see `to_rgb_tensor`) and the `(height, width)` of the upright image at full size, which
    coordinates in original pixels refer to. The image is fully decoded here, so that a truncated, corrupt or
    non-image file fails with an `InvalidImageError` naming the file rather than later inside a batch.

    With `max_size`, a larger image is decoded with its longest side at most `max_size` (aspect ratio kept): a JPEG
    through its decoder's draft mode (the DCT scales down by 2, 4 or 8 while decoding), any image resized in 8 bits,
    so that the float tensor (4 bytes a value) is made only at the reduced size. A 100-megapixel JPEG then peaks near
    the memory of a normal image.
    """
    name = "<image bytes>" if isinstance(source, bytes) else source
    try:
        file = io.BytesIO(source) if isinstance(source, bytes) else open_regular_file(source)
        with file, PIL.Image.open(file) as image:
            width, height = _upright_size(image)
            if max_size is not None and max(width, height) > max_size:
                image = _decode_reduced(image, max_size / max(width, height))
            else:
                image.load()
            return to_rgb_tensor(image), (height, width)
    except _DECODE_ERRORS as error:
        raise InvalidImageError(f"Cannot read image file {name}: {error}") from error


def _decode_reduced(image, scale):
    """`image` decoded and resized by `scale`, keeping only its EXIF orientation (which `to_rgb_tensor` applies)."""
    orientation = header_orientation(image)
    target = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    # `draft` picks the smallest DCT scale that still covers the requested size (JPEG only; others ignore it).
    image.draft("RGB", target)
    image.load()
    # `to_rgb_tensor` reads these modes as more than 8 bits; resizing them keeps their values.
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    image = image.resize(target, PIL.Image.Resampling.BILINEAR, reducing_gap=2.0)
    if orientation not in (None, 1):
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
    return image


def _pil_to_tensor(image):
    """An upright `(C, H, W)` tensor of a PIL image: RGB, or one channel for 16/32-bit and float grayscale."""
    # The one place where EXIF orientation is applied.
    image = PIL.ImageOps.exif_transpose(image)
    # `convert("RGB")` would clip these to 8 bits; their dtype tells `to_rgb_tensor` how to scale them.
    if image.mode.startswith("I;16"):
        # Through "I": torch reads no big-endian "I;16B" data.
        return F.pil_to_tensor(image.convert("I")).to(torch.uint16)
    if image.mode in ("I", "F"):
        return F.pil_to_tensor(image)
    if "A" in image.getbands() or "transparency" in image.info:
        # Transparent pixels store arbitrary colours; show them over white, as transformers' `convert_to_rgb` does.
        image = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return F.pil_to_tensor(image.convert("RGB"))


def _channels_first(image):
    """A `(C, H, W)` tensor with 1, 3 or 4 channels of any image, in its own dtype and value range."""
    if isinstance(image, PIL.Image.Image):
        tensor = _pil_to_tensor(image)
    else:
        tensor = torch.as_tensor(image)
        # numpy images are (H, W, C) by convention and tensors (C, H, W); the other layout only when it is the one
        # that fits.
        prefers_last = not isinstance(image, torch.Tensor)
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        elif tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) and (prefers_last or tensor.shape[0] not in (1, 3, 4)):
            tensor = tensor.permute(2, 0, 1)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"Expected an image with 1, 3 or 4 channels, got shape {tuple(tensor.shape)}.")
    if 0 in tensor.shape:
        raise InvalidImageError(f"Image has an empty side: (channels, height, width) = {tuple(tensor.shape)}.")
    return tensor


def _to_unit_range(tensor, rescale_factor=1 / 255):
    """Integer pixels to floats in [0, 1] by their bit depth (8-bit ones by `rescale_factor`); floats as they are."""
    if tensor.dtype == torch.uint16 or (tensor.dtype == torch.int32 and tensor.max() > 255):
        return tensor.float() / 65535.0
    if tensor.dtype == torch.bool:
        return tensor.float()
    if not tensor.is_floating_point():
        return tensor.float() * rescale_factor
    return tensor.float()


def _to_rgb(tensor):
    """`(C, H, W)` in [0, 1] with 1, 3 or 4 channels -> `(3, H, W)`; a fourth channel is alpha, shown over white."""
    if tensor.shape[0] == 4:
        return tensor[:3] * tensor[3:] + (1 - tensor[3:])
    return tensor if tensor.shape[0] == 3 else tensor.expand(3, -1, -1).clone()


def to_rgb_tensor(image):
    """
    A `(3, H, W)` float tensor in [0, 1] from a PIL image, a numpy array (`(H, W, C)` or `(H, W)`) or a tensor
    (`(C, H, W)`, or `(H, W, C)` when the first side cannot be channels).

    PIL images are turned upright by their EXIF orientation (as a viewer shows them) and converted to RGB whatever
    their mode: grayscale, palette, CMYK, 16-bit grayscale (kept 16-bit, not clipped to 8) and transparent images
    (RGBA, LA, palette with transparency: composited over white). Integer arrays and tensors are read as 8-bit
    (16-bit for `uint16`, and for `int32` above 255), boolean and float ones as [0, 1]; a fourth channel is alpha.
    Raises `InvalidImageError` for an image with an empty side.
    """
    return _to_rgb(_to_unit_range(_channels_first(image)).nan_to_num(0.0).clamp(0, 1))


class Pix2SeqImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    format (`str`, *optional*, defaults to `"coco_detection"`):
        Format of the annotations; only `"coco_detection"` (Pix2Seq detects boxes, it has no panoptic head).
    pad_value (`float`, *optional*, defaults to 0.3):
        Value of the canvas around the image, in rescaled pixels (before normalisation): the official 0.3.
    codec (`dict`, *optional*):
        The settings of the box <-> token codec (`Pix2SeqTokenizer.to_dict()`: the model's class indices, vocabulary
        layout and sequence augmentation settings). `from_model_config` fills it from a `Pix2SeqConfig`.
    do_sequence_augmentation (`bool`, *optional*, defaults to `False`):
        Build the token targets of `annotations` with the official sequence augmentation (random object order, noise
        objects, class corruption of the decoder input), as training does; without it, the targets are the objects
        in their order, the same on every call (what a validation loss needs).
    """

    format: str | AnnotationFormat
    pad_value: float
    codec: dict
    do_sequence_augmentation: bool


class Pix2SeqImageProcessor(TorchvisionBackend):
    r"""
    Prepares images (and optionally COCO annotations) for Pix2Seq, on transformers' image-processor conventions.

    Every image is converted to RGB, rescaled to [0, 1], resized with its aspect ratio kept so that its longest side
    is the canvas side `S` (bilinear, antialiased), padded at the bottom and right to an `S` x `S` canvas with
    `pad_value`, and optionally normalised. All images therefore share one shape and batch together, and a box
    normalised to the canvas maps back to original pixels by `max(height, width)`.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"longest_edge": 640}`):
            The canvas: `{"longest_edge": S}`, or `{"max_height": S, "max_width": S}` as the transformers detection
            example passes it; an `int` is read as the longest edge. Folders saved with an `image_size` setting
            are read as `{"longest_edge": image_size}`.
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize the longest side to `S`. Without it the image is only padded (it must fit the canvas), e.g. for
            training crops that an augmentation already scaled.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`):
            Resampling filter of the resize (always antialiased, as the official preprocessing).
        do_rescale (`bool`, *optional*, defaults to `True`):
            Rescale integer pixels to [0, 1]: 8-bit ones by `rescale_factor`, 16-bit ones by 1 / 65535. Float images
            are taken to be in [0, 1] already; values outside are clipped, with a warning. Without it, pixel values
            are used as they are.
        rescale_factor (`float`, *optional*, defaults to 1 / 255):
            Factor of the 8-bit rescale.
        do_normalize (`bool`, *optional*, defaults to `False`):
            Subtract `image_mean` and divide by `image_std` after padding. The official model takes [0, 1] pixels;
            timm ImageNet backbones expect normalisation.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
            Mean of the normalisation.
        image_std (`list[float]`, *optional*, defaults to the ImageNet std):
            Standard deviation of the normalisation.
        do_pad (`bool`, *optional*, defaults to `True`):
            Pad to the `S` x `S` canvas. `pad_size`, if given, must be that canvas.
        pad_value (`float`, *optional*, defaults to 0.3):
            Value of the canvas around the image, in rescaled pixels (before normalisation).
        format (`str`, *optional*, defaults to `"coco_detection"`):
            Format of the annotations; only COCO detection annotations are supported.
        codec (`dict`, *optional*):
            Settings of the box <-> token codec (see `from_model_config`). Folders saved before the processor held
            them take them from the `config.json` beside it.
        do_sequence_augmentation (`bool`, *optional*, defaults to `False`):
            Token targets with the official sequence augmentation (for training) or without (the same every call).
    """

    valid_kwargs = Pix2SeqImageProcessorKwargs
    model_input_names = ["pixel_values"]
    size = {"longest_edge": 640}
    default_to_square = False
    do_resize = True
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = False
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_pad = True
    pad_value = 0.3
    format = AnnotationFormat.COCO_DETECTION
    codec = None
    do_sequence_augmentation = False

    def __init__(self, **kwargs):
        # Folders saved before the transformers conventions hold the canvas side as `image_size`.
        image_size = kwargs.pop("image_size", None)
        if image_size is not None and kwargs.get("size") is None:
            kwargs["size"] = {"longest_edge": image_size}
        # Folders saved while `labels` were per-image boxes hold this setting of their format.
        kwargs.pop("do_convert_annotations", None)
        super().__init__(**kwargs)
        canvas_side(self.size)

    @classmethod
    def from_model_config(cls, config, **kwargs):
        """The processor of a model: its canvas (`config.image_size`) and its codec (vocabulary, classes)."""
        kwargs.setdefault("size", {"longest_edge": config.image_size})
        return cls(codec=Pix2SeqTokenizer.from_config(config).to_dict(), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if processor.codec is None:
            # Folders saved before the processor held the codec: its settings are the model's, in config.json.
            hub_kwargs = {
                key: kwargs[key]
                for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                if key in kwargs
            }
            try:
                config_dict, _ = Pix2SeqConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            except OSError:
                return processor
            processor.codec = Pix2SeqTokenizer.from_config(Pix2SeqConfig.from_dict(config_dict)).to_dict()
        return processor

    def box_codec(self, codec=None):
        """The box <-> token codec of `codec` (the processor's own by default)."""
        codec = codec if codec is not None else self.codec
        if codec is None:
            raise ValueError(
                "This Pix2SeqImageProcessor has no codec settings, so it cannot turn boxes into tokens or tokens into "
                "boxes: build it with `Pix2SeqImageProcessor.from_model_config(model.config)`, or load it from a "
                "model folder."
            )
        return Pix2SeqTokenizer(**codec)

    @property
    def image_size(self):
        """The side of the square canvas."""
        return canvas_side(self.size)

    @image_size.setter
    def image_size(self, value):
        self.size = SizeDict(longest_edge=value)

    def _standardize_kwargs(self, size=None, pad_size=None, **kwargs):
        if isinstance(size, int):
            size = {"longest_edge": size}
        kwargs = super()._standardize_kwargs(size=size, pad_size=pad_size, **kwargs)
        side = canvas_side(kwargs["size"])
        if kwargs["pad_size"] is not None and (kwargs["pad_size"].height, kwargs["pad_size"].width) != (side, side):
            raise ValueError(
                f"Pix2Seq pads to the square canvas of `size` ({side} x {side}); "
                f"got pad_size={dict(kwargs['pad_size'])}."
            )
        return kwargs

    def _prepare_images_structure(self, images, expected_ndims=3):
        """One image or a list of them (PIL images, file paths, arrays, tensors), or a 4-D batch."""
        if isinstance(images, (list, tuple)) or getattr(images, "ndim", 0) == expected_ndims + 1:
            images = list(images)
        else:
            images = [images]
        return [read_image(image)[0] if isinstance(image, (str, os.PathLike)) else image for image in images]

    def process_image(self, image, do_rescale=None, rescale_factor=None, device=None, **kwargs):
        """One image of any supported kind -> `(3, H, W)` float tensor, rescaled to [0, 1] with `do_rescale`."""
        tensor = _channels_first(image)
        if do_rescale:
            finite = tensor[tensor.isfinite()] if tensor.is_floating_point() else None
            if finite is not None and finite.numel():
                if finite.min() < 0 or finite.max() > 1:
                    logger.warning_once(
                        "Pix2SeqImageProcessor got a float image with values outside [0, 1]. Float images are taken "
                        "to be rescaled already, so these values are clipped: was it rescaled? Pass 0-255 pixels as "
                        "integers (e.g. uint8) to have them rescaled by `rescale_factor`, or `do_rescale=False` to "
                        "keep the values as they are."
                    )
            tensor = _to_unit_range(tensor, rescale_factor).nan_to_num(0.0).clamp(0, 1)
        else:
            tensor = tensor.float()
        tensor = _to_rgb(tensor)
        return tensor if device is None else tensor.to(device)

    def preprocess(self, images, annotations=None, **kwargs):
        r"""
        Args:
            images: one image or a list (PIL images, file paths, numpy arrays, tensors).
            annotations (`dict` or `list[dict]`, *optional*):
                COCO detection annotations per image, in original pixels: `{"image_id": int, "annotations":
                [{"bbox": [x, y, w, h], "category_id": int, "iscrowd": 0}, ...]}` (`iscrowd` optional), with the
                model's class indices (keys of `id2label`) as `category_id`.
            **kwargs: any setting of the processor (see the class docstring) for this call, and `return_tensors`
                (`"pt"` or `"np"`).

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, S, S)` and, with annotations, the model's token targets (see
            `encode_objects`): `labels`, `decoder_input_ids` and `token_weights`. Crowd boxes and boxes left empty
            once clipped to the image are dropped.
        """
        return super().preprocess(images, annotations, **kwargs)

    def _preprocess(
        self,
        images,
        annotations,
        do_resize,
        size,
        resample,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        do_pad,
        pad_value,
        format,
        codec,
        do_sequence_augmentation,
        return_tensors,
        **kwargs,
    ):
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
            if len(annotations) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(annotations)} annotations.")
            format = AnnotationFormat(format)
            if format != AnnotationFormat.COCO_DETECTION:
                raise ValueError(f"Pix2Seq detects boxes: annotation format {format.value!r} is not supported.")
            validate_annotations(format, (AnnotationFormat.COCO_DETECTION,), annotations)
        side = canvas_side(size)
        pixel_values, objects = [], []
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            scale = side / max(height, width) if do_resize else 1.0
            if do_resize:
                new_height, new_width = resized_size(height, width, side)
                image = self.resize(image, SizeDict(height=new_height, width=new_width), resample=resample)
            if do_pad:
                if max(image.shape[-2:]) > side:
                    raise ValueError(
                        f"An image of {tuple(image.shape[-2:])} pixels does not fit the {side} x {side} canvas: "
                        "resize it (`do_resize=True`) or give a larger `size`."
                    )
                image = F.pad(image, [0, 0, side - image.shape[-1], side - image.shape[-2]], fill=pad_value)
            if do_normalize:
                image = F.normalize(image, image_mean, image_std)
            pixel_values.append(image)
            if annotations is not None:
                boxes, class_labels = coco_detection_objects(annotations[index], height, width)
                objects.append((boxes * scale, class_labels))
        if all(image.shape == pixel_values[0].shape for image in pixel_values):
            pixel_values = torch.stack(pixel_values)
        data = {"pixel_values": pixel_values}
        if annotations is not None:
            data.update(self.encode_objects(objects, do_sequence_augmentation, size=size, codec=codec))
        return BatchFeature(data, tensor_type=return_tensors)

    def encode_objects(self, objects, do_sequence_augmentation=None, size=None, codec=None, generator=None):
        """
        The model's token targets of the objects of a batch of processed images.

        Args:
            objects (`list[tuple]`): per image, `(boxes, class_labels)`: `(N, 4)` `(x_min, y_min, x_max, y_max)` boxes
                in pixels of the processed image (resized, before padding: the canvas keeps its top-left corner) and
                `(N,)` class indices.
            do_sequence_augmentation (`bool`, *optional*): the official sequence augmentation (training) or none.
            size, codec: the canvas and codec settings, the processor's own by default.
            generator (`torch.Generator`, *optional*): the random source of the augmentation.

        Returns:
            `dict` of `(batch_size, sequence_length)` tensors: `labels` (target tokens), `decoder_input_ids` (the task
            token, then the possibly corrupted objects) and `token_weights` (the loss weight of each target).
        """
        if do_sequence_augmentation is None:
            do_sequence_augmentation = self.do_sequence_augmentation
        side = canvas_side(size if size is not None else self.size)
        normalised = [(torch.as_tensor(boxes, dtype=torch.float32) / side, labels) for boxes, labels in objects]
        return self.box_codec(codec).build_training_batch(normalised, generator, augment=do_sequence_augmentation)

    def post_process_object_detection(self, outputs, threshold=0.5, target_sizes=None):
        """
        Decodes what `Pix2SeqForObjectDetection` generated (`Pix2SeqObjectDetectionOutput`: `sequences` and their
        `logits`) into per-image detections, with the codec's scores (the class probability at each object's class
        position).

        Never returns a garbage box: boxes are clipped to the image (or the canvas), and a detection is dropped when
        its score is not finite, its slot holds no valid object, or its box is empty once clipped (e.g. it lies
        wholly in the padding). Scores are clipped to [0, 1].

        Args:
            outputs: the model's output, with `sequences` `(B, T)` (task token excluded) and `logits` `(B, T, V)`.
            threshold (`float`): keep detections whose score is above it.
            target_sizes (`torch.Tensor` of shape `(B, 2)` or list of `(height, width)`, *optional*): original image
                sizes. Boxes are then in original pixels (clipped to the image); without them, normalised to the
                padded canvas.

        Returns:
            `list[dict]`, one per image, with `scores`, `labels` and `boxes` (xyxy) tensors sorted by score; every
            box satisfies `0 <= x_min < x_max <= width` and `0 <= y_min < y_max <= height`.
        """
        detections = self.box_codec().decode(outputs.sequences, outputs.logits)
        batch_size = detections["boxes"].shape[0]
        if target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images.")
        results = []
        for index in range(batch_size):
            boxes, scores = detections["boxes"][index].float(), detections["scores"][index].float()
            labels = detections["labels"][index]
            height, width = (float(v) for v in target_sizes[index]) if target_sizes is not None else (1.0, 1.0)
            # Normalised to the canvas, whose side is the image's longest side once resized.
            boxes = boxes * max(height, width)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, max(width, 0))
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, max(height, 0))
            keep = (
                (labels >= 0)
                & (scores > threshold)
                & scores.isfinite()
                & (boxes[:, 2] > boxes[:, 0])
                & (boxes[:, 3] > boxes[:, 1])
            )
            scores = scores[keep].clamp(0, 1)
            order = torch.argsort(scores, descending=True)
            results.append({"scores": scores[order], "labels": labels[keep][order], "boxes": boxes[keep][order]})
        return results

    # Pix2Seq v2: the tasks conditioned on a box (instance segmentation, keypoints)

    def prepare_instance_segmentation(self, detections, target_sizes, max_instances=10, threshold=0.0):
        """
        The decoder prompts of instance segmentation, built from boxes as the official evaluation builds them from
        detector boxes (`use_gt_box_at_test`): per image, crowd boxes, boxes without width or height, boxes of class
        index 0 (no COCO category: the official evaluation records only classes > 0) and boxes scoring below
        `threshold` are dropped, the `max_instances` best-scored are kept, and each becomes
        `[11, y_min, x_min, y_max, x_max, 100 + label]` with the box quantized on the padded canvas.

        Args:
            detections (`list[dict]`): per image, `boxes` `(N, 4)` `(x_min, y_min, x_max, y_max)` in pixels of the
                original image (what `post_process_object_detection` of this or any transformers detector returns, or
                ground truth), `labels` `(N,)` (the model's class indices, keys of `id2label`), and optionally
                `scores` `(N,)` (default 1, as officially for ground-truth boxes) and `iscrowd` `(N,)`.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(B, 2)`): `(height, width)` of each
                original image.
            max_instances (`int`, *optional*, defaults to 10): boxes kept per image (the official 10).
            threshold (`float`, *optional*, defaults to 0.0): the lowest score kept (the official evaluation keeps
                every box).

        Returns:
            `BatchFeature` of tensors: `decoder_input_ids` `(B, N, 6)`, `N` the most boxes kept in one image (an image
            with fewer has all-zero prompts in its last slots, as the official empty slots); per slot `instance_labels`,
            `instance_scores` and `instance_mask` (whether the slot holds a box), `(B, N)`, best score first.
        """
        if len(detections) != len(target_sizes):
            raise ValueError(f"Got {len(detections)} detections for {len(target_sizes)} target sizes.")
        side = self.image_size
        selected = []
        for detection, size in zip(detections, target_sizes):
            size = tuple(int(side_) for side_ in size)
            boxes, labels, scores = detection_arrays(detection, threshold)
            instances = select_instances(detections_to_canvas_boxes(boxes, size, side), labels, scores, max_instances)
            selected.append((instances, min(len(labels), max_instances)))
        num_slots = max((count for _, count in selected), default=0)
        prompts = np.zeros((len(selected), num_slots, 6), dtype=np.int64)
        labels = np.zeros((len(selected), num_slots), dtype=np.int64)
        scores = np.zeros((len(selected), num_slots), dtype=np.float32)
        mask = np.zeros((len(selected), num_slots), dtype=bool)
        for index, ((image_boxes, image_labels, image_scores), count) in enumerate(selected):
            prompts[index] = instance_segmentation_prompt(image_boxes, image_labels)[:num_slots]
            labels[index], scores[index] = image_labels[:num_slots], image_scores[:num_slots]
            mask[index, :count] = True
        data = {"decoder_input_ids": prompts, "instance_labels": labels, "instance_scores": scores}
        return BatchFeature({**data, "instance_mask": mask}, tensor_type="pt")

    def post_process_instance_segmentation(
        self, outputs, instances, threshold=0.5, mask_threshold=0.5, target_sizes=None, return_binary_maps=False
    ):
        """
        Instance masks from the polygons generated after the prompts of `prepare_instance_segmentation`, in the format
        of transformers' instance segmentation (DETR, Mask2Former). Every sample is decoded as the official evaluation
        does (polygons in original pixels, rasterised and joined), and a pixel belongs to the mask where at least
        `mask_threshold` of the samples of its box cover it (the official 0.5: 4 of 8). An instance's class and score
        are those of its box (the detector's), as officially.

        Args:
            outputs: what the model generated, `sequences` `(B * N * S, T)` (or that tensor), rows ordered (image,
                slot, sample), the prompts excluded (what `detect` returns).
            instances: the `BatchFeature` of `prepare_instance_segmentation` (`instance_mask`, `instance_labels`,
                `instance_scores`).
            threshold (`float`, *optional*, defaults to 0.5): keep instances whose score is above it.
            mask_threshold (`float`, *optional*, defaults to 0.5): the share of the samples that must cover a pixel.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(B, 2)`, *optional*): `(height, width)`
                of the original images; without them the masks cover the padded canvas.
            return_binary_maps (`bool`, *optional*, defaults to `False`): return each instance's own mask. Pix2Seq's
                masks may overlap, which one map of segment ids cannot show.

        Returns:
            `list[dict]`, one per image:
            - **segmentation**: `(height, width)` int32 map of segment ids, -1 where no instance is (where masks
              overlap, the higher-scored instance), or with `return_binary_maps` `(num_segments, height, width)` bool.
            - **segments_info**: per segment, best score first, `{"id", "label_id", "score"}`.
        """
        sequences = outputs.sequences if hasattr(outputs, "sequences") else outputs
        valid = torch.as_tensor(instances["instance_mask"]).bool().cpu()
        labels = torch.as_tensor(instances["instance_labels"]).cpu()
        scores = torch.as_tensor(instances["instance_scores"]).float().cpu()
        batch_size, num_slots = valid.shape
        side = self.image_size
        if target_sizes is None:
            target_sizes = [(side, side)] * batch_size
        if len(target_sizes) != batch_size:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images.")
        tokens = None
        if num_slots:
            sequences = torch.as_tensor(sequences).cpu()
            if len(sequences) % (batch_size * num_slots):
                raise ValueError(
                    f"Got {len(sequences)} generated rows for {batch_size} images of {num_slots} prompts each: the rows "
                    "must be (image, slot, sample)."
                )
            tokens = sequences.reshape(batch_size, num_slots, -1, sequences.shape[-1]).numpy()
        results = []
        for index in range(batch_size):
            height, width = (int(value) for value in target_sizes[index])
            kept = torch.nonzero(valid[index] & (scores[index] > threshold)).flatten()
            kept = kept[torch.argsort(scores[index, kept], descending=True, stable=True)]
            masks = np.zeros((0, height, width), dtype=bool)
            if len(kept):
                rows = tokens[index, kept.numpy()]
                masks, _ = decode_instance_masks(
                    rows.reshape(-1, rows.shape[-1]),
                    (height, width),
                    resized_size(height, width, side),
                    side,
                    num_samples=rows.shape[1],
                    threshold=mask_threshold,
                )
            masks = torch.from_numpy(masks)
            segments_info = [
                {"id": segment, "label_id": int(labels[index, slot]), "score": float(scores[index, slot])}
                for segment, slot in enumerate(kept.tolist())
            ]
            if return_binary_maps:
                segmentation = masks
            else:
                segmentation = torch.full((height, width), -1, dtype=torch.int32)
                # The best-scored instance is painted last, so that it wins where masks overlap.
                for segment in reversed(range(len(masks))):
                    segmentation[masks[segment]] = segment
            results.append({"segmentation": segmentation, "segments_info": segments_info})
        return results

    def prepare_keypoint_detection(self, images, detections, person_label_id=1, crop_pad_scale=0.5, threshold=0.0):
        """
        The inputs of keypoint detection, one per person, as the official evaluation builds them: per image, the
        person boxes of `detections` (class index `person_label_id`, not crowd, with width and height, scoring at
        least `threshold`) in descending score order; around each, the official crop (the box grown by
        `crop_pad_scale` of its size on each side, clipped to the image) is cut from the original image and processed
        like any image, and the box on that crop's canvas becomes the prompt `[12, y_min, x_min, y_max, x_max, 101]`.

        Args:
            images: the original images (as `preprocess` takes them).
            detections (`list[dict]`): per image, as `prepare_instance_segmentation` takes them.
            person_label_id (`int`, *optional*, defaults to 1): the class index of a person (COCO's 1).
            crop_pad_scale (`float`, *optional*, defaults to 0.5): the crop margin on each side, a share of the box.
            threshold (`float`, *optional*, defaults to 0.0): the lowest detector score kept (officially 0).

        Returns:
            `BatchFeature` of tensors, `P` the persons of the whole batch: `pixel_values` `(P, 3, S, S)` (the crops),
            `decoder_input_ids` `(P, 6)`, `person_boxes` `(P, 4)` (the prompt boxes, `(y_min, x_min, y_max, x_max)`
            normalised to the crop's canvas), `crop_offsets` and `crop_sizes` `(P, 2)` (`(y, x)` and
            `(height, width)` in original pixels), `person_scores` `(P,)`, `person_image_index` `(P,)`,
            `person_bboxes` `(P, 4)` (the given boxes, `(x_min, y_min, x_max, y_max)` pixels) and `image_sizes`
            `(B, 2)`.
        """
        images = [_channels_first(image) for image in self._prepare_images_structure(images)]
        if len(detections) != len(images):
            raise ValueError(f"Got {len(detections)} detections for {len(images)} images.")
        side = self.image_size
        crops, fields = [], {key: [] for key in ("boxes", "offsets", "sizes", "scores", "index", "bboxes")}
        for index, (image, detection) in enumerate(zip(images, detections)):
            size = tuple(image.shape[-2:])
            boxes, _, scores = detection_arrays(detection, threshold, label=person_label_id)
            order = np.argsort(-scores, kind="stable")
            for box, pixel_box, score in zip(
                detections_to_image_boxes(boxes[order], size), boxes[order], scores[order]
            ):
                offset, crop_size = keypoint_crop(box, size, crop_pad_scale)
                (top, left), (height, width) = offset.tolist(), crop_size.tolist()
                crops.append(image[:, top : top + height, left : left + width])
                fields["boxes"].append(box_to_crop_canvas(box, size, offset, crop_size, side))
                fields["offsets"].append(offset)
                fields["sizes"].append(crop_size)
                fields["scores"].append(score)
                fields["index"].append(index)
                fields["bboxes"].append(np.concatenate([pixel_box[:2], pixel_box[:2] + pixel_box[2:]]))
        if crops:
            pixel_values = self.preprocess(crops, return_tensors="pt")["pixel_values"]
        else:
            pixel_values = torch.zeros(0, 3, side, side)
        boxes = np.asarray(fields["boxes"], dtype=np.float32).reshape(-1, 4)
        data = {
            "pixel_values": pixel_values,
            "decoder_input_ids": keypoint_prompt(boxes),
            "person_boxes": boxes,
            "crop_offsets": np.asarray(fields["offsets"], dtype=np.int64).reshape(-1, 2),
            "crop_sizes": np.asarray(fields["sizes"], dtype=np.int64).reshape(-1, 2),
            "person_scores": np.asarray(fields["scores"], dtype=np.float32),
            "person_image_index": np.asarray(fields["index"], dtype=np.int64),
            "person_bboxes": np.asarray(fields["bboxes"], dtype=np.float32).reshape(-1, 4),
            "image_sizes": np.asarray([image.shape[-2:] for image in images], dtype=np.int64).reshape(-1, 2),
        }
        return BatchFeature(data, tensor_type="pt")

    def post_process_keypoint_detection(
        self,
        outputs,
        persons,
        threshold=None,
        suppress_invisible=True,
        top_k=0,
        top_p=0.1,
        temperature=1.0,
        points_score_weight=1.0,
        generator=None,
    ):
        """
        The 17 COCO keypoints of each person from what the model generated after the prompts of
        `prepare_keypoint_detection`, in the format of transformers' `VitPoseImageProcessor.post_process_pose_estimation`.
        As the official evaluation: every token written as invisible (41) is drawn again with 41 ruled out, from the
        same logits filtered by `top_k` / `top_p` / `temperature` (the keypoint task's sampling; each position filtered
        on its own, where the official code mixes positions: see `suppress_invisible_keypoints`); tokens become points
        in original pixels; the person's score is `points_score_weight` times the mean probability of its non-padding
        tokens plus `1 - points_score_weight` times the detector's score.

        Args:
            outputs: what the model generated, with `sequences` `(P, 34)` (prompts excluded) and the raw `logits`
                `(P, 34, V)` (what `detect` returns).
            persons: the `BatchFeature` of `prepare_keypoint_detection`.
            threshold (`float`, *optional*): keep only the keypoints whose score is above it.
            suppress_invisible (`bool`, *optional*, defaults to `True`): re-draw the invisible tokens (official).
            top_k, top_p, temperature: the sampling of the re-draw (the official keypoint task: 0, 0.1, 1.0).
            points_score_weight (`float`, *optional*, defaults to 1.0): the official 1.0 (0.1 in the official demo).
            generator (`torch.Generator`, *optional*): the random source of the re-draw.

        Returns:
            `list[list[dict]]`: per image, per person (descending detector score), `keypoints` `(K, 2)` `(x, y)` in
            original pixels, `scores` `(K,)` (the mean probability of the point's non-padding tokens), `labels` `(K,)`
            (COCO keypoint indices), `bbox` `(4,)` (the person box, `(x_min, y_min, x_max, y_max)` pixels), and
            beyond VitPose's fields `score` (the official person score) and `visible` `(K,)` (neither token of the
            point was written as invisible). A point the model did not write (padding, token 0) has coordinates -1,
            as officially.
        """
        image_index = torch.as_tensor(persons["person_image_index"]).tolist()
        results = [[] for _ in range(len(persons["image_sizes"]))]
        if not image_index:
            return results
        decoded = post_process_keypoints(
            outputs.sequences.cpu(),
            outputs.logits.cpu(),
            torch.as_tensor(persons["person_boxes"]).cpu().numpy(),
            torch.as_tensor(persons["crop_offsets"]).cpu().numpy(),
            torch.as_tensor(persons["crop_sizes"]).cpu().numpy(),
            torch.as_tensor(persons["person_scores"]).cpu(),
            self.image_size,
            suppress_invisible=suppress_invisible,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            points_score_weight=points_score_weight,
            generator=generator,
        )
        emitted = (decoded["tokens"] != 0).reshape(len(image_index), NUM_KEYPOINTS, 2).float()
        probabilities = decoded["token_scores"].reshape(len(image_index), NUM_KEYPOINTS, 2)
        point_scores = (probabilities * emitted).sum(dim=-1) / emitted.sum(dim=-1).clamp(min=1)
        bboxes = torch.as_tensor(persons["person_bboxes"]).float().cpu()
        labels = torch.arange(NUM_KEYPOINTS)
        for person, index in enumerate(image_index):
            keep = point_scores[person] > threshold if threshold is not None else torch.ones(NUM_KEYPOINTS, dtype=bool)
            results[index].append(
                {
                    "keypoints": decoded["keypoints"][person][keep],
                    "scores": point_scores[person][keep],
                    "labels": labels[keep],
                    "bbox": bboxes[person],
                    "score": decoded["scores"][person],
                    "visible": decoded["visible"][person][keep],
                }
            )
        return results


def detection_arrays(detection, threshold=0.0, label=None):
    """
    The boxes of one image that condition segmentation and keypoints, as the official evaluation reads detector
    results: `(x_min, y_min, x_max, y_max)` pixel boxes -> `(N, 4)` float64 `(x, y, width, height)` (a COCO result),
    `(N,)` labels and float32 scores, without crowd boxes, boxes without width or height, class index 0, boxes scoring
    below `threshold` and, with `label`, boxes of other classes. Missing scores are 1 (ground truth).
    """
    boxes = torch.as_tensor(detection["boxes"]).detach().cpu().double().reshape(-1, 4)
    labels = torch.as_tensor(detection["labels"]).detach().cpu().long().reshape(-1)
    scores = torch.as_tensor(detection.get("scores", torch.ones(len(labels)))).detach().cpu().float().reshape(-1)
    crowd = torch.as_tensor(detection.get("iscrowd", torch.zeros(len(labels)))).detach().cpu().bool().reshape(-1)
    if not len(boxes) == len(labels) == len(scores) == len(crowd):
        raise ValueError(
            f"A detection has {len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores and {len(crowd)} iscrowd "
            "flags: give one of each per box."
        )
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    keep = ~crowd & (xywh[:, 2] > 0) & (xywh[:, 3] > 0) & (labels > 0) & (scores >= threshold)
    if label is not None:
        keep &= labels == label
    return xywh[keep].numpy(), labels[keep].numpy(), scores[keep].numpy()


def canvas_side(size):
    """
    The side of the square canvas that a `size` setting describes. Raises for a size that is no square canvas, and
    for a side that is not an integer from 1 to `MAX_CANVAS_SIDE` (before anything is allocated for it).
    """
    size = dict(size)
    if set(size) == {"longest_edge"}:
        side = size["longest_edge"]
    elif set(size) == {"max_height", "max_width"} and size["max_height"] == size["max_width"]:
        side = size["max_height"]
    else:
        raise ValueError(
            f"Pix2Seq resizes the longest side onto a square canvas: `size` must be {{'longest_edge': S}} or "
            f"{{'max_height': S, 'max_width': S}}, got {size}."
        )
    if not (isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= MAX_CANVAS_SIDE):
        raise ValueError(
            f"size={size}: the canvas side must be an integer from 1 to {MAX_CANVAS_SIDE} (the released models use "
            f"640 to 1333), got {side!r}."
        )
    return side


def coco_detection_objects(annotation, height, width):
    """
    The boundary from COCO: `[x, y, w, h]` pixel boxes -> `(N, 4)` `(x_min, y_min, x_max, y_max)` pixel boxes clipped
    to the image, and `(N,)` class indices; crowd boxes and boxes left empty are dropped.
    """
    objects = annotation.get("annotations", [])
    boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    classes = torch.tensor([obj["category_id"] for obj in objects], dtype=torch.long)
    crowd = torch.tensor([bool(obj.get("iscrowd", 0)) for obj in objects], dtype=torch.bool)
    xyxy = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    keep = ~crowd & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy[keep], classes[keep]


Pix2SeqImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["InvalidImageError", "Pix2SeqImageProcessor", "image_file_size", "read_image", "to_rgb_tensor"]
