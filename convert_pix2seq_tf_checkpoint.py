"""Converts an official Pix2Seq TF2 checkpoint into a `save_pretrained` folder of this project, without TensorFlow.

    python convert_pix2seq_tf_checkpoint.py --checkpoint_dir resnet_640x640 --output_dir pix2seq-resnet-640

`--checkpoint_dir` is a folder as released in `gs://pix2seq/`: the run's `config.json` (the architecture is read from
it), a `checkpoint` file naming the latest step and its `ckpt-N.index` / `ckpt-N.data-*` files (`--checkpoint ckpt-N`
picks another step). The output folder holds the config, the safetensors weights, the image processor, the generation
config (the official decoding: top-p sampling, no grammar mask), the remote code and a model card; it loads with
`AutoModelForObjectDetection` / `AutoImageProcessor` (`trust_remote_code=True`) and serves
`pipeline("object-detection")`.

Every checkpoint tensor is mapped to exactly one model weight; a checkpoint key that maps to nothing, a model weight
that no key sets and a shape that does not match are errors naming them. Only optimizer state and the checkpoint's
bookkeeping entries are skipped.
"""

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from configuration_pix2seq import Pix2SeqConfig
from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection
from tf_checkpoint_reader import TFCheckpointReader


logger = logging.getLogger(__name__)

# COCO 2017 categories by category id, the ids the official COCO fine-tunes predict (class token = 100 + id).
COCO_CATEGORY_NAMES = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}
NUM_OBJECTS365_CLASSES = 365

# The released families, recognised by their official `model` settings, and their published COCO AP (official README)
# at each fine-tuning resolution.
RELEASED_FAMILIES = {
    "ResNet-50": {
        "settings": {
            "resnet_variant": "standard",
            "resnet_depth": 50,
            "num_encoder_layers": 6,
            "dim_att": 256,
            "num_decoder_layers": 6,
            "dim_att_dec": 256,
        },
        "coco_ap": {640: 39.1, 1024: 41.7, 1333: 42.6},
    },
    "ResNet-50-C4": {
        "settings": {
            "resnet_variant": "c4",
            "resnet_depth": 50,
            "num_encoder_layers": 12,
            "dim_att": 512,
            "num_decoder_layers": 8,
            "dim_att_dec": 512,
        },
        "coco_ap": {640: 44.7, 1024: 46.9, 1333: 47.3},
    },
    "ViT-B": {
        "settings": {
            "resnet_variant": "c1",
            "num_encoder_layers": 12,
            "dim_att": 768,
            "num_decoder_layers": 6,
            "dim_att_dec": 512,
        },
        "coco_ap": {640: 44.2, 1024: 46.5, 1333: 47.1},
    },
    "ViT-L": {
        "settings": {
            "resnet_variant": "c1",
            "num_encoder_layers": 24,
            "dim_att": 1024,
            "num_decoder_layers": 8,
            "dim_att_dec": 512,
        },
        "coco_ap": {640: 47.6, 1024: 49.2, 1333: 50.0},
    },
}

# Official model settings this project's architecture reproduces only at these values.
REQUIRED_SETTINGS = {
    "use_cls_token": False,
    "shared_decoder_embedding": True,
    "decoder_output_bias": True,
    "dec_proj_mode": "mlp",
    "pos_encoding": "sin_cos",
    "pos_encoding_dec": "learned",
}
RESNET_DEPTHS = (50, 101, 152)

VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
BOOKKEEPING_KEYS = {"_CHECKPOINTABLE_OBJECT_GRAPH", "global_step" + VARIABLE_SUFFIX, "save_counter" + VARIABLE_SUFFIX}

