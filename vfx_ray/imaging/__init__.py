"""Imaging, rank 1: DICOM reading and its guards against hostile input, HU volumes and sagittal
crops, the ROI box and masks, annotations, series rules and pseudonyms.

Pure over bytes, arrays and tables: no Ray, no torch. May import the foundations only.
"""
