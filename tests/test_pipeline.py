"""The pipeline's pure parts, without Ray: chunking, row encoding, the first pass's index,
planning and the ordered patient stream (the Ray side is exercised by test_ingest/test_score)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from phantoms import PATIENT, centred_geometry, series

from vfx_ray import contracts, storage
from vfx_ray.config import CropConfig
from vfx_ray.imaging import annotations as ann_mod
from vfx_ray.imaging import dicom, pseudonym
from vfx_ray.imaging.annotations import PatientTask
from vfx_ray.pipeline import datasets, passes, shards, tasks, wire
from vfx_ray.pipeline.index import ArchiveIndex
from vfx_ray.pipeline.wire import CROP_WIRE, SCORED_WIRE, Kind
from vfx_ray.stages import crops as crops_stage

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
    chunks = shards.chunk_entries(entries, max_objects=5, max_bytes=150)
    assert [len(c) for c in chunks] == [3, 5, 1]  # p1 | p2 (cannot join p1) + first piece of p3 (cut by bytes) | rest
    assert [x for c in chunks for x in c] == entries
    assert shards.chunk_entries(entries, max_objects=100, max_bytes=10**6) == [entries]
    assert [len(c) for c in shards.chunk_entries(entries[:3] + entries[3:7], max_objects=2)] == [2, 1, 2, 2]
    assert shards.chunk_entries([]) == []
    # a small target packs fewer folders per chunk but never cuts one
    assert [len(c) for c in shards.chunk_entries(entries, max_objects=100, max_bytes=10**6, target_objects=3)] == [
        3,
        4,
        2,
    ]


def test_chunks_are_named_by_their_keys_and_sizes_and_cover_the_listing():
    entries = [storage.FileEntry(uri=f"s3://b/p{i // 4}/{i}.dcm", size=100 + i) for i in range(24)]
    items = shards.chunks_of(entries, "s3://b", target_objects=4)
    assert len(items) == 6 and [u for i in items for u in i["uris"]] == [e.uri for e in entries]
    assert items == shards.chunks_of(entries, "s3://b", target_objects=4)  # the same archive: the same names
    grown = [*entries[:-1], storage.FileEntry(uri=entries[-1].uri, size=1)]
    assert shards.chunks_of(grown, "s3://b", target_objects=4)[-1]["chunk"] != items[-1]["chunk"]  # a new chunk


def test_shards_group_the_top_folders_and_cut_the_root_objects(tmp_path):
    for p in range(10):
        (tmp_path / f"p{p}" / "s").mkdir(parents=True)
        (tmp_path / f"p{p}" / "s" / "1.dcm").write_bytes(b"x")
    for i in range(3):
        (tmp_path / f"{i}.dcm").write_bytes(b"xy")
    got = shards.shards(str(tmp_path), cpus=1)  # 4 shards per CPU
    assert [len(g["folders"]) for g in got] == [2, 3, 2, 3, 0] and [g["shard"] for g in got] == [0, 1, 2, 3, 4]
    assert [f for g in got for f in g["folders"]] == [str(tmp_path / f"p{p}") for p in range(10)]
    assert got[-1]["files"] == [[str(tmp_path / f"{i}.dcm"), 2] for i in range(3)]
    entries, errors = shards.list_shard(got[0], str(tmp_path), CropConfig(max_file_bytes=10))
    assert [e.uri for e in entries] == [str(tmp_path / f"p{p}" / "s" / "1.dcm") for p in (0, 1)] and errors == []
    gone = {"shard": 9, "folders": [str(tmp_path / "nowhere")], "files": [[str(tmp_path / "0.dcm"), 2]]}
    entries, errors = shards.list_shard(gone, str(tmp_path), CropConfig(max_file_bytes=1))
    assert entries == [] and [(e["object_key"], e["stage"], e["error_type"]) for e in errors] == [
        (str(tmp_path / "nowhere"), "list", "FileNotFoundError"), (str(tmp_path / "0.dcm"), "list", "FileTooLarge")]


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
    assert shards.escapes_prefix(archive, key) is escapes


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


def test_a_task_writes_its_crops_as_a_part_and_the_join_keeps_the_planned_patients(tmp_path):
    pseudo = pseudonym.Pseudonymizer("k" * 40)
    parts = tasks.CropParts(str(tmp_path / "parts"), pseudo)
    rows = [*wire.crops(task_dict("P1"), [crop_record("P1", i) for i in range(2)]),
            wire.error(ValueError("bad slice"), "decode", task_dict("P2")),
            *wire.crops(task_dict("P3"), [crop_record("P3", 0)])]
    out = parts.put(rows, "chunk-a", CFG)
    assert [r["kind"] for r in out] == ["error", "part"]  # the pixels stay on the worker
    part = json.loads(out[1]["meta"])["uri"]
    written = storage.read_table(part)
    expected = pseudo.table(wire.to_crops(table(rows), CFG)[0])  # ids hidden before they reach the store
    assert written.equals(expected) and "P1" not in written["patient_id"].to_pylist()
    assert parts.put(out[:1], "chunk-b", CFG) == out[:1] and not (tmp_path / "parts" / "chunk-b.parquet").exists()
    second = parts.put(wire.crops(task_dict("P4"), [crop_record("P4", 5)]), "patient-x", CFG, "P4")
    assert [(r["patient_id"], r["kind"]) for r in second] == [("P4", "part")]
    # the join: a first-pass part keeps the patients it vouched for (P3 took the second pass), in order
    uris = [(part, True), (json.loads(second[0]["meta"])["uri"], False)]
    got = crops_stage.write_crops(uris, [pseudo.patient("P1")], str(tmp_path / "crops.parquet"), {"a": "b"}, CFG)
    crops = storage.read_table(str(tmp_path / "crops.parquet"))
    assert (got.crops, got.patients) == (3, 2) and crops.schema.metadata == {b"a": b"b"}
    assert crops["patient_id"].to_pylist() == [pseudo.patient(p) for p in ("P1", "P1", "P4")]
    assert crops["slice_index"].to_pylist() == [0, 1, 5]
    (tmp_path / "file").write_text("")  # a part that cannot be written: each patient's error row, no crop lost unseen
    failed = tasks.CropParts(str(tmp_path / "file" / "parts")).put(rows, "chunk-c", CFG)
    assert [(r["kind"], r["patient_id"]) for r in failed] == [("error", "P2"), ("error", "P1"), ("error", "P3")]
    assert {json.loads(r["meta"])["stage"] for r in failed} == {"decode", "crop"}


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
    assert {str(k) for k in Kind} == {"crop", "error", "series", "header_error", "candidate", "chunk_end", "cached",
                                      "reads", "part"}


# ---------------------------------------------------------------- first pass and plan
def series_row(*keys: str, pid: str | None = "P1", uid: str | None = None) -> dict:
    """A SERIES row as a task sends it, from a real record of these objects' headers."""
    files = series(np.zeros((len(keys), 16, 16), np.float32), centred_geometry((1, 0, 0), (0, 1, 0),
                                                                                (len(keys), 16, 16)))
    hs = [{**dicom.read_header(data, key), "patient_id": pid, "series_instance_uid": uid or f"uid-{pid}"}
          for key, (_, data) in zip(keys, files, strict=True)]
    return tasks.series_rows(hs)[0]


