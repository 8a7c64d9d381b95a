"""
The common model checks, in the spirit of transformers' `ModelTesterMixin`: every test class below runs them on its
own tiny configuration (a timm ResNet, the official ViT patch stem, EOS mode).
"""

import pytest
import torch
from testing_utils import Pix2SeqModelTester, trained_tiny_model

from modeling_pix2seq import Pix2SeqForObjectDetection


class ModelTesterMixin:
    """
    The checks; a subclass sets `config_overrides` (settings of `tiny_config`), and `fitted_rows_differ = False` where
    a few training steps do not teach the tiny model to write different tokens for the two training images.
    """

    config_overrides = {}
    fitted_rows_differ = True

    @pytest.fixture
    def tester(self):
        return Pix2SeqModelTester(**self.config_overrides)

    @pytest.fixture
    def model(self, tester):
        torch.manual_seed(0)
        return Pix2SeqForObjectDetection(tester.get_config()).eval()

    @pytest.fixture
    def batch(self, tester, model):
        return tester.prepare_token_inputs(model.config)

    def test_save_and_load_give_identical_outputs_and_keep_the_tie(self, model, batch, tmp_path):
        model.save_pretrained(tmp_path)
        loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
        assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight
        assert loaded.generation_config.max_new_tokens == model.config.sequence_length

    def test_batched_teacher_forcing_equals_one_by_one(self, model, batch):
        batched = model(**batch).logits
        for index in range(len(batched)):
            single = {key: value[index : index + 1] for key, value in batch.items()}
            torch.testing.assert_close(model(**single).logits, batched[index : index + 1], rtol=1e-4, atol=1e-5)

    def test_eval_loss_is_the_same_on_every_call(self, model, batch):
        assert len({model(**batch).loss.item() for _ in range(3)}) == 1

    def test_eval_loss_of_processor_targets_is_the_same_on_every_call(self, tester, model):
        """Without sequence augmentation, the processor's targets (and so the Trainer's eval loss) do not vary."""
        losses = {
            model(**tester.prepare_token_inputs(model.config, augment=False, seed=seed)).loss.item() for seed in (0, 1)
        }
        assert len(losses) == 1
        augmented = {model(**tester.prepare_token_inputs(model.config, seed=seed)).loss.item() for seed in (0, 1)}
        assert len(augmented) == 2

    def test_sdpa_attention_agrees_with_eager(self, model, batch):
        model.set_attn_implementation("eager")
        reference = model(**batch).logits
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(**batch).logits, reference, rtol=1e-4, atol=1e-4)

    def test_hidden_states_of_encoder_and_decoder_are_returned(self, model, batch):
        config = model.config
        outputs = model(**batch, output_hidden_states=True)
        assert len(outputs.encoder_hidden_states) == config.encoder_layers + 1
        assert len(outputs.decoder_hidden_states) == config.decoder_layers + 1
        batch_size, length = batch["labels"].shape
        assert outputs.decoder_hidden_states[-1].shape == (batch_size, length, config.d_model)
        encoder_width = config.encoder_hidden_size or config.d_model
        assert outputs.encoder_hidden_states[0].shape[::2] == (batch_size, encoder_width)
        # The last decoder hidden state is the input of the final LayerNorm, whose output makes the logits.
        final = model.model.decoder.layer_norm(outputs.decoder_hidden_states[-1])
        torch.testing.assert_close(model.lm_head(final), outputs.logits)
        assert model(**batch).decoder_hidden_states is None

    def test_attentions_are_returned_with_eager_and_refused_by_name_otherwise(self, model, batch):
        with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
            model(**batch, output_attentions=True)
        model.set_attn_implementation("eager")
        outputs = model(**batch, output_attentions=True)
        config = model.config
        batch_size, length = batch["labels"].shape
        assert len(outputs.decoder_attentions) == len(outputs.cross_attentions) == config.decoder_layers
        assert len(outputs.encoder_attentions) == config.encoder_layers
        assert outputs.decoder_attentions[0].shape == (batch_size, config.decoder_attention_heads, length, length)
        # Causal: no weight on later tokens; each row sums to one.
        assert outputs.decoder_attentions[0].triu(1).abs().max() == 0
        torch.testing.assert_close(outputs.cross_attentions[0].sum(-1), torch.ones(batch_size, 4, length))

    def test_gradient_checkpointing_gives_the_same_loss_and_gradients(self, model, batch):
        model.train()
        torch.manual_seed(0)
        model(**batch).loss.backward()
        reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.activation_checkpointing_enable()
        torch.manual_seed(0)
        model(**batch).loss.backward()
        for name, parameter in model.named_parameters():
            if name in reference:
                torch.testing.assert_close(parameter.grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)

    def test_generate_with_cache_matches_without_cache_on_a_trained_model(self):
        model, batch = trained_tiny_model(**self.config_overrides)
        pixel_values = batch["pixel_values"]
        cached = model.generate(pixel_values, do_sample=False)
        assert cached[:, 1:].unique().numel() > 4, "the fitted model must write varied tokens"
        torch.testing.assert_close(
            model.generate(pixel_values, do_sample=False, use_cache=False), cached, rtol=0, atol=0
        )
        torch.testing.assert_close(
            model.generate(pixel_values, do_sample=False, cache_implementation="static"), cached, rtol=0, atol=0
        )

    def test_batched_generation_equals_one_by_one_on_a_trained_model(self):
        model, batch = trained_tiny_model(**self.config_overrides)
        pixel_values = batch["pixel_values"]
        batched = model.generate(pixel_values, do_sample=False)
        if self.fitted_rows_differ:
            assert not torch.equal(batched[0], batched[1]), "the fitted model must write different tokens per image"
        single = [model.generate(pixel_values[i : i + 1], do_sample=False) for i in range(len(pixel_values))]
        width = max(sequence.shape[1] for sequence in single)
        single = torch.cat(
            [torch.nn.functional.pad(s, (0, width - s.shape[1]), value=model.config.pad_token_id) for s in single]
        )
        torch.testing.assert_close(batched, single, rtol=0, atol=0)


class TestResNetModel(ModelTesterMixin):
    config_overrides = {}


class TestViTPatchStemModel(ModelTesterMixin):
    config_overrides = {"backbone": None, "patch_size": 16, "encoder_hidden_size": 48}
    # Its 4 x 4 patch grid barely tells the two images apart after 80 steps: both get the same tokens.
    fitted_rows_differ = False


class TestEosModeModel(ModelTesterMixin):
    config_overrides = {"eos_mode": True}
