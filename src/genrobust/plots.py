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
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    png = buf.getvalue()
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
    return png


def _clip(p):
    return min(max(p, EDGE), 1 - EDGE)


def _draw_models(ax, models, lo, hi):
    """Each model one colour and one legend entry; its name also written beside its first point, on the
    side away from the nearer edge so it is not cut off."""
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    labels = list(dict.fromkeys(label for label, _, _ in models))
    for i, label in enumerate(labels):
        c = colours(i % 10)
        pts = [(_clip(x), _clip(y)) for m, x, y in models if m == label]
        ax.scatter(*zip(*pts), s=36, color=c, edgecolor="black", lw=0.5, zorder=3, label=label)
        right = (_logit(pts[0][0]) - _logit(lo)) / (_logit(hi) - _logit(lo)) > 0.6
        ax.annotate(label, pts[0], xytext=(-6 if right else 6, 6), textcoords="offset points", fontsize=8,
                    color=c, ha="right" if right else "left", fontweight="bold")
