"""Eval sets of the ImageNet family: class lists, mappings, masks and any-of scoring, on toy folders.

An oracle model predicts the class index written into each image as its grey level, so every expected
accuracy below is known exactly.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genrobust import evaluate as ev
from genrobust import train as tr

WNIDS = [c["wnid"] for c in ev.reference("imagenet_classes.json")["classes"]]
R_WNIDS = ev.reference("imagenet_r_wnids.json")["wnids"]
ON = ev.reference("objectnet_to_imagenet.json")["classes"]


# --- pure scoring ------------------------------------------------------------------------------------

def test_class_plan_matches_by_id_and_masks_to_the_overlap():
    plan = ev.class_plan("toy", ("x", "y", "z"), (("x",), ("y",), ("z",)), ["z", "y", "w"])
    assert plan.keep == [1, 2] and plan.dropped == ["x"]
    assert plan.mask.tolist() == [True, True, False]
    assert plan.subset == "toy"
    assert plan.hits.tolist() == [[False, True, False], [True, False, False]]
    full = ev.class_plan("toy", ("y", "z"), (("y",), ("z",)), ["z", "y"])
    assert full.subset == "all"


def test_no_shared_class_is_a_clear_error():
    with pytest.raises(ValueError, match=r"toy shares no class with the checkpoint \(2 classes"):
        ev.class_plan("toy", ("cat",), (("cat",),), ["0", "1"])


def test_masking_on_a_toy_four_class_model():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.5],
                           [2.0, 1.0, 0.0, 3.0],
                           [0.0, 0.2, 1.0, 0.1],
                           [0.3, 0.2, 0.1, 0.0]])
    classes = ("c0", "c2", "c3")  # an eval set of three of the model's four classes
    plan = ev.class_plan("sub", classes, tuple((c,) for c in classes), ["c0", "c1", "c2", "c3"])
    # eval labels: image 0 is c3 (index 2), image 1 is c0, image 2 is c2, image 3 is c0
    labels = torch.tensor([2, 0, 1, 0])
    # masked argmax over c0, c2, c3: c3, c3, c2, c0 -> rows 0, 2 and 3 right; unmasked it would be 1 of 4
    assert ev.score(logits, labels, plan) == (3, 4)
    assert ev.masked_predictions(logits, plan.mask).tolist() == [3, 3, 2, 0]


def test_objectnet_any_of_scoring_on_a_toy_mapping():
    plan = ev.class_plan("toy-objectnet", ("clock", "cup"), (("a", "b"), ("c",)), ["a", "b", "c", "d"])
    assert plan.mask.tolist() == [True, True, True, False]
    logits = torch.tensor([[9.0, 0, 0, 0],   # a: a clock -> right
                           [0, 9.0, 0, 0],   # b: also a clock -> right
                           [0, 0, 9.0, 0],   # c: not a clock -> wrong
                           [0.3, 0.2, 0.1, 9.0],  # d is masked; a wins -> not a cup -> wrong
                           [0, 0, 9.0, 0]])  # c: a cup -> right
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert ev.score(logits, labels, plan) == (3, 5)


def test_unscored_eval_classes_are_left_out():
    plan = ev.class_plan("toy", ("a", "zzz"), (("a",), ("zzz",)), ["a", "b"])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # image 1 belongs to "zzz", which the model does not know: not scored; b is masked out
    assert ev.score(logits, torch.tensor([0, 1, 0]), plan) == (2, 2)


# --- declared sets -------------------------------------------------------------------------------------

def test_imagenet_family_is_declared_from_the_reference_data():
    r = ev.create_eval_set("imagenet-r")
    assert len(r.classes) == 200 and r.classes == r.folders and r.id_set == "imagenet-val"
    assert len(ev.create_eval_set("imagenet-a").classes) == 200
    on = ev.create_eval_set("objectnet")
    assert len(on.classes) == 113 and on.border == 2
    assert len({w for t in on.targets for w in t}) == 125
    val = ev.create_eval_set("imagenet-val")
    assert val.role == "id" and val.classes == tuple(WNIDS) and val.id_set is None
    assert ev.resolve_eval_sets(["paper"]) == ["imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r",
                                               "objectnet"]


def test_v2_folders_are_class_indices_not_sorted_strings(tmp_path):
    v2 = ev.create_eval_set("imagenet-v2")
    folders, classes, _ = v2.class_table(tmp_path)
    assert folders[:3] == ("0", "1", "2") and folders[10] == "10"
    assert classes == tuple(WNIDS)  # folder k holds ImageNet class k
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for k in ("0", "1", "10", "2"):
        _write(root / k / "a.jpeg", 5)
    files, labels, missing = ev.list_folder_images(v2, tmp_path)
    # string sorting would give 0, 1, 10, 2 -> labels 0, 1, 2, 3; the right labels are the folder numbers
    assert [(f.parent.name, int(y)) for f, y in zip(files, labels)] == [("0", 0), ("1", 1), ("2", 2), ("10", 10)]
    assert len(missing) == 996


def test_subset_models_score_on_the_overlap():
    in100 = ev.reference("imagenet100_wnids.json")
    on = ev.create_eval_set("objectnet")
    r = ev.create_eval_set("imagenet-r")
    r_plan = ev.class_plan("imagenet-r", r.classes, tuple((c,) for c in r.classes), in100["sorted_wnids"])
    assert len(r_plan.keep) == 19 == len(in100["paper_imagenet_r_subset_wnids"])
    on_plan = ev.class_plan("objectnet", on.classes, on.targets, in100["sorted_wnids"])
    assert len(on_plan.keep) == len(in100["paper_objectnet_subset"]) == 13


def test_a_missing_folder_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet-r: no folder .*imagenet-r; expected "
                                                r"imagenet-r/<wnid>/\*\.jpg under the data root"):
        ev.create_eval_set("imagenet-r").root(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass --data-root DIR or set GENROBUST_DATA"):
        ev.create_eval_set("objectnet").root(None)


# --- end to end with an oracle model --------------------------------------------------------------------

class Oracle(torch.nn.Module):
    """Predicts the class whose index times 10 is the image's mean grey level; ties go to low indices."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        mean, std = tr.normalization(self, x.shape[1])
        grey = ((x * std + mean) * 255).mean((1, 2, 3))
        k = (grey / 10).round().long().clamp(0, self.num_classes - 1)
        logits = -0.01 * torch.arange(self.num_classes).float().repeat(len(x), 1)
        logits[torch.arange(len(x)), k] += 10
        return logits


