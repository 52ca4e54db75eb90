"""The realistic ImageNet-shaped fixture (tests/realistic.py) and the paper-scale paths run on it (issue 15).

First the builder is checked against what it claims (sizes, aspects, modes, EXIF, a PNG under a .JPEG name,
corrupt files that really fail to decode, the registry's layouts), so it cannot silently degrade into uniform
fakes. Then each paper-scale path that used uniform fake JPEGs runs on it: streamed training, evaluation on
every ImageNet eval set, corrupt files where images are decoded, the source strategies, generation stats
against a real folder, and a generated test set built from a real folder. (The study configs end to end:
tests/test_paper_studies.py; the ImageNet recipes: tests/test_configs.py.)
"""
import collections
import json
import pathlib
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, UnidentifiedImageError

import realistic
from genrobust import evaluate as ev

EVAL_SETS = ("imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet")
MODES = {"l-jpeg": ("L", "JPEG"), "rgb-jpeg": ("RGB", "JPEG"), "cmyk-jpeg": ("CMYK", "JPEG"),
         "rgba-png": ("RGBA", "PNG"), "p-png": ("P", "PNG"), "png-as-jpeg": ("RGB", "PNG"),
         "exif6-jpeg": ("RGB", "JPEG"), "rgb-jpeg-lower": ("RGB", "JPEG"), "exif8-jpeg": ("RGB", "JPEG")}


def _decode(path):
    """Decode a file fully, as a DataLoader worker would (truncated data is an error, PIL's default)."""
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with Image.open(path) as im:
        im.load()
        return im.mode, im.format, im.size, im.getexif().get(realistic.ORIENTATION)


# --- the builder does what it says --------------------------------------------------------------------------

def test_classes_cover_every_shift_subset():
    classes = realistic.imagenet100_classes()
    s = realistic.subsets()
    assert len(classes) == 6 and classes == sorted(classes) and set(classes) <= set(s["in100"])
    r, a, on = s["r"], s["a"], s["objectnet"]
    assert any(w in r and w in a for w in classes) and any(w in r and w not in a for w in classes)
    assert any(w in a and w not in r for w in classes) and sum(w in on for w in classes) == 2
    assert any(w not in r and w not in a and w not in on for w in classes)
    assert len(realistic.imagenet100_classes(12)) == 12 and realistic.imagenet100_classes(2) != classes[:2]
    with pytest.raises(ValueError, match="n must be in"):
        realistic.imagenet100_classes(1)


def test_every_file_decodes_to_its_claimed_kind(realistic_tree):
    kinds, suffixes, sizes = collections.Counter(), set(), []
    for path, (kind, stored) in realistic_tree.files.items():
        mode, fmt, size, orientation = _decode(path)
        assert (mode, fmt) == MODES[kind], path
        assert size == stored
        assert orientation == ({"exif6-jpeg": 6, "exif8-jpeg": 8}.get(kind)), path
        if kind == "png-as-jpeg":
            assert path.suffix == ".JPEG" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        kinds[kind] += 1
        suffixes.add(path.suffix)
        sizes.append(size)
    assert set(kinds) == set(MODES) and min(kinds.values()) >= 20, kinds
    assert suffixes == {".JPEG", ".jpg", ".jpeg", ".png", ".PNG"}
    sides = [v for s in sizes for v in s]
    aspects = [w / h for w, h in sizes]
    assert min(sides) <= 60 and max(sides) >= 500 and len(set(sizes)) >= 10
    assert min(aspects) <= 1 / 3 + 1e-6 and max(aspects) >= 3 - 1e-6
    assert len(realistic_tree.files) > 400


def test_every_folder_mixes_kinds_and_sizes(realistic_tree):
    root = realistic_tree.root
    for sub in realistic.TRAIN_FOLDERS:
        for d in sorted((root / sub).iterdir()):
            kinds = {realistic_tree.files[p][0] for p in d.iterdir() if p in realistic_tree.files}
            assert kinds == set(MODES), d  # every kind in every train class folder
        first = sorted(sorted((root / sub).iterdir())[0].iterdir())[0]
        assert _decode(first)[0] == "L", first  # channels from the first file would say 1
    for sub in ("imagenet/val", "imagenetv2-matched-frequency-format-val", "imagenet-sketch/sketch", "imagenet-r",
                "imagenet-a", "objectnet-1.0/images"):
        files = realistic_tree.good(root / sub)
        assert {realistic_tree.files[p][0] for p in files} == set(MODES), sub
        assert len({realistic_tree.files[p][1] for p in files}) >= 9, sub


