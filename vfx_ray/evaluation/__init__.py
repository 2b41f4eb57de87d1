"""Evaluation, rank 1: patient folds, the paper's metrics with their confidence intervals and
tests, and tuned parameters with the protocol that chose them.

Pure (numpy, pandas, scipy, scikit-learn). May import the foundations only.
"""
