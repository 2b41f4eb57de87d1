"""Ray Tune search: ASHA stops trials, outputs, TensorBoard events, resume, train-cv, `ray job submit`,
and the nested protocol (one search per outer fold, fold k's parameters for fold k)."""

from __future__ import annotations

import dataclasses
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

from vfx_ray import storage
from vfx_ray.cli.app import build_parser, main
from vfx_ray.config import Config, TrainConfig, TuneConfig
from vfx_ray.errors import VfxError
from vfx_ray.evaluation import folds, tuned_params
from vfx_ray.stages import train_cv
from vfx_ray.stages import tune as vtune

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


@pytest.mark.slow
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
    record = json.loads((out / "search.json").read_text())  # fold 0's test patients are left out of its trials
    splits = json.loads((out / "splits.json").read_text())
    assert record["fold"] == 0 and record["patients"] == {"train": 6, "val": 2, "test_left_out": 8}
    assert record["protocol"] == "single-split"
    assert set(splits["folds"][0]["test"]).isdisjoint(splits["folds"][0]["train"] + splits["folds"][0]["val"])
    seen = tuned_params.patients_digest(splits["folds"][0]["train"], splits["folds"][0]["val"])
    assert {(t["fold"], t["patients"]) for t in trials} == {(0, seen)}  # what every trial's trainer reported
    assert not any((out / "ray_train").glob("*/checkpoint_*"))  # finished trials' checkpoints are gone


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_best_params_feed_train_cv(search, crops_uri, tmp_path):
    best = json.loads((search["out"] / "best_params.json").read_text())
    run = tmp_path / "cv"
    one_epoch = TrainConfig(**{**TINY.train.__dict__, "max_epochs": 1})
    metrics = train_cv.run_train_cv(crops_uri, str(run), one_epoch, params=best)
    config = json.loads((run / "config.json").read_text())
    assert config["params"] == best and (config["train"]["lr"], config["train"]["l2"]) == (best["lr"], best["l2"])
    assert metrics["pooled"]["per_patient"]["n"] == 16
    protocol = metrics["params_protocol"]
    assert protocol["protocol"] == "single-split" and protocol["params"] == best
    assert "fold 1" in protocol["description"] and "optimistic" in protocol["description"]
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


# ---------------------------------------------------------------- nested tuning
def _splits(n_patients: int = 16, n_folds: int = 2, seed: int = 0) -> dict:
    ids = [f"P{i:03d}" for i in range(n_patients)]
    return folds.make_splits(pa.table({"patient_id": ids, "label": [i % 2 for i in range(n_patients)]}).to_pandas(),
                             n_folds, 0.1, seed)


def test_nested_params_go_fold_by_fold_only_onto_their_own_outer_folds():
    splits = _splits()
    params = tuned_params.nested({1: {"lr": 2e-4, "l2": 1e-5}, 0: {"lr": 1e-3, "l2": 1e-4}}, splits)
    assert params["protocol"] == "nested" and list(params["folds"]) == ["0", "1"]
    assert [tuned_params.for_fold(params, k)["lr"] for k in (0, 1)] == [1e-3, 2e-4]
    assert tuned_params.shared(params) is None
    assert tuned_params.for_fold({"lr": 3e-4}, 1) == tuned_params.shared({"lr": 3e-4}) == {"lr": 3e-4}
    tuned_params.check(params, 2)
    tuned_params.check_splits(params, splits)
    with pytest.raises(ValueError, match="2 outer folds.*this run has 3"):
        tuned_params.check(params, 3)
    with pytest.raises(ValueError, match="other outer folds"):  # another seed: fold k's test patients differ
        tuned_params.check_splits(params, _splits(seed=1))
    with pytest.raises(ValueError, match="unknown protocol"):
        tuned_params.check({"protocol": "mine", "lr": 1e-4}, 2)
    both = tuned_params.patients_digest(["P1", "P1", "P2"], ["P3"])
    assert both == tuned_params.patients_digest(["P2", "P1"], ["P3"])
    assert both != tuned_params.patients_digest(["P1", "P2", "P9"], ["P3"])


