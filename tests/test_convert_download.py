"""`--checkpoint_dir gs://...` downloads the folder over HTTP(S) and converts it: here against a local server on
127.0.0.1 that serves a fixture folder as the bucket does (`<base_url>/pix2seq/<path>/<file>`, with range requests)."""

import http.server
import json
import re
import threading
from pathlib import Path

import pytest
from testing_utils import TF_FIXTURES_DIR, assert_official_parity, require_shared

import convert_pix2seq_tf_checkpoint as converter
from conversion.bucket_download import BucketFolder, DownloadError


VARIANT = "vit"
FOLDER = "coco_det_finetune/vit_tiny"
URL = f"gs://pix2seq/{FOLDER}"
SHARD = "ckpt-1.data-00000-of-00001"


class Bucket(http.server.ThreadingHTTPServer):
    """Serves `root` as `/pix2seq/...`; logs `(path, Range header)`; `truncate` maps a file name to how many times
    its next full answers stop halfway."""

    def __init__(self, root):
        self.root, self.requests, self.truncate = Path(root), [], {}
        super().__init__(("127.0.0.1", 0), BucketHandler)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class BucketHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.root / self.path.removeprefix("/pix2seq/")
        if not self.path.startswith("/pix2seq/") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start, status = int(match[1]), 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        if server.truncate.get(path.name):
            server.truncate[path.name] -= 1
            body = body[: len(body) // 2]
            self.wfile.write(body)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def bucket(tmp_path):
    source = require_shared(TF_FIXTURES_DIR / VARIANT)
    root = tmp_path / "bucket"
    (root / FOLDER).mkdir(parents=True)
    for name in ("ckpt-1.index", SHARD, "checkpoint"):
        (root / FOLDER / name).write_bytes((source / name).read_bytes())
    (root / FOLDER / "config.json").write_bytes((source / "config_2022.json").read_bytes())
    server = Bucket(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def convert_from(bucket, tmp_path, output="out", *extra):
    return converter.main(
        [
            "--checkpoint_dir",
            URL,
            "--output_dir",
            str(tmp_path / output),
            "--base_url",
            bucket.base_url,
            "--cache_dir",
            str(tmp_path / "cache"),
            *extra,
        ]
    )


def refused(capsys, bucket, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        convert_from(bucket, tmp_path)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
    return stderr


def test_a_bucket_folder_converts_in_one_command_and_a_second_run_downloads_nothing(bucket, tmp_path):
    convert_from(bucket, tmp_path)
    names = [path.rsplit("/", 1)[-1] for path, _ in bucket.requests]
    assert sorted(names) == sorted(["config.json", "checkpoint", "ckpt-1.index", SHARD])  # no listing needed
    model = assert_official_parity(tmp_path / "out", VARIANT)
    assert f"`{URL}/ckpt-1`" in (tmp_path / "out" / "README.md").read_text()
    assert model.config.id2label[1] == "person"
    bucket.requests.clear()
    convert_from(bucket, tmp_path, "again")
    assert bucket.requests == []
    cached = tmp_path / "cache" / "pix2seq" / FOLDER
    assert sorted(path.name for path in cached.iterdir()) == sorted(
        ["config.json", "checkpoint", "ckpt-1.index", SHARD]
    )


def test_an_interrupted_download_is_resumed_and_never_used_half_written(bucket, tmp_path):
    bucket.truncate[SHARD] = 1
    convert_from(bucket, tmp_path)
    shard_requests = [header for path, header in bucket.requests if path.endswith(SHARD)]
    size = (bucket.root / FOLDER / SHARD).stat().st_size
    assert shard_requests == [None, f"bytes={size // 2}-"]
    assert (tmp_path / "cache" / "pix2seq" / FOLDER / SHARD).read_bytes() == (
        bucket.root / FOLDER / SHARD
    ).read_bytes()


def test_a_download_that_keeps_failing_is_refused_and_leaves_only_the_partial_file(capsys, bucket, tmp_path):
    bucket.truncate[SHARD] = 10
    assert "could not be downloaded completely" in refused(capsys, bucket, tmp_path)
    cached = tmp_path / "cache" / "pix2seq" / FOLDER
    assert not (cached / SHARD).exists() and (cached / f"{SHARD}.part").exists()


def test_a_shard_shorter_than_its_index_needs_is_refused_before_downloading_it(capsys, bucket, tmp_path):
    path = bucket.root / FOLDER / SHARD
    data = path.read_bytes()
    path.write_bytes(data[:1000])
    stderr = refused(capsys, bucket, tmp_path)
    assert f"{SHARD} is 1000 bytes, but its checkpoint index needs {len(data)}" in stderr
    assert not (tmp_path / "cache" / "pix2seq" / FOLDER / SHARD).exists()


def test_an_existing_output_folder_is_refused_before_anything_is_downloaded(capsys, bucket, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        convert_from(bucket, tmp_path)
    assert "already exists and is not empty" in capsys.readouterr().err and bucket.requests == []


def test_a_missing_file_is_refused_naming_its_url(capsys, bucket, tmp_path):
    (bucket.root / FOLDER / SHARD).unlink()
    stderr = refused(capsys, bucket, tmp_path)
    assert f"{bucket.base_url}/pix2seq/{FOLDER}/{SHARD} does not exist (HTTP 404)" in stderr


def test_a_folder_without_config_asks_for_config(capsys, bucket, tmp_path):
    (bucket.root / FOLDER / "config.json").unlink()
    assert "config.json does not exist" in refused(capsys, bucket, tmp_path)


def test_a_corrupted_shard_is_never_converted(capsys, bucket, tmp_path):
    path = bucket.root / FOLDER / SHARD
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    stderr = refused(capsys, bucket, tmp_path)
    assert "fails its crc32c checksum" in stderr and SHARD in stderr


def test_an_unreachable_server_is_refused_naming_the_url(capsys, bucket, tmp_path):
    base_url = bucket.base_url
    bucket.shutdown()
    bucket.server_close()
    with pytest.raises(SystemExit) as exit_info:
        converter.main(
            ["--checkpoint_dir", URL, "--output_dir", str(tmp_path / "out"), "--base_url", base_url]
            + ["--cache_dir", str(tmp_path / "cache")]
        )
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"Cannot reach {base_url}/pix2seq/{FOLDER}/config.json" in stderr


def test_bucket_urls_name_a_folder():
    folder = BucketFolder("gs://pix2seq/obj365_pretrain/vit_b_640x640_b256_s400k/", cache_dir="cache")
    assert folder.file_url("checkpoint") == (
        "https://storage.googleapis.com/pix2seq/obj365_pretrain/vit_b_640x640_b256_s400k/checkpoint"
    )
    assert folder.local_dir == Path("cache/pix2seq/obj365_pretrain/vit_b_640x640_b256_s400k")
    for url in ("gs://pix2seq", "gs://pix2seq/../etc", "gs://pix2seq/a/./b", "https://x/y"):
        with pytest.raises(ValueError, match="is not a gs://BUCKET/FOLDER address"):
            BucketFolder(url)
    assert issubclass(DownloadError, Exception) and json
