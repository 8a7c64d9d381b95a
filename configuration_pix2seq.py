"""
The Pix2Seq configuration: the architecture, the token vocabulary layout, the training sequence settings and the
canvas side. It validates its values as they are set (no model is built: the backbone's stride is checked when the
model is), and documents every argument.
"""

import copy

from transformers import PretrainedConfig


CLASS_LABEL_CORRUPTIONS = ("none", "rand_cls", "real_n_fake_cls", "rand_n_fake_cls", "real_n_rand_n_fake_cls")
# The tasks of a multi-task (Pix2Seq v2) model, named as transformers' pipelines name them where one exists.
TASKS = ("object_detection", "instance_segmentation", "keypoint_detection", "captioning")
DETECTION_TASK = "object_detection"
# The pipelines (`pipeline_pix2seq.py`) that a folder names: detection's, and those of a multi-task model's tasks.
TASK_PIPELINES = {
    "object_detection": ("object-detection", "Pix2SeqObjectDetectionPipeline"),
    "instance_segmentation": ("image-segmentation", "Pix2SeqImageSegmentationPipeline"),
    "keypoint_detection": ("keypoint-detection", "Pix2SeqKeypointDetectionPipeline"),
}
# Each task's decoding settings in `tasks` that `generate()` reads, with the type they must have; a task's other
# settings (e.g. `max_instances`, `crop_pad_scale`) are read by the image processor and pipelines.
TASK_DECODING_SETTINGS = {
    "max_new_tokens": int,
    "do_sample": bool,
    "top_k": int,
    "top_p": float,
    "temperature": float,
    "eos_token_id": int,
    "num_samples": int,
}


