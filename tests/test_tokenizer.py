import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing_utils import tiny_config

from tokenization_pix2seq import Pix2SeqTokenizer


def official_tokenizer(**overrides):
    settings_ = {"class_ids": list(range(80)), "num_bins": 1000, "max_instances": 100}
    settings_.update(overrides)
    return Pix2SeqTokenizer(**settings_)


def one_hot_logits(tokens, vocab_size=3000):
    logits = torch.full((*tokens.shape, vocab_size), -20.0)
    return logits.scatter(-1, tokens.clamp(0, vocab_size - 1).unsqueeze(-1), 20.0)


def test_from_config_reads_the_vocabulary_layout(config):
    tokenizer = Pix2SeqTokenizer.from_config(config)
    assert tokenizer.num_bins == config.num_bins
    assert tokenizer.class_token_ids.tolist() == [100, 101, 102]
    assert tokenizer.sequence_length == 5 * config.max_instances


def test_encode_writes_yxyx_then_class_with_rounding():
    tokenizer = official_tokenizer()
    tokens = tokenizer.encode(torch.tensor([[0.1, 0.2, 0.5, 0.7]]), torch.tensor([3]))
    # round(v * 999): y_min 0.2 -> 200 (199.8), x_min 0.1 -> 100 (99.9), y_max 0.7 -> 699 (699.3), x_max 0.5 -> 500 (499.5)
    assert tokens.tolist() == [1200, 1100, 1699, 1500, 103]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(*[st.floats(0, 1, allow_nan=False) for _ in range(4)], st.integers(0, 79)), min_size=1, max_size=20
    )
)
def test_encode_decode_round_trip_is_within_half_a_bin(objects):
    tokenizer = official_tokenizer()
    boxes = torch.tensor([[min(o[0], o[2]), min(o[1], o[3]), max(o[0], o[2]), max(o[1], o[3])] for o in objects])
    labels = torch.tensor([o[4] for o in objects])
    tokens = tokenizer.encode(boxes, labels).unsqueeze(0)
    decoded = tokenizer.decode(tokens, one_hot_logits(tokens))
    half_bin = 0.5 / (tokenizer.num_bins - 1) + 1e-6
    non_empty = decoded["labels"][0] >= 0
    assert torch.equal(decoded["labels"][0][non_empty], labels[non_empty])
    assert (decoded["boxes"][0][non_empty] - boxes[non_empty]).abs().max() <= half_bin if non_empty.any() else True
    # Only boxes that quantise to zero width or height are dropped.
    bins = tokenizer.quantize(boxes)
    expected_non_empty = (bins[:, 2] > bins[:, 0]) & (bins[:, 3] > bins[:, 1])
    assert torch.equal(non_empty, expected_non_empty)


def test_decode_scores_with_the_class_probability_at_class_positions():
    tokenizer = official_tokenizer(class_ids=[0, 1])
    tokens = tokenizer.encode(torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]), torch.tensor([0, 1]))
    tokens = tokens.unsqueeze(0)
    logits = torch.zeros(1, 10, 3000)
    logits[0, 4, 100] = 5.0  # first object: class 0 dominates
    logits[0, 9, 101] = 2.0  # second object: class 1, less sure
    logits[0, 9, 30] = 3.0  # and FAKE takes probability mass away
    decoded = tokenizer.decode(tokens, logits)
    probs_first = logits[0, 4].softmax(-1)
    probs_second = logits[0, 9].softmax(-1)
    assert decoded["labels"][0].tolist() == [0, 1]
    torch.testing.assert_close(decoded["scores"][0], torch.stack([probs_first[100], probs_second[101]]))
    assert decoded["scores"][0, 1] < decoded["scores"][0, 0]


def test_decode_ignores_a_trailing_partial_object_and_non_coordinate_tokens():
    tokenizer = official_tokenizer(class_ids=[0])
    good = tokenizer.encode(torch.tensor([[0.1, 0.1, 0.4, 0.4]]), torch.tensor([0]))
    bad = torch.tensor([1100, 5, 1400, 1400, 100])  # a special token among the coordinates
    tokens = torch.cat([good, bad, good[:3]]).unsqueeze(0)
    decoded = tokenizer.decode(tokens, one_hot_logits(tokens))
    assert decoded["labels"].shape == (1, 2)
    assert decoded["labels"][0].tolist() == [0, -1]
    assert decoded["scores"][0, 1] == 0


def sequence_for(tokenizer, num_objects, seed=0):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(num_objects, 2, generator=generator) * 0.5
    boxes = torch.cat([corners, corners + 0.1 + torch.rand(num_objects, 2, generator=generator) * 0.3], dim=1)
    labels = torch.randint(0, 3, (num_objects,), generator=generator)
    return boxes, labels, tokenizer.build_training_sequence(boxes, labels, generator)


@pytest.mark.parametrize("num_objects", [0, 1, 3, 4, 6])
def test_training_sequence_is_filled_to_max_instances_with_fake_noise(num_objects):
    tokenizer = Pix2SeqTokenizer.from_config(tiny_config(class_label_corruption="none"))
    boxes, labels, sequence = sequence_for(tokenizer, num_objects)
    num_real = min(num_objects, tokenizer.max_instances)
    assert all(value.shape == (tokenizer.sequence_length,) for value in sequence.values())
    targets, weights = sequence["labels"].reshape(-1, 5), sequence["token_weights"].reshape(-1, 5)
    # Real objects first (weights 1), then noise objects: coordinates weigh 0, the FAKE class weighs 1.
    assert torch.all(weights[:num_real] == 1)
    assert torch.all(targets[num_real:, 4] == tokenizer.fake_class_token_id)
    assert torch.all(weights[num_real:, :4] == 0) and torch.all(weights[num_real:, 4] == tokenizer.noise_class_weight)
    coordinates = targets[:, :4] - tokenizer.coord_token_offset
    assert torch.all((coordinates >= 0) & (coordinates < tokenizer.num_bins))
    # Real objects keep their classes, in some order; beyond max_instances a random subset is kept.
    kept, given = collections.Counter(targets[:num_real, 4].tolist()), collections.Counter((labels + 100).tolist())
    assert sum(kept.values()) == num_real and all(kept[c] <= given[c] for c in kept)


