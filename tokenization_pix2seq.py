"""
The Pix2Seq box <-> token codec: boxes and class indices to token sequences (with the official sequence augmentation)
and generated tokens back to boxes, scores and labels. Pure tensor code, no model and no image.

Its one user is `Pix2SeqImageProcessor`, which turns annotations into the model's token targets and generated tokens
into detections. This is deliberately a plain class and not an `AutoTokenizer`: a tokenizer that `AutoTokenizer` can
load sends `pipeline("object-detection")` down its LayoutLM branch. Its settings are the model's vocabulary layout and
augmentation settings (`Pix2SeqConfig`), which the image processor saves with its own (`codec`).
"""

import inspect

import torch


# Relative import for a saved model folder (`trust_remote_code`); the fallback for the repository root.
try:
    from .configuration_pix2seq import Pix2SeqConfig
except ImportError:
    from configuration_pix2seq import Pix2SeqConfig


# The configuration settings the tokenizer reads (besides the class indices, the keys of `id2label`).
SETTINGS = (
    "num_bins",
    "max_instances",
    "pad_token_id",
    "task_token_id",
    "fake_class_token_id",
    "class_token_offset",
    "coord_token_offset",
    "random_object_order",
    "noise_objects",
    "class_label_corruption",
    "noise_class_weight",
    "eos_token_weight",
    "eos_mode",
)


