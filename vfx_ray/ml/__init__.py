"""Machine learning in pure torch, rank 1: the ResNets and their weight files, augmentation, the
paper's reference loop and the device-resident loop the Ray workers run, the ensemble and
Grad-CAM.

No Ray and no DICOM libraries, so ``benchmarks/gpu.py`` runs where only torch is installed.
May import the foundations only.
"""
