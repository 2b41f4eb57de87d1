"""The synthetic DICOM cohort, rank 2: anatomy, Table 1 feature allocation, lesions, what makes
the cohort hard, clinical studies and DICOM writing (``vfx-ray synth``).

May import ranks 0-1 (the foundations, the ROI type and geometry of ``imaging``).
"""
