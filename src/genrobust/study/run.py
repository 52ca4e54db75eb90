"""`run_study`: the cells that are not cached, in this process or in workers, then the study's report."""
import functools
import logging
import pathlib
import time

from .cells import evaluate_cell, run_cell
from .config import write_config
from .plan import describe_plan, plan, select_cells

logger = logging.getLogger(__name__)


def run_study(cfg, out, cells=None, dry_run=False, device="cpu", progress=True, echo=print, jobs=None):
    """Run the cells of a study that are not cached, then evaluate and write `report.md`/`report.html`.

    Args:
        cfg: a resolved study config (`load_study`).
        cells: `"i/n"` (or `(i, n)`) to run only cells with index % n == i; None runs all.
        dry_run: print the plan and run nothing.
        jobs: cells run at once on this machine, in as many long-lived worker processes, each scoring the
            models it trains (default: the config's `jobs`).
            With `processes` > 1 in the config, generation and training cells run under torchrun or
            accelerate launch with that many processes.
    Returns {"ran": [cell folders run], "skipped": [waiting on another slice], "failed": [...], "report": paths or None}.
    """
    out = pathlib.Path(out)
    jobs = cfg["jobs"] if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    all_cells = plan(cfg, out)
    selected = select_cells(all_cells, cells)
    if dry_run:
        echo(describe_plan(all_cells, selected, jobs))
        return {"ran": [], "skipped": [], "failed": [], "report": None}
    t0 = time.time()
    config_path = write_config(out, _recorded(cfg), name="study.yaml")
    results = out / "results.jsonl"
    if jobs > 1 or cfg["processes"] > 1:
        from .workers import run_in_processes
        ran, skipped, failed = run_in_processes(selected, config_path, out, device, jobs, cfg, progress,
                                                waiting=lambda c: _waiting(c, selected))
    else:
        ran, skipped, failed = _run_in_process(selected, all_cells, cfg, device, progress, results)
    trained = [c for c in selected if c.kind == "training" and c.cached()]
    for c in trained:  # what no cell scored yet; each slice scores its own models, never another's
        evaluate_cell(c, cfg, results, device)
    report = None
    if all(c.cached() for c in all_cells):
        report = _write_study_report(cfg, out, all_cells, results, time.time() - t0, device)
    else:
        logger.info("%d cells are not done yet; the report is written when every cell is",
                    sum(not c.cached() for c in all_cells))
    if failed:
        raise ValueError(f"{len(failed)} study cell(s) failed: {'; '.join(failed)}. Finished cells are kept; "
                         "fix the cause and rerun the same command to run only what is missing")
    return {"ran": ran, "skipped": skipped, "failed": failed, "report": report}


def _recorded(cfg):
    return {k: v for k, v in cfg.items() if k != "num_real"}


def _waiting(c, selected):
    chosen = {s.index for s in selected}
    return [d for d in c.deps if not d.cached() and d.index not in chosen]


def _run_in_process(selected, all_cells, cfg, device, progress, results):
    ran, skipped = [], []
    for c in selected:
        if c.cached():
            logger.info("[%d/%d] %s: cached", c.index, len(all_cells), c.folder.name)
            continue
        waiting = _waiting(c, selected)
        if waiting:
            logger.warning("%s waits on %s (another --cells slice); rerun this slice once it is done",
                           c.folder.name, ", ".join(d.folder.name for d in waiting))
            skipped.append(c.folder.name)
            continue
        logger.info("[%d/%d] running %s", c.index, len(all_cells), c.folder.name)
        run_cell(c, cfg, device, progress)
        if c.kind == "training":
            evaluate_cell(c, cfg, results, device)
        ran.append(c.folder.name)
    return ran, skipped, []


def _baseline_source(cfg, cells):
    if isinstance(cfg["baseline"], dict):
        return next(c for c in cells if c.kind == "baseline").folder / "results.jsonl"
    return cfg["baseline"]


def _write_study_report(cfg, out, cells, results, seconds, device):
    from ..evaluate import read_results
    from ..report import write_report
    training = [c for c in cells if c.kind == "training"]
    names = {str(c.folder) for c in training}
    rows = [r for r in read_results(results) if r.get("checkpoint") in names]
    baseline = _baseline_source(cfg, cells)
    reference = next((c.arm for c in training if c.meta["group"] == "real"), None)
    notes = [f"{len(cfg['seeds'])} seed(s) per arm ({', '.join(map(str, cfg['seeds']))}): each arm's cells show "
             f"mean ± standard deviation over its seeds (n=); {', '.join(cfg['models'])}, {cfg['epochs']} epochs; "
             f"up to {cfg['per_class']} generated images per class per strategy; amounts "
             f"{', '.join(map(str, cfg['amounts']))} (k: real + k x |real| generated images; generated-only: "
             f"{cfg['generated_only']:g} x |real| generated images, no real).",
             _controls_note(cfg, training),
             f"this run's wall time {seconds:.0f} s on device {device} (cached cells excluded)"]
    gens = [c.folder for c in cells if c.kind == "generation"]
    arms = {c.arm: c.meta for c in training}
    from .figures import study_figures
    hook = functools.partial(study_figures, arms=arms, bar_amount_wanted=cfg["bar_amount"])
    return write_report(rows, out, baseline=None if baseline is None else str(baseline), reference=reference,
                        generated=gens, title=f"genrobust study: {cfg['name']}", notes=notes, figure_hook=hook)


def _controls_note(cfg, training):
    ctl, parts = cfg["controls"], []
    sm = next((c for c in training if c.meta["group"] == "step-matched"), None)
    if sm is not None:
        parts.append(f"`real-step-matched` trains on real data only for {sm.meta['epochs']} epochs, at least the "
                     "optimisation steps of the largest real+generated arm")
    elif ctl["step_matched"]:
        parts.append("no step-matched arm: no real+generated arm takes more steps than real-only")
    if ctl["retrieval"]:
        parts.append(f"`real+retrieval-k*` add k x |real| images drawn from the generator's own training data "
                     f"({' + '.join(ctl['retrieval']['source'])}) instead of generated ones")
    else:
        parts.append("no retrieval control: give controls.retrieval.source (the generator's training data, or "
                     "images retrieved like it) to ask whether the generator adds anything beyond that data")
    return "Controls: " + "; ".join(parts) + "."
