"""Cached, hash-checked downloads of released weights (http(s) and file:// URLs, stdlib urllib only).

The file is streamed into a temp file in the cache folder while its full sha256 is computed; it is
renamed into the cache only when the hash matches (or when no hash is known, which is logged).
torch.hub's ``check_hash`` only compares a ``-<hex>`` prefix of the file name, so sail-sg's
``check_hash=True`` on ``poolformer_s12.pth.tar`` checks nothing; we hash the whole file instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from metaformer.errors import DownloadError
from metaformer.weights.io import atomic_write
from metaformer.weights.pretrained import DEFAULT_TAGS, PRETRAINED, PretrainedWeights, get_weights

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60


def cache_dir() -> Path:
    """Where downloads go: ``$METAFORMER_HOME`` if set, else ``~/.cache/metaformer``."""
    home = os.environ.get("METAFORMER_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "metaformer"


_default_cache_dir = cache_dir  # download_weights' cache_dir argument shadows the name


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(
    name_or_tag: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    url: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Path of the cached file for a model name or weights tag, downloading it on first use.

    ``url`` / ``sha256`` override the record's (a name unknown to ``PRETRAINED`` is fine when ``url``
    is given). A cached file is reused as it is; delete it to fetch it again.
    """
    if url is None:
        record: PretrainedWeights | None = get_weights(name_or_tag)  # UnknownModelError if unknown
        url = record.url  # type: ignore[union-attr]
    else:
        record = PRETRAINED.get(name_or_tag) or PRETRAINED.get(DEFAULT_TAGS.get(name_or_tag, ""))
    expected = (sha256 or (record.sha256 if record else None) or "").lower() or None
    folder = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    filename = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    target = folder / filename
    if target.is_file():
        logger.debug("using cached %s", target)
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(
            f"cannot create the cache folder '{folder}' ({err.strerror}); set METAFORMER_HOME or pass "
            "--cache-dir to a writable folder"
        ) from None
    logger.info("downloading %s to %s", url, target)
    with atomic_write(target) as tmp:
        digest = _fetch(url, tmp, progress)
        if expected is not None and digest != expected:
            raise DownloadError(
                f"sha256 of {url} is {digest}, expected {expected}: the download is corrupt or the file "
                "changed upstream; nothing was cached, so retry, or download it by hand, check it and "
                "pass checkpoint_path=..."
            )
    if expected is None:
        logger.info("no sha256 known for %s: the file is unverified (sha256 %s)", url, digest)
    else:
        logger.info("sha256 verified for %s", target.name)
    return target


def _fetch(url: str, dest: Path, progress: bool) -> str:
    """Stream ``url`` into ``dest``; returns the sha256 hex digest. DownloadError on any failure."""
    fix = f"check the network or the URL, or download it by hand and pass checkpoint_path=... ({url})"
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "metaformer"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr)
            try:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as err:
        raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}; {fix}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"could not download {url} ({err.reason}); {fix}") from None
    except (TimeoutError, ConnectionError, ValueError) as err:
        raise DownloadError(f"could not download {url} ({type(err).__name__}: {err}); {fix}") from None
    return digest.hexdigest()
