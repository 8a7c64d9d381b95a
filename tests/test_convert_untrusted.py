"""A checkpoint from anywhere is untrusted: every malformed, corrupted, hostile or mistaken input ends in one message
naming the file, tensor or setting at fault (exit status 1, no traceback), before anything beyond what the
checkpoint's own sizes justify is allocated, and without writing into the source folder."""

import json
import os
import random
import resource
import threading

import pytest
from testing_utils import TF_FIXTURES_DIR, require_shared

import convert_pix2seq_tf_checkpoint as converter
from conversion.tf_checkpoint_reader import (
    CheckpointFormatError,
    TFCheckpointReader,
    iterate_block,
    masked_crc32c,
    read_handle,
)


VARIANT = "vit"
SHARD = "ckpt-1.data-00000-of-00001"
PROJ_KERNEL = "model/proj/kernel/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture
def folder(tmp_path):
    """A writable copy of the ViT fixture with its 2022 `config.json`."""
    source = require_shared(TF_FIXTURES_DIR / VARIANT)
    destination = tmp_path / "run"
    destination.mkdir()
    for name in ("ckpt-1.index", SHARD, "checkpoint"):
        (destination / name).write_bytes((source / name).read_bytes())
    (destination / "config.json").write_bytes((source / "config_2022.json").read_bytes())
    return destination


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def run_cli(capsys, *args):
    """`(exit status, stderr)` of the command line run in this process."""
    try:
        converter.main([str(arg) for arg in args])
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def refused(capsys, folder, tmp_path, *extra):
    """Runs the conversion of `folder`; asserts one message (no traceback), status 1, no output; returns the message."""
    code, stderr = run_cli(capsys, "--checkpoint_dir", folder, "--output_dir", tmp_path / "out", *extra)
    assert code == 1 and "Traceback" not in stderr, stderr
    assert not (tmp_path / "out").exists()
    return stderr.split("error: ", 1)[1]


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if the converter builds a model, even on the meta device."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the config was compared with the checkpoint")

    monkeypatch.setattr(converter, "Pix2SeqForObjectDetection", forbidden)


# What the weights cannot show.


def test_a_wrong_encoder_head_count_is_refused_naming_it(capsys, folder, tmp_path):
    edit_config(folder, lambda config: config["model"].update(num_heads=8))
    message = refused(capsys, folder, tmp_path)
    assert "model.num_heads=8, but the checkpoint has 4 attention heads" in message and "enc_layers/0/mha" in message


def test_a_wrong_decoder_head_count_is_refused_naming_it(capsys, folder, tmp_path):
    edit_config(folder, lambda config: config["model"].update(num_heads_dec=2))
    assert "model.num_heads_dec=2, but the checkpoint has 4 attention heads" in refused(capsys, folder, tmp_path)


def test_a_task_other_than_detection_is_refused_naming_it(capsys, folder, tmp_path):
    def segmentation(config):
        config["task"].update(name="instance_segmentation", vocab_id=11)
        config["tasks"] = [config["task"]]

    edit_config(folder, segmentation)
    message = refused(capsys, folder, tmp_path)
    assert "'instance_segmentation' (prompt 11), not 'object_detection'" in message


def test_mlp_widths_follow_the_official_whole_number_ratio(folder, tmp_path):
    # 200 // 48 = 4 and 70 // 32 = 2: the official model builds MLPs of 192 and 64, which are the checkpoint's.
    edit_config(folder, lambda config: config["model"].update(dim_mlp=200, dim_mlp_dec=70))
    model = converter.convert(folder, tmp_path / "out")
    assert model.config.encoder_ffn_dim == 192 and model.config.decoder_ffn_dim == 64
    assert model.model.encoder.output_mlp.fc1.out_features == 32 * 4


def test_an_mlp_narrower_than_its_layer_is_refused_naming_it(capsys, folder, tmp_path):
    edit_config(folder, lambda config: config["model"].update(dim_mlp_dec=16))
    assert "model.dim_mlp_dec=16 is below model.dim_att_dec=32" in refused(capsys, folder, tmp_path)


def test_an_mlp_width_other_than_the_checkpoint_is_refused_naming_it(capsys, folder, tmp_path):
    edit_config(folder, lambda config: config["model"].update(dim_mlp=96))  # ratio 2, the checkpoint's is 4
    assert "model.dim_mlp=96, but the checkpoint has an MLP of shape (48, 192)" in refused(capsys, folder, tmp_path)


def test_a_folder_without_config_asks_for_one_and_config_gives_it(capsys, folder, tmp_path):
    config = folder / "config.json"
    given = tmp_path / "run_config.json"
    given.write_bytes(config.read_bytes())
    config.unlink()
    message = refused(capsys, folder, tmp_path)
    assert f"{config} does not exist" in message and "--config FILE" in message
    code, stderr = run_cli(capsys, "--checkpoint_dir", folder, "--output_dir", tmp_path / "out", "--config", given)
    assert code == 0, stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and not config.exists()


# Item 7: the probes of a careless or hostile user.


