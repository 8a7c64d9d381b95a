import json

import PIL.Image
import pytest
import safetensors.torch
import timm
import torch
from testing_utils import Pix2SeqModelTester, tiny_config

from image_processing_pix2seq import Pix2SeqImageProcessor
from modeling_pix2seq import Pix2SeqConfig, Pix2SeqForObjectDetection, Pix2SeqModel, Pix2SeqObjectDetectionOutput


@pytest.fixture
def tester():
    return Pix2SeqModelTester()


def test_loss_is_the_token_weighted_mean_cross_entropy(tester):
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    batch = tester.prepare_token_inputs(config)
    outputs = model(**batch)
    assert outputs.logits.shape == (2, config.sequence_length, config.vocab_size)
    cross_entropy = torch.nn.functional.cross_entropy(
        outputs.logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    )
    weights = batch["token_weights"].flatten()
    torch.testing.assert_close(outputs.loss, (cross_entropy * weights).sum() / weights.sum())
    # Noise coordinates weigh 0: changing their targets leaves the loss unchanged.
    noise_coordinates = batch["token_weights"] == 0
    changed = dict(batch, labels=torch.where(noise_coordinates, 1000, batch["labels"]))
    torch.testing.assert_close(model(**changed).loss, outputs.loss)


def test_processor_targets_train_the_model_as_detr_labels_do(tester):
    """`model(**processor(images, annotations=...)).loss`: the processor's codec builds the token targets."""
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).train()
    processor = Pix2SeqImageProcessor.from_model_config(config)
    annotations = [
        {"image_id": 1, "annotations": [{"bbox": [10, 5, 30, 20], "category_id": 1}]},
        {
            "image_id": 2,
            "annotations": [{"bbox": [0, 0, 8, 8], "category_id": 2}, {"bbox": [4, 2, 9, 9], "category_id": 0}],
        },
    ]
    images = [PIL.Image.new("RGB", (80, 50), (200, 30, 30)), PIL.Image.new("RGB", (20, 40))]
    inputs = processor(images=images, annotations=annotations, do_sequence_augmentation=True, return_tensors="pt")
    assert set(inputs) == {"pixel_values", "labels", "decoder_input_ids", "token_weights"}
    assert inputs["labels"].shape == (2, config.sequence_length)
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0
    # Per-image box targets (the format before the processor owned the codec) are refused by name.
    with pytest.raises(TypeError, match="target tokens"):
        model(pixel_values=inputs["pixel_values"], labels=[{"boxes": torch.rand(1, 4), "class_labels": [0]}])


def test_processor_targets_follow_the_annotations_on_the_canvas(tester):
    """A COCO box in original pixels, once resized onto the canvas, is the codec's yxyx tokens of its corners."""
    config = tiny_config()
    processor = Pix2SeqImageProcessor.from_model_config(config)
    annotations = {"image_id": 1, "annotations": [{"bbox": [32, 16, 64, 48], "category_id": 2}]}
    image = PIL.Image.new("RGB", (128, 96))
    inputs = processor(image, annotations=annotations, return_tensors="pt")
    # The 128-pixel side becomes the 64-pixel canvas: x 16..48, y 8..32 of 64.
    bins = [round(v / 64 * (config.num_bins - 1)) + config.coord_token_offset for v in (8, 16, 32, 48)]
    assert inputs["labels"][0, :5].tolist() == [*bins, config.class_token_offset + 2]
    assert inputs["decoder_input_ids"][0, :6].tolist() == [config.task_token_id, *bins, config.class_token_offset + 2]
    assert (inputs["labels"][0, 5:] == config.pad_token_id).all()


def test_labels_alone_are_shifted_behind_the_task_token(tester):
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    batch = tester.prepare_token_inputs(config)
    labels = batch["labels"]
    explicit = torch.nn.functional.pad(labels[:, :-1], (1, 0), value=config.task_token_id)
    torch.testing.assert_close(
        model(pixel_values=batch["pixel_values"], labels=labels).logits,
        model(pixel_values=batch["pixel_values"], decoder_input_ids=explicit, labels=labels).logits,
    )


def test_backward_reaches_backbone_decoder_and_tied_embedding(tester):
    config = tester.get_config()
    inputs = tester.prepare_token_inputs(config)
    model = Pix2SeqForObjectDetection(config).train()
    model(**inputs).loss.backward()
    assert model.model.decoder.embed_tokens.weight is model.lm_head.weight
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.lm_head.bias.grad.abs().sum() > 0
    assert next(model.model.encoder.backbone.parameters()).grad.abs().sum() > 0


def test_new_models_decode_greedily_and_write_no_sampling_flags(tester, tmp_path):
    Pix2SeqForObjectDetection(tester.get_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["do_sample"] is False
    # Sampling flags in a greedy config are what transformers reports as ignored.
    assert not {"top_p", "top_k", "temperature"} & set(saved)


def test_sampled_detections_repeat_and_leave_the_global_random_state_alone(tester):
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    model.generation_config.update(do_sample=True, top_p=0.4, top_k=0)
    pixel_values = tester.prepare_pixel_values(config)
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    first = model.detect(pixel_values)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(2)
    second = model.detect(pixel_values)
    assert torch.equal(first.sequences, second.sequences)
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)
    # Generation itself still samples: unseeded calls differ.
    assert not torch.equal(model.generate(pixel_values, top_p=1.0), model.generate(pixel_values, top_p=1.0))


