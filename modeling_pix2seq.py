"""
The Pix2Seq network: an image encoder (a timm backbone or the official ViT patch stem, a projection with 2D sin-cos
positions and a pre-LN transformer encoder) and an autoregressive pre-LN decoder with its language-model head.

This module owns the network and its loss: it takes `pixel_values` and token tensors (decoder inputs, target tokens,
token weights) and returns logits, the weighted cross-entropy, or generated tokens with their logits. It never sees
a box: `Pix2SeqImageProcessor` turns annotations into token targets and generated tokens into detections, and the
decoding rules live in `generation_pix2seq.py`.
"""

import contextlib
import copy
import functools
import math
from dataclasses import dataclass

import timm
import torch
from timm.layers import DropPath
from timm.layers.pool2d_same import MaxPool2dSame
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation import LogitsProcessorList
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
from transformers.utils import ModelOutput


# Relative imports let `save_pretrained` copy these files into a model folder for `trust_remote_code`; the fallback
# lets scripts and tests import the modules from the repository root.
# The pipeline module is imported only so that `save_pretrained` copies it beside the model (`custom_pipelines`).
try:
    from .configuration_pix2seq import DETECTION_TASK, Pix2SeqConfig
    from .generation_pix2seq import cache_field, can_generate_static, decoding_processors, generate_static
    from .pipeline_pix2seq import Pix2SeqObjectDetectionPipeline  # noqa: F401
except ImportError:
    from configuration_pix2seq import DETECTION_TASK, Pix2SeqConfig
    from generation_pix2seq import cache_field, can_generate_static, decoding_processors, generate_static
    from pipeline_pix2seq import Pix2SeqObjectDetectionPipeline  # noqa: F401


# Sampled detections (`Pix2SeqForObjectDetection.detect`) draw from this seed, so that they are reproducible.
DETECTION_SEED = 0
# The settings of `config.tasks[task]` that `generate(task=...)` takes as the generation config's for a task other than
# detection (whose decoding is the generation config's own); a setting a task leaves out is unset.
TASK_GENERATION_SETTINGS = ("do_sample", "top_k", "top_p", "temperature", "eos_token_id")


@dataclass
class Pix2SeqSeq2SeqLMOutput(Seq2SeqLMOutput):
    """
    Teacher-forced output of `Pix2SeqForObjectDetection`: `loss` is the weighted cross-entropy
    `sum(w * ce) / sum(w)` and `logits` has shape `(batch_size, sequence_length, vocab_size)`. The cache field keeps
    the running transformers version's name. `encoder_hidden_states` are the embedded image and each encoder layer's
    output, `(batch_size, num_patches, encoder_hidden_size)`; `decoder_hidden_states` the embedded tokens and each
    decoder layer's output, `(batch_size, sequence_length, d_model)`.
    """


@dataclass
class Pix2SeqObjectDetectionOutput(ModelOutput):
    """
    What `Pix2SeqForObjectDetection` generates from `pixel_values` alone: tokens and the logits that chose them.
    `Pix2SeqImageProcessor.post_process_object_detection` decodes them into boxes, scores and labels.

    Args:
        sequences (`torch.LongTensor` of shape `(rows, num_tokens)`): generated tokens, prompt excluded; one row per
            image, or per (image, instance, sample) with prompts of rank 3 or `num_samples`.
        logits (`torch.FloatTensor` of shape `(rows, num_tokens, vocab_size)`): the raw logits of each step.
    """

    sequences: torch.LongTensor | None = None
    logits: torch.FloatTensor | None = None


