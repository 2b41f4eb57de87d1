"""Every output name of every stage, in one place, and how a stage finds its predecessor's files.

A stage accepts its predecessor's output folder as a user naturally passes it (``train-cv
--crops OUT_OF_CROPS``, ``--params OUT_OF_TUNE``) as well as the file itself. No I/O here
besides the one existence check that tells a folder from a file.
"""

from __future__ import annotations

from vfx_ray import storage

ERRORS = "errors.parquet"  # every job: patient/object, stage, reason
PARTS = "_parts"  # a job's work in progress (crops' parts, score's committed patients and chunks)

# synth
ANNOTATIONS = "annotations.csv"
DICOM = "dicom"

# crops
CROPS = "crops.parquet"
SERIES_INDEX = "series_index.parquet"
READS = "reads.parquet"  # per patient: the read plan, bytes read, bytes its crops needed
MANIFEST = "manifest.json"
CROP_PARTS = f"{PARTS}/crops"  # the tasks' crops until a worker joins them into crops.parquet

# tune
SEARCH = "search.json"
TRIALS = "trials.parquet"
BEST_PARAMS = "best_params.json"  # nested (tune --nested): also fold_k/best_params.json, fold k's own
TENSORBOARD = "tensorboard"

# train-cv (a run folder) and, per fold, fold_k/
CONFIG = "config.json"
SPLITS = "splits.json"
OOF_PREDICTIONS = "oof_predictions.parquet"
METRICS = "metrics.json"  # also score's, when labels are given
MODEL = "model.pt"
PREDICTIONS = "predictions.parquet"
HISTORY = "history.json"
DONE = "done.json"  # written last: a fold with it is finished

# Ray Train checkpoints of an unfinished fold or trial
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_BEST = "best.pt"

# score
SCORES = "scores.parquet"
FEATURES = "features.parquet"

# report
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def fold_dir(run_uri: str, k: int) -> str:
    return storage.join(run_uri, f"fold_{k}")


def _inside(uri: str, name: str, suffix: str) -> str:
    """``uri`` when it names a file (by its suffix), else ``uri/name`` when that exists."""
    if uri.rstrip("/").endswith(suffix):
        return uri
    candidate = storage.join(uri, name)
    return candidate if storage.exists(candidate) else uri


def crops_file(uri: str) -> str:
    """The crops Parquet of a crops job's output folder, or ``uri`` (a file, or a folder of
    Parquet parts)."""
    return _inside(uri, CROPS, ".parquet")


def params_file(uri: str) -> str:
    """``best_params.json`` of a tune output folder, or ``uri`` (a JSON file)."""
    return _inside(uri, BEST_PARAMS, ".json")
