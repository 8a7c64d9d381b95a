"""
Pix2Seq decoding rules and its static-cache decoding strategy.

This module owns how Pix2Seq tokens are chosen: the grammar (4 coordinate tokens, then 1 real class token, per
object; EOS only where an object could start, in EOS mode), the official top-p filter, and the greedy stop decision
of EOS mode. `Pix2SeqForObjectDetection.generate` puts the rules in front of `GenerationMixin.generate`, and
dispatches to `generate_static` (a decode loop over a static cache, compiled on CUDA) when the generation config asks
for `cache_implementation="static"` and nothing that loop does not do. Both paths build their rules here, from the
model config's vocabulary layout; neither knows what a box is.
"""

import torch
from transformers import CompileConfig
from transformers.cache_utils import EncoderDecoderCache, StaticCache
from transformers.generation import GenerateEncoderDecoderOutput, LogitsProcessor
from transformers.modeling_outputs import Seq2SeqModelOutput


def cache_field():
    """The name of the cache field of transformers' outputs (`cache` from 5.24, `past_key_values` before)."""
    return "cache" if "cache" in Seq2SeqModelOutput.__dataclass_fields__ else "past_key_values"


def coordinate_tokens(config):
    """The token ids of the coordinate bins, as a slice of the vocabulary."""
    return slice(config.coord_token_offset, config.coord_token_offset + config.num_bins)


def class_token_ids(config):
    """The token ids of the real classes (the keys of `id2label` + `class_token_offset`), sorted."""
    return torch.tensor(sorted(int(index) for index in config.id2label), dtype=torch.long) + config.class_token_offset


def choose_stop_or_object(scores, eos_token_id, coordinate_tokens):
    """
    For greedy decoding where both EOS and a new object are allowed (object starts in EOS mode), decides between them
    by their whole mass: one EOS token against a first coordinate spread over `num_bins` tokens. Token by token, EOS
    would win while the model is still sure that another object follows but unsure where. Stops where EOS is more
    likely than all coordinate tokens together, and otherwise rules EOS out.
    """
    eos = scores[:, eos_token_id]
    coordinates = scores[:, coordinate_tokens]
    both_allowed = torch.isfinite(eos) & torch.isfinite(coordinates).any(dim=-1)
    stop = both_allowed & (eos > coordinates.logsumexp(dim=-1))
    is_eos = torch.arange(scores.shape[-1], device=scores.device) == eos_token_id
    blocked = (stop.unsqueeze(-1) & ~is_eos) | ((both_allowed & ~stop).unsqueeze(-1) & is_eos)
    return scores.masked_fill(blocked, -float("inf"))


class Pix2SeqGrammarLogitsProcessor(LogitsProcessor):
    """
    Restricts generation to the Pix2Seq grammar: 4 coordinate tokens, then 1 real class token, per object. In EOS
    mode an object may instead start with EOS (= PAD), after which only padding follows. Built from a `Pix2SeqConfig`.
    """

    def __init__(self, config, prompt_length=1, allow_eos=None, greedy=False):
        allow_eos = config.eos_mode if allow_eos is None else allow_eos
        coordinate = torch.zeros(config.vocab_size, dtype=torch.bool)
        coordinate[coordinate_tokens(config)] = True
        object_start = coordinate.clone()
        object_start[config.pad_token_id] = allow_eos
        class_tokens = torch.zeros(config.vocab_size, dtype=torch.bool)
        class_tokens[class_token_ids(config)] = True
        self.blocked = ~torch.stack([object_start, coordinate, coordinate, coordinate, class_tokens])  # (5, V)
        self.prompt_length = prompt_length
        # Sampling draws EOS with its own probability and a box with the coordinates' total: only greedy decoding
        # needs the stop decision taken on masses (see `choose_stop_or_object`).
        self.weigh_stop = allow_eos and greedy
        self.eos_token_id = config.pad_token_id
        self.coordinate_tokens = coordinate_tokens(config)

    def __call__(self, input_ids, scores):
        # Moved once, not every step: a host-to-device copy per token would cost more than the masking itself.
        if self.blocked.device != scores.device:
            self.blocked = self.blocked.to(scores.device)
        step = input_ids.shape[1] - self.prompt_length
        scores = scores.masked_fill(self.blocked[step % 5], -float("inf"))
        if self.weigh_stop and step % 5 == 0:
            scores = choose_stop_or_object(scores, self.eos_token_id, self.coordinate_tokens)
        return scores


