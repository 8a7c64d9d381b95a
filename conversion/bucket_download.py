"""Downloads a released checkpoint folder (`gs://pix2seq/<path>`) anonymously over HTTPS into a cache folder.

The bucket's public objects are served at `<base_url>/<bucket>/<path>` (`https://storage.googleapis.com` by default),
so no cloud SDK and no bucket listing are needed: the folder's `checkpoint` file names the step, and the step's
`.index` header gives the number of data shards. Each file is written as `NAME.part` and renamed only once complete
and of the announced size; an interrupted `.part` is resumed with an HTTP range request (or fetched again if the
server ignores the range), and a file already in the cache is not requested again. The tensors' crc32c values are
checked later, when the reader reads them. Used by `convert_pix2seq_tf_checkpoint.py`.
"""

import logging
import os
import re
from pathlib import Path

from huggingface_hub.utils import httpx
from transformers.utils.logging import tqdm

from conversion.tf_checkpoint_reader import TFCheckpointReader, checkpoint_name, latest_checkpoint_name


logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://storage.googleapis.com"
ATTEMPTS = 3
# A released folder's path: bucket and folder names as the bucket spells them, no `.`/`..` parts.
GS_URL = re.compile(r"gs://([a-z0-9][a-z0-9._-]*)/((?:[A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*)/?")


class DownloadError(RuntimeError):
    """A file of the folder could not be downloaded: the message names its URL."""


class NotOnServer(DownloadError):
    """The server answered 404 for the URL."""


def default_cache_dir():
    """`$XDG_CACHE_HOME/pix2seq` (`~/.cache/pix2seq` when unset), where downloaded folders are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pix2seq"


def parse_gs_url(url):
    """`(bucket, folder path)` of `gs://bucket/path/to/folder`; `ValueError` naming the URL otherwise."""
    match = GS_URL.fullmatch(url)
    if match is None:
        raise ValueError(f"{url!r} is not a gs://BUCKET/FOLDER address of a checkpoint folder.")
    return match[1], match[2]


def is_gs_url(location):
    return str(location).startswith("gs://")


class BucketFolder:
    """
    One folder of a public bucket, mirrored file by file into `cache_dir/<bucket>/<path>`.

    Args:
        url (`str`): `gs://bucket/path/to/folder`.
        cache_dir (`str` or `Path`, *optional*): the cache root; `default_cache_dir()` if `None`.
        base_url (`str`, *optional*): the HTTP(S) server that serves the bucket's objects as `<base_url>/<bucket>/...`.
        timeout (`float`, *optional*): seconds to wait for the server to connect or send data.
    """

    def __init__(self, url, cache_dir=None, base_url=DEFAULT_BASE_URL, timeout=30.0):
        self.bucket, self.path = parse_gs_url(url)
        self.url = url
        self.base_url = base_url.rstrip("/")
        self.local_dir = Path(cache_dir or default_cache_dir()) / self.bucket / self.path
        # Bytes as stored: a transcoded (gzip) answer would not match the sizes and ranges of the object.
        self.client = httpx.Client(timeout=timeout, follow_redirects=True, headers={"Accept-Encoding": "identity"})

    def file_url(self, name):
        return f"{self.base_url}/{self.bucket}/{self.path}/{name}"

    def fetch(self, name, required=True, min_size=0):
        """
        The local path of the folder's file `name`, downloaded unless the cache already holds it. `None` when the
        server has no such file and `required` is false; `DownloadError` naming the URL on any other failure, or when
        the server announces fewer than `min_size` bytes.
        """
        target = self.local_dir / name
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        url = self.file_url(name)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if self._download(url, partial, name, min_size):
                    break
            except httpx.HTTPError as error:
                if isinstance(error, httpx.TransportError) and not partial.exists() and attempt == ATTEMPTS:
                    raise DownloadError(f"Cannot reach {url}: {error or type(error).__name__}.") from error
                logger.warning("Download of %s interrupted (%s); attempt %d of %d.", url, error, attempt, ATTEMPTS)
            except NotOnServer:
                if required:
                    raise
                return None
        else:
            raise DownloadError(f"{url} could not be downloaded completely in {ATTEMPTS} attempts.")
        partial.replace(target)
        return target

    def _download(self, url, partial, name, min_size):
        """Appends to `partial` from where it stops; true once it holds the whole file."""
        start = partial.stat().st_size if partial.is_file() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        with self.client.stream("GET", url, headers=headers) as response:
            if response.status_code == 404:
                raise NotOnServer(f"{url} does not exist (HTTP 404).")
            if response.status_code == 416:  # the range starts at the end: the partial file may be complete
                partial.unlink()
                return False
            if response.status_code not in (200, 206):
                raise DownloadError(f"{url} answered HTTP {response.status_code}.")
            if response.status_code == 200:
                start = 0  # the server ignored the range: the file comes whole
            total = self._total_size(response, start)
            if total is not None and total < min_size:
                raise DownloadError(f"{url} is {total} bytes, but its checkpoint index needs {min_size}.")
            with (
                open(partial, "r+b" if start else "wb") as file,
                tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=name) as progress,
            ):
                file.seek(start)
                file.truncate()
                for chunk in response.iter_bytes():  # as received, so that an interruption keeps all of it
                    file.write(chunk)
                    progress.update(len(chunk))
        size = partial.stat().st_size
        if total is not None and size != total:
            logger.warning("%s: %d of %d bytes received.", url, size, total)
            return False
        return True

    @staticmethod
    def _total_size(response, start):
        if response.status_code == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != start:
                raise DownloadError(f"{response.url} answered a range request with an unusable Content-Range.")
            return int(match[2])
        length = response.headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None

    def fetch_checkpoint(self, checkpoint=None, with_config=True):
        """
        Downloads what a conversion reads: `config.json` (when `with_config`; absent is allowed, the converter says
        what to do), the `checkpoint` file unless `checkpoint` (`ckpt-N`) is given, the step's `.index` and every data
        shard the index names. Returns the local folder.
        """
        if with_config:
            self.fetch("config.json", required=False)
        if checkpoint is None:
            checkpoint = latest_checkpoint_name(self.fetch("checkpoint"))
        else:
            checkpoint = checkpoint_name(checkpoint, "--checkpoint")
        self.fetch(f"{checkpoint}.index")
        reader = TFCheckpointReader(self.local_dir / checkpoint)
        ends = {}
        for entry in reader.entries.values():
            ends[entry["shard"]] = max(ends.get(entry["shard"], 0), entry["offset"] + entry["size"])
        for shard in range(reader.num_shards):
            self.fetch(reader.shard_path(shard).name, min_size=ends.get(shard, 0))
        return self.local_dir
