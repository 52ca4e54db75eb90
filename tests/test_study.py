"""The study grid: config parsing, cache keys, the dry-run plan, `--cells` slices, and a tiny end-to-end run."""
import json

import pytest
import yaml

from genrobust.cli import main
from genrobust.study import load_study, plan, run_study, select_cells


def write_study(tmp_path, **overrides):
    cfg = {"name": "tiny", "real": "digits-mnist/train", "generator": {"name": "digits-ddpm", "steps": 2},
           "strategies": ["label"], "amounts": [0.03], "model": "test_resnet", "epochs": 1, "seeds": [0],
           "eval_sets": ["digits-mnist/test"], "per_class": 3, "train": {"batch_size": 64}}
    cfg.update(overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_load_study_resolves_defaults(tmp_path):
    cfg = load_study(write_study(tmp_path, amounts=[0.5, 2, "generated-only"], per_class=None,
                                 strategies=["label", "image"]))
    assert cfg["per_class"] == 200  # ceil(2 x 1,000 real / 10 classes)
    assert cfg["classes"] == [str(i) for i in range(10)]
    assert cfg["augmentations"] == ["standard"]
    assert cfg["source"] == "digits-mnist/train"  # the image strategy starts from the real images


def test_unknown_key_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'epoch'") as e:
        load_study(write_study(tmp_path, epoch=3))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown train key 'lr_rate'"):
        load_study(write_study(tmp_path, train={"lr_rate": 0.1}))
    with pytest.raises(ValueError, match="amounts"):
        load_study(write_study(tmp_path, amounts=[-1]))


def test_plan_keys_are_stable_and_follow_their_inputs(tmp_path):
    path = write_study(tmp_path, augmentations=["standard", "randaugment"], amounts=[0.5, "generated-only"],
                       seeds=[0, 1])
    cfg = load_study(path)
    cells = plan(cfg, tmp_path / "out")
    assert [c.key for c in cells] == [c.key for c in plan(load_study(path), tmp_path / "out")]
    assert len({c.key for c in cells}) == len(cells)
    # 1 generation; per seed: 2 real-only arms + 1 strategy x 2 amounts
    assert [c.kind for c in cells].count("generation") == 1 and len(cells) == 1 + 2 * (2 + 2)
    names = [c.folder.name[:-9] for c in cells]
    assert "real+label-k0.5-s1" in names and "label-only-s0" in names and "real-randaugment-s0" in names
    assert cells[0].folder.name.endswith(cells[0].key[:8])

    more_epochs = plan({**cfg, "epochs": 2}, tmp_path / "out")
    assert more_epochs[0].key == cells[0].key  # generation does not depend on the classifier's recipe
    assert all(a.key != b.key for a, b in zip(cells[1:], more_epochs[1:]))
    steps = plan({**cfg, "generator": {**cfg["generator"], "steps": 3}}, tmp_path / "out")
    changed = {c.folder.name[:-9] for c, d in zip(cells, steps) if c.key != d.key}
    assert changed == {"label", "real+label-k0.5-s0", "label-only-s0", "real+label-k0.5-s1", "label-only-s1"}


def test_cells_slices_cover_every_cell_once(tmp_path):
    cells = plan(load_study(write_study(tmp_path, amounts=[0.5, 1], seeds=[0, 1, 2])), tmp_path / "out")
    for n in (1, 2, 3):
        taken = [c.index for i in range(n) for c in select_cells(cells, f"{i}/{n}")]
        assert sorted(taken) == list(range(len(cells)))
    with pytest.raises(ValueError, match="--cells"):
        select_cells(cells, "2/2")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", str(write_study(tmp_path)), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 cells: generation: 1 cells (0 cached); training: 2 cells (0 cached)" in text
    assert "to run" in text and "estimated" in text
    assert not out.exists()


def test_tiny_study_end_to_end_in_slices_then_cached(tmp_path, tiny_generator_dir):
    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)})
    cfg, out = load_study(path), tmp_path / "out"
    first = run_study(cfg, out, cells="0/2", progress=False)  # generation, then real+label (depends on it)
    assert [n[:-9] for n in first["ran"]] == ["label", "real+label-k0.03-s0"] and first["report"] is None
    second = run_study(cfg, out, cells="1/2", progress=False)
    assert [n[:-9] for n in second["ran"]] == ["real-standard-s0"]
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert yaml.safe_load((out / "study.yaml").read_text())["per_class"] == 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"real-standard-s0", "real+label-k0.03-s0"}
    assert {r["eval_set"] for r in rows} == {"digits-mnist/test"}

    again = run_study(cfg, out, progress=False)
    assert again["ran"] == [] and again["report"] is not None
    assert (out / "results.jsonl").read_text().count("\n") == len(rows)
    plan_text = []
    run_study(cfg, out, dry_run=True, echo=plan_text.append)
    assert "3 cells: generation: 1 cells (1 cached); training: 2 cells (2 cached); estimated 0 s" in plan_text[0]


def test_shipped_digits_study_config_plans_the_full_grid(tmp_path):
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "configs" / "studies" / "digits-study.yaml"
    cells = plan(load_study(path), tmp_path / "out")
    kinds = [c.kind for c in cells]
    # 4 strategies; a zoo; 5 seeds x (3 real-only arms + 4 strategies x 4 amounts)
    assert (kinds.count("generation"), kinds.count("baseline"), kinds.count("training")) == (4, 1, 95)
