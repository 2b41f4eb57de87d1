"""vfx_ray: benign vs malignant vertebral fracture classification on CT, as Ray batch jobs.

Reproduces Li et al., Eur Radiol 2021 (ResNet50 on 3-channel 64x64 sagittal ROI crops,
10-fold patient cross-validation, per-patient max probability).
"""

__version__ = "0.1.0"
