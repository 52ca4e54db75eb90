"""Studies: the study grid (`genrobust study CONFIG`) and its fast slice, the quickstart.

- `config`: a study config read, checked and resolved (no image is opened to plan).
- `plan`: the cells, keyed by the hash of their inputs, cached by completeness, with cost estimates.
- `cells`: running one cell in this process, and scoring the model a training cell made.
- `run`: `run_study`, the cells that are not cached, then the report.
- `workers`: cells in long-lived worker processes, or under torchrun / accelerate launch.
- `baselines`: the baseline zoo of real-only models behind the effective-robustness line.
- `figures`: a study's curves and bars from result rows.
- `quickstart`: generate, train, evaluate and report the digits world's fast slice.

Importing the package is light: torch and the stages load when a cell runs.
"""
from .cells import evaluate_cell, run_cell, run_one_cell, train_arm
from .config import GENERATED_ONLY, load_study, resolve_study, write_config
from .plan import Cell, describe_plan, plan, select_cells, step_matched_epochs
from .quickstart import quickstart
from .run import run_study

__all__ = ["Cell", "GENERATED_ONLY", "describe_plan", "evaluate_cell", "load_study", "plan", "quickstart",
           "resolve_study", "run_cell", "run_one_cell", "run_study", "select_cells", "step_matched_epochs",
           "train_arm", "write_config"]