def sincos_2d_position_embedding(height, width, dim, device, dtype):
    """Fixed 2D sin-cos positions, `(height * width, dim)`: half the channels encode y, half x, over [0, 2 pi]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    y = torch.arange(height, device=device, dtype=torch.float32) / max(height - 1, 1) * 2 * math.pi
    x = torch.arange(width, device=device, dtype=torch.float32) / max(width - 1, 1) * 2 * math.pi
    y_angles = (y[:, None] * omega[None]).unsqueeze(1).expand(height, width, quarter)
    x_angles = (x[:, None] * omega[None]).unsqueeze(0).expand(height, width, quarter)
    embedding = torch.cat([y_angles.sin(), y_angles.cos(), x_angles.sin(), x_angles.cos()], dim=-1)
    return nn.functional.pad(embedding.reshape(height * width, -1), (0, dim - 4 * quarter)).to(dtype)


def sincos_coordinate_embedding(num_bins, dim, std):
    """
    `(num_bins, dim)` sin-cos features of each bin's place on the canvas, at frequencies from 1 to `num_bins / 4`
    cycles per canvas, scaled to a standard deviation of `std`: neighbouring bins get similar embeddings.
    """
    half = dim // 2
    cycles = (num_bins / 4) ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    angles = torch.linspace(0, 1, num_bins, dtype=torch.float64)[:, None] * cycles[None] * 2 * math.pi
    embedding = torch.cat([angles.sin(), angles.cos()], dim=-1) * std * math.sqrt(2)
    return nn.functional.pad(embedding, (0, dim - 2 * half)).float()


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class Pix2SeqAttention(nn.Module):
    def __init__(self, config, num_heads, is_causal=False, layer_idx=None, hidden_size=None):
        super().__init__()
        self.config = config
        hidden_size = hidden_size or config.d_model
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # Read by the SDPA integration: without it, every attention without a mask would be causal.
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        # `(product, weight, bias)`: how to project and the query, key and value projections stacked, set by
        # `Pix2SeqDecoder.fused_qkv_projections` for the length of a decoding call.
        self.fused_qkv = None

    def forward(self, hidden_states, key_value_states=None, attention_mask=None, cache=None):
        batch_size, length, _ = hidden_states.shape  # (B, T, D)
        is_cross = key_value_states is not None
        fused = self.fused_qkv is not None and not is_cross
        if fused:
            product, weight, bias = self.fused_qkv
            query, key, value = (
                product(hidden_states, weight, bias)
                .view(batch_size, length, 3, -1, self.head_dim)
                .permute(2, 0, 3, 1, 4)
            )  # 3 x (B, H, T, d)
        else:
            query = self.q_proj(hidden_states).view(batch_size, length, -1, self.head_dim).transpose(1, 2)
        layer_cache = None
        if cache is not None:
            layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if is_cross and cache is not None and cache.is_updated.get(self.layer_idx):
            # The image does not change during generation: its keys/values are projected once per image.
            key, value = layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
        else:
            if not fused:
                source = key_value_states if is_cross else hidden_states
                key = self.k_proj(source).view(batch_size, source.shape[1], -1, self.head_dim).transpose(1, 2)
                value = self.v_proj(source).view(batch_size, source.shape[1], -1, self.head_dim).transpose(1, 2)
            if layer_cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx)
                if is_cross:
                    cache.is_updated[self.layer_idx] = True
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.out_proj(output.reshape(batch_size, length, -1)), weights


# Up to this many rows (tokens of a decoding step across the batch), `weight_first_linear` computes weight first.
WEIGHT_FIRST_MAX_ROWS = 16


def weight_first_linear(inputs, weight, bias=None):
    """
    `nn.functional.linear(inputs, weight, bias)`, computed weight first, as `(weight @ inputs^T)^T`, for up to
    `WEIGHT_FIRST_MAX_ROWS` rows: the same sums, rounded differently (outputs within about one unit in the last
    place). For the few rows of a decoding step, MKL computes this about 2x faster on a CPU than the
    `inputs @ weight^T` of `nn.functional.linear` (`benchmarks/bench_decode_kernels.py`); with more rows the gain
    measured smaller and varied from run to run, so more rows keep `nn.functional.linear`. A single row is computed
    as the first of two equal rows (twice as fast). Returns a contiguous tensor (SDPA's fast CPU kernel needs one).
    """
    rows = inputs.reshape(-1, inputs.shape[-1])
    count = rows.shape[0]
    if count > WEIGHT_FIRST_MAX_ROWS:
        return nn.functional.linear(inputs, weight, bias)
    if count == 1:
        # MKL computes one row as a matrix-vector product, at half the speed of the matrix product of two rows.
        rows = rows.repeat(2, 1)
    outputs = weight @ rows.t() if bias is None else torch.addmm(bias.unsqueeze(1), weight, rows.t())  # (D_out, N)
    return outputs[:, :count].t().contiguous().view(*inputs.shape[:-1], weight.shape[0])


class Pix2SeqMLP(nn.Module):
    def __init__(self, d_model, ffn_dim, dropout):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states):
        return self.fc2(self.dropout(nn.functional.gelu(self.fc1(hidden_states))))


class Pix2SeqEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, drop_path, hidden_size):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Pix2SeqAttention(config, config.encoder_attention_heads, hidden_size=hidden_size)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = Pix2SeqMLP(hidden_size, config.encoder_ffn_dim, config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states):
        attention, weights = self.self_attn(self.self_attn_layer_norm(hidden_states))
        hidden_states = hidden_states + self.drop_path(attention)
        return hidden_states + self.drop_path(self.mlp(self.final_layer_norm(hidden_states))), weights


class Pix2SeqDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx, drop_path):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.self_attn = Pix2SeqAttention(config, config.decoder_attention_heads, is_causal=True, layer_idx=layer_idx)
        self.cross_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.cross_attn = Pix2SeqAttention(config, config.decoder_attention_heads, layer_idx=layer_idx)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = Pix2SeqMLP(config.d_model, config.decoder_ffn_dim, config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states, encoder_hidden_states, attention_mask=None, cache=None):
        """`(B, T, D)` -> `(B, T, D)`, with the self- and cross-attention weights (`None` unless eager)."""
        attention, self_weights = self.self_attn(
            self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, cache=cache
        )
        hidden_states = hidden_states + self.drop_path(attention)
        attention, cross_weights = self.cross_attn(
            self.cross_attn_layer_norm(hidden_states), encoder_hidden_states, cache=cache
        )
        hidden_states = hidden_states + self.drop_path(attention)
        return (
            hidden_states + self.drop_path(self.mlp(self.final_layer_norm(hidden_states))),
            self_weights,
            cross_weights,
        )


class Pix2SeqPreTrainedModel(PreTrainedModel):
    config_class = Pix2SeqConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Pix2SeqEncoderLayer", "Pix2SeqDecoderLayer", "Pix2SeqBackbone"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @classmethod
    def from_pretrained(cls, *args, use_safetensors=None, **kwargs):
        # Weights load only from safetensors: transformers otherwise falls back to unpickling `pytorch_model.bin`.
        if use_safetensors is False:
            raise ValueError("Pix2Seq loads weights only from safetensors; `use_safetensors=False` is not supported.")
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, use_safetensors=True, output_loading_info=True, **kwargs)
        check_no_missing_weights(model, loading_info, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        if model.can_generate():
            check_generation_length(model.generation_config, model.config)
        return (model, loading_info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std)
            loaded = getattr(module.weight, "_is_hf_initialized", False)
            if (
                self.config.coordinate_embedding_init == "sincos"
                and module is self.get_input_embeddings()
                and not loaded
            ):
                start = self.config.coord_token_offset
                rows = sincos_coordinate_embedding(self.config.num_bins, self.config.d_model, std)
                init.copy_(module.weight[start : start + self.config.num_bins], rows)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def check_no_missing_weights(model, loading_info, source):
    """
    Raises `OSError` naming the weights that a folder saved by this very class lacks (tied weights, stored once,
    excepted): transformers would leave them randomly initialised with only a load report to say so. A head loaded
    over a folder of another class (e.g. `Pix2SeqModel`) is new by design and keeps transformers' behaviour.
    """
    missing = sorted(set(loading_info["missing_keys"]) - set(getattr(model, "all_tied_weights_keys", None) or {}))
    if missing and type(model).__name__ in (model.config.architectures or [type(model).__name__]):
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise OSError(
            f"{source} is missing {len(missing)} weight(s) of {type(model).__name__}: {shown}. The folder is "
            "incomplete or its weights file was damaged; save or convert the model again."
        )


class Pix2SeqBackbone(Pix2SeqPreTrainedModel):
    """A timm model with `features_only=True`; its last feature map feeds the encoder."""

    def __init__(self, config):
        super().__init__(config)
        if not timm.is_model(config.backbone):
            raise ValueError(f"Unknown timm backbone {config.backbone!r}; see `timm.list_models()`.")
        self.timm_model = timm.create_model(
            config.backbone,
            pretrained=False,
            features_only=True,
            in_chans=config.num_channels,
            **config.backbone_kwargs,
        )
        self.num_features = self.timm_model.feature_info.channels()[-1]
        self.stride = self.timm_model.feature_info.reduction()[-1]
        if config.backbone_tf_padding:
            self._use_tf_same_max_pool()
        elif config.image_size % self.stride:
            raise ValueError(
                f"image_size={config.image_size} is not divisible by the stride {self.stride} of backbone "
                f"{config.backbone!r}: use a multiple of {self.stride}, e.g. "
                f"{config.image_size // self.stride * self.stride or self.stride}, or set backbone_tf_padding=True "
                "for TensorFlow's grid of ceil(image_size / stride)."
            )
        self.post_init()

    def _use_tf_same_max_pool(self):
        # Max-pooling has no weights, so the swap leaves the state dict (and timm's pretrained weights) as they are.
        pools = [name for name, module in self.timm_model.named_children() if type(module) is nn.MaxPool2d]
        if not pools:
            raise ValueError(
                f"backbone_tf_padding=True pads a stem max-pool as TensorFlow does, but backbone "
                f"{self.config.backbone!r} has no max-pool among its top-level modules."
            )
        for name in pools:
            pool = getattr(self.timm_model, name)
            setattr(self.timm_model, name, MaxPool2dSame(pool.kernel_size, pool.stride, dilation=pool.dilation))

    @torch.no_grad()
    def _init_weights(self, module):
        # timm initialised the backbone when it built it; only buffers that a checkpoint does not store are redone.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def load_pretrained_weights(self):
        pretrained = timm.create_model(
            self.config.backbone,
            pretrained=True,
            features_only=True,
            in_chans=self.config.num_channels,
            **self.config.backbone_kwargs,
        )
        self.timm_model.load_state_dict(pretrained.state_dict())

    def forward(self, pixel_values):
        if pixel_values.device.type == "cpu":
            # oneDNN's CPU convolutions run faster over channels-last pixels (the ResNet-50 at 640 px, batch 2: 0.67 s
            # instead of 0.82): the same sums, rounded differently (features within about 3e-6).
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.timm_model(pixel_values)[-1]  # (B, C, H / stride, W / stride)


class Pix2SeqPatchEmbeddings(nn.Module):
    """
    The official ViT stem: each `patch_size` x `patch_size` patch is embedded by a strided convolution with bias. Like
    TF's "VALID" convolution, it leaves out the pixels past the last whole patch: the grid is `floor(size / patch)`.
    """

    def __init__(self, config, hidden_size):
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values):
        return self.projection(pixel_values)  # (B, D_enc, H / patch, W / patch)


def check_attention_weights_available(config, output_attentions):
    """Attention weights come only from the eager implementation; asking for them elsewhere is an error, not `None`."""
    if output_attentions and config._attn_implementation != "eager":
        raise ValueError(
            f"output_attentions=True needs attn_implementation='eager': {config._attn_implementation!r} does not "
            "compute attention weights. Load the model with attn_implementation='eager', or call "
            "`model.set_attn_implementation('eager')`."
        )


class Pix2SeqEncoder(nn.Module):
    """
    Backbone (or ViT patch stem) -> projection + 2D sin-cos -> pre-LN transformer encoder -> projection to the
    decoder's width. The position grid is the backbone's feature map of `pixel_values`. `last_hidden_state` is the
    projected encoding, `(B, H*W, d_model)`; `hidden_states` the embedded image and each encoder layer's output,
    `(B, H*W, D_enc)`; `attentions` each layer's `(B, heads, H*W, H*W)` weights (eager attention only).
    """

    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden_size = config.encoder_hidden_size or config.d_model
        if config.patch_size:
            self.backbone = Pix2SeqPatchEmbeddings(config, hidden_size)
            # The official ViT stem normalises the patch embeddings directly: no projection in between.
            self.input_proj = nn.Identity()
        else:
            self.backbone = Pix2SeqBackbone(config)
            self.input_proj = nn.Linear(self.backbone.num_features, hidden_size)
        self.input_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        drop_paths = torch.linspace(0, config.drop_path_rate, max(config.encoder_layers, 1)).tolist()
        self.layers = nn.ModuleList(
            Pix2SeqEncoderLayer(config, drop_paths[i], hidden_size) for i in range(config.encoder_layers)
        )
        self.layer_norm = (
            nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) if config.encoder_layers else nn.Identity()
        )
        # The official `dec_proj_mode="mlp"`: Linear + LN, positions again, then a residual pre-LN MLP whose width
        # keeps the encoder's MLP ratio.
        self.output_proj = nn.Linear(hidden_size, config.d_model)
        self.output_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.output_mlp_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        mlp_width = config.d_model * config.encoder_ffn_dim // hidden_size
        self.output_mlp = Pix2SeqMLP(config.d_model, mlp_width, config.dropout)

    def encode(self, pixel_values, hidden_states_out=None, attentions_out=None):
        """
        The encoder layers' output before the projection to the decoder, `(B, H*W, D_enc)`, and the grid `(H, W)`.
        The embedded image and each layer's output are appended to `hidden_states_out`, each layer's attention
        weights to `attentions_out`, when given.
        """
        features = self.backbone(pixel_values)  # (B, C, H, W)
        _, _, height, width = features.shape
        hidden_states = self.input_layer_norm(self.input_proj(self.dropout(features.flatten(2).transpose(1, 2))))
        hidden_states = hidden_states + sincos_2d_position_embedding(
            height, width, hidden_states.shape[-1], hidden_states.device, hidden_states.dtype
        )  # (B, H*W, D_enc)
        if hidden_states_out is not None:
            hidden_states_out.append(hidden_states)
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states)
            if hidden_states_out is not None:
                hidden_states_out.append(hidden_states)
            if attentions_out is not None:
                attentions_out.append(weights)
        return self.layer_norm(hidden_states), (height, width)

    def forward(self, pixel_values, output_attentions=False, output_hidden_states=False, return_dict=True, **kwargs):
        check_attention_weights_available(self.config, output_attentions)
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        hidden_states, (height, width) = self.encode(pixel_values, all_hidden_states, all_attentions)
        hidden_states = self.output_layer_norm(self.output_proj(hidden_states))
        hidden_states = hidden_states + sincos_2d_position_embedding(
            height, width, hidden_states.shape[-1], hidden_states.device, hidden_states.dtype
        )  # (B, H*W, D)
        hidden_states = hidden_states + self.output_mlp(self.output_mlp_layer_norm(hidden_states))
        return BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=None if all_hidden_states is None else tuple(all_hidden_states),
            attentions=None if all_attentions is None else tuple(all_attentions),
        )


class Pix2SeqDecoder(nn.Module):
    """
    Token embeddings + learned positions -> pre-LN decoder layers (causal self-attention, cross-attention to the
    image, MLP) -> LayerNorm. `hidden_states` are the embedded tokens and each layer's output, `(B, T, D)`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        drop_paths = torch.linspace(0, config.drop_path_rate, config.decoder_layers).tolist()
        self.layers = nn.ModuleList(
            Pix2SeqDecoderLayer(config, i, drop_paths[i]) for i in range(config.decoder_layers)
        )
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    @contextlib.contextmanager
    def fused_qkv_projections(self, product=nn.functional.linear):
        """
        Within, each self-attention projects its queries, keys and values in one matrix product instead of three
        (with `nn.functional.linear`, the same numbers): a decoding step is dominated by per-kernel costs, so fewer,
        larger kernels are faster. `product(inputs, weight, bias)` computes it. The stacked weights are built on entry
        and dropped on exit, so that they never outlive a change of the weights; the saved parameters stay the three
        projections.
        """
        attentions = [layer.self_attn for layer in self.layers if isinstance(layer.self_attn.q_proj, nn.Linear)]
        for attention in attentions:
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            attention.fused_qkv = (
                product,
                torch.cat([projection.weight for projection in projections]),  # (3 * D, D)
                torch.cat([projection.bias for projection in projections]),
            )
        try:
            yield
        finally:
            for attention in attentions:
                attention.fused_qkv = None

    def forward(
        self, input_ids, encoder_hidden_states, cache=None, output_attentions=False, output_hidden_states=False
    ):
        check_attention_weights_available(self.config, output_attentions)
        inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        past_length = cache.get_seq_length() if cache is not None else 0
        # `arange + past_length` (not `arange(past_length, ...)`) keeps the static-cache decode step compilable.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past_length
        hidden_states = inputs_embeds + self.embed_positions(positions)
        self_attention_cache = cache.self_attention_cache if cache is not None else None
        attention_mask = None
        # One new token attends to all of a dynamic cache: no mask to build (for SDPA, transformers would build none,
        # after some 50 us of Python per decoding step). The empty slots of a static cache need one.
        if input_ids.shape[1] > 1 or (self_attention_cache is not None and self_attention_cache.is_compileable):
            attention_mask = create_causal_mask(
                self.config, inputs_embeds, None, self_attention_cache, positions.unsqueeze(0)
            )
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        self_attentions = () if output_attentions else None
        cross_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, encoder_hidden_states, attention_mask, cache
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                self_attentions += (self_weights,)
                cross_attentions += (cross_weights,)
        return BaseModelOutputWithCrossAttentions(
            last_hidden_state=self.layer_norm(hidden_states),
            hidden_states=all_hidden_states,
            attentions=self_attentions,
            cross_attentions=cross_attentions,
        )


class Pix2SeqModel(Pix2SeqPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.encoder = Pix2SeqEncoder(config)
        self.decoder = Pix2SeqDecoder(config)
        self.post_init()
        # After `post_init`, which would otherwise re-initialise the pretrained weights. Under `from_pretrained` the
        # model is built on the meta device and the checkpoint brings the weights instead.
        if config.use_pretrained_backbone and not next(self.encoder.backbone.parameters()).is_meta:
            self.encoder.backbone.load_pretrained_weights()

    def get_encoder(self):
        return self.encoder

    def get_input_embeddings(self):
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.decoder.embed_tokens = value

    def forward(
        self,
        pixel_values=None,
        decoder_input_ids=None,
        encoder_outputs=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        **kwargs,
    ):
        # transformers 5.24 renamed `past_key_values` to `cache`; either name is accepted.
        cache = cache if cache is not None else past_key_values
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
            )
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        decoder_outputs = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            cache if use_cache else None,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states if output_hidden_states else None,
            encoder_attentions=encoder_outputs.attentions if output_attentions else None,
            **{cache_field(): cache if use_cache else None},
        )


