"""Fidelity, diversity and Fréchet distance (genrobust.generate.stats): exact values on hand-made inputs, and
`generate stats` on folders with a tiny trained classifier."""
import json
import math

import numpy as np
import pytest
import torch

from genrobust.cli import main
from genrobust.data.folder import export_imageset
from genrobust.generate.stats import (diversity, embed, fidelity, folder_stats, frechet_distance, load_model,
                                      trace_sqrt_product)
from genrobust.train import predict
from helpers import digits_subset, fails


def test_fidelity_per_class_and_overall():
    result = fidelity([0, 0, 1, 2, 2], [0, 1, 1, 2, 2], classes=["a", "b", "c"])
    assert result == {"accuracy": 0.8, "per_class": {"a": 1.0, "b": 0.5, "c": 1.0}, "n": 5}
    # a class nobody asked for is absent, not 0
    assert fidelity([1, 1], [1, 1], classes=["a", "b"])["per_class"] == {"b": 1.0}
    with pytest.raises(ValueError, match="one prediction per label"):
        fidelity([0], [0, 1])


def test_diversity_by_hand():
    # cosine distances of (1,0), (0,1), (1,1): 1, 1 - 1/sqrt2, 1 - 1/sqrt2
    cos = diversity([[1, 0], [0, 1], [1, 1]])
    assert cos["per_class"]["all"] == pytest.approx((3 - math.sqrt(2)) / 3, abs=1e-12)
    # L2 distances of (0,0), (3,4), (6,8): 5, 10, 5
    assert diversity([[0, 0], [3, 4], [6, 8]], metric="l2")["mean"] == pytest.approx(20 / 3, abs=1e-12)


def test_diversity_pairs_stay_within_a_class():
    emb = [[1, 0], [1, 0], [0, 1], [0, 1], [0, 3]]
    result = diversity(emb, labels=[0, 0, 1, 1, 1], classes=["x", "y"], metric="l2")
    assert result["per_class"] == {"x": 0.0, "y": pytest.approx((0 + 2 + 2) / 3)}
    assert result["mean"] == pytest.approx(2 / 3)
    # a one-image class has no pairs and is left out
    assert diversity(emb, labels=[0, 1, 1, 1, 1], metric="l2")["per_class"].keys() == {"1"}
    with pytest.raises(ValueError, match="unknown diversity metric"):
        diversity(emb, metric="manhattan")


def test_frechet_identical_sets_give_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    # fewer images than dimensions: singular covariances still give a finite, non-negative number
    few = np.random.default_rng(1).normal(size=(3, 10))
    assert frechet_distance(few, few) == pytest.approx(0, abs=1e-5)
    assert 0 < frechet_distance(few, few + 1) < math.inf


def test_frechet_by_hand():
    # 1-D: means 1 and 5, standard deviations sqrt(2) and 2 sqrt(2) (n - 1): (1-5)^2 + (sqrt2 - 2 sqrt2)^2 = 18
    assert frechet_distance([0.0, 2.0], [3.0, 7.0]) == pytest.approx(18, abs=1e-9)
    # 2-D, b = 2a + 1: diagonal covariances 4/3 and 16/3, means (1,1) and (3,3): 8 + 2 (2/sqrt3 - 4/sqrt3)^2
    a = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], dtype=float)
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(8 + 8 / 3, abs=1e-9)
    # a shift moves the means only
    assert frechet_distance(a, a + [3, 4]) == pytest.approx(25, abs=1e-9)
    with pytest.raises(ValueError, match="two sets"):
        frechet_distance(a, np.ones((4, 3)))


def test_frechet_trace_term_matches_scipy_sqrtm_on_full_rank_covariances():
    from scipy import linalg

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 5)), rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product(ca, cb) == pytest.approx(np.trace(linalg.sqrtm(ca @ cb)).real, rel=1e-9)


@pytest.fixture
def folders(tmp_path):
    """Two exported digit folders: 'gen' (train images) and 'other' (test images)."""
    gen = export_imageset(digits_subset(per_class=3), tmp_path / "gen")
    other = export_imageset(digits_subset(per_class=3, split="digits-mnist/test"), tmp_path / "other")
    return gen, other


