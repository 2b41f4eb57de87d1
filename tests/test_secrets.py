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
import io
import logging
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from leakscan import find, needles, scan_tree
from PIL import Image, PngImagePlugin

from vfx_ray import storage
from vfx_ray.config import EASY, SynthConfig
from vfx_ray.ml.model import build_model, save_model
from vfx_ray.report.render import render_report
from vfx_ray.stages.crops import run_crops
from vfx_ray.stages.score import run_score
from vfx_ray.synth.cohort import generate_cohort


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


@pytest.mark.slow
def test_no_credentials_in_outputs_or_logs(objectstore_server, session_token, pacs_server, capfd,
                                           caplog) -> None:
    """Also the PACS's password, where Orthanc is installed: the SRs go there."""
    import ray

    secret = objectstore_server.secret_key
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret and len(secret) >= 32
    pacs_secret = {"pacs_password": pacs_server.password} if pacs_server else {}
    wanted = needles(secret_key=secret, session_token=session_token, **pacs_secret)
    caplog.set_level(logging.DEBUG, logger="vfx_ray")
    caplog.set_level(logging.INFO)
    root = f"s3://vfx/secrets-{uuid.uuid4().hex[:8]}"
    generate_cohort(root, SynthConfig(patients=3, matrix=128, seed=5, difficulty=EASY), workers=1, progress=True)
    storage.write_bytes(f"{root}/dicom/ZZ_BROKEN/junk.dcm", b"DICM" + b"\0" * 300)
    torch.manual_seed(0)
    model = f"{root}/model/model.pt"
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    archive, annotations = f"{root}/dicom", f"{root}/annotations.csv"
    crops = run_crops(archive, annotations, f"{root}/crops", progress=True)
    scores = run_score(archive, annotations, model, f"{root}/scores", progress=True,
                       sr_out=pacs_server.dicomweb_uri if pacs_server else None)
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
    if pacs_server:  # its storage and log (its 0600 configuration holds the password by design)
        assert scores["sr_objects_sent"] + scores["sr_objects_already_there"] == 3, scores
        pacs_root = Path(pacs_server.root)
        pacs_hits, _ = scan_tree(pacs_root / "storage", wanted)
        hits += pacs_hits + find("orthanc.log", (pacs_root / "orthanc.log").read_bytes(), wanted)
    leaks = hits + store_hits + ray_hits
    assert not leaks, "credentials found in:\n" + "\n".join(leaks)


@pytest.mark.slow
def test_no_credentials_when_joining_a_cluster(objectstore_server, session_token) -> None:
    """A second driver joins the running Ray instance through ensure_ray, as `ray job submit`
    scripts and a RAY_ADDRESS shell do, and runs one task; its output and Ray's logs are searched."""
    import subprocess
    import sys

    import ray

    node = ray._private.worker._global_node
    code = ("import ray\nfrom vfx_ray.runtime.session import ensure_ray\nensure_ray()\n"
            "print(ray.get(ray.remote(lambda: 1).remote()))\n")
    env = {**os.environ, "RAY_ADDRESS": node.gcs_address}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=180)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    wanted = needles(secret_key=objectstore_server.secret_key, session_token=session_token)
    hits = [*find("driver stdout", run.stdout, wanted), *find("driver stderr", run.stderr, wanted)]
    hits += scan_tree(Path(node.get_session_dir_path()), wanted)[0]
    assert not hits, "credentials found in:\n" + "\n".join(hits)


def test_workers_of_a_cluster_get_the_store_settings_never_credentials() -> None:
    from vfx_ray.runtime.session import FORWARDED_ENV, worker_env

    shell = {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://store:9000", "AWS_DEFAULT_REGION": "",
             "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t0k3n"}
    assert worker_env(shell) == {}  # a local instance: its workers inherit the environment
    assert worker_env({**shell, "RAY_ADDRESS": "local"}) == {}
    joined = worker_env({**shell, "RAY_ADDRESS": "10.0.0.1:6379"})
    assert joined == {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://store:9000"}
    region_only = worker_env({"AWS_REGION": "eu-west-1", "RAY_ADDRESS": "auto"})  # AWS S3, no endpoint
    assert region_only == {"AWS_REGION": "eu-west-1"}
    assert not {k for k in FORWARDED_ENV if "KEY" in k or "TOKEN" in k or "SECRET" in k}
