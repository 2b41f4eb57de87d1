"""Typed configuration for every stage; defaults are the paper's values.

Two profiles: ``paper`` (Li et al. 2021 as published) and ``demo`` (sized for 2 CPU cores).
Configs are plain dataclasses so they serialise to JSON for run folders and Parquet metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from vfx_ray import paper

PROFILES = ("paper", "demo")
COMPILE_MODES = ("auto", "off", "on", "cudagraphs")  # torch.compile of the training forward
READ_PLANS = ("auto", "whole", "roi")  # CropConfig.read_plan


def option(default: Any, help: str) -> Any:
    """A field whose help text the CLI's flag for it shows, with the default read from the field."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SynthDifficulty:
    """How hard the synthetic cohort is to classify (issue 17). ``paper`` is the default; ``easy``
    is the cohort before it (byte for byte), for fast smoke tests.

    Every draw these settings add comes from its own random stream, so ``easy`` changes nothing.
    Contrasts scale each lesion feature's blend toward its HU (1 = full strength). The ``paper``
    values are calibrated on the demo (``benchmarks/calibrate.py``, docs/benchmarks.md).
    """

    name: str = "paper"
    roi_box: str = "shared"  # shared: one rule for both classes | lesion: around the abnormal area (easy)
    conspicuity: float = 1.0  # every lesion feature's contrast, times the patient's own factor:
    subtle_fraction: float = 0.1  # this share of patients (either class) are subtle cases ...
    subtle_contrast: tuple[float, float] = (0.3, 0.6)  # ... with this factor; the others:
    contrast: tuple[float, float] = (0.6, 1.0)
    lesion_width_mm: tuple[float, float] = (6.0, 12.0)  # lateral extent (easy: 9-15 mm)
    roi_lateral_margin_mm: tuple[float, float] = (2.0, 5.0)  # the box reaches past the lesion each side
    osteoporotic_benign: float = 0.5  # share of osteoporotic patients: most benign fractures are
    osteoporotic_malignant: float = 0.3  # osteoporotic; an older patient with metastases may be too
    osteoporotic_hu: tuple[float, float] = (80.0, 140.0)  # trabecular bone of an osteoporotic patient
    trabecular_hu: float = 12.0  # SD of the trabecular texture inside cancellous bone
    noise_hu: tuple[float, float] = (12.0, 20.0)  # SD of the image noise (a 3 mm bone kernel) ...
    noise_corr_mm: float = 0.5  # ... correlated in-plane by a Gaussian of this sigma (0: white)
    mimic_rate: float = 0.6  # scales every mimic's probability (0: none; synth/mimics.py)


EASY = SynthDifficulty(name="easy", roi_box="lesion", conspicuity=1.0, subtle_fraction=0.0,
                       subtle_contrast=(1.0, 1.0), contrast=(1.0, 1.0), lesion_width_mm=(9.0, 15.0),
                       roi_lateral_margin_mm=(0.0, 0.0), osteoporotic_benign=0.0,
                       osteoporotic_malignant=0.0, trabecular_hu=0.0,
                       noise_hu=(10.0, 20.0), noise_corr_mm=0.0, mimic_rate=0.0)
DIFFICULTIES = {"easy": EASY, "paper": SynthDifficulty()}


