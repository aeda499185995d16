"""The ``http`` source kind: plain HTTPS objects (Nemotron-CC in Common Crawl's bucket), fetched and checked.

A web server says more about a file than the hub's tree does, and less: no listing with hashes, but a
size (``Content-Length``/``Content-Range``), sometimes a digest, a content type, and status codes with
``Retry-After``. This module turns each of those into a check, because "200 OK" alone has been a login
page, an error document or a throttling notice before:

- **size**: a transfer must end at the size the server announced (else it resumes with ``Range``);
  a file left by an earlier job is reused only if a ``HEAD`` says it has that size, else it is fetched
  again;
- **published digest**: ``Repr-Digest``/``Digest: sha-256=…`` (RFC 9530 / 3230), ``x-amz-checksum-sha256``,
  or an S3 single-part upload's md5 ``ETag`` (only when the answer carries ``x-amz-*`` headers: other
  servers' ETags are opaque). :func:`osref.download.fetch_group` compares it with the file's own digest;
  a mismatch is fetched once more, then fails naming the file;
- **format**: a ``text/html`` or XHTML content type, or first/last bytes that cannot be the dataset's
  declared format (zstd, gzip, parquet's ``PAR1`` at both ends, a JSON object for plain jsonl), fail the
  job naming the URL; nothing is kept;
- **Retry-After** on a retryable status (429, 503, ...): waited for, in seconds or as an HTTP date, up
  to :data:`MAX_RETRY_AFTER_S`; a longer request fails the job at once, naming the URL and the wait (the
  job's retry or the next run picks the file up). Without the header: 0, 2, 6, 14 s between attempts.

Everything here uses the standard library only.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import gzip
import http.client
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from osref.files import commit_partial, partial_path

CHUNK = 1 << 20
HTTP_ATTEMPTS = 5  # per request; a file transfer resumes where the last attempt stopped
RETRYABLE_HTTP_STATUS = {408, 416, 429, 500, 502, 503, 504}  # 416: the partial file was dropped, start over
MAX_RETRY_AFTER_S = 300  # the longest Retry-After a job sleeps through; longer ones fail it
TIMEOUT_S = 60

_MAGIC = {  # declared format -> what its first bytes must be
    "jsonl.zst": (b"\x28\xb5\x2f\xfd",),
    "jsonl.zstd": (b"\x28\xb5\x2f\xfd",),
    "jsonl.gz": (b"\x1f\x8b",),
    "json.gz": (b"\x1f\x8b",),
    "parquet": (b"PAR1",),
}
_NEVER_DATA = ("text/html", "application/xhtml+xml")  # a login or error page, whatever the file name says


class SourceFormatError(IOError):
    """The server sent something that cannot be the dataset's declared format; the message names the URL."""


class RetryAfterTooLong(IOError):
    """The server asked for a longer pause than a download job waits."""


class Progress(Protocol):
    def advance(self, n_bytes: int) -> None: ...
    def file_discarded(self) -> None: ...


@dataclass(frozen=True)
class Remote:
    """What the server said about an object: its size, a digest it publishes, its content type."""

    size: int | None
    digest: tuple[str, str] | None  # ("sha256" | "md5", hex)
    content_type: str | None


# ---- what the headers say ------------------------------------------------------------------------


def published_digest(headers) -> tuple[str, str] | None:
    """A digest of the whole object the server publishes, as (algorithm, hex), or None."""
    for name in ("Repr-Digest", "Digest"):
        for item in (headers.get(name) or "").split(","):
            key, _, value = item.strip().partition("=")
            if key.strip().lower() in ("sha-256", "sha256") and value:
                try:
                    return "sha256", base64.b64decode(value.strip().strip(":")).hex()
                except (binascii.Error, ValueError):
                    pass
    if amz := headers.get("x-amz-checksum-sha256"):
        try:
            return "sha256", base64.b64decode(amz).hex()
        except (binascii.Error, ValueError):
            pass
    etag = (headers.get("ETag") or "").strip()
    is_s3 = any(name.lower().startswith("x-amz-") for name in headers.keys())
    if is_s3 and not etag.startswith("W/"):
        etag = etag.strip('"').lower()
        if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):  # "<md5>-<parts>": multipart, no md5
            return "md5", etag
    return None


def _media_type(headers) -> str | None:
    value = headers.get("Content-Type")
    return value.split(";")[0].strip().lower() if value else None


def _check_content_type(url: str, media_type: str | None, fmt: str | None) -> None:
    if media_type in _NEVER_DATA:
        raise SourceFormatError(
            f"{url}: content type {media_type} (a web page, e.g. a login or error page) "
            f"cannot be {fmt or 'a data file'}; nothing was kept"
        )


def format_problem(path: Path, fmt: str | None) -> str | None:
    """Why the file cannot be of the declared format (its magic bytes), or None."""
    if not fmt:
        return None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if fmt == "jsonl":
        stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if size == 0 or stripped[:1] in (b"{", b""):  # blank leading lines: the reader skips them
            return None
        return f"starts with {head.hex()}, not a JSON object"
    expected = _MAGIC.get(fmt)
    if expected and not any(head.startswith(magic) for magic in expected):
        return f"starts with {head.hex()}, not {' or '.join(m.hex() for m in expected)}"
    if fmt == "parquet" and tail != b"PAR1":
        return f"tail is {tail.hex()}, not PAR1 (50415231)"
    return None


# ---- requests with retries -----------------------------------------------------------------------


