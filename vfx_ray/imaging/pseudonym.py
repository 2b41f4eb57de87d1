"""Keyed pseudonyms (HMAC-SHA256) for the identifiers that the jobs write out.

With ``--pseudonymize`` the crops and score jobs replace, in every table they write, the
patient id, the Study/Series/SOP Instance UIDs and the object keys (whose paths often hold a
patient id or name) by keyed hashes, and scrub them from error messages. The key comes from
``VFX_PSEUDONYM_KEY`` only (never from a flag, a config or a file that is written out): the
same key gives the same pseudonyms in every run, so crops, scores and later runs still join;
without the key nobody can recompute them from a patient id.

Pseudonyms are applied where outputs are written (the driver); the Ray tasks work on the
real identifiers, which stay inside the job's memory and object store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from vfx_ray.errors import VfxError

KEY_ENV = "VFX_PSEUDONYM_KEY"
MIN_KEY_CHARS = 16
# a DICOM UID (dotted digits, at least three dots) anywhere in a message; not a host:port
# (an endpoint such as 127.0.0.1:9000 stays readable in error messages)
UID_PATTERN = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w.]|:\d)")
ID_COLUMNS = ("patient_id",)
UID_COLUMNS = ("series_instance_uid", "study_instance_uid", "sop_instance_uid")
KEY_COLUMNS = ("object_key",)
# free text a site may fill with names; not needed downstream
DROPPED_COLUMNS = ("series_description",)


class Pseudonymizer:
    """Stable keyed pseudonyms: ``patient`` ids, DICOM ``uid`` s and object ``key`` s."""

    def __init__(self, key: str, archive_uri: str | None = None) -> None:
        if len(key) < MIN_KEY_CHARS:
            raise VfxError(
                "config",
                f"{KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; use a long random secret "
                "(e.g. `openssl rand -hex 32`)",
                error_type="WeakPseudonymKey",
            )
        self._key = key.encode("utf-8")
        self.archive = archive_uri.rstrip("/") if archive_uri else None
        self._patients: dict[str, str] = {}
        self._patient_re: re.Pattern | None = None

    @classmethod
    def from_env(cls, archive_uri: str | None = None) -> Pseudonymizer:
        key = os.environ.get(KEY_ENV)
        if not key:
            raise VfxError(
                "config",
                f"--pseudonymize needs the key in the environment variable {KEY_ENV} "
                "(a long random secret; keep it: the same key gives the same pseudonyms)",
                error_type="MissingPseudonymKey",
            )
        return cls(key, archive_uri)

    def _digest(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """Names the key in manifests (which key made these pseudonyms) without revealing it."""
        return self._digest("key-id", "vfx_ray")[:12]

    def patient(self, value: str | None) -> str | None:
        if not value:  # no id (a DICOMDIR's, a header without PatientID): nothing to hide, and an
            return value  # empty id must never become a pattern that matches everywhere
        if value not in self._patients:
            self._patients[value] = "P" + self._digest("patient", value)[:24]
            self._patient_re = None
        return self._patients[value]

    def uid(self, value: str | None) -> str | None:
        """A valid DICOM UID (the 2.25 root: an integer from 128 hash bits)."""
        return None if value is None else "2.25." + str(int(self._digest("uid", value)[:32], 16))

    def key(self, value: str | None) -> str | None:
        return None if value is None else "obj-" + self._digest("key", value)[:32]

    def know_patients(self, ids: Iterable[str | None]) -> None:
        """Patient ids to scrub from messages even where a row names another patient."""
        for pid in ids:
            if pid:
                self.patient(str(pid))

    def scrub(self, text: str | None, object_keys: Iterable[str] = ()) -> str | None:
        """A message with every identifier it may hold replaced by its pseudonym."""
        if not text:
            return text
        for k in sorted({k for k in object_keys if k}, key=len, reverse=True):
            text = text.replace(k, self.key(k))
        if self.archive:  # any other key under the archive, up to the next blank or quote
            text = re.sub(re.escape(self.archive) + r"/[^\s'\"]*", lambda m: self.key(m.group(0)), text)
        text = UID_PATTERN.sub(lambda m: self.uid(m.group(0)), text)
        if self._patients:
            if self._patient_re is None:
                alts = "|".join(re.escape(p) for p in sorted(self._patients, key=len, reverse=True))
                self._patient_re = re.compile(rf"(?<![\w.-])(?:{alts})(?![\w.-])")
            text = self._patient_re.sub(lambda m: self._patients[m.group(0)], text)
        return text

    def _mappers(self) -> dict[str, Callable[[Any], Any]]:
        """Column (or field) name -> how a value of it is replaced."""
        return {
            **dict.fromkeys(ID_COLUMNS, self.patient),
            **dict.fromkeys(UID_COLUMNS, self.uid),
            **dict.fromkeys(KEY_COLUMNS, self.key),
            "object_keys": lambda keys: None if keys is None else [self.key(k) for k in keys],
            "message": self.scrub,
        }

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """An errors-table (or any flat) row with its identifier fields replaced."""
        self.know_patients([row.get("patient_id")])
        mappers = {**self._mappers(), "message": lambda m: self.scrub(m, [row.get("object_key") or ""])}
        return {k: mappers[k](v) if k in mappers else v for k, v in row.items()}

    def rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Error rows as a job writes them: every patient they name learnt first, so that no
        message keeps an id that another row names."""
        self.know_patients(r.get("patient_id") for r in rows)
        return [self.row(r) for r in rows]

    def table(self, table: pa.Table) -> pa.Table:
        """A table with identifier columns replaced and free-text columns emptied."""
        mappers = self._mappers()
        for i, name in enumerate(table.column_names):
            col = table[name]
            if name in DROPPED_COLUMNS:
                new = pa.nulls(len(table), col.type)
            elif name in mappers:
                new = pa.array([mappers[name](v) for v in col.to_pylist()], col.type)
            else:
                continue
            table = table.set_column(i, name, new)
        return table


def maybe(enabled: bool, archive_uri: str | None = None) -> Pseudonymizer | None:
    """The job's pseudonymizer when ``--pseudonymize`` is on (a clear error without a key)."""
    return Pseudonymizer.from_env(archive_uri) if enabled else None


def hide(p: Pseudonymizer | None, table: pa.Table) -> pa.Table:
    """A table as a job writes it: identifiers replaced when the job pseudonymises."""
    return p.table(table) if p else table


def metadata(p: Pseudonymizer | None) -> dict[str, Any]:
    """What manifests and Parquet metadata say of it: whether, and with which key (by id)."""
    return {"pseudonymized": p is not None, "pseudonym_key_id": p.key_id if p else None}