def check_generation_length(generation_config, config, prompt_length=1):
    """
    Raises `ValueError`, before anything is allocated, when `generate()` would feed the decoder more tokens (the
    `prompt_length` prompt tokens, then every new token but the last) than it has positions
    (`max_position_embeddings`): it would fail deep inside at the position table, after allocating a cache for all of
    them.
    """
    if generation_config.max_new_tokens is not None:
        setting, new_tokens = "max_new_tokens", generation_config.max_new_tokens
    elif generation_config.max_length is None:
        return
    else:
        setting, new_tokens = "max_length", generation_config.max_length - prompt_length
    value = getattr(generation_config, setting)
    if not isinstance(value, int) or isinstance(value, bool) or new_tokens < 1:
        raise ValueError(f"{setting}={value!r} (the generation config or the call) must be a positive integer.")
    room = config.max_position_embeddings - prompt_length + 1
    if new_tokens > room:
        raise ValueError(
            f"{setting}={value} (the generation config or the call) asks for {new_tokens} new tokens after a prompt "
            f"of {prompt_length}, more than the decoder's max_position_embeddings={config.max_position_embeddings} "
            f"allow. Set max_new_tokens to at most {room}; for detection this model writes {config.sequence_length} "
            f"(5 tokens per object, max_instances={config.max_instances})."
        )


