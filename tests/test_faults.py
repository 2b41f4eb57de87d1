"""Faults an unattended run meets: the object store goes away (for a while, or for good) or
turns read-only mid-job, and a Ray worker node dies mid-job.

The store faults restart the session's own rclone server on the same port with the same
keys (clients see a real outage: connection refused, then the same endpoint again); the
jobs run in this process on the shared Ray session. The node fault uses a real three-node
cluster (`ray start`) and kills every process of one worker node (raylet, agents and its
Ray workers) while it runs a crops task, and of the other while it runs a scoring actor.
The crops faults strike once Ray workers run the job's first stage, so that the tasks'
own reads meet them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from ray_nodes import Cluster, _node, alive_nodes, local_cluster

from vfx_ray import storage
from vfx_ray.config import EASY, SynthConfig
from vfx_ray.ml.model import build_model, save_model
from vfx_ray.services import object_store
from vfx_ray.stages import committed_parts
from vfx_ray.stages.committed_parts import PARTS
from vfx_ray.stages.crops import run_crops
from vfx_ray.stages.score import run_score
from vfx_ray.synth.cohort import generate_cohort

pytestmark = pytest.mark.slow
N = 12


def restart(store: object_store.ObjectStore, read_only: bool = False) -> None:
    """The same server again (same root, port and keys), optionally refusing writes."""
    store.stop()
    new = object_store.start(
        store.root, port=store.port, buckets=(), keys=(store.access_key, store.secret_key), read_only=read_only
    )
    store.pid = new.pid


class Fault(threading.Thread):
    """Waits until ``ready()``, then stops the store for ``down_s`` seconds (None: for good)
    or restarts it read-only; records when it struck."""

    def __init__(self, store, ready: Callable[[], bool], down_s: float | None = 10.0, read_only: bool = False) -> None:
        super().__init__(daemon=True)
        self.store, self.ready, self.down_s, self.read_only = store, ready, down_s, read_only
        self.struck_at: float | None = None
        self.back_at: float | None = None  # when the store answered again (after down_s)
        self.stop_waiting = threading.Event()

    def run(self) -> None:
        while not self.stop_waiting.is_set():
            try:
                if self.ready():
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            return
        self.struck_at = time.monotonic()
        if self.read_only:
            restart(self.store, read_only=True)
            return
        self.store.stop()
        if self.down_s is not None:
            time.sleep(self.down_s)
            restart(self.store)
            self.back_at = time.monotonic()


def run_with(fault: Fault, job: Callable[[], dict]) -> dict:
    fault.start()
    try:
        return job()
    finally:
        fault.stop_waiting.set()
        fault.join()


@pytest.fixture(scope="module")
def cohort(objectstore_server, ray_session):
    root = f"s3://vfx/faults-{uuid.uuid4().hex[:8]}"
    generate_cohort(root, SynthConfig(patients=N, matrix=128, seed=31, difficulty=EASY), workers=1, progress=False)
    torch.manual_seed(0)
    model = f"{root}/model.pt"
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    return {"root": root, "archive": f"{root}/dicom", "ann": f"{root}/annotations.csv", "model": model}


@pytest.fixture(autouse=True)
def store_back_up(objectstore_server):
    yield
    if not objectstore_server.running():
        restart(objectstore_server)


def chunk_files(out: str) -> list[storage.FileEntry]:
    """The first pass's committed chunks (``score`` reads an archive once, a chunk at a time)."""
    folder = storage.join(out, PARTS, committed_parts.CHUNK_DIR)
    return storage.list_files(folder, suffix=".parquet") if storage.exists(folder) else []


def one_row_per_patient(out: str) -> None:
    scores = storage.read_table(f"{out}/scores.parquet").to_pandas()
    assert len(scores) == N and scores.patient_id.is_unique, scores.patient_id.tolist()
    assert storage.read_table(f"{out}/errors.parquet").num_rows == 0


def processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, session id, name) of every process, from /proc/PID/stat alone: the
    fault tests poll this, and reading one file a process keeps the poll cheap."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                head, tail = (d / "stat").read_text().rsplit(")", 1)
                stat = tail.split()
                out.append((int(d.name), int(stat[1]), int(stat[3]), head.split("(", 1)[1]))
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
    return out