def end(chunk: str | None, shard: int = 0, **more) -> dict:
    return wire.row("", Kind.CHUNK_END, {"chunk": chunk, "shard": shard, **more})


def test_split_chunks_cuts_at_chunk_ends_across_batches_and_keeps_an_unended_tail():
    r = [series_row("a"), end("c1"), series_row("b"), series_row("c"), end("c2"), series_row("d")]
    batches = [table(r[:3]), table(r[3:5]), table(r[5:])]
    got = [
        (meta and meta["chunk"], [json.loads(m)["record"]["object_keys"][0] for m in t["meta"].to_pylist()])
        for meta, t in passes.split_chunks(batches)
    ]
    assert got == [("c1", ["a"]), ("c2", ["b", "c"]), (None, ["d"])]
    assert len(list(passes.split_chunks([table(r[:2])]))) == 1


def test_series_rows_carry_the_record_sizes_and_sop_references_in_key_order():
    files = series(np.zeros((3, 16, 16), np.float32), centred_geometry((1, 0, 0), (0, 1, 0), (3, 16, 16)))
    hs = [{**dicom.read_header(data, key), "size": size}
          for key, size, (_, data) in zip(["k2", "k1", "k3"], [20, 10, 30], files, strict=True)]
    (row,) = tasks.series_rows(hs)
    meta = json.loads(row["meta"])
    assert meta["record"] == {**dicom.group_series(hs)[0], "object_keys": ["k1"]}  # the first key only
    objects = wire.unpack_objects(meta["objects"])
    assert objects["object_keys"] == ["k1", "k2", "k3"]
    assert objects["sizes"] == [10, 20, 30] and meta["keys"] == wire.keys_hash(["k3", "k1", "k2"])
    by_key = {h["object_key"]: h for h in hs}
    assert objects["sops"] == [[by_key[k]["sop_class_uid"], by_key[k]["sop_instance_uid"]] for k in ("k1", "k2", "k3")]


