"""Report figures. One accuracy-on-the-line function serves every shift; matplotlib is imported inside it."""
import io
import math
import pathlib

# Accuracies of exactly 0 or 1 sit at infinity on a logit axis; points are clipped to this margin.
EDGE = 1e-3
TICKS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def _logit(p):
    p = min(max(p, EDGE), 1 - EDGE)
    return math.log(p / (1 - p))


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


def _limits(values, pad=0.35):
    """Axis range around `values` in logit space, padded, as accuracies."""
    lo, hi = min(map(_logit, values)), max(map(_logit, values))
    return _sigmoid(lo - pad), _sigmoid(hi + pad)


def _percent(t):
    return f"{100 * t:g}%"


def _logit_axis(axis, lo, hi):
    """Logit scale with percent labels at round accuracies (matplotlib's default labels read 1-10^-2)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks, span = [], _logit(hi) - _logit(lo)
    for t in (t for t in TICKS if lo <= t <= hi):
        if not ticks or _logit(t) - _logit(ticks[-1]) >= span / 9:  # labels that would touch are skipped
            ticks.append(t)
    if len(ticks) < 2:  # a narrow range between two round values: label its ends instead
        ticks = [lo, hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda t, _: _percent(t)))
    axis.set_minor_locator(NullLocator())


def accuracy_on_the_line(shift, baseline_points, line, models, out=None, baseline_name="baseline"):
    """Shift accuracy against in-distribution accuracy on logit axes; returns PNG bytes.

    Args:
        shift: eval set name, for the title and the y label.
        baseline_points: objects with `.x` and `.y` (fractions), drawn as small grey points.
        line: the fitted baseline (`.predict(x)`, `.n`), drawn across the plotted range; None for none.
        models: (label, x, y) triples of evaluated models; repeated labels (seeds) share one colour.
        out: also write the PNG there.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(models)
    xs = [p.x for p in baseline_points] + [x for _, x, _ in models]
    ys = [p.y for p in baseline_points] + [y for _, _, y in models]
    if not xs:
        raise ValueError(f"{shift}: nothing to plot (no baseline points and no models)")
    # One square range for both axes keeps y = x on the diagonal and the two accuracies comparable.
    lo, hi = _limits(xs + ys)
    fig = Figure(figsize=(5.6, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("logit")
    ax.set_yscale("logit")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _logit_axis(ax.xaxis, lo, hi)
    _logit_axis(ax.yaxis, lo, hi)
    grid = [_sigmoid(_logit(lo) + (_logit(hi) - _logit(lo)) * i / 100) for i in range(101)]
    ax.plot(grid, grid, "--", color="0.55", lw=1, label="y = x")
    if line is not None:
        ax.plot(grid, [float(line.predict(g)) for g in grid], "-", color="0.25", lw=1.5,
                label=f"{baseline_name} fit (n={line.n})")
    if baseline_points:
        ax.scatter([_clip(p.x) for p in baseline_points], [_clip(p.y) for p in baseline_points], s=12,
                   color="0.6", zorder=2, label=f"{baseline_name} models")
    _draw_models(ax, models, lo, hi)
    ax.set_xlabel("in-distribution accuracy (shift's classes)")
    ax.set_ylabel(f"accuracy on {shift}")
    ax.set_title(f"Accuracy on the line: {shift}", fontsize=11)
    ax.grid(True, color="0.92", lw=0.8)
    n_labels = len({label for label, _, _ in models})
    if n_labels > MAX_ANNOTATED:  # a long legend goes beside the axes, not over the points
        fig.set_size_inches(5.6 + 2.2 * (1 + n_labels // 30), 4.8)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, ncol=1 + n_labels // 30)
    else:
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    png = _png(fig)
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
    return png


def _clip(p):
    return min(max(p, EDGE), 1 - EDGE)


MAX_ANNOTATED = 8  # more model names than this beside their points overlap: the legend alone names them


def _draw_models(ax, models, lo, hi):
    """Each model one colour and one legend entry; with few models its name is also written beside its first
    point, on the side away from the nearer edge so it is not cut off."""
    from matplotlib import colormaps

    labels = list(dict.fromkeys(label for label, _, _ in models))
    colours = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    markers = "osD^v<>"
    for i, label in enumerate(labels):
        c = colours(i % colours.N)
        pts = [(_clip(x), _clip(y)) for m, x, y in models if m == label]
        ax.scatter(*zip(*pts), s=36, color=c, edgecolor="black", lw=0.5, zorder=3, label=label,
                   marker=markers[(i // colours.N) % len(markers)])
        if len(labels) > MAX_ANNOTATED:
            continue
        right = (_logit(pts[0][0]) - _logit(lo)) / (_logit(hi) - _logit(lo)) > 0.6
        ax.annotate(label, pts[0], xytext=(-6 if right else 6, 6), textcoords="offset points", fontsize=8,
                    color=c, ha="right" if right else "left", fontweight="bold")


def _png(fig):
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    return buf.getvalue()


def _new_figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def amount_curves(eval_set, series, levels, ylabel="accuracy (%)"):
    """Accuracy against the amount of added data, one line per strategy; returns PNG bytes.

    Args:
        series: {label: [(k, mean, std), ...]} with k a number or "generated-only" (drawn apart, unjoined,
            at the right); std 0 draws no bar.
        levels: {label: (mean, std)} drawn as horizontal reference lines (real-only augmentations, the
            step-matched control).
    Amounts sit at even spacing (0, 0.5, 1, 2, 4 read better evenly than on a linear axis).
    """
    from matplotlib import colormaps

    numeric = sorted({k for pts in series.values() for k, _, _ in pts if k != "generated-only"})
    only = any(k == "generated-only" for pts in series.values() for k, _, _ in pts)
    pos = {k: i for i, k in enumerate(numeric)}
    if only:
        pos["generated-only"] = len(numeric) + 0.6
    fig, ax = _new_figure((6.4, 4.4))
    colours = colormaps["tab10"]
    for i, (label, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: pos[p[0]])
        joined = [p for p in pts if p[0] != "generated-only"]
        style = "--" if label == "retrieval" else "-"
        c = colours(i % 10)
        if joined:
            ax.errorbar([pos[k] for k, _, _ in joined], [m for _, m, _ in joined], [s for _, _, s in joined],
                        fmt=style + "o", color=c, ms=4, lw=1.5, capsize=3, label=label)
        for k, m, s in pts:
            if k == "generated-only":
                ax.errorbar([pos[k]], [m], [s], fmt="s", color=c, ms=5, capsize=3,
                            label=None if joined else label)
    for j, (label, (m, s)) in enumerate(levels.items()):
        ax.axhline(m, color="0.35", lw=1, ls=(0, (1 + j, 2)), label=f"{label} (real only)")
    ax.set_xticks(list(pos.values()), [("gen.\nonly" if k == "generated-only" else f"{k:g}") for k in pos])
    ax.set_xlabel("k: generated images added, in multiples of |real|")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split(' (')[0].capitalize()} vs amount of generated data: {eval_set}", fontsize=11)
    ax.grid(True, color="0.92", lw=0.8)
    ax.legend(fontsize=7, frameon=False, loc="best")
    return _png(fig)


def grouped_bars(title, groups, bars, ylabel, bottom=None):
    """Bars per group (eval set), one bar per arm with its std as an error bar; returns PNG bytes.

    Args:
        groups: group names (x positions).
        bars: {arm label: [(mean, std) or None per group]}.
        bottom: the y axis's lower end (accuracies differ by points near 100%: a bar from 0 hides that).
    """
    from matplotlib import colormaps

    fig, ax = _new_figure((max(6.4, 1.2 + 0.28 * len(bars) * len(groups)), 4.4))
    colours = colormaps["tab20"]
    width = 0.8 / max(len(bars), 1)
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        vals = [v for v in values if v is not None]
        ax.bar(xs, [m for m, _ in vals], width * 0.92, yerr=[s for _, s in vals], color=colours(i % 20),
               capsize=2, label=label, error_kw={"lw": 0.8})
    ax.axhline(0, color="0.3", lw=0.8)
    if bottom is not None:
        ax.set_ylim(bottom=bottom)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", color="0.92", lw=0.8)
    ax.legend(fontsize=7, frameon=False, ncol=2 if len(bars) > 8 else 1, loc="upper left", bbox_to_anchor=(1, 1))
    return _png(fig)
