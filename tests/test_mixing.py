import json
import pathlib

import pytest
import torch

from genrobust.data.folder import load_imagefolder
from genrobust.data.imageset import ImageSet
from genrobust.data.mixing import (FileSet, balanced_counts, build_training_set, mix_add, mix_generated_only,
                                   mix_replace, proportional_counts)

CLASSES = ["a", "b", "c", "d"]


def _set(name, per_class, classes=CLASSES, prefix=None):
    """An ImageSet with `per_class[i]` images of class i; each image has a unique `source`."""
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    n = len(labels)
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageSet(name, images, torch.tensor(labels, dtype=torch.long), list(classes),
                    {"source": [f"{prefix or name}:{i}" for i in range(n)]})


REAL = _set("real", [5, 5, 5, 5])
GEN = _set("gen", [12, 12, 12, 12])


# --- balanced_counts ---------------------------------------------------------------------------------

def test_balanced_counts_exact():
    # remainder classes come from torch.randperm under the given generator (pinned torch)
    assert balanced_counts(23, 10, torch.Generator().manual_seed(0)) == [2, 3, 2, 2, 3, 2, 2, 3, 2, 2]
    assert balanced_counts(10, 4, torch.Generator().manual_seed(0)) == [3, 3, 2, 2]
    assert balanced_counts(3, 5, torch.Generator().manual_seed(1)) == [1, 0, 1, 0, 1]
    assert balanced_counts(20, 4, torch.Generator().manual_seed(0)) == [5, 5, 5, 5]
    assert balanced_counts(0, 3, torch.Generator().manual_seed(0)) == [0, 0, 0]


@pytest.mark.parametrize("total,k", [(1, 7), (99, 10), (1000, 3)])
def test_balanced_counts_sum_and_spread(total, k):
    counts = balanced_counts(total, k, torch.Generator().manual_seed(5))
    assert sum(counts) == total and max(counts) - min(counts) <= 1


def test_proportional_counts_exact():
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    # equal sizes: the same draw and result as balanced_counts
    assert proportional_counts(10, [5, 5, 5, 5], g(0)) == balanced_counts(10, 4, g(0)) == [3, 3, 2, 2]
    assert proportional_counts(23, [1] * 10, g(0)) == balanced_counts(23, 10, g(0))
    # exact shares need no tie-break: 5 of 20 over classes of 8, 4, 4, 4
    assert proportional_counts(5, [8, 4, 4, 4], g(0)) == [2, 1, 1, 1]
    # 6 over 10, 5, 5: floors 3, 1, 1; the one left goes to class 1 or 2 (equal remainders), by seed:
    # randperm(3) is [2, 0, 1] under seed 0 and [1, 2, 0] under seed 1
    assert proportional_counts(6, [10, 5, 5], g(0)) == [3, 1, 2]
    assert proportional_counts(6, [10, 5, 5], g(1)) == [3, 2, 1]
    assert proportional_counts(7, [3, 0, 4], g(0)) == [3, 0, 4]
    assert proportional_counts(0, [0, 0], g(0)) == [0, 0]


# --- mix_add -----------------------------------------------------------------------------------------

def test_ratio_zero_is_the_real_set():
    mixed, counts = mix_add(REAL, GEN, 0.0)
    assert torch.equal(mixed.images, REAL.images) and torch.equal(mixed.labels, REAL.labels)
    assert mixed.meta["origin"] == ["real"] * 20
    assert counts == {"real": dict.fromkeys(CLASSES, 5), "generated": dict.fromkeys(CLASSES, 0)}
    assert mix_add(REAL, None, 0)[0].meta["origin"] == ["real"] * 20