def test_params_protocol_says_how_the_parameters_were_chosen():
    per_fold = {0: {"lr": 1e-3, "l2": 1e-4}, 1: {"lr": 2e-4, "l2": 1e-4}}
    nested = tuned_params.protocol(tuned_params.nested(per_fold, _splits()), 2)
    assert nested["protocol"] == "nested" and nested["params"]["1"] == {"lr": 2e-4, "l2": 1e-4}
    single = tuned_params.protocol({"lr": 3e-4, "l2": 1e-5}, 10)
    assert single["protocol"] == "single-split" and single["params"] == {"lr": 3e-4, "l2": 1e-5}
    assert "test patients of folds 1–9 were training and validation patients" in single["description"]
    assert "optimistic" in single["description"] and "fold 0's split" in single["description"]
    assert tuned_params.protocol(None, 10)["protocol"] == "none"
    assert tuned_params.protocol({"max_epochs": 2}, 10)["protocol"] == "none"


def test_train_cv_refuses_nested_params_of_other_outer_folds_before_training(tiny_crops, tmp_path):
    crops = tiny_crops(n_patients=16, slices=3, size=32)
    cfg = TrainConfig(**{**TINY.train.__dict__, "use_gpu": False})  # no Ray: it fails before
    patients = folds.patient_labels(storage.read_table(crops).select(["patient_id", "label"]).to_pandas())
    other = folds.make_splits(patients, 2, cfg.val_fraction, seed=1)  # a search run with another --seed
    params = tuned_params.nested({0: {"lr": 1e-3, "l2": 1e-4}, 1: {"lr": 2e-4, "l2": 1e-4}}, other)
    with pytest.raises(ValueError, match="other outer folds"):
        train_cv.run_train_cv(crops, str(tmp_path / "run"), cfg, params=params)
    assert not (tmp_path / "run" / "fold_0").exists()
    with pytest.raises(ValueError, match="2 outer folds"):
        train_cv.run_train_cv(crops, str(tmp_path / "run3"), TrainConfig(**{**cfg.__dict__, "n_folds": 3}),
                              params=params)


