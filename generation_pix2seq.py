"""
Pix2Seq decoding rules and its own decode loop.

This module owns how Pix2Seq tokens are chosen: the grammar (4 coordinate tokens, then 1 real class token, per
object; EOS only where an object could start, in EOS mode), the official top-p filter, and the greedy stop decision
of EOS mode. `Pix2SeqForObjectDetection.generate` puts the rules in front of `GenerationMixin.generate`, and
dispatches to `generate_static` (a decode loop: over a static cache, compiled on CUDA, when the generation config asks
for `cache_implementation="static"`; over a dynamic cache on a CPU by default) when the call asks for nothing that
loop does not do. Both paths build their rules here, from the
model config's vocabulary layout; neither knows what a box is.
"""

import contextlib

import torch
from transformers import CompileConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache, StaticCache
from transformers.generation import GenerateEncoderDecoderOutput, LogitsProcessor
from transformers.modeling_outputs import Seq2SeqModelOutput


def cache_field():
    """The name of the cache field of transformers' outputs (`cache` from 5.24, `past_key_values` before)."""
    return "cache" if "cache" in Seq2SeqModelOutput.__dataclass_fields__ else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """
    A dynamic cache layer that keeps its keys and values in buffers made for `capacity` positions: each update writes
    in place, and `keys`/`values` are views of the positions written so far, what a `DynamicLayer` holds, without
    the concatenation by which a `DynamicLayer` grows (a new allocation and a copy of the whole layer, every step).
    Past `capacity` the buffers double.
    """

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity
        self.key_buffer = self.value_buffer = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            capacity = max(self.capacity, 2 * end)
            buffers = []
            for cached, new in ((self.keys, key_states), (self.values, value_states)):
                buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
                if length:
                    buffer[..., :length, :] = cached
                buffers.append(buffer)
            self.key_buffer, self.value_buffer = buffers
        self.key_buffer[..., length:end, :] = key_states
        self.value_buffer[..., length:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _drop_buffers(self):
        # `DynamicLayer` made new `keys`/`values` (not views of the buffers): the next update copies them into new
        # buffers. (`crop` leaves views of the buffers' first positions, where the next update goes on writing.)
        self.key_buffer = self.value_buffer = None

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self._drop_buffers()

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._drop_buffers()


def preallocated_cache(config, capacity):
    """A `DynamicCache` of `PreallocatedLayer`s, one per decoder layer."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


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

    # On a CPU, the filter first looks at this many most likely tokens, and sorts the whole vocabulary only when they
    # do not reach `top_p` together (nearly uniform predictions, such as an untrained model's): the same tokens kept.
    candidates = 64

    def __init__(self, top_p, temperature=1.0):
        self.top_p = top_p
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        scores = scores / self.temperature
        # The shortcut branches on values, a host sync: free on a CPU, not on an accelerator or in a compiled graph.
        if scores.device.type == "cpu" and not torch.compiler.is_compiling() and scores.shape[-1] > self.candidates:
            filtered = self._filter_among_candidates(scores)
            if filtered is not None:
                return filtered
        sorted_scores, sorted_index = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > self.top_p
        remove[..., 0] = False
        return scores.masked_fill(remove.scatter(-1, sorted_index, remove), -float("inf"))

    def _filter_among_candidates(self, scores):
        """
        The filtered scores when the cut falls among the `candidates` most likely tokens of every row (the tokens past
        them would be removed anyway), else `None`.
        """
        log_normaliser = scores.logsumexp(dim=-1, keepdim=True)  # (B, 1)
        # The candidates hold at most `candidates` times the largest probability: when that is short of `top_p` (flat
        # predictions), the cut is past them.
        largest = (scores.amax(dim=-1, keepdim=True) - log_normaliser).exp()
        if not bool((largest * self.candidates > self.top_p).all()):
            return None
        top_scores, top_index = scores.topk(self.candidates, dim=-1)  # (B, candidates), descending
        cumulative = (top_scores - log_normaliser).exp().cumsum(dim=-1)
        if not bool((cumulative[..., -1] > self.top_p).all()):
            return None
        keep = cumulative <= self.top_p
        keep[..., 0] = True
        filtered = torch.full_like(scores, -float("inf"))
        return filtered.scatter(-1, top_index, top_scores.masked_fill(~keep, -float("inf")))


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


# The generation settings Pix2Seq's decode loop implements (or that only matter to what it checks it is not asked
# for, beams); any other setting away from its default (`repetition_penalty`, `max_time`, `bad_words_ids`, ...) sends
# the call to `GenerationMixin`, which implements it.
LOOP_SETTINGS = {
    "_from_model_config",
    "bos_token_id",
    "cache_config",
    "cache_implementation",
    "compile_config",
    "decoder_start_token_id",
    "disable_compile",
    "do_sample",
    "early_stopping",
    "eos_token_id",
    "length_penalty",
    "max_cache_len",
    "max_length",
    "max_new_tokens",
    "min_new_tokens",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_logits",
    "output_scores",
    "pad_token_id",
    "return_dict_in_generate",
    "temperature",
    "top_k",
    "top_p",
    "transformers_version",
    "use_cache",
    "use_grammar",
}


def can_generate_static(generation_config, logits_processor, model_kwargs, device=None):
    """
    Whether `generate_static`, Pix2Seq's decode loop, does all that the call asks: one greedy or sampled sequence
    each, with no setting it lacks. The loop runs where a static cache is asked for and, on a CPU, by default (with
    a dynamic cache, as `GenerationMixin` would use, and the same random draws; its matrix products round
    differently, in the last bit, so the logits are `GenerationMixin`'s to rounding and the tokens, in every test and
    benchmark, the same; at less cost per token).
    """
    cache_implementation = generation_config.cache_implementation
    eos_token_id = generation_config.eos_token_id
    return (
        (
            cache_implementation == "static"
            or (
                cache_implementation is None
                and device is not None
                and torch.device(device).type == "cpu"
                and generation_config.use_cache is not False
            )
        )
        and not logits_processor
        and not model_kwargs
        and set(generation_config.to_diff_dict()) <= LOOP_SETTINGS
        and (generation_config.num_beams or 1) == 1
        and (generation_config.num_return_sequences or 1) == 1
        and not generation_config.top_k
        and not generation_config.min_new_tokens
        and not (generation_config.output_scores or generation_config.output_attentions)
        and not generation_config.output_hidden_states
        and not (isinstance(eos_token_id, list) and len(eos_token_id) > 1)
    )


@torch.no_grad()
def generate_static(model, pixel_values, generation_config, use_grammar):
    """
    Pix2Seq's decode loop. The decode step (decoder, grammar, top-p, sampling) is one function over in-place buffers,
    and the loop never waits on the device, except after steps where EOS may appear (object starts, in EOS mode) to
    stop once every sequence has ended (stock `generate` syncs the host with the device every token to test for EOS).
    Returns what `generate` returns (`sequences`, and `logits` if `output_logits`).

    - With `cache_implementation="static"`, the cache is a static one and the step has fixed shapes: it is compiled
      under the same rule as `GenerationMixin`'s static-cache forward (on CUDA by default, `compile_config` with
      `mode="reduce-overhead"`: one CUDA graph replay per token).
    - Otherwise (a CPU's default), the cache is a dynamic one, as `GenerationMixin`'s, its self-attention layers
      writing into buffers made once per call (`PreallocatedLayer`: the same values), and the step runs eagerly
      within `model.decoding_projections()` (fused query/key/value products, products computed weight first): it
      computes what `GenerationMixin` computes, to rounding, with the same random draws, without its per-token
      bookkeeping.
    """
    config = model.config
    encoder_hidden_states = model.model.encoder(pixel_values).last_hidden_state  # (B, S, D)
    batch_size, device = encoder_hidden_states.shape[0], encoder_hidden_states.device
    max_new_tokens = generation_config.max_new_tokens or generation_config.max_length - 1
    if generation_config.cache_implementation == "static":
        cache, finished = _static_decoding_state(model, encoder_hidden_states, max_new_tokens)
    else:
        cache = EncoderDecoderCache(preallocated_cache(config, max_new_tokens + 1), DynamicCache(config=config))
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
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
        # As the grammar processor decides it for `GenerationMixin`.
        "weigh_stop": bool(use_grammar and config.eos_mode and not generation_config.do_sample),
    }

    sequences = torch.full((batch_size, max_new_tokens + 1), config.pad_token_id, device=device)
    sequences[:, 0] = generation_config.decoder_start_token_id
    logits = None
    if generation_config.output_logits:
        logits = torch.empty(batch_size, max_new_tokens, config.vocab_size, device=device)
    compiled = model._valid_auto_compile_criteria({"cache": cache}, generation_config)
    step_fn = decode_step
    # A compiled step fuses kernels its own way.
    with contextlib.nullcontext() if compiled else model.decoding_projections():
        for step in range(max_new_tokens):
            if step == 1 and compiled:
                # The first step allocates the cache and projects the image keys/values: it stays eager.
                step_fn = _compiled_decode_step(model, generation_config.compile_config)
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            next_tokens, step_logits = step_fn(
                model,
                sequences[:, step : step + 1],
                encoder_hidden_states,
                cache,
                blocked[step % 5],
                finished,
                **sampling,
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
    model,
    input_ids,
    encoder_hidden_states,
    cache,
    blocked,
    finished,
    do_sample,
    top_p,
    temperature,
    eos_token_id,
    weigh_stop,
):
    """One token for every sequence: `(B, 1)` ids -> `(B,)` next ids and their `(B, V)` raw logits."""
    config = model.config
    logits = model.lm_head(model.model.decoder(input_ids, encoder_hidden_states, cache).last_hidden_state[:, -1])
    logits = logits.float()
    scores = logits.masked_fill(blocked, -float("inf"))
    if weigh_stop:
        scores = choose_stop_or_object(scores, config.pad_token_id, coordinate_tokens(config))
    if do_sample:
        scores = (
            Pix2SeqTopPLogitsWarper(top_p, temperature)(input_ids, scores) if top_p < 1.0 else scores / temperature
        )
        # Exponential race: a categorical sample that CUDA graphs can capture. It is what `torch.multinomial` draws
        # for one sample (`GenerationMixin`'s draw): the same random numbers, so the same tokens for the same seed.
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
    "PreallocatedLayer",
    "can_generate_static",
    "choose_stop_or_object",
    "decoding_processors",
    "generate_static",
]
