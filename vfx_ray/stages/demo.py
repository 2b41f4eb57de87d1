"""``vfx-ray demo``: the whole flow on the embedded default, sized for 2 CPU cores.

Starts the embedded S3 store over ``WORKDIR/s3`` and the embedded PACS (Orthanc) over
``WORKDIR/pacs``, writes a small synthetic cohort into the store and runs each stage through
the same functions the CLI and the Ray jobs use; the scores go back to the PACS as DICOM SRs
with key images. The PACS keeps running afterwards so that its Explorer shows them
(``vfx-ray pacs stop`` ends it).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from vfx_ray import config as config_mod
from vfx_ray import storage
from vfx_ray.errors import VfxError
from vfx_ray.services import object_store

BUCKET = "vfx"
MIN_DEMO_AUC = 0.80  # issues 4 and 17: the demo cohort (paper difficulty, AUC ~0.83) must be learnt


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run_demo(workdir: str | Path, *, patients: int | None = None, seed: int = 0) -> dict[str, str]:
    """Run every stage on the demo profile; returns the output URIs by stage."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config_mod.profile("demo")
    synth_cfg = config_mod.replace(cfg.synth, patients=patients, seed=seed, roi_masks=True)
    t0 = time.monotonic()
    banner(f"embedded S3 store over {workdir / 's3'}")
    store = object_store.start(workdir / "s3", buckets=(BUCKET,), log_file=workdir / "rclone.log")
    store.export()
    print(f"endpoint {store.endpoint}; bucket s3://{BUCKET} is the folder {workdir / 's3' / BUCKET}")
    server = start_pacs(workdir)
    base = f"s3://{BUCKET}/demo"
    storage.delete_tree(base)  # each demo is a whole fresh run
    outputs = {stage: f"{base}/{stage}" for stage in ("cohort", "crops", "tune", "run", "scores")}
    try:
        make_data(outputs, cfg, synth_cfg)
        train(outputs, cfg)
        report = score_and_report(outputs, cfg, workdir, server.dicomweb_uri if server else None)
    finally:
        store.stop()
    banner(f"done in {time.monotonic() - t0:.0f} s; outputs (S3 URI -> local folder):")
    for stage, uri in outputs.items():
        print(f"  {stage:8s} {uri}  ->  {workdir / 's3' / uri[len('s3://'):]}")
    print(f"\nreport: {report['html']}")
    if server:
        print(f"PACS: the SRs and key images are in Orthanc Explorer, {server.explorer} (user {server.user}; "
              "`vfx-ray pacs env` prints the password, `vfx-ray pacs stop` ends it)")
    return outputs


def start_pacs(workdir: Path):  # noqa: ANN201 - a pacs.Pacs or None
    """A fresh embedded Orthanc over ``workdir/pacs``, detached and recorded like ``vfx-ray pacs
    start`` (so it outlives the demo); None, said, where Orthanc is not installed."""
    from vfx_ray.services import orthanc

    if not orthanc.available():
        print("Orthanc is not installed (make demo installs it as root): the SRs go to a folder instead")
        return None
    old = orthanc.load_state()
    if old and old.listening():  # the previous demo's, whose reports belong to deleted outputs
        old.stop()
    shutil.rmtree(workdir / "pacs", ignore_errors=True)
    banner(f"embedded PACS (Orthanc + DICOMweb) over {workdir / 'pacs'}")
    server = orthanc.start(workdir / "pacs", log_file=workdir / "orthanc.log", detach=True)
    orthanc.save_state(server)
    server.export()
    print(f"DICOMweb {server.dicomweb_uri}")
    return server


