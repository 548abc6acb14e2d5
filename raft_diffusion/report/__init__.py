"""Seeing a run: image grids and TensorBoard while it runs; the summary, curves and ``report.html``
from its run folder afterwards. Nothing here imports a model library.

    stages/NNNNNN/grid.png, eval_grid.png, eval_samples.jsonl   grids.py (written during the run)
    tb/                                                         loggers.py (TensorBoard / wandb)
    the before -> after table                                   summary.py (statistics: core/stats.py)
    report.html                                                 page.py (+ plots.py)
"""

from raft_diffusion.report.grids import CHOSEN_COLOUR, StageImages, draw_grid
from raft_diffusion.report.loggers import MetricsLogger
from raft_diffusion.report.page import read_outcome, write_report
from raft_diffusion.report.plots import plot_curves, timing_rows
from raft_diffusion.report.summary import summary_table

__all__ = ["CHOSEN_COLOUR", "MetricsLogger", "read_outcome", "StageImages", "draw_grid", "plot_curves", "summary_table", "timing_rows", "write_report"]
