"""Effective robustness: accuracy on a shift above the logit-linear fit of baseline models.

Fit logit(y) = a * logit(x) + b over baseline points (x = in-distribution accuracy on the shift's class
subset, y = shift accuracy); ER = y - sigmoid(a * logit(x) + b) (Taori et al., 2020).
"""
import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)
CLIP = 1e-4  # accuracies of exactly 0 or 1 have an infinite logit; they are clipped to [CLIP, 1 - CLIP]


def logit(p):
    p = np.clip(np.asarray(p, dtype=float), CLIP, 1 - CLIP)
    return np.log(p / (1 - p))


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


@dataclass(frozen=True)
class Line:
    """A logit-linear baseline: logit(y) = slope * logit(x) + intercept, fitted on `n` points."""

    slope: float
    intercept: float
    n: int

    def predict(self, x):
        return sigmoid(self.slope * logit(x) + self.intercept)


def fit_line(x, y):
    """Least-squares fit in logit space; needs at least 3 baseline points with distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"baseline x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 3:
        raise ValueError(f"an effective-robustness line needs at least 3 baseline models, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("baseline accuracies contain NaN or inf; fix the results rows")
    clipped = int(((x <= 0) | (x >= 1) | (y <= 0) | (y >= 1)).sum())
    if clipped:
        logger.warning("%d baseline points at accuracy 0 or 1 were clipped to [%g, %g] for the logit",
                       clipped, CLIP, 1 - CLIP)
    lx, ly = logit(x), logit(y)
    if np.ptp(lx) == 0:
        raise ValueError("all baseline models have the same in-distribution accuracy; the line is undefined")
    slope, intercept = np.polyfit(lx, ly, 1)
    return Line(float(slope), float(intercept), len(x))


def effective_robustness(x, y, line):
    """Measured shift accuracy minus the line's prediction at the model's ID accuracy."""
    return float(np.asarray(y, dtype=float) - line.predict(x))


# Above this share of degenerate resamples the percentile interval describes another distribution (the one
# conditioned on a defined line) too loosely to report: 4 distinct baseline points already give 1.6%.
MAX_DROPPED = 0.05


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval, with how many of the `n` resamples defined no line and were dropped."""

    low: float
    high: float
    n: int
    dropped: int

    def __iter__(self):  # lo, hi = interval
        return iter((self.low, self.high))


def bootstrap_interval(bx, by, x, y, n=1000, level=0.95, seed=0, max_dropped=MAX_DROPPED):
    """Percentile interval of ER over refits of the line on baseline points resampled with replacement.

    A resample whose points share one ID accuracy defines no line and is dropped; the count is returned, and
    more than `max_dropped` of `n` is an error (too few distinct baseline points for an interval).
    """
    if n < 1:
        raise ValueError(f"the bootstrap needs at least 1 resample, got {n}; pass --bootstrap N with N >= 1")
    rng = np.random.default_rng(seed)
    bx, by = np.asarray(bx, dtype=float), np.asarray(by, dtype=float)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(bx), len(bx))
        if np.ptp(logit(bx[idx])) == 0:
            continue  # a resample of one repeated point defines no line
        line = Line(*map(float, np.polyfit(logit(bx[idx]), logit(by[idx]), 1)), len(idx))
        values.append(effective_robustness(x, y, line))
    dropped = n - len(values)
    if dropped > max_dropped * n:
        raise ValueError(f"{dropped} of {n} bootstrap resamples defined no line (more than {max_dropped:.0%}): "
                         f"{len(set(logit(bx).tolist()))} distinct baseline ID accuracies are too few for an "
                         "interval; add baseline models")
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(lo), float(hi), n, dropped)


def relative_robustness(y, y_reference):
    """Shift accuracy gained over a named reference model (e.g. the real-only baseline)."""
    if math.isnan(y) or math.isnan(y_reference):
        raise ValueError("relative robustness of a NaN accuracy")
    return float(y - y_reference)


# --- baselines and ER rows -------------------------------------------------------------------------------

# testbed column pairs per shift: (ID accuracy on the shift's classes, shift accuracy), both in percent
TESTBED_COLUMNS = {
    "imagenet-v2": ("val", "imagenetv2-matched-frequency-format-val"),
    "imagenet-sketch": ("val", "imagenet-sketch"),
    "imagenet-r": ("val-on-imagenet-r-classes", "imagenet-r"),
    "imagenet-a": ("val-on-imagenet-a-classes", "imagenet-a"),
    "objectnet": ("val-on-objectnet-classes", "objectnet-1.0-beta"),
}
# how many ImageNet classes the testbed scored each shift on; a model scored on fewer (e.g. ImageNet-100)
# sits on another line, so its ER against the testbed is flagged
TESTBED_NUM_CLASSES = {"imagenet-v2": 1000, "imagenet-sketch": 1000, "imagenet-r": 200, "imagenet-a": 200,
                       "objectnet": 125}
