"""The stages on Ray, rank 4: one module per CLI stage exposing ``run_<stage>`` (crops, score,
train-cv, tune, demo) with the parts only that stage uses (the scoring actor and its resume
parts, the fold trainer).

Each reads top-down as a list of steps and writes the files ``layout`` names. May import ranks
0-3; never ``cli``.
"""