class Pix2SeqTokenizer:
    r"""
    Turns boxes and class indices into Pix2Seq token sequences and generated tokens back into detections.

    Boxes are `(x_min, y_min, x_max, y_max)` normalised to the padded square canvas. Each object is written as the
    tokens of `y_min, x_min, y_max, x_max, class` with `bin = round(v * (num_bins - 1))`, the official "yxyx_name"
    format.

    Args:
        class_ids (`list[int]`): the class indices of the label set (keys of `id2label`).
        **settings: any of `SETTINGS`, with the meaning and the default documented in `Pix2SeqConfig`.
    """

    def __init__(self, class_ids, **settings):
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise TypeError(f"Unknown tokenizer settings {unknown}; the settings are {SETTINGS}.")
        defaults = inspect.signature(Pix2SeqConfig.__init__).parameters
        for name in SETTINGS:
            setattr(self, name, settings.get(name, defaults[name].default))
        # Explicitly on the CPU: models are built under a meta-device context by `from_pretrained`.
        self.class_ids = torch.tensor(sorted(class_ids), dtype=torch.long, device="cpu")

    @classmethod
    def from_config(cls, config):
        return cls(list(config.id2label), **{name: getattr(config, name) for name in SETTINGS})

    def to_dict(self):
        """The settings, as `Pix2SeqTokenizer(**settings)` takes them back (what the image processor saves)."""
        return {"class_ids": self.class_ids.tolist(), **{name: getattr(self, name) for name in SETTINGS}}

    @property
    def class_token_ids(self):
        return self.class_ids + self.class_token_offset

    @property
    def coordinate_tokens(self):
        """The token ids of the coordinate bins, as a slice of the vocabulary."""
        return slice(self.coord_token_offset, self.coord_token_offset + self.num_bins)

    @property
    def sequence_length(self):
        return 5 * self.max_instances + int(self.eos_mode)

    def quantize(self, coords):
        """Maps values in [0, 1] to coordinate bins (values outside are clipped)."""
        return torch.round(coords.clamp(0, 1) * (self.num_bins - 1)).long()

    def dequantize(self, bins):
        return bins.float() / (self.num_bins - 1)

    def encode(self, boxes, labels):
        """Tokens of the objects, in the given order: `(N, 4)` xyxy boxes and `(N,)` class indices -> `(5 N,)`."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        coords = self.quantize(boxes[:, [1, 0, 3, 2]]) + self.coord_token_offset  # (N, 4) as yxyx
        classes = (labels + self.class_token_offset).unsqueeze(1)
        return torch.cat([coords, classes], dim=1).reshape(-1)

    def build_training_sequence(self, boxes, labels, generator=None, augment=True):
        """
        One teacher-forcing example of `(N, 4)` xyxy boxes normalised to the canvas and `(N,)` class indices. With
        `augment`, the official sequence augmentation as the settings say (random object order, noise objects, class
        corruption of the decoder input); without it, the objects in their order, the first `max_instances` of them,
        and nothing random.

        Returns a dict of three `(sequence_length,)` tensors: `decoder_input_ids` (task token + corrupted objects),
        `labels` (the true next tokens) and `token_weights` (real tokens 1, noise coordinates 0, noise class
        `noise_class_weight`, PAD/EOS `eos_token_weight`).
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).clamp(0, 1)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.random_object_order and augment:
            order = torch.randperm(len(labels), generator=generator)
            boxes, labels = boxes[order], labels[order]
        boxes, labels = boxes[: self.max_instances], labels[: self.max_instances]
        num_real = len(labels)
        num_noise = self.max_instances - num_real if self.noise_objects and augment else 0
        noise_boxes = self.noise_boxes(boxes, num_noise, generator)

        real_tokens = self.encode(boxes, labels)
        noise_tokens = self.encode(
            noise_boxes, torch.full((num_noise,), self.fake_class_token_id - self.class_token_offset)
        )
        object_tokens = torch.cat([real_tokens, noise_tokens])
        input_tokens = self.corrupt_class_tokens(object_tokens, generator) if augment else object_tokens

        real_weights = torch.ones(5 * num_real)
        noise_weights = torch.tensor([0.0, 0.0, 0.0, 0.0, self.noise_class_weight]).repeat(num_noise)
        if self.eos_mode:
            # After the real objects comes EOS. Each noise object then teaches FAKE at its class position and EOS
            # right after it (coordinates ignored), so the model learns to stop rather than to write noise.
            noise_objects = noise_tokens.reshape(-1, 5)
            ending = torch.tensor([self.fake_class_token_id, self.pad_token_id]).expand(num_noise, 2)
            noise_targets = torch.cat([noise_objects[:, 1:4], ending], dim=1)
            noise_target_weights = torch.tensor([0.0, 0.0, 0.0, self.noise_class_weight, self.eos_token_weight])
            targets = torch.cat([real_tokens, torch.tensor([self.pad_token_id]), noise_targets.reshape(-1)])
            weights = torch.cat(
                [real_weights, torch.tensor([self.eos_token_weight]), noise_target_weights.repeat(num_noise)]
            )
            inputs = torch.cat([torch.tensor([self.task_token_id]), input_tokens])
        else:
            targets = object_tokens
            weights = torch.cat([real_weights, noise_weights])
            # The last target of a full sequence is never an input.
            inputs = torch.cat([torch.tensor([self.task_token_id]), input_tokens])[: self.sequence_length]
        padding = self.sequence_length - len(targets)
        return {
            "decoder_input_ids": torch.nn.functional.pad(
                inputs, (0, self.sequence_length - len(inputs)), value=self.pad_token_id
            ),
            "labels": torch.nn.functional.pad(targets, (0, padding), value=self.pad_token_id),
            "token_weights": torch.nn.functional.pad(weights, (0, padding), value=self.eos_token_weight),
        }

    def build_training_batch(self, objects, generator=None, augment=True):
        """`build_training_sequence` of every `(boxes, labels)` pair, stacked: `(batch_size, sequence_length)` tensors."""
        sequences = [self.build_training_sequence(boxes, labels, generator, augment) for boxes, labels in objects]
        return {key: torch.stack([sequence[key] for sequence in sequences]) for key in sequences[0]}

    def noise_boxes(self, boxes, num_noise, generator=None):
        """
        `num_noise` noise boxes as in the official `augment_bbox`: a uniform split between jittered duplicates of real
        boxes and "bad" boxes, half shifted real boxes and half random boxes; shuffled, clipped to the canvas.
        """
        if num_noise == 0:
            return torch.zeros(0, 4)
        num_real = len(boxes)
        num_dup = int(torch.randint(0, num_noise + 1, (1,), generator=generator)) if num_real else 0
        num_bad = num_noise - num_dup
        sizes = boxes[:, 2:] - boxes[:, :2]  # (N, 2) as w, h

        centers = torch.rand(num_bad, 2, generator=generator)
        random_sizes = torch.nn.init.trunc_normal_(
            torch.empty(num_bad, 2), 0.0, 0.5, -1.0, 1.0, generator=generator
        ).abs()
        if num_real:
            shifted_sizes = sizes[torch.randint(0, num_real, (num_bad,), generator=generator)]
            use_shifted = torch.rand(num_bad, 1, generator=generator) < 0.5
            random_sizes = torch.where(use_shifted, shifted_sizes, random_sizes)
        bad = torch.cat([centers - random_sizes / 2, centers + random_sizes / 2], dim=1)

        source = torch.randint(0, max(num_real, 1), (num_dup,), generator=generator)
        jitter = torch.nn.init.trunc_normal_(torch.empty(num_dup, 4), 0.0, 0.05, -0.1, 0.1, generator=generator)
        dup = boxes[source] + jitter * sizes[source].repeat(1, 2) if num_real else torch.zeros(0, 4)

        noise = torch.cat([bad, dup]).clamp(0, 1)
        return noise[torch.randperm(num_noise, generator=generator)]

    def corrupt_class_tokens(self, tokens, generator=None):
        """Replaces the class tokens (every 5th) of a decoder input as `class_label_corruption` says."""
        choices = {
            "none": ("real",),
            "rand_cls": ("rand",),
            "real_n_fake_cls": ("real", "fake"),
            "rand_n_fake_cls": ("rand", "fake"),
            "real_n_rand_n_fake_cls": ("real", "rand", "fake"),
        }[self.class_label_corruption]
        if choices == ("real",):
            return tokens
        tokens = tokens.clone()
        classes = tokens[4::5]
        candidates = {
            "real": classes,
            # The official corruption draws from every class slot, not only the classes of the label set.
            "rand": torch.randint(
                self.class_token_offset, self.coord_token_offset, classes.shape, generator=generator
            ),
            "fake": torch.full_like(classes, self.fake_class_token_id),
        }
        pick = torch.randint(0, len(choices), classes.shape, generator=generator)
        stacked = torch.stack([candidates[name] for name in choices])
        tokens[4::5] = stacked.gather(0, pick.unsqueeze(0)).squeeze(0)
        return tokens

    def decode(self, tokens, logits):
        """
        Detections from generated tokens. Never raises on any token values or logits (NaN and infinite logits are
        read as very low and very high), and decodes only the steps that have both a token and logits.

        Args:
            tokens (`torch.LongTensor` of shape `(batch_size, T)`): generated tokens, without the task token.
            logits (`torch.FloatTensor` of shape `(batch_size, T, vocab_size)`): the raw logits that produced them.

        Returns:
            `dict` with `boxes` `(batch_size, T // 5, 4)` (xyxy, normalised to the canvas), `scores`
            `(batch_size, T // 5)` and `labels` `(batch_size, T // 5)`. The class of an object is the argmax of the
            softmax over the whole vocabulary restricted to real class tokens, at its class position, and its score is
            that probability (so FAKE mass lowers it). Slots that hold no valid object (a non-coordinate token among
            its 4 coordinates, an empty box, a partial object at the end) get score 0 and label -1. Inverted
            coordinates are put back in order.
        """
        if logits.shape[-1] <= int(self.class_token_ids.max()):
            raise ValueError(
                f"Logits over {logits.shape[-1]} tokens cannot score class token {int(self.class_token_ids.max())}: "
                "the logits and the tokenizer come from different vocabularies."
            )
        batch_size = tokens.shape[0]
        num_objects = min(tokens.shape[1], logits.shape[1]) // 5
        tokens = tokens[:, : 5 * num_objects].reshape(batch_size, num_objects, 5)
        coord_bins = tokens[..., :4] - self.coord_token_offset
        is_coord = (coord_bins >= 0) & (coord_bins < self.num_bins)
        yxyx = self.dequantize(coord_bins.clamp(0, self.num_bins - 1))
        y = torch.sort(yxyx[..., 0::2], dim=-1).values
        x = torch.sort(yxyx[..., 1::2], dim=-1).values
        boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)

        class_logits = (
            logits[:, : 5 * num_objects].reshape(batch_size, num_objects, 5, logits.shape[-1])[:, :, 4].float()
        )
        class_logits = class_logits.nan_to_num(nan=-1e4, posinf=1e4, neginf=-1e4)
        class_token_ids = self.class_token_ids.to(class_logits.device)
        probs = class_logits.softmax(dim=-1)[..., class_token_ids]
        scores, index = probs.max(dim=-1)
        labels = self.class_ids.to(index.device)[index]

        valid = is_coord.all(dim=-1) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        return {
            "boxes": boxes * valid.unsqueeze(-1),
            "scores": scores * valid,
            "labels": torch.where(valid, labels, torch.full_like(labels, -1)),
        }


__all__ = ["Pix2SeqTokenizer"]
