"""Ray Tune search: ASHA stops trials, outputs, TensorBoard events, resume, train-cv, `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vfx_ray import cv, storage
from vfx_ray import tune as vtune
from vfx_ray.config import Config, TrainConfig, TuneConfig
from vfx_ray.errors import VfxError

REPO = Path(__file__).resolve().parents[1]
# 4 trials of at most 2 epochs; ASHA's only rung is epoch 1, where a trial goes on only if it
# beats the best quarter of the trials before it. The first trial is the recipe's own lr 1e-3
# (the fastest learner in the range), so with a seeded search the later ones stop there.
TINY = Config(
    profile="test",
    train=TrainConfig(arch="resnet18", pretrained="none", lr=1e-3, l2=1e-4, batch_size=16, max_epochs=2,
                      patience=5, augment_factor=1, n_folds=2, val_fraction=0.1),
    tune=TuneConfig(num_samples=4, max_epochs=2, grace_period=1),
)  # fmt: skip


@pytest.fixture(scope="module")
def crops_uri(tiny_crops) -> str:
    return tiny_crops(n_patients=16, slices=3, size=32)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in ``folder``, without TensorFlow.

    An event file is TFRecord framing (uint64 length, uint32 crc, payload, uint32 crc) around
    ``Event`` protos, whose schema tensorboardX ships.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return scalars


def _interrupt_when(condition, timeout: float = 400) -> threading.Thread:
    """SIGUSR1 to this process once ``condition()`` holds: Tune's Ctrl+C path (state saved)."""

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def search(ray_session, crops_uri, tmp_path_factory):
    """A 4-trial search interrupted while its 3rd trial trains, then resumed."""
    out = tmp_path_factory.mktemp("tune") / "search"

    worker_groups: set[str] = set()

    def third_trial_training() -> bool:
        """A 3rd Train worker group got its placement group (bundles of 1 CPU; a trial driver
        asks for no CPU): the 3rd trial trains. Each trial's group lives for an epoch or
        more, so polling sees every one."""
        for pg_id, pg in ray_session.util.placement_group_table().items():
            if pg["state"] == "CREATED" and any(b.get("CPU", 0) >= 1 for b in pg["bundles"].values()):
                worker_groups.add(pg_id)
        return len(worker_groups) >= 3

    t0 = time.time()
    watcher = _interrupt_when(third_trial_training)  # one trial at a time (a cap the resume keeps)
    with pytest.raises(VfxError, match="--resume"):
        vtune.run_tune(crops_uri, str(out), TINY, progress=False, max_concurrent=1)
    watcher.join(timeout=1)
    first = pq.read_table(out / "trials.parquet").to_pylist()
    event_files = {p.parent.name: p.name for p in (out / "tensorboard").glob("*/events.out.tfevents.*")}
    t1 = time.time()
    summary = vtune.run_tune(crops_uri, str(out), TINY, resume=True, progress=False)
    print(f"search: {t1 - t0:.0f} s until interrupted, {time.time() - t1:.0f} s to resume and finish")
    return {"out": out, "first": first, "event_files": event_files, "summary": summary}


def test_search_space_split_and_best_params_are_pure():
    space = vtune.search_space(TINY.tune)
    assert (space["lr"].lower, space["lr"].upper) == (1e-5, 1e-3)
    assert (space["l2"].lower, space["l2"].upper) == (1e-6, 1e-2)
    splits = {"folds": [{"train": ["a", "b"], "val": ["c"], "test": ["d"]}]}
    assert vtune.tune_split(splits, 0) == (["a", "b"], ["c"])  # the test fold never comes back
    with pytest.raises(VfxError, match="validation"):
        vtune.tune_split({"folds": [{"train": ["a"], "val": [], "test": ["d"]}]}, 0)
    rows = [{"trial_id": t, "lr": lr, "l2": 1e-4, "best_val_loss": v, "best_epoch": 1, "epochs": 1,
             "status": "terminated", "stopped_early": True, "error": None}
            for t, lr, v in [("a", 1e-3, 0.5), ("b", 1e-4, 0.3), ("c", 1e-5, None)]]  # fmt: skip
    assert vtune.best_params(pa.Table.from_pylist(rows, schema=vtune.TRIALS_SCHEMA)) == {"lr": 1e-4, "l2": 1e-4}


def test_asha_stops_trials_and_the_search_writes_its_folder(search):
    out, summary = search["out"], search["summary"]
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == summary["trials"] == 4 and {t["status"] for t in trials} == {"terminated"}
    assert summary["stopped_early"] >= 1 and sum(t["stopped_early"] for t in trials) == summary["stopped_early"]
    for t in trials:  # stopped trials ran 1 epoch (ASHA's rung), the others the full 2
        assert t["epochs"] == (1 if t["stopped_early"] else 2) and t["best_val_loss"] > 0
    assert trials[0]["lr"] == TINY.train.lr and trials[0]["l2"] == TINY.train.l2  # the recipe goes first
    best = json.loads((out / "best_params.json").read_text())
    assert best == summary["best_params"] and set(best) == {"lr", "l2"}
    assert 1e-5 <= best["lr"] <= 1e-3 and 1e-6 <= best["l2"] <= 1e-2
    winner = min(trials, key=lambda t: t["best_val_loss"])
    assert (winner["lr"], winner["l2"]) == (best["lr"], best["l2"])
    record = json.loads((out / "search.json").read_text())  # no leakage: fold 0's test patients left out
    splits = json.loads((out / "splits.json").read_text())
    assert record["fold"] == 0 and record["patients"] == {"train": 6, "val": 2, "test_left_out": 8}
    assert set(splits["folds"][0]["test"]).isdisjoint(splits["folds"][0]["train"] + splits["folds"][0]["val"])
    assert not any((out / "ray_train").glob("*/checkpoint_*"))  # finished trials' checkpoints are gone