def test_flipped_bytes_in_a_shard_fail_the_tensor_checksum(capsys, folder, tmp_path):
    data = bytearray((folder / SHARD).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / SHARD).write_bytes(bytes(data))
    message = refused(capsys, folder, tmp_path)
    assert "fails its crc32c checksum" in message and SHARD in message


def test_a_shard_that_is_a_device_is_refused(capsys, folder, tmp_path):
    (folder / SHARD).unlink()
    (folder / SHARD).symlink_to("/dev/zero")
    assert f"{folder / SHARD} is not a regular file" in refused(capsys, folder, tmp_path)


def test_a_shard_that_is_a_fifo_is_refused_without_blocking(capsys, folder, tmp_path):
    (folder / SHARD).unlink()
    os.mkfifo(folder / SHARD)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=refused(capsys, folder, tmp_path)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        os.open(folder / SHARD, os.O_WRONLY | os.O_NONBLOCK)  # releases a reader blocked on the FIFO
        pytest.fail("the converter blocked on a FIFO")
    assert "is not a regular file" in outcome["result"]


def table_blocks(index):
    """`[(offset, size)]` of the index's data blocks, read with the reader's own parsing."""
    footer = index[-48:]
    _, position = read_handle(footer)
    (offset, size), _ = read_handle(footer, position)
    return [read_handle(handle)[0] for _, handle in iterate_block(index[offset : offset + size])]


def with_valid_block_checksums(index):
    """`index` with every data block's crc32c recomputed: a forged index that passes the block checks."""
    index = bytearray(index)
    for offset, size in table_blocks(bytes(index)):
        index[offset + size + 1 : offset + size + 5] = masked_crc32c(
            bytes(index[offset : offset + size + 1])
        ).to_bytes(4, "little")
    return bytes(index)


def entry_position(index, key):
    """Offset in `index` of the `BundleEntryProto` of `key` (blocks store keys without shared prefixes at restarts)."""
    for offset, size in table_blocks(index):
        block = index[offset : offset + size]
        for name, value in iterate_block(block):
            if name.decode() == key:
                return offset + block.index(value)
    raise KeyError(key)


def test_a_changed_dtype_field_fails_the_index_checksum_and_forged_is_refused_as_not_float32(capsys, folder, tmp_path):
    index = (folder / "ckpt-1.index").read_bytes()
    position = entry_position(index, PROJ_KERNEL)
    assert index[position : position + 2] == b"\x08\x01"  # dtype: DT_FLOAT
    changed = index[: position + 1] + b"\x03" + index[position + 2 :]  # DT_INT32: same size, 1e9-like values
    (folder / "ckpt-1.index").write_bytes(changed)
    assert "fails its crc32c checksum" in refused(capsys, folder, tmp_path)
    (folder / "ckpt-1.index").write_bytes(with_valid_block_checksums(changed))
    assert f"Tensor '{PROJ_KERNEL}' is int32 in the checkpoint; weights are float32" in refused(
        capsys, folder, tmp_path
    )


def forge_entry(folder, key, replace):
    """Rewrites one field's bytes of `key`'s entry in place and fixes the block checksums: an index that parses."""
    index = (folder / "ckpt-1.index").read_bytes()
    position = entry_position(index, key)
    old, new = replace
    end = index.index(old, position)
    (folder / "ckpt-1.index").write_bytes(with_valid_block_checksums(index[:end] + new + index[end + len(old) :]))


def test_a_gigantic_shape_is_refused_naming_the_tensor(capsys, folder, tmp_path):
    # The kernel's TF shape (48, 32) is `12 02 08 30 | 12 02 08 20`; the same 8 bytes can say (2**35 - 1,): a shape
    # that no size matches and no memory holds.
    forge_entry(folder, PROJ_KERNEL, (b"\x12\x02\x08\x30\x12\x02\x08\x20", b"\x12\x06\x08\xff\xff\xff\xff\x7f"))
    message = refused(capsys, folder, tmp_path)
    assert PROJ_KERNEL in message and "is 6144 bytes, but shape (34359738367,) of float32" in message


def test_an_empty_tensor_with_a_gigantic_dimension_is_refused():
    # Shape (0, 2**62): zero bytes, so its size agrees, but no shape comparison or meta tensor should see it.
    def varint(value):
        out = bytearray()
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out + bytes([value]))

    dims = b"\x12\x02\x08\x00" + b"\x12" + varint(len(varint(2**62)) + 1) + b"\x08" + varint(2**62)
    entry = b"\x08\x01\x12" + varint(len(dims)) + dims + b"\x28\x00"
    with pytest.raises(CheckpointFormatError, match=r"tensor 'x' has the impossible shape \(0, 4611686018427387904\)"):
        TFCheckpointReader._parse_entry("x", entry)


