"""Searching everything a run left behind for planted sentinel values (secrets, identifiers).

Each file is scanned raw and decoded: Parquet (key-value metadata and every text column,
whatever the compression), PNG text chunks, images embedded in HTML, zip and gzip members.
"""

from __future__ import annotations

import base64
import gzip
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(rb"data:[\w/+.-]+;base64,([A-Za-z0-9+/=]+)")
MAX_SCAN_BYTES = 512 << 20  # a file bigger than this is someone else's data set; scanned raw


def _has_text(t: pa.DataType) -> bool:
    """Whether a column of this type can hold text (float tensors cannot: skipped, fast)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t) or pa.types.is_dictionary(t):
        return True
    if isinstance(t, pa.ExtensionType):
        return _has_text(t.storage_type)
    return any(_has_text(t.field(i).type) for i in range(t.num_fields))


def _parquet_payloads(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    pf = pq.ParquetFile(io.BytesIO(data))
    yield f"{name} [file key-value metadata]", repr(pf.metadata.metadata).encode()
    schema = pf.schema_arrow
    yield f"{name} [schema metadata]", repr(
        (schema.metadata, [f.metadata for f in schema])).encode()
    table = pf.read()
    for col_name, col in zip(table.column_names, table.columns, strict=True):
        if _has_text(col.type):
            yield f"{name} [column {col_name}]", repr(col.to_pylist()).encode()


def _png_payloads(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    with Image.open(io.BytesIO(data)) as im:
        yield f"{name} [PNG text chunks]", repr((im.info, getattr(im, "text", {}))).encode()


def payloads(name: str, data: bytes, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """``data`` itself and everything decodable inside it, each with where it came from."""
    yield name, data
    if depth > 3:
        return
    if data.startswith(b"PAR1"):
        yield from _parquet_payloads(name, data)
    elif data.startswith(PNG_MAGIC):
        yield from _png_payloads(name, data)
    elif data.startswith(b"\x1f\x8b"):
        yield from payloads(f"{name} [gunzip]", gzip.decompress(data), depth + 1)
    elif data.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for member in z.namelist():
                yield from payloads(f"{name} [{member}]", z.read(member), depth + 1)
    for n, m in enumerate(DATA_URI.finditer(data)):  # images embedded in HTML / Markdown
        yield from payloads(f"{name} [data URI {n}]", base64.b64decode(m.group(1)), depth + 1)


def needles(**values: str) -> dict[str, bytes]:
    """Each value as written and base64-encoded (as in a Basic-style header), by a label that
    reports can show (a hit report must not print the secret itself)."""
    out = {}
    for label, v in values.items():
        out[label], out[f"{label} (base64)"] = v.encode(), base64.b64encode(v.encode())
    return out


def find(where: str, data: bytes, wanted: dict[str, bytes]) -> list[str]:
    try:
        parts = list(payloads(where, data)) if len(data) <= MAX_SCAN_BYTES else [(where, data)]
    except Exception as exc:  # noqa: BLE001 - a file we cannot decode is still scanned raw
        parts = [(where, data)] + [(f"{where} [undecodable: {exc!r}]", b"")]
    return [f"{part}: {label}" for part, blob in parts for label, w in wanted.items() if w in blob]


def scan_tree(root: Path, wanted: dict[str, bytes]) -> tuple[list[str], int]:
    """Hits under ``root`` and how many files were read (sockets and vanished files skipped)."""
    hits, n = [], 0
    for path in sorted(root.rglob("*")):
        try:
            if not path.is_file():
                continue
            data = path.read_bytes()
        except OSError:
            continue
        n += 1
        hits += find(str(path), data, wanted)
    return hits, n