class Pix2SeqTopPLogitsWarper(LogitsProcessor):
    """
    The official nucleus filter: keeps the largest set of most likely tokens whose cumulative probability is at most
    `top_p`, and always the most likely one. (transformers' `TopPLogitsWarper` also keeps the token crossing `top_p`.)
    """

    def __init__(self, top_p, temperature=1.0):
        self.top_p = top_p
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        scores = scores / self.temperature
        sorted_scores, sorted_index = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > self.top_p
        remove[..., 0] = False
        return scores.masked_fill(remove.scatter(-1, sorted_index, remove), -float("inf"))


def decoding_processors(config, generation_config, use_grammar, prompt_length=1):
    """
    The Pix2Seq rules for `GenerationMixin.generate`: the grammar when `use_grammar` (after `prompt_length` prompt
    tokens), and the official top-p in place of transformers' when sampling with `top_p < 1` (the generation config's
    `top_p` and `temperature` are then reset, so that transformers does not apply its own on top).
    """
    processors = []
    if use_grammar:
        processors.append(
            Pix2SeqGrammarLogitsProcessor(config, prompt_length=prompt_length, greedy=not generation_config.do_sample)
        )
    top_p = generation_config.top_p
    if generation_config.do_sample and top_p is not None and top_p < 1.0:
        processors.append(Pix2SeqTopPLogitsWarper(top_p, generation_config.temperature or 1.0))
        generation_config.top_p = 1.0
        generation_config.temperature = 1.0
    return processors


def can_generate_static(generation_config, logits_processor, model_kwargs):
    """Whether `generate_static` does all that the call asks: a static cache, one greedy or sampled sequence each."""
    return (
        generation_config.cache_implementation == "static"
        and not logits_processor
        and not model_kwargs
        and (generation_config.num_beams or 1) == 1
        and (generation_config.num_return_sequences or 1) == 1
        and not generation_config.top_k
        and not generation_config.min_new_tokens
        and not (generation_config.output_scores or generation_config.output_attentions)
        and not generation_config.output_hidden_states
    )


@torch.no_grad()
def generate_static(model, pixel_values, generation_config, use_grammar):
    """
    Pix2Seq decoding at the hardware floor. The decode step (decoder, grammar, top-p, sampling) is one function over
    fixed shapes and in-place buffers, compiled under the same rule as `GenerationMixin`'s static-cache forward (on
    CUDA by default, `compile_config` with `mode="reduce-overhead"`: one CUDA graph replay per token). Besides the
    logits processors, stock `generate` syncs the host with the device every token to test for EOS; here the loop
    never waits on the device, except after steps where EOS may appear (object starts, in EOS mode) to stop once
    every sequence has ended. Returns what `generate` returns (`sequences`, and `logits` if `output_logits`).
    """
    config = model.config
    encoder_hidden_states = model.model.encoder(pixel_values).last_hidden_state  # (B, S, D)
    batch_size, device = encoder_hidden_states.shape[0], encoder_hidden_states.device
    max_new_tokens = generation_config.max_new_tokens or generation_config.max_length - 1
    cache, finished = _static_decoding_state(model, encoder_hidden_states, max_new_tokens)
    grammar = Pix2SeqGrammarLogitsProcessor(config)
    blocked = (grammar.blocked if use_grammar else torch.zeros_like(grammar.blocked)).to(device)  # (5, V)
    eos_token_id = generation_config.eos_token_id
    eos_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    can_end = eos_token_id is not None and (config.eos_mode or not use_grammar)
    sampling = {
        "do_sample": bool(generation_config.do_sample),
        "top_p": generation_config.top_p if generation_config.top_p is not None else 1.0,
        "temperature": generation_config.temperature or 1.0,
        "eos_token_id": eos_token_id,
    }

    sequences = torch.full((batch_size, max_new_tokens + 1), config.pad_token_id, device=device)
    sequences[:, 0] = generation_config.decoder_start_token_id
    logits = None
    if generation_config.output_logits:
        logits = torch.empty(batch_size, max_new_tokens, config.vocab_size, device=device)
    compiled = model._valid_auto_compile_criteria({"cache": cache}, generation_config)
    step_fn = decode_step
    for step in range(max_new_tokens):
        if step == 1 and compiled:
            # The first step allocates the cache and projects the image keys/values: it stays eager.
            step_fn = _compiled_decode_step(model, generation_config.compile_config)
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        next_tokens, step_logits = step_fn(
            model, sequences[:, step : step + 1], encoder_hidden_states, cache, blocked[step % 5], finished, **sampling
        )
        sequences[:, step + 1] = next_tokens
        if logits is not None:
            logits[:, step] = step_logits
        # With the grammar, EOS can only start an object: the only steps worth a host sync.
        if can_end and (step % 5 == 0 or not use_grammar) and bool(finished.all()):
            break
    sequences = sequences[:, : step + 2]
    if not generation_config.return_dict_in_generate:
        return sequences
    return GenerateEncoderDecoderOutput(
        sequences=sequences,
        logits=None if logits is None else logits[:, : step + 1].unbind(1),
        **{cache_field(): cache},
    )