def test_cli_tune_nested_help_and_bad_input_is_one_line(tmp_path, capsys):
    tune_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["tune"]._actions
                     if "--nested" in a.option_strings).help
    assert "one search per outer fold" in tune_help and "training patients only" in tune_help
    rc = main(["tune", "--crops", str(tmp_path / "c"), "--out", str(tmp_path / "t"), "--nested", "--folds", "1",
               "--pretrained", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "at least 2" in err
    params = tmp_path / "tune" / "best_params.json"
    params.parent.mkdir()
    nested = tuned_params.nested({k: {"lr": 1e-3, "l2": 1e-4} for k in range(3)}, _splits(n_folds=3))
    params.write_text(json.dumps(nested))
    rc = main(["train-cv", "--crops", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--params",
               str(params.parent), "--folds", "2", "--pretrained", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "3 outer folds" in err and "this run has 2" in err
    assert not (tmp_path / "run").exists()


NESTED = Config(profile="test", train=dataclasses.replace(TINY.train, max_epochs=1),
                tune=TuneConfig(num_samples=2, max_epochs=1, grace_period=1))


@pytest.fixture(scope="module")
def nested_search(ray_session, crops_uri, tmp_path_factory):
    """A nested search: 2 outer folds x 2 trials of one epoch, in one Tune run."""
    out = tmp_path_factory.mktemp("nested") / "search"
    t0 = time.time()
    summary = vtune.run_tune(crops_uri, str(out), NESTED, nested=True, progress=False)
    print(f"nested search: {time.time() - t0:.0f} s")
    return {"out": out, "summary": summary}


@pytest.mark.slow
def test_nested_search_tunes_each_outer_fold_without_its_test_patients(nested_search, crops_uri):
    out, summary = nested_search["out"], nested_search["summary"]
    splits = json.loads((out / "splits.json").read_text())
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == summary["trials"] == 4 and {t["status"] for t in trials} == {"terminated"}
    best = json.loads((out / "best_params.json").read_text())
    assert best == summary["best_params"] and best["protocol"] == "nested"
    assert best["splits"] == tuned_params.splits_key(splits) and list(best["folds"]) == ["0", "1"]
    for k, part in enumerate(splits["folds"]):
        mine = [t for t in trials if t["fold"] == k]
        assert len(mine) == 2 and mine[0]["lr"] == NESTED.train.lr  # each fold tries the recipe first
        # the patients each trial's trainer reported are fold k's training part, never its test patients
        assert {t["patients"] for t in mine} == {tuned_params.patients_digest(part["train"], part["val"])}
        assert set(part["test"]).isdisjoint(part["train"] + part["val"])
        winner = min(mine, key=lambda t: t["best_val_loss"])
        assert json.loads((out / f"fold_{k}" / "best_params.json").read_text()) == best["folds"][str(k)] == {
            "lr": winner["lr"], "l2": winner["l2"]}
    assert {t["lr"] for t in trials if t["fold"] == 0} == {t["lr"] for t in trials if t["fold"] == 1}  # same candidates
    record = json.loads((out / "search.json").read_text())
    assert record["protocol"] == "nested" and record["folds"] == [0, 1]
    assert record["patients"]["1"] == {"train": 6, "val": 2, "test_left_out": 8}
    with pytest.raises(VfxError, match="protocol"):  # resuming it as a single search is refused
        vtune.run_tune(crops_uri, str(out), NESTED, resume=True)


@pytest.mark.slow
def test_train_cv_applies_fold_ks_nested_params_to_fold_k(nested_search, crops_uri, tmp_path):
    from vfx_ray.cli.train_cv import read_params

    params = read_params(str(nested_search["out"]), 2)  # the search folder, as train-cv --params takes it
    params["folds"]["1"]["lr"] = params["folds"]["0"]["lr"] / 2  # distinct per fold, whatever the search chose
    run = tmp_path / "cv"
    metrics = train_cv.run_train_cv(crops_uri, str(run), NESTED.train, params=params)
    for k in (0, 1):
        lr = params["folds"][str(k)]["lr"]
        history = json.loads((run / f"fold_{k}" / "history.json").read_text())
        assert {h["lr"] for h in history} == {lr}  # the optimizer of fold k ran with fold k's lr
        assert json.loads((run / f"fold_{k}" / "done.json").read_text())["lr"] == metrics["fold_runs"][k]["lr"] == lr
    protocol = metrics["params_protocol"]
    assert protocol["protocol"] == "nested" and protocol["params"] == params["folds"]
    assert (run / "splits.json").read_text() == (nested_search["out"] / "splits.json").read_text()
    other = json.loads(json.dumps(params))
    other["folds"]["1"]["lr"] = 1e-5
    with pytest.raises(VfxError, match="fold_params"):  # a finished run is not continued with other fold params
        train_cv.run_train_cv(crops_uri, str(run), NESTED.train, params=other)


def test_a_search_pickled_under_the_old_module_paths_fails_in_one_line(tmp_path):
    """Tune pickles its callbacks by module path: a search folder written before issue 26 names
    ``vfx_ray.trialprogress``, which is gone. Resuming it says so, instead of a traceback."""
    from vfx_ray.errors import VfxError
    from vfx_ray.stages.tune import restore_search

    experiment = tmp_path / "ray_tune" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"cvfx_ray.trialprogress\nTrialProgress\np0\n.")  # as Tune read it
    with pytest.raises(VfxError, match=r"older vfx_ray \(it names vfx_ray.trialprogress.*new --out") as err:
        restore_search(str(experiment), lambda config: None, None, str(tmp_path))
    assert "\n" not in str(err.value)
    (experiment / "tuner.pkl").write_bytes(b"cnot_vfx_ray_at_all\nThing\np0\n.")  # anything else is not ours to word
    with pytest.raises(ModuleNotFoundError):
        restore_search(str(experiment), lambda config: None, None, str(tmp_path))
