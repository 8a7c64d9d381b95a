"""One model, four tasks (Pix2Seq v2): the task settings of the config, per-instance teacher forcing and
`generate(task=...)` / `detect(task=...)` with prompts, on a tiny random multi-task model."""

import copy

import pytest
import torch
from testing_utils import TINY_MULTITASK_TASKS, tiny_config, tiny_multitask_config

from configuration_pix2seq import Pix2SeqConfig
from modeling_pix2seq import Pix2SeqForObjectDetection


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Pix2SeqForObjectDetection(tiny_multitask_config(dropout=0.0, drop_path_rate=0.0)).eval()


@pytest.fixture(scope="module")
def pixel_values():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def boxes_prompt(task_token, shape, seed=2):
    """Prompts `[task_token, 4 coordinates, class]` of the given leading shape."""
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.randint(1000, 1064, (*shape, 4), generator=generator)
    classes = torch.randint(100, 103, (*shape, 1), generator=generator)
    return torch.cat([torch.full((*shape, 1), task_token), coordinates, classes], dim=-1)


def teacher_forced_argmax(model, pixel_values, sequences):
    """What greedy decoding must have chosen after each token: the argmax of teacher forcing on the sequences."""
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=sequences[:, :-1]).logits
    return logits.argmax(dim=-1)


def test_task_settings_are_saved_and_loaded(tmp_path):
    config = tiny_multitask_config()
    config.save_pretrained(tmp_path)
    loaded = Pix2SeqConfig.from_pretrained(tmp_path)
    assert loaded.tasks == TINY_MULTITASK_TASKS
    assert (loaded.text_token_offset, loaded.polygon_separator_token_id, loaded.invisible_keypoint_token_id) == (
        3000,
        40,
        41,
    )
    assert loaded.task_settings("captioning")["prompt_token_id"] == 13
    # A detection-only config keeps its layout and saves none of them.
    plain = tiny_config()
    assert plain.tasks is None and plain.text_token_offset is None
    assert plain.task_settings() == {"prompt_token_id": 10}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda tasks: tasks.update(panoptic={"prompt_token_id": 16}), "unknown task 'panoptic'"),
        (lambda tasks: tasks["captioning"].pop("prompt_token_id"), "prompt_token_id"),
        (lambda tasks: tasks["captioning"].update(prompt_token_id=11), "Special tokens must differ"),
        (lambda tasks: tasks["captioning"].update(prompt_token_id=40), "Special tokens must differ"),
        (lambda tasks: tasks["keypoint_detection"].update(prompt_token_id=120), "class_token_offset"),
        (lambda tasks: tasks["object_detection"].update(prompt_token_id=14), "must equal task_token_id=10"),
        (lambda tasks: tasks["instance_segmentation"].update(top_p=1.5), "out of range"),
        (lambda tasks: tasks["instance_segmentation"].update(num_samples=True), "must be of type int"),
        (lambda tasks: tasks["captioning"].update(do_sample="no"), "must be of type bool"),
        (lambda tasks: tasks["captioning"].update(max_new_tokens=1000), "out of range"),
        (lambda tasks: tasks["captioning"].update(eos_token_id=5000), "out of range"),
    ],
)
def test_invalid_task_settings_are_refused(change, message):
    tasks = copy.deepcopy(TINY_MULTITASK_TASKS)
    change(tasks)
    with pytest.raises(ValueError, match=message):
        tiny_multitask_config(tasks=tasks)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"text_token_offset": 1050}, "text_token_offset"),
        ({"text_token_offset": 3100}, "text_token_offset"),
        ({"polygon_separator_token_id": 30}, "Special tokens must differ"),
        ({"invisible_keypoint_token_id": 100}, "class_token_offset"),
        ({"tasks": {}}, "non-empty dict"),
    ],
)
def test_invalid_vocabulary_layout_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_multitask_config(**overrides)


def test_rank_3_teacher_forcing_encodes_each_image_once_for_its_instances(model, pixel_values):
    sequences = boxes_prompt(11, (2, 3))  # (images, instances, length)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=sequences).logits
        # The same rows with every image repeated per instance: rows ordered (image, instance).
        expected = model(
            pixel_values=pixel_values.repeat_interleave(3, dim=0), decoder_input_ids=sequences.flatten(0, 1)
        ).logits
    assert logits.shape == (6, 6, 3100)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # The loss of rank-3 labels is the loss of the flattened rows.
    with torch.no_grad():
        loss = model(pixel_values=pixel_values, decoder_input_ids=sequences, labels=sequences).loss
        flat = model(
            pixel_values=pixel_values.repeat_interleave(3, dim=0),
            decoder_input_ids=sequences.flatten(0, 1),
            labels=sequences.flatten(0, 1),
        )
    assert loss.shape == () and torch.isclose(loss, flat.loss)


def test_captioning_starts_with_its_prompt_and_decodes_greedily_without_the_grammar(model, pixel_values):
    sequences = model.generate(pixel_values, task="captioning")
    assert sequences.shape == (2, 1 + 15)  # the task's max_new_tokens
    assert torch.equal(sequences[:, 0], torch.tensor([13, 13]))
    # Greedy over the whole vocabulary: what teacher forcing on the output puts first, token for token.
    assert torch.equal(sequences[:, 1:], teacher_forced_argmax(model, pixel_values, sequences))


def test_captioning_stops_at_its_end_token(model, pixel_values):
    ending = copy.deepcopy(model)
    with torch.no_grad():
        ending.lm_head.bias[3001] += 100.0
    sequences = ending.generate(pixel_values, task="captioning")
    assert sequences.tolist() == [[13, 3001], [13, 3001]]
    # The call wins over the task's settings.
    assert ending.generate(pixel_values, task="captioning", eos_token_id=None, max_new_tokens=4).shape == (2, 5)


