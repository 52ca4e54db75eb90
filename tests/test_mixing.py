import json

import pytest
import torch

from genrobust.data.folder import load_imagefolder
from genrobust.data.imageset import ImageSet
from genrobust.data.mixing import balanced_counts, build_training_set, mix_add

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


def test_build_training_set_converts_generated_to_real_channels(tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=2)
    gen = tiny_images("gen-rgb", classes=("1", "0"), per_class=2, mode="RGB")
    data, info = build_training_set(f"imagefolder:{real}", [gen], ratio=0.5, seed=1)
    assert tuple(data.images.shape) == (6, 1, 28, 28)
    assert info["counts"]["generated"] == {"0": 1, "1": 1}


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