def _write(path, grey, size=16, frame=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size + 2 * frame, size + 2 * frame, 3), 250 if frame else grey, dtype=np.uint8)
    a[frame:frame + size, frame:frame + size] = grey
    Image.fromarray(a).save(path)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A model on five ImageNet classes and toy val / ImageNet-R / ObjectNet folders."""
    on_wnids = {w for c in ON for w in c["imagenet_wnids"]}
    r0, r1 = [w for w in R_WNIDS if w not in on_wnids][:2]
    clock, other, unknown = [c for c in ON if not set(c["imagenet_wnids"]) & set(R_WNIDS)][:3]
    x = next(w for w in WNIDS if w not in R_WNIDS and w not in on_wnids)
    a1, a2 = clock["imagenet_wnids"][:2]
    b = other["imagenet_wnids"][0]
    classes = sorted([r0, r1, x, a1, a2, b])
    idx = {w: 10 * classes.index(w) for w in classes}  # the grey level the oracle reads as that class
    root = tmp_path / "data"
    partner = {r0: r1, r1: r0, a1: a2, a2: b, b: a1, x: r0}
    for w in classes:  # val: one right, one predicted as the class's partner
        _write(root / "imagenet" / "val" / w / "right.JPEG", idx[w])
        _write(root / "imagenet" / "val" / w / "wrong.JPEG", idx[partner[w]])
    _write(root / "imagenet-r" / r0 / "1.jpg", idx[r0])
    _write(root / "imagenet-r" / r0 / "2.jpg", idx[r1])
    _write(root / "imagenet-r" / r1 / "1.jpg", idx[r1])
    _write(root / "imagenet-r" / [w for w in R_WNIDS if w not in classes][0] / "1.jpg", idx[r0])
    on_dir = root / "objectnet-1.0" / "images"
    for name, grey in (("1", a1), ("2", a2), ("3", b)):  # a1, a2 are both clocks; b is not
        _write(on_dir / clock["objectnet_folder"] / f"{name}.png", idx[grey], frame=2)
    _write(on_dir / other["objectnet_folder"] / "1.png", idx[b], frame=2)
    _write(on_dir / other["objectnet_folder"] / "2.png", idx[r0], frame=2)  # masked: falls to the lowest
    _write(on_dir / unknown["objectnet_folder"] / "1.png", idx[b], frame=2)  # class the model lacks

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "data.json").write_text(json.dumps({"label": "toy imagenet"}))
    cfg = {"model": "oracle", "in_chans": 3, "input_size": [16, 16], "num_classes": len(classes),
           "augmentation": "standard", "seed": 3}
    monkeypatch.setattr(tr, "load_checkpoint", lambda path, device="cpu": (Oracle(len(classes)), cfg, classes))
    return {"root": root, "ck": ck, "classes": classes, "w": dict(r0=r0, r1=r1, x=x, a1=a1, a2=a2, b=b)}


def test_shifts_with_their_id_counterparts_on_the_same_classes(world, tmp_path):
    results = tmp_path / "results.jsonl"
    rows = ev.evaluate(world["ck"], ["imagenet-r", "objectnet", "imagenet-val"], results,
                       data_root=world["root"])
    got = {(r["eval_set"], r["class_subset"]): r for r in rows}
    assert list(got) == [("imagenet-r", "imagenet-r"), ("imagenet-val", "imagenet-r"),
                         ("objectnet", "objectnet"), ("imagenet-val", "objectnet"), ("imagenet-val", "all")]
    r = got["imagenet-r", "imagenet-r"]
    # r0: right, predicted r1 (wrong); r1: right; the folder of a class the model lacks is not scored
    assert (r["value"], r["n"], r["num_classes"], r["missing_classes"]) == (round(2 / 3, 6), 3, 2, 197)
    assert r["role"] == "shift" and r["id_set"] == "imagenet-val" and r["seed"] == 3
    # val on {r0, r1}: each class one right and one predicted as the other
    assert (got["imagenet-val", "imagenet-r"]["value"], got["imagenet-val", "imagenet-r"]["n"]) == (0.5, 4)
    assert got["imagenet-val", "imagenet-r"]["role"] == "id"
    on = got["objectnet", "objectnet"]
    # clock images: a1 right, a2 right (any of the clock's classes), b wrong; other: b right, r0 masked ->
    # lowest allowed index wins, which is a1 or a2 or b; counted exactly below
    fallback = min(world["classes"].index(world["w"][k]) for k in ("a1", "a2", "b"))
    other_right = 1 + (world["classes"][fallback] == world["w"]["b"])
    assert (on["value"], on["n"], on["num_classes"]) == (round((2 + other_right) / 5, 6), 5, 3)
    # val on {a1, a2, b}: a1 -> a2 wrong, a2 -> b wrong, b -> a1 wrong: 3 of 6
    assert got["imagenet-val", "objectnet"]["value"] == 0.5 and got["imagenet-val", "objectnet"]["n"] == 6
    assert got["imagenet-val", "all"]["value"] == 0.5 and got["imagenet-val", "all"]["n"] == 12
    # all written, and nothing is scored twice
    assert ev.read_results(results) == rows
    assert ev.evaluate(world["ck"], ["imagenet-r", "objectnet", "imagenet-val"], results,
                       data_root=world["root"]) == []


def test_objectnet_border_is_cropped_before_scoring(world, tmp_path):
    folder = ev.create_eval_set("objectnet")
    files, labels, _ = ev.list_folder_images(folder, world["root"])
    cropped = ev.FolderImages(files, labels, 3, (16, 16), border=2)[0][0]
    assert cropped.shape == (3, 16, 16) and int(cropped.max()) < 250  # the 250-grey frame is gone


def test_a_shift_without_its_id_folder_is_scored_and_said(world, tmp_path, caplog):
    import shutil
    shutil.rmtree(world["root"] / "imagenet")
    rows = ev.evaluate(world["ck"], ["imagenet-r"], tmp_path / "r.jsonl", data_root=world["root"])
    assert [r["eval_set"] for r in rows] == ["imagenet-r"]
    assert "no in-distribution counterpart" in caplog.text