TESTBED_TYPES = ("Standard training",)


def near_chance(accuracy, num_classes):
    """Within 1.5x of chance: such a model says nothing about the line, so it is left out of it."""
    return accuracy < 1.5 / num_classes


@dataclass(frozen=True)
class BaselinePoint:
    """One baseline model on one shift: x = ID accuracy on the shift's class subset, y = shift accuracy.

    `class_subset` is the subset the point was scored on (a results row's), or None for the testbed's own
    subset of that shift (ImageNet-R's and -A's 200 classes, ObjectNet's 113).
    """

    model: str
    x: float
    y: float
    class_subset: str = None


@dataclass
class Baseline:
    name: str
    points: dict  # eval set -> [BaselinePoint]
    warnings: list = None

    def points_for(self, eval_set, class_subset):
        """The points of one line: a results baseline's on exactly these classes (models scored on other
        subsets sit on other lines); the testbed's, which has one subset per shift, whatever the subset."""
        pts = self.points.get(eval_set, [])
        return [p for p in pts if p.class_subset is None or p.class_subset == class_subset]


def load_baseline(spec, model_types=TESTBED_TYPES):
    """Baseline points from `testbed` (published ImageNet accuracies of standard models) or a results file.

    A results file's models are all baselines (e.g. a baseline zoo's `results.jsonl`); each shift row is paired
    with the same checkpoint's ID row on the same class subset. Models near chance are left out, and said.
    """
    if spec == "testbed":
        return _testbed_baseline(model_types)
    import pathlib
    path = pathlib.Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"baseline {spec!r} is neither 'testbed' nor a results file; give the "
                                "results.jsonl of a baseline zoo (`genrobust baselines train` writes one)")
    from .evaluate import check_rows, read_results
    rows, warnings = check_rows(read_results(path))
    points = {}
    for row, x in paired_rows(rows):
        if row.get("num_classes") and near_chance(x, row["num_classes"]):
            warnings.append(f"baseline {row['model']} is near chance in distribution ({100 * x:.1f}%); "
                            f"left out of the {row['eval_set']} line")
            continue
        points.setdefault(row["eval_set"], []).append(
            BaselinePoint(row["model"], x, row["value"], _subset(row)))
    if not points:
        raise ValueError(f"{spec}: no shift rows with an in-distribution counterpart; evaluate the baseline "
                         "models on the ID set and the shifts first")
    return Baseline(str(path), points, warnings)


def _testbed_baseline(model_types):
    import csv
    import importlib.resources

    text = importlib.resources.files("genrobust").joinpath("assets/reference/testbed_results.csv").read_text()
    points = {}
    for r in csv.DictReader(text.splitlines()):
        if model_types and r["model_type"] not in model_types:
            continue
        for shift, (xc, yc) in TESTBED_COLUMNS.items():
            if r[xc] and r[yc]:
                points.setdefault(shift, []).append(BaselinePoint(r["model"], float(r[xc]) / 100,
                                                                  float(r[yc]) / 100))
    return Baseline("testbed (" + ", ".join(model_types) + ")" if model_types else "testbed", points, [])


def _key(row):
    return row.get("checkpoint") or f"{row['model']}#{row.get('seed')}"


def _subset(row):
    """A row's class subset as a hashable, comparable key ("all" when absent)."""
    import json
    v = row.get("class_subset", "all")
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def paired_rows(rows):
    """Yield (shift row, x) for every top-1 shift row whose checkpoint has an ID row on the same classes."""
    ids = {}
    for r in rows:
        if r.get("metric") == "top1" and r.get("role") == "id":
            ids.setdefault((_key(r), r.get("class_subset", "all")), []).append(r)
    for r in rows:
        if r.get("metric") != "top1" or r.get("role") != "shift":
            continue
        cands = ids.get((_key(r), r.get("class_subset", "all")), [])
        if r.get("id_set"):
            cands = [c for c in cands if c["eval_set"] == r["id_set"]]
        if len(cands) == 1:
            yield r, cands[0]["value"]


