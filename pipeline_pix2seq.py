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

Pix2Seq v2 (multi-task) folders also name `pipeline("image-segmentation")` and `pipeline("keypoint-detection")`:
both detect first (or take the caller's boxes), then generate conditioned on each box, as the official evaluation
does (`Pix2SeqImageSegmentationPipeline`, `Pix2SeqKeypointDetectionPipeline`).
"""

import base64
import binascii
import contextlib
import numbers
import os
import urllib.request

import PIL.Image
import PIL.ImageOps
import torch
from transformers.pipelines.base import Pipeline
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


# The 17 COCO keypoints, in the order the model writes them.
COCO_KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# Conditioned generation samples officially; it draws from this seed, so that an image gives the same result each call.
GENERATION_SEED = 0


def task_settings(config, task):
    """The settings of `task` in the model config's `tasks` (the official decoding), empty when it has none."""
    return dict((getattr(config, "tasks", None) or {}).get(task) or {})


@contextlib.contextmanager
def seeded(device, seed=GENERATION_SEED):
    """Draws from `seed` on the CPU and on `device` inside, and leaves the caller's random state as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Pix2SeqBoxConditionedPipeline(Pipeline):
    """
    What the Pix2Seq v2 tasks conditioned on a box share: an image (and optionally the caller's `detections`, in the
    format of `post_process_object_detection`: `boxes` xyxy in original pixels, `labels`, optional `scores`) in; the
    model's own detection (its object-detection task, exactly as `pipeline("object-detection")`) where no boxes are
    given; `threshold` (default 0.5) on the detector's scores; `generate_kwargs` for the conditioned generation (the
    task's official decoding from the config's `tasks` by default).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    task_name = None

    def __call__(self, inputs=None, **kwargs):
        inputs = kwargs.pop("images", inputs)
        if isinstance(inputs, (list, tuple)) and not inputs:
            self._sanitize_parameters(**kwargs)
            return []
        if isinstance(inputs, (list, tuple)) and kwargs.get("detections") is not None:
            raise ValueError("`detections` are the boxes of one image: give one image with them, not a list.")
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, timeout=None, detections=None, threshold=None, generate_kwargs=None, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown arguments {sorted(kwargs)}.")
        preprocess = {"timeout": timeout, "detections": detections}
        forward = {"generate_kwargs": generate_kwargs or {}}
        postprocess = {}
        if threshold is not None:
            check_threshold(threshold)
            forward["threshold"] = postprocess["threshold"] = threshold
        return preprocess, forward, postprocess

    def preprocess(self, image, timeout=None, detections=None):
        image, original_size = load_pipeline_image(image, timeout)
        inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        inputs["target_size"] = torch.IntTensor([original_size])
        inputs["image"] = image
        inputs["detections"] = detections
        return inputs

    def detections(self, model_inputs, threshold):
        """The boxes to condition on: the caller's, else the model's own detections above `threshold`."""
        if model_inputs["detections"] is not None:
            return [model_inputs["detections"]]
        outputs = self.model.detect(model_inputs["pixel_values"], task="object_detection")
        return self.image_processor.post_process_object_detection(outputs, threshold, model_inputs["target_size"])

    @property
    def settings(self):
        return task_settings(self.model.config, self.task_name)