_BACKBONE = "model.encoder.backbone.timm_model"
_ENCODER_LAYER = r"model/encoder/transformer_encoder/enc_layers/(\d+)"
_DECODER_LAYER = r"model/decoder/decoder/dec_layers/(\d+)"
_ATTENTION = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "output": "out_proj"}
# Official module path (the key without its last part) -> this model's module name.
MODULE_RULES = [
    (r"model/encoder/resnet/initial_conv_relu_max_pool/0/conv2d", lambda m: f"{_BACKBONE}.conv1"),
    (r"model/encoder/resnet/initial_conv_relu_max_pool/2/bn", lambda m: f"{_BACKBONE}.bn1"),
    # A bottleneck's layers are numbered conv 0, bn 1, (ReLU 2), conv 3, bn 4, (ReLU 5), conv 6, bn 7.
    (
        r"model/encoder/resnet/block_groups/(\d+)/layers/(\d+)/conv_relu_dropblock_layers/([036])/conv2d",
        lambda m: f"{_BACKBONE}.layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) // 3 + 1}",
    ),
    (
        r"model/encoder/resnet/block_groups/(\d+)/layers/(\d+)/conv_relu_dropblock_layers/([147])/bn",
        lambda m: f"{_BACKBONE}.layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) // 3 + 1}",
    ),
    (
        r"model/encoder/resnet/block_groups/(\d+)/layers/(\d+)/projection_layers/0/conv2d",
        lambda m: f"{_BACKBONE}.layer{int(m[1]) + 1}.{m[2]}.downsample.0",
    ),
    (
        r"model/encoder/resnet/block_groups/(\d+)/layers/(\d+)/projection_layers/1/bn",
        lambda m: f"{_BACKBONE}.layer{int(m[1]) + 1}.{m[2]}.downsample.1",
    ),
    (r"model/encoder/stem_conv", lambda m: "model.encoder.backbone.projection"),
    (r"model/encoder/stem_projection", lambda m: "model.encoder.input_proj"),
    (r"model/encoder/stem_ln", lambda m: "model.encoder.input_layer_norm"),
    (_ENCODER_LAYER + r"/mha_ln", lambda m: f"model.encoder.layers.{m[1]}.self_attn_layer_norm"),
    (
        _ENCODER_LAYER + r"/mha/_(query|key|value|output)_dense",
        lambda m: f"model.encoder.layers.{m[1]}.self_attn.{_ATTENTION[m[2]]}",
    ),
    (_ENCODER_LAYER + r"/mlp/layernorms/0", lambda m: f"model.encoder.layers.{m[1]}.final_layer_norm"),
    (_ENCODER_LAYER + r"/mlp/mlp_layers/0/dense([12])", lambda m: f"model.encoder.layers.{m[1]}.mlp.fc{m[2]}"),
    (r"model/encoder/output_ln", lambda m: "model.encoder.layer_norm"),
    (r"model/proj", lambda m: "model.encoder.output_proj"),
    (r"model/proj_ln", lambda m: "model.encoder.output_layer_norm"),
    (r"model/proj_mlp/layernorms/0", lambda m: "model.encoder.output_mlp_layer_norm"),
    (r"model/proj_mlp/mlp_layers/0/dense([12])", lambda m: f"model.encoder.output_mlp.fc{m[1]}"),
    (_DECODER_LAYER + r"/self_ln", lambda m: f"model.decoder.layers.{m[1]}.self_attn_layer_norm"),
    (_DECODER_LAYER + r"/cross_ln", lambda m: f"model.decoder.layers.{m[1]}.cross_attn_layer_norm"),
    (
        _DECODER_LAYER + r"/(self|cross)_mha/_(query|key|value|output)_dense",
        lambda m: f"model.decoder.layers.{m[1]}.{m[2]}_attn.{_ATTENTION[m[3]]}",
    ),
    (_DECODER_LAYER + r"/mlp/layernorms/0", lambda m: f"model.decoder.layers.{m[1]}.final_layer_norm"),
    (_DECODER_LAYER + r"/mlp/mlp_layers/0/dense([12])", lambda m: f"model.decoder.layers.{m[1]}.mlp.fc{m[2]}"),
    (r"model/decoder/output_ln", lambda m: "model.decoder.layer_norm"),
]
# Weights the official decoder creates with `add_weight` under a name holding "/", which the key escapes as ".S".
WHOLE_KEY_RULES = {
    "model/decoder/ar_decoder.Stoken_embedding": "model.decoder.embed_tokens.weight",
    "model/decoder/ar_decoder.Sseq_pos_embedding": "model.decoder.embed_positions.weight",
    "model/decoder/ar_decoder.Soutp_bias": "lm_head.bias",
}
LEAF_NAMES = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


class CheckpointMappingError(ValueError):
    """A checkpoint that does not match the model built from its config: the message names the keys at fault."""


def is_skipped(key):
    """Optimizer state (current and older Keras optimizers) and the checkpoint's bookkeeping entries."""
    return key in BOOKKEEPING_KEYS or key.startswith("optimizer/") or "/.OPTIMIZER_SLOT/" in key


def torch_name(key):
    """The model weight that an official checkpoint key holds, e.g. `model.encoder.output_proj.weight`."""
    if not key.endswith(VARIABLE_SUFFIX):
        raise CheckpointMappingError(f"Unknown checkpoint key {key!r}: not a variable value.")
    path = key[: -len(VARIABLE_SUFFIX)]
    if path in WHOLE_KEY_RULES:
        return WHOLE_KEY_RULES[path]
    module_path, _, leaf = path.rpartition("/")
    if leaf in LEAF_NAMES:
        for pattern, module_name in MODULE_RULES:
            match = re.fullmatch(pattern, module_path)
            if match:
                return f"{module_name(match)}.{LEAF_NAMES[leaf]}"
    raise CheckpointMappingError(f"Unknown checkpoint key {key!r}: no weight of the model corresponds to it.")


