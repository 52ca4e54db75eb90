"""A study's own figures, from result rows only: accuracy (and ER) against the amount of generated data per eval
set, and bars comparing strategies, augmentations and controls. `arms` (from the study's plan) says what each
model name varies: its group (real, augmentation, strategy, retrieval, step-matched), strategy and amount."""
import collections
import statistics

SECTION = "Study figures"


def _stats(values):
    """(mean, std) in percent; one value has std 0."""
    values = [100 * v for v in values]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _by_arm(rows, metric):
    from ..report import _restricted_id
    groups = collections.defaultdict(list)
    for r in rows:
        if r.get("metric") == metric and not (metric == "top1" and _restricted_id(r)):
            groups[(r["model"], r["eval_set"])].append(r["value"])
    return groups


def _model_of(arm, meta):
    return meta.get("model") if "@" in arm else None


def curve_data(values, arms, eval_set, model=None):
    """({series label: [(k, mean, std)]}, {level label: (mean, std)}) of one eval set (and model)."""
    series, levels = collections.defaultdict(list), {}
    mine = {a: m for a, m in arms.items() if _model_of(a, m) == model}
    start = next(((a, m) for a, m in mine.items() if m["group"] == "real"), None)
    for arm, meta in mine.items():
        v = values.get((arm, eval_set))
        if not v:
            continue
        if meta["group"] in ("strategy", "retrieval"):
            series[meta["strategy"]].append((meta["amount"], *_stats(v)))
        elif meta["group"] in ("augmentation", "step-matched"):
            levels[arm.split("@")[0]] = _stats(v)
    if start is not None and values.get((start[0], eval_set)):
        for label in series:  # every curve starts at k = 0: real data alone
            series[label].append((0, *_stats(values[(start[0], eval_set)])))
    return dict(series), levels


def bar_amount(arms, wanted=None):
    """The amount the bars compare: `wanted`, else the largest k that every strategy was run at."""
    per = collections.defaultdict(set)
    for m in arms.values():
        if m["group"] == "strategy" and m["amount"] != "generated-only":
            per[m["strategy"]].add(m["amount"])
    common = set.intersection(*per.values()) if per else set()
    if wanted is not None:
        return wanted
    return max(common) if common else None


def bar_data(values, arms, eval_sets, k, model=None):
    """{arm label: [(mean, std) or None per eval set]}: real-only arms, every strategy and retrieval at k."""
    bars = {}
    for arm, meta in arms.items():
        if _model_of(arm, meta) != model:
            continue
        keep = meta["group"] in ("real", "augmentation", "step-matched") or (
            meta["group"] in ("strategy", "retrieval") and meta["amount"] == k)
        if keep:
            cells = [_stats(values[(arm, s)]) if values.get((arm, s)) else None for s in eval_sets]
            if any(cells):
                bars[arm.split("@")[0]] = cells
    return bars


def study_figures(rows, er, taken, arms, bar_amount_wanted=None):
    """Figures for `report.write_report(figure_hook=...)`: (figures, warnings)."""
    from ..plots import amount_curves, grouped_bars
    from ..report import Figure, _slug, _unique

    acc, ers = _by_arm(rows, "top1"), _by_arm(er, "effective_robustness")
    eval_sets = list(dict.fromkeys(s for _, s in acc))
    shifts = list(dict.fromkeys(s for _, s in ers))
    models = list(dict.fromkeys(_model_of(a, m) for a, m in arms.items()))
    figs, warnings = [], []
    k = bar_amount(arms, bar_amount_wanted)
    for model in models:
        suffix = f" ({model})" if model else ""
        for what, values, sets, label in (("accuracy", acc, eval_sets, "accuracy (%)"),
                                          ("ER", ers, shifts, "effective robustness (points)")):
            for s in sets:
                series, levels = curve_data(values, arms, s, model)
                if not series:
                    continue
                name = _unique(f"amount-{_slug(what)}-{_slug(s)}{'-' + _slug(model) if model else ''}", taken)
                figs.append(Figure(f"{what} vs amount: {s}{suffix}", f"figures/{name}.png",
                                   amount_curves(s + suffix, series, levels, label),
                                   f"{what} of each strategy against k (mean ± std over seeds; k = 0 is the "
                                   "real-only arm); dashed: the retrieval control; horizontal: real-only "
                                   "arms", SECTION))
            if k is None or not sets:
                continue
            bars = bar_data(values, arms, sets, k, model)
            if bars:
                means = [m for v in bars.values() for c in v if c for m in (c[0] - c[1],)]
                bottom = max(0.0, min(means) - 5) if what == "accuracy" and means else None
                name = _unique(f"bars-{_slug(what)}{'-' + _slug(model) if model else ''}", taken)
                figs.append(Figure(f"{what} by arm at k = {k:g}{suffix}", f"figures/{name}.png",
                                   grouped_bars(f"{what} by arm (strategies at k = {k:g}){suffix}", sets, bars,
                                                label, bottom=bottom),
                                   f"mean ± std over seeds; strategies and retrieval at k = {k:g}", SECTION))
    if k is None and any(m["group"] == "strategy" for m in arms.values()):
        warnings.append("no amount is shared by every strategy: no strategy comparison bars (set bar_amount)")
    return figs, warnings