def test_corrupt_files_fail_to_decode_and_stay_within_one_percent(realistic_tree):
    root = realistic_tree.root
    assert sorted(realistic_tree.corrupt.values()) == ["truncated-jpeg"] * 2 + ["zero-byte"] * 2
    for path, kind in realistic_tree.corrupt.items():
        if kind == "zero-byte":
            assert path.stat().st_size == 0 and path.suffix == ".JPEG"
            with pytest.raises(UnidentifiedImageError):
                Image.open(path)
        else:
            with Image.open(path) as im:  # the header reads: only decoding finds it
                assert im.format == "JPEG" and im.size == (300, 200)
            with pytest.raises(OSError, match="truncated"):
                _decode(path)
    for sub in realistic.TRAIN_FOLDERS:
        bad = [p for p in realistic_tree.corrupt if root / sub in p.parents]
        good = realistic_tree.good(root / sub)
        assert len(bad) == 1 and len(good) == (120 if sub.startswith("retrieval") else 102)
        assert realistic.max_corrupt_ok(len(good), len(bad)) and not realistic.max_corrupt_ok(len(good), 2)
    assert not any(root / s in p.parents for p in realistic_tree.corrupt
                   for s in ("imagenet/val", "imagenet-r", "objectnet-1.0"))


def test_layouts_are_the_eval_set_registry_s(realistic_tree):
    root, s = realistic_tree.root, realistic.subsets()
    classes = realistic.imagenet100_classes()
    for name in EVAL_SETS:
        eset = ev.create_eval_set(name)
        files, labels, missing = ev.list_folder_images(eset, root)
        folders, names, _ = eset.class_table(root)
        assert len(files) == len(realistic_tree.good(eset.root(root))) > 0, name
        assert len(missing) == len(folders) - len(set(labels.tolist())), name
    # V2: folder k holds ImageNet class k; R and A: their 200 wnids only; ObjectNet: its own folder names
    v2 = root / "imagenetv2-matched-frequency-format-val"
    assert all(d.name == s["v2"][next(iter(d.iterdir())).name.split("_")[0]] for d in v2.iterdir())
    assert {d.name for d in (root / "imagenet-r").iterdir()} <= s["r"]
    assert {d.name for d in (root / "imagenet-a").iterdir()} <= s["a"]
    on_folders = {d.name for d in (root / "objectnet-1.0/images").iterdir()}
    assert on_folders <= set(s["objectnet"].values()) and len(on_folders) == 3
    # each eval set also holds a class the model lacks, as the real sets do
    for sub in ("imagenet/val", "imagenet-sketch/sketch", "imagenet-r", "imagenet-a"):
        assert {d.name for d in (root / sub).iterdir()} - set(classes), sub
    for sub in realistic.TRAIN_FOLDERS:
        assert sorted(d.name for d in (root / sub).iterdir()) == classes


def test_objectnet_images_have_a_border_the_crop_removes(realistic_tree):
    root = realistic_tree.root / "objectnet-1.0/images"
    for path in realistic_tree.good(root):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
            mode = "L" if im.mode == "L" else "RGB"
        red = np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)).convert(mode).convert("RGB"))[0, 0].astype(int)
        edge = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        inner = rgb[2:-2, 2:-2]
        assert np.abs(edge - red).max(-1).mean() < 40, path  # red (grey in an L file), JPEG or not
        inner_edge = np.concatenate([inner[0], inner[-1], inner[:, 0], inner[:, -1]])
        if mode == "RGB":  # (a grey class colour can match red's grey)
            assert np.abs(inner_edge - red).max(-1).mean() > 40, path  # the 2-pixel crop leaves no frame