def tile_encoding(encoder_outputs, repeats):
    """
    The image encoding repeated for `repeats` consecutive rows per image (rows ordered image, then repeat), as the
    official model tiles one encoding over the instances of an image. Only `last_hidden_state`, what the decoder
    reads, is tiled; the per-layer `hidden_states` and `attentions` stay one per image.
    """
    return BaseModelOutput(
        last_hidden_state=encoder_outputs[0].repeat_interleave(repeats, dim=0),
        hidden_states=getattr(encoder_outputs, "hidden_states", None),
        attentions=getattr(encoder_outputs, "attentions", None),
    )


class Pix2SeqForObjectDetection(Pix2SeqPreTrainedModel, GenerationMixin):
    r"""
    Pix2Seq with its language-model head: trains on token sequences, detects by generating them.

    Training takes `pixel_values` and the token targets `Pix2SeqImageProcessor(images, annotations=...)` returns
    (`labels`, `decoder_input_ids`, `token_weights`). Detection (`forward` with `pixel_values` alone, as
    `pipeline("object-detection")` calls it) generates with the model's generation config and returns
    `Pix2SeqObjectDetectionOutput` (tokens and their logits) for `Pix2SeqImageProcessor.post_process_object_detection`.
    Decoding is greedy for a new model, so that an image always gives the same detections; when a config samples (the
    official one does, with `top_p=0.4`), every detection call samples from a fixed seed, so it too gives the same
    detections each time, without touching the global random state.
    """

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    # The loss is a weighted mean over tokens, not a sum over `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.model = Pix2SeqModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.post_init()
        # Decoding defaults; `save_pretrained` writes them to generation_config.json, the only place
        # `pipeline("object-detection")` reads generation settings from. Greedy, so that an image always gives the same
        # detections; sampling flags in a greedy config would only be reported as ignored. To sample as the official
        # model does, set `do_sample=True, top_p=0.4, top_k=0`.
        self.generation_config.update(
            max_new_tokens=config.sequence_length,
            do_sample=False,
            decoder_start_token_id=config.task_token_id,
            pad_token_id=config.pad_token_id,
            # The official fixed-length mode never stops early; EOS (= PAD) exists only in EOS mode.
            eos_token_id=config.pad_token_id if config.eos_mode else None,
        )

    def get_encoder(self):
        return self.model.encoder

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        pixel_values=None,
        decoder_input_ids=None,
        labels=None,
        token_weights=None,
        encoder_outputs=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        decoder_attention_mask=None,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
        logits_to_keep=0,
        **kwargs,
    ):
        r"""
        With `decoder_input_ids` and/or `labels` (training, scoring), a teacher-forced pass that returns
        `Pix2SeqSeq2SeqLMOutput` with the weighted cross-entropy `sum(w * ce) / sum(w)`. `labels` are the
        `(batch_size, sequence_length)` target tokens; `token_weights` default to 1 for object tokens and
        `eos_token_weight` for PAD/EOS targets, and `decoder_input_ids` to `labels` shifted right behind the task
        token. The loss depends on these tensors alone: in `eval()` mode the same batch gives the same loss.

        Sequences may also come per instance, as the official multi-task model takes them: `decoder_input_ids` (and
        `labels`, `token_weights`) of shape `(batch_size, instances, sequence_length)`, e.g. one instance-segmentation
        sequence per object. Each image is encoded once and its encoding repeated for its instances; `logits` are
        `(batch_size * instances, sequence_length, vocab_size)`, rows ordered (image, instance).

        With `pixel_values` alone (how `pipeline("object-detection")` calls a model), it runs `detect`.

        `decoder_attention_mask` is accepted for the generation API and ignored: Pix2Seq decoder inputs all start with
        the task token and are never padded on the left.
        """
        if decoder_input_ids is None and labels is None and encoder_outputs is None:
            return self.detect(pixel_values)
        if labels is not None and not torch.is_tensor(labels):
            raise TypeError(
                "`labels` are the target tokens, a (batch_size, sequence_length) tensor, as "
                "`Pix2SeqImageProcessor(images, annotations=..., return_tensors='pt')` returns them with "
                f"`decoder_input_ids` and `token_weights`; got {type(labels).__name__}."
            )
        per_instance = decoder_input_ids if decoder_input_ids is not None else labels
        if per_instance is not None and per_instance.dim() == 3:
            instances = per_instance.shape[1]
            decoder_input_ids, labels, token_weights = (
                None if tokens is None else tokens.flatten(0, 1)
                for tokens in (decoder_input_ids, labels, token_weights)
            )
            if encoder_outputs is None:
                encoder_outputs = self.model.encoder(
                    pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
                )
            encoder_outputs = tile_encoding(encoder_outputs, instances)
        if decoder_input_ids is None:
            decoder_input_ids = nn.functional.pad(labels[:, :-1], (1, 0), value=self.config.task_token_id)
        outputs = self.model(
            pixel_values=pixel_values,
            decoder_input_ids=decoder_input_ids,
            encoder_outputs=encoder_outputs,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None if labels is None else self.weighted_cross_entropy(logits, labels, token_weights)
        output = Pix2SeqSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            **{cache_field(): getattr(outputs, cache_field())},
        )
        return output if return_dict else output.to_tuple()

    def weighted_cross_entropy(self, logits, labels, token_weights=None):
        if token_weights is None:
            token_weights = torch.where(labels == self.config.pad_token_id, self.config.eos_token_weight, 1.0)
        cross_entropy = nn.functional.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            reduction="none",
            label_smoothing=self.config.label_smoothing,
        )
        token_weights = token_weights.flatten().float()
        return (cross_entropy * token_weights).sum() / (token_weights.sum() + 1e-9)

    def generate(
        self,
        pixel_values=None,
        task=None,
        decoder_input_ids=None,
        logits_processor=None,
        generation_config=None,
        use_grammar=None,
        num_samples=None,
        **kwargs,
    ):
        """
        `GenerationMixin.generate` with Pix2Seq's decoding rules (`generation_pix2seq.py`) in front: the grammar
        (coordinates, then a class; EOS only at object boundaries in EOS mode) and, when sampling with `top_p < 1`, the
        official top-p semantics in place of transformers' `TopPLogitsWarper`.

        `task` (default `"object_detection"`, the only task of a detection-only model) picks the prompt and the
        decoding of a multi-task model (`config.tasks`). Detection decodes with the generation config, as on a
        detection-only model (a converted multi-task folder saves the official detection decoding there); any other
        task takes its settings from `config.tasks[task]` (`max_new_tokens`, `do_sample`, `top_k`, `top_p`,
        `temperature`, `eos_token_id`, `num_samples`) in place of the generation config's, without the grammar.
        Arguments of the call win over both.

        The prompt is `decoder_input_ids`: `(batch_size, prompt_length)`, or `(batch_size, instances, prompt_length)`
        for several prompts per image (e.g. `[11, box, class]` per object); by default the task's prompt token alone.
        Each image is encoded once and its encoding repeated for its prompts. `num_samples` decodes every prompt that
        many times (rows ordered image, instance, sample). `sequences` start with the prompt.

        `use_grammar=None` reads `use_grammar` from the generation config (saved in `generation_config.json`; the
        grammar applies where it is unset). Converted official checkpoints save `False`: the official decoding has no
        grammar mask. The grammar describes detection sequences: other tasks never use it.

        With `cache_implementation="static"`, or on a CPU by default, and only these rules (no extra processors, beams,
        model kwargs or prompts), it dispatches to Pix2Seq's decode loop `generation_pix2seq.generate_static`: the same
        greedy output, and on a CPU the same sampled tokens for the same seed.
        """
        settings = self.config.task_settings(task)
        generation_config = copy.deepcopy(
            generation_config if generation_config is not None else self.generation_config
        )
        if task not in (None, DETECTION_TASK):
            if use_grammar:
                raise ValueError(f"use_grammar=True describes detection sequences; task={task!r} cannot use it.")
            use_grammar = False
            generation_config.update(**{name: settings.get(name) for name in TASK_GENERATION_SETTINGS})
            if settings.get("max_new_tokens") is not None:
                generation_config.update(max_new_tokens=settings["max_new_tokens"])
        num_samples = settings.get("num_samples", 1) if num_samples is None else num_samples
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be a positive integer.")
        generation_config.decoder_start_token_id = settings["prompt_token_id"]
        kwargs = generation_config.update(**kwargs)
        if use_grammar is None:
            use_grammar = getattr(generation_config, "use_grammar", True)
        if decoder_input_ids is None and num_samples == 1:
            check_generation_length(generation_config, self.config)
            if can_generate_static(generation_config, logits_processor, kwargs, self.device):
                return generate_static(self, pixel_values, generation_config, use_grammar)
            prompt_length = 1
        else:
            kwargs["decoder_input_ids"], kwargs["encoder_outputs"] = self._prompt_rows(
                pixel_values, kwargs.pop("encoder_outputs", None), decoder_input_ids, settings, num_samples
            )
            pixel_values = None
            prompt_length = kwargs["decoder_input_ids"].shape[1]
            check_generation_length(generation_config, self.config, prompt_length)
        processors = LogitsProcessorList(
            decoding_processors(self.config, generation_config, use_grammar, prompt_length=prompt_length)
        )
        processors.extend(logits_processor or [])
        return super().generate(
            pixel_values=pixel_values, logits_processor=processors, generation_config=generation_config, **kwargs
        )

    def _prompt_rows(self, pixel_values, encoder_outputs, decoder_input_ids, settings, num_samples):
        """
        The decoder prompts, one row per (image, instance, sample), and the image encoding repeated to match:
        `decoder_input_ids` `(batch_size, P)` or `(batch_size, instances, P)`, by default the task's prompt token.
        """
        if encoder_outputs is None:
            if pixel_values is None:
                raise ValueError("generate() needs pixel_values (or encoder_outputs).")
            encoder_outputs = self.model.encoder(pixel_values)
        batch_size = encoder_outputs[0].shape[0]
        device = encoder_outputs[0].device
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((batch_size, 1), settings["prompt_token_id"], device=device)
        decoder_input_ids = torch.as_tensor(decoder_input_ids, dtype=torch.long, device=device)
        if decoder_input_ids.dim() not in (2, 3) or decoder_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"decoder_input_ids of shape {tuple(decoder_input_ids.shape)} must be (batch_size, prompt_length) or "
                f"(batch_size, instances, prompt_length), with batch_size={batch_size} images."
            )
        instances = decoder_input_ids.shape[1] if decoder_input_ids.dim() == 3 else 1
        rows = decoder_input_ids.reshape(batch_size * instances, -1).repeat_interleave(num_samples, dim=0)
        return rows, tile_encoding(encoder_outputs, instances * num_samples)

    @contextlib.contextmanager
    def decoding_projections(self):
        """
        What Pix2Seq's decode loop runs within: each decoder self-attention projects queries, keys and values in one
        product (`Pix2SeqDecoder.fused_qkv_projections`), and every product of the decoder's Linear layers and of the
        output layer is computed weight first (`weight_first_linear`). A decoding step is a few dozen products of a
        few rows by the decoder's weights, so that is where its time goes; the logits differ from the plain forward's
        by rounding only. Linear layers that another tool already wraps (an instance `forward`, e.g. accelerate's
        hooks) and quantized ones are left as they are; on exit every layer computes as before.
        """
        linears = [
            module
            for module in (*self.model.decoder.layers.modules(), self.lm_head)
            if type(module) is nn.Linear and "forward" not in vars(module)
        ]
        for linear in linears:
            linear.forward = functools.partial(_weight_first_forward, linear)
        try:
            with self.model.decoder.fused_qkv_projections(weight_first_linear):
                yield
        finally:
            for linear in linears:
                vars(linear).pop("forward", None)

    def _prepare_decoder_input_ids_for_generation(self, batch_size, model_input_name, model_kwargs, *args, **kwargs):
        # A Pix2Seq prompt already starts with its task's token, which differs between rows where a row is an empty
        # slot: given prompts are used as they are, never behind a start token.
        if "decoder_input_ids" in model_kwargs:
            return model_kwargs.pop("decoder_input_ids"), model_kwargs
        return super()._prepare_decoder_input_ids_for_generation(
            batch_size, model_input_name, model_kwargs, *args, **kwargs
        )

    def _prepare_special_tokens(self, generation_config, kwargs_has_attention_mask=None, *args, **kwargs):
        # With PAD = EOS (Pix2Seq's layout) and no attention mask, transformers warns on every batch that padding in
        # the input cannot be told apart; the input here is pixels, which hold no padding tokens to tell apart.
        super()._prepare_special_tokens(generation_config, True, *args, **kwargs)

    @torch.no_grad()
    def detect(self, pixel_values, task=None, decoder_input_ids=None, **generate_kwargs):
        """
        Generates the tokens of a batch of processed images with their logits (`Pix2SeqObjectDetectionOutput`, the
        prompt removed), for `task` (default detection) and the prompts `decoder_input_ids`, as `generate` takes them.
        When it samples, it samples from the seed `DETECTION_SEED` under a forked random state (of the CPU, and of the
        CUDA device the images are on): the same images give the same tokens every call, and the caller's random
        state is left as it was.
        """
        device = pixel_values.device
        forked_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked_devices):
            torch.random.default_generator.manual_seed(DETECTION_SEED)
            if forked_devices:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(DETECTION_SEED)
            generated = self.generate(
                pixel_values=pixel_values,
                task=task,
                decoder_input_ids=decoder_input_ids,
                return_dict_in_generate=True,
                output_logits=True,
                **generate_kwargs,
            )
        logits = torch.stack(generated.logits, dim=1)
        return Pix2SeqObjectDetectionOutput(sequences=generated.sequences[:, -logits.shape[1] :], logits=logits)