def to_torch_layout(key, tensor):
    """
    TF layout -> torch layout: conv kernels HWIO -> OIHW, dense kernels `(in, out)` -> `(out, in)`, attention kernels
    `(D, heads, head_dim)` (query/key/value) or `(heads, head_dim, D)` (output) -> `(D, D)` and attention biases
    `(heads, head_dim)` -> `(D,)`. Works on meta tensors too, to compare shapes without reading any data.
    """
    if key.endswith("/kernel" + VARIABLE_SUFFIX):
        if tensor.ndim == 4:
            return tensor.permute(3, 2, 0, 1)
        if tensor.ndim == 3:
            tensor = tensor.flatten(0, 1) if "_output_dense/" in key else tensor.flatten(1)
        return tensor.T
    if key.endswith("_dense/bias" + VARIABLE_SUFFIX) and tensor.ndim == 2:
        return tensor.flatten()
    return tensor


def derived_weights(model):
    """
    Model state that no checkpoint holds: the output projection's weight (tied to the token embedding, as the
    official shared decoder embedding) and BatchNorm's update counters, unused in inference.
    """
    names = set(model._tied_weights_keys)
    return names | {name for name in model.state_dict() if name.endswith(".num_batches_tracked")}


def map_checkpoint_keys(checkpoint_shapes, model):
    """
    `{checkpoint key: model weight name}` for every weight in `checkpoint_shapes` (`{key: shape}`), checked against
    `model` (which may live on the meta device): each key maps to a distinct weight of the same shape once in torch
    layout, and every weight of the model but the derived ones is set. Raises `CheckpointMappingError` naming
    every key at fault otherwise.
    """
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    mapping, errors = {}, []
    for key, shape in sorted(checkpoint_shapes.items()):
        if is_skipped(key):
            continue
        try:
            name = torch_name(key)
        except CheckpointMappingError as error:
            errors.append(str(error))
            continue
        if name not in expected:
            errors.append(f"Checkpoint key {key!r} maps to {name!r}, which this model does not have.")
            continue
        shape = tuple(to_torch_layout(key, torch.empty(shape, device="meta")).shape)
        if shape != expected[name]:
            errors.append(f"Shape mismatch for {key!r}: {shape} in torch layout, but {name!r} is {expected[name]}.")
        mapping[key] = name
    names = sorted(mapping.values())
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        errors.append(f"Model weights set by more than one checkpoint key: {duplicates}.")
    missing = sorted(set(expected) - set(names) - derived_weights(model))
    if missing:
        errors.append(f"Model weights missing from the checkpoint (left unset): {missing}.")
    if errors:
        raise CheckpointMappingError("\n".join(errors))
    return mapping


def load_checkpoint_into(model, reader):
    """Reads every mapped tensor of `reader` into `model` (see `map_checkpoint_keys`)."""
    mapping = map_checkpoint_keys({key: reader.shape(key) for key in reader.keys()}, model)
    state_dict = {
        name: to_torch_layout(key, torch.from_numpy(reader.read(key))).contiguous() for key, name in mapping.items()
    }
    result = model.load_state_dict(state_dict, strict=False)
    unset = sorted(set(result.missing_keys) - derived_weights(model))
    if unset or result.unexpected_keys:
        raise CheckpointMappingError(
            f"Weights left unset: {unset}; weights not in the model: {result.unexpected_keys}."
        )
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise CheckpointMappingError("The output projection is not tied to the token embedding.")
    return model


def official_settings(official_config):
    """The `model` and (first) `task` sections of an official run's `config.json`."""
    task = official_config.get("task") or official_config["tasks"][0]
    return official_config["model"], task


def released_family(official_config):
    """The name of the released family whose architecture this run has (`"ViT-B"`, ...), or `None`."""
    model, _ = official_settings(official_config)
    for name, family in RELEASED_FAMILIES.items():
        if all(model.get(setting) == value for setting, value in family["settings"].items()):
            return name
    return None


