import json

import pytest
import torch

from genrobust import evaluate as ev
from genrobust import train as tr
from genrobust.data import load_dataset
from genrobust.data.folder import align_classes, load_imagefolder
from genrobust.registry import UnknownNameError

DIGITS = [str(i) for i in range(10)]
RESULT_KEYS = {"model", "checkpoint", "train_data", "eval_set", "metric", "value", "n", "class_subset"}


# Training tests (checkpoint folder, schedules, repeatability, resume, ...) live in test_train.py.


# --- evaluate ----------------------------------------------------------------------------------------

LOGITS = torch.tensor([[0.1, 0.9, 0.0, 0.5],
                       [2.0, 1.0, 0.0, 3.0],
                       [0.0, 0.2, 1.0, 0.1],
                       [0.3, 0.2, 0.1, 0.0]])
LABELS = torch.tensor([3, 0, 2, 1])


def test_accuracy_with_and_without_a_class_mask():
    assert ev.accuracy(LOGITS, LABELS) == 0.25  # argmax 1, 3, 2, 0: only row 2 right
    assert ev.accuracy(LOGITS, LABELS, (0, 2, 3)) == 0.5  # argmax 3, 3, 2, 0: rows 0 and 2
    assert ev.accuracy(LOGITS, LABELS, (0, 1)) == 0.25  # argmax 1, 0, 1, 0: row 1 only
    assert ev.accuracy(LOGITS, LABELS, [1, 2]) == 0.5  # argmax 1, 1, 2, 1: rows 2 and 3
    assert ev.accuracy(LOGITS, LABELS, (2, 3)) == 0.5  # argmax 3, 3, 2, 2: rows 0 and 2
    assert LOGITS[0, 1] == 0.9  # masking does not change the caller's logits


def test_resolve_eval_sets():
    assert ev.resolve_eval_sets(["digits"]) == ["digits-mnist/test", "digits-uci", "digits-fonts/unseen"]
    assert ev.resolve_eval_sets(["digits-uci", "digits", "imagefolder:/x"]) == [
        "digits-uci", "digits-mnist/test", "digits-fonts/unseen", "imagefolder:/x"]


def test_eval_sets_are_declared():
    assert ev.create_eval_set("digits-mnist/test").role == "id"
    assert ev.create_eval_set("digits-uci").role == "shift"
    s = ev.create_eval_set("imagefolder:/some/where")
    assert (s.path, s.role, s.dataset, s.id_set) == ("/some/where", "shift", None, None)
    with pytest.raises(UnknownNameError, match="did you mean 'digits-uci'"):
        ev.create_eval_set("digits-ucl")


@pytest.fixture
def eval_folder(tiny_images):
    return tiny_images("evalset", classes=("7", "2"), per_class=3)


def test_evaluate_appends_rows_and_skips_done_pairs(trained, eval_folder, tmp_path):
    results = tmp_path / "out" / "results.jsonl"
    spec = f"imagefolder:{eval_folder}"
    rows = ev.evaluate(trained["out"], [spec], results)
    assert len(rows) == 1
    row = rows[0]
    assert RESULT_KEYS <= set(row)
    assert row["model"] == "tiny-resnet" and row["checkpoint"] == str(trained["out"])
    assert row["train_data"] == "tiny real" and row["eval_set"] == spec
    # a folder of two classes is scored on those two: the logits of the other eight are masked
    assert row["metric"] == "top1" and row["n"] == 6 and row["class_subset"] == spec and row["num_classes"] == 2
    assert row["augmentation"] == "standard" and row["seed"] == 0 and row["role"] == "shift"
    # the value is the trained model's accuracy on the folder, labels aligned by class name
    data = align_classes(load_imagefolder(eval_folder, channels=1), DIGITS)
    assert data.labels.tolist() == [2, 2, 2, 7, 7, 7]
    expected = ev.accuracy(tr.predict(trained["model"], data.images), data.labels, (2, 7))
    assert row["value"] == round(expected, 6)
    assert [json.loads(line) for line in results.read_text().splitlines()] == rows

    assert ev.evaluate(trained["out"], [spec], results) == []
    assert len(results.read_text().splitlines()) == 1
    again = ev.evaluate(trained["out"], [spec], results, force=True, model_name="renamed")
    assert len(again) == 1 and again[0]["model"] == "renamed" and again[0]["value"] == row["value"]