def test_a_task_samples_with_its_own_top_p(pixel_values):
    tasks = copy.deepcopy(TINY_MULTITASK_TASKS)
    tasks["keypoint_detection"]["top_p"] = 1e-6  # keeps only the most likely token: sampling is then greedy
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_multitask_config(tasks=tasks)).eval()
    prompts = boxes_prompt(12, (2,))
    greedy = model.generate(pixel_values, task="keypoint_detection", decoder_input_ids=prompts, do_sample=False)
    sampled = model.generate(pixel_values, task="keypoint_detection", decoder_input_ids=prompts)
    assert greedy.shape == (2, 6 + 8)
    assert torch.equal(sampled, greedy)
    unfiltered = model.generate(pixel_values, task="keypoint_detection", decoder_input_ids=prompts, top_p=1.0)
    assert not torch.equal(unfiltered, greedy)


def test_rank_3_prompts_and_samples_give_rows_ordered_image_instance_sample(model, pixel_values):
    prompts = boxes_prompt(11, (2, 2))
    prompts[1, 1] = 0  # an empty slot, as the official evaluation pads images with fewer objects
    sequences = model.generate(
        pixel_values, task="instance_segmentation", decoder_input_ids=prompts, num_samples=2, do_sample=False
    )
    assert sequences.shape == (2 * 2 * 2, 6 + 12)
    expected_prompts = prompts.flatten(0, 1).repeat_interleave(2, dim=0)
    assert torch.equal(sequences[:, :6], expected_prompts)
    # Each row decodes its own prompt on its own image.
    images = pixel_values.repeat_interleave(4, dim=0)
    assert torch.equal(sequences[:, 6:], teacher_forced_argmax(model, images, sequences)[:, 5:])
    assert not torch.equal(sequences[0], sequences[2])


def test_given_prompts_are_used_as_they_are(model, pixel_values):
    """Even where no row starts with the task's prompt token (only empty slots), nothing is put in front."""
    empty = torch.zeros(2, 1, 6, dtype=torch.long)
    sequences = model.generate(pixel_values, task="instance_segmentation", decoder_input_ids=empty, num_samples=1)
    assert sequences.shape == (2, 6 + 12) and torch.equal(sequences[:, :6], empty[:, 0])


def test_a_task_decodes_its_default_number_of_samples(model, pixel_values):
    prompts = boxes_prompt(11, (2, 2))
    output = model.detect(pixel_values, task="instance_segmentation", decoder_input_ids=prompts)
    assert output.sequences.shape == (2 * 2 * 3, 12)  # 3 samples, the prompt removed
    assert output.logits.shape == (12, 12, 3100)
    # Sampled, from the fixed seed: the samples of one prompt differ, and a second call repeats the first.
    assert not torch.equal(output.sequences[0], output.sequences[1])
    again = model.detect(pixel_values, task="instance_segmentation", decoder_input_ids=prompts)
    assert torch.equal(again.sequences, output.sequences)


def test_detection_on_a_multi_task_model_decodes_as_on_a_detection_model(model, pixel_values):
    """`forward(pixel_values)` (the pipeline's call) and `task="object_detection"` use the generation config."""
    plain = Pix2SeqForObjectDetection(tiny_config(vocab_size=3100)).eval()
    plain.load_state_dict(model.state_dict())
    multi = copy.deepcopy(model)
    for each in (plain, multi):  # the official detection decoding, as a converted folder saves it
        each.generation_config.update(do_sample=True, top_p=0.4, top_k=0, max_new_tokens=10)
        each.generation_config.use_grammar = False
    expected = plain(pixel_values=pixel_values)
    for output in (multi(pixel_values=pixel_values), multi.detect(pixel_values, task="object_detection")):
        assert torch.equal(output.sequences, expected.sequences)
        torch.testing.assert_close(output.logits, expected.logits)
    assert expected.sequences.shape == (2, 10)
    # The prompt 10 is the generation config's start token, whatever tasks the config lists.
    sequences = multi.generate(pixel_values, do_sample=False)
    assert torch.equal(sequences[:, 0], torch.tensor([10, 10]))
    assert torch.equal(sequences[:, 1:], teacher_forced_argmax(multi, pixel_values, sequences))


def test_a_detection_model_has_only_the_detection_task(pixel_values):
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"task='captioning' is not a task of this model.*object_detection"):
        model.generate(pixel_values, task="captioning")
    assert model.generate(pixel_values, task="object_detection", max_new_tokens=5).shape == (2, 6)


def test_prompts_of_the_wrong_shape_or_too_long_are_refused(model, pixel_values):
    with pytest.raises(ValueError, match="batch_size=2 images"):
        model.generate(pixel_values, task="keypoint_detection", decoder_input_ids=boxes_prompt(12, (3,)))
    with pytest.raises(ValueError, match="batch_size=2 images"):
        model.generate(pixel_values, task="keypoint_detection", decoder_input_ids=torch.full((2,), 12))
    # 30 prompt tokens and 8 new ones do not fit in 32 positions.
    with pytest.raises(ValueError, match="after a prompt of 30"):
        model.generate(pixel_values, task="keypoint_detection", decoder_input_ids=torch.full((2, 30), 12))
    with pytest.raises(ValueError, match="use_grammar=True"):
        model.generate(pixel_values, task="captioning", use_grammar=True)
    with pytest.raises(ValueError, match="num_samples"):
        model.generate(pixel_values, task="captioning", num_samples=0)
