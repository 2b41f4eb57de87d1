"""The storage layer against the local filesystem and the embedded S3 server."""

from __future__ import annotations

import gzip
import os
import uuid

import boto3
import numpy as np
import pyarrow as pa
import pytest

from vfx_ray import contracts, storage
from vfx_ray.runtime import train_storage


@pytest.fixture(params=["local", "s3"])
def base_uri(request, tmp_path, objectstore_server):
    if request.param == "local":
        return str(tmp_path / "data")
    return f"s3://test/{uuid.uuid4().hex}"


def test_bytes_round_trip_and_listing(base_uri):
    storage.write_bytes(storage.join(base_uri, "a", "x.bin"), b"\x00\x01payload")
    storage.write_text(storage.join(base_uri, "b", "deep", "y.txt"), "hello")
    assert storage.read_bytes(storage.join(base_uri, "a", "x.bin")) == b"\x00\x01payload"
    assert storage.read_text(storage.join(base_uri, "b", "deep", "y.txt")) == "hello"
    entries = storage.list_files(base_uri)
    names = [e.uri.rsplit("/", 1)[-1] for e in entries]
    assert names == ["x.bin", "y.txt"]
    assert [e.size for e in entries] == [9, 5]
    assert storage.list_files(base_uri, suffix=".txt")[0].uri.endswith("b/deep/y.txt")
    assert storage.exists(storage.join(base_uri, "a", "x.bin"))
    assert not storage.exists(storage.join(base_uri, "nope"))


def test_compressed_objects_are_read_as_stored(base_uri):
    """A ".gz" object (a NIfTI mask) comes back as its bytes, not gunzipped on the way."""
    data = gzip.compress(b"a NIfTI mask, say")
    storage.write_bytes(storage.join(base_uri, "mask.nii.gz"), data)
    assert storage.read_bytes(storage.join(base_uri, "mask.nii.gz")) == data


def test_table_round_trip_keeps_tensor_and_metadata(base_uri):
    rng = np.random.default_rng(0)
    rows = [
        {
            "patient_id": f"P{i}",
            "series_instance_uid": "1.2.3",
            "vertebra": "L2",
            "slice_index": i,
            "slice_x_mm": 3.0 * i,
            "label": i % 2,
            "image": rng.normal(size=(3, 8, 8)).astype(np.float32),
            "box_y_min_mm": 0.0,
            "box_y_max_mm": 1.0,
            "box_z_min_mm": 0.0,
            "box_z_max_mm": 1.0,
        }
        for i in range(4)
    ]
    table = contracts.crops_table(rows, channels=3, size=8)
    uri = storage.join(base_uri, "crops.parquet")
    storage.write_table(table, uri, metadata={"vfx_ray.config": '{"a": 1}'})
    back = storage.read_table(uri)
    assert back.schema.metadata[b"vfx_ray.config"] == b'{"a": 1}'
    images = contracts.images_from_arrow(back["image"])
    np.testing.assert_array_equal(images, np.stack([r["image"] for r in rows]))
    assert back["label"].to_pylist() == [0, 1, 0, 1]


def test_missing_prefix_is_a_clear_error(base_uri):
    with pytest.raises(FileNotFoundError, match="nothing at"):
        storage.list_files(storage.join(base_uri, "absent"))


def test_boto3_and_storage_layer_see_the_same_objects(objectstore_server):
    """boto3 (reads AWS_ENDPOINT_URL itself) and pyarrow (needs endpoint_override) agree."""
    key = f"{uuid.uuid4().hex}/obj.bin"
    client = boto3.client("s3")  # standard variables only, nothing passed
    client.put_object(Bucket="test", Key=key, Body=b"from-boto3")
    assert storage.read_bytes(f"s3://test/{key}") == b"from-boto3"
    storage.write_bytes(f"s3://test/{key}.2", b"from-pyarrow")
    assert client.get_object(Bucket="test", Key=key + ".2")["Body"].read() == b"from-pyarrow"
    listed = client.list_objects_v2(Bucket="test", Prefix=key.split("/")[0])
    assert sorted(o["Key"] for o in listed["Contents"]) == [key, key + ".2"]
    # the objects are files in the served folder: it is a real store, not a mock
    assert (objectstore_server.root_path / "test" / key).read_bytes() == b"from-boto3"