def make_data(outputs: dict[str, str], cfg: config_mod.Config, synth_cfg: config_mod.SynthConfig) -> None:
    """synth, then crops."""
    from vfx_ray.stages.crops import run_crops
    from vfx_ray.synth.cohort import generate_cohort

    banner(f"synth: {synth_cfg.patients} patients -> {outputs['cohort']}")
    ann = generate_cohort(outputs["cohort"], synth_cfg, progress=True)
    print(f"{len(ann)} patients, {int((ann['label'] == 'malignant').sum())} malignant")
    banner(f"crops (Ray Data): {outputs['cohort']}/dicom -> {outputs['crops']}")
    cohort = outputs["cohort"]
    summary = run_crops(f"{cohort}/dicom", f"{cohort}/annotations.csv", outputs["crops"], cfg.crops)
    print(f"{summary['crops']} crops of {summary['patients_with_crops']} patients, {summary['errors']} error rows")


def train(outputs: dict[str, str], cfg: config_mod.Config) -> None:
    """tune, then train-cv with the best parameters; fails when the model did not learn."""
    from vfx_ray.stages.train_cv import run_train_cv
    from vfx_ray.stages.tune import run_tune

    banner(f"tune --nested (Ray Tune, ASHA, {cfg.tune.num_samples} trials of lr x L2 in each of the "
           f"{cfg.train.n_folds} outer folds, judged inside its training patients) -> {outputs['tune']}")
    # each stage takes the previous one's folder; nested: no fold's test patients choose its parameters
    searched = run_tune(outputs["crops"], outputs["tune"], cfg, nested=True)
    best = searched["best_params"]
    chosen = ", ".join(f"fold {k}: lr {p['lr']:.2g}, l2 {p['l2']:.2g}" for k, p in best["folds"].items())
    print(f"{searched['trials']} trials, {searched['stopped_early']} stopped early; best {chosen}")
    banner(f"train-cv (Ray Train, demo profile: {cfg.train.arch}, {cfg.train.n_folds} folds, each with its own "
           f"tuned lr/l2) -> {outputs['run']}")
    result = run_train_cv(outputs["crops"], outputs["run"], cfg.train, params=best)
    for level in ("per_slice", "per_patient"):
        m = result["pooled"][level]
        print(f"{level}: sensitivity {m['sensitivity']}, specificity {m['specificity']}, "
              f"accuracy {m['accuracy']}, AUC {m['auc']}")
    auc = result["pooled"]["per_patient"]["auc"]
    if auc is None or auc < MIN_DEMO_AUC:
        raise VfxError("demo", f"the demo model did not learn (per-patient AUC {auc} < {MIN_DEMO_AUC}): "
                       "the paper preset is calibrated to about 0.83-0.85 on this cohort, so something upstream is "
                       "broken (docs/benchmarks.md, calibration)")


def score_and_report(outputs: dict[str, str], cfg: config_mod.Config, workdir: Path,
                     pacs_uri: str | None) -> dict[str, Any]:
    """score the archive with the fold ensemble (SRs and key images to the PACS), then the
    report of the train-cv run."""
    from vfx_ray.report.render import render_report
    from vfx_ray.stages.score import run_score
    from vfx_ray.synth.cohort import MASK_ANNOTATIONS

    banner(f"score (Ray Data + model actors, {cfg.train.n_folds}-fold ensemble; the ROIs given as NIfTI "
           f"and DICOM SEG masks) -> {outputs['scores']}")
    cohort = outputs["cohort"]
    masks = f"{cohort}/{MASK_ANNOTATIONS}"
    sr_out = pacs_uri or f"{outputs['scores']}/sr"
    scored = run_score(f"{cohort}/dicom", masks, outputs["run"], outputs["scores"], cfg.crops, sr_out=sr_out,
                       key_images=True)
    print(f"{scored['rows']} patients scored, {scored['errors']} error rows, model {scored['model_id']}; "
          f"{scored['sr_objects_sent']} SRs and key images sent to {sr_out}")
    if scored["sr_errors"]:
        raise VfxError("demo", f"{scored['sr_errors']} patients' reports were not sent to {sr_out}: see the "
                       f"rows of stage 'sr' in {outputs['scores']}/errors.parquet")
    banner(f"report -> {workdir / 'report'}")
    return render_report(outputs["run"], str(workdir / "report"))
