import base64
import io
import json
import re

import pytest
from PIL import Image

from conftest import write_imagefolder
from genrobust.cli import main
from genrobust.report import (accuracy_table, er_cells, generated_from_checkpoints, markdown_table, sample_grid,
                              write_report)

ROWS = [
    {"model": "real", "train_data": "digits-mnist/train", "augmentation": "standard", "eval_set": "id",
     "metric": "top1", "value": 0.9},
    {"model": "real", "train_data": "digits-mnist/train", "augmentation": "standard", "eval_set": "shift",
     "metric": "top1", "value": 0.5},
    {"model": "real", "train_data": "digits-mnist/train", "augmentation": "standard", "eval_set": "id",
     "metric": "top1", "value": 0.95},
    {"model": "real+gen", "train_data": "digits-mnist/train + 1x gen", "augmentation": "none",
     "eval_set": "id", "metric": "top1", "value": 0.875},
    {"model": "real+gen", "eval_set": "shift", "metric": "er", "value": 0.3},  # not an accuracy row
]

TABLE = (
    "| model | training data | augmentation | id | shift |\n"
    "|---|---|---|---:|---:|\n"
    "| real | digits-mnist/train | standard | 92.5 ± 3.5 (n=2) | 50.0 |\n"
    "| real+gen | digits-mnist/train + 1x gen | none | 87.5 | – |\n"
)


def test_accuracy_table_exact():
    assert accuracy_table(ROWS) == TABLE


def test_accuracy_table_three_seeds():
    rows = [{"model": "m", "eval_set": "s", "metric": "top1", "value": v} for v in (0.1, 0.2, 0.3)]
    assert accuracy_table(rows).splitlines()[-1] == "| m |  |  | 20.0 ± 10.0 (n=3) |"


def test_accuracy_table_without_rows():
    assert accuracy_table([]) == "_no accuracy rows_\n"
    assert accuracy_table(ROWS[-1:]) == "_no accuracy rows_\n"


def test_accuracy_table_keeps_id_on_a_shifts_classes_apart():
    # The ID set scored on a shift's classes is that shift's x, not a second seed of the ID column.
    rows = [{"model": "m", "eval_set": "id", "metric": "top1", "value": 0.9, "class_subset": "all"},
            {"model": "m", "eval_set": "id", "metric": "top1", "value": 0.5, "class_subset": "r"},
            {"model": "m", "eval_set": "r", "metric": "top1", "value": 0.4, "class_subset": "r"}]
    assert accuracy_table(rows).splitlines()[-1] == "| m |  |  | 90.0 | 40.0 |"


def test_er_table_formatting():
    er = [{"model": "a", "train_data": "t", "augmentation": "x", "eval_set": "s", "metric": "effective_robustness",
           "value": 0.031, "ci_low": 0.012, "ci_high": 0.048},
          {"model": "a", "eval_set": "u", "metric": "effective_robustness", "value": -0.0004, "ci_low": -0.02,
           "ci_high": 0.01}]
    er += [{"model": "b", "train_data": "t", "augmentation": "x", "eval_set": "s", "seed": s,
            "metric": "effective_robustness", "value": v, "ci_low": v - 0.01, "ci_high": v + 0.01}
           for s, v in enumerate((0.02, 0.03, 0.04))]
    er.append({"model": "b", "eval_set": "s", "metric": "relative_robustness", "value": 0.05, "ci_low": None,
               "ci_high": None, "reference": "a"})
    assert markdown_table(er_cells(er)) == (
        "| model | training data | augmentation | s | u |\n"
        "|---|---|---|---:|---:|\n"
        "| a | t | x | +3.1 [+1.2, +4.8] | +0.0 [-2.0, +1.0] |\n"
        "| b | t | x | +3.0 ± 1.0 (n=3) | – |\n")
    assert markdown_table(er_cells(er, "relative_robustness")).splitlines()[-1] == "| b |  |  | +5.0 |"
    assert er_cells([], "relative_robustness") is None


def test_sample_grid_layout(tiny_images, tmp_path):
    folder = tiny_images("gen", classes=("0", "1", "2"), per_class=3)
    path = sample_grid(folder, tmp_path / "grids" / "g.png", per_class=2, scale=2)
    with Image.open(path) as im:
        # 3 class rows x 2 images of 56 px (28 x 2), 2 px padding around each
        assert im.size == (2 * (56 + 2) + 2, 3 * (56 + 2) + 2)