def test_wrong_credentials_are_refused(objectstore_server, monkeypatch):
    """An object that exists, read with a wrong secret: refused for the key, not 'not found'."""
    uri = f"s3://test/creds-{uuid.uuid4().hex[:8]}.bin"
    storage.write_bytes(uri, b"secret")
    assert storage.read_bytes(uri) == b"secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(OSError, match=r"(?i)access denied|forbidden|signature|403") as err:
        storage.read_bytes(uri)
    assert not isinstance(err.value, FileNotFoundError)


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """A failing write leaves the old content and no temp file behind."""
    target = tmp_path / "t.parquet"
    storage.write_table(pa.table({"a": [1]}), str(target))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_table(pa.table({"a": [2]}), str(target))
    assert storage.read_table(str(target))["a"].to_pylist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_large_multipart_object_round_trips(objectstore_server):
    """Objects above the SDKs' multipart thresholds (pyarrow 10 MiB parts, boto3 8 MiB)."""
    data = np.random.default_rng(1).bytes(23 * 1024 * 1024)
    uri = f"s3://test/{uuid.uuid4().hex}/big.bin"
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    client = storage.boto3_client()
    bucket, key = uri[len("s3://") :].split("/", 1)
    assert client.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(data)


def test_region_is_the_configured_one_or_the_buckets(monkeypatch):
    asked: list[str] = []

    def resolve(bucket: str) -> str:
        asked.append(bucket)
        return "eu-west-1"

    def unreachable(bucket: str) -> str:
        raise OSError("no route to AWS")

    assert storage.choose_region({"AWS_REGION": "us-west-2"}, "b", resolve) == "us-west-2"
    assert storage.choose_region({"AWS_DEFAULT_REGION": "ap-south-1"}, "b", resolve) == "ap-south-1"
    assert asked == []  # a configured region is never second-guessed
    assert storage.choose_region({}, "b", resolve) == "eu-west-1" and asked == ["b"]  # AWS: the bucket's
    assert storage.choose_region({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "b", resolve) == "us-east-1"
    assert storage.choose_region({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}, "b", resolve) == "us-east-1"
    assert storage.choose_region({}, None, resolve) == "us-east-1" and asked == ["b"]
    assert storage.choose_region({}, "b", unreachable) == "us-east-1"  # the request itself will say why
    # asked once per bucket and process
    calls: list[str] = []
    monkeypatch.setattr(storage.pafs, "resolve_s3_region", lambda bucket: calls.append(bucket) or "eu-north-1")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    storage._bucket_region.cache_clear()
    try:
        assert [storage.s3_region("b1"), storage.s3_region("b1"), storage.s3_region("b2")] == ["eu-north-1"] * 3
        assert calls == ["b1", "b2"]
    finally:
        storage._bucket_region.cache_clear()


def test_marker_free_filesystem_only_for_custom_endpoints(monkeypatch, tmp_path):
    import pyarrow.fs as pafs

    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.setenv(name, "WHEN_REQUIRED")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # an S3-compatible server
    path, fs = train_storage.marker_free_filesystem("s3://bkt/run/ray_train")
    assert path == "bkt/run/ray_train" and isinstance(fs, pafs.PyFileSystem)
    assert isinstance(fs.handler, train_storage.NoDirMarkers)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # AWS S3: the URI, for Ray to open with pyarrow's own
    assert train_storage.marker_free_filesystem("s3://bkt/run/ray_train") == ("s3://bkt/run/ray_train", None)
    monkeypatch.chdir(tmp_path)
    assert train_storage.marker_free_filesystem("runs/x") == (str(tmp_path / "runs" / "x"), None)


def test_credentials_held_back_leave_the_environment_but_not_storage(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    with storage.credentials_held_back():
        assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
        assert storage.credentials() == ("AKIDEXAMPLE", "s3cr3t", None)  # what boto3/pyarrow get
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("AKIDEXAMPLE", "s3cr3t")
    assert storage.credentials() == ("AKIDEXAMPLE", "s3cr3t", None)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert storage.credentials()[0] is None  # nothing is kept once the block ends


def test_marker_free_filesystem_pickles_without_credentials(objectstore_server):
    import pickle

    path, fs = train_storage.marker_free_filesystem("s3://test/pickled/run")
    blob = pickle.dumps(fs)  # what Ray Tune writes into tuner.pkl in the output folder
    assert objectstore_server.secret_key.encode() not in blob
    assert os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    again = pickle.loads(blob)  # rebuilt from this process's environment, and it works
    with again.open_output_stream(f"{path}/x.txt") as f:
        f.write(b"ok")
    assert storage.read_bytes("s3://test/pickled/run/x.txt") == b"ok"
