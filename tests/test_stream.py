"""Streamed ImageFolder data on a realistic folder: mixed sizes and modes, EXIF rotation, corrupt files.

Training decodes in DataLoader workers (timm's RandomResizedCrop of the full image, then the flip), skips and
names unreadable files under --max-corrupt, and gives the same weights whatever the worker count; evaluation
scores the readable images of a folder and counts the rest.
"""
import json
import logging
import pathlib

import pytest
import torch
from PIL import Image, ImageOps

import realistic
from genrobust import evaluate as ev
from genrobust import train as tr
from genrobust.data import decode
from genrobust.data.mixing import FileSet

CLASSES = realistic.imagenet100_classes(3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 9 images (every kind in `realistic.KINDS`), one truncated JPEG and one zero-byte file."""
    return realistic.imagefolder(tmp_path_factory.mktemp("stream") / "train", CLASSES, per_class=9, corrupt=2)


def _fileset(tree, max_corrupt):
    files = sorted(p for p in tree.root.rglob("*") if p.is_file())
    labels = [CLASSES.index(p.parent.name) for p in files]
    return FileSet("realistic", [str(p) for p in files], torch.tensor(labels), list(CLASSES), channels=3,
                   max_corrupt=max_corrupt)


def _config(**kw):
    return tr.TrainConfig(**{"model": "test_resnet", "epochs": 1, "batch_size": 8, "input_size": 32, "lr": 0.05,
                             "warmup_epochs": 0, "flip": True, **kw})


def _weights(out):
    from safetensors.torch import load_file
    return load_file(pathlib.Path(out) / "model.safetensors")


def test_the_folder_is_realistic(tree):
    kinds = {kind for kind, _ in tree.files.values()}
    assert {"l-jpeg", "cmyk-jpeg", "rgba-png", "p-png", "png-as-jpeg", "exif6-jpeg"} <= kinds
    assert sorted(tree.corrupt.values()) == ["truncated-jpeg", "zero-byte"]
    assert len({size for _, size in tree.files.values()}) >= 5


def test_streamed_training_skips_and_names_corrupt_files_and_ignores_the_worker_count(tree, tmp_path, caplog):
    data = _fileset(tree, max_corrupt=0.1)  # 2 of 29
    with caplog.at_level(logging.WARNING, logger="genrobust.train"):
        rows = tr.train(data, tmp_path / "w0", _config(workers=0), progress=False)
    assert len(rows) == 1 and tr.is_complete(tmp_path / "w0")
    bad = sorted(str(p) for p in tree.corrupt)
    skipped = [line.split("\t")[0] for line in (tmp_path / "w0" / "skipped.txt").read_text().splitlines()]
    assert skipped == bad
    for path in bad:  # each named once, however often it was met
        assert sum(path in r.getMessage() for r in caplog.records) == 1
    saved = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "w0" / "config.yaml").read_text())))
    assert saved["crop_scale"] == [0.08, 1.0] and saved["interpolation"] == "bilinear"  # test_resnet's own
    # the same seed gives the same crops, flips and weights with 2 workers
    tr.train(data, tmp_path / "w2", _config(workers=2), progress=False)
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_corrupt_files_stop_training_naming_them(tree, tmp_path):
    data = _fileset(tree, max_corrupt=0.01)
    # one process stops at the first file over the limit (under DDP, at the end of the epoch, all ranks alike)
    with pytest.raises(ValueError, match=r"1 of the 29 images in the training set are unreadable \(more than the "
                                         r"--max-corrupt 0.01 allows\), e\.g\. .*_corrupt\d") as e:
        tr.train(data, tmp_path / "ck", _config(workers=0), progress=False)
    assert any(str(p) in str(e.value) for p in tree.corrupt)
    assert not tr.is_complete(tmp_path / "ck")


def test_a_sample_depends_on_seed_epoch_and_index_only(tree):
    data = _fileset(tree, max_corrupt=0.1)
    ds = tr.StreamingImages(data.files, data.labels, 3, (32, 32), seed=3, flip=True)
    x, y, skipped = ds.__getitems__((1, [4, 7, 2]))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and not skipped
    assert torch.equal(ds[(1, 7)][0], x[1]) and ds[(1, 7)][1] == int(y[1])
    assert not torch.equal(ds[(2, 7)][0], x[1])  # another epoch, another crop
    other = tr.StreamingImages(data.files, data.labels, 3, (32, 32), seed=4, flip=True)
    assert not torch.equal(other[(1, 7)][0], x[1])


def test_an_unreadable_file_is_replaced_by_the_next_and_reported(tree):
    data = _fileset(tree, max_corrupt=0.1)
    i = next(k for k, f in enumerate(data.files) if pathlib.Path(f) in tree.corrupt)
    ds = tr.StreamingImages(data.files, data.labels, 3, (32, 32))
    x, y, skipped = ds.__getitems__((0, [i]))
    assert skipped and skipped[0][0] == data.files[i]
    j = i + len(skipped)
    assert torch.equal(x[0], ds[(0, j)][0]) and int(y[0]) == int(data.labels[j])


def test_the_batch_augmentation_does_not_crop_streamed_images_again(tree, tmp_path, monkeypatch):
    made = []
    real = tr.create_augmentation

    def spy(name, **kw):
        made.append(kw)
        return real(name, **kw)
    monkeypatch.setattr(tr, "create_augmentation", spy)
    tr.train(_fileset(tree, 0.1), tmp_path / "ck", _config(workers=0, augmentation="standard"), progress=False)
    assert made == [{"flip": True, "crop": False}]
    assert real("standard", flip=True, crop=False).crop is None
    assert real("randaugment", flip=True, crop=False).crop is None


def test_exif_orientation_reaches_the_decoded_image(tree):
    path, (_, (w, h)) = next((p, v) for p, v in tree.files.items() if v[0] == "exif6-jpeg")
    assert w != h
    x = decode.eval_image(path, (w, h), "RGB")  # upright the stored w x h image is h wide and w high
    assert x.shape == (3, w, h)
    with Image.open(path) as im:
        assert im.size == (w, h)
        upright = decode.to_tensor(ImageOps.exif_transpose(im).convert("RGB"))
    assert torch.equal(x, upright)


def test_evaluation_scores_the_readable_images_and_reports_the_rest(tree, tmp_path, caplog):
    out = tmp_path / "ck"
    tr.train(_fileset(tree, 0.1), out, _config(workers=0), progress=False)
    with caplog.at_level(logging.WARNING, logger="genrobust.evaluate"):
        (row,) = ev.evaluate(out, [f"imagefolder:{tree.root}"], tmp_path / "r.jsonl", workers=2, max_corrupt=0.1)
    assert row["n"] == len(tree.files) and row["unreadable"] == 2
    assert all(any(str(p) in r.getMessage() for r in caplog.records) for p in tree.corrupt)
    assert ev.check_rows([row])[1] == []  # `unreadable` is a known column
    with pytest.raises(ValueError, match=r"2 of its 29 images are unreadable .* --max-corrupt 0.01"):
        ev.evaluate(out, [f"imagefolder:{tree.root}"], tmp_path / "r2.jsonl", workers=0)


def test_recipes_and_flags_set_the_crop(tree, tmp_path, monkeypatch):
    from genrobust.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: test_resnet\ncrop_scale: [0.25, 1.0]\ncrop_ratio: [0.5, 2.0]\n"
                      "interpolation: bicubic\nstream: 'on'\ninput_size: 32\n")
    seen = []
    monkeypatch.setattr(tr, "train", lambda data, out, config, **kw: seen.append(config) or [{"train_acc": 0.0}])
    argv = ["train", "--config", str(recipe), "--real", f"imagefolder:{tree.root}", "--max-corrupt", "0.1",
            "--out", str(tmp_path / "ck"), "--device", "cpu"]
    assert main(argv) == 0
    assert main([*argv, "--crop-scale", "0.5", "0.9", "--interpolation", "bilinear"]) == 0
    first, second = (c.resolved() for c in seen)
    assert (first.crop_scale, first.crop_ratio, first.interpolation) == ((0.25, 1.0), (0.5, 2.0), "bicubic")
    assert (second.crop_scale, second.crop_ratio, second.interpolation) == ((0.5, 0.9), (0.5, 2.0), "bilinear")
    for bad, msg in ((dict(crop_scale=(0.5,)), "crop scale must be two"), (dict(crop_scale=(0.9, 0.5)), "min <= max"),
                     (dict(crop_ratio=(0, 1)), "crop ratio"), (dict(interpolation="cubic"), "interpolation must")):
        with pytest.raises(ValueError, match=msg):
            tr.TrainConfig(**bad).resolved()


def test_stats_read_a_real_folder_of_mixed_sizes_and_corrupt_files(tree, tmp_path):
    import numpy as np

    from genrobust.generate.stats import folder_stats

    out = tmp_path / "ck"
    tr.train(_fileset(tree, 0.1), out, _config(workers=0), progress=False)
    gen = tmp_path / "gen"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (gen / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(gen / c / f"{i}.png")
    result = folder_stats(gen, real=f"imagefolder:{tree.root}", classifier=out, max_corrupt=0.1)
    real = result["real_set"]
    assert real["num_images"] == len(tree.files) and sorted(real["unreadable"]) == sorted(map(str, tree.corrupt))
    assert sum(real["counts"].values()) == len(tree.files) and np.isfinite(result["frechet"])
    with pytest.raises(ValueError, match="unreadable"):
        folder_stats(gen, real=f"imagefolder:{tree.root}", classifier=out, out=tmp_path / "s.json")


def test_testset_hashing_decodes_upright_and_names_unreadable_files(tree):
    from genrobust.testset.builder import hash_files

    exif = next(p for p, v in tree.files.items() if v[0] == "exif6-jpeg")
    bad = sorted(tree.corrupt)
    found = {}
    hashes = hash_files([exif, *bad], unreadable=found)
    assert sorted(found) == sorted(map(str, bad)) and hashes[1:].tolist() == [0, 0]
    from genrobust.testset import phash
    with Image.open(exif) as im:
        assert hashes[0] == phash.phash(ImageOps.exif_transpose(im).convert("RGB"))
    with pytest.raises(ValueError, match=f"unreadable image {bad[0]}"):
        hash_files(bad[:1])