@pytest.mark.parametrize("ratio,expected", [
    (0.5, [3, 3, 2, 2]),  # round(0.5 * 20) = 10 over 4 classes; remainder by seed (see balanced_counts)
    (1, [5, 5, 5, 5]),
    (2, [10, 10, 10, 10]),
])
def test_mix_add_counts(ratio, expected):
    mixed, counts = mix_add(REAL, GEN, ratio, seed=0)
    assert len(mixed) == 20 + round(ratio * 20) == 20 + sum(expected)
    assert counts["real"] == dict.fromkeys(CLASSES, 5)
    assert counts["generated"] == dict(zip(CLASSES, expected))
    origin = mixed.meta["origin"]
    assert origin == ["real"] * 20 + ["generated"] * sum(expected)
    # real images come first and unchanged
    assert torch.equal(mixed.images[:20], REAL.images) and mixed.meta["source"][:20] == REAL.meta["source"]
    gen_sources = mixed.meta["source"][20:]
    assert len(set(gen_sources)) == len(gen_sources)  # without replacement
    assert all(s.startswith("gen:") for s in gen_sources)
    # each drawn image keeps its own label
    for s, y in zip(gen_sources, mixed.labels[20:].tolist()):
        assert int(GEN.labels[int(s.split(":")[1])]) == y
    assert mixed.classes == CLASSES


def test_same_seed_same_selection_other_seed_differs():
    a = mix_add(REAL, GEN, 1, seed=3)[0].meta["source"]
    b = mix_add(REAL, GEN, 1, seed=3)[0].meta["source"]
    c = mix_add(REAL, GEN, 1, seed=4)[0].meta["source"]
    assert a == b
    assert a != c and sorted(a) != sorted(c)  # a different subset, not only another order


def test_all_of_a_class_is_drawn_when_needed():
    mixed, _ = mix_add(REAL, _set("gen", [5, 5, 5, 5]), 1, seed=0)
    assert sorted(mixed.meta["source"][20:]) == sorted(f"gen:{i}" for i in range(20))


def test_generated_classes_are_aligned_by_name():
    gen = _set("gen", [6, 6, 6, 6], classes=["d", "c", "b", "a"])
    mixed, counts = mix_add(REAL, gen, 1, seed=0)
    assert counts["generated"] == dict.fromkeys(CLASSES, 5)
    for s, y in zip(mixed.meta["source"][20:], mixed.labels[20:].tolist()):
        assert CLASSES[y] == gen.classes[int(gen.labels[int(s.split(":")[1])])]


def test_negative_ratio_raises():
    with pytest.raises(ValueError, match="--ratio must be >= 0"):
        mix_add(REAL, GEN, -0.5)


def test_positive_ratio_without_generated_raises():
    with pytest.raises(ValueError, match="needs generated data"):
        mix_add(REAL, None, 1)


def test_too_few_generated_images_names_the_class():
    gen = _set("gen", [12, 2, 12, 12])
    with pytest.raises(ValueError, match="gen has 2 images of class 'b' but ratio 1 needs 5"):
        mix_add(REAL, gen, 1)


# --- build_training_set ------------------------------------------------------------------------------

@pytest.fixture
def generated_folder(tmp_path, tiny_generator):
    """A generated folder written by the runner: classes 0, 1, 2; 4 images each."""
    from genrobust.generate import generate

    out = tmp_path / "gen-label"
    generate(tiny_generator, "label", ["0", "1", "2"], out, per_class=4, seed=0, progress=False)
    return out


def test_build_training_set_real_plus_generated(tiny_images, generated_folder):
    real = tiny_images("real", classes=("0", "1", "2"), per_class=4)
    data, info = build_training_set(f"imagefolder:{real}", [generated_folder], ratio=1.0, seed=0)
    assert len(data) == 24
    assert data.classes == ["0", "1", "2"]
    assert data.meta["origin"] == ["real"] * 12 + ["generated"] * 12
    assert info["mode"] == "add" and info["ratio"] == 1.0 and info["seed"] == 0
    assert info["counts"] == {"real": {"0": 4, "1": 4, "2": 4}, "generated": {"0": 4, "1": 4, "2": 4}}
    assert info["generated"] == [str(generated_folder)]
    assert info["label"] == f"imagefolder:{real} + 1x gen-label"
    manifest = {r["file_name"]: r for r in map(json.loads, (generated_folder / "metadata.jsonl").open())}
    for f, y in zip(data.meta["file_name"][12:], data.labels[12:].tolist()):
        assert manifest[f]["class_name"] == data.classes[y]
    json.dumps(info)  # data.json must be able to hold it


