"""vfx_ray: benign vs malignant vertebral fracture classification on CT, as Ray batch jobs.

Reproduces Li et al., Eur Radiol 2021 (ResNet50 on 3-channel 64x64 sagittal ROI crops,
10-fold patient cross-validation, per-patient max probability).

The top level holds the foundations only (rank 0: ``errors``, ``paper``, ``config``, ``layout``,
``contracts``, ``storage`` with ``s3outage`` and ``dicomweb``); each subpackage states its rank
in its own docstring and imports only lower ranks (docs/architecture.md,
tests/test_architecture.py).
"""

__version__ = "0.1.0"