def test_folder_stats_agree_with_the_pure_functions(trained, folders):
    gen, other = folders
    result = folder_stats(gen, real=f"imagefolder:{gen}", classifier=trained["out"])
    assert json.loads((gen / "stats.json").read_text())["frechet"] == result["frechet"]
    assert result["frechet"] == pytest.approx(0, abs=1e-5)  # the same images on both sides
    data = digits_subset(per_class=3)
    model = load_model(trained["out"])
    pred = predict(model.net, data.images).argmax(1).numpy()
    expected = fidelity(pred, data.labels.numpy(), model.classes)
    assert result["generated"]["fidelity"] == expected == result["real_set"]["fidelity"]
    emb = embed(model, data.images)
    assert emb.shape == (30, model.net.num_features)
    assert result["generated"]["diversity"]["mean"] == pytest.approx(diversity(emb, data.labels, model.classes)["mean"])
    assert result["generated"]["counts"] == {str(c): 3 for c in range(10)}
    apart = folder_stats(gen, real="digits-mnist/test", classifier=trained["out"], out=gen / "b.json")
    assert apart["frechet"] > 0 and apart["real_set"]["num_images"] == 1000


def test_folder_stats_match_classes_by_name(trained, tmp_path):
    data = digits_subset(per_class=2)
    some = data.subset([i for i in range(len(data)) if int(data.labels[i]) in (3, 7)])
    # a folder of 3s and 7s only: its class folders are 0 and 1 in folder order, the classifier's 3 and 7
    from genrobust.data.imageset import ImageSet

    only = ImageSet("37", some.images, (some.labels == 7).long(), ["3", "7"])
    folder = export_imageset(only, tmp_path / "37")
    result = folder_stats(folder, classifier=trained["out"])
    model = load_model(trained["out"])
    pred = predict(model.net, only.images).argmax(1).numpy()
    assert result["generated"]["fidelity"]["accuracy"] == pytest.approx(
        float((pred == np.where(only.labels.numpy() == 1, 7, 3)).mean()))
    assert set(result["generated"]["fidelity"]["per_class"]) == {"3", "7"}
    assert result["frechet"] is None


def test_a_timm_embedder_needs_local_weights(trained, folders, tmp_path):
    from safetensors.torch import save_file

    gen, other = folders
    with pytest.raises(ValueError, match="needs local weights"):
        folder_stats(gen, embedder="test_resnet")
    import timm

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    result = folder_stats(gen, embedder="test_resnet", embedder_weights=weights, real=f"imagefolder:{other}",
                          out=tmp_path / "s.json")
    # grey digits become RGB at the model's own input size; no classifier, so no fidelity
    assert result["embedder"]["channels"] == 3 and "fidelity" not in result["generated"]
    assert result["frechet"] > 0


def test_folder_stats_errors(trained, folders, tmp_path):
    gen, _ = folders
    with pytest.raises(ValueError, match="needs --classifier"):
        folder_stats(gen)
    with pytest.raises(FileNotFoundError, match="no folder"):
        folder_stats(tmp_path / "nothing", classifier=trained["out"])
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        folder_stats(gen, classifier=tmp_path / "no-model")
    with pytest.raises(ValueError, match="pass --out"):
        folder_stats("digits-mnist/test", classifier=trained["out"])
    letters = export_imageset(digits_subset(per_class=1).subset([0]), tmp_path / "letters")
    (letters / "0").rename(letters / "zero")
    (letters / "metadata.jsonl").unlink()
    (letters / "dataset_card.json").unlink()
    with pytest.raises(ValueError, match="does not know"):
        folder_stats(letters, classifier=trained["out"])


def test_cli_generate_stats(trained, folders, tmp_path, capsys):
    gen, other = folders
    out = tmp_path / "stats.json"
    assert main(["generate", "stats", str(gen), "--classifier", str(trained["out"]), "--real",
                 f"imagefolder:{other}", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert f"{result['frechet']:.3f}" in printed and "generated" in printed and "real" in printed
    assert result["real"] == f"imagefolder:{other}" and not (gen / "stats.json").exists()
    assert "needs --classifier" in fails(capsys, ["generate", "stats", str(gen)])