def test_build_training_set_converts_generated_to_the_recipes_channels(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=2)
    gen = tiny_images("gen-rgb", classes=("1", "0"), per_class=2, mode="RGB")
    data, info = build_training_set(f"imagefolder:{real}", [gen], ratio=0.5, seed=1, channels=1)
    assert tuple(data.images.shape) == (6, 1, 28, 28)
    assert info["counts"]["generated"] == {"0": 1, "1": 1}
    # without a recipe or a card that says otherwise, a folder is RGB: never the first image's mode
    data, _ = build_training_set(f"imagefolder:{real}", [gen], ratio=0.5, seed=1)
    assert tuple(data.images.shape) == (6, 3, 28, 28)
    (real / "dataset_card.json").write_text(json.dumps({"channels": 1}))
    data, _ = build_training_set(f"imagefolder:{real}", [gen], ratio=0.5, seed=1)
    assert tuple(data.images.shape) == (6, 1, 28, 28)


def test_build_training_set_pools_several_folders(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=2)
    g1 = tiny_images("g1", classes=("0",), per_class=2)
    g2 = tiny_images("g2", classes=("1",), per_class=2)
    data, info = build_training_set(f"imagefolder:{real}", [g1, g2], ratio=1.0, seed=0)
    assert info["counts"]["generated"] == {"0": 2, "1": 2}
    assert info["label"].endswith("1x g1+g2")


def test_build_training_set_generated_only(generated_folder):
    data, info = build_training_set(None, [generated_folder], ratio=0.25)
    assert len(data) == 12 and data.meta["origin"] == ["generated"] * 12
    assert info["mode"] == "generated-only" and info["real"] is None
    assert info["counts"] == {"real": {}, "generated": {"0": 4, "1": 4, "2": 4}}
    assert torch.equal(data.images, load_imagefolder(generated_folder).images)


def test_build_training_set_real_only(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=2)
    data, info = build_training_set(f"imagefolder:{real}", [], ratio=1.0)
    assert len(data) == 4 and info["mode"] == "real-only" and info["ratio"] == 0.0
    assert info["label"] == f"imagefolder:{real}"


def test_build_training_set_needs_data():
    with pytest.raises(ValueError, match="no training data"):
        build_training_set(None, [])


# --- mix_replace -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction,generated", [
    (0.5, [3, 3, 2, 2]),  # 10 of 20 over equal classes: the balanced_counts of seed 0
    (0.25, [2, 1, 1, 1]),  # 5 of 20: the remainder 1 to the class picked by seed
    (1, [5, 5, 5, 5]),
])
def test_mix_replace_counts(fraction, generated):
    mixed, counts = mix_replace(REAL, GEN, fraction, seed=0)
    assert len(mixed) == len(REAL) == 20
    assert counts["generated"] == dict(zip(CLASSES, generated))
    assert counts["real"] == dict(zip(CLASSES, [5 - n for n in generated]))
    assert mixed.counts() == dict.fromkeys(CLASSES, 5)  # every class keeps its real size
    n_real = 20 - sum(generated)
    assert mixed.meta["origin"] == ["real"] * n_real + ["generated"] * sum(generated)
    real_sources = mixed.meta["source"][:n_real]
    # kept real images: in their original order, each with its own label
    assert real_sources == sorted(real_sources, key=lambda s: int(s.split(":")[1]))
    for s, y in zip(real_sources, mixed.labels[:n_real].tolist()):
        assert int(REAL.labels[int(s.split(":")[1])]) == y
    gen_sources = mixed.meta["source"][n_real:]
    assert len(set(gen_sources)) == len(gen_sources) and all(s.startswith("gen:") for s in gen_sources)


def test_mix_replace_keeps_an_unbalanced_class_distribution():
    real = _set("real", [8, 4, 4, 4])
    mixed, counts = mix_replace(real, GEN, 0.25, seed=0)
    assert counts == {"real": {"a": 6, "b": 3, "c": 3, "d": 3}, "generated": {"a": 2, "b": 1, "c": 1, "d": 1}}
    assert mixed.counts() == real.counts()


def test_mix_replace_drops_real_images_by_seed():
    a = mix_replace(REAL, GEN, 0.5, seed=0)[0].meta["source"]
    assert a == mix_replace(REAL, GEN, 0.5, seed=0)[0].meta["source"]
    b = mix_replace(REAL, GEN, 0.5, seed=1)[0].meta["source"]
    assert set(s for s in a if s.startswith("real")) != set(s for s in b if s.startswith("real"))


