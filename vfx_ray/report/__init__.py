"""Reports of a train-cv run or a labelled scores folder: HTML page, Markdown, figures.

Pure (pandas, matplotlib, scipy, scikit-learn); inputs are read through ``vfx_ray.storage``
so runs on s3:// work like local ones. ``render_report`` writes everything; the table and
figure functions are public so notebooks show the same things without a copy.
"""

from vfx_ray.report.curves import (
    calibration_figure,
    confusion_figure,
    decision_curve_figure,
    net_benefit,
    roc_figure,
    treat_all,
)
from vfx_ray.report.example_run import write_example_run
from vfx_ray.report.inputs import RunData, load_run, read_annotations, read_crop_images, read_crops
from vfx_ray.report.render import SECTION_IDS, build_sections, render_report
from vfx_ray.report.slices import (
    edge_centre_table,
    outcomes,
    pick_examples,
    position_figure,
    rescued,
    slice_positions,
    slice_probability_figure,
)
from vfx_ray.report.tables import chi2_p, cohort_frame, cohort_table, fold_table, results_table

__all__ = [
    "SECTION_IDS",
    "RunData",
    "build_sections",
    "calibration_figure",
    "chi2_p",
    "cohort_frame",
    "cohort_table",
    "confusion_figure",
    "decision_curve_figure",
    "edge_centre_table",
    "fold_table",
    "load_run",
    "net_benefit",
    "outcomes",
    "pick_examples",
    "position_figure",
    "read_annotations",
    "read_crop_images",
    "read_crops",
    "render_report",
    "rescued",
    "results_table",
    "roc_figure",
    "slice_positions",
    "slice_probability_figure",
    "treat_all",
    "write_example_run",
]