def test_a_series_spread_over_chunks_merges_to_the_record_of_all_its_objects(tmp_path):
    files = series(np.zeros((5, 16, 16), np.float32), centred_geometry((1, 0, 0), (0, 1, 0), (5, 16, 16)))
    hs = [dicom.read_header(data, f"s3://a/P/{name}") for name, data in files]
    whole = dicom.group_series(hs)[0]
    index = ArchiveIndex(str(tmp_path))
    index.absorb(table(tasks.series_rows(hs[3:])), shard=1)  # the later objects arrive first
    index.absorb(table(tasks.series_rows(hs[:3])), shard=0)
    index.close()
    uid = whole["series_instance_uid"]
    summary = index.summaries()[0]
    assert summary == {k: v for k, v in whole.items() if k != "object_keys"}
    assert index.summary(uid, private=True)["keys_hash"] == wire.keys_hash(whole["object_keys"])
    got = list(index.series_objects())
    assert [{k: v for k, v in g.items() if k not in ("object_sizes", "sops")} for g in got] == [whole]
    assert got[0]["object_sizes"] == [h["size"] for h in sorted(hs, key=lambda h: h["object_key"])]
    assert [s[1] for s in got[0]["sops"]] == [h["sop_instance_uid"] for h in sorted(hs, key=lambda h: h["object_key"])]
    assert list(index.series_objects({"another"})) == [] and index.objects == 5


def test_the_index_vouches_only_for_a_chunk_that_held_the_planned_series_complete(tmp_path):
    index = ArchiveIndex(str(tmp_path))
    whole, partial = task("P1", ["a", "b"]), task("P2", ["c", "d"])
    index.absorb(table([
        series_row("a", "b"), series_row("c", "d", pid="P2"),
        wire.row("P1", Kind.CANDIDATE, {"series_instance_uid": "uid-P1", "keys": wire.keys_hash(["b", "a"])}),
        wire.row("P2", Kind.CANDIDATE, {"series_instance_uid": "uid-P2", "keys": wire.keys_hash(["c"])}),
        wire.row("", Kind.HEADER_ERROR, {"object_key": "x", "message": "m", "error_type": "Bad"}),
    ]), shard=0)
    index.close()
    assert index.read_once([whole, partial]) == {"P1"}
    assert index.objects == 5 and [e["object_key"] for e in index.errors] == ["x"]


def test_a_lost_shard_reports_each_object_its_finished_chunks_did_not_index(tmp_path):
    root = tmp_path / "archive"
    for name in ("a", "b", "x", "z"):
        (root / "P1").mkdir(parents=True, exist_ok=True)
        (root / "P1" / name).write_bytes(b"1")
    index = ArchiveIndex(str(tmp_path / "index"))
    keys = [str(root / "P1" / n) for n in ("a", "b")]
    index.absorb(table([series_row(*keys),
                        wire.row("", Kind.HEADER_ERROR, {"object_key": str(root / "P1" / "x"), "error_type": "Bad"})]),
                 shard=0)
    the_shards = [{"shard": 0, "folders": [str(root / "P1")], "files": []}]
    index.finish(the_shards, str(root), CFG)  # the parts file closed, then read back
    assert [(e.get("object_key"), e["error_type"]) for e in index.errors] == [
        (str(root / "P1" / "x"), "Bad"), (str(root / "P1" / "z"), "TaskLost")]
    assert [s["object_keys"] for s in index.series_objects()] == [keys]
    index.shards_done.add(0)
    index.finish(the_shards, str(root), CFG)  # a finished shard: nothing more
    assert len(index.errors) == 2