def title(pid: int) -> str:
    """A process's title: Ray sets a worker's to ``ray::<task or actor>`` while it runs one."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""  # it ended meanwhile


STAGE = re.compile(r"ray::Map(Batches|Worker)\(")  # a Ray Data task, or actor of the pool
CROPS_TASK = re.compile(r"ray::MapBatches\(")
SCORING = re.compile(r"ray::MapWorker\(.*\)\.submit$")  # a pool actor running a batch


def stage_workers(parent: int, doing: re.Pattern = STAGE) -> list[int]:
    """Ray workers whose title matches ``doing``, under the raylet that process ``parent``
    started: this process for the local session, ``ray start`` for a node."""
    procs = processes()
    raylets = {pid for pid, ppid, _, name in procs if ppid == parent and name == "raylet"}
    return [pid for pid, ppid, _, _ in procs if ppid in raylets and doing.match(title(pid))]


def job_stage_running() -> bool:
    return bool(stage_workers(os.getpid()))


def no_stage_running(timeout: float = 120) -> None:
    """An earlier test's Ray Data workers gone, so that a fault waits for this job's own."""
    deadline = time.monotonic() + timeout
    while job_stage_running():
        assert time.monotonic() < deadline, "Ray Data workers of an earlier job still run"
        time.sleep(0.5)


def test_store_outage_during_crops_is_ridden_out(cohort, objectstore_server):
    out = f"{cohort['root']}/crops-outage"
    no_stage_running()
    fault = Fault(objectstore_server, job_stage_running)  # the tasks' reads meet the outage
    summary = run_with(fault, lambda: run_crops(cohort["archive"], cohort["ann"], out, progress=False))
    assert fault.back_at is not None, "the store was not stopped during the job"
    assert summary["patients_with_crops"] == N and summary["errors"] == 0, summary
    crops = storage.read_table(f"{out}/crops.parquet").to_pandas()
    assert not crops.duplicated(["patient_id", "slice_index"]).any() and crops.patient_id.nunique() == N


def test_store_outage_during_score_is_ridden_out(cohort, objectstore_server):
    out = f"{cohort['root']}/score-outage"
    no_stage_running()
    fault = Fault(objectstore_server, lambda: bool(stage_workers(os.getpid(), SCORING)))  # mid-batch
    summary = run_with(
        fault, lambda: run_score(cohort["archive"], cohort["ann"], cohort["model"], out, progress=False, commit_every=2)
    )
    assert fault.back_at is not None and summary["rows"] == N, summary
    assert summary["skipped_already_scored"] == 0  # one run scored all, across the outage
    one_row_per_patient(out)


def test_store_gone_for_good_fails_clearly_and_keeps_committed_work(cohort, objectstore_server):
    out = f"{cohort['root']}/score-gone"
    fault = Fault(objectstore_server, lambda: bool(chunk_files(out)), down_s=None)  # mid first pass
    with pytest.raises(storage.StoreUnavailable, match="unreachable") as err:
        run_with(
            fault,
            lambda: run_score(cohort["archive"], cohort["ann"], cohort["model"], out, progress=False, commit_every=2),
        )
    failed_after = time.monotonic() - fault.struck_at
    print(f"gave up {failed_after:.0f} s after the store went away")
    # storage waits S3_OUTAGE_SECONDS for the store, then the job stops; not much more
    assert storage.S3_OUTAGE_SECONDS - 2 < failed_after < 240, f"took {failed_after:.0f} s to give up"
    assert objectstore_server.endpoint in str(err.value)
    restart(objectstore_server)
    kept = len(chunk_files(out))
    assert 1 <= kept < N  # the chunks committed before the outage
    assert not storage.exists(f"{out}/scores.parquet")
    summary = run_score(cohort["archive"], cohort["ann"], cohort["model"], out, progress=False, commit_every=2)
    assert summary["chunks_reused"] == kept and summary["rows"] == N, summary
    one_row_per_patient(out)


# AWS answers a write to a read-only destination 403 (PermissionError, "refused");
# `rclone serve s3 --read-only` answers 500 InternalError, an OSError "upload failed".
WRITE_REFUSED = "refused|upload failed"


def test_read_only_destination_leaves_nothing_looking_complete(cohort, objectstore_server):
    crops_out, score_out = f"{cohort['root']}/crops-ro", f"{cohort['root']}/score-ro"
    no_stage_running()
    fault = Fault(objectstore_server, job_stage_running, read_only=True)
    with pytest.raises(OSError, match=WRITE_REFUSED) as err:
        run_with(fault, lambda: run_crops(cohort["archive"], cohort["ann"], crops_out, progress=False))
    assert not isinstance(err.value, storage.StoreUnavailable), err.value  # it answered: no outage
    for name in ("crops.parquet", "errors.parquet", "manifest.json", "series_index.parquet"):
        assert not storage.exists(f"{crops_out}/{name}"), name
    restart(objectstore_server)

    fault = Fault(objectstore_server, lambda: bool(chunk_files(score_out)), read_only=True)
    with pytest.raises(OSError, match=WRITE_REFUSED) as err:
        run_with(
            fault,
            lambda: run_score(
                cohort["archive"], cohort["ann"], cohort["model"], score_out, progress=False, commit_every=2
            ),
        )
    assert not isinstance(err.value, storage.StoreUnavailable), err.value
    assert not storage.exists(f"{score_out}/scores.parquet")
    parts = storage.list_files(f"{score_out}/{PARTS}")
    assert parts and all(storage.read_table(p.uri).num_rows >= 1 for p in parts)  # whole parts only
    restart(objectstore_server)
    run_score(cohort["archive"], cohort["ann"], cohort["model"], score_out, progress=False, commit_every=2)
    one_row_per_patient(score_out)


NODE_DRIVER = """
import json, sys, ray
from vfx_ray.stages.crops import run_crops
from vfx_ray.stages.score import run_score
root, model = sys.argv[1], sys.argv[2]
ray.init()  # RAY_ADDRESS names the cluster
crops = run_crops(f"{root}/dicom", f"{root}/annotations.csv", f"{root}/crops", progress=False)
scores = run_score(f"{root}/dicom", f"{root}/annotations.csv", model, f"{root}/scores", progress=False, commit_every=2)
json.dump({"crops": crops, "scores": scores}, open(f"{root}/result.json", "w"))
"""


def wait_for(cond: Callable[[], object], proc: subprocess.Popen, timeout: float = 300) -> object:
    """``cond()``'s first true value, polled while the driver runs."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert proc.poll() is None, "the driver ended before the fault"
        assert time.monotonic() < deadline, "timed out waiting for the job to reach the fault point"
        time.sleep(0.05)
    return value


