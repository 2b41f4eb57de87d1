"""The pipeline's pure parts, without Ray: chunking, row encoding, the first pass's index,
planning and the ordered patient stream (the Ray side is exercised by test_ingest/test_score)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from phantoms import PATIENT, centred_geometry, series

from vfx_ray import contracts, storage
from vfx_ray.config import CropConfig
from vfx_ray.imaging import dicom
from vfx_ray.imaging.annotations import PatientTask
from vfx_ray.pipeline import datasets, passes, tasks, wire
from vfx_ray.pipeline.wire import CROP_WIRE, SCORED_WIRE, Kind

CFG = CropConfig(crop_size=8)
SHAPE = (CFG.channels, CFG.crop_size, CFG.crop_size)


def crop_record(pid: str, i: int) -> dict:
    image = np.full(SHAPE, 10 * int(pid[1:]) + i, np.float32)
    return {"slice_index": i, "offset_mm": float(i - 1), "image": image}


def task(pid: str, keys=("k1",)) -> PatientTask:
    return PatientTask(patient_id=pid, series_instance_uid=f"uid-{pid}", object_keys=list(keys), roi=(0, 1, 0, 1, 0, 1))


def task_dict(pid: str) -> dict:
    return {"patient_id": pid, "series_instance_uid": f"uid-{pid}", "label": 1, "vertebra": "L1"}


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CROP_WIRE)


# ---------------------------------------------------------------- chunks
def test_chunks_keep_folders_whole_within_limits():
    def e(path, size=10):
        return storage.FileEntry(uri=f"s3://b/{path}", size=size)

    entries = (
        [e(f"p1/s/{i}") for i in range(3)]
        + [e(f"p2/s/{i}") for i in range(4)]
        + [e(f"p3/s/{i}", 100) for i in range(2)]
    )
    chunks = passes.chunk_entries(entries, max_objects=5, max_bytes=150)
    assert [len(c) for c in chunks] == [3, 5, 1]  # p1 | p2 (cannot join p1) + first piece of p3 (cut by bytes) | rest
    assert [x for c in chunks for x in c] == entries
    assert passes.chunk_entries(entries, max_objects=100, max_bytes=10**6) == [entries]
    assert [len(c) for c in passes.chunk_entries(entries[:3] + entries[3:7], max_objects=2)] == [2, 1, 2, 2]
    assert passes.chunk_entries([]) == []
    # a small target packs fewer folders per chunk but never cuts one
    assert [len(c) for c in passes.chunk_entries(entries, max_objects=100, max_bytes=10**6, target_objects=3)] == [
        3,
        4,
        2,
    ]


def test_chunk_items_are_named_by_their_keys_and_sizes_and_cover_the_listing():
    entries = [storage.FileEntry(uri=f"s3://b/p{i // 4}/{i}.dcm", size=100 + i) for i in range(24)]
    items = passes.chunk_items(entries, cpus=2)
    assert len(items) == 6 and [u for i in items for u in i["uris"]] == [e.uri for e in entries]
    assert items == passes.chunk_items(entries, cpus=2)  # the same archive: the same names
    grown = [*entries[:-1], storage.FileEntry(uri=entries[-1].uri, size=1)]
    assert passes.chunk_items(grown, cpus=2)[-1]["chunk"] != items[-1]["chunk"]  # a changed object: a new chunk


def test_decode_tasks_reserve_their_memory_within_a_cap():
    typical = 512 * 512 * 600  # a large CT series: 0.6 GB as float32
    need = datasets.decode_memory(tasks.CHUNK_BYTES, max_voxels=typical)
    assert need == datasets.DECODE_WORKER_BYTES + tasks.CHUNK_BYTES + 2 * 4 * typical  # bytes + volume + copy
    assert datasets.decode_memory(tasks.CHUNK_BYTES) == datasets.DECODE_MEMORY_CAP  # the refusal limit is capped
    assert datasets.decode_memory(0, max_voxels=10**12, cap=3 << 30) == 3 << 30
    # a 2-core, 24 GiB machine gives Ray ~13 GiB of memory: both cores still decode
    assert 2 * datasets.decode_memory(datasets.SERIES_BYTES_PER_VOXEL * dicom.MAX_VOXELS) <= 13 << 30


@pytest.mark.parametrize(
    "archive, key, escapes",
    [
        ("s3://b/archive", "s3://b/archive/p/1.dcm", False),
        ("s3://b/archive", "s3://b/archive/../secret.dcm", True),
        ("s3://b/archive", "s3://b/archive/p/../../x.dcm", True),
        ("s3://b/archive", "s3://b/archive2/x.dcm", True),
    ],
)
def test_escaping_keys(archive, key, escapes):
    assert passes.escapes_prefix(archive, key) is escapes


# ---------------------------------------------------------------- rows
def test_crop_rows_decode_to_the_contract_table_and_errors_stay_apart():
    rows = wire.crops(task_dict("P1"), [crop_record("P1", i) for i in range(3)])
    rows.insert(1, wire.error(ValueError("bad slice"), "decode", task_dict("P2")))
    crops, errors = wire.to_crops(table(rows), CFG)
    assert crops.schema == contracts.crops_schema(CFG.channels, CFG.crop_size)
    assert crops["slice_index"].to_pylist() == [0, 1, 2] and set(crops["patient_id"].to_pylist()) == {"P1"}
    assert crops["label"].to_pylist() == [1, 1, 1] and crops["vertebra"].to_pylist() == ["L1"] * 3
    np.testing.assert_array_equal(contracts.images_from_arrow(crops["image"])[2], crop_record("P1", 2)["image"])
    assert [(e["patient_id"], e["stage"], e["error_type"]) for e in errors] == [("P2", "decode", "ValueError")]
    empty, none = wire.to_crops(table([]), CFG)
    assert (empty.num_rows, none, empty.schema) == (0, [], crops.schema)


def test_wire_images_views_equal_sized_crops_and_refuses_others():
    crops = np.random.default_rng(0).normal(0, 1, (12, *SHAPE)).astype(np.float32)
    arr = pa.array([c.tobytes() for c in crops], pa.binary())
    np.testing.assert_array_equal(wire.images(arr, SHAPE), crops)
    np.testing.assert_array_equal(wire.images(arr.slice(7, 5), SHAPE), crops[7:12])
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 4)])
    np.testing.assert_array_equal(wire.images(chunked, SHAPE), crops[:7])
    assert wire.images(arr.slice(0, 0), SHAPE).shape == (0, *SHAPE)
    with pytest.raises(ValueError, match=f"expected {4 * np.prod(SHAPE)}"):
        wire.images(pa.array([crops[0].tobytes(), b"\0" * 8]), SHAPE)


def test_kinds_are_the_strings_on_the_wire():
    assert wire.row("P1", Kind.CANDIDATE, {})["kind"] == "candidate"
    assert {str(k) for k in Kind} == {"crop", "error", "headers", "header_error", "candidate", "chunk_end", "reads"}


# ---------------------------------------------------------------- first pass and plan
def headers_row(*keys: str, pid: str = "P1") -> dict:
    hs = [{"object_key": k, "patient_id": pid, "series_instance_uid": f"uid-{pid}"} for k in keys]
    return wire.row("", Kind.HEADERS, hs)


def test_split_chunks_cuts_at_chunk_ends_across_batches_and_keeps_an_unended_tail():
    r = [headers_row("a"), wire.row("", Kind.CHUNK_END, {"chunk": "c1"}), headers_row("b"),
         headers_row("c"), wire.row("", Kind.CHUNK_END, {"chunk": "c2"}), headers_row("d")]
    batches = [table(r[:3]), table(r[3:5]), table(r[5:])]
    got = [
        (name, [json.loads(m)[0]["object_key"] for m in t["meta"].to_pylist()])
        for name, t in passes.split_chunks(batches)
    ]
    assert got == [("c1", ["a"]), ("c2", ["b", "c"]), (None, ["d"])]
    assert list(passes.split_chunks([table(r[:2])])) != [] and len(list(passes.split_chunks([table(r[:2])]))) == 1


def test_a_chunk_is_kept_only_whole_and_without_errors():
    uris = ["s3://a/1.dcm", "s3://a/2.dcm"]
    candidate = wire.row("P1", Kind.CANDIDATE, {"series_instance_uid": "u", "keys": "f"})
    crop = wire.crops(task_dict("P1"), [crop_record("P1", 0)])[0]
    header_error = wire.row("", Kind.HEADER_ERROR, {"object_key": uris[1]})
    assert passes.clean_chunk(table([headers_row(uris[1], uris[0]), candidate, crop]), uris)
    assert not passes.clean_chunk(table([headers_row(uris[0]), crop]), uris)  # rows of another chunk
    assert not passes.clean_chunk(table([candidate, crop]), uris)  # its headers row was lost
    assert not passes.clean_chunk(table([headers_row(*uris), wire.error(ValueError(), "crop", task_dict("P1"))]), uris)
    assert not passes.clean_chunk(table([headers_row(uris[0]), header_error]), uris)


def test_the_index_vouches_only_for_a_chunk_that_held_the_planned_series_complete():
    index = passes.ArchiveIndex()
    whole, partial = task("P1", ["a", "b"]), task("P2", ["c", "d"])
    index.absorb(table([
        headers_row("a", "b"),
        wire.row("P1", Kind.CANDIDATE, {"series_instance_uid": "uid-P1", "keys": wire.fingerprint(["b", "a"])}),
        wire.row("P2", Kind.CANDIDATE, {"series_instance_uid": "uid-P2", "keys": wire.fingerprint(["c"])}),
        wire.row("", Kind.HEADER_ERROR, {"object_key": "x", "message": "m", "error_type": "Bad"}),
    ]))
    assert index.read_once([whole, partial]) == {"P1"}
    assert {h["object_key"] for h in index.headers} == {"a", "b"} and index.seen == {"a", "b", "x"}
    index.report_lost([storage.FileEntry("a", 1), storage.FileEntry("z", 1)])
    assert [(e.get("object_key"), e["error_type"]) for e in index.errors] == [("x", "Bad"), ("z", "TaskLost")]


def test_plan_joins_annotations_to_the_whole_index():
    files = series(np.zeros((4, 16, 16), np.float32), centred_geometry((1, 0, 0), (0, 1, 0), (4, 16, 16)))
    headers = [dicom.read_header(data, f"s3://a/{PATIENT.patient_id}/{name}") for name, data in files]
    uid = headers[0]["series_instance_uid"]
    index = passes.ArchiveIndex(headers=headers)
    index.candidates[PATIENT.patient_id] = {(uid, wire.fingerprint([h["object_key"] for h in headers]))}
    centre = np.reshape(dicom.extent(headers), (3, 2)).mean(axis=1)  # an ROI inside the series
    box = {f"roi_{a}_{m}_mm": [c + (1.0 if m == "max" else -1.0)] * 2 for a, c in zip("xyz", centre, strict=True)
           for m in ("min", "max")}
    ann = pd.DataFrame({"patient_id": [PATIENT.patient_id, "P9"], **box})
    plan = passes.plan(ann, index, CFG, None)
    assert [(t.patient_id, t.series_instance_uid, len(t.object_keys)) for t in plan.tasks] == [
        (PATIENT.patient_id, uid, 4)
    ]
    assert plan.read_once == {PATIENT.patient_id} and plan.second_pass() == []
    assert plan.selection == {uid: "selected"}
    assert [(e["patient_id"], e["error_type"]) for e in plan.errors] == [("P9", "SeriesNotFound")]
    index.candidates[PATIENT.patient_id] = {(uid, wire.fingerprint([h["object_key"] for h in headers[:3]]))}
    again = passes.plan(ann, index, CFG, None)  # the chunk held 3 of the 4 objects: the second pass
    assert again.read_once == set() and [t.patient_id for t in again.second_pass()] == [PATIENT.patient_id]


# ---------------------------------------------------------------- the patient stream
def scored(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**{k: r[k] for k in ("patient_id", "kind", "meta")}, "probability": 0.5,
                                  "embedding": None} for r in rows], schema=SCORED_WIRE)


@pytest.mark.parametrize("as_scored", [False, True])
def test_patient_stream_yields_each_planned_patient_once_in_order_and_reports_the_lost(as_scored):
    planned = [task(p) for p in ("P1", "P2", "P3", "P4")]
    p1 = wire.crops(task_dict("P1"), [crop_record("P1", i) for i in range(3)])
    p3 = [*wire.crops(task_dict("P3"), [crop_record("P3", 0)]), wire.error(ValueError("x"), "crop", task_dict("P3"))]
    batches = [table(p1[:2]), table(p1[2:] + p3[:1]), table(p3[1:])]  # P1 spans two batches; P2, P4 never come
    got = list(
        passes.patient_stream([scored(b.to_pylist()) for b in batches] if as_scored else batches, planned, "crop")
    )
    assert [p.task.patient_id for p in got] == ["P1", "P2", "P3", "P4"]
    assert [None if p.rows is None else p.rows.num_rows for p in got] == [3, None, 2, None]
    assert [[e["error_type"] for e in p.errors] for p in got] == [[], ["TaskLost"], ["ValueError"], ["TaskLost"]]
    assert got[1].errors[0]["patient_id"] == "P2" and got[1].errors[0]["stage"] == "crop"


def test_patient_stream_refuses_rows_out_of_order():
    planned = [task("P1"), task("P2")]
    rows = [*wire.crops(task_dict("P2"), [crop_record("P2", 0)]), *wire.crops(task_dict("P1"), [crop_record("P1", 0)])]
    with pytest.raises(RuntimeError, match="P1"):
        list(passes.patient_stream([table(rows)], planned, "crop"))


def test_a_store_outage_fails_the_stream_without_naming_the_object():
    planned = [task("P1")]
    down = wire.row("P1", Kind.ERROR, {"patient_id": "P1", "error_type": "StoreUnavailable",
                                       "message": "s3://b/P1/1.dcm: store down", "object_key": "s3://b/P1/1.dcm"})
    with pytest.raises(storage.StoreUnavailable) as info:
        list(passes.patient_stream([table([down])], planned, "crop"))
    assert "P1/1.dcm" not in str(info.value)