def retry_delay(url: str, error: BaseException, attempt: int) -> float:
    """Seconds to wait before the next attempt: the server's Retry-After (bounded) or the backoff."""
    headers = getattr(error, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if value:
        value = value.strip()
        if value.isdigit():
            seconds = float(value)
        else:
            try:
                seconds = max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                seconds = None
        if seconds is not None:
            if seconds > MAX_RETRY_AFTER_S:
                raise RetryAfterTooLong(
                    f"{url}: HTTP {getattr(error, 'code', '?')}, Retry-After {seconds:.0f} s is more than the "
                    f"{MAX_RETRY_AFTER_S} s a download job waits; run it again later"
                ) from None
            return seconds
    return float(2**attempt - 2)  # 0, 2, 6, 14 s: retry a dropped connection at once, back off after


def _retryable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in RETRYABLE_HTTP_STATUS
    return isinstance(error, (OSError, http.client.HTTPException))


def _open(request: urllib.request.Request):
    """``urlopen`` with retries; the caller reads and closes the response."""
    url = request.full_url
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_S)  # URLs from the config
        except (OSError, http.client.HTTPException) as error:
            if attempt == HTTP_ATTEMPTS or not _retryable(error):
                raise
            delay = retry_delay(url, error, attempt)
            print(f"{url}: {error!r}; again in {delay:.0f} s (attempt {attempt + 1}/{HTTP_ATTEMPTS})", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


def get_bytes(url: str) -> bytes:
    """The whole body of ``url`` (a file list), with retries; fails if it ends before its Content-Length."""
    with _open(urllib.request.Request(url)) as response:
        body = response.read()
        length = response.headers.get("Content-Length")
    if length is not None and len(body) != int(length):
        raise OSError(f"{url}: {len(body)} of {length} bytes received")
    return body


def head(url: str) -> Remote:
    with _open(urllib.request.Request(url, method="HEAD")) as response:
        length = response.headers.get("Content-Length")
        return Remote(
            int(length) if length else None, published_digest(response.headers), _media_type(response.headers)
        )


def read_list(raw: bytes, where: str) -> list[str]:
    """Entries of a (gzipped or plain) list, one per line; blank lines and ``#`` comments skipped."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise OSError(f"{where}: corrupt gzip ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise OSError(f"{where}: line {line}: not UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ---- one file --------------------------------------------------------------------------------------


def _transfer(url: str, partial: Path, fmt: str | None, progress: Progress) -> Remote:
    """Append the rest of ``url`` to ``partial`` (a Range request when it has bytes); raise if cut short."""
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # URLs from the config
    except urllib.error.HTTPError as error:
        if error.code == 416:  # the partial file is not a prefix of this object: start over
            partial.unlink()
        raise
    with response:
        media_type = _media_type(response.headers)
        if media_type in _NEVER_DATA:
            partial.unlink(missing_ok=True)
            _check_content_type(url, media_type, fmt)
        if offset and response.status != 206:  # server ignored the Range: the body is the whole object
            offset = 0
        progress.advance(offset)
        content_range = response.headers.get("Content-Range")
        content_length = response.headers.get("Content-Length")
        total = (
            int(content_range.rsplit("/", 1)[1])
            if content_range
            else (offset + int(content_length) if content_length else None)
        )
        remote = Remote(total, published_digest(response.headers), media_type)
        with open(partial, "ab" if offset else "wb") as fh:
            for block in iter(lambda: response.read(CHUNK), b""):
                fh.write(block)
                progress.advance(len(block))
    if total is not None and partial.stat().st_size != total:
        raise http.client.IncompleteRead(b"", total - partial.stat().st_size)
    return remote


def _digest_matches(path: Path, digest: tuple[str, str]) -> bool:
    import hashlib

    algorithm, expected = digest
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            hasher.update(block)
    return hasher.hexdigest() == expected


def fetch(url: str, target: Path, fmt: str | None, progress: Progress) -> Remote:
    """Download ``url`` to ``target`` (via ``<target>.partial``, renamed when complete) and check it.

    An existing ``target`` is kept only if the server's ``HEAD`` gives the same size (its digest, if
    published, is then checked by the caller). Returns what the server said about the object.
    """
    if target.exists():
        try:
            remote = head(url)
        except urllib.error.HTTPError as error:  # e.g. 405, or 403 from a URL signed for GET only
            print(f"{url}: HEAD answered {error.code}; fetching the existing {target} again", file=sys.stderr)
            remote = None
        size = target.stat().st_size
        if remote is not None:
            _check_content_type(url, remote.content_type, fmt)
            if (remote.size is None or remote.size == size) and format_problem(target, fmt) is None:
                return remote
            print(
                f"{url}: the existing {target} has {size} B, the server says {remote.size} B; fetching it again",
                file=sys.stderr,
            )
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        progress.file_discarded()  # recount from what is on disk
        try:
            remote = _transfer(url, partial, fmt, progress)
            break
        except (OSError, http.client.HTTPException) as error:
            if isinstance(error, SourceFormatError) or attempt == HTTP_ATTEMPTS or not _retryable(error):
                raise
            delay = retry_delay(url, error, attempt)
            print(
                f"{url}: {error!r}; resuming in {delay:.0f} s (attempt {attempt + 1}/{HTTP_ATTEMPTS})", file=sys.stderr
            )
            time.sleep(delay)
    assert remote is not None  # the loop ends with a transfer's Remote (break) or raises
    problem = format_problem(partial, fmt)
    if problem is not None and not (remote.digest and not _digest_matches(partial, remote.digest)):
        # bytes the server vouches for (or cannot vouch for) that are not the format: refuse them. Bytes that
        # contradict the server's own digest are a broken transfer instead: the caller fetches them again.
        partial.unlink()
        raise SourceFormatError(f"{url}: not {fmt}: {problem} (content type {remote.content_type}); nothing was kept")
    commit_partial(partial, target)
    return remote