def test_the_index_looks_series_up_as_a_list_of_its_summaries_does(tmp_path):
    index = ArchiveIndex(str(tmp_path))
    index.absorb(table([series_row("k2", "k1"), series_row("k3", pid="P1", uid="uid-P1b"), series_row("k4", pid="P2"),
                        series_row("k5", pid=None), series_row("z1", pid="P3")]), shard=0)
    index.absorb(table([series_row("a1", pid="P4", uid="uid-P3")]), shard=1)  # one uid, two patients
    listed = ann_mod.ListCatalog(index.summaries())
    for pid in ("P1", "P2", "P3", "P4", "None", "P9"):
        assert index.of_patient(pid) == listed.of_patient(pid), pid
    for uid in ("uid-P1", "uid-P1b", "uid-P2", "uid-None", "uid-P3", "nowhere"):
        assert index.lookup(uid) == listed.lookup(uid), uid
    assert [s["series_instance_uid"] for s in index.of_patient("P1")] == ["uid-P1", "uid-P1b"]
    assert index.of_patient("P3") == [] and index.of_patient("P4")[0]["instance_count"] == 2  # the first key's
    assert not {"object_keys", "keys_hash"} & set(index.lookup("uid-P1"))  # the record, not the bookkeeping


def test_the_series_index_is_written_in_row_groups_of_the_batch_whatever_the_build(tmp_path):
    index = ArchiveIndex(str(tmp_path / "index"))
    index.absorb(table([series_row(f"k{i}", pid=f"P{i}") for i in range(5)]), shard=0)
    index.close()
    chosen, selection = {"uid-P1"}, {"uid-P1": "selected"}
    write = functools.partial(crops_stage.write_series_index, index.parts(), chosen, selection)
    write(str(tmp_path / "a.parquet"), None, batch=4, build=2)
    write(str(tmp_path / "b.parquet"), None)
    a, b = pq.ParquetFile(tmp_path / "a.parquet"), pq.ParquetFile(tmp_path / "b.parquet")
    assert [a.metadata.row_group(i).num_rows for i in range(a.num_row_groups)] == [4, 1]
    assert a.read().equals(b.read()) and b.num_row_groups == 1
    assert a.read().column("selected").to_pylist() == [False, True, False, False, False]


def test_plan_joins_annotations_to_the_whole_index(tmp_path):
    files = series(np.zeros((4, 16, 16), np.float32), centred_geometry((1, 0, 0), (0, 1, 0), (4, 16, 16)))
    headers = [dicom.read_header(data, f"s3://a/{PATIENT.patient_id}/{name}") for name, data in files]
    uid = headers[0]["series_instance_uid"]
    keys = [h["object_key"] for h in headers]
    index = ArchiveIndex(str(tmp_path))
    index.absorb(table(tasks.series_rows(headers)), shard=0)
    index.close()
    index.candidates[PATIENT.patient_id] = {(uid, wire.keys_hash(keys))}
    centre = np.reshape(dicom.extent(headers), (3, 2)).mean(axis=1)  # an ROI inside the series
    box = {f"roi_{a}_{m}_mm": [c + (1.0 if m == "max" else -1.0)] * 2 for a, c in zip("xyz", centre, strict=True)
           for m in ("min", "max")}
    ann = pd.DataFrame({"patient_id": [PATIENT.patient_id, "P9"], **box})
    plan = passes.plan(ann, index, CFG, None)
    assert [(t.patient_id, t.series_instance_uid, t.object_keys) for t in plan.tasks] == [(PATIENT.patient_id, uid, [])]
    assert plan.read_once == {PATIENT.patient_id} and plan.second_pass() == []
    assert plan.selection == {uid: "selected"}
    assert [(e["patient_id"], e["error_type"]) for e in plan.errors] == [("P9", "SeriesNotFound")]
    index.candidates[PATIENT.patient_id] = {(uid, wire.keys_hash(keys[:3]))}
    again = passes.plan(ann, index, CFG, None)  # the chunk held 3 of the 4 objects: the second pass
    assert again.read_once == set() and [t.patient_id for t in again.second_pass()] == [PATIENT.patient_id]
    filled, sizes = passes.with_objects(again.second_pass(), index)
    assert filled[0].object_keys == sorted(keys) and sizes == [[h["size"] for h in sorted(
        headers, key=lambda h: h["object_key"])]]


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
