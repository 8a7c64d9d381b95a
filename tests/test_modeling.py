import pytest
import safetensors.torch
import timm
import torch

from testing_utils import tiny_config
from modeling_pix2seq import Pix2SeqForObjectDetection, Pix2SeqModel, Pix2SeqObjectDetectionOutput


def training_batch(model, batch_size=2):
    generator = torch.Generator().manual_seed(0)
    sequences = [
        model.tokenizer.build_training_sequence(torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]]), torch.tensor([0, 2]), generator)
        for _ in range(batch_size)
    ]
    batch = {key: torch.stack([s[key] for s in sequences]) for key in sequences[0]}
    batch["pixel_values"] = torch.rand(batch_size, 3, model.config.image_size, model.config.image_size, generator=generator)
    return batch


def test_loss_is_the_token_weighted_mean_cross_entropy(config):
    model = Pix2SeqForObjectDetection(config).eval()
    batch = training_batch(model)
    outputs = model(**batch)
    assert outputs.logits.shape == (2, config.sequence_length, config.vocab_size)
    cross_entropy = torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    weights = batch["token_weights"].flatten()
    torch.testing.assert_close(outputs.loss, (cross_entropy * weights).sum() / weights.sum())
    # Noise coordinates weigh 0: changing their targets leaves the loss unchanged.
    noise_coordinates = batch["token_weights"] == 0
    changed = dict(batch, labels=torch.where(noise_coordinates, 1000, batch["labels"]))
    torch.testing.assert_close(model(**changed).loss, outputs.loss)


def test_labels_alone_are_shifted_behind_the_task_token(config):
    model = Pix2SeqForObjectDetection(config).eval()
    batch = training_batch(model)
    labels = batch["labels"]
    explicit = torch.nn.functional.pad(labels[:, :-1], (1, 0), value=config.task_token_id)
    torch.testing.assert_close(
        model(pixel_values=batch["pixel_values"], labels=labels).logits,
        model(pixel_values=batch["pixel_values"], decoder_input_ids=explicit, labels=labels).logits,
    )


def test_backward_reaches_backbone_decoder_and_tied_embedding(config):
    model = Pix2SeqForObjectDetection(config).train()
    model(**training_batch(model)).loss.backward()
    assert model.model.decoder.embed_tokens.weight is model.lm_head.weight
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.lm_head.bias.grad.abs().sum() > 0
    assert next(model.model.encoder.backbone.parameters()).grad.abs().sum() > 0


def test_save_and_load_give_identical_outputs_and_keep_the_tie(config, tmp_path):
    model = Pix2SeqForObjectDetection(config).eval()
    batch = training_batch(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight
    assert loaded.generation_config.top_p == 0.4 and loaded.generation_config.top_k == 0
    assert loaded.generation_config.max_new_tokens == 5 * config.max_instances


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


def test_base_model_loads_from_a_detection_checkpoint(config, tmp_path):
    model = Pix2SeqForObjectDetection(config).eval()
    model.save_pretrained(tmp_path)
    base = Pix2SeqModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(base.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)


def test_batched_generation_equals_one_by_one(config):
    model = Pix2SeqForObjectDetection(config).eval()
    pixel_values = torch.rand(3, 3, 64, 64)
    batched = model.generate(pixel_values, do_sample=False)
    single = torch.cat([model.generate(pixel_values[i : i + 1], do_sample=False) for i in range(3)])
    assert torch.equal(batched, single)


def test_generation_follows_the_grammar_and_writes_max_instances_objects(config):
    model = Pix2SeqForObjectDetection(config).eval()
    tokens = model.generate(torch.rand(2, 3, 64, 64))[:, 1:]
    assert tokens.shape == (2, 5 * config.max_instances)
    objects = tokens.reshape(2, -1, 5)
    assert torch.all((objects[..., :4] >= 1000) & (objects[..., :4] < 1000 + config.num_bins))
    assert torch.all((objects[..., 4] >= 100) & (objects[..., 4] <= 102))


def test_official_top_p_keeps_only_the_top_token_when_it_already_exceeds_p():
    from modeling_pix2seq import Pix2SeqTopPLogitsWarper

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    filtered = Pix2SeqTopPLogitsWarper(top_p=0.4)(None, scores)
    assert torch.isfinite(filtered).tolist() == [[True, False, False]]
    filtered = Pix2SeqTopPLogitsWarper(top_p=0.85)(None, scores)
    assert torch.isfinite(filtered).tolist() == [[True, True, False]]


def test_forward_with_pixel_values_alone_generates_scored_detections(config):
    model = Pix2SeqForObjectDetection(config).eval()
    outputs = model(pixel_values=torch.rand(2, 3, 64, 64))
    assert isinstance(outputs, Pix2SeqObjectDetectionOutput)
    assert outputs.pred_boxes.shape == (2, config.max_instances, 4)
    valid = outputs.pred_labels >= 0
    assert torch.all((outputs.pred_scores[valid] > 0) & (outputs.pred_scores[valid] < 1))
    # Scores are class probabilities, not a constant.
    assert outputs.pred_scores[valid].unique().numel() > 1


def test_pretrained_backbone_weights_survive_post_init(tmp_path):
    reference = timm.create_model("resnet18", features_only=True)
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, mean=0.5)
    weights_file = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(reference.state_dict(), weights_file)
    config = tiny_config(use_pretrained_backbone=True, backbone_kwargs={"pretrained_cfg_overlay": {"file": str(weights_file)}})
    model = Pix2SeqForObjectDetection(config)
    loaded = model.model.encoder.backbone.timm_model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], value, msg=name)


def test_gradient_checkpointing_gives_the_same_loss(config):
    model = Pix2SeqForObjectDetection(tiny_config(dropout=0.0, drop_path_rate=0.0)).train()
    batch = training_batch(model)
    plain = model(**batch).loss
    model.activation_checkpointing_enable()
    torch.testing.assert_close(model(**batch).loss, plain)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_agree(config, implementation):
    model = Pix2SeqForObjectDetection(config).eval()
    batch = training_batch(model)
    reference = model(**batch).logits
    model.set_attn_implementation(implementation)
    torch.testing.assert_close(model(**batch).logits, reference, rtol=1e-4, atol=1e-4)


def test_vit_backbone_runs_without_encoder_layers():
    config = tiny_config(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 64}, encoder_layers=0)
    model = Pix2SeqForObjectDetection(config).eval()
    assert model.model.encoder.backbone.stride == 16
    batch = training_batch(model, batch_size=1)
    assert torch.isfinite(model(**batch).loss)
    assert model(pixel_values=batch["pixel_values"]).pred_boxes.shape == (1, config.max_instances, 4)