def test_teacher_forcing_input_is_the_task_token_then_the_targets_shifted():
    tokenizer = Pix2SeqTokenizer.from_config(tiny_config(class_label_corruption="none"))
    _, _, sequence = sequence_for(tokenizer, 2)
    assert sequence["decoder_input_ids"][0] == tokenizer.task_token_id
    assert torch.equal(sequence["decoder_input_ids"][1:], sequence["labels"][:-1])


def test_without_noise_the_sequence_is_padded_with_eos_weighted_low():
    tokenizer = Pix2SeqTokenizer.from_config(tiny_config(noise_objects=False, class_label_corruption="none"))
    _, _, sequence = sequence_for(tokenizer, 2)
    assert torch.all(sequence["labels"][10:] == tokenizer.pad_token_id)
    assert torch.allclose(sequence["token_weights"][10:], torch.tensor(tokenizer.eos_token_weight))
    assert torch.all(sequence["token_weights"][:10] == 1)


def test_eos_mode_ends_real_objects_with_eos_and_noise_objects_with_fake_then_eos():
    tokenizer = Pix2SeqTokenizer.from_config(tiny_config(eos_mode=True, class_label_corruption="none"))
    _, _, sequence = sequence_for(tokenizer, 2)
    targets, weights = sequence["labels"], sequence["token_weights"]
    assert targets.shape == (5 * tokenizer.max_instances + 1,)
    assert targets[10] == tokenizer.pad_token_id and weights[10] == pytest.approx(tokenizer.eos_token_weight)
    noise_targets, noise_weights = targets[11:].reshape(-1, 5), weights[11:].reshape(-1, 5)
    assert torch.all(noise_targets[:, 3] == tokenizer.fake_class_token_id)
    assert torch.all(noise_targets[:, 4] == tokenizer.pad_token_id)
    assert torch.all(noise_weights[:, :3] == 0)


def test_random_object_order_shuffles_real_objects_between_calls():
    tokenizer = Pix2SeqTokenizer.from_config(tiny_config(class_label_corruption="none"))
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5], [0.6, 0.6, 0.8, 0.8], [0.1, 0.5, 0.3, 0.9]])
    labels = torch.tensor([0, 1, 2, 0])
    generator = torch.Generator().manual_seed(0)
    orders = {
        tuple(tokenizer.build_training_sequence(boxes, labels, generator)["labels"][:20].tolist()) for _ in range(20)
    }
    assert len(orders) > 5
    fixed = Pix2SeqTokenizer.from_config(tiny_config(class_label_corruption="none", random_object_order=False))
    assert fixed.build_training_sequence(boxes, labels)["labels"][:20].tolist() == fixed.encode(boxes, labels).tolist()


def test_more_objects_than_max_instances_keeps_a_random_subset():
    tokenizer = Pix2SeqTokenizer.from_config(tiny_config(max_instances=3, eos_mode=True))
    boxes = torch.tensor([[i / 10, 0.1, i / 10 + 0.05, 0.2] for i in range(8)])
    kept = set()
    for seed in range(10):
        sequence = tokenizer.build_training_sequence(boxes, torch.zeros(8), torch.Generator().manual_seed(seed))
        kept |= set(sequence["labels"][1:15:5].tolist())  # the x_min tokens of the 3 objects kept
    assert len(kept) > 3


def test_rand_n_fake_cls_replaces_every_input_class_token_half_random_half_fake():
    tokenizer = official_tokenizer(
        class_label_corruption="rand_n_fake_cls", noise_objects=False, random_object_order=False
    )
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4]]).repeat(100, 1)
    labels = torch.full((100,), 7)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.stack(
        [tokenizer.build_training_sequence(boxes, labels, generator)["decoder_input_ids"] for _ in range(20)]
    )
    targets = tokenizer.build_training_sequence(boxes, labels, generator)["labels"]
    input_classes = inputs[:, 5::5]  # class tokens of objects 0..98 (the task token shifts the input by one)
    assert torch.all(targets[4::5] == 107), "targets keep the true class"
    fake = input_classes == tokenizer.fake_class_token_id
    random = (input_classes >= 100) & (input_classes < 1000)
    assert torch.all(fake | random)
    assert 0.45 < fake.float().mean() < 0.55
    # Random class tokens cover all 900 slots, not only the label set.
    assert input_classes[random].unique().numel() > 300
    # Coordinates are never corrupted.
    input_coordinates = inputs[:, 1:496].reshape(20, 99, 5)[:, :, :4]
    assert torch.equal(input_coordinates, targets[:495].reshape(99, 5)[:, :4].expand(20, -1, -1))


def test_noise_boxes_mix_duplicates_near_real_boxes_and_bad_boxes_elsewhere():
    tokenizer = official_tokenizer()
    boxes = torch.tensor([[0.40, 0.40, 0.45, 0.45]])
    generator = torch.Generator().manual_seed(0)
    noise = torch.cat([tokenizer.noise_boxes(boxes, 99, generator) for _ in range(10)])
    assert noise.shape == (990, 4) and noise.min() >= 0 and noise.max() <= 1
    near = ((noise - boxes).abs().max(dim=1).values < 0.02).float().mean()
    # The duplicate share is uniform in [0, n], about half on average.
    assert 0.2 < near < 0.8
