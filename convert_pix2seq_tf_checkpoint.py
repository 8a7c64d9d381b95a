"""Converts an official Pix2Seq TF2 checkpoint into a `save_pretrained` folder of this project, without TensorFlow.

    python convert_pix2seq_tf_checkpoint.py --checkpoint_dir gs://pix2seq/coco_det_finetune/resnet_640x640 \
        --output_dir pix2seq-resnet-640

`--checkpoint_dir` is a folder as released in `gs://pix2seq/`, either a local copy or its `gs://` address (then it is
downloaded anonymously over HTTPS into `--cache_dir` first). It holds the run's `config.json` (the architecture is read
from it, in the 2022 release layout or today's official one; `--config FILE` gives one to a folder without it), a
`checkpoint` file naming the latest step and its `ckpt-N.index` / `ckpt-N.data-*` files (`--checkpoint ckpt-N` picks
another step). The output folder holds the config, the safetensors weights, the image processor, the generation
config (the official decoding: top-p sampling, no grammar mask), the remote code and a model card; it loads with
`AutoModelForObjectDetection` / `AutoImageProcessor` (`trust_remote_code=True`) and serves
`pipeline("object-detection")`. A multi-task (Pix2Seq v2) run converts with all its tasks: the config then also holds
the text vocabulary layout and each task's prompt and official decoding (`config.tasks`, read by
`generate(task=...)`). `--push_to_hub REPO_ID` publishes it.

The checkpoint is untrusted input. What the weights cannot show (head counts, the MLP widths' rule, the task) is
checked against the tensors' TF shapes and the config's own sections; the config is compared with the checkpoint's
sizes before any model is built (first on the meta device); every tensor's crc32c is verified when it is read; every
checkpoint tensor is mapped to exactly one model weight. Anything wrong stops the conversion with one message naming
the file, tensor or setting at fault (`--debug` shows the traceback). Only optimizer state and the checkpoint's
bookkeeping entries are skipped.
"""

import argparse
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.utils import httpx
from transformers import GenerationConfig
from transformers import initialization as init

from configuration_pix2seq import Pix2SeqConfig
from conversion.bucket_download import DEFAULT_BASE_URL, BucketFolder, DownloadError, default_cache_dir, is_gs_url
from conversion.tf_checkpoint_reader import (
    CheckpointFormatError,
    TFCheckpointReader,
    checkpoint_name,
    latest_checkpoint_name,
    open_regular_file,
)
from image_processing_pix2seq import MAX_CANVAS_SIDE, Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqForObjectDetection


logger = logging.getLogger(__name__)

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
# The official class token of category id `i` is `100 + i` (`vocab.py`), as this project's default layout.
CLASS_TOKEN_OFFSET = 100

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


# The published COCO detection AP of the two multi-task ViT-B checkpoints (official README), by image size.
MULTITASK_COCO_AP = {640: 44.2, 1024: 46.5}

DETECTION_TASK = "object_detection"
# The detection prompt of every released checkpoint; the 2022 release's files may lack `task.vocab_id`, which both
# official colabs set to this value before use.
DEFAULT_DETECTION_PROMPT = 10
# The other tasks of the multi-task (Pix2Seq v2) runs: their official prompts, and the official vocabulary's tokens
# that no run configuration states (the official `vocab.py` fixes them): the polygon separator, the invisible keypoint,
# and COCO's person category (id 1), whose class token conditions the keypoint prompt.
MULTITASK_PROMPTS = {"instance_segmentation": 11, "keypoint_detection": 12, "captioning": 13}
POLYGON_SEPARATOR_TOKEN = 40
INVISIBLE_KEYPOINT_TOKEN = 41
PERSON_CATEGORY_ID = 1
MAX_JSON_FILE_SIZE = 16 << 20
# The official model's settings that are numbers of things, checked to be positive integers.
INTEGER_SETTINGS = (
    "num_encoder_layers",
    "dim_att",
    "dim_mlp",
    "num_heads",
    "num_decoder_layers",
    "dim_att_dec",
    "dim_mlp_dec",
    "num_heads_dec",
    "max_seq_len",
    "vocab_size",
    "coord_vocab_shift",
)