def test_write_report_with_given_grids(tiny_images, tmp_path):
    out = tmp_path / "report"
    grid = sample_grid(tiny_images("gen"), out / "grids" / "label.png", per_class=3)
    paths = write_report(ROWS, out, title="T", notes=["note one", "note two"], grids=[("label", grid)])
    assert paths == [out / "report.md", out / "report.html"]
    text = paths[0].read_text()
    assert text.startswith("# T\n")
    assert "## Accuracy (%)\n" in text and TABLE in text
    assert "- note one\n- note two\n" in text
    assert "![label](grids/label.png)" in text
    assert text.index("## Notes") < text.index("## Warnings") < text.index("## Accuracy") < text.index(
        "## Generated samples")
    assert "rows with metrics ['er'] are not shown" in text
    assert len(_images(paths[1].read_text())) == 1


def test_write_report_minimal(tmp_path):
    paths = write_report([], tmp_path)
    assert paths[0].read_text() == ("# genrobust report\n\n## Warnings\n\nNo problems found in the inputs.\n\n"
                                    "## Accuracy (%)\n\nNo accuracy rows.\n")
    assert "<img" not in paths[1].read_text()


# --- a full report: baseline, seeds, generated folders ---------------------------------------------------

def acc(model, eval_set, value, role="shift", seed=0, subset="all", **extra):
    return {"model": model, "checkpoint": f"ck/{model}-{seed}", "train_data": f"data of {model}",
            "augmentation": "standard", "seed": seed, "eval_set": eval_set, "role": role, "metric": "top1",
            "value": value, "n": 100, "class_subset": subset, "num_classes": 10, "id_set": "id", **extra}


def baseline_rows():
    """Baseline models exactly on y = x for `uci` and `fonts` (so ER is y - x), and only two on `few`."""
    rows = []
    for i, x in enumerate((0.6, 0.7, 0.8, 0.9)):
        rows += [acc(f"b{i}", "id", x, role="id"), acc(f"b{i}", "uci", x), acc(f"b{i}", "fonts", x)]
        if i < 2:
            rows.append(acc(f"b{i}", "few", x / 2))
    return rows


