"""Reports, rank 3: the HTML page, Markdown summary and figures of a train-cv run or a labelled
scores folder (``render.render_report``); the table and figure functions are public in their
modules so notebooks show the same things without a copy.

Pure (pandas, matplotlib, scipy, scikit-learn); inputs are read through ``vfx_ray.storage`` so
runs on s3:// work like local ones; torch loads only in ``heatmaps``, lazily, when a run has fold
models to explain. May import ranks 0-2 (``example_run`` builds a fake run from ``synth``'s
Table 1); never ``stages`` or ``cli``.
"""
