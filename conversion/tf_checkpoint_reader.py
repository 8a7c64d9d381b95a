"""Reads TensorFlow (TF2 "tensor bundle") checkpoints with numpy alone, treating the files as untrusted.

A checkpoint `PREFIX` is `PREFIX.index`, a sorted string table that maps every tensor name to a `BundleEntryProto`
(dtype, shape, shard, offset, size, crc32c), and `PREFIX.data-NNNNN-of-MMMMM`, the shards holding the raw
little-endian tensor bytes. The table is read once when the reader opens; a tensor's bytes are read only when it is
asked for, and checked against the crc32c stored for it.

Nothing is taken on trust: only regular files are opened (a FIFO or a device is refused before it can block or feed
endless bytes), every table block is checked against its crc32c before it is parsed, every entry's shape and size
must agree with each other and fit within its shard, and anything malformed raises `CheckpointFormatError` naming
the file and the tensor. Used by `convert_pix2seq_tf_checkpoint.py`; not part of the model's remote code.
"""

import os
import re
import stat
import struct
from pathlib import Path

import crc32c
import numpy as np


TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
NO_COMPRESSION = 0
# Checkpoints store crc32c values "masked" (rotated and offset), as LevelDB does, so that a checksum of data that
# holds checksums stays meaningful.
CRC_MASK_DELTA = 0xA282EAD8
# Bounds far above any Pix2Seq checkpoint (the full-size ones have one shard and dimensions below 2**16).
MAX_SHARDS = 4096
MAX_DIMENSION = 2**40
MAX_STATE_FILE_SIZE = 1 << 20
# A checkpoint's file-name prefix (`ckpt-74844`): no folder part, no `.` or `..`.
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

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
    """The files are not a valid TF2 tensor-bundle checkpoint, or hold something this reader does not decode."""


def mask(crc):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data):
    return mask(crc32c.crc32c(data))