class Pix2SeqConfig(PretrainedConfig):
    r"""
    Configuration of a Pix2Seq detector: an image encoder (a timm backbone, a projection with 2D sin-cos positions and
    a pre-LN transformer encoder) and an autoregressive pre-LN decoder that writes every object as 4 quantized
    coordinate tokens (`y_min, x_min, y_max, x_max`) followed by 1 class token.

    The vocabulary defaults to the official layout: PAD/EOS 0, detection task token 10, FAKE class 30, class token =
    class index + 100, coordinate tokens from 1000, vocabulary of 3000.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet50"`):
            Name of the timm model used as the image backbone (created with `features_only=True`). `None` with
            `patch_size`, whose patch stem then takes the backbone's place.
        use_pretrained_backbone (`bool`, *optional*, defaults to `False`):
            Load the backbone's pretrained timm weights when the model is built. Once loaded, the weights belong to the
            model's own state: a saved config holds `False` (and no local weights `file`, see `to_json_file`), so
            that loading a saved folder and `from_config` never download or look for the weights.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, e.g. `{"out_indices": (3,)}` to cut a ResNet at stride 16,
            or `{"pretrained_cfg_overlay": {"file": "weights.safetensors"}}` to load pretrained weights from a file.
        backbone_tf_padding (`bool`, *optional*, defaults to `False`):
            Pad the ResNet backbone as the official TensorFlow model does: the stem's strided max-pool pads like TF's
            "SAME" (0 before and 1 after an even size, where timm pads 1 on both sides; its convolutions already pad
            alike in both), and `image_size` need not be a multiple of the stride, the feature grid being
            `ceil(image_size / stride)` as in TF. Needed by the converted official ResNet checkpoints.
        patch_size (`int`, *optional*):
            When set, the encoder is the official ViT one: a `patch_size` x `patch_size` convolution with bias and
            stride `patch_size` embeds the image (a grid of `floor(image_size / patch_size)` per side, any
            `image_size`), LayerNorm and 2D sin-cos positions follow, then the encoder layers; `backbone` must be
            `None`.
        image_size (`int`, *optional*, defaults to 640):
            Side of the square canvas images are resized and padded to. Must be divisible by the backbone's stride,
            unless `backbone_tf_padding` or `patch_size` is set (checked when the model is built).
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels.
        d_model (`int`, *optional*, defaults to 256):
            Width of the decoder layers, and of the encoder layers unless `encoder_hidden_size` is set.
        encoder_hidden_size (`int`, *optional*):
            Width of the encoder layers when it differs from `d_model` (the official ViT encoders are wider than their
            decoder). The encoder's output is projected to `d_model`, followed by a residual MLP of hidden width
            `d_model * encoder_ffn_dim / encoder_hidden_size`, the official rule. Defaults to `d_model`.
        encoder_layers (`int`, *optional*, defaults to 6):
            Number of transformer encoder layers after the backbone (0 is allowed, e.g. for ViT backbones).
        encoder_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads in each encoder layer.
        encoder_ffn_dim (`int`, *optional*, defaults to 1024):
            Hidden size of the encoder MLPs.
        decoder_layers (`int`, *optional*, defaults to 6):
            Number of decoder layers.
        decoder_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads in each decoder layer.
        decoder_ffn_dim (`int`, *optional*, defaults to 1024):
            Hidden size of the decoder MLPs.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside MLPs and on the projected backbone features.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic depth rate on every residual branch of the encoder and decoder.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every LayerNorm.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the (truncated) normal initialisation of linear and embedding weights.
        coordinate_embedding_init (`str`, *optional*, defaults to `"normal"`):
            Initialisation of the coordinate token embeddings (tied to the output layer): `"normal"` (official), or
            `"sincos"`, sin-cos features of each bin's position on the canvas at the same scale, so that neighbouring
            bins start out alike. A new model trained from scratch learns where boxes are much sooner with
            `"sincos"`; it changes nothing once weights are loaded.
        max_instances (`int`, *optional*, defaults to 100):
            Objects per image: training sequences are filled to this many objects and generation writes
            `5 * max_instances` tokens.
        num_bins (`int`, *optional*, defaults to 1000):
            Quantization bins per coordinate.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Size of the decoder's learned position table; must cover `5 * max_instances + 1` tokens.
        vocab_size (`int`, *optional*, defaults to 3000):
            Size of the token vocabulary.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding token, which is also the end-of-sequence token.
        task_token_id (`int`, *optional*, defaults to 10):
            The detection prompt: the first decoder input (there is no BOS token).
        fake_class_token_id (`int`, *optional*, defaults to 30):
            Class token of noise ("fake") objects.
        class_token_offset (`int`, *optional*, defaults to 100):
            Class token of class index `i` is `class_token_offset + i`.
        coord_token_offset (`int`, *optional*, defaults to 1000):
            Coordinate bin `b` is token `coord_token_offset + b`.
        random_object_order (`bool`, *optional*, defaults to `True`):
            Shuffle the real objects of every training sequence.
        noise_objects (`bool`, *optional*, defaults to `True`):
            Fill training sequences to `max_instances` objects with shifted, random and duplicate boxes labelled FAKE.
        class_label_corruption (`str`, *optional*, defaults to `"rand_n_fake_cls"`):
            How class tokens of the decoder *input* are corrupted, one of `"none"`, `"rand_cls"`,
            `"real_n_fake_cls"`, `"rand_n_fake_cls"` (official) or `"real_n_rand_n_fake_cls"`.
        noise_class_weight (`float`, *optional*, defaults to 1.0):
            Loss weight of the FAKE class target of noise objects (their coordinates always weigh 0).
        eos_token_weight (`float`, *optional*, defaults to 0.1):
            Loss weight of PAD/EOS targets.
        eos_mode (`bool`, *optional*, defaults to `False`):
            Train with an EOS after the real objects (noise objects follow, teaching FAKE then EOS) and stop generating
            once every sequence has ended. `False` is the official fixed-length mode.
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the token cross-entropy.
        tasks (`dict`, *optional*):
            `None` for a detection-only model. For a multi-task model (Pix2Seq v2), a dict from task name
            (`"object_detection"`, `"instance_segmentation"`, `"keypoint_detection"`, `"captioning"`) to that task's
            settings: `prompt_token_id` (required, the task's first decoder token, below `class_token_offset`; the
            detection one must equal `task_token_id`) and its default decoding in `generate(task=...)`:
            `max_new_tokens`, `do_sample`, `top_k`, `top_p`, `temperature`, `eos_token_id` (`None`: a fixed number
            of tokens) and `num_samples` (samples per prompt). Other keys (e.g. `max_instances`, `crop_pad_scale`,
            `person_class_token_id`) are kept for the image processor and pipelines. The converted official
            checkpoints hold the official evaluation's settings, captioning greedy.
        text_token_offset (`int`, *optional*):
            First text token (a SentencePiece id `i` is token `text_token_offset + i`), after the coordinate tokens;
            `None` for a model without text. The official multi-task vocabulary puts text at 3000.
        polygon_separator_token_id (`int`, *optional*):
            Token between the polygons of one object in an instance-segmentation sequence (official: 40).
        invisible_keypoint_token_id (`int`, *optional*):
            Token of a keypoint coordinate that is not visible (official: 41).
    """

    model_type = "pix2seq"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "decoder_layers",
        "num_attention_heads": "decoder_attention_heads",
        "decoder_start_token_id": "task_token_id",
    }
    keys_to_ignore_at_inference = ["cache", "past_key_values", "encoder_last_hidden_state"]

    def __init__(
        self,
        backbone="resnet50",
        use_pretrained_backbone=False,
        backbone_kwargs=None,
        backbone_tf_padding=False,
        patch_size=None,
        image_size=640,
        num_channels=3,
        d_model=256,
        encoder_hidden_size=None,
        encoder_layers=6,
        encoder_attention_heads=8,
        encoder_ffn_dim=1024,
        decoder_layers=6,
        decoder_attention_heads=8,
        decoder_ffn_dim=1024,
        dropout=0.1,
        attention_dropout=0.0,
        drop_path_rate=0.1,
        layer_norm_eps=1e-6,
        init_std=0.02,
        coordinate_embedding_init="normal",
        max_instances=100,
        num_bins=1000,
        max_position_embeddings=512,
        vocab_size=3000,
        pad_token_id=0,
        task_token_id=10,
        fake_class_token_id=30,
        class_token_offset=100,
        coord_token_offset=1000,
        random_object_order=True,
        noise_objects=True,
        class_label_corruption="rand_n_fake_cls",
        noise_class_weight=1.0,
        eos_token_weight=0.1,
        eos_mode=False,
        label_smoothing=0.0,
        tasks=None,
        text_token_offset=None,
        polygon_separator_token_id=None,
        invisible_keypoint_token_id=None,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.backbone = backbone
        self.use_pretrained_backbone = use_pretrained_backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.backbone_tf_padding = backbone_tf_padding
        self.patch_size = patch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.d_model = d_model
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_layers = encoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.init_std = init_std
        self.coordinate_embedding_init = coordinate_embedding_init
        self.max_instances = max_instances
        self.num_bins = num_bins
        self.max_position_embeddings = max_position_embeddings
        self.vocab_size = vocab_size
        self.task_token_id = task_token_id
        self.fake_class_token_id = fake_class_token_id
        self.class_token_offset = class_token_offset
        self.coord_token_offset = coord_token_offset
        self.random_object_order = random_object_order
        self.noise_objects = noise_objects
        self.class_label_corruption = class_label_corruption
        self.noise_class_weight = noise_class_weight
        self.eos_token_weight = eos_token_weight
        self.eos_mode = eos_mode
        self.label_smoothing = label_smoothing
        self.tasks = copy.deepcopy(tasks) if tasks is not None else None
        self.text_token_offset = text_token_offset
        self.polygon_separator_token_id = polygon_separator_token_id
        self.invisible_keypoint_token_id = invisible_keypoint_token_id
        self.tie_word_embeddings = tie_word_embeddings
        # A model class registers one Auto class; the others are seeded here so that every saved folder maps them.
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_pix2seq.Pix2SeqConfig",
                "AutoModel": "modeling_pix2seq.Pix2SeqModel",
                "AutoModelForObjectDetection": "modeling_pix2seq.Pix2SeqForObjectDetection",
            },
        )
        # `pipeline("object-detection", model=folder, trust_remote_code=True)` builds Pix2Seq's own pipeline class;
        # so do "image-segmentation" and "keypoint-detection" for a multi-task model with those tasks.
        tasks_served = {DETECTION_TASK, *(self.tasks or ())}
        kwargs.setdefault(
            "custom_pipelines",
            {
                name: {"impl": f"pipeline_pix2seq.{cls}", "pt": ["AutoModelForObjectDetection"], "type": "image"}
                for task, (name, cls) in TASK_PIPELINES.items()
                if task in tasks_served
            },
        )
        kwargs.setdefault("is_encoder_decoder", True)
        kwargs.setdefault("eos_token_id", pad_token_id)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if self.label2id is None and self.id2label is not None:
            self.label2id = {name: index for index, name in self.id2label.items()}
        self._validate_pix2seq()

    def to_json_file(self, json_file_path, use_diff=True):
        """
        Writes the config (as `save_pretrained` does) without the settings that only matter while a model is first
        built: `use_pretrained_backbone` is written `False` and a weights `file` in
        `backbone_kwargs["pretrained_cfg_overlay"]`, a path on this machine, is left out.
        """
        saved = copy.deepcopy(self)
        saved.use_pretrained_backbone = False
        overlay = saved.backbone_kwargs.pop("pretrained_cfg_overlay", {})
        overlay = {key: value for key, value in overlay.items() if key != "file"}
        if overlay:
            saved.backbone_kwargs["pretrained_cfg_overlay"] = overlay
        super(Pix2SeqConfig, saved).to_json_file(json_file_path, use_diff=use_diff)

    @property
    def sequence_length(self):
        """Decoder tokens per training example (the task token plus one token per generated step)."""
        return 5 * self.max_instances + int(self.eos_mode)

    def validate(self):
        """Runs on `save_pretrained`, so that settings changed after construction are checked too."""
        super().validate()
        self._validate_pix2seq()

    def _validate_pix2seq(self):
        if not (isinstance(self.image_size, int) and self.image_size > 0):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}.")
        if self.patch_size is not None:
            self._validate_patch_stem()
        else:
            self._validate_backbone()
        if self.class_label_corruption not in CLASS_LABEL_CORRUPTIONS:
            raise ValueError(
                f"class_label_corruption={self.class_label_corruption!r} is not one of {CLASS_LABEL_CORRUPTIONS}."
            )
        if self.coordinate_embedding_init not in ("normal", "sincos"):
            raise ValueError(
                f"coordinate_embedding_init={self.coordinate_embedding_init!r} is not one of ('normal', 'sincos')."
            )
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {self.num_bins}.")
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be at least 1, got {self.max_instances}.")
        if min(self.id2label) < 0:
            raise ValueError(f"Class indices (keys of id2label) must be >= 0, got {min(self.id2label)}.")
        self._validate_tasks()
        specials = {
            "pad_token_id": self.pad_token_id,
            "task_token_id": self.task_token_id,
            "fake_class_token_id": self.fake_class_token_id,
        }
        for name in ("polygon_separator_token_id", "invisible_keypoint_token_id"):
            if getattr(self, name) is not None:
                specials[name] = getattr(self, name)
        for name, settings in (self.tasks or {}).items():
            if name != DETECTION_TASK and isinstance(settings, dict):
                specials[f"tasks[{name!r}].prompt_token_id"] = settings.get("prompt_token_id")
        for name, token in specials.items():
            if not isinstance(token, int) or isinstance(token, bool):
                raise ValueError(f"{name} must be an integer token id, got {token!r}.")
        for name, token in specials.items():
            if not 0 <= token < self.class_token_offset:
                raise ValueError(
                    f"{name}={token} must lie below class_token_offset={self.class_token_offset}, where special "
                    "tokens live."
                )
        if len(set(specials.values())) != len(specials):
            raise ValueError(f"Special tokens must differ, got {specials}.")
        last_class_token = self.class_token_offset + max(self.id2label)
        if last_class_token >= self.coord_token_offset:
            raise ValueError(
                f"Class index {max(self.id2label)} maps to token {last_class_token}, which overlaps the coordinate "
                f"tokens starting at coord_token_offset={self.coord_token_offset}: at most "
                f"{self.coord_token_offset - self.class_token_offset} class slots fit."
            )
        if self.coord_token_offset + self.num_bins > self.vocab_size:
            raise ValueError(
                f"num_bins={self.num_bins} coordinate tokens from coord_token_offset={self.coord_token_offset} need "
                f"vocab_size >= {self.coord_token_offset + self.num_bins}, got {self.vocab_size}."
            )
        if self.text_token_offset is not None and not (
            isinstance(self.text_token_offset, int)
            and self.coord_token_offset + self.num_bins <= self.text_token_offset < self.vocab_size
        ):
            raise ValueError(
                f"text_token_offset={self.text_token_offset!r} must be an integer from the end of the coordinate "
                f"tokens ({self.coord_token_offset + self.num_bins}) to below vocab_size={self.vocab_size}."
            )
        if self.sequence_length + 1 > self.max_position_embeddings:
            raise ValueError(
                f"max_instances={self.max_instances} needs {self.sequence_length + 1} decoder positions, but "
                f"max_position_embeddings={self.max_position_embeddings}."
            )
        if self.d_model % self.decoder_attention_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by decoder_attention_heads={self.decoder_attention_heads}."
            )
        encoder_width = self.encoder_hidden_size or self.d_model
        if encoder_width % self.encoder_attention_heads:
            raise ValueError(
                f"The encoder width {encoder_width} (encoder_hidden_size, else d_model) must be divisible by "
                f"encoder_attention_heads={self.encoder_attention_heads}."
            )

    def _validate_tasks(self):
        if self.tasks is None:
            return
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ValueError(f"tasks must be None or a non-empty dict from task name to settings, got {self.tasks!r}.")
        for name, settings in self.tasks.items():
            if name not in TASKS:
                raise ValueError(f"tasks has an unknown task {name!r}; the tasks are {TASKS}.")
            if not isinstance(settings, dict) or "prompt_token_id" not in settings:
                raise ValueError(
                    f"tasks[{name!r}] must be a dict of settings with a prompt_token_id, got {settings!r}."
                )
            for setting, kind in TASK_DECODING_SETTINGS.items():
                value = settings.get(setting)
                # bool is an int to Python: a flag is refused where a number is meant, and the other way round.
                numeric = (int, float) if kind is float else kind
                if value is not None and (not isinstance(value, numeric) or isinstance(value, bool) != (kind is bool)):
                    raise ValueError(f"tasks[{name!r}][{setting!r}]={value!r} must be of type {kind.__name__}.")
            checks = {
                "max_new_tokens": lambda v: 1 <= v <= self.max_position_embeddings,
                "top_k": lambda v: v >= 0,
                "top_p": lambda v: 0 < v <= 1,
                "temperature": lambda v: v > 0,
                "eos_token_id": lambda v: 0 <= v < self.vocab_size,
                "num_samples": lambda v: v >= 1,
            }
            for setting, check in checks.items():
                if settings.get(setting) is not None and not check(settings[setting]):
                    raise ValueError(f"tasks[{name!r}][{setting!r}]={settings[setting]!r} is out of range.")
        detection = self.tasks.get(DETECTION_TASK)
        if detection is not None and detection["prompt_token_id"] != self.task_token_id:
            raise ValueError(
                f"tasks['{DETECTION_TASK}'] prompt_token_id={detection['prompt_token_id']} must equal "
                f"task_token_id={self.task_token_id}, the detection prompt."
            )

    def task_settings(self, task=None):
        """
        The settings of `task` (default `"object_detection"`) as a new dict, `prompt_token_id` included. A
        detection-only model (`tasks=None`) has only `"object_detection"`, whose prompt is `task_token_id` and whose
        decoding is the generation config's. `ValueError` naming the model's tasks for any other name.
        """
        task = DETECTION_TASK if task is None else task
        tasks = self.tasks if self.tasks is not None else {DETECTION_TASK: {"prompt_token_id": self.task_token_id}}
        if task not in tasks:
            raise ValueError(f"task={task!r} is not a task of this model; its tasks are {sorted(tasks)}.")
        return copy.deepcopy(tasks[task])

    def _validate_backbone(self):
        # A name lookup in timm's registry; the stride that `image_size` must be a multiple of is only known once
        # the backbone is built, and the model checks it then.
        import timm

        if not timm.is_model(self.backbone):
            raise ValueError(
                f"Unknown timm backbone {self.backbone!r}; close names: {timm.list_models(f'*{self.backbone}*')[:5]}, "
                "all names: `timm.list_models()`."
            )

    def _validate_patch_stem(self):
        if self.backbone is not None:
            raise ValueError(
                f"patch_size={self.patch_size} replaces the timm backbone with the ViT patch stem: set backbone=None "
                f"(got {self.backbone!r})."
            )
        if self.use_pretrained_backbone or self.backbone_tf_padding:
            raise ValueError(
                "use_pretrained_backbone and backbone_tf_padding apply to a timm backbone, not to patch_size."
            )
        if not (isinstance(self.patch_size, int) and 0 < self.patch_size <= self.image_size):
            raise ValueError(f"patch_size must be a positive integer up to image_size, got {self.patch_size!r}.")


Pix2SeqConfig.register_for_auto_class()

__all__ = ["Pix2SeqConfig"]
