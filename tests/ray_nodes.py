"""Real Ray clusters for tests: `ray start --head` plus worker nodes on this machine.

Each node runs `ray start --block` in its own process session and temp dir, with token
authentication on (RAY_AUTH_MODE=token and a random RAY_AUTH_TOKEN, so nothing depends on
~/.ray). Nodes are stopped by terminating those processes — never `ray stop`, which would
end every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vfx_ray.runtime.placement import DRIVER_RESOURCE
from vfx_ray.services.object_store import free_port

BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    gcs_address: str
    dashboard: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    def ray(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, **kwargs)


def _node(args: list[str], env: dict, log: Path, temp_dir: str, private: Path | None = None) -> subprocess.Popen:
    cmd = [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args]
    if private is not None:
        # A disk of its own for ``private``: in a private mount namespace an empty tmpfs covers
        # that folder, so what the head's processes write there (a local --out) is not here.
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs vfx-node-local {shlex.quote(str(private))} && exec {shlex.join(cmd)}"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def local_cluster(log_dir: Path, head_cpus: int = 2, worker_cpus: list[int] | None = None, timeout: float = 120,
                  driver_resource: bool = False, node_local: Path | None = None):
    """A head node with the dashboard, plus one worker node per entry of ``worker_cpus``.

    ``driver_resource``: the head advertises vfx_driver as cluster.yaml's does (fold and trial
    drivers then run there). ``node_local``: a folder that is each node's own, as on separate
    machines: worker nodes get their own temp dirs (session, job working dirs) and an empty
    private mount over this folder (see _node); the head and the test see the real one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_TRAIN_ENABLE_STATE_TRACKING="1",  # the dashboard's Train page, as in cluster.yaml
               # a test cluster ends at once: on SIGTERM a head would otherwise wait out its 30 s drain
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    port, dash = free_port(), free_port()
    # Ray Train's PlacementGroupCleaner (on the head) asks the State API whether a trial's
    # controller lives; left to find the cluster itself, that fails with two Ray instances
    # on one machine, so the nodes' processes are told where the dashboard is.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    cluster = Cluster(gcs_address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}", env=env)
    try:
        head_tmp = tempfile.mkdtemp(prefix="vrh", dir="/tmp")  # short: Ray's socket paths live in it
        cluster.temp_dirs.append(head_tmp)
        cluster.procs.append(_node(
            ["--head", f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}",
             *([f"--resources={json.dumps({DRIVER_RESOURCE: 1000})}"] if driver_resource else [])],
            env, log_dir / "head.log", head_tmp))  # fmt: skip
        deadline = time.time() + timeout
        while dashboard_get(cluster, "/api/version") is None:  # the job API answers
            assert time.time() < deadline and cluster.procs[0].poll() is None, (log_dir / "head.log").read_text()[
                -3000:
            ]
            time.sleep(0.5)
        for i, cpus in enumerate(worker_cpus or []):
            # each node of a cluster shares the head's session dir; the worker gets its own ports.
            # One at a time: raylets starting together pick the same plasma socket name.
            cluster.procs.append(_node(
                [f"--address={cluster.gcs_address}", f"--num-cpus={cpus}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
                env, log_dir / f"worker{i}.log", _worker_temp(cluster) if node_local else head_tmp,
                private=node_local))  # fmt: skip
            while alive_nodes(cluster) < 2 + i:
                assert time.time() < deadline, f"only {alive_nodes(cluster)} of {2 + i} nodes came up"
                time.sleep(0.5)
        yield cluster
    finally:
        for p in reversed(cluster.procs):
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for d in cluster.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _worker_temp(cluster: Cluster) -> str:
    path = tempfile.mkdtemp(prefix="vrw", dir="/tmp")  # short: Ray's socket paths live in it
    cluster.temp_dirs.append(path)
    return path


def until_agent_ready(submit, timeout: float = 120):
    """Call ``submit`` again while the head's job agent has not registered yet.

    The dashboard answers `ray job list` before the head's dashboard agent is known to it; a
    submission in that window fails with "No available agent" after the dashboard's own 10 s
    wait, which a loaded 2-core CI machine can exceed. ``submit`` raises RuntimeError then.
    """
    deadline = time.time() + timeout
    while True:
        try:
            return submit()
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def auth_header(cluster: Cluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"}


def dashboard_get(cluster: Cluster, path: str) -> dict | None:
    """The dashboard's JSON answer to GET ``path`` (token auth), None while it cannot answer.
    In-process: a `ray` CLI call costs a second of CPU, which a starting cluster needs."""
    request = urllib.request.Request(cluster.dashboard + path, headers=auth_header(cluster))
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())
    except (OSError, ValueError):  # not listening yet, 5xx while modules load, a partial answer
        return None


def alive_nodes(cluster: Cluster) -> int:
    """The nodes the State API lists as ALIVE (0 while it cannot say)."""
    alive = "filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    answer = dashboard_get(cluster, f"/api/v0/nodes?limit=100&{alive}")
    try:
        return len(answer["data"]["result"]["result"]) if answer and answer["result"] else 0
    except (KeyError, TypeError):
        return 0


def job_client(cluster: Cluster):
    """A JobSubmissionClient for ``cluster``'s dashboard (token auth)."""
    from ray.job_submission import JobSubmissionClient

    # The client takes RAY_API_SERVER_ADDRESS (or RAY_ADDRESS) over its address argument, and
    # this process may have them set for its own Ray session (conftest): not for this cluster.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(cluster.dashboard, headers=auth_header(cluster))
    finally:
        os.environ.update(hidden)


def wait_for_job(cluster: Cluster, job_id: str, timeout: float, client=None) -> None:
    """Until job ``job_id`` has ended (any way), at most ``timeout`` seconds."""
    from ray.job_submission import JobStatus

    client = client or job_client(cluster)
    deadline = time.time() + timeout
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job_id} still running after {timeout} s"
        time.sleep(1)


def run_job(cluster: Cluster, entry: list[str], working_dir: Path, timeout: float = 600) -> dict:
    """Submit ``entry`` as a Ray job through the dashboard (token auth) and wait for its end;
    returns the job's info (status, start_time, end_time, message) and its logs."""
    import uuid

    client = job_client(cluster)
    job_id = until_agent_ready(lambda: client.submit_job(
        entrypoint=shlex.join(entry), runtime_env={"working_dir": str(working_dir)},
        submission_id=f"vfx-{uuid.uuid4().hex[:8]}"))  # fmt: skip
    wait_for_job(cluster, job_id, timeout, client)
    info = client.get_job_info(job_id)
    return {"status": info.status, "start_time": info.start_time, "end_time": info.end_time,
            "message": info.message, "logs": client.get_job_logs(job_id)}