def test_saved_config_holds_no_pretrained_flag_or_local_weights_file(tmp_path):
    weights_file = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", features_only=True).state_dict(), weights_file)
    overlay = {"pretrained_cfg_overlay": {"file": str(weights_file)}}
    model = Pix2SeqForObjectDetection(tiny_config(use_pretrained_backbone=True, backbone_kwargs=overlay))
    model.save_pretrained(tmp_path / "model")
    saved = (tmp_path / "model" / "config.json").read_text()
    assert str(weights_file) not in saved and '"use_pretrained_backbone": true' not in saved
    # The built model keeps its settings; the saved folder builds and loads with the weights file gone.
    assert model.config.use_pretrained_backbone and model.config.backbone_kwargs == overlay
    weights_file.unlink()
    config = Pix2SeqConfig.from_pretrained(tmp_path / "model")
    assert not config.use_pretrained_backbone and "pretrained_cfg_overlay" not in config.backbone_kwargs
    Pix2SeqForObjectDetection._from_config(config)
    Pix2SeqForObjectDetection.from_pretrained(tmp_path / "model")


def test_sincos_coordinate_embeddings_start_smooth_and_survive_loading(tmp_path):
    config = tiny_config(coordinate_embedding_init="sincos")
    model = Pix2SeqForObjectDetection(config)
    weight = model.model.decoder.embed_tokens.weight.detach()
    coordinates = weight[config.coord_token_offset : config.coord_token_offset + config.num_bins]
    similarity = torch.nn.functional.cosine_similarity(coordinates[:, None], coordinates[None], dim=-1)
    # Neighbouring bins start alike, distant ones do not; other tokens keep the normal initialisation.
    assert similarity.diagonal(1).min() > 0.5 and similarity[0, -1] < 0.3
    assert abs(coordinates.std().item() - config.init_std) < 0.2 * config.init_std
    assert weight[: config.coord_token_offset].std().item() == pytest.approx(config.init_std, rel=0.2)
    normal = Pix2SeqForObjectDetection(tiny_config()).model.decoder.embed_tokens.weight.detach()
    normal_coordinates = normal[config.coord_token_offset : config.coord_token_offset + config.num_bins]
    assert torch.nn.functional.cosine_similarity(normal_coordinates[:-1], normal_coordinates[1:]).abs().max() < 0.5
    # Loaded weights are kept, not initialised again.
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight


def test_unknown_coordinate_embedding_init_is_refused():
    with pytest.raises(ValueError, match="coordinate_embedding_init"):
        tiny_config(coordinate_embedding_init="uniform")


def test_base_model_loads_from_a_detection_checkpoint(tester, tmp_path):
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    model.save_pretrained(tmp_path)
    base = Pix2SeqModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(base.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)


def test_generation_follows_the_grammar_and_writes_max_instances_objects(tester):
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    tokens = model.generate(torch.rand(2, 3, 64, 64))[:, 1:]
    assert tokens.shape == (2, 5 * config.max_instances)
    objects = tokens.reshape(2, -1, 5)
    assert torch.all((objects[..., :4] >= 1000) & (objects[..., :4] < 1000 + config.num_bins))
    assert torch.all((objects[..., 4] >= 100) & (objects[..., 4] <= 102))


def test_forward_with_pixel_values_alone_generates_scored_detections(tester):
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    # Greedy decoding of an untrained model repeats one coordinate (empty boxes); the official sampling does not.
    model.generation_config.update(do_sample=True, top_p=0.4, top_k=0)
    outputs = model(pixel_values=torch.rand(2, 3, 64, 64))
    assert isinstance(outputs, Pix2SeqObjectDetectionOutput)
    assert outputs.sequences.shape == (2, config.sequence_length)
    assert outputs.logits.shape == (2, config.sequence_length, config.vocab_size)
    processor = Pix2SeqImageProcessor.from_model_config(config)
    results = processor.post_process_object_detection(outputs, threshold=0.0)
    scores = torch.cat([result["scores"] for result in results])
    assert scores.numel() and torch.all((scores > 0) & (scores < 1))
    # Scores are class probabilities, not a constant.
    assert scores.unique().numel() > 1


def test_pretrained_backbone_weights_survive_post_init(tmp_path):
    reference = timm.create_model("resnet18", features_only=True)
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, mean=0.5)
    weights_file = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(reference.state_dict(), weights_file)
    config = tiny_config(
        use_pretrained_backbone=True, backbone_kwargs={"pretrained_cfg_overlay": {"file": str(weights_file)}}
    )
    model = Pix2SeqForObjectDetection(config)
    loaded = model.model.encoder.backbone.timm_model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], value, msg=name)


def test_vit_backbone_runs_without_encoder_layers():
    tester = Pix2SeqModelTester(
        batch_size=1, backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 64}, encoder_layers=0
    )
    config = tester.get_config()
    model = Pix2SeqForObjectDetection(config).eval()
    assert model.model.encoder.backbone.stride == 16
    batch = tester.prepare_token_inputs(config)
    assert torch.isfinite(model(**batch).loss)
    assert model(pixel_values=batch["pixel_values"]).sequences.shape == (1, config.sequence_length)