def er_rows(rows, baseline, n_boot=1000, seed=0, reference=None):
    """Effective (and relative) robustness rows for every shift row that has an ID counterpart.

    Returns (rows, {(eval set, class subset): Line}, warnings). Nothing is silently dropped: every shift row
    that gets no ER or no interval is named in the warnings with the reason, and each ER row counts the
    bootstrap resamples its interval used (`ci_resamples`) and dropped (`ci_dropped`).
    """
    warnings = list(baseline.warnings or [])
    lines, out, paired = {}, [], list(paired_rows(rows))
    have = {id(r) for r, _ in paired}
    for r in rows:
        if r.get("metric") == "top1" and r.get("role") == "shift" and id(r) not in have:
            warnings.append(f"{r['model']} on {r['eval_set']}: no in-distribution row on the same classes "
                            f"({r.get('class_subset', 'all')}); no ER")
    for r, x in paired:
        key = (r["eval_set"], _subset(r))
        line = _line_for(key, baseline, lines, warnings)
        if line is None:
            continue
        expected = TESTBED_NUM_CLASSES.get(r["eval_set"]) if baseline.name.startswith("testbed") else None
        if expected and r.get("num_classes") and r["num_classes"] != expected:
            warnings.append(f"{r['model']} on {r['eval_set']} was scored on {r['num_classes']} classes, the "
                            f"testbed line on {expected}: its ER compares unlike with like")
        if not (0 < x < 1 and 0 < r["value"] < 1):
            warnings.append(f"{r['model']} on {r['eval_set']}: an accuracy of 0 or 1 was clipped to "
                            f"[{CLIP:g}, {1 - CLIP:g}] for the logit; its ER is a bound, not a measurement")
        pts = baseline.points_for(*key)
        try:
            ci = bootstrap_interval([p.x for p in pts], [p.y for p in pts], x, r["value"], n=n_boot, seed=seed)
        except ValueError as e:
            warnings.append(f"{r['model']} on {r['eval_set']}: no interval: {e}")
            ci = None
        row = _er_row(r, x, line, baseline.name, "effective_robustness", effective_robustness(x, r["value"], line),
                      *(ci or (None, None)))
        if ci is not None:  # resamples of one repeated baseline point define no line: counted in the row
            row["ci_resamples"], row["ci_dropped"] = ci.n - ci.dropped, ci.dropped
        out.append(row)
    if reference:
        out += _relative_rows(rows, reference, warnings)
    return out, lines, warnings


def _line_for(key, baseline, lines, warnings):
    """The line of (eval set, class subset), fitted once."""
    if key in lines:
        return lines[key]
    eval_set, subset = key
    where = eval_set if subset == "all" else f"{eval_set} ({subset} classes)"
    pts = baseline.points_for(eval_set, subset)
    edge = [p.model for p in pts if not (0 < p.x < 1 and 0 < p.y < 1)]
    if edge:
        warnings.append(f"{where}: {len(edge)} baseline models at accuracy 0 or 1 (e.g. {edge[0]}) were "
                        f"clipped to [{CLIP:g}, {1 - CLIP:g}] for the logit")
    try:
        lines[key] = fit_line([p.x for p in pts], [p.y for p in pts])
    except ValueError as e:
        others = len(baseline.points.get(eval_set, [])) - len(pts)
        hint = f" ({others} baseline points on other class subsets are not on this line)" if others else ""
        warnings.append(f"{where}: no baseline line from {baseline.name}: {e}{hint}")
        lines[key] = None
    return lines[key]


def _er_row(r, x, line, baseline_name, metric, value, lo=None, hi=None):
    keep = ("model", "checkpoint", "train_data", "augmentation", "seed", "eval_set", "role", "class_subset",
            "num_classes")
    return {**{k: r.get(k) for k in keep}, "metric": metric, "value": round(value, 6),
            "ci_low": None if lo is None else round(lo, 6), "ci_high": None if hi is None else round(hi, 6),
            "id_value": x, "shift_value": r["value"],
            "predicted": None if line is None else round(float(line.predict(x)), 6),
            "baseline": baseline_name, "baseline_n": None if line is None else line.n,
            "slope": None if line is None else round(line.slope, 6),
            "intercept": None if line is None else round(line.intercept, 6)}


def _relative_rows(rows, reference, warnings):
    """Shift accuracy minus the reference model's (mean over its seeds) on the same eval set and classes."""
    ref = {}
    for r in rows:
        if r.get("metric") == "top1" and r["model"] == reference:
            ref.setdefault((r["eval_set"], r.get("class_subset", "all")), []).append(r["value"])
    if not ref:
        warnings.append(f"reference model {reference!r} has no accuracy rows; no relative robustness")
        return []
    out = []
    for r, x in paired_rows(rows):
        vals = ref.get((r["eval_set"], r.get("class_subset", "all")))
        if vals and r["model"] != reference:
            row = _er_row(r, x, None, None, "relative_robustness",
                          relative_robustness(r["value"], float(np.mean(vals))))
            row["reference"] = reference
            out.append(row)
    return out
