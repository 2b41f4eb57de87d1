"""DICOMweb endpoints named as URIs: ``dicomweb+http(s)://host[:port]/path`` (the service root).

One home for turning such a URI into a ``dicomweb_client`` client with the credentials of
``VFX_RAY_DICOMWEB_USER``/``VFX_RAY_DICOMWEB_PASSWORD`` (``vfx-ray pacs env`` prints them).
Credentials never go into a URI: URIs are written into run records and error rows.

An archive on a PACS is read through :mod:`storage` like a folder: its objects are instances,
``ROOT/studies/{study}/series/{series}/instances/{sop}`` (so a "folder" is a series, and
``ROOT/studies/{study}`` is a prefix that holds one study), listed by QIDO-RS and read whole
by WADO-RS as stored (no ranged reads, no re-encoding).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlparse

from vfx_ray.s3outage import StoreUnavailable

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
USER_VAR, PASSWORD_VAR = "VFX_RAY_DICOMWEB_USER", "VFX_RAY_DICOMWEB_PASSWORD"
TIMEOUT_S = 30.0
# Tries per request, pausing BACKOFF_S, then twice that, ...: a PACS that restarts or a dropped
# connection costs 1+2+4+8 = 15 s; past that a silent PACS fails the job (StoreUnavailable),
# and a PACS that keeps answering 5xx for one instance makes that instance an error row.
ATTEMPTS = 5
BACKOFF_S = 1.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The instance as stored (any transfer syntax), one Part-10 object in a multipart body.
ACCEPT_RAW = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# QIDO gives no object size. Rows, Columns, BitsAllocated, NumberOfFrames (instance-level
# QIDO returns them by default, PS3.18 Table 6.7.1-2a) give the pixel data's uncompressed size.
SIZE_FIELDS = ("00280010", "00280011", "00280100", "00280008")
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
_RESOURCE = re.compile(r"/studies/([^/]+)(?:/series/([^/]+)(?:/instances/([^/]+))?)?$")
T = TypeVar("T")


def is_dicomweb(uri: str) -> bool:
    return uri.startswith(SCHEMES)


def service_url(uri: str) -> str:
    """The HTTP(S) service root of a ``dicomweb+`` URI (a study, series or instance URI's
    too), without a trailing slash."""
    if not is_dicomweb(uri):
        raise ValueError(f"{uri}: not a DICOMweb URI (dicomweb+http://host:port/path)")
    url = uri[len("dicomweb+"):].rstrip("/")
    parsed = urlparse(url)
    if parsed.username or parsed.password:
        raise ValueError(f"dicomweb URI {parsed.hostname}: give credentials in {USER_VAR}/{PASSWORD_VAR}, not the URI")
    if not parsed.hostname:
        raise ValueError(f"{uri}: no host")
    found = _RESOURCE.search(url)
    return url[:found.start()] if found else url


def endpoint(uri: str) -> str:
    """``host:port`` of the PACS, for messages (never the path: its UIDs identify a patient)."""
    parsed = urlparse(service_url(uri))
    return f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


@dataclass(frozen=True)
class Location:
    """What a ``dicomweb+`` URI names: the service root (as a ``dicomweb+`` URI) and UIDs."""

    root: str
    study: str | None = None
    series: str | None = None
    instance: str | None = None


def locate(uri: str) -> Location:
    service_url(uri)  # refuses credentials and malformed URIs
    base = uri.rstrip("/")
    found = _RESOURCE.search(base)
    if not found:
        return Location(base)
    return Location(base[:found.start()], *(unquote(g) if g else None for g in found.groups()))


def instance_uri(root: str, study: str, series: str, sop: str) -> str:
    """An instance's object URI (UIDs quoted: a malformed one cannot add path segments)."""
    return f"{root}/studies/{quote(study, safe='')}/series/{quote(series, safe='')}/instances/{quote(sop, safe='')}"


def credentials() -> tuple[str, str] | None:
    user, password = os.environ.get(USER_VAR), os.environ.get(PASSWORD_VAR)
    return (user, password) if user and password else None


@functools.lru_cache(maxsize=8)
def _client(url: str, creds: tuple[str, str] | None):  # noqa: ANN202 - dicomweb_client is imported lazily
    import requests
    from dicomweb_client.api import DICOMwebClient
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    for scheme in ("http://", "https://"):  # read_many's threads share the session: as many connections
        session.mount(scheme, HTTPAdapter(pool_maxsize=32))
    if creds:
        session.auth = creds
    client = DICOMwebClient(url=url, session=session, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=False)  # retried in one place: :func:`call`
    return client


def client(uri: str):  # noqa: ANN201
    """A (cached per process) ``DICOMwebClient`` for the service at ``uri``."""
    return _client(service_url(uri), credentials())


def session(uri: str):  # noqa: ANN201
    """The ``requests`` session of :func:`client` (for raw multipart retrieval)."""
    return client(uri)._session