def test_mix_replace_zero_and_bad_fractions():
    mixed, counts = mix_replace(REAL, GEN, 0)
    assert torch.equal(mixed.images, REAL.images) and counts["generated"] == dict.fromkeys(CLASSES, 0)
    assert mix_replace(REAL, None, 0)[0].meta["origin"] == ["real"] * 20
    with pytest.raises(ValueError, match=r"--fraction must be in \[0, 1\]"):
        mix_replace(REAL, GEN, 1.5)
    with pytest.raises(ValueError, match="needs generated data"):
        mix_replace(REAL, None, 0.5)
    with pytest.raises(ValueError, match="gen has 2 images of class 'b' but fraction 1 needs 5"):
        mix_replace(REAL, _set("gen", [12, 2, 12, 12]), 1)


# --- mix_generated_only ------------------------------------------------------------------------------

def test_mix_generated_only_all_or_a_limit():
    mixed, counts = mix_generated_only(GEN)
    assert len(mixed) == 48 and counts == {"real": dict.fromkeys(CLASSES, 0), "generated": dict.fromkeys(CLASSES, 12)}
    mixed, counts = mix_generated_only(GEN, limit=10, seed=0)
    assert counts["generated"] == dict(zip(CLASSES, [3, 3, 2, 2])) and len(set(mixed.meta["source"])) == 10
    assert mix_generated_only(GEN, limit=10, seed=0)[0].meta["source"] == mixed.meta["source"]
    with pytest.raises(ValueError, match="gen has 12 images of class 'a' but --limit 52 needs 13"):
        mix_generated_only(GEN, limit=52)
    with pytest.raises(ValueError, match=r"gen has no images of classes \['c'\]"):
        mix_generated_only(_set("gen", [3, 3, 0, 3]))


# --- build_training_set: modes, folders, streaming, bad input ----------------------------------------

def test_build_training_set_replace_mode(tiny_images):
    real = tiny_images("real", classes=("0", "1", "2"), per_class=4)
    gen = tiny_images("gen", classes=("2", "1", "0"), per_class=3)
    data, info = build_training_set(f"imagefolder:{real}", [gen], mode="replace", fraction=0.25, seed=0)
    assert len(data) == 12 and info["mode"] == "replace" and info["fraction"] == 0.25
    # 3 of 12 generated: one per class, exactly
    assert info["counts"] == {"real": {"0": 3, "1": 3, "2": 3}, "generated": {"0": 1, "1": 1, "2": 1}}
    assert info["num_images"] == 12 and info["stream"] is False
    for f, y in zip(data.meta["file_name"][9:], data.labels[9:].tolist()):
        assert f.split("/")[0] == data.classes[y]  # aligned by class name, not folder order


def test_build_training_set_generated_only_with_real_classes(tiny_images):
    real = tiny_images("real", classes=("0", "1", "2", "3"), per_class=1)
    gen = tiny_images("gen", classes=("3", "0", "1", "2"), per_class=3)
    data, info = build_training_set(f"imagefolder:{real}", [gen], mode="generated-only", limit=6, seed=0)
    assert data.classes == ["0", "1", "2", "3"] and info["mode"] == "generated-only"
    assert data.meta["origin"] == ["generated"] * 6
    assert info["counts"] == {"real": dict.fromkeys("0123", 0), "generated": {"0": 2, "1": 2, "2": 1, "3": 1}}
    with pytest.raises(ValueError, match=r"has no images of classes \['3'\]"):
        build_training_set(f"imagefolder:{real}", [tiny_images("g3", classes=("0", "1", "2"))],
                           mode="generated-only")


def test_build_training_set_several_folders_counts_per_folder(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=4)
    g1 = tiny_images("g1", classes=("0", "1"), per_class=4, seed=1)
    g2 = tiny_images("g2", classes=("1", "0"), per_class=4, seed=2)
    data, info = build_training_set(f"imagefolder:{real}", [g1, g2], ratio=2.0, seed=0)
    assert info["counts"]["generated"] == {"0": 8, "1": 8}  # every image of both folders
    assert info["counts_by_folder"] == {str(g1): {"0": 4, "1": 4}, str(g2): {"0": 4, "1": 4}}
    data, info = build_training_set(f"imagefolder:{real}", [g1, g2], ratio=1.0, seed=3)
    by = info["counts_by_folder"]
    assert {c: by[str(g1)][c] + by[str(g2)][c] for c in "01"} == info["counts"]["generated"] == {"0": 4, "1": 4}