def open_regular_file(path):
    """
    `path` opened for binary reading, refused unless it is a regular file (after following links). The non-blocking
    open returns at once on a FIFO, so that the type check comes before any read could wait forever.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise CheckpointFormatError(f"Cannot open {path}: {error.strerror}.") from error
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise CheckpointFormatError(f"{path} is not a regular file.")
    return os.fdopen(descriptor, "rb")


def checkpoint_name(value, source):
    """The file name of the checkpoint `value` (a name or a path, as a `checkpoint` file may hold) named in `source`."""
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointFormatError(
            f"{source} names the checkpoint {value!r}, which is not a checkpoint file name such as 'ckpt-1'."
        )
    return name


def latest_checkpoint_name(state_path):
    """The latest step's name (`ckpt-N`) in a checkpoint folder's `checkpoint` state file."""
    with open_regular_file(state_path) as state_file:
        data = state_file.read(MAX_STATE_FILE_SIZE + 1)
    if len(data) > MAX_STATE_FILE_SIZE:
        raise CheckpointFormatError(f"{state_path} is larger than a checkpoint state file.")
    match = re.search(rb'^model_checkpoint_path:\s*"([^"\n]*)"', data, flags=re.MULTILINE)
    if match is None:
        raise CheckpointFormatError(f"{state_path} names no model_checkpoint_path.")
    return checkpoint_name(match[1].decode("utf-8", errors="replace"), state_path)


def read_varint(buffer, position, end=None):
    """Decodes a protobuf/LevelDB varint (at most 64 bits) at `position`; returns it and the position after it."""
    end = len(buffer) if end is None else end
    value = 0
    for shift in range(0, 64, 7):
        if position >= end:
            raise CheckpointFormatError("a varint runs past the end of its record")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
    raise CheckpointFormatError("a varint is longer than 64 bits")


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
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if position + width > len(buffer):
                raise CheckpointFormatError(f"field {number} runs past the end of its message")
            value = int.from_bytes(buffer[position : position + width], "little")
            position += width
        elif wire_type == 2:
            length, position = read_varint(buffer, position)
            if position + length > len(buffer):
                raise CheckpointFormatError(f"field {number} runs past the end of its message")
            value, position = bytes(buffer[position : position + length]), position + length
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire_type} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def read_handle(buffer, position=0):
    offset, position = read_varint(buffer, position)
    size, position = read_varint(buffer, position)
    return (offset, size), position


def iterate_block(block):
    """`(key, value)` pairs of a table block; keys share prefixes with the key before them."""
    if len(block) < 4:
        raise CheckpointFormatError("a table block is shorter than its restart count")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise CheckpointFormatError("a table block's restart array is larger than the block")
    position, key = 0, b""
    while position < end:
        shared, position = read_varint(block, position, end)
        unshared, position = read_varint(block, position, end)
        value_length, position = read_varint(block, position, end)
        if shared > len(key) or position + unshared + value_length > end:
            raise CheckpointFormatError("a table entry runs past the end of its block")
        key = key[:shared] + block[position : position + unshared]
        position += unshared
        yield key, block[position : position + value_length]
        position += value_length


class TFCheckpointReader:
    """
    Names, dtypes and shapes of every tensor of a TF2 checkpoint, and their values on demand, crc32c-checked.

    Args:
        prefix (`str` or `Path`): the checkpoint path without suffix, e.g. `folder/ckpt-1` for `folder/ckpt-1.index`.
    """

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        self.index_path = self.prefix.with_name(self.prefix.name + ".index")
        if not self.index_path.exists():
            raise FileNotFoundError(f"No checkpoint index {self.index_path}.")
        with open_regular_file(self.index_path) as index_file:
            try:
                entries = self._read_table(index_file)
                header = parse_protobuf(entries.pop("", b""))
                self.entries = {name: self._parse_entry(name, value) for name, value in entries.items()}
            except CheckpointFormatError as error:
                raise CheckpointFormatError(
                    f"{self.index_path} is not a valid TF checkpoint index: {error}."
                ) from None
        self.num_shards = header.get(1, [1])[0]
        if not isinstance(self.num_shards, int) or not 1 <= self.num_shards <= MAX_SHARDS:
            raise CheckpointFormatError(f"{self.index_path} gives {self.num_shards} data shards; 1 to {MAX_SHARDS}.")
        if header.get(2, [0])[0] != 0:
            raise CheckpointFormatError(f"{self.index_path} was written big-endian; only little-endian is supported.")
        for name, entry in self.entries.items():
            if entry["shard"] >= self.num_shards:
                raise CheckpointFormatError(
                    f"Tensor {name!r} lives in shard {entry['shard']}, but {self.index_path} has {self.num_shards}."
                )
        self._shard_sizes = {}

    def _read_table(self, index_file):
        """`{key: value}` of the index table, each block read alone and checked against its crc32c first."""
        size = os.fstat(index_file.fileno()).st_size
        if size < FOOTER_SIZE:
            raise CheckpointFormatError("shorter than a table footer")
        index_file.seek(size - FOOTER_SIZE)
        footer = index_file.read(FOOTER_SIZE)
        if struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)[0] != TABLE_MAGIC:
            raise CheckpointFormatError("bad table magic")
        _, position = read_handle(footer)  # the metaindex block, which bundles leave empty
        index_handle, _ = read_handle(footer, position)

        def read_block(handle):
            offset, length = handle
            if offset + length + BLOCK_TRAILER_SIZE > size - FOOTER_SIZE:
                raise CheckpointFormatError(f"a block handle ({offset}, {length}) points past the end of the file")
            index_file.seek(offset)
            data = index_file.read(length + BLOCK_TRAILER_SIZE)
            block, compression = data[:length], data[length]
            if masked_crc32c(data[: length + 1]) != int.from_bytes(data[length + 1 :], "little"):
                raise CheckpointFormatError(f"the block at offset {offset} fails its crc32c checksum")
            # TensorFlow writes bundle indexes uncompressed (LevelDB tables could use snappy, type 1).
            if compression != NO_COMPRESSION:
                raise CheckpointFormatError(f"the block at offset {offset} is compressed (type {compression})")
            return block

        entries = {}
        for _, block_handle in iterate_block(read_block(index_handle)):
            for key, value in iterate_block(read_block(read_handle(block_handle)[0])):
                try:
                    entries[key.decode("utf-8")] = value
                except UnicodeDecodeError:
                    raise CheckpointFormatError(f"the key {key[:80]!r} is not UTF-8") from None
        return entries

    @staticmethod
    def _parse_entry(name, value):
        try:
            fields = parse_protobuf(value)
            if 7 in fields:
                raise CheckpointFormatError("stored in slices, which this reader does not assemble")
            dims = parse_protobuf(fields.get(2, [b""])[0]).get(2, [])
            shape = tuple(parse_protobuf(dim).get(1, [0])[0] for dim in dims)
        except (CheckpointFormatError, TypeError) as error:
            raise CheckpointFormatError(f"tensor {name!r}: {error}") from None
        if any(isinstance(dim, bytes) or not 0 <= dim <= MAX_DIMENSION for dim in shape):
            raise CheckpointFormatError(f"tensor {name!r} has the impossible shape {shape}")
        entry = {
            "dtype": fields.get(1, [0])[0],
            "shape": shape,
            "shard": fields.get(3, [0])[0],
            "offset": fields.get(4, [0])[0],
            "size": fields.get(5, [0])[0],
            "crc32c": fields.get(6, [None])[0],
        }
        if any(not isinstance(entry[field], int) for field in ("dtype", "shard", "offset", "size")):
            raise CheckpointFormatError(f"tensor {name!r} has a malformed entry")
        if entry["dtype"] != DT_STRING:
            if entry["dtype"] not in NUMPY_DTYPES:
                raise CheckpointFormatError(f"tensor {name!r} has TF dtype {entry['dtype']}, which is not decoded")
            expected = int(np.prod(shape, dtype=object)) * NUMPY_DTYPES[entry["dtype"]].itemsize
            if expected != entry["size"]:
                raise CheckpointFormatError(
                    f"tensor {name!r} is {entry['size']} bytes, but shape {shape} of "
                    f"{NUMPY_DTYPES[entry['dtype']]} is {expected}"
                )
        return entry

    def __contains__(self, name):
        return name in self.entries

    def __len__(self):
        return len(self.entries)

    def keys(self):
        return sorted(self.entries)

    def shape(self, name):
        return self.entries[name]["shape"]

    def dtype(self, name):
        """The tensor's numpy dtype, or `object` for strings."""
        return NUMPY_DTYPES.get(self.entries[name]["dtype"], np.dtype(object))

    def shard_path(self, shard):
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def check_shards(self, names=None):
        """
        Checks that the data shards are regular files long enough for every tensor in `names` (default: all),
        without reading them, so that sizes are checked against the files before anything is allocated.
        """
        for name in self.keys() if names is None else names:
            entry = self.entries[name]
            path = self.shard_path(entry["shard"])
            if entry["shard"] not in self._shard_sizes:
                if not path.exists():
                    raise CheckpointFormatError(f"Data shard {path} is missing.")
                with open_regular_file(path) as shard:
                    self._shard_sizes[entry["shard"]] = os.fstat(shard.fileno()).st_size
            if entry["offset"] + entry["size"] > self._shard_sizes[entry["shard"]]:
                raise CheckpointFormatError(
                    f"Tensor {name!r}: {path} ends before its {entry['size']} bytes at offset {entry['offset']} "
                    "(a truncated download?)."
                )

    def read(self, name):
        """The tensor `name` as a numpy array (strings as a `bytes` array), checked against its crc32c."""
        self.check_shards([name])
        entry = self.entries[name]
        path = self.shard_path(entry["shard"])
        with open_regular_file(path) as shard:
            shard.seek(entry["offset"])
            data = shard.read(entry["size"])
        if len(data) != entry["size"]:
            raise CheckpointFormatError(f"Tensor {name!r}: {path} ends before its {entry['size']} bytes.")
        strings = self._decode_strings(name, data, entry["shape"]) if entry["dtype"] == DT_STRING else None
        if entry["crc32c"] is not None and self._checksum(data, strings) != entry["crc32c"]:
            raise CheckpointFormatError(
                f"Tensor {name!r} in {path} fails its crc32c checksum: the shard is corrupted or does not belong to "
                f"{self.index_path}."
            )
        if strings is not None:
            return strings
        dtype = NUMPY_DTYPES[entry["dtype"]]
        return np.frombuffer(data, dtype=dtype).reshape(entry["shape"]).astype(dtype.newbyteorder("="))

    @staticmethod
    def _checksum(data, strings):
        if strings is None:
            return masked_crc32c(data)
        # A string tensor's checksum covers each length (4 little-endian bytes, 8 from 4 GiB on), then the stored
        # 4-byte checksum of the lengths, then the strings.
        values = strings.reshape(-1)
        lengths = b"".join(len(value).to_bytes(4 if len(value) < 2**32 else 8, "little") for value in values)
        lengths_checksum = data[len(data) - sum(map(len, values)) - 4 :][:4]
        return mask(crc32c.crc32c(b"".join(values), crc32c.crc32c(lengths_checksum, crc32c.crc32c(lengths))))

    @staticmethod
    def _decode_strings(name, data, shape):
        # All lengths as varints, a 4-byte checksum of them, then the strings back to back.
        count = int(np.prod(shape, dtype=object))
        if count > len(data):
            raise CheckpointFormatError(f"String tensor {name!r}: {count} strings cannot fit in {len(data)} bytes.")
        try:
            lengths, position = [], 0
            for _ in range(count):
                length, position = read_varint(data, position)
                lengths.append(length)
        except CheckpointFormatError as error:
            raise CheckpointFormatError(f"String tensor {name!r}: {error}.") from None
        position += 4
        if position + sum(lengths) != len(data):
            raise CheckpointFormatError(f"String tensor {name!r}: its lengths do not add up to its size.")
        strings = []
        for length in lengths:
            strings.append(data[position : position + length])
            position += length
        return np.array(strings, dtype=object).reshape(shape).astype(bytes)