def _weight_first_forward(linear, inputs):
    return weight_first_linear(inputs, linear.weight, linear.bias)


def quantize_decoder_int8(model):
    """
    Opt-in, for CPU inference: turns the decoder's Linear layers (attention projections, MLPs) and the output layer of
    a `Pix2SeqForObjectDetection` into dynamically quantized int8 ones (`torch.ao.quantization.quantize_dynamic`: int8
    weights, activations quantized on the fly), so that a decoding step reads a quarter of the weight bytes. The
    encoder is left as it is. The logits change slightly (`benchmarks/RESULTS.md` gives the measured difference and
    token agreement); the model is then for inference on a CPU only, not for training or `save_pretrained`. Modifies
    and returns `model`.
    """
    return torch.ao.quantization.quantize_dynamic(
        model, qconfig_spec={"model.decoder.layers", "lm_head"}, dtype=torch.qint8, inplace=True
    )


# `save_pretrained` copies the code and writes `auto_map` only for registered classes (Trainer checkpoints included).
Pix2SeqModel.register_for_auto_class("AutoModel")
Pix2SeqForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
# `pipeline("object-detection")` checks the model's class name against this mapping of names (a copy of it, which
# loses what `AutoModelForObjectDetection.register` adds) and logs an ERROR listing ~150 models when it is absent.
MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault("pix2seq", "Pix2SeqForObjectDetection")

__all__ = [
    "Pix2SeqPreTrainedModel",
    "Pix2SeqModel",
    "Pix2SeqForObjectDetection",
    "quantize_decoder_int8",
    "weight_first_linear",
]