def add_worker(cluster: Cluster, log: Path) -> subprocess.Popen:
    """Start a one-CPU worker node and wait until it has joined. One at a time: nodes that
    share a session folder and start together can pick the same socket name (plasma_store.N)
    and one raylet dies with 'bind: Address already in use'."""
    args = [
        f"--address={cluster.gcs_address}",
        "--num-cpus=1",
        f"--dashboard-agent-listen-port={object_store.free_port()}",
        f"--metrics-export-port={object_store.free_port()}",
    ]
    node = _node(args, cluster.env, log, cluster.temp_dirs[0])
    cluster.procs.append(node)  # stopped with the cluster
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():  # `ray start` says so once registered
        assert time.monotonic() < deadline and node.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    return node


@contextmanager
def three_nodes(tmp_path: Path) -> Iterator[Cluster]:
    """A head without CPUs (as in production: every task and actor runs on a worker node,
    so a killed worker node always held some of the job) and two one-CPU worker nodes."""
    with local_cluster(tmp_path, head_cpus=0, worker_cpus=[1]) as cluster:
        add_worker(cluster, tmp_path / "worker1.log")
        assert alive_nodes(cluster) == 3
        yield cluster


def busy_node(nodes: list[subprocess.Popen], doing: re.Pattern) -> subprocess.Popen | None:
    """The first of ``nodes`` (their `ray start` processes) with a worker doing ``doing``."""
    return next((n for n in nodes if stage_workers(n.pid, doing)), None)


def kill_node(node: subprocess.Popen) -> list[str]:
    """SIGKILL every process of a node: `ray start`, raylet and agents (its process group) and
    the raylet's workers (their own process groups, the node's session). Returns the titles of
    the Ray Data workers among them (what the node was doing)."""
    stages = stage_workers(node.pid, STAGE)
    os.killpg(node.pid, signal.SIGKILL)  # first the raylet: no new workers after this
    killed = []
    for pid, _, sid, _ in processes():
        if sid == node.pid:
            name = title(pid) if pid in stages else ""  # read while it lives
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
    node.wait(timeout=30)
    return [t for t in killed if t]


def test_worker_node_killed_during_crops_and_score(tmp_path):
    root = tmp_path / "data"
    n = 16
    generate_cohort(str(root), SynthConfig(patients=n, matrix=128, seed=41, difficulty=EASY), workers=1, progress=False)
    torch.manual_seed(0)
    model = str(tmp_path / "model.pt")
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    with three_nodes(tmp_path) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen(
            [sys.executable, "-c", NODE_DRIVER, str(root), model], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            workers = cluster.procs[1:]
            first = wait_for(lambda: busy_node(workers, CROPS_TASK), driver)
            assert not (root / "crops" / "manifest.json").exists(), "crops finished before the fault"
            assert any(CROPS_TASK.match(t) for t in kill_node(first)), "no crops task on the node"
            other = next(w for w in workers if w is not first)
            wait_for(lambda: (root / "crops" / "manifest.json").exists() and busy_node([other], SCORING), driver)
            assert not (root / "scores" / "scores.parquet").exists(), "scoring finished before the fault"
            # the scoring actor goes with the batch it held; no CPU is left until a
            # replacement node joins (what an autoscaler does), then it restarts there
            assert any(SCORING.match(t) for t in kill_node(other)), "no scoring actor at work on the node"
            add_worker(cluster, tmp_path / "worker2.log")
            assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    result = json.loads((root / "result.json").read_text())
    assert result["crops"]["patients_with_crops"] == n and result["crops"]["errors"] == 0, result["crops"]
    crops = pq.read_table(root / "crops" / "crops.parquet").to_pandas()
    assert not crops.duplicated(["patient_id", "slice_index"]).any() and crops.patient_id.nunique() == n
    scores = pq.read_table(root / "scores" / "scores.parquet").to_pandas()
    assert len(scores) == n and scores.patient_id.is_unique and result["scores"]["errors"] == 0, result["scores"]
