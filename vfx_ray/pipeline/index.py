"""The archive index on the driver: one summary per series, its objects on local disk.

Workers index headers chunk by chunk and send one SERIES row per (chunk, series): the series'
record for its objects in that chunk, with their keys, sizes and SOP references packed
(:func:`tasks.series_rows`: a sixth of their JSON). The driver keeps one summary per series,
merged across chunks (:func:`dicom.merge_series`; no object keys: their set as a mergeable
hash), as compact JSON (about 1 KB; the same summary as Python objects took 4.3 KB), decoded
where the plan looks one up. It appends each row as it comes, objects still packed, to a
local Parquet file: what needs a series' objects (the series index file, the second pass,
the reports) streams them back from there (:class:`SeriesParts`). So what the driver holds
grows with the number of series, not of objects.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.imaging import annotations as ann_mod
from vfx_ray.imaging import dicom
from vfx_ray.pipeline import shards, wire
from vfx_ray.pipeline.wire import Kind

PARTS_SCHEMA = pa.schema([("series", pa.string()), ("shard", pa.int64()), ("meta", pa.string())])
PRIVATE = ("object_keys", "keys_hash")  # a summary's bookkeeping, not series-index columns


def lost(stage: str, doing: str, **ids: str | None) -> dict[str, Any]:
    """The error row of a patient or object whose task Ray gave up on."""
    message = f"the task {doing} was lost (worker crash or out of memory) after Ray's retries"
    return VfxError(stage, message, error_type="TaskLost", **ids).row()


def series_key(record: dict[str, Any]) -> str:
    """What a series is merged by: its uid (a DICOMDIR, which has none, by its object key)."""
    uid = record["series_instance_uid"]
    return uid if uid is not None else "\0" + record["object_keys"][0]


@dataclasses.dataclass
class ArchiveIndex:
    """What the driver learns from the index rows of a pass: a summary per series, the
    objects whose header failed, the series each chunk cropped as candidates, and which
    shards came back whole. ``folder``: where the series' parts are written."""

    folder: str
    series: dict[str, bytes] = dataclasses.field(default_factory=dict)  # series key -> its summary, JSON
    patients: dict[str | None, list[str]] = dataclasses.field(default_factory=dict)  # patient id -> series keys
    spread: dict[str, int] = dataclasses.field(default_factory=dict)  # series key -> its rows, where more than 1
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    candidates: dict[str, set[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # pid -> {(uid, hash)}
    shards_done: set[int] = dataclasses.field(default_factory=set)
    objects: int = 0  # objects with a SERIES or HEADER_ERROR row
    _writer: pq.ParquetWriter | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.folder, "series_parts.parquet")

    def absorb(self, table: pa.Table, shard: int | None = None) -> None:
        """Take a table's index rows (any wire schema) of ``shard``; other rows are left to the caller."""
        index = wire.of_kind(table, wire.INDEX_KINDS)
        parts: list[tuple[str, str]] = []
        for pid, kind, text in zip(index["patient_id"].to_pylist(), index["kind"].to_pylist(),
                                   index["meta"].to_pylist(), strict=True):
            meta = json.loads(text)
            if kind == Kind.SERIES:
                parts.append((self._take(meta), text))
            elif kind == Kind.HEADER_ERROR:
                self.errors.append(meta)
                self.objects += 1
            else:
                self.candidates.setdefault(pid, set()).add((meta["series_instance_uid"], meta["keys"]))
        if parts:
            self._spill(parts, shard)

    def _take(self, meta: dict[str, Any]) -> str:
        record = meta["record"]
        key = series_key(record)
        summary = {**record, "keys_hash": meta["keys"]}  # the record holds its first object key
        old = self.summary(key, private=True)
        if old is None:
            self.patients.setdefault(record.get("patient_id"), []).append(key)
        else:
            merged = dicom.merge_series(old, summary)
            summary = {**merged, "object_keys": merged["object_keys"][:1],
                       "keys_hash": wire.merge_hashes(old["keys_hash"], summary["keys_hash"])}
            self.spread[key] = self.spread.get(key, 1) + 1
            if summary.get("patient_id") != old.get("patient_id"):  # one uid in two patients: the first key's
                self.patients[old.get("patient_id")].remove(key)
                self.patients.setdefault(summary.get("patient_id"), []).append(key)
        self.series[key] = json.dumps(summary).encode()
        self.objects += record["instance_count"]
        return key

    def summary(self, key: str, private: bool = False) -> dict[str, Any] | None:
        """One series' summary (None: not in the archive); ``private``: with its bookkeeping."""
        text = self.series.get(key)
        if text is None:
            return None
        summary = json.loads(text)
        return summary if private else {k: v for k, v in summary.items() if k not in PRIVATE}

    def _spill(self, parts: list[tuple[str, str]], shard: int | None) -> None:
        if self._writer is None:
            os.makedirs(self.folder, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, PARTS_SCHEMA)
        self._writer.write_table(pa.table({"series": [k for k, _ in parts], "shard": [shard] * len(parts),
                                           "meta": [t for _, t in parts]}, schema=PARTS_SCHEMA))

    def close(self) -> None:
        """Finish the parts file (before :meth:`series_objects`)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def summaries(self) -> list[dict[str, Any]]:
        """Every series' record without its object keys, in :func:`dicom.group_series`' order."""
        return [self.summary(key) for key in sorted(self.series, key=archive_order)]

    def lookup(self, uid: str) -> dict[str, Any] | None:
        """The summary of series ``uid`` (planning's :class:`ann_mod.SeriesCatalog`)."""
        return self.summary(uid)

    def of_patient(self, pid: str) -> list[dict[str, Any]]:
        """The summaries of a patient's series, in archive order (a series without a patient
        id is found as patient "None", as the plan's list lookup did)."""
        keys = [*self.patients.get(pid, ()), *(self.patients.get(None, ()) if pid == "None" else ())]
        return [self.summary(k) for k in sorted(keys, key=archive_order)]

    def parts(self) -> SeriesParts:
        """The parts file as a handle a task on this node can read (after :meth:`close`)."""
        return SeriesParts(self.path, dict(self.spread))

    def series_objects(self, wanted: set[str] | None = None) -> Iterator[dict[str, Any]]:
        """:meth:`SeriesParts.objects` of this index's parts."""
        return self.parts().objects(wanted)

    def read_once(self, planned: list[ann_mod.PatientTask]) -> set[str]:
        """Patients whose first-pass crops came from exactly their planned series, complete."""
        def whole(t: ann_mod.PatientTask) -> tuple[str, str]:
            return t.series_instance_uid, self.summary(t.series_instance_uid, private=True)["keys_hash"]

        return {t.patient_id for t in planned if self.candidates.get(t.patient_id) == {whole(t)}}

    def finish(self, all_shards: list[dict[str, Any]], root: str, cfg: CropConfig) -> None:
        """The pass is over: close the parts file, then report the objects of lost shards."""
        self.close()
        self._report_lost(all_shards, root, cfg)

    def _report_lost(self, all_shards: list[dict[str, Any]], root: str, cfg: CropConfig) -> None:
        """An error row for each object of a shard whose task never finished (its folders are
        listed again here, and what its finished chunks indexed is taken off)."""
        for shard in all_shards:
            if shard["shard"] in self.shards_done:
                continue
            seen = {k for _, meta in part_rows(self.path, shard["shard"])
                    for k in wire.unpack_objects(meta["objects"])["object_keys"]}
            seen |= {e.get("object_key") for e in self.errors}  # keys are unique across shards
            entries, _ = shards.list_shard(shard, root, cfg)
            self.errors += [lost("header", "reading this object", object_key=e.uri)
                            for e in entries if e.uri not in seen]


@dataclasses.dataclass(frozen=True)
class SeriesParts:
    """The index's parts file (a local path) and the row count of each series spread over
    chunks: all a process on the driver's node needs to stream the series' objects."""

    path: str
    spread: dict[str, int]

    def objects(self, wanted: set[str] | None = None) -> Iterator[dict[str, Any]]:
        """Series records with every object key, and ``object_sizes`` and ``sops`` (SOP class
        and instance UIDs) in key order: those of ``wanted`` uids (default: all), in the order
        the archive was read. Holds only the series spread over chunks until they are whole."""
        waiting: dict[str, list[dict[str, Any]]] = {}
        for key, meta in part_rows(self.path, keys=wanted):  # a series' key is its uid (a DICOMDIR has none)
            waiting.setdefault(key, []).append(meta)
            if len(waiting[key]) == self.spread.get(key, 1):
                yield whole_series(waiting.pop(key))


def part_rows(path: str, shard: int | None = None, keys: set[str] | None = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """A parts file's rows (of ``shard``, of series ``keys``), each meta parsed only once kept."""
    if not os.path.exists(path):
        return
    kept = None if keys is None else pa.array(sorted(keys), pa.string())
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        table = pa.Table.from_batches([batch])
        if shard is not None:
            table = table.filter(pc.equal(table["shard"], shard))
        if kept is not None:
            table = table.filter(pc.is_in(table["series"], kept))
        for key, text in zip(table["series"].to_pylist(), table["meta"].to_pylist(), strict=True):
            yield key, json.loads(text)


def archive_order(key: str) -> tuple[bool, str]:
    """Series by uid, then DICOMDIRs (keyed by their object): :func:`dicom.group_series`' order."""
    return key.startswith("\0"), key


def whole_series(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One series' record from its SERIES rows' metas, with its objects' sizes and SOP refs."""
    objects = [wire.unpack_objects(p["objects"]) for p in parts]
    records = [{**p["record"], "object_keys": o["object_keys"]} for p, o in zip(parts, objects, strict=True)]
    record = records[0]
    for r in records[1:]:
        record = dicom.merge_series(record, r)
    by_key = {k: (size, sop) for o in objects
              for k, size, sop in zip(o["object_keys"], o["sizes"], o["sops"], strict=True)}
    return {**record, "object_sizes": [by_key[k][0] for k in record["object_keys"]],
            "sops": [by_key[k][1] for k in record["object_keys"]]}