def default_id2label(official_config, labels_file=None):
    """COCO's names by category id for COCO runs; numbered Objects365 classes, or the names of `labels_file`."""
    if labels_file is not None:
        return {int(index): name for index, name in json.loads(Path(labels_file).read_text()).items()}
    dataset = official_config.get("dataset", {}).get("name", "")
    if dataset.startswith("coco"):
        return dict(COCO_CATEGORY_NAMES)
    if "objects365" in dataset or "obj365" in dataset:
        return {index: f"LABEL_{index}" for index in range(1, NUM_OBJECTS365_CLASSES + 1)}
    raise ValueError(f"No known label set for dataset {dataset!r}: pass --labels FILE (a JSON id -> name map).")


def config_from_official(official_config, id2label):
    """The `Pix2SeqConfig` of an official run's `config.json`; unsupported settings raise `ValueError`."""
    model, task = official_settings(official_config)
    for setting, value in REQUIRED_SETTINGS.items():
        if model.get(setting, value) != value:
            raise ValueError(f"Official setting {setting}={model[setting]!r} is not supported (only {value!r}).")
    size = model["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"Only square official image sizes are supported, got {model['image_size']}.")
    max_seq_len = model["max_seq_len"]
    settings = {
        "image_size": height,
        "d_model": model["dim_att_dec"],
        "encoder_hidden_size": model["dim_att"] if model["dim_att"] != model["dim_att_dec"] else None,
        "encoder_layers": model["num_encoder_layers"],
        "encoder_attention_heads": model["num_heads"],
        "encoder_ffn_dim": model["dim_mlp"],
        "decoder_layers": model["num_decoder_layers"],
        "decoder_attention_heads": model["num_heads_dec"],
        "decoder_ffn_dim": model["dim_mlp_dec"],
        "dropout": model["drop_units"],
        "attention_dropout": model["drop_att"],
        "drop_path_rate": model["drop_path"],
        "vocab_size": model["vocab_size"],
        "coord_token_offset": model["coord_vocab_shift"],
        "max_position_embeddings": max_seq_len,
        "num_bins": task["quantization_bins"],
        "task_token_id": task["vocab_id"],
        # The official evaluation writes 5 tokens per instance after the task token, within `max_seq_len`.
        "max_instances": min(task["max_instances_per_image_test"], (max_seq_len - 1) // 5),
        "id2label": id2label,
    }
    variant = model["resnet_variant"]
    if variant == "c1":
        return Pix2SeqConfig(backbone=None, patch_size=model["patch_size"], **settings)
    if variant not in ("standard", "c4"):
        raise ValueError(f"Official resnet_variant={variant!r} is not supported ('standard', 'c4' or 'c1').")
    if model["resnet_depth"] not in RESNET_DEPTHS or model.get("resnet_sk_ratio", 0.0):
        raise ValueError(
            f"Official ResNet depth {model['resnet_depth']} with sk_ratio {model.get('resnet_sk_ratio')} is not "
            f"supported (depths {RESNET_DEPTHS}, no selective kernels)."
        )
    backbone_kwargs = {}
    if variant == "c4":
        # "c4" stops after the third block group (stride 16): timm's feature index 3.
        backbone_kwargs["out_indices"] = [3]
    width = model.get("resnet_width_multiplier", 1)
    if width != 1:
        # The block widths only: timm's 7x7 stem is 64 channels wide whatever the widths (see `convert`).
        backbone_kwargs["channels"] = [int(64 * width) * 2**stage for stage in range(4)]
    return Pix2SeqConfig(
        backbone=f"resnet{model['resnet_depth']}",
        backbone_tf_padding=True,
        backbone_kwargs=backbone_kwargs,
        **settings,
    )


def checkpoint_prefix(checkpoint_dir, checkpoint=None):
    """`DIR/ckpt-N`: `checkpoint` if given, else the latest step named in the folder's `checkpoint` file."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint is None:
        state = (checkpoint_dir / "checkpoint").read_text()
        match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state, flags=re.MULTILINE)
        if match is None:
            raise ValueError(f"{checkpoint_dir / 'checkpoint'} names no model_checkpoint_path.")
        checkpoint = match[1]
    return checkpoint_dir / Path(checkpoint).name


def set_official_decoding(model, task):
    """The official evaluation's decoding as the saved default: top-p sampling, `max_instances` objects, no grammar."""
    settings = model.generation_config.to_dict()
    # A generation config derived from the model config drops settings unknown to transformers, `use_grammar` too.
    settings.pop("_from_model_config", None)
    settings.pop("transformers_version", None)
    settings.update(
        do_sample=True,
        top_p=task["top_p"],
        top_k=task["top_k"],
        temperature=task["temperature"],
        max_new_tokens=model.config.sequence_length,
        use_grammar=False,
    )
    model.generation_config = GenerationConfig(**settings)


def model_card(source, family, official_config, config):
    """The converted folder's README.md: where the weights come from, their published AP, how they decode."""
    model, task = official_settings(official_config)
    dataset = official_config.get("dataset", {}).get("name", "unknown")
    published_ap = RELEASED_FAMILIES[family]["coco_ap"] if family is not None else {}
    if family is None:
        ap_line = "Its architecture is none of the released families, so no AP is published for it."
    elif not dataset.startswith("coco"):
        ap_line = f"It is the {family} pretraining checkpoint; AP is published for the COCO fine-tunes only."
    elif config.image_size in published_ap:
        ap_line = (
            f"Published COCO AP of this checkpoint: **{published_ap[config.image_size]}** ({family}, "
            f"{config.image_size} px), from the official release; it was not measured on this conversion."
        )
    else:
        ap_line = f"No AP is published for {family} at {config.image_size} px."
    return f"""---
library_name: transformers
pipeline_tag: object-detection
tags:
- pix2seq
- object-detection
---

# Pix2Seq {family or "(custom architecture)"}, {config.image_size} px

Converted from the official Pix2Seq TensorFlow checkpoint `{source}` (trained on `{dataset}`) with this project's
`convert_pix2seq_tf_checkpoint.py`. {ap_line}
The conversion is checked for exact parity with the official model on random-weight checkpoints of the same
structure.

```python
from transformers import pipeline

detector = pipeline("object-detection", model="path/to/this/folder", trust_remote_code=True)
detector("image.jpg", threshold=0.5)
```

## Decoding

The saved generation config is the official evaluation's: top-p sampling with `top_p={task["top_p"]}`,
`top_k={task["top_k"]}`, `temperature={task["temperature"]}`, {config.max_instances} objects
(`max_new_tokens={config.sequence_length}`) and no grammar mask (`use_grammar: false`). To decode greedily, or with the
grammar mask (4 coordinates, then a class):

```python
model.generation_config.do_sample = False  # greedy
model.generation_config.use_grammar = True  # grammar-constrained
```

or per call, `model.generate(pixel_values, do_sample=False, use_grammar=True)`.

## Architecture

Official `resnet_variant="{model["resnet_variant"]}"`: {config.encoder_layers} encoder layers of width
{config.encoder_hidden_size or config.d_model}, {config.decoder_layers} decoder layers of width {config.d_model},
vocabulary {config.vocab_size}, {config.num_bins} coordinate bins, {len(config.id2label)} classes. Images are RGB in
[0, 1] without mean/std normalisation, resized so that their longer side is {config.image_size} and padded at the
bottom and right with 0.3.
"""


def convert(checkpoint_dir, output_dir, checkpoint=None, labels_file=None):
    """Converts the official run in `checkpoint_dir` into a `save_pretrained` folder; returns the model."""
    checkpoint_dir = Path(checkpoint_dir)
    official_config = json.loads((checkpoint_dir / "config.json").read_text())
    prefix = checkpoint_prefix(checkpoint_dir, checkpoint)
    width = official_config["model"].get("resnet_width_multiplier", 1)
    if width != 1:
        raise ValueError(
            f"resnet_width_multiplier={width}: timm's ResNet stem is always 64 channels wide, so only width 1 (every "
            "released checkpoint) converts."
        )
    config = config_from_official(official_config, default_id2label(official_config, labels_file))
    model = load_checkpoint_into(Pix2SeqForObjectDetection(config), TFCheckpointReader(prefix)).eval()
    set_official_decoding(model, official_settings(official_config)[1])
    model.save_pretrained(output_dir)
    processor = Pix2SeqImageProcessor.from_model_config(config, pad_value=0.3, do_normalize=False)
    processor.save_pretrained(output_dir)
    source = f"{checkpoint_dir.resolve().name}/{prefix.name}"
    card = model_card(source, released_family(official_config), official_config, config)
    (Path(output_dir) / "README.md").write_text(card)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True, help="Official run: config.json, checkpoint, ckpt-N.*")
    parser.add_argument("--output_dir", required=True, help="Where to write the save_pretrained folder.")
    parser.add_argument("--checkpoint", help="Checkpoint to convert, e.g. ckpt-10000 (default: the latest one).")
    parser.add_argument("--labels", help="JSON file mapping class id -> name (default: COCO or numbered Objects365).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    start = time.perf_counter()
    convert(args.checkpoint_dir, args.output_dir, checkpoint=args.checkpoint, labels_file=args.labels)
    logger.info("Converted %s to %s in %.1f s.", args.checkpoint_dir, args.output_dir, time.perf_counter() - start)


if __name__ == "__main__":
    main()
