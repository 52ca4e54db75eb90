"""The baseline zoo: seeded fractions, training + evaluation of every member, reuse on rerun, chance models."""
import json

import pytest
import torch

from genrobust.study import baselines as bl
from genrobust.cli import main
from genrobust.data import load_dataset

TINY = (bl.Member("tiny-a", "test_resnet", 1, 0.1, 32), bl.Member("tiny-b", "test_resnet", 2, 0.05, 16))


def test_fraction_subset_is_class_balanced_and_seeded():
    data = load_dataset("digits-mnist/train")
    sub = bl.fraction_subset(data, 0.1, seed=0)
    assert list(sub.counts().values()) == [10] * 10
    assert torch.equal(sub.images, bl.fraction_subset(data, 0.1, seed=0).images)
    assert not torch.equal(sub.images, bl.fraction_subset(data, 0.1, seed=1).images)
    assert bl.fraction_subset(data, 1.0, 0) is data
    with pytest.raises(ValueError, match=r"data fraction must be in \(0, 1\], got 0"):
        bl.fraction_subset(data, 0, 0)


def test_the_digits_suite_spreads_architecture_epochs_and_data():
    members = bl.SUITES["digits"]["members"]
    assert len(members) >= 8
    assert len({m.model for m in members}) >= 3 and len({m.fraction for m in members}) >= 4
    assert len({m.name for m in members}) == len(members)


def test_zoo_trains_evaluates_and_reuses(tmp_path):
    out = tmp_path / "zoo"
    summary = bl.train_zoo("digits", out, members=TINY, progress=False)
    assert [m["name"] for m in summary] == ["tiny-a", "tiny-b"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["eval_set"]) for r in rows) == sorted(
        (m, s) for m in ("tiny-a", "tiny-b") for s in ("digits-mnist/test", "digits-uci", "digits-fonts/unseen"))
    assert json.loads((out / "models" / "tiny-b" / "data.json").read_text())["counts"]["real"]["3"] == 5
    assert json.loads((out / "zoo.json").read_text()) == summary
    stamp = (out / "models" / "tiny-a" / "model.safetensors").stat().st_mtime_ns
    assert bl.train_zoo("digits", out, members=TINY, progress=False) == summary
    assert (out / "models" / "tiny-a" / "model.safetensors").stat().st_mtime_ns == stamp
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)


def test_a_model_near_chance_is_reported_and_left_off_the_line(tmp_path):
    rows = [{"checkpoint": str(tmp_path / "models" / n), "role": "id", "class_subset": "all", "num_classes": 10,
             "value": v} for n, v in (("tiny-a", 0.9), ("tiny-b", 0.12))]
    summary = bl._summarise(TINY, rows, tmp_path)
    assert [(m["on_line"], m["note"]) for m in summary] == [(True, ""),
                                                           (False, "near chance: left out of the line")]


def test_unknown_suite_and_listing(capsys):
    assert main(["baselines", "train", "--suite", "imagenet", "--out", "x"]) == 2
    assert "unknown baseline suite 'imagenet'; choose from ['digits']" in capsys.readouterr().err
    assert main(["baselines", "list"]) == 0
    assert "resnet10t-f100-e15" in capsys.readouterr().out
