"""Image processor for Pix2Seq: resize the longest side, pad bottom-right to a fixed square canvas."""

import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


class InvalidImageError(ValueError):
    """An image file that cannot be decoded, or an image with an empty side."""


def load_image(path):
    """
    Opens and fully decodes an image file, so that a truncated, corrupt or non-image file fails here, with an
    `InvalidImageError` naming the file, rather than later inside a batch. Orientation and mode are left to
    `to_rgb_tensor`.
    """
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    # PIL reports bad data as OSError (truncated, unidentified), SyntaxError (broken PNG chunks), ValueError or
    # EOFError depending on the decoder, and a decompression bomb as its own error class.
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as error:
        raise InvalidImageError(f"Cannot read image file {path}: {error}") from error


def _pil_to_tensor(image):
    """An upright `(C, H, W)` tensor of a PIL image: RGB, or one channel for 16/32-bit and float grayscale."""
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
    if tensor.dtype == torch.uint16 or (tensor.dtype == torch.int32 and tensor.max() > 255):
        tensor = tensor.float() / 65535.0
    elif tensor.dtype == torch.bool:
        tensor = tensor.float()
    elif not tensor.is_floating_point():
        tensor = tensor.float() / 255.0
    tensor = tensor.float().nan_to_num(0.0).clamp(0, 1)
    if tensor.shape[0] == 4:
        return tensor[:3] * tensor[3:] + (1 - tensor[3:])
    return tensor if tensor.shape[0] == 3 else tensor.expand(3, -1, -1).clone()


class Pix2SeqImageProcessor(BaseImageProcessor):
    r"""
    Prepares images (and optionally COCO annotations) for Pix2Seq.

    Every image is converted to RGB in [0, 1], resized so that its longest side is `image_size` (aspect ratio kept),
    padded at the bottom and right to an `image_size` x `image_size` canvas with `pad_value`, and optionally
    normalised. All images therefore share one shape and batch together.

    Args:
        image_size (`int`, *optional*, defaults to 640): side of the square canvas.
        pad_value (`float`, *optional*, defaults to 0.3): canvas value in [0, 1] pixel space (the official 0.3).
        do_normalize (`bool`, *optional*, defaults to `False`): subtract `image_mean` and divide by `image_std`
            after padding. The official model takes [0, 1] pixels; timm ImageNet backbones expect normalisation.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean), image_std (`list[float]`, *optional*,
            defaults to the ImageNet std).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size=640,
        pad_value=0.3,
        do_normalize=False,
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.pad_value = pad_value
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def resize_and_pad(self, image):
        """`(3, H, W)` in [0, 1] -> `(3, S, S)` canvas; returns it with the scale applied to the image."""
        height, width = image.shape[-2:]
        scale = self.image_size / max(height, width)
        new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, new_size, antialias=True).clamp(0, 1)
        padding = [0, 0, self.image_size - new_size[1], self.image_size - new_size[0]]  # left, top, right, bottom
        return F.pad(image, padding, fill=self.pad_value), scale

    def preprocess(self, images, annotations=None, return_tensors=None, **kwargs):
        """
        Args:
            images: one image or a list (PIL, numpy or torch).
            annotations (`dict` or `list[dict]`, *optional*): COCO-style per image, `{"image_id": int,
                "annotations": [{"bbox": [x, y, w, h], "category_id": int, "iscrowd": 0}, ...]}` in original pixels.

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, S, S)` and, with annotations, `labels`: one dict per image with
            `boxes` (xyxy, normalised to the padded canvas), `class_labels`, `image_id`, `orig_size` (h, w) and
            `num_dropped` (boxes dropped as crowd or empty after clipping to the image).
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        tensors = [to_rgb_tensor(image) for image in images]
        pixel_values = torch.stack([self.resize_and_pad(image)[0] for image in tensors])
        if self.do_normalize:
            pixel_values = F.normalize(pixel_values, self.image_mean, self.image_std)
        data = {"pixel_values": pixel_values}
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
            if len(annotations) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(annotations)} annotations.")
            data["labels"] = [
                self.prepare_annotation(annotation, image.shape[-2:]) for annotation, image in zip(annotations, tensors)
            ]
        return BatchFeature(data=data)

    @staticmethod
    def prepare_annotation(annotation, image_size):
        """COCO xywh pixel boxes -> xyxy boxes normalised to the padded canvas, clipped, crowd and empty ones dropped."""
        height, width = int(image_size[0]), int(image_size[1])
        objects = annotation.get("annotations", [])
        boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([obj["category_id"] for obj in objects], dtype=torch.long)
        crowd = torch.tensor([bool(obj.get("iscrowd", 0)) for obj in objects], dtype=torch.bool)
        xyxy = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        keep = ~crowd & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return {
            "boxes": xyxy[keep] / max(height, width),
            "class_labels": labels[keep],
            "image_id": annotation.get("image_id"),
            "orig_size": torch.tensor([height, width]),
            "num_dropped": int((~keep).sum()),
        }

    def post_process_object_detection(self, outputs, threshold=0.5, target_sizes=None):
        """
        Turns `Pix2SeqObjectDetectionOutput` into per-image detections.

        Never returns a garbage box: inverted coordinates are put back in order, boxes are clipped to the image (or
        the canvas), and a detection is dropped when its box or score is not finite, its label is negative (an empty
        slot) or its box is empty once clipped (e.g. it lies wholly in the padding). Scores are clipped to [0, 1].

        Args:
            outputs: the model's output with `pred_boxes` (normalised to the canvas), `pred_scores`, `pred_labels`.
            threshold (`float`): keep detections whose score is above it.
            target_sizes (`torch.Tensor` of shape `(B, 2)` or list of `(height, width)`, *optional*): original image
                sizes. Boxes are then in original pixels (clipped to the image); without them, normalised to the
                padded canvas.

        Returns:
            `list[dict]`, one per image, with `scores`, `labels` and `boxes` (xyxy) tensors sorted by score; every
            box satisfies `0 <= x_min < x_max <= width` and `0 <= y_min < y_max <= height`.
        """
        batch_size = outputs.pred_boxes.shape[0]
        if target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images.")
        results = []
        for index in range(batch_size):
            boxes, scores = outputs.pred_boxes[index].float(), outputs.pred_scores[index].float()
            labels = outputs.pred_labels[index]
            height, width = (float(v) for v in target_sizes[index]) if target_sizes is not None else (1.0, 1.0)
            x = boxes[:, 0::2].sort(dim=-1).values * max(height, width)
            y = boxes[:, 1::2].sort(dim=-1).values * max(height, width)
            x, y = x.clamp(0, max(width, 0)), y.clamp(0, max(height, 0))
            boxes = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=-1)
            keep = (
                (labels >= 0)
                & (scores > threshold)
                & scores.isfinite()
                & outputs.pred_boxes[index].isfinite().all(dim=-1)
                & (x[:, 1] > x[:, 0])
                & (y[:, 1] > y[:, 0])
            )
            scores = scores[keep].clamp(0, 1)
            order = torch.argsort(scores, descending=True)
            results.append({"scores": scores[order], "labels": labels[keep][order], "boxes": boxes[keep][order]})
        return results


Pix2SeqImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["InvalidImageError", "Pix2SeqImageProcessor", "load_image", "to_rgb_tensor"]
