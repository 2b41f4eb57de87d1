"""DICOM to crops on Ray Data, rank 2, shared by the ``crops`` and ``score`` stages.

Read top-down: ``wire`` (row schemas, no Ray) → ``tasks`` (what a Ray task does, pure over
bytes) → ``datasets`` (the Ray Data datasets; the only module here that imports Ray) →
``passes`` (driver side: list, chunk, first pass, plan, the ordered patient stream).
May import ranks 0-1 (the foundations, ``imaging``, ...); never a stage.
"""
