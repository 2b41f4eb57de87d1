"""Results as DICOM, rank 2: a TID 1500 Structured Report and a key image per scored patient, and
sending them to a folder or a PACS (STOW-RS).

Runs on the driver after the scores are written, without Ray. May import ranks 0-1 (the
foundations, ``imaging``, ``ml``, ``evaluation``, ``runtime``, ``services``).
"""
