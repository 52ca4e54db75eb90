"""Reports from result rows only: accuracy and effective-robustness tables, accuracy-on-the-line plots and
sample grids of generated folders, written as `report.md` (figures as PNG files under `figures/`) and as a
self-contained `report.html` (every image embedded, no external resources: it opens offline)."""
import base64
import collections
import html
import io
import json
import logging
import os
import pathlib
import re
import statistics
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)
ER_METRICS = ("effective_robustness", "relative_robustness")
GRID_CLASSES = 20  # rows of a sample grid in a report; a 1000-class folder would make an unreadable image


@dataclass
class Table:
    """A table for both renderings: columns before `numeric` are text, the rest numbers (right-aligned)."""

    header: list
    body: list
    numeric: int = 3


@dataclass
class Figure:
    """A PNG in the report: written to `out / path` for report.md and embedded in report.html."""

    name: str
    path: str  # relative to the report folder, POSIX
    png: bytes
    caption: str = ""
    section: str = "Accuracy on the line"


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph), Table, Figure, or list (bullets)


# --- formatting ------------------------------------------------------------------------------------------

def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def _points(v):
    """Signed percentage points; a value that rounds to zero reads +0.0, not -0.0."""
    s = f"{100 * v:+.1f}"
    return "+0.0" if s == "-0.0" else s