def test_content_is_smooth_class_coloured_and_deterministic(realistic_tree, tmp_path):
    means = collections.defaultdict(list)
    for path, (kind, _) in realistic_tree.files.items():
        if kind in ("rgb-jpeg", "png-as-jpeg") and "train" in path.parts:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB")).astype(float)
            assert np.abs(np.diff(a, axis=1)).mean() < 8, path  # smooth, not noise (uniform noise: ~85)
            means[path.parent.name].append(a.mean((0, 1)))
    centres = {c: np.mean(v, 0) for c, v in means.items()}
    right = [min(centres, key=lambda k: np.linalg.norm(centres[k] - m)) == c for c, v in means.items() for m in v]
    assert len(centres) == 6 and np.mean(right) >= 0.9, "the mean colour alone tells most classes apart"
    one = realistic.imagefolder(tmp_path / "a", per_class=3, corrupt=2)
    two = realistic.imagefolder(tmp_path / "b", per_class=3, corrupt=2)
    assert [p.read_bytes() for p in sorted(one.files)] == [p.read_bytes() for p in sorted(two.files)]
    assert sorted(one.corrupt.values()) == ["truncated-jpeg", "zero-byte"]
    other = realistic.imagefolder(tmp_path / "c", per_class=3, seed=1)
    assert [p.read_bytes() for p in sorted(one.files)] != [p.read_bytes() for p in sorted(other.files)]


def test_a_data_root_builds_in_seconds(tmp_path):
    realistic.encode.cache_clear()
    t0 = time.time()
    tree = realistic.data_root(tmp_path / "root", train_per_class=20, corrupt=2)
    took = time.time() - t0
    print(f"realistic data root, {len(tree.files)} files + {len(tree.corrupt)} corrupt, cold cache: {took:.1f} s")
    assert took < 30 and len(tree.corrupt) == 8
    assert (tmp_path / "root/imagenet100/train").is_dir() and not (tmp_path / "root/models").exists()


# --- paper-scale paths on the realistic tree -----------------------------------------------------------------

def _expected_n(name, root, classes):
    """Images of eval set `name` under `root` whose class is scored for a model on `classes`."""
    s = realistic.subsets()
    folder = {"imagenet-val": lambda w: f"imagenet/val/{w}",
              "imagenet-v2": lambda w: f"imagenetv2-matched-frequency-format-val/{s['v2'][w]}",
              "imagenet-sketch": lambda w: f"imagenet-sketch/sketch/{w}",
              "imagenet-r": lambda w: f"imagenet-r/{w}" if w in s["r"] else None,
              "imagenet-a": lambda w: f"imagenet-a/{w}" if w in s["a"] else None,
              "objectnet": lambda w: f"objectnet-1.0/images/{s['objectnet'][w]}" if w in s["objectnet"] else None}
    dirs = {folder[name](w) for w in classes} - {None}
    return sum(len([p for p in (root / d).iterdir() if "corrupt" not in p.name]) for d in dirs if (root / d).is_dir())


