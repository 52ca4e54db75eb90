"""Generated test sets (`genrobust testset`): pHash, build and card, immutability, resume, verify, versions and
diff, leaderboard, benchmark of a zoo, export read back by Hugging Face `datasets` offline, and the CLI.

One version is built once for the file (`world`) from two tiny-generator sources (random weights, 2 steps) and a
hand-made folder holding a duplicate, a near-copy of a reference image and a class outside the set, so every
filter leaves out a known image.
"""
import hashlib
import json
import pathlib
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_imagefolder
from genrobust.cli import main
from genrobust.data.folder import read_jsonl
from genrobust.generate.generators import file_sha256
from genrobust.testset import builder, phash, spec, store
from helpers import fails

CLASSES = ["0", "1", "2"]


def _tiny_params(gen_dir):
    return {"path": str(gen_dir), "steps": 2, "batch_size": 8}


def _spec(gen_dir, hand, ref):
    return {"classes": CLASSES, "quota": 5, "real": "digits-mnist/test", "licence": "MIT",
            "description": "A tiny test set.", "filters": {"reference": [str(ref)]},
            "sources": [{"id": "lab", "generator": "digits-ddpm", "strategy": "label", "per_class": 3, "seed": 0,
                         "params": _tiny_params(gen_dir)},
                        {"id": "tpl", "generator": "digits-ddpm", "strategy": "templates", "per_class": 3, "seed": 1,
                         "params": _tiny_params(gen_dir)},
                        {"folder": str(hand)}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_generator_dir):
    """v1 of `tiny`: per class 3 `label` + 3 `templates` images and the folder's 2 (class 0: 3), quota 5."""
    tmp = tmp_path_factory.mktemp("testset")
    hand = write_imagefolder(tmp / "hand", classes=(*CLASSES, "x"), per_class=2, seed=5)
    shutil.copyfile(hand / "0" / "img00.png", hand / "0" / "img02.png")  # a duplicate of an earlier image
    ref = tmp / "ref"
    ref.mkdir()
    shutil.copyfile(hand / "1" / "img01.png", ref / "seen.png")  # a near-copy (here: exact) of a reference
    s = _spec(tiny_generator_dir, hand, ref)
    card, built = builder.build("tiny", "v1", s, root=tmp / "root", progress=False)
    assert built
    return types.SimpleNamespace(root=tmp / "root", path=tmp / "root" / "tiny" / "v1", spec=s, card=card,
                                 hand=hand, ref=ref, gen_dir=tiny_generator_dir, tmp=tmp)


# --- perceptual hash ---------------------------------------------------------------------------------------

def test_phash_known_values_and_matching():
    flat = Image.new("L", (28, 28), 128)
    # a flat image has only its DC coefficient above the median (0): the first bit alone
    assert phash.phash(flat) == 1 << 63
    assert phash.to_hex(phash.phash(flat)) == "8000000000000000"
    assert phash.hamming(0b1011, 0b0001).tolist() == [2]
    assert phash.hamming([0, 7], 1).tolist() == [1, 2]

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    brighter = np.clip(a.astype(int) + 6, 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    ha, hb, ho = (phash.phash(Image.fromarray(x)) for x in (a, brighter, other))
    assert phash.hamming(ha, hb)[0] <= 2 < phash.hamming(ha, ho)[0]

    # greedy in order: 1 duplicates 0; 2 is near 1 only, which was left out, so 2 stays; 4 duplicates 0
    hashes = [0b0, 0b1, 0b11, 0b111 << 40, 0b10]
    assert phash.first_duplicates(hashes, 1).tolist() == [-1, 0, -1, -1, 0]
    # an image already left out (keep False) makes nothing a duplicate: now 1 stays and 2 duplicates it
    assert phash.first_duplicates(hashes, 1, keep=[False, True, True, True, True]).tolist() == [-1, -1, 1, -1, -1]
    refs = [1 << 50 | 0b110, 0b11, 0b0]
    idx, dist = phash.nearest([0b1, 1 << 51 | refs[0], 0b111 << 20], refs, max_distance=1)
    # the closest reference within the distance (a tie goes to the lower index), else -1
    assert idx.tolist() == [1, 0, -1] and dist.tolist() == [1, 1, -1]


# --- build and card ----------------------------------------------------------------------------------------

def test_card_is_complete(world):
    card, path = world.card, world.path
    assert card == store.read_card(path)
    assert card["counts"] == {"0": 5, "1": 5, "2": 5} and card["num_images"] == 15
    assert card["classes"] == CLASSES and card["real"] == "digits-mnist/test" and card["licence"] == "MIT"
    assert card["inputs_sha256"] == spec.inputs_sha256(card["inputs"])

    lab, tpl, hand = card["sources"]
    revision = file_sha256(world.gen_dir / "unet" / "diffusion_pytorch_model.safetensors")
    for s, strategy, seed in ((lab, "label", 0), (tpl, "templates", 1)):
        assert (s["generator"], s["revision"], s["strategy"], s["seed"], s["per_class"]) == \
               ("digits-ddpm", revision, strategy, seed, 3)
        assert s["prompt_templates"] == {"label": "a handwritten digit {}.",
                                         "templates": ["a handwritten digit {}.", "a printed digit {}."]}
        assert s["generator_config"]["steps"] == 2 and s["candidates"] == 9
    assert hand["kind"] == "folder" and hand["id"] == "hand"
    assert hand["content_sha256"] == spec.folder_content_sha256(world.hand)

    f = card["filters"]
    assert f["near_copies"]["left_out"] == {"1": 1}
    assert f["near_copies"]["reference_images"] == {str(world.ref): 1} and f["near_copies"]["max_distance"] == 2
    assert f["duplicates"]["left_out"] == {"0": 1}
    assert f["quota"] == {"per_class": 5, "left_out": {"0": 3, "1": 2, "2": 3}, "short": {}}
    assert f["outside_classes"] == {"x": 2} and f["clip"] is None

    on_disk = {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in path.rglob("*") if p.is_file() and p.name != "card.json"}
    assert card["files"] == on_disk
    assert card["content_sha256"] == store.content_sha256(on_disk)

    rows = read_jsonl(path / "metadata.jsonl")
    assert [r["file_name"] for r in rows if r["class_name"] == "0"] == [
        "0/lab-0000_000000.png", "0/tpl-0000_000000.png", "0/hand-img00.png", "0/lab-0000_000001.png",
        "0/tpl-0000_000001.png"]
    assert all(r["label"] == r["class_id"] == CLASSES.index(r["class_name"]) and len(r["phash"]) == 16 for r in rows)
    generated = [r for r in rows if r["source"] in ("lab", "tpl")]
    assert all(r["prompt"] and isinstance(r["seed"], int) and r["steps"] == 2 for r in generated)

    left = read_jsonl(path / "filtered.jsonl")
    dup = [r for r in left if r["reason"] == "duplicate"]
    assert [(r["file_name"], r["of"], r["distance"]) for r in dup] == [("0/hand-img02.png", "0/hand-img00.png", 0)]
    assert [r["reference"] for r in left if r["reason"] == "near_copy"] == [f"{world.ref}:seen.png"]

    readme = (path / "README.md").read_text()
    assert readme.startswith("---\nlicense: mit\n")
    for text in (card["content_sha256"], "digits-mnist/test", "| lab |", "| hand |", "Bansal", "@misc{tiny_v1"):
        assert text in readme, text


def test_built_version_is_immutable(world):
    before = store.file_hashes(world.path)
    card, built = builder.build("tiny", "v1", world.spec, root=world.root, progress=False)
    assert not built and card == world.card
    assert store.file_hashes(world.path) == before
    with pytest.raises(ValueError, match=r"already built from other inputs \(they differ in: quota\).*immutable.*"
                                         r"--version v2 --based-on v1"):
        builder.build("tiny", "v1", {**world.spec, "quota": 4}, root=world.root, progress=False)
    assert not (world.root / "tiny" / ".v1.partial").exists()
    # the files of a built version are read-only (mode bits: root would write through them anyway)
    assert all(p.stat().st_mode & 0o222 == 0 for p in world.path.rglob("*") if p.is_file())


def test_killed_build_resumes_from_staging(tmp_path, tiny_generator_dir, monkeypatch):
    from genrobust.generate.generators import DigitsDDPM

    s = {"classes": CLASSES, "sources": [{"generator": "digits-ddpm", "per_class": 2,
                                          "params": _tiny_params(tiny_generator_dir)}]}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill between generation and the final write

    monkeypatch.setattr(builder, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        builder.build("r", "v1", s, root=tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "r" / "v1").exists()
    assert len(list((tmp_path / "a" / "r" / ".v1.partial" / "staging").glob("*/*/*.png"))) == 6
    monkeypatch.undo()

    calls = []
    original = DigitsDDPM.generate
    monkeypatch.setattr(DigitsDDPM, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    resumed, built = builder.build("r", "v1", s, root=tmp_path / "a", progress=False)
    assert built and calls == []  # nothing generated again
    assert not (tmp_path / "a" / "r" / ".v1.partial").exists()
    fresh, _ = builder.build("r", "v1", s, root=tmp_path / "b", progress=False)
    assert resumed["content_sha256"] == fresh["content_sha256"] and len(calls) == 1


def test_verify_catches_changed_missing_and_extra_files(world, tmp_path, capsys):
    copy = tmp_path / "tiny" / "v1"
    shutil.copytree(world.path, copy)
    for p in copy.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert store.verify(copy)["ok"]

    image = "1/tpl-0001_000000.png"
    data = bytearray((copy / image).read_bytes())
    data[-20] ^= 1
    (copy / image).write_bytes(bytes(data))
    result = store.verify(copy)
    assert (result["ok"], result["changed"], result["missing"], result["extra"]) == (False, [image], [], [])
    assert image in fails(capsys, ["testset", "verify", str(copy)])

    (copy / "2" / "lab-0002_000000.png").unlink()
    (copy / "notes.txt").write_text("hi")
    result = store.verify(copy)
    assert result["missing"] == ["2/lab-0002_000000.png"] and result["extra"] == ["notes.txt"]

    # a card edited to match a changed image no longer matches its own fingerprint
    card = json.loads((copy / "card.json").read_text())
    card["files"][image] = hashlib.sha256(bytes(data)).hexdigest()
    (copy / "card.json").write_text(json.dumps(card))
    assert not store.verify(copy)["fingerprint_ok"]


# --- versions ----------------------------------------------------------------------------------------------

V2 = {"based_on": "v1", "quota": 6, "remove_classes": ["2"], "regenerate_classes": ["1"],
      "sources": [{"id": "more", "generator": "digits-ddpm", "strategy": "templates", "per_class": 2, "seed": 5,
                   "classes": ["0", "1", "3"]}]}


def test_derived_version_diff_and_changelog(world, capsys):
    s = {**V2, "sources": [{**V2["sources"][0], "params": _tiny_params(world.gen_dir)}]}
    card, built = builder.build("tiny", "v2", s, root=world.root, progress=False)
    assert built and card["classes"] == ["0", "1", "3"] and card["counts"] == {"0": 6, "1": 2, "3": 2}
    d = store.diff(world.path, world.root / "tiny" / "v2")
    expect = {"0": {"before": 5, "after": 6, "kept": 5, "added": 1, "removed": 0, "changed": 0, "status": "changed"},
              "1": {"before": 5, "after": 2, "kept": 0, "added": 2, "removed": 5, "changed": 0,
                    "status": "regenerated"},
              "2": {"before": 5, "after": 0, "kept": 0, "added": 0, "removed": 5, "changed": 0, "status": "removed"},
              "3": {"before": 0, "after": 2, "kept": 0, "added": 2, "removed": 0, "changed": 0, "status": "added"}}
    assert d["per_class"] == expect
    assert d["total"] == {"before": 15, "after": 10, "kept": 5, "added": 5, "removed": 10, "changed": 0}
    assert (d["classes_added"], d["classes_removed"]) == (["3"], ["2"])
    assert card["changes"]["per_class"] == expect and card["based_on"]["content_sha256"] == world.card["content_sha256"]
    assert card["changes"]["left_out_from_base"] == {"removed": 10}
    assert [s["id"] for s in card["sources"]] == ["lab", "tpl", "hand", "more"]
    assert [s["kept"] for s in card["sources"]] == [2, 2, 1, 5]
    assert {r["added_in"] for r in read_jsonl(world.root / "tiny" / "v2" / "metadata.jsonl")} == {"v1", "v2"}

    log = (world.root / "tiny" / "v2" / "CHANGELOG.md").read_text()
    for line in ("- images: 15 -> 10 (5 added, 10 removed, 5 kept unchanged)", "- classes added: 3",
                 "- classes removed: 2", "- classes regenerated (every image replaced): 1",
                 "| 1 | regenerated | 5 | 5 | 2 | 0 | 2 |", "| **total** | | 15 | 10 | 5 | 0 | 10 |"):
        assert line in log, line
    assert main(["testset", "diff", "tiny", "v1", "v2", "--root", str(world.root)]) == 0
    out = capsys.readouterr().out
    assert "tiny/v1 -> tiny/v2: 15 -> 10 images (5 added, 10 removed, 0 changed, 5 kept)" in out
    assert "| 0 | changed | 5 | 0 | 1 | 0 | 6 |" in out


def test_spec_errors_name_the_input(world):
    base = world.card
    with pytest.raises(ValueError, match="remove_classes needs --based-on"):
        spec.resolve({"remove_classes": ["1"], "sources": [{"per_class": 1}]}, "t", "v1")
    with pytest.raises(ValueError, match="source id 'lab' is already used by an earlier version"):
        spec.resolve({"based_on": "v1", "sources": [{"id": "lab", "per_class": 1}]}, "tiny", "v3", base)
    with pytest.raises(ValueError, match=r"regenerate_classes \['2'\]: no source generates them"):
        spec.resolve({"based_on": "v1", "regenerate_classes": ["2"],
                      "sources": [{"per_class": 1, "classes": ["0"]}]}, "tiny", "v3", base)
    with pytest.raises(ValueError, match="source 1: unknown key 'per_clas'"):
        spec.resolve({"sources": [{"per_clas": 1}]}, "t", "v1")
    with pytest.raises(ValueError, match="filter duplicates is a Hamming distance"):
        spec.resolve({"filters": {"duplicates": 99}, "sources": [{"per_class": 1, "classes": ["0"]}]}, "t", "v1")


def test_from_expands_folders_and_reads_specs(tmp_path):
    study = tmp_path / "study"
    for cell in ("label-1234", "templates-5678"):
        write_imagefolder(study / "generated" / cell, classes=("0",), per_class=1)
        (study / "generated" / cell / "metadata.jsonl").write_text(
            json.dumps({"file_name": "0/img00.png", "class_name": "0"}) + "\n")
    (study / "models").mkdir()
    plain = write_imagefolder(tmp_path / "plain", classes=("0",), per_class=1)
    (tmp_path / "v.yaml").write_text("quota: 5\nsources:\n  - {strategy: label, per_class: 2}\n")
    merged = spec.read_from([str(study), str(plain), str(tmp_path / "v.yaml")])
    assert merged == {"quota": 5, "sources": [{"folder": str(study / "generated" / "label-1234")},
                                              {"folder": str(study / "generated" / "templates-5678")},
                                              {"folder": str(plain)}, {"strategy": "label", "per_class": 2}]}
    (tmp_path / "study.yaml").write_text("name: s\nstrategies: [label]\n")
    with pytest.raises(ValueError, match="looks like a study config"):
        spec.read_from([str(tmp_path / "study.yaml")])
    with pytest.raises(ValueError, match="not a generated folder"):
        spec.read_from([str(study / "models")])


def test_clip_filter_leaves_out_low_scores(tmp_path):
    import tiny_models
    from genrobust.generate.filters import ClipScorer

    clip_dir = tiny_models.tiny_clip(tmp_path / "clip")
    hand = write_imagefolder(tmp_path / "hand", classes=CLASSES, per_class=3, size=32, mode="RGB", seed=3)
    files = sorted(hand.rglob("*.png"))
    scores = ClipScorer(clip_dir).score([Image.open(f).convert("RGB") for f in files],
                                        [f"a photo of a {f.parent.name}." for f in files])
    threshold = sum(sorted(scores)[1:3]) / 2  # the two lowest fall under it
    s = {"sources": [{"folder": str(hand)}], "filters": {"clip_model": str(clip_dir), "clip_threshold": threshold}}
    card, _ = builder.build("c", "v1", s, root=tmp_path / "root", progress=False)
    path = tmp_path / "root" / "c" / "v1"
    low = {f"{f.parent.name}/hand-{f.name}" for f, v in zip(files, scores) if v < threshold}
    assert len(low) == 2
    assert {r["file_name"] for r in read_jsonl(path / "filtered.jsonl") if r["reason"] == "clip"} == low
    assert sum(card["filters"]["clip"]["left_out"].values()) == 2 and card["num_images"] == 7
    recorded = {r["file_name"]: r["clip_score"] for r in read_jsonl(path / "metadata.jsonl")}
    expect = {f"{f.parent.name}/hand-{f.name}": round(v, 4) for f, v in zip(files, scores) if v >= threshold}
    assert recorded == pytest.approx(expect, abs=1e-3)


# --- benchmark ---------------------------------------------------------------------------------------------

def test_leaderboard_ordering_ranks_and_drop():
    from genrobust.testset.bench import leaderboard

    def rows(model, gen, real):
        base = {"model": model, "checkpoint": f"ck/{model}", "metric": "top1", "class_subset": "all"}
        return [{**base, "eval_set": "g/v1", "value": gen}, {**base, "eval_set": "real", "value": real, "role": "id"},
                {**base, "eval_set": "other", "value": 0.99, "role": "id"}]

    data = [*rows("a", 0.70, 0.95), *rows("b", 0.80, 0.90), *rows("c", 0.70, 0.97), *rows("d", 0.60, 0.99)]
    got = [(e["rank"], e["model"], e["real_rank"], e["rank_change"], round(e["drop"], 6))
           for e in leaderboard(data, "g/v1", "real")]
    # sorted by generated accuracy; a tie shares a rank (c before a: higher real accuracy)
    assert got == [(1, "b", 4, 3, 0.1), (2, "c", 2, 0, 0.27), (2, "a", 3, 1, 0.25), (4, "d", 1, -3, 0.39)]


def test_imagenet_class_names_map_to_wnids():
    from genrobust.testset.bench import targets

    # a set named by words is scored against a model that predicts wnids; a name it lacks stays as it is
    assert targets(["goldfish", "n01440764", "0"], ["n01440764", "n01443537"]) == (
        ("n01443537",), ("n01440764",), ("0",))


def test_benchmark_zoo_through_the_cli(world, trained, tmp_path, capsys, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from genrobust.data import load_dataset
    from genrobust.data.folder import export_imageset
    from genrobust.evaluate import check_rows, masked_predictions
    from genrobust.testset import bench, load_testset
    from genrobust.train import load_checkpoint, predict

    zoo = tmp_path / "zoo"
    for name in ("ck-a", "ck-b"):
        shutil.copytree(trained["out"], zoo / "models" / name)
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    save_file(net.state_dict(), tmp_path / "tiny.safetensors")
    (tmp_path / "classes.json").write_text(json.dumps([str(i) for i in range(10)]))
    test = load_dataset("digits-mnist/test")
    real = export_imageset(test.subset(list(range(40)), name="real40"), tmp_path / "real")
    out = tmp_path / "bench"
    weights = f"timm:test_resnet={tmp_path}/tiny.safetensors"
    assert main(["testset", "evaluate", "tiny/v1", "--models", str(zoo), weights,
                 "--timm-classes", str(tmp_path / "classes.json"), "--real", f"imagefolder:{real}",
                 "--root", str(world.root), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out

    rows = read_jsonl(out / "results.jsonl")
    kept, warnings = check_rows(rows)
    assert len(kept) == 6 and warnings == []
    assert {(r["model"], r["eval_set"], r["role"]) for r in rows} == {
        (m, s, role) for m in ("ck-a", "ck-b", "test_resnet") for s, role in (("tiny/v1", "shift"),
                                                                              (f"imagefolder:{real}", "id"))}
    n_real = sum(1 for y in test.labels[:40].tolist() if y < 3)
    assert {r["n"] for r in rows if r["role"] == "id"} == {n_real}
    assert {r["class_subset"] for r in rows} == {"tiny/v1"}  # scored on the set's 3 classes of 10

    model, _, _ = load_checkpoint(zoo / "models" / "ck-a")
    ds = load_testset(world.path)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    expect = (masked_predictions(predict(model, images), mask) == torch.tensor(ds.targets)).float().mean().item()
    got = {r["model"]: r["value"] for r in rows if r["eval_set"] == "tiny/v1"}
    assert got["ck-a"] == got["ck-b"] == round(expect, 6)

    board = json.loads((out / "leaderboard.json").read_text())["entries"]
    assert [e["generated"] for e in board] == sorted(got.values(), reverse=True)
    assert {e["model"] for e in board} == {"ck-a", "ck-b", "test_resnet"}
    assert "| rank | model | generated (%) | real (%) | drop (points) | real rank | rank change |" in stdout
    html = (out / "leaderboard.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert (out / "accuracy_on_the_line.png").read_bytes().startswith(b"\x89PNG")

    def rescored(*args, **kwargs):
        raise AssertionError("a model already in results.jsonl was scored again")

    monkeypatch.setattr(bench, "score_model", rescored)
    entries, _ = bench.benchmark(world.path, [str(zoo)], out=out, real=f"imagefolder:{real}", progress=False)
    assert [e["model"] for e in entries] == ["ck-a", "ck-b"]  # a tie: then by name


# --- loading and export ------------------------------------------------------------------------------------

def test_export_loads_with_datasets_offline(world, tmp_path, monkeypatch):
    import genrobust
    from genrobust.testset import export

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    out = export(world.path, tmp_path / "hf")
    splits = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))  # the card's YAML names the split
    assert list(splits) == ["test"]
    ds = splits["test"]
    assert ds.num_rows == 15
    assert sorted(zip(ds["class_name"], ds["label"])) == [(c, CLASSES.index(c)) for c in CLASSES for _ in range(5)]

    ours = genrobust.load_testset("tiny/v1", root=world.root, verify=True)
    assert len(ours) == 15 and ours.classes == CLASSES
    image, label = ours[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and label == 0

    def digest(a):
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    hf = sorted((digest(np.asarray(r["image"])), r["label"]) for r in ds)
    mine = sorted((digest(ours[i][0][0].numpy()), ours[i][1]) for i in range(len(ours)))
    assert hf == mine
    batch = next(iter(torch.utils.data.DataLoader(ours, batch_size=4)))
    assert batch[0].shape == (4, 1, 28, 28)

    with pytest.raises(ValueError, match="is not empty"):
        export(world.path, out)
    (out / "metadata.jsonl").write_text("")  # the export is a writable copy; the version is untouched
    assert store.verify(world.path)["ok"]


def test_cli_build_list_verify(tmp_path, tiny_generator_dir, capsys):
    root = str(tmp_path / "root")
    argv = ["testset", "build", "cli", "--version", "v1", "--classes", "0,1", "--per-class", "2", "--steps", "2",
            "--batch-size", "8", "--generator-path", str(tiny_generator_dir), "--licence", "CC-BY-4.0",
            "--duplicates", "off", "--root", root, "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert "built cli/v1: 4 images in 2 classes" in capsys.readouterr().out
    assert main(argv) == 0
    assert "already built from these inputs" in capsys.readouterr().out
    card = store.read_card(pathlib.Path(root) / "cli" / "v1")
    assert card["filters"]["duplicates"] is None and card["licence"] == "CC-BY-4.0"
    assert card["sources"][0]["id"] == "label-s0" and card["real"] == "digits-mnist/test"

    assert main(["testset", "list", "--root", root]) == 0
    assert "cli/v1: 4 images, 2 classes, real digits-mnist/test" in capsys.readouterr().out
    assert main(["testset", "verify", "cli", "--root", root]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert "no test set 'nope'" in fails(capsys, ["testset", "verify", "nope", "--root", root])
    assert "built: v1" in fails(capsys, ["testset", "evaluate", "cli/v9", "--models", "x", "--root", root])
    assert "--based-on v0: cli has no built version v0" in fails(
        capsys, ["testset", "build", "cli", "--version", "v2", "--based-on", "v0", "--root", root])
    # a source flag without a flag source would be ignored: it is refused instead
    assert "--steps describes a generated source from flags" in fails(
        capsys, ["testset", "build", "cli", "--version", "v2", "--based-on", "v1", "--steps", "5", "--root", root])