class Pix2SeqImageSegmentationPipeline(Pix2SeqBoxConditionedPipeline):
    """
    Instance segmentation with Pix2Seq v2, as the official evaluation does it: detect, keep the 10 best boxes above
    `threshold`, sample polygons for each (8 samples at top-p 0.8 by default), and keep a pixel where at least
    `mask_threshold` of the samples (0.5: 4 of 8) cover it. Called as transformers' `ImageSegmentationPipeline`; returns
    per image a list of `{"score", "label", "mask"}`, `mask` a black and white PIL image of the original size, with the
    detector's class and score, best score first. Masks may overlap. With `threshold=0` every box of the detector's
    top 10 is segmented, as in the official evaluation.
    """

    task_name = "instance_segmentation"

    def _sanitize_parameters(self, mask_threshold=None, subtask=None, **kwargs):
        if subtask not in (None, "instance"):
            raise ValueError(f"Pix2Seq segments instances: subtask={subtask!r} is not supported (only 'instance').")
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if mask_threshold is not None:
            postprocess["mask_threshold"] = mask_threshold
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, threshold=0.5, generate_kwargs=None):
        target_size = model_inputs["target_size"]
        instances = self.image_processor.prepare_instance_segmentation(
            self.detections(model_inputs, threshold),
            target_size.tolist(),
            max_instances=self.settings.get("max_instances", 10),
            threshold=threshold,
        )
        prompts = instances["decoder_input_ids"]
        sequences = torch.zeros(0, 0, dtype=torch.long)
        if prompts.shape[1]:
            pixel_values = model_inputs["pixel_values"]
            with seeded(pixel_values.device):
                generated = self.model.generate(
                    pixel_values=pixel_values,
                    task=self.task_name,
                    decoder_input_ids=prompts.to(pixel_values.device),
                    **(generate_kwargs or {}),
                )
            sequences = getattr(generated, "sequences", generated)[:, prompts.shape[-1] :]
        return {"sequences": sequences, "instances": instances, "target_size": target_size}

    def postprocess(self, model_outputs, threshold=0.5, mask_threshold=0.5):
        (result,) = self.image_processor.post_process_instance_segmentation(
            model_outputs["sequences"],
            model_outputs["instances"],
            threshold=threshold,
            mask_threshold=mask_threshold,
            target_sizes=model_outputs["target_size"],
            return_binary_maps=True,
        )
        return [
            {
                "score": segment["score"],
                "label": self.model.config.id2label[segment["label_id"]],
                "mask": PIL.Image.fromarray(mask.numpy().astype("uint8") * 255, mode="L"),
            }
            for segment, mask in zip(result["segments_info"], result["segmentation"])
        ]


class Pix2SeqKeypointDetectionPipeline(Pix2SeqBoxConditionedPipeline):
    """
    Human keypoints with Pix2Seq v2, as the official evaluation places them: detect, then for every person box above
    `threshold` cut the official crop around it, generate its 17 points (34 tokens at top-p 0.1 by default), re-draw
    the invisible tokens and score the person. Returns per image a list of persons, best detector score first:
    `{"score", "box": {"xmin", "ymin", "xmax", "ymax"}, "keypoints": [{"label", "x", "y", "score", "visible"}] * 17}`,
    in original pixels; `score` is the official person score.
    """

    task_name = "keypoint_detection"

    def _forward(self, model_inputs, threshold=0.5, generate_kwargs=None):
        settings = self.settings
        person_token = settings.get("person_class_token_id", 101)
        persons = self.image_processor.prepare_keypoint_detection(
            [model_inputs["image"]],
            self.detections(model_inputs, threshold),
            person_label_id=person_token - self.model.config.class_token_offset,
            crop_pad_scale=settings.get("crop_pad_scale", 0.5),
            threshold=threshold,
        )
        outputs = None
        if len(persons["decoder_input_ids"]):
            pixel_values = persons["pixel_values"].to(device=self.device, dtype=self.dtype)
            outputs = self.model.detect(
                pixel_values,
                task=self.task_name,
                decoder_input_ids=persons["decoder_input_ids"].to(self.device),
                **(generate_kwargs or {}),
            )
        return {"outputs": outputs, "persons": persons}

    def postprocess(self, model_outputs, threshold=0.5):
        settings = self.settings
        (people,) = self.image_processor.post_process_keypoint_detection(
            model_outputs["outputs"],
            model_outputs["persons"],
            suppress_invisible=settings.get("suppress_invisible", True),
            top_k=settings.get("top_k", 0),
            top_p=settings.get("top_p", 0.1),
            temperature=settings.get("temperature", 1.0),
            points_score_weight=settings.get("points_score_weight", 1.0),
            generator=torch.Generator().manual_seed(GENERATION_SEED),
        )
        results = []
        for person in people:
            xmin, ymin, xmax, ymax = person["bbox"].tolist()
            keypoints = [
                {"label": COCO_KEYPOINT_NAMES[label], "x": x, "y": y, "score": score, "visible": visible}
                for label, (x, y), score, visible in zip(
                    person["labels"].tolist(),
                    person["keypoints"].tolist(),
                    person["scores"].tolist(),
                    person["visible"].tolist(),
                )
            ]
            box = {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}
            results.append({"score": float(person["score"]), "box": box, "keypoints": keypoints})
        return results


__all__ = [
    "Pix2SeqImageSegmentationPipeline",
    "Pix2SeqKeypointDetectionPipeline",
    "Pix2SeqObjectDetectionPipeline",
    "check_threshold",
    "load_pipeline_image",
]
