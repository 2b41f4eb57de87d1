"""Each stage finds its predecessor's files from the folder a user passes (layout.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vfx_ray import layout, storage
from vfx_ray.cli.train_cv import read_params


@pytest.fixture
def crops_out(tmp_path):
    """A crops job's output folder: crops, errors, index and a JSON manifest side by side."""
    out = tmp_path / "crops"
    out.mkdir()
    pq.write_table(pa.table({"patient_id": ["P1"], "label": [1]}), out / layout.CROPS)
    pq.write_table(pa.table({"stage": ["decode"]}), out / layout.ERRORS)
    (out / layout.MANIFEST).write_text(json.dumps({"patients": 1}))
    return out


def test_a_crops_folder_resolves_to_its_crops_file(crops_out):
    with pytest.raises(pa.ArrowInvalid, match="Parquet magic bytes not found"):
        storage.read_table(str(crops_out))  # what train-cv --crops FOLDER used to do
    assert layout.crops_file(str(crops_out)) == str(crops_out / layout.CROPS)
    assert layout.crops_file(str(crops_out) + "/") == storage.join(str(crops_out) + "/", layout.CROPS)
    assert storage.read_table(layout.crops_file(str(crops_out))).column_names == ["patient_id", "label"]
    assert layout.crops_file(str(crops_out / layout.CROPS)) == str(crops_out / layout.CROPS)
    parts = crops_out.parent / "parts"  # a folder of Parquet parts stays what it is
    parts.mkdir()
    assert layout.crops_file(str(parts)) == str(parts)


def test_params_from_a_tune_folder_or_its_file(tmp_path):
    (tmp_path / layout.BEST_PARAMS).write_text(json.dumps({"lr": 3e-4, "l2": 1e-5}))
    assert read_params(str(tmp_path)) == read_params(str(tmp_path / layout.BEST_PARAMS)) == {"lr": 3e-4, "l2": 1e-5}
    assert layout.params_file(str(tmp_path / "elsewhere.json")) == str(tmp_path / "elsewhere.json")


def test_the_typed_rows_name_the_columns_of_their_schemas():
    """A column added to a schema and not to its row type (or the reverse) fails here."""
    from typing import get_type_hints

    from vfx_ray import contracts

    def keys(row: type) -> list[str]:
        return list(get_type_hints(row))

    assert keys(contracts.ErrorRow) == contracts.ERRORS_SCHEMA.names
    assert keys(contracts.ScoreRow) == contracts.scores_schema().names
    assert keys(contracts.CropRecord) == [n for n in contracts.crops_schema().names if n != "image"]
    assert keys(contracts.SliceScore) == keys(contracts.CropRecord) + ["probability", "embedding", "cam"]
