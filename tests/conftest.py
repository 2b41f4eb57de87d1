"""Shared fixtures: one embedded S3 store, one PACS and one Ray session for the whole test run.

The store and the PACS start first and export their variables (the standard AWS ones,
VFX_RAY_DICOMWEB_*), so Ray's workers (which inherit the driver's environment at
``ray.init``) reach them too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import hypothesis  # noqa: F401 - imported now, not in the session's summary while Ray's threads run (below)
import pytest

from vfx_ray.services import object_store, orthanc

# hypothesis' pytest plugin imports hypothesis in the terminal summary when no test did; under
# pytest's assertion rewriting that compiles modules at the end of the session, and on CPython
# 3.11.7 a compile concurrent with another thread's can fail with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905), which turned a green run of a few Ray test
# files red after its last test. Importing it here, before any Ray thread, avoids that.

AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients find the dashboard


@contextlib.contextmanager
def environment(values: dict[str, str], restore: tuple[str, ...] = ()) -> Iterator[None]:
    """``values`` set in os.environ for the block; afterwards they, and ``restore``, as they were."""
    saved = {k: os.environ.get(k) for k in {*values, *restore}}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def objectstore_server(tmp_path_factory):
    """A running rclone S3 server on loopback, its variables exported in os.environ."""
    root = tmp_path_factory.mktemp("s3root")
    store = object_store.start(root, buckets=("vfx", "test"), log_file=root.parent / "rclone.log")
    with environment(store.env(), AWS_VARS):
        yield store
    store.stop()


@pytest.fixture(scope="session")
def pacs_server(tmp_path_factory):
    """Debian's Orthanc with DICOMweb on loopback (``vfx_ray.services.orthanc``), its variables exported
    before Ray starts so that local workers inherit them. None where Orthanc is not installed
    (the PACS tests then skip, saying so); ``make test`` installs it when root."""
    if not orthanc.available():
        yield None
        return
    root = tmp_path_factory.mktemp("orthanc")
    server = orthanc.start(root, log_file=root / "orthanc.log")
    with environment(server.env()):
        yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session(objectstore_server, pacs_server):
    """One local Ray instance for every test that needs it (ray.init costs ~10 s here).

    With its dashboard: Ray Train's PlacementGroupCleaner frees the workers of a trial that
    ASHA stopped through the State API, which the dashboard serves. Its workers are told where
    (RAY_API_SERVER_ADDRESS, inherited from this process): left to find the cluster by itself,
    the State API gives up when this machine runs another Ray instance, and the next trial
    would wait forever for the leaked CPUs.
    """
    import ray

    if not ray.is_initialized():
        port = object_store.free_port()
        os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
        ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
    os.environ.pop(STATE_API_ENV, None)


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory):
    """A factory: the local synthetic cohort of (patients, seed, matrix), written once per run.

    Its folder (``dicom/``, ``annotations.csv``) is shared: tests write their outputs elsewhere.
    """
    from vfx_ray.config import EASY, SynthConfig
    from vfx_ray.synth.cohort import generate_cohort

    made: dict[tuple[int, int, int], str] = {}

    def make(patients: int, seed: int, matrix: int = 128) -> str:
        key = (patients, seed, matrix)
        if key not in made:
            root = str(tmp_path_factory.mktemp(f"cohort-{patients}-{seed}-{matrix}"))
            cfg = SynthConfig(patients=patients, matrix=matrix, seed=seed, difficulty=EASY)  # not a difficulty test
            generate_cohort(root, cfg, workers=1, progress=False)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_crops(tmp_path_factory):
    """A factory: the path of a tiny learnable crops table (``crops_fixture.make_crops``), one
    file per set of arguments."""
    import pyarrow.parquet as pq
    from crops_fixture import make_crops

    made: dict[tuple, str] = {}

    def make(n_patients: int, slices: int = 3, size: int = 32) -> str:
        key = (n_patients, slices, size)
        if key not in made:
            path = tmp_path_factory.mktemp("crops") / "crops.parquet"
            pq.write_table(make_crops(n_patients=n_patients, slices=slices, size=size), path)
            made[key] = str(path)
        return made[key]

    return make
