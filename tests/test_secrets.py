"""Credentials never leak: the S3 secret key and session token appear in no output or log.

The jobs run on ``s3://`` with the embedded store's real secret (``objectstore_server.secret_key``,
exported as AWS_SECRET_ACCESS_KEY) and a sentinel AWS_SESSION_TOKEN (rclone ignores it; the
clients send it on every request). Crops, scoring (with one corrupt object, so error rows are
written too) and the report run over a 3-patient synthetic cohort; then every byte they could
have left anywhere is searched: each object under the store's root folder (Parquet decoded:
key-value metadata and every text column, whatever the compression; PNG text chunks; images
embedded in the HTML; zip and gzip members), the test's stdout/stderr and log records, the
rclone log, and every file of the Ray session folder (driver, raylet and worker logs).
"""

from __future__ import annotations

import base64
import gzip
import io
import logging
import os
import re
import secrets
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, PngImagePlugin

from vfx_ray import storage
from vfx_ray.config import SynthConfig
from vfx_ray.ingest import run_crops
from vfx_ray.model import build_model, save_model
from vfx_ray.report import render_report
from vfx_ray.score import run_score
from vfx_ray.synth.cohort import generate_cohort

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


def test_scanner_finds_planted_secrets(tmp_path) -> None:
    """The search would see a secret hidden in compressed Parquet, zTXt or an HTML image."""
    secret = "planted" + secrets.token_hex(8)
    table = pa.table({"x": [1.0], "s": [f"key={secret}"]})
    pq.write_table(table, tmp_path / "a.parquet", compression="zstd")
    pq.write_table(table.drop(["s"]).replace_schema_metadata({"cfg": secret}),
                   tmp_path / "b.parquet", compression="zstd")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", secret, zip=True)
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG", pnginfo=info)
    (tmp_path / "c.html").write_text(
        f'<img src="data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}">')
    hits, n = scan_tree(tmp_path, needles(planted=secret))
    where = {h.split(str(tmp_path) + "/")[1].split(":")[0] for h in hits}
    assert n == 3 and {"a.parquet [column s]", "b.parquet [schema metadata]",
                       "c.html [data URI 0] [PNG text chunks]"} <= where, where
    assert not find("clean", b"nothing here", needles(planted=secret))


@pytest.fixture(scope="module")
def session_token(objectstore_server, request) -> Iterator[str]:
    """A sentinel AWS_SESSION_TOKEN, set before the shared Ray session starts (so its workers
    inherit it, unless an earlier module started Ray: then only the driver has it). The test
    must not request ``ray_session`` itself: session fixtures would start before this one."""
    token = "vfxSentinelToken" + secrets.token_hex(12)
    saved = os.environ.get("AWS_SESSION_TOKEN")
    os.environ["AWS_SESSION_TOKEN"] = token
    request.getfixturevalue("ray_session")
    yield token
    if saved is None:
        os.environ.pop("AWS_SESSION_TOKEN", None)
    else:
        os.environ["AWS_SESSION_TOKEN"] = saved


def test_no_credentials_in_outputs_or_logs(objectstore_server, session_token, capfd,
                                           caplog) -> None:
    import ray

    secret = objectstore_server.secret_key
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret and len(secret) >= 32
    wanted = needles(secret_key=secret, session_token=session_token)
    caplog.set_level(logging.DEBUG, logger="vfx_ray")
    caplog.set_level(logging.INFO)
    root = f"s3://vfx/secrets-{uuid.uuid4().hex[:8]}"
    generate_cohort(root, SynthConfig(patients=3, matrix=128, seed=5), workers=1, progress=True)
    storage.write_bytes(f"{root}/dicom/ZZ_BROKEN/junk.dcm", b"DICM" + b"\0" * 300)
    torch.manual_seed(0)
    model = f"{root}/model/model.pt"
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    archive, annotations = f"{root}/dicom", f"{root}/annotations.csv"
    crops = run_crops(archive, annotations, f"{root}/crops", progress=True)
    scores = run_score(archive, annotations, model, f"{root}/scores", progress=True)
    report = render_report(f"{root}/scores", f"{root}/report", crops_uri=f"{root}/crops")
    try:
        storage.read_bytes(f"{root}/no/such/object")
    except Exception as exc:  # noqa: BLE001 - its message is output too
        print(f"expected failure: {exc!r}")
    assert crops["crops"] > 0 and crops["errors"] >= 1, crops
    assert scores["rows"] == 3, scores
    assert report["figures"], report

    out, err = capfd.readouterr()
    records = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.args!r}"
                        for r in caplog.records)
    hits = [*find("captured stdout", out.encode(), wanted),
            *find("captured stderr", err.encode(), wanted),
            *find("log records", (caplog.text + records).encode(), wanted)]
    store_root = objectstore_server.root_path
    store_hits, n_objects = scan_tree(store_root, wanted)
    rclone_log = store_root.parent / "rclone.log"
    if rclone_log.exists():
        hits += find(str(rclone_log), rclone_log.read_bytes(), wanted)
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    ray_hits, n_logs = scan_tree(session_dir, wanted)
    ours = store_root / root.removeprefix("s3://")
    expected_outputs = {"crops.parquet", "errors.parquet", "series_index.parquet",
                        "manifest.json", "scores.parquet", "report.html", "report.md"}
    assert expected_outputs <= {p.name for p in ours.rglob("*")}, sorted(ours.rglob("*"))
    assert n_objects >= 20 and n_logs >= 5, (n_objects, n_logs)
    leaks = hits + store_hits + ray_hits
    assert not leaks, "credentials found in:\n" + "\n".join(leaks)


def test_no_credentials_when_joining_a_cluster(objectstore_server, session_token) -> None:
    """A second driver joins the running Ray instance through ensure_ray, as `ray job submit`
    scripts and a RAY_ADDRESS shell do, and runs one task; its output and Ray's logs are searched."""
    import subprocess
    import sys

    import ray

    node = ray._private.worker._global_node
    code = ("import ray\nfrom vfx_ray.raysession import ensure_ray\nensure_ray()\n"
            "print(ray.get(ray.remote(lambda: 1).remote()))\n")
    env = {**os.environ, "RAY_ADDRESS": node.gcs_address}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=180)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    wanted = needles(secret_key=objectstore_server.secret_key, session_token=session_token)
    hits = [*find("driver stdout", run.stdout, wanted), *find("driver stderr", run.stderr, wanted)]
    hits += scan_tree(Path(node.get_session_dir_path()), wanted)[0]
    assert not hits, "credentials found in:\n" + "\n".join(hits)
