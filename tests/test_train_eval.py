import csv
import json

import pytest
import torch
import yaml

from genrobust import evaluate as ev
from genrobust import train as tr
from genrobust.data import load_dataset
from genrobust.data.folder import align_classes, load_imagefolder
from genrobust.data.imageset import ImageSet
from genrobust.registry import UnknownNameError

DIGITS = [str(i) for i in range(10)]
RESULT_KEYS = {"model", "checkpoint", "train_data", "eval_set", "metric", "value", "n", "class_subset"}


def _small_train_set():
    data = load_dataset("digits-mnist/train")
    idx = [i for c in range(10) for i in torch.nonzero(data.labels == c).flatten()[:4].tolist()]
    return data.subset(idx, name="digits-mnist/train[:40]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A test_resnet trained for 2 epochs on 40 digits; also the in-memory model train() built."""
    built = []
    create = tr.create_classifier

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        built.append(model)
        return model

    data = _small_train_set()
    out = tmp_path_factory.mktemp("ckpt") / "tiny-resnet"
    config = tr.TrainConfig(model="test_resnet", epochs=2, batch_size=32, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "create_classifier", recording)
        rows = tr.train(data, out, config, data_info={"real": "digits-mnist/train", "label": "tiny real"},
                        progress=False)
    return {"out": out, "rows": rows, "model": built[0].eval(), "data": data, "config": config}


def test_checkpoint_folder(trained):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "config.yaml", "data.json",
                                                     "metrics.csv", "model.safetensors"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {**trained["config"].to_dict(), "in_chans": 1, "input_size": [28, 28], "num_classes": 10}
    assert json.loads((out / "classes.json").read_text()) == DIGITS
    info = json.loads((out / "data.json").read_text())
    assert info == {"name": "digits-mnist/train[:40]", "num_images": 40, "real": "digits-mnist/train",
                    "label": "tiny real"}
    with open(out / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in metrics] == [1, 2]
    assert list(metrics[0]) == ["epoch", "train_loss", "train_acc", "lr", "seconds"]
    assert [float(r["train_loss"]) for r in metrics] == [r["train_loss"] for r in trained["rows"]]
    assert all(0 <= float(r["train_acc"]) <= 1 for r in metrics)
    # warm-up then cosine: 2 steps per epoch, warm-up 2 steps, so the last lr is 0.1 * 0.5 * (1 + cos(pi/2))
    assert float(metrics[0]["lr"]) == pytest.approx(0.1)
    assert float(metrics[1]["lr"]) == pytest.approx(0.05)


def test_lr_schedule_exact():
    assert [tr._lr_at(s, 10, 2, 1.0) for s in (0, 1)] == [0.5, 1.0]
    assert tr._lr_at(2, 10, 2, 1.0) == 1.0
    assert tr._lr_at(6, 10, 2, 1.0) == pytest.approx(0.5)
    assert tr._lr_at(10, 10, 2, 1.0) == pytest.approx(0.0)


def test_loaded_checkpoint_predicts_like_the_trained_model(trained):
    model, cfg, classes = tr.load_checkpoint(trained["out"])
    assert classes == DIGITS and cfg["model"] == "test_resnet" and not model.training
    images = load_dataset("digits-mnist/test").images[:64]
    expected = tr.predict(trained["model"], images)
    got = tr.predict(model, images)
    assert got.shape == (64, 10)
    assert torch.equal(got, expected)
    # eval mode: a prediction does not depend on the rest of its batch
    assert torch.allclose(tr.predict(model, images[:5], batch_size=1), got[:5], atol=1e-5)


def test_training_is_repeatable(trained, tmp_path):
    tr.train(trained["data"], tmp_path / "again", trained["config"], progress=False)
    first = (trained["out"] / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first


def test_normalization_reduces_to_one_channel():
    model = tr.create_classifier("test_resnet", 4, 1)
    mean, std = tr.normalization(model, 1)
    assert mean.shape == std.shape == (1, 1, 1, 1)
    mean3, std3 = tr.normalization(tr.create_classifier("test_resnet", 4, 3), 3)
    assert mean3.shape == (1, 3, 1, 1)
    assert mean.item() == pytest.approx(mean3.mean().item())


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown timm model 'test_resnt'; did you mean test_resnet"):
        tr.create_classifier("test_resnt", 10, 1)
    with pytest.raises(ValueError, match=r"unknown timm model 'qqqqzzzz'; see timm.list_models\(\)"):
        tr.create_classifier("qqqqzzzz", 10, 1)


def test_unknown_model_in_train_raises(tmp_path):
    with pytest.raises(ValueError, match="did you mean test_resnet"):
        tr.train(_small_train_set(), tmp_path / "x", tr.TrainConfig(model="test_resnt", epochs=1), progress=False)


def test_one_class_is_an_error(tmp_path):
    one = ImageSet("one", torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["0"])
    with pytest.raises(ValueError, match="one has 1 class; a classifier needs at least 2"):
        tr.train(one, tmp_path / "x", tr.TrainConfig(model="test_resnet", epochs=1), progress=False)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_load_checkpoint_of_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a genrobust checkpoint folder"):
        tr.load_checkpoint(tmp_path)


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
    assert (s.dataset, s.role, s.class_subset) == ("imagefolder:/some/where", "shift", None)
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
    assert row["metric"] == "top1" and row["n"] == 6 and row["class_subset"] == "all"
    assert row["augmentation"] == "standard" and row["seed"] == 0 and row["role"] == "shift"
    # the value is the trained model's accuracy on the folder, labels aligned by class name
    data = align_classes(load_imagefolder(eval_folder, channels=1), DIGITS)
    assert data.labels.tolist() == [2, 2, 2, 7, 7, 7]
    expected = (tr.predict(trained["model"], data.images).argmax(1) == data.labels).float().mean().item()
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


def test_evaluate_rejects_images_of_another_size(trained, tiny_images, tmp_path):
    folder = tiny_images("big", classes=("1",), per_class=1, size=32)
    with pytest.raises(ValueError, match=r"images are \(1, 32, 32\), the model was trained on \(1, 28, 28\)"):
        ev.evaluate(trained["out"], [f"imagefolder:{folder}"], tmp_path / "r.jsonl")


def test_evaluate_rejects_unknown_classes(trained, tiny_images, tmp_path):
    folder = tiny_images("cats", classes=("cat",), per_class=1)
    with pytest.raises(ValueError, match=r"\['cat'\]"):
        ev.evaluate(trained["out"], [f"imagefolder:{folder}"], tmp_path / "r.jsonl")


def test_train_arm_redoes_a_partial_checkpoint(tmp_path, tiny_images):
    from genrobust.study import train_arm

    out = tmp_path / "models" / "real"
    out.mkdir(parents=True)
    # what a kill while saving leaves: side files written, weights only in their temp file
    (out / "config.yaml").write_text("model: test_resnet\n")
    (out / ".model.safetensors.tmp").write_bytes(b"")
    real = tiny_images("real", classes=("0", "1"), per_class=2)
    train_arm(out, f"imagefolder:{real}", (), 0.0, tr.TrainConfig(model="test_resnet", epochs=1), "cpu", False)
    tr.load_checkpoint(out)
