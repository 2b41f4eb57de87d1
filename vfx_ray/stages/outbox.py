"""The score run's outbox: each scored patient's SR (and key image) built and sent by a Ray
Data actor pool on the workers, after the scores are written.

The driver pairs each scored row with its planned series, streamed from the archive index
(:func:`patient_reports.reports`), and hands them to the pool a window at a time, so it holds
one window's object lists, not the run's. Each actor builds with
:func:`patient_reports.build` (its models loaded once; a key image decodes only the slices of
its ROI's context box, :func:`tasks.decode_box`, not the whole series) and sends with its own
:class:`delivery.Sender`: at most one request in flight per actor, so the target sees at most
as many as there are actors (``max_actors``), and each actor gives up on a target that stopped
answering. Idempotent as before: fixed UIDs, and the target is asked first.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle
from collections.abc import Callable, Iterable

import pyarrow as pa

from vfx_ray.config import CropConfig
from vfx_ray.export import delivery, patient_reports
from vfx_ray.imaging.pseudonym import Pseudonymizer
from vfx_ray.pipeline import tasks

WINDOW = 256  # reports per dataset: what the driver holds at once
BATCH = 2  # reports per actor call: small, so that both ends of a window stay busy


@dataclasses.dataclass(frozen=True)
class ReportJob:
    """What every report actor needs: where to send, the models (key images), the settings."""

    sr_out: str
    model_files: list[str]
    cfg: CropConfig
    pseudo: Pseudonymizer | None
    key_images: bool
    backoff_s: float = dataclasses.field(default_factory=lambda: delivery.BACKOFF_S)  # read on the driver


class ReportBuilder:
    """Ray Data actor: pickled :class:`patient_reports.Report` in, one outcome row per batch out."""

    def __init__(self, job: ReportJob) -> None:
        import torch

        torch.set_num_threads(1)  # one actor per CPU: each keeps to its own
        self.job, self.sender = job, delivery.Sender(job.sr_out, job.backoff_s)
        self.key_image = (patient_reports.key_image_maker(job.model_files, job.cfg, tasks.decode_box)
                          if job.key_images else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = delivery.Outcome()
        for blob in batch["report"].to_pylist():
            r: patient_reports.Report = pickle.loads(blob)
            build = lambda r=r: patient_reports.build(r, self.job.cfg, self.job.pseudo, self.key_image)  # noqa: E731
            self.sender.patient(r.patient_id, r.series_instance_uid, build, out)
        return pa.table({"outcome": [pickle.dumps(out)], "reports": [batch.num_rows]})


def push(job: ReportJob, reports: Iterable[patient_reports.Report], max_actors: int,
         on_patients: Callable[[int], None] = lambda n: None) -> delivery.Outcome:
    """Build and send every report on the cluster; the outcome of all of them."""
    import ray

    total, it = delivery.Outcome(), iter(reports)
    while window := list(itertools.islice(it, WINDOW)):
        blocks = max(1, -(-len(window) // BATCH))
        actors = max(1, min(max_actors, blocks))  # all started at once: each loads its models first
        ds = ray.data.from_items([{"report": pickle.dumps(r)} for r in window], override_num_blocks=blocks)
        ds = ds.map_batches(ReportBuilder, fn_constructor_kwargs={"job": job}, batch_size=BATCH,
                            batch_format="pyarrow", num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for blob, n in zip(batch["outcome"].to_pylist(), batch["reports"].to_pylist(), strict=True):
                total.add(pickle.loads(blob))
                on_patients(n)
    return total
