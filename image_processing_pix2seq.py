"""Image processor for Pix2Seq: resize the longest side, pad bottom-right to a fixed square canvas."""

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


def to_rgb_tensor(image):
    """
    A `(3, H, W)` float tensor in [0, 1] from a PIL image, a numpy array or a tensor (channels first or last).

    PIL images are turned upright by their EXIF orientation (as a viewer shows them) and converted to RGB whatever
    their mode (grayscale, palette, RGBA, CMYK, 16-bit). Arrays and tensors of integers are read as 8-bit (16-bit for
    `uint16`); float ones as [0, 1].
    """
    if isinstance(image, PIL.Image.Image):
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float32)
            scale = 65535.0 if array.max(initial=0) > 255 else 255.0
            return torch.from_numpy(array / scale).clamp(0, 1).expand(3, *array.shape).clone()
        if image.mode == "F":
            array = np.asarray(image, dtype=np.float32)
            return torch.from_numpy(array).clamp(0, 1).expand(3, *array.shape).clone()
        return F.to_dtype(F.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    tensor = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise ValueError(f"Expected an image with 2 or 3 dimensions, got shape {tuple(tensor.shape)}.")
    if tensor.shape[0] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    if tensor.dtype == torch.uint16 or (tensor.dtype == torch.int32 and tensor.max() > 255):
        tensor = tensor.float() / 65535.0
    elif not tensor.is_floating_point():
        tensor = tensor.float() / 255.0
    tensor = tensor.float().clamp(0, 1)
    channels = tensor.shape[0]
    return tensor[:3] if channels >= 3 else tensor.expand(3, -1, -1)


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

        Args:
            outputs: the model's output with `pred_boxes` (normalised to the canvas), `pred_scores`, `pred_labels`.
            threshold (`float`): keep detections whose score is above it.
            target_sizes (`torch.Tensor` of shape `(B, 2)` or list of `(height, width)`, *optional*): original image
                sizes. Boxes are then in original pixels (clipped to the image); without them, normalised to the
                padded canvas.

        Returns:
            `list[dict]`, one per image, with `scores`, `labels` and `boxes` (xyxy) tensors sorted by score.
        """
        results = []
        for index in range(outputs.pred_boxes.shape[0]):
            boxes, scores, labels = outputs.pred_boxes[index], outputs.pred_scores[index], outputs.pred_labels[index]
            keep = (labels >= 0) & (scores > threshold)
            if target_sizes is not None:
                height, width = (float(v) for v in target_sizes[index])
                limits = torch.tensor([width, height, width, height], device=boxes.device)
                boxes = torch.minimum(boxes * max(height, width), limits)
                # A box that lies wholly in the padding is empty once clipped to the image.
                keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            order = torch.argsort(scores[keep], descending=True)
            results.append({"scores": scores[keep][order], "labels": labels[keep][order], "boxes": boxes[keep][order]})
        return results


Pix2SeqImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["Pix2SeqImageProcessor"]