def test_tensors_beyond_the_shard_are_refused_before_any_model_is_built(capsys, folder, tmp_path, no_model_built):
    data = (folder / SHARD).read_bytes()
    (folder / SHARD).write_bytes(data[: len(data) // 2])
    message = refused(capsys, folder, tmp_path)
    assert f"{SHARD} ends before its" in message and "a truncated download?" in message


def test_config_sizes_beyond_the_checkpoint_are_refused_before_any_model_is_built(
    capsys, folder, tmp_path, no_model_built
):
    edit_config(folder, lambda config: config["model"].update(vocab_size=20_000_000))
    assert "model.vocab_size=20000000, but the checkpoint has 1200" in refused(capsys, folder, tmp_path)
    edit_config(folder, lambda config: config["model"].update(vocab_size=1200, num_decoder_layers=100_000))
    assert "model.num_decoder_layers=100000, but the checkpoint has 2 decoder layers" in refused(
        capsys, folder, tmp_path
    )


def test_an_absurd_image_size_is_refused(capsys, folder, tmp_path, no_model_built):
    edit_config(folder, lambda config: config["model"].update(image_size=1_000_000))
    assert "model.image_size=1000000 is outside 1..4096 px" in refused(capsys, folder, tmp_path)


def test_a_2_gb_index_is_refused_without_reading_it_whole(capsys, folder, tmp_path):
    index = folder / "ckpt-1.index"
    footer = index.read_bytes()[-48:]
    with open(index, "wb") as file:  # sparse: 2 GB of zeros, then the real footer
        file.truncate(2 << 30)
        file.seek((2 << 30) - 48)
        file.write(footer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = refused(capsys, folder, tmp_path)
    assert f"{index} is not a valid TF checkpoint index" in message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_random_byte_mutations_of_the_index_are_refused_or_harmless(folder):
    index = folder / "ckpt-1.index"
    original = index.read_bytes()
    expected = TFCheckpointReader(folder / "ckpt-1").entries
    generator = random.Random(0)
    refusals = 0
    for _ in range(400):
        data = bytearray(original)
        for _ in range(generator.randint(1, 3)):
            data[generator.randrange(len(data))] = generator.randrange(256)
        index.write_bytes(bytes(data))
        try:
            entries = TFCheckpointReader(folder / "ckpt-1").entries
        except CheckpointFormatError as error:
            assert str(index) in str(error)
            refusals += 1
            continue
        assert entries == expected  # a byte that changes nothing (footer padding, an unused restart) is harmless
    assert refusals > 300


def test_a_checkpoint_file_naming_a_path_outside_the_folder_is_refused(capsys, folder, tmp_path):
    for name in (".", "..", "../", "/"):
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "{name}"\n')
        assert f"names the checkpoint {name!r}, which is not a checkpoint file name" in refused(
            capsys, folder, tmp_path
        )
    # A path from the training machine names a file of this folder.
    for name in ("/somewhere/else/ckpt-1", "../run/ckpt-1"):
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "{name}"\n')
        assert converter.checkpoint_prefix(folder) == folder / "ckpt-1"


def test_an_existing_output_folder_is_refused_unless_overwrite_output_dir(capsys, folder, tmp_path):
    output = tmp_path / "out"
    converter.convert(folder, output)
    code, stderr = run_cli(capsys, "--checkpoint_dir", folder, "--output_dir", output)
    assert code == 1 and f"--output_dir {output} already exists and is not empty" in stderr
    code, stderr = run_cli(capsys, "--checkpoint_dir", folder, "--output_dir", output, "--overwrite_output_dir")
    assert code == 0, stderr


def test_the_checkpoint_folder_is_never_the_output(capsys, folder, tmp_path):
    config = (folder / "config.json").read_bytes()
    for output in (folder, folder / "converted"):
        code, stderr = run_cli(capsys, "--checkpoint_dir", folder, "--output_dir", output, "--overwrite_output_dir")
        assert code == 1 and "the converter never writes there" in stderr
    assert (folder / "config.json").read_bytes() == config and not (folder / "converted").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "is not an official Pix2Seq run configuration"),
        ('{"task": {}}', "is not an official Pix2Seq run configuration"),
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ],
)
def test_a_config_that_is_not_a_run_configuration_is_refused_naming_the_file(
    capsys, folder, tmp_path, content, message
):
    (folder / "config.json").write_text(content)
    stderr = refused(capsys, folder, tmp_path)
    assert str(folder / "config.json") in stderr and message in stderr


def test_debug_shows_the_traceback(folder, tmp_path):
    edit_config(folder, lambda config: config["model"].update(num_heads=8))
    with pytest.raises(converter.ConversionError, match="num_heads=8"):
        converter.main(["--checkpoint_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--debug"])


def test_push_to_hub_publishes_the_converted_folder(monkeypatch, folder, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.append(repo_id))
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kwargs: calls.append(sorted(os.listdir(kwargs["folder_path"]))),
    )
    converter.main(
        ["--checkpoint_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--push_to_hub", "me/pix2seq"]
    )
    assert calls[0] == "me/pix2seq" and {"README.md", "model.safetensors", "config.json"} <= set(calls[1])


def test_push_to_hub_offline_is_refused_before_converting(capsys, folder, tmp_path):
    message = refused(capsys, folder, tmp_path, "--push_to_hub", "me/pix2seq")
    assert "--push_to_hub me/pix2seq needs the network, but HF_HUB_OFFLINE is set" in message