def call(uri: str, request: Callable[[], T]) -> T:
    """``request()`` to the PACS behind ``uri``, retried with backoff when there is no answer
    or a 408/429/5xx one; the errors name the PACS (host:port), never the path."""
    import requests

    where, failure, silent = endpoint(uri), "", False
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            return request()
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            failure, silent = type(exc).__name__, True
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                raise FileNotFoundError(f"nothing at {uri}") from None
            if status in (401, 403):
                raise PermissionError(f"PACS {where} refused the request (HTTP {status}); "
                                      f"check {USER_VAR}/{PASSWORD_VAR}") from None
            if status not in RETRY_STATUS:
                raise OSError(f"PACS {where} answered HTTP {status}") from None
            failure, silent = f"HTTP {status}", False
    if silent:
        raise StoreUnavailable(f"PACS {where} unreachable: no answer to {ATTEMPTS} attempts ({failure})")
    raise OSError(f"PACS {where} answered {failure} to {ATTEMPTS} attempts")


# ---------------------------------------------------------------- an archive on a PACS
def _uid(dataset: dict[str, Any], tag: str) -> str:
    return str(dataset[tag]["Value"][0])


def _number(dataset: dict[str, Any], tag: str) -> int:
    value = (dataset.get(tag) or {}).get("Value") or [0]
    try:
        return int(value[0])
    except (TypeError, ValueError):
        return 0


def estimated_size(dataset: dict[str, Any]) -> int:
    """An instance's size from its QIDO attributes: the pixel data uncompressed (Rows x
    Columns x BitsAllocated/8 x frames), 0 without them (a report). QIDO gives no size, and
    sizes only cut the listing into chunks; below an uncompressed object's own size (its
    header), so its first read counts as whole (``tasks.read_one_header_parse``)."""
    rows, columns, bits, frames = (_number(dataset, t) for t in SIZE_FIELDS)
    return rows * columns * (-(-bits // 8)) * max(frames, 1)


def list_studies(uri: str) -> list[str] | None:
    """The URI of every study of the service root ``uri`` names (the listing's shards), or None
    when ``uri`` names a study, a series or an instance (list its instances instead)."""
    loc = locate(uri)
    if loc.study:
        return None
    qido = client(uri)
    found = call(uri, lambda: qido.search_for_studies(get_remaining=True))
    return sorted(f"{loc.root}/studies/{quote(_uid(d, STUDY_UID), safe='')}" for d in found)


def list_instances(uri: str) -> list[tuple[str, int]]:
    """(object URI, estimated size) of every instance under ``uri`` (the service root, a study,
    a series or an instance), by QIDO-RS: studies, then their series, then their instances."""
    loc, qido = locate(uri), client(uri)
    only = {"SOPInstanceUID": loc.instance} if loc.instance else None
    studies = [loc.study] if loc.study else [
        _uid(d, STUDY_UID) for d in call(uri, lambda: qido.search_for_studies(get_remaining=True))]
    found = []
    for study in studies:
        series = [loc.series] if loc.series else [_uid(d, SERIES_UID) for d in call(
            uri, lambda s=study: qido.search_for_series(study_instance_uid=s, get_remaining=True))]
        for one in series:
            instances = call(uri, lambda s=study, e=one: qido.search_for_instances(
                study_instance_uid=s, series_instance_uid=e, fields=list(SIZE_FIELDS), search_filters=only,
                get_remaining=True))
            found += [(instance_uri(loc.root, study, one, _uid(d, SOP_UID)), estimated_size(d)) for d in instances]
    return sorted(found)


def read_instance(uri: str) -> bytes:
    """One instance's Part-10 bytes as the PACS stores them (WADO-RS, ``transfer-syntax=*``):
    the object a folder archive would hold, byte for byte where the PACS keeps the file."""
    if not locate(uri).instance:
        raise IsADirectoryError(f"{uri}: not an instance (.../studies/S/series/S/instances/I)")
    url, http = uri[len("dicomweb+"):].rstrip("/"), session(uri)

    def get() -> Any:  # a requests.Response
        response = http.get(url, headers={"Accept": ACCEPT_RAW}, timeout=TIMEOUT_S)
        response.raise_for_status()
        return response

    response = call(uri, get)
    return single_part(response.content, response.headers.get("Content-Type", ""), endpoint(uri))


def single_part(body: bytes, content_type: str, where: str) -> bytes:
    """The one body of a multipart/related answer (RFC 2046: each delimiter is CRLF "--"
    boundary, and the CRLF belongs to it); a bare application/dicom answer as it is."""
    if content_type.startswith("application/dicom"):
        return body
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/related") or not boundary:
        raise OSError(f"PACS {where} answered {content_type or 'no content type'}, not a DICOM instance")
    parts = []
    for part in (b"\r\n" + body).split(b"\r\n--" + boundary.group(1).encode())[1:]:
        if part.startswith(b"--"):  # the close delimiter
            break
        head_end = part.find(b"\r\n\r\n")
        if head_end < 0:
            raise OSError(f"PACS {where}: a malformed multipart answer")
        parts.append(part[head_end + 4:])
    if len(parts) != 1:
        raise OSError(f"PACS {where} answered {len(parts)} parts for one instance")
    return parts[0]


def exists(uri: str) -> bool:
    """Whether the PACS holds an instance (or any) under ``uri``: a QIDO search, no retrieval."""
    loc, qido = locate(uri), client(uri)
    if loc.series:
        only = {"SOPInstanceUID": loc.instance} if loc.instance else None
        return bool(call(uri, lambda: qido.search_for_instances(
            study_instance_uid=loc.study, series_instance_uid=loc.series, search_filters=only, limit=1)))
    only = {"StudyInstanceUID": loc.study} if loc.study else None
    return bool(call(uri, lambda: qido.search_for_studies(search_filters=only, limit=1)))
