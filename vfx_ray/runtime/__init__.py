"""Ray runtime, rank 1: connecting to or starting a cluster, where work runs (placement), the S3
filesystem Ray Train and Tune write through, Tune callbacks (progress, orphaned trials) and the
run record that pins a run folder's settings.

The only package besides ``stages`` (and ``pipeline.datasets``) that imports Ray. May import the
foundations only.
"""