def test_event_files_hold_every_trials_metrics(search):
    out = search["out"]
    interrupted = {t["trial_id"] for t in search["first"] if t["status"] == "unfinished"}
    for t in pq.read_table(out / "trials.parquet").to_pylist():
        scalars = read_scalars(out / "tensorboard" / t["trial_id"])
        steps = [step for step, _ in scalars["val_loss"]]
        if t["trial_id"] in interrupted:  # an epoch reported while Tune stopped may not have reached it
            assert steps == sorted(set(steps)) and steps[-1] == t["epochs"]
        else:
            assert steps == list(range(1, t["epochs"] + 1))
        assert scalars["best_val_loss"][-1][1] == pytest.approx(t["best_val_loss"], rel=1e-5)
        assert {"train_loss", "images_per_s", "hparam/best_val_loss"} <= set(scalars)


def test_resume_completes_the_search_without_redoing_finished_trials(search, crops_uri):
    out, first = search["out"], search["first"]
    done_before = [t for t in first if t["status"] == "terminated"]
    assert len(done_before) == 2 and [t["status"] for t in first[2:]] == ["unfinished"]  # the 3rd trial ran
    assert search["summary"]["trials"] == 4
    final = {t["trial_id"]: t for t in pq.read_table(out / "trials.parquet").to_pylist()}
    for t in done_before:
        assert final[t["trial_id"]] == t  # same result row ...
        files = sorted(p.name for p in (out / "tensorboard" / t["trial_id"]).glob("events.out.tfevents.*"))
        assert files == [search["event_files"][t["trial_id"]]]  # ... and no second run's event file
    with pytest.raises(VfxError, match="--resume"):  # a finished search is not silently overwritten
        vtune.run_tune("unused", str(out), TINY)
    other = Config(
        profile="test", train=TINY.train, tune=TuneConfig(num_samples=4, max_epochs=2, lr_range=(1e-4, 1e-2))
    )
    with pytest.raises(VfxError, match="tune.lr_range"):  # resuming with other settings is refused
        vtune.run_tune(crops_uri, str(out), other, resume=True)


def test_best_params_feed_train_cv(search, crops_uri, tmp_path):
    best = json.loads((search["out"] / "best_params.json").read_text())
    run = tmp_path / "cv"
    one_epoch = TrainConfig(**{**TINY.train.__dict__, "max_epochs": 1})
    metrics = cv.run_train_cv(crops_uri, str(run), one_epoch, params=best)
    config = json.loads((run / "config.json").read_text())
    assert config["params"] == best and (config["train"]["lr"], config["train"]["l2"]) == (best["lr"], best["l2"])
    assert metrics["pooled"]["per_patient"]["n"] == 16
    # the same settings give the same outer folds: the search never saw train-cv's fold-0 test patients
    assert json.loads((run / "splits.json").read_text()) == json.loads((search["out"] / "splits.json").read_text())


@pytest.mark.slow
def test_tune_as_a_ray_job_on_a_local_cluster(objectstore_server, crops_uri, tmp_path):
    """`ray start --head` (token auth), the job submitted and polled through the dashboard's job
    API; the search writes to the embedded S3 store (the head inherits its AWS variables)."""
    from ray_nodes import local_cluster, run_job

    out = f"s3://test/tune-job-{uuid.uuid4().hex[:8]}"
    entry = ["python", "jobs/tune.py", "--crops", crops_uri, "--out", out, "--profile", "demo",
             "--num-samples", "2", "--epochs", "1", "--augment-factor", "1", "--quiet"]  # fmt: skip
    with local_cluster(tmp_path) as cluster:
        job = run_job(cluster, entry, REPO, timeout=240)
        assert job["status"] == "SUCCEEDED", f"{job['status']}\n{job['logs'][-4000:]}"
    trials = storage.read_table(storage.join(out, "trials.parquet")).to_pylist()
    assert len(trials) == 2 and json.loads(storage.read_text(storage.join(out, "best_params.json"))).keys() == {
        "lr",
        "l2",
    }
    for t in trials:  # event files were written locally by the job and uploaded
        local = tmp_path / "tb" / t["trial_id"]
        local.mkdir(parents=True)
        for entry in storage.list_files(storage.join(out, "tensorboard", t["trial_id"])):
            (local / entry.uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(entry.uri))
        assert [s for s, _ in read_scalars(local)["val_loss"]] == [1]
    assert not [e.uri for e in storage.list_files(out) if "/ray_train/" in e.uri]  # no checkpoints left behind