def _spread(values, fmt):
    """One value as is; several (seeds) as mean ± standard deviation (n=)."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def _unique(name, taken):
    """`name`, or `name-2`, `name-3`, ... so two shifts or folders never write to one file."""
    stem, i = name, 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    taken.add(name)
    return name


# --- tables ----------------------------------------------------------------------------------------------

def _restricted_id(row):
    """An ID row scored on a shift's classes only: it is the x of that shift's ER, not a table cell."""
    cs = row.get("class_subset")
    return isinstance(cs, str) and cs not in ("all", row["eval_set"])


def _model_meta(rows):
    meta = {}
    for r in rows:
        meta.setdefault(r["model"], (r.get("train_data") or "", r.get("augmentation") or ""))
    return meta


def _grid_table(rows, cell):
    """Model x eval set table from `rows`; `cell(list of rows)` renders one cell."""
    sets = list(dict.fromkeys(r["eval_set"] for r in rows))
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["model"], r["eval_set"])].append(r)
    body = [[m, train, aug] + [cell(groups[(m, s)]) if groups.get((m, s)) else "–" for s in sets]
            for m, (train, aug) in _model_meta(rows).items()]
    return Table(["model", "training data", "augmentation"] + sets, body)


def accuracy_cells(rows):
    """Accuracy (%) as a Table, or None without accuracy rows; seeds of one model give mean ± std (n=)."""
    rows = [r for r in rows if r.get("metric") == "top1" and not _restricted_id(r)]
    if not rows:
        return None
    return _grid_table(rows, lambda g: _spread([r["value"] for r in g], _pct))


def accuracy_table(rows):
    """Markdown table: one line per model, one column per eval set, accuracy in percent.

    Rows sharing a model name (several seeds) are shown as mean ± standard deviation with their count.
    """
    table = accuracy_cells(rows)
    return "_no accuracy rows_\n" if table is None else markdown_table(table)


def _er_cell(group):
    """`+3.1 [+1.2, +4.8]` for one run; mean ± std (n=) over seeds, whose intervals are in the details."""
    if len(group) > 1:
        return _spread([r["value"] for r in group], _points)
    r = group[0]
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return _points(r["value"])
    return f"{_points(r['value'])} [{_points(r['ci_low'])}, {_points(r['ci_high'])}]"


def er_cells(er, metric="effective_robustness"):
    """Model x shift table of ER (or relative robustness) in points, or None without such rows."""
    rows = [r for r in er if r.get("metric") == metric]
    return _grid_table(rows, _er_cell) if rows else None


def er_details(er):
    """One line per run and shift: the numbers behind each ER (x, y, the line's prediction, interval)."""
    rows = [r for r in er if r.get("metric") == "effective_robustness"]
    if not rows:
        return None
    body = []
    for r in rows:
        ci = ("" if r.get("ci_low") is None or r.get("ci_high") is None
              else f" [{_points(r['ci_low'])}, {_points(r['ci_high'])}]")
        n = f" (n={r['baseline_n']})" if r.get("baseline_n") else ""
        body.append([r["model"], "" if r.get("seed") is None else str(r["seed"]), r["eval_set"],
                     f"{_short_baseline(r.get('baseline') or '')}{n}", _pct(r.get("id_value")),
                     _pct(r.get("shift_value")), _pct(r.get("predicted")), _points(r["value"]) + ci])
    return Table(["model", "seed", "shift", "baseline", "ID acc. on shift classes (%)", "shift acc. (%)",
                  "line predicts (%)", "ER (points) [95%]"], body, numeric=4)


def markdown_table(table):
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    ncol = len(table.header)
    align = "|" + "---|" * table.numeric + "---:|" * (ncol - table.numeric)
    return "\n".join([row(table.header), align] + [row(r) for r in table.body]) + "\n"


def html_table(table):
    def cells(tag, values):
        return "".join(f"<{tag}{' class=num' if i >= table.numeric else ''}>{html.escape(str(v))}</{tag}>"
                       for i, v in enumerate(values))
    body = "".join(f"<tr>{cells('td', r)}</tr>\n" for r in table.body)
    return f"<table>\n<thead><tr>{cells('th', table.header)}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


# --- input checks ----------------------------------------------------------------------------------------

def check_inputs(rows):
    """(rows fit to report, warnings): evaluate.check_rows, plus problems that would mislead a table."""
    from .evaluate import check_rows

    rows, warnings = check_rows(rows)
    seen = collections.Counter((r.get("checkpoint"), r.get("seed"), r["model"], r["eval_set"],
                                str(r.get("class_subset")), r["metric"]) for r in rows if r.get("checkpoint"))
    for (ck, seed, model, eval_set, _, metric), n in seen.items():
        if n > 1:
            warnings.append(f"{model} ({ck}, seed {seed}) has {n} {metric} rows on {eval_set}; they are "
                            "counted as separate runs (rescore with --force to replace old rows)")
    metas = collections.defaultdict(set)
    for r in rows:
        metas[r["model"]].add((r.get("train_data") or "", r.get("augmentation") or ""))
    for model, m in metas.items():
        if len(m) > 1:
            warnings.append(f"model name {model!r} covers runs with different training data or augmentation "
                            f"{sorted(m)}; the table shows the first: give the runs distinct names")
    other = sorted({r["metric"] for r in rows} - {"top1", *ER_METRICS})
    if other:
        warnings.append(f"rows with metrics {other} are not shown")
    return rows, warnings


def _robustness(rows, baseline, reference):
    """(ER rows, lines, Baseline or None, warnings): recomputed against `baseline`, else read from rows."""
    from .robustness import er_rows, load_baseline

    acc = [r for r in rows if r.get("metric") == "top1"]
    stored = [r for r in rows if r.get("metric") in ER_METRICS]
    has_shift = any(r.get("role") == "shift" for r in acc)
    if baseline is None:
        warnings = []
        if has_shift or stored:
            warnings.append("no baseline given (--baseline testbed|PATH): no accuracy-on-the-line plots"
                            + ("; the ER rows of the results files are shown as they are" if stored
                               else " and no effective robustness"))
        if reference and not any(r.get("metric") == "relative_robustness" for r in stored):
            warnings.append(f"relative robustness vs {reference!r} is computed with the ER: give a baseline")
        return stored, {}, None, warnings
    base = baseline if hasattr(baseline, "points") else load_baseline(str(baseline))
    er, lines, warnings = er_rows(acc, base, reference=reference)
    short = _short_baseline(base.name)
    warnings = [w.replace(base.name, short) for w in warnings]  # no absolute path of this machine in a report
    return er, lines, base, warnings


# --- figures ---------------------------------------------------------------------------------------------

def line_figures(er, lines, baseline, taken):
    """One accuracy-on-the-line figure per shift with a fitted line (the same function for every shift)."""
    from .plots import accuracy_on_the_line

    from .robustness import _subset

    figs = []
    several = {}
    for shift, _ in lines:
        several[shift] = several.get(shift, 0) + 1
    for (shift, subset), line in lines.items():
        if line is None:
            continue  # er_rows said why (too few baseline points)
        models = [(r["model"], r["id_value"], r["shift_value"]) for r in er
                  if r.get("metric") == "effective_robustness" and r["eval_set"] == shift and _subset(r) == subset]
        title = shift if several[shift] == 1 else f"{shift} ({subset} classes)"
        png = accuracy_on_the_line(title, baseline.points_for(shift, subset), line, models,
                                   baseline_name=_short_baseline(baseline.name))
        name = _unique(f"line-{_slug(title)}", taken)
        figs.append(Figure(title, f"figures/{name}.png", png,
                           f"baseline {_short_baseline(baseline.name)} ({line.n} models, grey), "
                           f"fit logit(y) = {line.slope:.2f} logit(x) {line.intercept:+.2f}; dashed: y = x"))
    return figs


def _short_baseline(name):
    """A baseline results file is named by its folder and file, never by an absolute path."""
    p = pathlib.Path(name)
    return name if not p.is_absolute() else "/".join(p.parts[-2:])


def _grid_files(folder, per_class, max_classes):
    """(classes, {class: first `per_class` files}) in metadata order, else sorted file names."""
    from .data.folder import IMAGE_SUFFIXES, folder_classes, read_jsonl

    classes = folder_classes(folder)
    meta = folder / "metadata.jsonl"
    if meta.exists():
        pairs = [(r.get("class_name") or pathlib.PurePosixPath(r["file_name"]).parent.name, r["file_name"])
                 for r in read_jsonl(meta)]
    else:
        pairs = [(d.name, f"{d.name}/{f.name}") for d in sorted(folder.iterdir())
                 if d.is_dir() and not d.name.startswith((".", "shards"))
                 for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    picks = {c: [] for c in classes[:max_classes]}
    for c, f in pairs:
        if c in picks and len(picks[c]) < per_class:
            picks[c].append(folder / f)
    return classes, picks


def grid_png(folder, per_class=10, scale=2, max_classes=None, max_cell=96):
    """PNG bytes of a grid: one row per class, its first `per_class` images, on grey with 2 px padding.

    Cells are the first image's size times `scale`, shrunk to at most `max_cell` px (a 512 px generated image
    would make a page-wide grid); only the shown images are read, so a large folder costs no more.
    """
    folder = pathlib.Path(folder)
    return _draw_grid(_grid_files(folder, per_class, max_classes)[1], scale, max_cell, folder.name)


def _draw_grid(picks, scale, max_cell, name):
    from PIL import Image

    files = [f for fs in picks.values() for f in fs]
    if not files:
        raise ValueError(f"{name} holds no images in class folders")
    with Image.open(files[0]) as im:
        w, h = im.width * scale, im.height * scale
    shrink = min(1.0, max_cell / max(w, h))
    w, h = max(1, round(w * shrink)), max(1, round(h * shrink))
    pad, ncol = 2, max(len(fs) for fs in picks.values())
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(picks) * (h + pad) + pad), (128, 128, 128))
    for i, fs in enumerate(picks.values()):
        for j, f in enumerate(fs):
            with Image.open(f) as im:
                cell = im.convert("RGB").resize((w, h), Image.NEAREST if shrink == 1 else Image.LANCZOS)
            grid.paste(cell, (pad + j * (w + pad), pad + i * (h + pad)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def sample_grid(folder, out, per_class=10, scale=2, max_classes=None):
    """A PNG grid of the first `per_class` images of each class of a generated folder (one row a class)."""
    from .data.folder import atomic_write_bytes

    out = pathlib.Path(out)
    atomic_write_bytes(out, grid_png(folder, per_class, scale, max_classes))
    return out


def _card_caption(folder, shown, per_class):
    """What made a folder, from its dataset_card.json (None when the card is missing or unreadable)."""
    path = folder / "dataset_card.json"
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    gen, info = card.get("generator") or {}, card.get("generation") or {}
    gen_name = gen.get("name") if isinstance(gen, dict) else gen
    parts = [f"strategy {card.get('strategy', '?')}", f"generator {gen_name or info.get('generator', '?')}"]
    parts += [f"{k} {info[k]}" for k in ("revision", "steps", "guidance_scale") if info.get(k) is not None]
    if card.get("seed") is not None:
        parts.append(f"seed {card['seed']}")
    n = card.get("num_images")
    total = len(card.get("classes") or []) or shown
    return (", ".join(parts) + (f"; {n} images" if n is not None else "")
            + f"; rows: {shown} of {total} classes, first {per_class} images each")


def generated_figures(folders, per_class, taken):
    """(figures, warnings): a sample grid per generated folder, captioned from its dataset card."""
    figs, warnings = [], []
    for folder in folders:
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            warnings.append(f"generated folder {folder.name} does not exist; no sample grid")
            continue
        try:
            _, picks = _grid_files(folder, per_class, GRID_CLASSES)
            png = _draw_grid(picks, 2, 96, folder.name)
        except (OSError, ValueError) as e:  # an unreadable image or manifest costs the grid, not the report
            warnings.append(f"generated folder {folder.name}: no sample grid ({str(e).replace(str(folder), '')})")
            continue
        shown = len(picks)
        caption = _card_caption(folder, shown, per_class)
        if caption is None:
            warnings.append(f"generated folder {folder.name} has no readable dataset_card.json: its strategy and "
                            "generator are unknown")
            caption = f"strategy and generator unknown; first {per_class} images of {shown} classes"
        name = _unique(f"samples-{_slug(folder.name)}", taken)
        figs.append(Figure(folder.name, f"figures/{name}.png", png, caption))
    return figs, warnings


def generated_from_checkpoints(rows, search=()):
    """Generated folders that the rows' checkpoints were trained on (their data.json), where they exist.

    Relative paths are tried as given, then under each folder of `search` (e.g. the results files' folders).
    """
    found, seen = [], set()
    for ck in dict.fromkeys(r.get("checkpoint") for r in rows if r.get("checkpoint")):
        ck_dir = _first_dir(ck, search)
        if ck_dir is None or not (ck_dir / "data.json").is_file():
            continue
        try:
            gens = json.loads((ck_dir / "data.json").read_text()).get("generated") or []
        except ValueError:
            logger.warning("%s/data.json is not valid JSON; its generated folders are not shown", ck_dir)
            continue
        for g in gens:
            d = _first_dir(g, [*search, ck_dir])
            if d is None:
                logger.warning("%s was trained on %s, which is not here; no sample grid", ck_dir.name, g)
            elif d.resolve() not in seen:
                seen.add(d.resolve())
                found.append(d)
    return found


def _first_dir(path, search):
    for cand in [pathlib.Path(path)] + [pathlib.Path(s) / path for s in search]:
        if cand.is_dir():
            return cand
    return None


# --- rendering -------------------------------------------------------------------------------------------

def _sections(rows, er, warnings, figures, grids, notes, baseline, reference):
    """The report's content once; markdown and HTML render the same sections."""
    secs = []
    if notes:
        secs.append(Section("Notes", [list(notes)]))
    secs.append(Section("Warnings", [list(warnings) if warnings else "No problems found in the inputs."]))
    acc = accuracy_cells(rows)
    secs.append(Section("Accuracy (%)", [acc if acc else "No accuracy rows."]))
    if any(_restricted_id(r) for r in rows if r.get("metric") == "top1"):
        secs[-1].blocks.append("In-distribution accuracy on a shift's classes only is in the effective-"
                               "robustness details.")
    er_tab = er_cells(er)
    if not er_tab and not any(r.get("role") == "shift" for r in rows):
        return secs + _figure_sections(figures, grids)  # nothing shifted: no robustness to speak of
    intro = ("Shift accuracy above the baseline line's prediction at the model's in-distribution accuracy, in "
             f"points, with 95% bootstrap intervals over the baseline models{_against(baseline)}. Several seeds "
             "of a model: mean ± standard deviation (n=); their intervals are in the details.")
    secs.append(Section("Effective robustness (points)", [intro, er_tab] if er_tab else
                        ["No effective-robustness rows (see Warnings)."]))
    stored = sum(r["metric"] in ER_METRICS for r in rows)
    if stored and baseline is not None:
        secs[-1].blocks.append(f"Recomputed against the baseline given; robustness rows in the results files "
                               f"({stored}) are not shown.")
    rel = er_cells(er, "relative_robustness")
    if rel:
        refs = sorted({str(r.get("reference")) for r in er if r.get("metric") == "relative_robustness"})
        secs.append(Section(f"Relative robustness vs {', '.join(refs)} (points)",
                            ["Shift accuracy minus the reference model's (mean over its seeds).", rel]))
    elif reference and er_tab:
        secs[-1].blocks.append(f"No relative robustness vs {reference} (see Warnings).")
    details = er_details(er)
    if details:
        secs.append(Section("Effective robustness details", [details]))
    return secs + _figure_sections(figures, grids)


SECTION_INTROS = {"Accuracy on the line": "Both axes logit-scaled; each point a model."}


def _figure_sections(figures, grids):
    secs = []
    for title in dict.fromkeys(f.section for f in figures):
        intro = [SECTION_INTROS[title]] if title in SECTION_INTROS else []
        secs.append(Section(title, intro + [f for f in figures if f.section == title]))
    if grids:
        secs.append(Section("Generated samples (one row per class)", grids))
    return secs


def _against(baseline):
    return "" if baseline is None else f" (baseline: {_short_baseline(baseline.name)})"


def render_markdown(title, sections):
    parts = [f"# {title}\n"]
    for s in sections:
        parts.append(f"## {s.title}\n")
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(markdown_table(b))
            elif isinstance(b, Figure):
                parts.append(f"**{b.name}**" + (f": {b.caption}" if b.caption else "")
                             + f"\n\n![{b.name}]({b.path})\n")
            elif isinstance(b, list):
                parts.append("".join(f"- {item}\n" for item in b))
            else:
                parts.append(f"{b}\n")
    return "\n".join(parts)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; line-height: 1.5; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.7rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #eaeef2; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top;
         white-space: nowrap; }
th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fafbfc; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.warnings { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: .6rem 1rem .6rem 2rem; }
figure { margin: 1rem 0 1.8rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figure img.grid { image-rendering: pixelated; }
figcaption { font-size: .85rem; color: #57606a; margin-top: .3rem; }
"""


def _html_block(b, section):
    if isinstance(b, Table):
        return html_table(b)
    if isinstance(b, Figure):
        src = "data:image/png;base64," + base64.b64encode(b.png).decode("ascii")
        cls = ' class="grid"' if b.path.startswith(("figures/samples-", "grids/")) else ""
        cap = html.escape(b.name) + (": " + html.escape(b.caption) if b.caption else "")
        return f'<figure><img{cls} src="{src}" alt="{html.escape(b.name)}"><figcaption>{cap}</figcaption></figure>\n'
    if isinstance(b, list):
        cls = ' class="warnings"' if section == "Warnings" and b else ""
        return f"<ul{cls}>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in b) + "</ul>\n"
    return f"<p>{html.escape(str(b))}</p>\n"


def render_html(title, sections):
    """A single self-contained page: inline CSS, images as data URIs, no scripts, no external links."""
    body = [f"<h1>{html.escape(title)}</h1>\n"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>\n")
        body += [_html_block(b, s.title) for b in s.blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "".join(body) + "</main>\n</body>\n</html>\n")


def _given_grids(grids, out):
    """Figures from (name, path) grids already written (the quickstart's), linked relative to `out`."""
    return [Figure(name, pathlib.Path(os.path.relpath(p, out)).as_posix(), pathlib.Path(p).read_bytes())
            for name, p in grids]


def write_report(rows, out, baseline=None, generated=(), reference=None, title="genrobust report", notes=(),
                 grids=(), per_class=8, figure_hook=None):
    """Write `report.md`, `report.html` and `figures/*.png` into the folder `out`; return the paths written.

    Args:
        rows: result rows (accuracy rows; ER rows too, shown as they are when no baseline is given).
        baseline: `"testbed"`, a baseline results.jsonl, or a robustness.Baseline; ER is recomputed with it.
        generated: generated folders, one sample grid each (first `per_class` images of each class).
        reference: model name for relative robustness.
        grids: (name, path) sample grids already written (embedded, not redrawn).
        figure_hook: `hook(rows, er_rows, taken)` -> (figures, warnings), drawn before the accuracy-on-the-line
            figures (a study's curves and bars); `taken` keeps figure file names unique.
    """
    from .data.folder import atomic_write_bytes, atomic_write_text

    out = pathlib.Path(out)
    rows, warnings = check_inputs(rows)
    er, lines, base, w = _robustness(rows, baseline, reference)
    warnings += w
    taken = set()
    figures = []
    if figure_hook is not None:
        extra, w = figure_hook(rows, er, taken)
        figures, warnings = figures + extra, warnings + w
    figures += line_figures(er, lines, base, taken) if base is not None else []
    samples, w = generated_figures(generated, per_class, taken)
    warnings += w
    sections = _sections(rows, er, list(dict.fromkeys(warnings)), figures, _given_grids(grids, out) + samples,
                         notes, base, reference)
    written = []
    for f in figures + samples:
        atomic_write_bytes(out / f.path, f.png)
        written.append(out / f.path)
    atomic_write_text(out / "report.md", render_markdown(title, sections))
    atomic_write_text(out / "report.html", render_html(title, sections))
    return [out / "report.md", out / "report.html"] + written