class ConversionError(ValueError):
    """A file, setting or checkpoint the converter refuses: the message names it."""


class CheckpointMappingError(ConversionError):
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


def load_checkpoint_into(model, reader, mapping=None):
    """
    Reads every mapped tensor of `reader` (crc32c-checked) into `model`; `mapping` is `map_checkpoint_keys`'s result,
    computed here when not given. Every mapped tensor must be float32, as the model's weights are.
    """
    if mapping is None:
        mapping = map_checkpoint_keys({key: reader.shape(key) for key in reader.keys()}, model)
    for key in mapping:
        if reader.dtype(key) != np.float32:
            raise CheckpointMappingError(
                f"Tensor {key!r} is {reader.dtype(key)} in the checkpoint; weights are float32."
            )
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


def read_json_file(path, what):
    """The JSON value of `path` (a regular file of bounded size); `ConversionError` naming the file otherwise."""
    try:
        with open_regular_file(path) as file:
            data = file.read(MAX_JSON_FILE_SIZE + 1)
    except CheckpointFormatError as error:
        raise ConversionError(f"{what}: {error}") from None
    if len(data) > MAX_JSON_FILE_SIZE:
        raise ConversionError(f"{what} {path} is larger than {MAX_JSON_FILE_SIZE >> 20} MB.")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{what} {path} is not valid JSON ({error}).") from None
    except RecursionError:
        raise ConversionError(
            f"{what} {path} is JSON nested too deeply to read (more than about 1000 levels)."
        ) from None


def read_official_config(path):
    """An official run's `config.json`: a JSON object with a `model` section; `ConversionError` naming it otherwise."""
    official = read_json_file(path, "The run configuration")
    if not isinstance(official, dict) or not isinstance(official.get("model"), dict):
        raise ConversionError(f"{path} is not an official Pix2Seq run configuration: it has no `model` section.")
    return official


def detection_task(official_config, source="config.json"):
    """
    The object-detection task of an official run configuration, as a new dict: `task`, or the one of `tasks` (the
    multi-task files list four) named `object_detection`; a missing `vocab_id` is the official prompt 10.
    """
    task = official_config.get("task")
    tasks = official_config.get("tasks") or ([task] if task is not None else [])
    if not isinstance(tasks, list) or not all(isinstance(entry, dict) for entry in tasks):
        raise ConversionError(f"{source}: `task` / `tasks` is not a task section (or a list of them).")
    candidates = [entry for entry in [task, *tasks] if isinstance(entry, dict) and entry.get("name") == DETECTION_TASK]
    if not candidates:
        found = ", ".join(f"{entry.get('name')!r} (prompt {entry.get('vocab_id')})" for entry in tasks) or "none"
        raise ConversionError(
            f"{source}: the run's task is {found}, not {DETECTION_TASK!r}; only object detection converts."
        )
    task = dict(candidates[0])
    task.setdefault("vocab_id", DEFAULT_DETECTION_PROMPT)
    return task


