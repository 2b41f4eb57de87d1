"""Synthetic DICOM cohort: anatomy, Table 1 feature allocation, lesions, DICOM writing."""
