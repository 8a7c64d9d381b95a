"""The numpy checkpoint reader returns exactly what TensorFlow's own reader returns."""

import json

import numpy as np
import pytest
from testing_utils import TF_FIXTURES_DIR, require_shared

from conversion.tf_checkpoint_reader import CheckpointFormatError, TFCheckpointReader


def variables_listing(path):
    """`{key: shape}` of a fixture's `*_variables.txt` (`name<TAB>[shape]` lines)."""
    lines = require_shared(path).read_text().splitlines()
    return {name: tuple(json.loads(shape)) for name, shape in (line.split("\t") for line in lines if line)}


@pytest.mark.parametrize("variant", ["resnet", "resnet_odd", "resnet_c4", "vit"])
def test_reader_returns_every_tensor_bit_for_bit_as_tensorflow(variant):
    expected = np.load(require_shared(TF_FIXTURES_DIR / f"{variant}_tf_variables.npz"))
    reader = TFCheckpointReader(TF_FIXTURES_DIR / variant / "ckpt-1")
    assert reader.keys() == sorted(expected.files)
    for key in expected.files:
        value = reader.read(key)
        assert value.dtype == expected[key].dtype and value.shape == expected[key].shape, key
        assert value.tobytes() == expected[key].tobytes(), key


@pytest.mark.parametrize("variant", ["resnet", "resnet_odd", "resnet_c4", "vit", "resnet_c4_fullwidth"])
def test_reader_lists_the_keys_and_shapes_of_the_official_listing(variant):
    listing = variables_listing(TF_FIXTURES_DIR / f"{variant}_variables.txt")
    reader = TFCheckpointReader(TF_FIXTURES_DIR / variant / "ckpt-1")
    assert {key: reader.shape(key) for key in reader.keys()} == listing


def test_reader_rejects_a_file_that_is_not_a_checkpoint_index(tmp_path):
    (tmp_path / "ckpt-1.index").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointFormatError, match="bad table magic"):
        TFCheckpointReader(tmp_path / "ckpt-1")


def test_reader_names_the_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt-7.index"):
        TFCheckpointReader(tmp_path / "ckpt-7")


def test_a_truncated_data_shard_fails_naming_the_file_and_the_tensor(tmp_path):
    source = require_shared(TF_FIXTURES_DIR / "vit")
    for name in ("ckpt-1.index", "checkpoint"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    shard = "ckpt-1.data-00000-of-00001"
    (tmp_path / shard).write_bytes((source / shard).read_bytes()[:100_000])
    reader = TFCheckpointReader(tmp_path / "ckpt-1")
    with pytest.raises(CheckpointFormatError, match=rf"{shard} ends before"):
        for key in reader.keys():
            reader.read(key)