def model_rows():
    rows = [acc("real", "id", 0.9, role="id", seed=s) for s in range(3)]
    rows += [acc("real", "uci", y, seed=s) for s, y in enumerate((0.92, 0.93, 0.94))]
    rows += [acc("real+gen", "id", 0.9, role="id"), acc("real+gen", "uci", 0.95), acc("real+gen", "fonts", 0.8),
             acc("real+gen", "few", 0.5), acc("real+gen", "lonely", 0.3, subset="lonely")]
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generated_folder(root, card=True):
    folder = write_imagefolder(root, classes=("0", "1"), per_class=3)
    if card:
        (folder / "dataset_card.json").write_text(json.dumps(
            {"name": folder.name, "kind": "generated", "strategy": "templates", "classes": ["0", "1"],
             "generator": {"name": "digits-ddpm", "path": "/abs/should/not/leak"}, "seed": 3, "num_images": 6,
             "generation": {"revision": "abc123", "steps": 2}}))
    return folder


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One report with a baseline and a reference, built once: (out folder, markdown, html, paths)."""
    tmp = tmp_path_factory.mktemp("full")
    base = write_jsonl(tmp / "baseline" / "results.jsonl", baseline_rows())
    rows = model_rows() + [acc("real", "uci", float("nan"), seed=9)]
    rows[0]["colour"] = "blue"
    gens = [generated_folder(tmp / "templates"), generated_folder(tmp / "nocard", card=False)]
    out = tmp / "report"
    paths = write_report(rows, out, baseline=base, generated=gens, reference="real", title="Full")
    return out, paths[0].read_text(), paths[1].read_text(), paths


def test_full_report_er_table_exact(full):
    _, md, _, _ = full
    assert ("| model | training data | augmentation | uci | fonts |\n|---|---|---|---:|---:|\n"
            "| real | data of real | standard | +3.0 ± 1.0 (n=3) | – |\n"
            "| real+gen | data of real+gen | standard | +5.0 [+5.0, +5.0] | -10.0 [-10.0, -10.0] |\n") in md
    assert "## Relative robustness vs real (points)" in md
    assert "| real+gen | data of real+gen | standard | +2.0 |" in md  # 0.95 - mean(.92, .93, .94)


def test_full_report_accuracy_table_seeds(full):
    _, md, _, _ = full
    assert "| real | data of real | standard | 90.0 ± 0.0 (n=3) | 93.0 ± 1.0 (n=3) | – | – | – |" in md


def test_full_report_warnings(full):
    _, md, html, _ = full
    warnings = md.split("## Warnings\n\n")[1].split("\n## ")[0]
    assert "has value nan; left out" in warnings
    assert "unknown columns ['colour']" in warnings
    assert "few: no baseline line" in warnings and "at least 3 baseline models, got 2" in warnings
    assert "real+gen on lonely: no in-distribution row on the same classes" in warnings
    assert "nocard has no readable dataset_card.json" in warnings
    assert '<ul class="warnings">' in html


def test_full_report_one_figure_per_shift(full):
    out, md, html, paths = full
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "line-fonts.png", "line-uci.png", "samples-nocard.png", "samples-templates.png"]
    assert paths[2:] == [out / "figures" / n for n in ("line-uci.png", "line-fonts.png", "samples-templates.png",
                                                        "samples-nocard.png")]
    assert md.count("![uci](figures/line-uci.png)") == 1 and md.count("![fonts](figures/line-fonts.png)") == 1
    assert "few" not in re.findall(r"!\[([^]]+)\]\(figures/line", md)
    assert "strategy templates, generator digits-ddpm, revision abc123, steps 2, seed 3; 6 images" in md
    assert len(_images(html)) == 4


def test_full_report_html_is_self_contained(full):
    out, md, html, _ = full
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", html)  # base64 may spell anything
    assert "http" not in text and "<link" not in text and "<script" not in text and "url(" not in text
    assert str(out.parent) not in md + html and "/abs/should/not/leak" not in md + html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs == _images(html)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 50


def _images(html):
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


def test_report_without_baseline_shows_stored_er(tmp_path):
    er = {**acc("real+gen", "uci", 0.05), "metric": "effective_robustness", "ci_low": 0.01, "ci_high": 0.08}
    md = write_report(model_rows() + [er], tmp_path)[0].read_text()
    assert "no baseline given (--baseline testbed|PATH): no accuracy-on-the-line plots; the ER rows" in md
    assert "| real+gen | data of real+gen | standard | +5.0 [+1.0, +8.0] |" in md
    assert not (tmp_path / "figures").exists()


# --- the CLI -----------------------------------------------------------------------------------------------

def test_cli_report_end_to_end(tmp_path, capsys):
    gen = generated_folder(tmp_path / "gen" / "label")
    ck = tmp_path / "ck" / "real+gen-0"
    ck.mkdir(parents=True)
    # checkpoints name their generated folders relative to where training ran: here, the results' folder
    (ck / "data.json").write_text(json.dumps({"generated": ["gen/label", "gen/gone"]}))
    rows = [{**r, "checkpoint": "ck/real+gen-0"} if r["model"] == "real+gen" else r for r in model_rows()]
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    base = write_jsonl(tmp_path / "base.jsonl", baseline_rows())
    assert generated_from_checkpoints(rows, search=[tmp_path]) == [tmp_path / "gen" / "label"]
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--baseline", str(base), "--reference", "real",
                 "--title", "CLI"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"wrote {out / 'report.md'}", f"wrote {out / 'report.html'}"]
    assert f"wrote {out / 'figures' / 'samples-label.png'}" in printed
    md = (out / "report.md").read_text()
    assert md.startswith("# CLI\n") and "![label](figures/samples-label.png)" in md and gen.name == "label"
    assert len(_images((out / "report.html").read_text())) == 3


def test_cli_report_missing_results(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genrobust: error: no results file") and str(tmp_path / "nope.jsonl") in err
    assert not (tmp_path / "rep").exists()


def test_report_with_baseline_recomputes_stored_er(tmp_path):
    stale = {**acc("real+gen", "uci", 0.5), "metric": "effective_robustness", "ci_low": 0.4, "ci_high": 0.6}
    base = write_jsonl(tmp_path / "base.jsonl", baseline_rows())
    md = write_report(model_rows() + [stale], tmp_path / "rep", baseline=base)[0].read_text()
    assert "| real+gen | data of real+gen | standard | +5.0 [+5.0, +5.0] |" in md and "+50.0" not in md
    assert "robustness rows in the results files (1) are not shown" in md
