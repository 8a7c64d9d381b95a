"""Reads TensorFlow (TF2 "tensor bundle") checkpoints with numpy alone.

A checkpoint `PREFIX` is `PREFIX.index`, a sorted string table that maps every tensor name to a `BundleEntryProto`
(dtype, shape, shard, offset, size), and `PREFIX.data-NNNNN-of-MMMMM`, the shards holding the raw little-endian
tensor bytes. The table is read once when the reader opens; a tensor's bytes are read only when it is asked for.
Used by `convert_pix2seq_tf_checkpoint.py`; not part of the model's remote code.
"""

import struct
from pathlib import Path

import numpy as np


TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + crc32c
NO_COMPRESSION = 0

# TensorFlow `DataType` enum values and their numpy dtypes (little-endian).
NUMPY_DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
DT_STRING = 7


class CheckpointFormatError(ValueError):
    """The files are not a TF2 tensor-bundle checkpoint, or hold something this reader does not decode."""


def read_varint(buffer, position):
    """Decodes a protobuf/LevelDB varint at `position`; returns it and the position after it."""
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def parse_protobuf(buffer):
    """
    The fields of one protobuf message as `{field_number: [values]}`: varints as ints, fixed-width fields as their
    raw little-endian ints, length-delimited fields (strings, sub-messages, packed arrays) as bytes.
    """
    fields, position = {}, 0
    while position < len(buffer):
        tag, position = read_varint(buffer, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, position = read_varint(buffer, position)
        elif wire_type == 1:
            value, position = struct.unpack_from("<Q", buffer, position)[0], position + 8
        elif wire_type == 2:
            length, position = read_varint(buffer, position)
            value, position = bytes(buffer[position : position + length]), position + length
        elif wire_type == 5:
            value, position = struct.unpack_from("<I", buffer, position)[0], position + 4
        else:
            raise CheckpointFormatError(f"Unsupported protobuf wire type {wire_type} (field {number}).")
        fields.setdefault(number, []).append(value)
    return fields


def read_block(table, handle):
    """The contents of the table block at the `(offset, size)` handle."""
    offset, size = handle
    compression = table[offset + size]
    # TensorFlow writes bundle indexes uncompressed (LevelDB tables could use snappy, type 1).
    if compression != NO_COMPRESSION:
        raise CheckpointFormatError(f"Table block at {offset} is compressed (type {compression}); expected none.")
    return bytes(table[offset : offset + size])


def iterate_block(block):
    """`(key, value)` pairs of a table block; keys share prefixes with the key before them."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 * (num_restarts + 1)
    position, key = 0, b""
    while position < end:
        shared, position = read_varint(block, position)
        unshared, position = read_varint(block, position)
        value_length, position = read_varint(block, position)
        key = key[:shared] + block[position : position + unshared]
        position += unshared
        yield key, block[position : position + value_length]
        position += value_length


def read_handle(buffer, position=0):
    offset, position = read_varint(buffer, position)
    size, position = read_varint(buffer, position)
    return (offset, size), position


class TFCheckpointReader:
    """
    Names, dtypes and shapes of every tensor of a TF2 checkpoint, and their values on demand.

    Args:
        prefix (`str` or `Path`): the checkpoint path without suffix, e.g. `folder/ckpt-1` for `folder/ckpt-1.index`.
    """

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        index_path = self.prefix.with_name(self.prefix.name + ".index")
        if not index_path.is_file():
            raise FileNotFoundError(f"No checkpoint index {index_path}.")
        table = index_path.read_bytes()
        if len(table) < FOOTER_SIZE or struct.unpack_from("<Q", table, len(table) - 8)[0] != TABLE_MAGIC:
            raise CheckpointFormatError(f"{index_path} is not a TF checkpoint index (bad table magic).")
        footer = table[-FOOTER_SIZE:]
        _, position = read_handle(footer)  # the metaindex block, which bundles leave empty
        index_handle, _ = read_handle(footer, position)
        entries = {}
        for _, block_handle in iterate_block(read_block(table, index_handle)):
            for key, value in iterate_block(read_block(table, read_handle(block_handle)[0])):
                entries[key.decode("utf-8")] = value
        header = parse_protobuf(entries.pop("", b""))
        self.num_shards = header.get(1, [1])[0]
        if header.get(2, [0])[0] != 0:
            raise CheckpointFormatError(f"{index_path} was written big-endian; only little-endian is supported.")
        self.entries = {name: self._parse_entry(name, value) for name, value in entries.items()}

    @staticmethod
    def _parse_entry(name, value):
        fields = parse_protobuf(value)
        if 7 in fields:
            raise CheckpointFormatError(f"Tensor {name!r} is stored in slices, which this reader does not assemble.")
        dims = parse_protobuf(fields.get(2, [b""])[0]).get(2, [])
        shape = tuple(parse_protobuf(dim).get(1, [0])[0] for dim in dims)
        return {
            "dtype": fields.get(1, [0])[0],
            "shape": shape,
            "shard": fields.get(3, [0])[0],
            "offset": fields.get(4, [0])[0],
            "size": fields.get(5, [0])[0],
        }

    def __contains__(self, name):
        return name in self.entries

    def __len__(self):
        return len(self.entries)

    def keys(self):
        return sorted(self.entries)

    def shape(self, name):
        return self.entries[name]["shape"]

    def shard_path(self, shard):
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def read(self, name):
        """The tensor `name` as a numpy array (strings as a `bytes` array)."""
        entry = self.entries[name]
        with open(self.shard_path(entry["shard"]), "rb") as shard:
            shard.seek(entry["offset"])
            data = shard.read(entry["size"])
        if len(data) != entry["size"]:
            raise CheckpointFormatError(
                f"Tensor {name!r}: {self.shard_path(entry['shard'])} ends before its {entry['size']} bytes "
                "(a truncated download?)."
            )
        if entry["dtype"] == DT_STRING:
            return self._decode_strings(name, data, entry["shape"])
        if entry["dtype"] not in NUMPY_DTYPES:
            raise CheckpointFormatError(
                f"Tensor {name!r} has TF dtype {entry['dtype']}, which this reader does not decode."
            )
        dtype = NUMPY_DTYPES[entry["dtype"]]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
        if expected != len(data):
            raise CheckpointFormatError(
                f"Tensor {name!r}: {len(data)} bytes for shape {entry['shape']} of {dtype}, {expected} expected."
            )
        return np.frombuffer(data, dtype=dtype).reshape(entry["shape"]).astype(dtype.newbyteorder("="))

    @staticmethod
    def _decode_strings(name, data, shape):
        # All lengths as varints, a 4-byte checksum of them, then the strings back to back.
        count = int(np.prod(shape, dtype=np.int64))
        lengths, position = [], 0
        for _ in range(count):
            length, position = read_varint(data, position)
            lengths.append(length)
        position += 4
        strings = []
        for length in lengths:
            strings.append(data[position : position + length])
            position += length
        if position != len(data):
            raise CheckpointFormatError(f"String tensor {name!r}: {len(data) - position} bytes left over.")
        return np.array(strings, dtype=object).reshape(shape).astype(bytes)
