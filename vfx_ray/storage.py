"""One place that turns a URI into a filesystem + path; every reader and writer goes through it.

URIs are local paths, ``s3://bucket/prefix`` or, for reading a DICOM archive on a PACS,
``dicomweb+http(s)://host:port/root`` (:mod:`dicomweb`: its instances as objects, read only).
S3 settings come from the standard AWS variables. pyarrow's S3 filesystem ignores
``AWS_ENDPOINT_URL`` by itself, so it is read here and passed as ``endpoint_override``; boto3
reads it natively but gets it explicitly too. Without ``AWS_REGION``/``AWS_DEFAULT_REGION``, a
bucket on AWS is asked for its region (once per bucket and process); a custom endpoint gets
us-east-1, which S3-compatible servers accept.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vfx_ray import dicomweb
from vfx_ray.dicomweb import is_dicomweb as is_dicomweb

# re-exported: the jobs and tests name them here
from vfx_ray.s3outage import S3_OUTAGE_SECONDS as S3_OUTAGE_SECONDS
from vfx_ray.s3outage import StoreUnavailable as StoreUnavailable
from vfx_ray.s3outage import ride_out

S3_PREFIX = "s3://"
T = TypeVar("T")
# Attempts per request inside the SDKs (a few seconds of backoff: 5xx answers, dropped
# connections). A store that does not answer at all is then waited for up to
# S3_OUTAGE_SECONDS (``s3outage``): an outage is ridden out, one for good fails the job.
S3_MAX_ATTEMPTS = 8
DEFAULT_REGION = "us-east-1"


CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_held_back: dict[str, str] = {}  # credential variables taken out of os.environ for a while


def credentials() -> tuple[str | None, str | None, str | None]:
    """(key, secret, session token) from the environment, or from while they are held back."""
    def get(name: str) -> str | None:
        return os.environ.get(name) or _held_back.get(name)

    return get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"), get("AWS_SESSION_TOKEN")


@contextmanager
def credentials_held_back() -> Iterator[None]:
    """Take the AWS credential variables out of os.environ while the block runs; this process's
    storage calls still use them. For Ray Tune's ``fit``: Tune copies these variables into
    every trial actor's runtime_env, which Ray writes in plain text to its logs
    (runtime_env_agent.log). Trial actors need no copy: a local instance's workers inherit
    the environment, a cluster's nodes have their own credentials (instance profiles)."""
    held = {k: os.environ.pop(k) for k in CREDENTIAL_VARS if k in os.environ}
    _held_back.update(held)
    try:
        yield
    finally:
        for k, v in held.items():
            _held_back.pop(k, None)
            os.environ.setdefault(k, v)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (posix separators for s3, os separators locally)."""
    if is_s3(uri):
        return S3_PREFIX + posixpath.join(uri[len(S3_PREFIX) :].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def s3_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None


def choose_region(environ: Mapping[str, str], bucket: str | None, resolve: Callable[[str], str]) -> str:
    """The region S3 requests are signed for: the configured one; else, on AWS, the bucket's
    own (``resolve``: a bucket outside us-east-1 refuses requests signed for it); else
    us-east-1 - for custom endpoints, or when the bucket cannot be asked (then the request
    itself fails with the store's own message)."""
    configured = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if configured:
        return configured
    if bucket and not s3_endpoint(environ):
        try:
            return resolve(bucket)
        except OSError:
            pass
    return DEFAULT_REGION


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    """A bucket's region, asked of AWS once per process (failures are not cached)."""
    return pafs.resolve_s3_region(bucket)


def s3_region(bucket: str | None = None) -> str:
    return choose_region(os.environ, bucket, _bucket_region)


def s3_filesystem(bucket: str | None = None) -> pafs.S3FileSystem:
    """pyarrow S3 filesystem from the standard AWS variables, endpoint included, for ``bucket``'s
    region (one per process and setting: building one costs a few ms, and it is thread-safe)."""
    endpoint = s3_endpoint()
    if endpoint:
        # S3-compatible servers (rclone, MinIO, ...) often refuse aws-chunked uploads with
        # trailing checksums, the AWS SDK default since 2025; the SDK reads these variables.
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")
    creds = credentials()
    return _s3_filesystem(endpoint, s3_region(bucket), creds)


@functools.lru_cache(maxsize=4)
def _s3_filesystem(endpoint: str | None, region: str, creds: tuple) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region, "connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret, token = creds
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if token:
            kwargs["session_token"] = token
    # Not AwsStandardS3RetryStrategy: its retry quota (500 tokens, 5 a retry) is never given
    # back through pyarrow (measured with pyarrow 26): after ~100 retries in its lifetime, a
    # process (a long-lived Ray worker) never retries again. The default strategy has no
    # quota: 25 ms doubling, 6.4 s over 8 attempts.
    kwargs["retry_strategy"] = pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
    return pafs.S3FileSystem(**kwargs)


def boto3_client(bucket: str | None = None):
    """boto3 S3 client from the standard AWS variables (endpoint passed explicitly), for
    ``bucket``'s region."""
    creds = credentials()
    return _boto3_client(s3_endpoint(), s3_region(bucket), creds)


@functools.lru_cache(maxsize=4)
def _boto3_client(endpoint: str | None, region: str, creds: tuple):
    # clients are thread-safe and costly to build; one per process and credential set. The
    # key pair is passed on: boto3's default session keeps the first one it found.
    import boto3
    from botocore.config import Config

    key, secret, token = creds
    explicit = (
        {"aws_access_key_id": key, "aws_secret_access_key": secret, "aws_session_token": token}
        if key and secret
        else {}
    )
    retries = Config(retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=retries, **explicit)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or ``s3://bucket/key`` URI."""
    if is_dicomweb(uri):  # not a local path named "dicomweb+http:"
        raise ValueError(f"{dicomweb.endpoint(uri)}: a DICOMweb archive holds DICOM instances only; read them by URI")
    if is_s3(uri):
        return s3_filesystem(split_s3(uri)[0]), uri[len(S3_PREFIX) :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


def _listing(uri: str, recursive: bool) -> list[tuple[str, pafs.FileInfo]]:
    """(URI, info) of what is under a prefix (everything, or one level), or of the file ``uri`` names."""
    fs, path = filesystem(uri)
    info = retrying(uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    infos = [info] if info.type == pafs.FileType.File else retrying(
        uri, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=recursive)))
    return [((S3_PREFIX + i.path) if is_s3(uri) else i.path, i) for i in infos]


def list_files(uri: str, suffix: str | None = None) -> list[FileEntry]:
    """Every file under a prefix, recursively, sorted by URI; any folder layout. On a PACS:
    every instance under the root, a study or a series, with its estimated size."""
    if is_dicomweb(uri):
        found = [FileEntry(u, size) for u, size in dicomweb.list_instances(uri)]
        if not found and dicomweb.locate(uri).study:
            raise FileNotFoundError(f"nothing at {uri}")
        return [e for e in found if not suffix or e.uri.endswith(suffix)]
    out = [FileEntry(u, i.size) for u, i in _listing(uri, recursive=True)
           if i.type == pafs.FileType.File and (not suffix or u.endswith(suffix))]
    return sorted(out, key=lambda e: e.uri)


def list_top(uri: str) -> tuple[list[str], list[FileEntry]]:
    """The folders and the files directly under a prefix, each sorted: the listing's shards
    (whoever reads a folder lists it whole, :func:`list_files`). A file: itself. On a PACS:
    its studies, or the instances of the study or series ``uri`` names."""
    if is_dicomweb(uri):
        studies = dicomweb.list_studies(uri)
        return ([], list_files(uri)) if studies is None else (studies, [])
    named = _listing(uri, recursive=False)
    folders = sorted(u for u, i in named if i.type == pafs.FileType.Directory)
    return folders, sorted((FileEntry(u, i.size) for u, i in named if i.type == pafs.FileType.File),
                           key=lambda e: e.uri)


def exists(uri: str) -> bool:
    if is_dicomweb(uri):
        return dicomweb.exists(uri)
    fs, path = filesystem(uri)
    return retrying(uri, lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound


def retrying(uri: str, request: Callable[[], T]) -> T:
    """``request()`` on the store behind ``uri``, an outage ridden out (``s3outage``)."""
    if not is_s3(uri):
        return request()
    return ride_out(request, lambda exc, away: store_unavailable(uri, exc, away))


def store_unavailable(uri: str, exc: BaseException, away: float) -> StoreUnavailable:
    """The job's error: the endpoint and bucket, not the object key (a key may name a patient)."""
    bucket, key = split_s3(uri)
    detail = str(exc).replace(key, "<key>") if key else str(exc)
    where = s3_endpoint() or "AWS S3"
    return StoreUnavailable(
        f"object store {where} unreachable: no answer for {away:.0f} s (bucket {bucket!r}); last error: {detail}"
    )


def s3_get(uri: str, nbytes: int | None = None) -> bytes:
    """One object (or its first ``nbytes``) through pyarrow's C++ client.

    boto3 spends ~2 ms of Python CPU per GET (signing, event hooks, parsing); pyarrow's HEAD +
    GET costs a third of that, which on a few cores is time the decoders get back.
    """
    path, bucket = uri[len(S3_PREFIX) :], split_s3(uri)[0]

    def get() -> bytes:
        if nbytes is None:
            # the bytes as stored: pyarrow would otherwise gunzip a ".gz" key ("detect")
            with s3_filesystem(bucket).open_input_stream(path, compression=None) as f:
                return f.read()
        with s3_filesystem(bucket).open_input_file(path) as f:
            return f.read(nbytes)

    try:
        return retrying(uri, get)
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing at {uri}") from None
    except StoreUnavailable:
        raise
    except OSError as exc:
        if "ACCESS_DENIED" in str(exc):
            raise PermissionError(f"{uri}: access denied; check the AWS credentials") from None
        raise


def read_bytes(uri: str) -> bytes:
    """A whole object: one GET on S3 or a PACS."""
    if is_s3(uri):
        return s3_get(uri)
    if is_dicomweb(uri):
        return dicomweb.read_instance(uri)
    with open(uri, "rb") as f:
        return f.read()


def read_many(uris: list[str], nbytes: int | None = None, max_workers: int = 16) -> list[bytes | BaseException]:
    """Many objects (or their first ``nbytes``) fetched concurrently, in order.

    Object stores answer each GET after a round trip (tens of ms on AWS); threads overlap
    them. A failure is returned in place of its bytes so one bad object spoils nothing else.
    """

    def get(uri: str) -> bytes | BaseException:
        try:
            return read_bytes(uri) if nbytes is None else read_prefix(uri, nbytes)
        except Exception as exc:  # noqa: BLE001 - handed back to the caller per object
            return exc

    if len(uris) <= 1 or max_workers <= 1:
        return [get(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(uris))) as pool:
        return list(pool.map(get, uris))


def read_prefix(uri: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of an object: a HEAD and one ranged GET on S3. A PACS has no
    ranged reads: the whole instance (more than ``nbytes``, as a short object gives less)."""
    if is_s3(uri):
        return s3_get(uri, nbytes)
    if is_dicomweb(uri):
        return dicomweb.read_instance(uri)
    with open(uri, "rb") as f:
        return f.read(nbytes)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    return bucket, key


@contextmanager
def atomic_output(uri: str) -> Iterator[pa.NativeFile]:
    """A writable stream whose content appears at ``uri`` only if the block ends cleanly.

    Locally: a temporary sibling, renamed at the end. S3: a local temporary file, uploaded
    at the end (a PUT or a multipart upload only becomes visible when complete, and boto3
    aborts a failed multipart upload). On an exception ``uri`` keeps its old content.
    """
    if is_dicomweb(uri):  # not a local path named "dicomweb+http:"
        raise ValueError(f"{dicomweb.endpoint(uri)}: a DICOMweb archive is read, not written, through storage")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with tempfile.NamedTemporaryFile(prefix="vfx-upload-", suffix=".part") as tmp:
            with pa.OSFile(tmp.name, "wb") as stream:
                yield stream
            try:
                retrying(uri, lambda: boto3_client(bucket).upload_file(tmp.name, bucket, key))
            except StoreUnavailable:
                raise
            except Exception as exc:
                raise upload_error(uri, exc) from None
        return
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with pa.OSFile(tmp, "wb") as stream:
            yield stream
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload_error(uri: str, exc: Exception) -> Exception:
    """boto3's upload failures as this module's error family, with the object named.

    A read-only destination answers 403 on AWS, but 500 InternalError on ``rclone serve s3
    --read-only``: the client cannot tell that from a broken server, so the message says so.
    """
    text = str(exc)
    if any(s in text for s in ("AccessDenied", "Forbidden", "(403)", "SignatureDoesNotMatch", "InvalidAccessKeyId")):
        return PermissionError(
            f"{uri}: writing was refused (credentials, access denied or read-only destination): {exc}"
        )
    hint = " (some servers answer so to a write on a read-only destination)" if "InternalError" in text else ""
    return OSError(f"{uri}: upload failed{hint}: {exc}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old content or the new, never a part."""
    with atomic_output(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_table(table: pa.Table, uri: str, metadata: dict[str, str] | None = None) -> None:
    """Write one Parquet file atomically, with optional key-value metadata."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> pa.Table:
    """A Parquet file or a folder of Parquet files as one table."""
    fs, path = filesystem(uri)
    return retrying(uri, lambda: pq.read_table(path, filesystem=fs))


def s3_delete(path: str, prefix: bool) -> None:
    """Delete ``bucket/key`` (or every object under ``bucket/key/``) with boto3."""
    bucket, _, key = path.partition("/")
    client = boto3_client(bucket)
    if not prefix:
        client.delete_object(Bucket=bucket, Key=key)
        return
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def delete_tree(uri: str) -> None:
    """Remove a folder (local) or every object under a prefix (s3://), if there is one."""
    if is_s3(uri):
        s3_delete(filesystem(uri)[1], prefix=True)
    else:
        shutil.rmtree(uri, ignore_errors=True)