def difficulty(name: str, **changes: Any) -> SynthDifficulty:
    """The named preset (``easy`` | ``paper``) with ``changes`` applied."""
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; choose one of {', '.join(DIFFICULTIES)}")
    return dataclasses.replace(DIFFICULTIES[name], **changes)


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic DICOM cohort (the embedded default data; no claim about real patients)."""

    patients: int = paper.PATIENTS
    malignant_fraction: float = paper.MALIGNANT_FRACTION
    seed: int = 0
    matrix: int = 256
    slice_thickness_mm: float = 3.0
    pixel_spacing_mm: tuple[float, float] = (0.6, 0.9)  # range the in-plane spacing is drawn from
    n_vertebrae: tuple[int, int] = (4, 6)
    transfer_syntax: str = "explicit"  # explicit | jpeg2000 | jpegls | rle
    enhanced: bool = False
    patient_position: str = "HFS"  # HFS | FFS | mixed
    oblique_deg: float = 0.0
    coverage: str = "segment"  # segment: 4-8 vertebrae of T9-S1 | thoracolumbar: T1-S1 (~450 mm)
    slice_spacing_mm: float | None = None  # None: the thickness; smaller: overlapping reconstructions
    overlap_fraction: float = 0.0  # this share of patients (drawn) get slices half their thickness apart
    fov_mask: bool = False  # a circular field of view, PixelPaddingValue outside it
    study: str = "single"  # single: one axial series | clinical: the series of a spine CT study
    dicomdir: bool = False  # each clinical study as DICOM media: DICOMDIR + PT*/ST*/SE*/IM* files
    roi_masks: bool = False  # also each ROI as a mask (NIfTI or DICOM SEG) and annotations_masks.csv
    difficulty: SynthDifficulty = field(default_factory=SynthDifficulty)  # DIFFICULTIES: paper | easy


def clinical_synth(**changes: Any) -> SynthConfig:
    """A hospital's spine CT export: 512x512 with a circular field of view, 1.25 mm slices over
    T1-S1, and a study of localizer, bone and soft-kernel axial series, sagittal and coronal
    reformats, a dose report and a secondary capture (``vfx-ray synth --clinical``)."""
    base = SynthConfig(matrix=512, pixel_spacing_mm=(0.7, 0.98), slice_thickness_mm=1.25,
                       coverage="thoracolumbar", fov_mask=True, study="clinical", overlap_fraction=0.25)
    return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class SeriesRule:
    """One test of a series-index field, for choosing the series of a study (in the manner of
    MONAI Deploy's series selector). A ``required`` rule drops the series that fail it; any
    other rule is a preference: it drops them only if some series pass it. ``name`` says why
    a series lost, in the series index.

    The test: ``match``, a regular expression searched (case-insensitively) in the field's
    text, the empty string for a missing field (``negate``: the rule holds when it is not
    found); or ``range``, inclusive bounds of a number; or ``nearest``, keep the series whose
    number is nearest it. Fields: those of ``series_index.parquet``, and ``roi_inside``
    (``yes``, ``no``, or ``unknown`` when the series' extent is not known from its headers).
    """

    name: str
    field: str
    match: str | None = None
    negate: bool = False
    range: tuple[float, float] | None = None
    nearest: float | None = None
    required: bool = False


# A bone or sharp reconstruction kernel: GE BONE/BONEPLUS/SHARP, Siemens B/Br/H/Hr 60-99 and
# I/J 70s-80s, Philips D/E/YB/YC/L, Canon FC30s/FC80s.
BONE_KERNELS = r"bone|sharp|(^|\\)(b|br|h|hr|i|j)[6-9][0-9]|^(d|e|yb|yc|l)$|^fc[38][0-9]"

DEFAULT_SERIES_RULES: tuple[SeriesRule, ...] = (
    SeriesRule("not CT", "modality", match=r"^CT$", required=True),
    SeriesRule("not every object holds pixel data", "all_have_pixel_data", match=r"^False$", negate=True,
               required=True),
    SeriesRule("a localizer", "image_type", match=r"LOCALIZER", negate=True, required=True),
    SeriesRule("the ROI lies outside the series", "roi_inside", match=r"^no$", negate=True, required=True),
    SeriesRule("derived or secondary (an ORIGINAL\\PRIMARY series is preferred)", "image_type",
               match=r"^ORIGINAL\\PRIMARY"),
    SeriesRule("not axial (an axial series is preferred)", "plane", match=r"^axial$"),
    SeriesRule("a soft kernel (a bone or sharp one is preferred)", "convolution_kernel", match=BONE_KERNELS),
    SeriesRule("slices farther from the 3 mm of the paper", "slice_thickness", nearest=paper.SLICE_THICKNESS_MM),
)


@dataclass(frozen=True)
class CropConfig:
    """The paper's preprocessing: sagittal 3 mm, 3 channels, smallest square ROI, 64x64, z-score."""

    sagittal_thickness_mm: float = option(paper.SLICE_THICKNESS_MM, "sagittal slab thickness in mm")
    crop_size: int = option(64, "crop side in pixels")
    channels: int = 3  # the slice and its two neighbours
    min_slices: int = 1
    max_slices: int = option(5, "most sagittal slices per patient")
    inplane_spacing_mm: float = 0.5  # sagittal reformat grid (y, z)
    max_file_bytes: int = option(64 * 1024 * 1024, "objects above this size in bytes are refused")
    max_gap_factor: float = 1.5  # larger gaps between slices are an error
    series_rules: tuple[SeriesRule, ...] = DEFAULT_SERIES_RULES  # the series of a study, when none is named
    # How objects are read: "whole" (each object once, whole), "roi" (every header by a ranged
    # read, then only the objects the ROI's slices need), "auto": "roi" for a folder of at
    # least ``roi_read_min_bytes`` (a clinical study), "whole" below (docs/benchmarks.md).
    read_plan: str = option("auto", "whole: read every object once, whole; roi: read every header by a ranged GET, "
                            "then only the objects that hold the ROI's slices; auto: roi for a folder (study) of "
                            "32 MiB or more, whole below. The crops are the same; OUT/reads.parquet records each "
                            "patient's plan and bytes")
    roi_read_min_bytes: int = 32 << 20


@dataclass(frozen=True)
class TrainConfig:
    """ResNet50 recipe of the paper: Adam lr 1e-4, beta1 0.5, batch 32, 100 epochs, 20x affine."""

    arch: str = option("resnet50", "the ResNet")
    pretrained: str = option("imagenet", "ImageNet initialisation (the paper's) or none")
    pretrained_path: str | None = option(None, "ImageNet weights (s3:// or a local file) when not in the "
                                         "torchvision cache; `vfx-ray weights put` uploads them")
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    l2: float = 1e-4
    batch_size: int = 32
    max_epochs: int = option(100, "most epochs per fold, stopped early on validation loss")
    patience: int = 10
    augment_factor: int = option(20, "augmented views per crop and epoch")
    translate: float = 0.1  # fraction of the crop
    scale: tuple[float, float] = (0.9, 1.1)
    rotate_deg: float = 15.0
    n_folds: int = option(10, "cross-validation folds")
    val_fraction: float = 0.1
    seed: int = option(0, "folds and initialisation seed")
    num_workers: int = option(1, "Ray Train workers per fold")
    use_gpu: bool | None = None  # None: GPUs when the cluster has or can get them
    gpu_worker_cpus: int = option(2, "CPUs a GPU training worker also reserves (its host thread must not starve "
                                     "behind decode tasks)")
    folds_per_gpu: int = option(1, "K folds (tune: trials) share one GPU, each worker asking for 1/K of it and of "
                                   "--gpu-worker-cpus (at least 1 CPU): at batch 32 one fold cannot keep a large GPU "
                                   "busy (see docs/benchmarks.md for measured K)")
    compile: str = option("auto", "torch.compile the training forward: auto (on CUDA, not on CPU), off, on, or "
                          "cudagraphs (mode reduce-overhead); a failing compile falls back to eager")
    checkpoint_every: int = option(1, "epochs between checkpoints, uploaded in the background: a restart redoes at "
                                   "most N epochs; the last epoch is always checkpointed, with the best weights")
    threshold: float = 0.5


@dataclass(frozen=True)
class TuneConfig:
    lr_range: tuple[float, float] = (1e-5, 1e-3)
    l2_range: tuple[float, float] = (1e-6, 1e-2)
    num_samples: int = 16
    max_epochs: int = 20
    grace_period: int = 2


@dataclass(frozen=True)
class Config:
    profile: str = "paper"
    synth: SynthConfig = field(default_factory=SynthConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def profile(name: str = "paper") -> Config:
    """The named profile. ``demo`` trades the paper's scale for minutes on 2 CPU cores."""
    if name == "paper":
        return Config()
    if name == "demo":
        return Config(
            profile="demo",
            synth=SynthConfig(patients=60, matrix=160),
            train=TrainConfig(
                arch="resnet18",
                pretrained="none",
                max_epochs=8,
                patience=4,
                augment_factor=2,
                n_folds=3,
                batch_size=32,
                lr=1e-3,
            ),
            # From scratch in 8 epochs a ResNet18 needs a higher lr than ImageNet fine-tuning:
            # the demo searches around its own 1e-3, nested (2 trials in each of 3 outer folds)
            tune=TuneConfig(lr_range=(5e-4, 2e-3), num_samples=2, max_epochs=2, grace_period=1),
        )
    raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """TrainConfig from its JSON form (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown training parameters {sorted(unknown)}; known: {sorted(names)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def with_params(cfg: TrainConfig, params: dict[str, Any] | None) -> TrainConfig:
    """``cfg`` with ``params`` (a flat dict of TrainConfig fields, e.g. Tune's best) applied."""
    return train_config_from_dict({**dataclasses.asdict(cfg), **params}) if params else cfg


def replace(obj, **changes):
    """dataclasses.replace that ignores None values (unset CLI flags keep the profile's)."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})