def decode_step(
    model, input_ids, encoder_hidden_states, cache, blocked, finished, do_sample, top_p, temperature, eos_token_id
):
    """One token for every sequence: `(B, 1)` ids -> `(B,)` next ids and their `(B, V)` raw logits."""
    config = model.config
    logits = model.lm_head(model.model.decoder(input_ids, encoder_hidden_states, cache).last_hidden_state[:, -1])
    logits = logits.float()
    scores = logits.masked_fill(blocked, -float("inf"))
    if config.eos_mode and not do_sample:
        scores = choose_stop_or_object(scores, config.pad_token_id, coordinate_tokens(config))
    if do_sample:
        scores = (
            Pix2SeqTopPLogitsWarper(top_p, temperature)(input_ids, scores) if top_p < 1.0 else scores / temperature
        )
        # Exponential race: a categorical sample that CUDA graphs can capture, unlike `torch.multinomial`.
        next_tokens = (scores.softmax(dim=-1) / torch.empty_like(scores).exponential_()).argmax(dim=-1)
    else:
        next_tokens = scores.argmax(dim=-1)
    if eos_token_id is not None:
        next_tokens = next_tokens.masked_fill(finished, config.pad_token_id)
        finished |= next_tokens == eos_token_id
    return next_tokens, logits


def _static_decoding_state(model, encoder_hidden_states, max_new_tokens):
    """The static cache and the `(B,)` finished flags, reset, and kept on the model from call to call of one shape."""
    batch_size, encoder_length, _ = encoder_hidden_states.shape
    key = (batch_size, encoder_length, max_new_tokens, encoder_hidden_states.dtype, encoder_hidden_states.device)
    # CUDA graphs record the addresses of these in-place buffers: new ones every call would record new graphs.
    if getattr(model, "_static_decoding_key", None) != key:
        model._static_decoding_key = key
        finished = torch.zeros(batch_size, dtype=torch.bool, device=encoder_hidden_states.device)
        torch._dynamo.mark_static_address(finished)
        model._static_decoding_buffers = (
            EncoderDecoderCache(
                StaticCache(config=model.config, max_cache_len=max_new_tokens),
                StaticCache(config=model.config, max_cache_len=encoder_length),
            ),
            finished,
        )
    cache, finished = model._static_decoding_buffers
    cache.reset()
    finished.zero_()
    return cache, finished


def _compiled_decode_step(model, compile_config):
    compile_config = compile_config or CompileConfig(fullgraph=True)
    if getattr(model, "_decode_step_compile_config", None) != compile_config:
        model._decode_step_compile_config = compile_config
        model._compiled_decode_step_fn = torch.compile(decode_step, **compile_config.to_dict())
    return model._compiled_decode_step_fn


__all__ = [
    "Pix2SeqGrammarLogitsProcessor",
    "Pix2SeqTopPLogitsWarper",
    "can_generate_static",
    "choose_stop_or_object",
    "decoding_processors",
    "generate_static",
]