def test_evaluate_force_replaces_old_rows(trained, eval_folder, tmp_path):
    results = tmp_path / "results.jsonl"
    spec = f"imagefolder:{eval_folder}"
    ev.evaluate(trained["out"], [spec], results)
    ev.evaluate(trained["out"], [spec], results, force=True)
    assert len(ev.read_results(results)) == 1


def test_evaluate_only_scores_missing_sets(trained, eval_folder, tiny_images, tmp_path):
    results = tmp_path / "results.jsonl"
    other = tiny_images("evalset2", classes=("0", "1"), per_class=2)
    ev.evaluate(trained["out"], [f"imagefolder:{eval_folder}"], results)
    rows = ev.evaluate(trained["out"], [f"imagefolder:{eval_folder}", f"imagefolder:{other}"], results)
    assert [r["eval_set"] for r in rows] == [f"imagefolder:{other}"]
    assert len(ev.read_results(results)) == 2


def test_evaluate_on_the_digits_id_set(trained, tmp_path):
    rows = ev.evaluate(trained["out"], ["digits-mnist/test"], tmp_path / "r.jsonl")
    assert rows[0]["n"] == 1000 and rows[0]["role"] == "id"
    data = load_dataset("digits-mnist/test")
    assert rows[0]["value"] == round(ev.accuracy(tr.predict(trained["model"], data.images), data.labels), 6)


def test_folder_images_of_another_size_are_resized_to_the_model(trained, tiny_images, tmp_path):
    folder = tiny_images("big", classes=("1", "4"), per_class=2, size=32)
    ds = ev.FolderImages(*ev.list_folder_images(ev.create_eval_set(f"imagefolder:{folder}"), None)[:2],
                         channels=1, size=(28, 28), crop_pct=0.875)
    assert ds[0][0].shape == (1, 28, 28) and ds[0][0].dtype == torch.uint8
    rows = ev.evaluate(trained["out"], [f"imagefolder:{folder}"], tmp_path / "r.jsonl")
    assert rows[0]["n"] == 4


def test_evaluate_rejects_unknown_classes(trained, tiny_images, tmp_path):
    folder = tiny_images("cats", classes=("cat",), per_class=1)
    with pytest.raises(ValueError, match=r"\['cat'\]"):
        ev.evaluate(trained["out"], [f"imagefolder:{folder}"], tmp_path / "r.jsonl")


@pytest.mark.parametrize("kill", ["while saving the weights", "between the weights and the marker"])
def test_train_arm_redoes_a_partial_checkpoint(tmp_path, tiny_images, kill):
    from safetensors.torch import load_file, save_file

    from genrobust.study import train_arm

    real = f"imagefolder:{tiny_images('real', classes=('0', '1'), per_class=2)}"
    config = tr.TrainConfig(model="test_resnet", epochs=1)
    whole = tmp_path / "models" / "uninterrupted"
    train_arm(whole, real, (), 0.0, config, "cpu", False)
    out = tmp_path / "models" / "real"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text("model: test_resnet\n")
    if kill == "while saving the weights":  # side files written, weights only in their temp file
        (out / ".model.safetensors.tmp").write_bytes(b"")
    else:  # stale weights in place, no completion marker
        save_file({k: torch.zeros_like(v) for k, v in load_file(whole / "model.safetensors").items()},
                  out / "model.safetensors")
    train_arm(out, real, (), 0.0, config, "cpu", False)
    assert tr.is_complete(out)
    got, want = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