def multitask_settings(official_config, detection, max_instances, source="config.json"):
    """
    The `Pix2SeqConfig` settings of a multi-task run (`tasks` lists more than object detection): every task's prompt
    and official evaluation decoding as `tasks`, and the vocabulary layout (text tokens, polygon separator, invisible
    keypoint). `{}` for a detection-only run. Each task's settings come from its section of the run configuration:
    - detection (`detection`, its task section): its top-k/top-p/temperature sampling, 5 tokens for each of
      `max_instances` objects, as the saved generation config;
    - instance segmentation: 2 tokens per polygon point (`max_points_per_object`), `ensemble_num_samples` samples per
      box, the `max_instances_per_image_test` best boxes;
    - keypoints: 2 tokens per keypoint, the person class token, the crop margin (`crop_to_bbox_pad_scale`), the score
      weight and whether invisible tokens are re-drawn (`eval_suppress_invisible_token`);
    - captioning: greedy up to the model's `max_seq_len`, ending at the end-of-text token. The configuration's own top-p
      1.0 is pure sampling; the official maintainers advise greedy decoding, which gives the published BLEU.
    """
    tasks = official_config.get("tasks") or []
    others = [entry for entry in tasks if entry.get("name") != DETECTION_TASK]
    if not others:
        return {}
    unknown = [entry.get("name") for entry in others if entry.get("name") not in MULTITASK_PROMPTS]
    if unknown:
        raise ConversionError(
            f"{source}: the run's tasks {unknown} are not supported; the tasks that convert are "
            f"{[DETECTION_TASK, *MULTITASK_PROMPTS]}."
        )
    model = official_config["model"]

    def decoding(section):
        return {
            "prompt_token_id": section.get("vocab_id", MULTITASK_PROMPTS.get(section.get("name"))),
            "do_sample": True,
            "top_k": section.get("top_k", 0),
            "top_p": section.get("top_p", 1.0),
            "temperature": section.get("temperature", 1.0),
        }

    settings = {DETECTION_TASK: {**decoding(detection), "max_new_tokens": 5 * max_instances}}
    for section in others:
        name = section["name"]
        task = decoding(section)
        if name == "instance_segmentation":
            task.update(
                max_new_tokens=2 * section.get("max_points_per_object", 128),
                num_samples=section.get("ensemble_num_samples", 8),
                max_instances=section.get("max_instances_per_image_test", 10),
            )
        elif name == "keypoint_detection":
            task.update(
                max_new_tokens=2 * section.get("max_points_per_object", 17),
                person_class_token_id=CLASS_TOKEN_OFFSET + PERSON_CATEGORY_ID,
                crop_pad_scale=section.get("crop_to_bbox_pad_scale", 0.5),
                points_score_weight=section.get("points_score_weight", 1.0),
                suppress_invisible=section.get("eval_suppress_invisible_token", True),
            )
        else:
            # The official captioning decodes up to the model's length, and its text tokenizer ends a caption with
            # SentencePiece id 1.
            task = {
                "prompt_token_id": task["prompt_token_id"],
                "max_new_tokens": model["max_seq_len"] - 1,
                "do_sample": False,
                "eos_token_id": model.get("text_vocab_shift", 3000) + 1,
            }
        settings[name] = task
    layout = {"tasks": settings}
    if "instance_segmentation" in settings:
        layout["polygon_separator_token_id"] = POLYGON_SEPARATOR_TOKEN
    if "keypoint_detection" in settings:
        layout["invisible_keypoint_token_id"] = INVISIBLE_KEYPOINT_TOKEN
    if "captioning" in settings:
        layout["text_token_offset"] = model.get("text_vocab_shift", 3000)
    return layout


def official_settings(official_config, source="config.json"):
    """The `model` section and the object-detection task section of an official run's `config.json`."""
    return official_config["model"], detection_task(official_config, source)


def official_image_size(model, source="config.json"):
    """
    `model.image_size` as one side: an int or `[h, w]` with h == w, within the processor's `MAX_CANVAS_SIDE` (the
    weights cannot show the size the model was trained at, and the converted folder's processor refuses a larger one).
    """
    size = model.get("image_size")
    sides = [size] if isinstance(size, int) else size
    if (
        not isinstance(sides, list)
        or len(sides) not in (1, 2)
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in sides)
    ):
        raise ConversionError(f"{source}: model.image_size={size!r} is neither an int nor [height, width].")
    if len(set(sides)) != 1:
        raise ConversionError(f"{source}: model.image_size={size!r}: only square official image sizes convert.")
    if not 1 <= sides[0] <= MAX_CANVAS_SIDE:
        raise ConversionError(
            f"{source}: model.image_size={size!r} is outside 1..{MAX_CANVAS_SIDE} px (the released checkpoints use "
            "640 to 1333)."
        )
    return sides[0]


def official_mlp_width(model, width_setting, mlp_setting, source="config.json"):
    """
    The official MLP width rule: the MLP keeps a whole-number ratio of its layer's width, `dim * (dim_mlp // dim)`.
    """
    ratio = model[mlp_setting] // model[width_setting]
    if ratio < 1:
        raise ConversionError(
            f"{source}: model.{mlp_setting}={model[mlp_setting]} is below model.{width_setting}="
            f"{model[width_setting]}; the official MLP width, {width_setting} * ({mlp_setting} // {width_setting}), "
            "would be 0."
        )
    return model[width_setting] * ratio