def _train(root, folder, out, *extra):
    from genrobust.cli import main

    return main(["train", "--real", f"imagefolder:{root / folder}", "--model", "test_resnet", "--epochs", "1",
                 "--batch-size", "16", "--input-size", "32", "--augmentation", "none", "--out", str(out),
                 "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def realistic_checkpoint(realistic_tree, tmp_path_factory):
    """A test_resnet trained (streamed, one epoch, 32 px) on the realistic imagenet100/train folder."""
    out = tmp_path_factory.mktemp("realistic-ckpt") / "ck"
    assert _train(realistic_tree.root, "imagenet100/train", out, "--workers", "0") == 0
    return out


@pytest.mark.parametrize("folder, workers", [("imagenet100/train", "0"), ("imagenet/train", "2")],
                         ids=["truncated-jpeg-in-process", "zero-byte-in-workers"])
def test_streamed_training_on_the_realistic_tree(realistic_tree, folder, workers, tmp_path, caplog):
    """ImageNet-like files stream: channels 3 though the first file is greyscale, every size and mode decoded,
    the one corrupt file (under 1%) skipped and named."""
    import yaml

    from genrobust import train as tr

    out = tmp_path / "ck"
    assert _train(realistic_tree.root, folder, out, "--workers", workers) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["in_chans"] == 3 and saved["input_size"] == [32, 32]
    assert json.loads((out / "classes.json").read_text()) == realistic.imagenet100_classes()
    assert tr.is_complete(out)
    (bad,) = [p for p in realistic_tree.corrupt if realistic_tree.root / folder in p.parents]
    assert bad.name in caplog.text, "the corrupt file is named where it is found"
    info = json.loads((out / "data.json").read_text())
    assert info["stream"] is True and info["num_images"] in (102, 103)


def test_training_stops_past_max_corrupt_and_names_the_files(tmp_path, capsys):
    """Three corrupt files in 105 (more than 1%): a one-line error naming them, not a crash in a worker."""
    from helpers import fails

    tree = realistic.imagefolder(tmp_path / "train", per_class=17, corrupt=3)
    line = fails(capsys, ["train", "--real", f"imagefolder:{tree.root}", "--model", "test_resnet", "--epochs", "1",
                          "--batch-size", "16", "--input-size", "32", "--workers", "0", "--out",
                          str(tmp_path / "ck"), "--device", "cpu"])
    assert "--max-corrupt" in line and any(p.name in line for p in tree.corrupt), line


def test_evaluation_on_every_imagenet_set(realistic_tree, realistic_checkpoint, tmp_path):
    """Each eval set scored on the classes it shares with an IN-100 model, every image decoded (the ObjectNet
    border cropped), with the ID counterpart of each shift on the same classes."""
    classes = realistic.imagenet100_classes()
    rows = ev.evaluate(realistic_checkpoint, list(EVAL_SETS), tmp_path / "r.jsonl", data_root=realistic_tree.root,
                       workers=0)
    got = {(r["eval_set"], r["class_subset"]): r for r in rows}
    for name in EVAL_SETS:
        (row,) = [r for (e, subset), r in got.items() if e == name and (r["role"] == "shift" or subset == "all")]
        assert row["n"] == _expected_n(name, realistic_tree.root, classes), name
        assert 0 <= row["value"] <= 1 and "unreadable" not in row
    assert got["imagenet-r", "imagenet-r"]["num_classes"] == sum(w in realistic.subsets()["r"] for w in classes)
    assert got["objectnet", "objectnet"]["num_classes"] == 2
    assert got["imagenet-val", "imagenet-r"]["role"] == "id"
    assert got["imagenet-val", "imagenet-r"]["n"] == 3 * got["imagenet-r", "imagenet-r"]["num_classes"]


def test_evaluation_skips_corrupt_files_and_names_them(realistic_checkpoint, tmp_path, caplog):
    """A truncated JPEG in val and an empty file in Sketch (each under 1% of its set): scored without them, the
    files named and counted in the rows; more than 1% is an error naming them."""
    classes = realistic.imagenet100_classes()
    root = tmp_path / "data"
    val = realistic.imagefolder(root / "imagenet/val", classes, 17, corrupt=1)
    sketch = realistic.imagefolder(root / "imagenet-sketch/sketch", classes, 17, seed=3)
    sketch.update(realistic.add_corrupt(root / "imagenet-sketch/sketch" / classes[1], classes[1], 1, start=1))
    assert set(val.corrupt.values()) == {"truncated-jpeg"} and set(sketch.corrupt.values()) == {"zero-byte"}
    rows = ev.evaluate(realistic_checkpoint, ["imagenet-val", "imagenet-sketch"], tmp_path / "r.jsonl",
                       data_root=root, workers=0)
    by = {(r["eval_set"], r["class_subset"]): r for r in rows}
    for key in (("imagenet-val", "all"), ("imagenet-sketch", "all")):
        assert by[key]["n"] == 102 and by[key]["unreadable"] == 1, by[key]
    for p in (*val.corrupt, *sketch.corrupt):
        assert p.name in caplog.text
    realistic.add_corrupt(root / "imagenet/val" / classes[2], classes[2], 1, start=2)  # 2 of 104: too many
    with pytest.raises(ValueError, match="max-corrupt") as e:
        ev.evaluate(realistic_checkpoint, ["imagenet-val"], tmp_path / "r2.jsonl", data_root=root, workers=0)
    assert "corrupt" in str(e.value)


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    import tiny_models

    root = tmp_path_factory.mktemp("realistic-sd")
    return {"sd": tiny_models.tiny_sd(root / "sd"), "variation": tiny_models.tiny_sd_variation(root / "variation"),
            "blip": tiny_models.tiny_blip(root / "blip")}


@pytest.mark.parametrize("generator, strategy", [("image-variation", "image"), ("img2img", "image-label"),
                                                 ("text2img", "captions")])
def test_source_strategies_start_from_every_kind_of_file(generator, strategy, sd_models, tmp_path, capsys):
    """Source images of every mode, size and extension (CMYK, palette, RGBA, EXIF-rotated, a PNG under .JPEG)
    each condition one generated image."""
    from genrobust.cli import main
    from genrobust.data.folder import read_jsonl

    classes = realistic.imagenet100_classes()[:2]
    src = realistic.imagefolder(tmp_path / "src", classes, len(realistic.KINDS))
    out = tmp_path / "out"
    argv = ["generate", "--generator", generator, "--model", str(sd_models["variation" if strategy == "image"
                                                                          else "sd"]),
            "--strategy", strategy, "--source", f"imagefolder:{src.root}", "--classes", ",".join(classes),
            "--per-image", "1", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
            "--out", str(out)]
    if strategy == "captions":
        argv += ["--captioner-model", str(sd_models["blip"])]
    assert main(argv) == 0, capsys.readouterr().err
    rows = read_jsonl(out / "metadata.jsonl")
    assert sorted(r["source_image"] for r in rows) == sorted(p.relative_to(src.root).as_posix() for p in src.files)
    for r in rows:
        with Image.open(out / r["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"


def test_unreadable_sources_are_given_up_and_named(sd_models, tmp_path):
    """A truncated and an empty source among 20: their requests are given up, the files named in the card."""
    from genrobust.data.folder import read_jsonl
    from genrobust.generate import create_generator, generate

    classes = realistic.imagenet100_classes()[:2]
    src = realistic.imagefolder(tmp_path / "src", classes, 9, corrupt=2)
    gen = create_generator("img2img", model=str(sd_models["sd"]), steps=2, height=32, width=32, batch_size=8)
    card = generate(gen, "image-label", classes, tmp_path / "out", per_image=1, source=f"imagefolder:{src.root}",
                    progress=False, max_corrupt=0.2)
    rows = read_jsonl(tmp_path / "out" / "metadata.jsonl")
    assert len(rows) == 18
    assert sorted(card["skipped_sources"]) == sorted(p.relative_to(src.root).as_posix() for p in src.corrupt)


def test_source_and_training_listings_open_no_image(realistic_tree, monkeypatch):
    """Issue 15: the image strategies' sources and a streamed training set are listed at start, never opened
    (every rank would read 1.28 M headers); corrupt files are found later, where they are decoded."""
    from genrobust.data.mixing import build_training_set
    from genrobust.generate.strategies import Sources

    def no_open(*args, **kwargs):
        raise AssertionError(f"listing opened an image: {args[:1]}")

    monkeypatch.setattr(Image, "open", no_open)
    train = realistic_tree.root / "imagenet100/train"
    sources = Sources(f"imagefolder:{train}")
    classes = realistic.imagenet100_classes()
    assert sum(len(sources.refs(c)) for c in classes) == 103 and not sources.skipped
    data, info = build_training_set(f"imagefolder:{train}", [str(realistic_tree.root / "retrieval/imagenet100")],
                                    stream=True)
    assert data.channels == 3 and list(data.classes) == classes and info["stream"] is True


def test_generation_stats_against_a_realistic_real_folder(realistic_tree, realistic_checkpoint, tmp_path):
    """`generate stats --real imagefolder:` reads a real folder of mixed sizes and modes (streamed at the model's
    size), skipping and naming its corrupt file; the generated folder is as genrobust writes it (RGB PNGs)."""
    from conftest import write_imagefolder
    from genrobust.generate.stats import folder_stats

    classes = realistic.imagenet100_classes()
    gen = write_imagefolder(tmp_path / "gen", classes=classes, per_class=3, size=64, mode="RGB")
    real = realistic_tree.root / "imagenet100/train"
    result = folder_stats(gen, real=f"imagefolder:{real}", classifier=realistic_checkpoint, out=tmp_path / "s.json")
    assert result["generated"]["num_images"] == 18 and result["generated"]["counts"] == dict.fromkeys(classes, 3)
    assert result["real_set"]["num_images"] == 102 and result["frechet"] is not None
    (bad,) = [p for p in realistic_tree.corrupt if real in p.parents]
    assert [pathlib.Path(p).name for p in result["real_set"]["unreadable"]] == [bad.name]


def test_generation_stats_of_a_folder_of_mixed_files(realistic_tree, realistic_checkpoint, tmp_path):
    """The folder scored need not be genrobust's own output: a retrieval folder (images gathered from the web,
    the study's retrieval control) mixes sizes and modes as real data does, and is read the same way."""
    from genrobust.generate.stats import folder_stats

    classes = realistic.imagenet100_classes()
    folder = realistic.imagefolder(tmp_path / "retrieved", classes, 3, seed=7).root
    real = realistic_tree.root / "imagenet100/train"
    result = folder_stats(folder, real=f"imagefolder:{real}", classifier=realistic_checkpoint,
                          out=tmp_path / "s.json")
    assert result["generated"]["num_images"] == 18 and result["generated"]["counts"] == dict.fromkeys(classes, 3)


def test_testset_build_from_realistic_folders(sd_models, realistic_tree, tmp_path):
    """A generated test set at paper scale: ImageNet wnids, a hand-collected folder source of mixed files, an
    img2img source from a real folder, and the real train folder (with its corrupt file) as the near-duplicate
    reference."""
    from genrobust.data.folder import read_jsonl
    from genrobust.testset import builder

    classes = realistic.imagenet100_classes()[:3]
    hand = realistic.imagefolder(tmp_path / "hand", classes, 4, seed=11)
    src = realistic.imagefolder(tmp_path / "src", classes, 3, seed=12)
    spec = {"classes": classes, "quota": 5, "real": f"imagefolder:{realistic_tree.root / 'imagenet/val'}",
            "licence": "MIT", "description": "realistic", "filters": {
                "reference": [f"imagefolder:{realistic_tree.root / 'imagenet100/train'}"]},
            "sources": [{"folder": str(hand.root)},
                        {"id": "i2i", "generator": "img2img", "strategy": "image-label", "per_image": 1, "seed": 0,
                         "source": f"imagefolder:{src.root}",
                         "params": {"model": str(sd_models["sd"]), "steps": 2, "height": 32, "width": 32}}]}
    card, built = builder.build("realistic", "v1", spec, root=tmp_path / "sets", progress=False)
    assert built
    rows = read_jsonl(tmp_path / "sets" / "realistic" / "v1" / "metadata.jsonl")
    assert {r["class_name"] for r in rows} == set(classes) and len(rows) == 3 * 5


def test_generator_finetune_on_the_realistic_train_folder(sd_models, realistic_tree, tmp_path, caplog):
    """Fine-tuning Stable Diffusion on an ImageNet-like folder (one epoch, so every file is decoded): every mode
    and size is read as RGB at the model's size, and the corrupt file is skipped and named."""
    import math

    from genrobust import finetune as ft

    losses = []
    real = realistic_tree.root / "imagenet100/train"
    out = ft.finetune("text2img", f"imagefolder:{real}", tmp_path / "ft", model=sd_models["sd"], steps=13,
                      batch_size=8, save_every=100, workers=0, progress=False, lr=1e-3, command="test",
                      callback=lambda step, loss: losses.append(loss))
    assert len(losses) == 13 and all(math.isfinite(x) for x in losses)
    card = json.loads((out / "card.json").read_text())
    assert set(card["data"]["counts"]) == set(realistic.imagenet100_classes())
    (bad,) = [p for p in realistic_tree.corrupt if real in p.parents]
    assert bad.name in caplog.text
