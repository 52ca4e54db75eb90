"""Reports from result rows only: an accuracy table (model x eval set) and sample grids."""
import collections
import pathlib
import statistics

from .data.folder import atomic_write_text


def accuracy_table(rows):
    """Markdown table: one line per model, one column per eval set, accuracy in percent.

    Rows sharing a model name (several seeds) are shown as mean ± standard deviation with their count.
    """
    rows = [r for r in rows if r.get("metric") == "top1"]
    if not rows:
        return "_no accuracy rows_\n"
    sets = list(dict.fromkeys(r["eval_set"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    vals = collections.defaultdict(list)
    meta = {}
    for r in rows:
        vals[(r["model"], r["eval_set"])].append(100 * r["value"])
        meta.setdefault(r["model"], (r.get("train_data") or "", r.get("augmentation") or ""))
    lines = ["| model | training data | augmentation | " + " | ".join(sets) + " |",
             "|---|---|---|" + "---:|" * len(sets)]
    for m in models:
        cells = []
        for s in sets:
            v = vals.get((m, s), [])
            if not v:
                cells.append("–")
            elif len(v) == 1:
                cells.append(f"{v[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} (n={len(v)})")
        lines.append(f"| {m} | {meta[m][0]} | {meta[m][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_grid(folder, out, per_class=10, scale=2):
    """A PNG grid of the first `per_class` images of each class of a generated folder (one row a class)."""
    import torch
    import torchvision.utils as vutils

    from .data.folder import load_imagefolder

    data = load_imagefolder(folder)
    picks = []
    for c in range(len(data.classes)):
        picks.extend(torch.nonzero(data.labels == c).flatten()[:per_class].tolist())
    imgs = data.images[picks].float() / 255
    imgs = torch.nn.functional.interpolate(imgs, scale_factor=scale, mode="nearest")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image(imgs, out, nrow=per_class, padding=2, pad_value=0.5)
    return out


def write_report(rows, out, title="genrobust report", notes=(), grids=()):
    """Write `report.md` into the folder `out` from result rows (and optional sample grid PNGs)."""
    out = pathlib.Path(out)
    parts = [f"# {title}\n", "## Accuracy (%)\n", accuracy_table(rows)]
    if notes:
        parts += ["\n## Notes\n", "".join(f"- {n}\n" for n in notes)]
    if grids:
        parts.append("\n## Generated samples (one row per class)\n")
        parts += [f"\n**{name}**\n\n![{name}]({pathlib.Path(p).relative_to(out).as_posix()})\n"
                  for name, p in grids]
    atomic_write_text(out / "report.md", "\n".join(parts))
    return out / "report.md"