def test_build_training_set_without_real_pools_class_lists(tiny_images):
    g1 = tiny_images("g1", classes=("b", "a"), per_class=1)
    g2 = tiny_images("g2", classes=("c", "a"), per_class=1)
    data, info = build_training_set(None, [g1, g2])
    assert data.classes == ["a", "b", "c"] and info["counts"]["generated"] == {"a": 2, "b": 1, "c": 1}


def test_build_training_set_mode_errors(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=1)
    with pytest.raises(ValueError, match="unknown --mode 'mix'"):
        build_training_set(f"imagefolder:{real}", [], mode="mix")
    with pytest.raises(ValueError, match="--mode replace needs real data"):
        build_training_set(None, [real], mode="replace")
    with pytest.raises(ValueError, match="--mode generated-only needs generated data"):
        build_training_set(f"imagefolder:{real}", [], mode="generated-only")


def test_generated_classes_must_be_a_subset_and_folders_not_empty(tiny_images, tmp_path):
    real = tiny_images("real", classes=("0", "1"), per_class=1)
    extra = tiny_images("extra", classes=("1", "x", "y"), per_class=1)
    with pytest.raises(ValueError, match=rf"{extra} has classes \['x', 'y'\] that the real data lacks"):
        build_training_set(f"imagefolder:{real}", [extra])
    empty = tmp_path / "empty"
    (empty / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{empty} holds no images"):
        build_training_set(f"imagefolder:{real}", [empty])


def test_corrupt_images_are_skipped_up_to_max_corrupt(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=5)
    bad = real / "0" / "img01.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"unreadable image {bad} .*1 of 10 images in {real} are unreadable"):
        build_training_set(f"imagefolder:{real}", [])
    data, info = build_training_set(f"imagefolder:{real}", [], max_corrupt=0.1)
    assert len(data) == 9 and info["skipped"] == [str(bad)] and info["counts"]["real"] == {"0": 4, "1": 5}
    real.joinpath("1", "img00.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a header, then nothing
    with pytest.raises(ValueError, match="2 of 10 images"):
        build_training_set(f"imagefolder:{real}", [], max_corrupt=0.1)


def test_streamed_and_in_memory_sets_draw_the_same_images(tiny_images):
    real = tiny_images("real", classes=("0", "1", "2"), per_class=4)
    gen = tiny_images("gen", classes=("0", "1", "2"), per_class=6, seed=1)
    mem, info_mem = build_training_set(f"imagefolder:{real}", [gen], mode="replace", fraction=0.5, seed=2,
                                       channels=1)
    disk, info_disk = build_training_set(f"imagefolder:{real}", [gen], mode="replace", fraction=0.5, seed=2,
                                         stream=True, channels=1)
    assert isinstance(disk, FileSet) and disk.channels == 1 and info_disk["stream"] is True
    assert info_disk["counts"] == info_mem["counts"] and torch.equal(disk.labels, mem.labels)
    assert disk.meta["file_name"] == mem.meta["file_name"] and disk.meta["origin"] == mem.meta["origin"]
    assert [str(pathlib.Path(p).relative_to(pathlib.Path(p).parents[2])) for p in disk.files] == [
        f"{'real' if o == 'real' else 'gen'}/{f}" for o, f in zip(mem.meta["origin"], mem.meta["file_name"])]


def test_mixed_image_sizes_stream_automatically(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=2, size=28)
    tiny_images("real", classes=("1",), per_class=1, size=32)  # overwrites 1/img00.png at 32 px
    data, info = build_training_set(f"imagefolder:{real}", [])
    assert isinstance(data, FileSet) and info["stream"] is True
    with pytest.raises(ValueError, match="images differ in size"):
        build_training_set(f"imagefolder:{real}", [], stream=False)
    with pytest.raises(ValueError, match="digits-mnist/train is an in-memory dataset"):
        build_training_set("digits-mnist/train", [], stream=True)
