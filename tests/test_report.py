from PIL import Image

from genrobust.report import accuracy_table, sample_grid, write_report

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


def test_sample_grid_layout(tiny_images, tmp_path):
    folder = tiny_images("gen", classes=("0", "1", "2"), per_class=3)
    path = sample_grid(folder, tmp_path / "grids" / "g.png", per_class=2, scale=2)
    with Image.open(path) as im:
        # 3 class rows x 2 images of 56 px (28 x 2), 2 px padding around each
        assert im.size == (2 * (56 + 2) + 2, 3 * (56 + 2) + 2)


def test_write_report(tiny_images, tmp_path):
    out = tmp_path / "report"
    grid = sample_grid(tiny_images("gen"), out / "grids" / "label.png", per_class=3)
    path = write_report(ROWS, out, title="T", notes=["note one", "note two"], grids=[("label", grid)])
    assert path == out / "report.md"
    text = path.read_text()
    assert text.startswith("# T\n")
    assert "## Accuracy (%)\n" in text and TABLE in text
    assert "- note one\n- note two\n" in text
    assert "![label](grids/label.png)" in text
    assert text.index("## Accuracy") < text.index("## Notes") < text.index("## Generated samples")


def test_write_report_minimal(tmp_path):
    path = write_report([], tmp_path)
    assert path.read_text() == "# genrobust report\n\n## Accuracy (%)\n\n_no accuracy rows_\n"