def check_model_settings(model, source="config.json"):
    """The official `model` settings that count things are positive integers; `ConversionError` naming one if not."""
    for setting in INTEGER_SETTINGS:
        value = model.get(setting)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(f"{source}: model.{setting}={value!r} is not a positive integer.")
    official_image_size(model, source)


def layer_indices(shapes, layer_pattern):
    indices = set()
    for key in shapes:
        match = re.match(layer_pattern + "/", key)
        if match:
            indices.add(int(match[1]))
    return indices


def check_settings_against_checkpoint(model, shapes, source="config.json"):
    """
    Compares the official `model` settings with the checkpoint's own sizes (`{key: TF shape}`), before any model is
    built: layer counts, widths, vocabulary, positions, the head counts that only the attention kernels' TF layout
    `(D, heads, head_dim)` states, and the MLP widths of the official rule. `ConversionError` naming the setting.
    """
    check_model_settings(model, source)

    def refuse(setting, found, where):
        raise ConversionError(f"{source}: model.{setting}={model[setting]}, but the checkpoint has {found} ({where}).")

    for setting, pattern, what in (
        ("num_encoder_layers", _ENCODER_LAYER, "encoder layers"),
        ("num_decoder_layers", _DECODER_LAYER, "decoder layers"),
    ):
        indices = layer_indices(shapes, pattern)
        if indices != set(range(model[setting])):
            refuse(
                setting,
                f"{len(indices)} {what}",
                f"layer keys numbered {min(indices, default=None)} to {max(indices, default=None)}",
            )
    embedding = shapes.get(f"model/decoder/ar_decoder.Stoken_embedding{VARIABLE_SUFFIX}")
    positions = shapes.get(f"model/decoder/ar_decoder.Sseq_pos_embedding{VARIABLE_SUFFIX}")
    if embedding is None or positions is None or len(embedding) != 2 or len(positions) != 2:
        raise ConversionError(f"The checkpoint has no 2-D decoder token and position embeddings (for {source}).")
    for setting, found, where in (
        ("vocab_size", embedding[0], "token embedding rows"),
        ("dim_att_dec", embedding[1], "token embedding width"),
        ("max_seq_len", positions[0], "decoder positions"),
    ):
        if model[setting] != found:
            refuse(setting, found, where)
    layers = (
        (_ENCODER_LAYER + "/mha", "num_heads", "dim_att", "dim_mlp", _ENCODER_LAYER + "/mlp"),
        (
            _DECODER_LAYER + "/(?:self|cross)_mha",
            "num_heads_dec",
            "dim_att_dec",
            "dim_mlp_dec",
            _DECODER_LAYER + "/mlp",
        ),
    )
    for attention, heads, width, mlp, mlp_path in layers:
        mlp_width = official_mlp_width(model, width, mlp, source)
        for key, shape in shapes.items():
            if re.fullmatch(attention + r"/_query_dense/kernel" + re.escape(VARIABLE_SUFFIX), key):
                if len(shape) != 3 or shape[0] != model[width]:
                    refuse(width, f"a query kernel of shape {shape}", key)
                if shape[1] != model[heads]:
                    refuse(heads, f"{shape[1]} attention heads", f"{key} is (D, heads, head_dim) = {shape}")
            elif re.fullmatch(mlp_path + r"/mlp_layers/0/dense1/kernel" + re.escape(VARIABLE_SUFFIX), key):
                if shape != (model[width], mlp_width):
                    refuse(mlp, f"an MLP of shape {shape}, not {(model[width], mlp_width)}", key)
    projection = shapes.get(f"model/proj_mlp/mlp_layers/0/dense1/kernel{VARIABLE_SUFFIX}")
    projection_width = model["dim_att_dec"] * (model["dim_mlp"] // model["dim_att"])
    if projection is not None and projection != (model["dim_att_dec"], projection_width):
        refuse(
            "dim_mlp",
            f"a projection MLP of shape {projection}, not {(model['dim_att_dec'], projection_width)}",
            "model/proj_mlp: dim_att_dec * (dim_mlp // dim_att)",
        )


def released_family(official_config):
    """The name of the released family whose architecture this run has (`"ViT-B"`, ...), or `None`."""
    model = official_config["model"]
    for name, family in RELEASED_FAMILIES.items():
        if all(model.get(setting) == value for setting, value in family["settings"].items()):
            return name
    return None


def detection_dataset(official_config):
    """
    The dataset section of the detection task: `dataset` (the same as `datasets[0]` in official files), or, where
    `datasets` lists several (the multi-task files), the one named for object detection.
    """
    datasets = [section for section in official_config.get("datasets") or [] if isinstance(section, dict)]
    if len(datasets) > 1:
        for section in datasets:
            if str(section.get("name", "")).endswith(DETECTION_TASK):
                return section
    dataset = official_config.get("dataset")
    if isinstance(dataset, dict):
        return dataset
    return datasets[0] if datasets else {}


def dataset_kind(official_config, folder=None):
    """
    `"coco"`, `"objects365"` or `None`: COCO in either layout (`coco/2017_object_detection`, or the 2022
    `object_detection` with a COCO TFDS name or COCO annotation files), Objects365 from the dataset section
    (`obj365` / `objects365`) or, where that names no dataset, from the checkpoint folder's path
    (`obj365_pretrain/...`).
    """
    dataset = detection_dataset(official_config)
    values = [str(value).lower() for value in dataset.values() if isinstance(value, str)]
    name = str(dataset.get("name", "")).lower()
    if name.startswith("coco") or (
        name in ("", DETECTION_TASK)
        and (str(dataset.get("tfds_name", "")).lower().startswith("coco") or any("instances_" in v for v in values))
    ):
        return "coco"
    if any("obj365" in value or "objects365" in value for value in (name, str(dataset.get("tfds_name", "")).lower())):
        return "objects365"
    if name in ("", DETECTION_TASK) and folder is not None:
        parts = [part.lower() for part in Path(folder).parts[-2:]]
        if any("obj365" in part or "objects365" in part for part in parts):
            return "objects365"
    return None


def read_labels_file(labels_file):
    labels = read_json_file(labels_file, "The labels file")
    if not isinstance(labels, dict) or not labels:
        raise ConversionError(f"The labels file {labels_file} is not a JSON object mapping class ids to names.")
    id2label = {}
    for index, name in labels.items():
        if not str(index).isdigit() or not isinstance(name, str):
            raise ConversionError(f"The labels file {labels_file} maps {index!r} to {name!r}; expected id -> name.")
        id2label[int(index)] = name
    return id2label


def default_id2label(official_config, labels_file=None, folder=None):
    """COCO's names by category id for COCO runs; numbered Objects365 classes, or the names of `labels_file`."""
    if labels_file is not None:
        return read_labels_file(labels_file)
    kind = dataset_kind(official_config, folder)
    if kind == "coco":
        return dict(COCO_CATEGORY_NAMES)
    if kind == "objects365":
        return {index: f"LABEL_{index}" for index in range(1, NUM_OBJECTS365_CLASSES + 1)}
    dataset = detection_dataset(official_config)
    raise ConversionError(
        f"No known label set for dataset {dataset.get('name')!r} (tfds_name {dataset.get('tfds_name')!r}): pass "
        "--labels FILE (a JSON id -> name map)."
    )


def config_from_official(official_config, id2label, source="config.json"):
    """The `Pix2SeqConfig` of an official run's `config.json`; unsupported settings raise `ConversionError`."""
    model, task = official_settings(official_config, source)
    check_model_settings(model, source)
    for setting, value in REQUIRED_SETTINGS.items():
        if model.get(setting, value) != value:
            raise ConversionError(
                f"{source}: official setting {setting}={model[setting]!r} is not supported (only {value!r})."
            )
    try:
        image_size = official_image_size(model, source)
        max_seq_len = model["max_seq_len"]
        settings = {
            "image_size": image_size,
            "d_model": model["dim_att_dec"],
            "encoder_hidden_size": model["dim_att"] if model["dim_att"] != model["dim_att_dec"] else None,
            "encoder_layers": model["num_encoder_layers"],
            "encoder_attention_heads": model["num_heads"],
            # The official rule; the model's projection MLP, d_model * encoder_ffn_dim // encoder width, follows it too.
            "encoder_ffn_dim": official_mlp_width(model, "dim_att", "dim_mlp", source),
            "decoder_layers": model["num_decoder_layers"],
            "decoder_attention_heads": model["num_heads_dec"],
            "decoder_ffn_dim": official_mlp_width(model, "dim_att_dec", "dim_mlp_dec", source),
            "dropout": model.get("drop_units", 0.1),
            "attention_dropout": model.get("drop_att", 0.0),
            "drop_path_rate": model.get("drop_path", 0.1),
            "vocab_size": model["vocab_size"],
            "coord_token_offset": model["coord_vocab_shift"],
            "max_position_embeddings": max_seq_len,
            "num_bins": task["quantization_bins"],
            "task_token_id": task["vocab_id"],
            # The official evaluation writes 5 tokens per instance after the task token, within `max_seq_len`.
            "max_instances": min(task["max_instances_per_image_test"], (max_seq_len - 1) // 5),
            "id2label": id2label,
        }
        settings.update(multitask_settings(official_config, task, settings["max_instances"], source))
        variant = model.get("resnet_variant")
        if variant == "c1":
            return Pix2SeqConfig(backbone=None, patch_size=model.get("patch_size"), **settings)
        if variant not in ("standard", "c4"):
            raise ValueError(f"official resnet_variant={variant!r} is not supported ('standard', 'c4' or 'c1').")
        if model.get("resnet_depth") not in RESNET_DEPTHS or model.get("resnet_sk_ratio", 0.0):
            raise ValueError(
                f"official ResNet depth {model.get('resnet_depth')} with sk_ratio {model.get('resnet_sk_ratio')} is "
                f"not supported (depths {RESNET_DEPTHS}, no selective kernels)."
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
    except ConversionError:
        raise
    except KeyError as error:
        raise ConversionError(f"{source}: the setting {error} is missing.") from None
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{source}: {error}") from None


def checkpoint_prefix(checkpoint_dir, checkpoint=None):
    """`DIR/ckpt-N`: `checkpoint` if given, else the latest step named in the folder's `checkpoint` file."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint is None:
        state = checkpoint_dir / "checkpoint"
        if not state.exists():
            raise ConversionError(f"{checkpoint_dir} has no `checkpoint` file: pass --checkpoint ckpt-N.")
        return checkpoint_dir / latest_checkpoint_name(state)
    return checkpoint_dir / checkpoint_name(checkpoint, "--checkpoint")


def set_official_decoding(model, task):
    """The official evaluation's decoding as the saved default: top-p sampling, `max_instances` objects, no grammar."""
    settings = model.generation_config.to_dict()
    # A generation config derived from the model config drops settings unknown to transformers, `use_grammar` too.
    settings.pop("_from_model_config", None)
    settings.pop("transformers_version", None)
    settings.update(
        do_sample=True,
        top_p=task.get("top_p", 0.4),
        top_k=task.get("top_k", 0),
        temperature=task.get("temperature", 1.0),
        max_new_tokens=model.config.sequence_length,
        use_grammar=False,
    )
    model.generation_config = GenerationConfig(**settings)


def model_card(source, family, official_config, config, folder=None):
    """The converted folder's README.md: where the weights come from, their published AP, how they decode."""
    model, task = official_settings(official_config)
    kind = dataset_kind(official_config, folder)
    dataset = {"coco": "COCO 2017", "objects365": "Objects365"}.get(kind) or detection_dataset(official_config).get(
        "name", "unknown"
    )
    published_ap = RELEASED_FAMILIES[family]["coco_ap"] if family is not None else {}
    if family is None:
        ap_line = "Its architecture is none of the released families, so no AP is published for it."
    elif config.tasks is not None and kind == "coco" and family == "ViT-B" and config.image_size in MULTITASK_COCO_AP:
        ap_line = (
            f"Published COCO detection AP of the multi-task ViT-B at {config.image_size} px: "
            f"**{MULTITASK_COCO_AP[config.image_size]}**, from the official release; it was not measured on this "
            "conversion."
        )
    elif kind != "coco" or model["vocab_size"] != 3000:
        ap_line = f"It is a {family} checkpoint other than the COCO fine-tunes, for which alone AP is published here."
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

Converted from the official Pix2Seq TensorFlow checkpoint `{source}` (trained on {dataset}) with this project's
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
""" + tasks_section(config)


def tasks_section(config):
    """The model card's section on the tasks of a multi-task checkpoint: prompts and default decoding per task."""
    if config.tasks is None:
        return ""
    rows = []
    for name, task in config.tasks.items():
        decoding = (
            f"top-p {task.get('top_p', 1.0)} sampling (top-k {task.get('top_k', 0)}, "
            f"temperature {task.get('temperature', 1.0)})"
            if task.get("do_sample")
            else "greedy"
        )
        samples = f", {task['num_samples']} samples per prompt" if task.get("num_samples", 1) > 1 else ""
        rows.append(f"| `{name}` | {task['prompt_token_id']} | {task['max_new_tokens']} | {decoding}{samples} |")
    table = "\n".join(rows)
    return f"""
## Tasks

A multi-task (Pix2Seq v2) checkpoint: one decoder, switched by the prompt token. Text tokens start at
{config.text_token_offset}. `model.generate(pixel_values, task=..., decoder_input_ids=prompts)` decodes a task with
its official evaluation settings (captioning greedy, as the official maintainers advise); object detection is what
the pipeline runs.

| task | prompt | new tokens | decoding |
| --- | --- | --- | --- |
{table}
"""


def check_output_dir(output_dir, checkpoint_dir, overwrite_output_dir=False):
    """The output folder is never the checkpoint folder or inside it, and an existing one is replaced only on request."""
    output, source = Path(output_dir).resolve(), Path(checkpoint_dir).resolve()
    if output == source or source in output.parents:
        raise ConversionError(
            f"--output_dir {output_dir} is the checkpoint folder {checkpoint_dir} or inside it; the converter never writes there."
        )
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output_dir {output_dir} exists and is not a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite_output_dir:
        raise ConversionError(
            f"--output_dir {output_dir} already exists and is not empty: pass --overwrite_output_dir to replace it."
        )


def meta_model(config):
    """The model without weights (every tensor on the meta device), to compare shapes before allocating anything."""
    with torch.device("meta"), init.meta_device_safe_creation_ops():
        return Pix2SeqForObjectDetection(config)


def convert(
    checkpoint_dir,
    output_dir,
    checkpoint=None,
    labels_file=None,
    config_file=None,
    overwrite_output_dir=False,
    cache_dir=None,
    base_url=DEFAULT_BASE_URL,
):
    """
    Converts the official run in `checkpoint_dir` (a folder, or a `gs://` address downloaded into `cache_dir` from
    `base_url`) into a `save_pretrained` folder; returns the model. `config_file` replaces the folder's `config.json`.
    """
    source = str(checkpoint_dir)
    if is_gs_url(source):
        bucket_folder = BucketFolder(source, cache_dir=cache_dir, base_url=base_url)
        check_output_dir(output_dir, bucket_folder.local_dir, overwrite_output_dir)  # before downloading anything
        checkpoint_dir = bucket_folder.fetch_checkpoint(checkpoint, with_config=config_file is None)
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConversionError(f"--checkpoint_dir {checkpoint_dir} is not a folder.")
    check_output_dir(output_dir, checkpoint_dir, overwrite_output_dir)
    config_path = Path(config_file) if config_file is not None else checkpoint_dir / "config.json"
    if not config_path.exists():
        raise ConversionError(
            f"{config_path} does not exist: the architecture comes from the run's configuration. Pass --config FILE "
            "with the run's config.json (the multi-task checkpoints' folders may have none; README, 'Official "
            "weights', says where to find theirs)."
        )
    official_config = read_official_config(config_path)
    model_settings, task = official_settings(official_config, config_path)
    if not any(
        isinstance(entry, dict) and entry.get("name") == DETECTION_TASK and "vocab_id" in entry
        for entry in [official_config.get("task"), *(official_config.get("tasks") or [])]
    ):
        logger.info(
            "%s sets no task.vocab_id: the detection prompt is the official %d.", config_path, task["vocab_id"]
        )
    prefix = checkpoint_prefix(checkpoint_dir, checkpoint)
    reader = TFCheckpointReader(prefix)
    reader.check_shards()
    shapes = {key: reader.shape(key) for key in reader.keys()}
    check_settings_against_checkpoint(model_settings, shapes, config_path)
    width = model_settings.get("resnet_width_multiplier", 1)
    if width != 1:
        raise ConversionError(
            f"{config_path}: resnet_width_multiplier={width}: timm's ResNet stem is always 64 channels wide, so only "
            "width 1 (every released checkpoint) converts."
        )
    id2label = default_id2label(official_config, labels_file, checkpoint_dir)
    config = config_from_official(official_config, id2label, config_path)
    mapping = map_checkpoint_keys(shapes, meta_model(config))
    model = load_checkpoint_into(Pix2SeqForObjectDetection(config), reader, mapping).eval()
    set_official_decoding(model, task)
    model.save_pretrained(output_dir)
    processor = Pix2SeqImageProcessor.from_model_config(config, pad_value=0.3, do_normalize=False)
    processor.save_pretrained(output_dir)
    name = source.rstrip("/") if is_gs_url(source) else checkpoint_dir.resolve().name
    card = model_card(
        f"{name}/{prefix.name}", released_family(official_config), official_config, config, checkpoint_dir
    )
    (Path(output_dir) / "README.md").write_text(card)
    return model


def push_to_hub(output_dir, repo_id, private=None):
    """Publishes the converted folder, model card included, as the Hub repository `repo_id`; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=output_dir, repo_id=repo_id, commit_message="Pix2Seq converted from the official TF checkpoint"
    )
    return url


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint_dir", required=True, help="Official run folder, or its gs:// address (e.g. gs://pix2seq/...)."
    )
    parser.add_argument("--output_dir", required=True, help="Where to write the save_pretrained folder.")
    parser.add_argument("--checkpoint", help="Checkpoint to convert, e.g. ckpt-10000 (default: the latest one).")
    parser.add_argument("--config", help="The run's config.json, for a folder without one (or to replace it).")
    parser.add_argument("--labels", help="JSON file mapping class id -> name (default: COCO or numbered Objects365).")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace the files of an existing folder.")
    parser.add_argument("--cache_dir", help=f"Where gs:// folders are downloaded (default: {default_cache_dir()}).")
    parser.add_argument("--base_url", default=DEFAULT_BASE_URL, help="HTTP(S) server of the bucket's objects.")
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", help="Publish the converted folder as this Hub repository."
    )
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if args.push_to_hub:
            from huggingface_hub import constants

            if constants.is_offline_mode():
                raise ConversionError(
                    f"--push_to_hub {args.push_to_hub} needs the network, but HF_HUB_OFFLINE is set."
                )
        start = time.perf_counter()
        convert(
            args.checkpoint_dir,
            args.output_dir,
            checkpoint=args.checkpoint,
            labels_file=args.labels,
            config_file=args.config,
            overwrite_output_dir=args.overwrite_output_dir,
            cache_dir=args.cache_dir,
            base_url=args.base_url,
        )
        logger.info("Converted %s to %s in %.1f s.", args.checkpoint_dir, args.output_dir, time.perf_counter() - start)
        if args.push_to_hub:
            logger.info("Published %s.", push_to_hub(args.output_dir, args.push_to_hub))
    except (ValueError, OSError, DownloadError, httpx.HTTPError) as error:
        if args.debug:
            raise
        parser.exit(1, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
