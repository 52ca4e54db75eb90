import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

from genrobust.data.folder import load_imagefolder, read_jsonl
from genrobust.generate import create_generator, derive_seed, generate
from genrobust.generate import digits_ddpm
from genrobust.generate.generators import file_sha256
from genrobust.generate.runner import MANIFEST_FIELDS, class_dir
from genrobust.generate.strategies import Prompts, Request, label_strategy, templates_strategy

DIGITS = [str(i) for i in range(10)]


# --- seeds and strategies ----------------------------------------------------------------------------

def test_derive_seed_pinned():
    # sha256("genrobust:0:0:0")[:8] as a big-endian integer, shifted right once: pinned so that a
    # generated image can be regenerated from its manifest row in any later version
    assert derive_seed(0, 0, 0) == 725914656188915067
    assert derive_seed(7, 3, 11) == 8507749499751163063
    assert derive_seed(7, 3, 11, attempt=2) == 8627461679126313681


def test_derive_seed_is_deterministic_63_bit_and_distinct():
    seeds = {derive_seed(s, c, i, a) for s in range(3) for c in range(4) for i in range(5) for a in range(3)}
    assert len(seeds) == 3 * 4 * 5 * 3
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) == derive_seed(1, 2, 3, attempt=0)
    base = derive_seed(1, 2, 3)
    assert len({base, derive_seed(2, 2, 3), derive_seed(1, 3, 3), derive_seed(1, 2, 4),
                derive_seed(1, 2, 3, attempt=1)}) == 5
    torch.Generator().manual_seed(max(seeds))  # usable as a torch seed


PROMPTS = Prompts(label="a photo of a {}.", templates=("one {}", "two {}", "three {}"))


def test_label_strategy():
    reqs = label_strategy(["cat", "dog"], 3, 5, PROMPTS)
    assert len(reqs) == 6
    assert [(r.class_id, r.class_name, r.index) for r in reqs] == [
        (0, "cat", 0), (0, "cat", 1), (0, "cat", 2), (1, "dog", 0), (1, "dog", 1), (1, "dog", 2)]
    assert [r.prompt for r in reqs] == ["a photo of a cat."] * 3 + ["a photo of a dog."] * 3
    assert [r.seed for r in reqs] == [derive_seed(5, r.class_id, r.index) for r in reqs]
    assert reqs[4].key == "1:1"
    assert reqs[0].to_dict() == {"class_id": 0, "class_name": "cat", "index": 0, "seed": derive_seed(5, 0, 0),
                                 "prompt": "a photo of a cat.", "style": None, "source_image": None,
                                 "caption": None}


def test_templates_strategy_chooses_by_seed():
    reqs = templates_strategy(["cat", "dog"], 10, 0, PROMPTS)
    assert len(reqs) == 20
    for r in reqs:
        assert r.prompt == PROMPTS.templates[r.seed % 3].format(r.class_name)
    assert {r.prompt.split()[0] for r in reqs} == {"one", "two", "three"}
    # the seed, not the position, picks the template: another run seed picks others
    other = templates_strategy(["cat", "dog"], 10, 1, PROMPTS)
    assert [r.prompt for r in reqs] != [r.prompt for r in other]
    assert templates_strategy(["cat", "dog"], 10, 0, PROMPTS) == reqs


def test_class_dir():
    assert class_dir("7") == "7"
    assert class_dir("sea lion") == "sea_lion"
    assert class_dir("a/b\\c..d") == "a_b_c..d"
    assert class_dir("///") == "class"


# --- digits-ddpm -------------------------------------------------------------------------------------

def test_condition_index():
    assert digits_ddpm.NUM_EMBEDS == 33
    assert digits_ddpm.condition_index(3, "handwritten") == 3
    assert digits_ddpm.condition_index(3, "printed") == 14
    assert digits_ddpm.condition_index(None, "printed") == 21
    assert digits_ddpm.condition_index(0, None) == 22
    assert digits_ddpm.condition_index(None, None) == 32
    with pytest.raises(ValueError, match="outside"):
        digits_ddpm.condition_index(11, None)
    with pytest.raises(ValueError):
        digits_ddpm.condition_index(1, "painted")


def test_generator_reads_style_from_prompt(tiny_generator, tiny_generator_dir):
    g = tiny_generator
    assert g.classes() == DIGITS
    assert g.style_of("a handwritten digit 3.") == "handwritten"
    assert g.style_of("A PRINTED digit 3.") == "printed"
    assert g.style_of("a digit 3") is None and g.style_of(None) is None
    with pytest.raises(ValueError, match="several styles"):
        g.style_of("a handwritten printed 3")
    assert g.revision == file_sha256(tiny_generator_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert len(g.revision) == 16
    for prompt in (g.prompts.label, *g.prompts.templates):
        assert g.style_of(prompt) in digits_ddpm.STYLES


def test_generator_images_depend_on_their_seed_only(tiny_generator):
    reqs = [Request(c, str(c), 0, derive_seed(0, c, 0), "a printed digit {}.".format(c)) for c in range(6)]
    batch, flags = tiny_generator.generate(reqs)
    assert flags == [None] * 6
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (6, 1, 28, 28)
    alone, _ = tiny_generator.generate(reqs[4:5])
    # batching may change float rounding, never the image
    assert (alone[0].int() - batch[4].int()).abs().max() <= 1
    assert not torch.equal(batch[0], batch[1])


def test_load_rejects_a_folder_without_unet(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a digits-ddpm folder"):
        create_generator("digits-ddpm", path=tmp_path)


# --- the runner --------------------------------------------------------------------------------------

def test_runner_writes_imagefolder_manifest_and_card(tmp_path, tiny_generator):
    out = tmp_path / "gen"
    card = generate(tiny_generator, "templates", ["3", "1"], out, per_class=5, seed=2, progress=False)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == [f"1/0001_{i:06d}.png" for i in range(5)] + [f"3/0000_{i:06d}.png" for i in range(5)]

    rows = read_jsonl(out / "metadata.jsonl")
    assert len(rows) == 10
    assert [r["file_name"] for r in rows] == [f"3/0000_{i:06d}.png" for i in range(5)] + \
                                             [f"1/0001_{i:06d}.png" for i in range(5)]
    for r in rows:
        assert set(MANIFEST_FIELDS) <= set(r)
        assert "_key" not in r
        png = (out / r["file_name"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == r["sha256"]
        assert r["strategy"] == "templates" and r["generator"] == "digits-ddpm"
        assert r["revision"] == tiny_generator.revision
        assert r["steps"] == 2 and r["guidance_scale"] == 2.0 and (r["height"], r["width"]) == (28, 28)
        assert r["scheduler"] == "DDIMScheduler"
        assert r["label"] == r["class_id"] == ["3", "1"].index(r["class_name"])
        i = int(r["file_name"].split("_")[1].split(".")[0])
        assert r["seed"] == derive_seed(2, r["class_id"], i)
        assert r["prompt"] in [t.format(r["class_name"]) for t in tiny_generator.prompts.templates]
        assert r["flagged"] is None
        from PIL import Image
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "L" and im.size == (28, 28)

    on_disk = json.loads((out / "dataset_card.json").read_text())
    assert on_disk == card
    assert card["classes"] == ["3", "1"] and card["num_images"] == 10 and card["counts"] == {"3": 5, "1": 5}
    assert card["strategy"] == "templates" and card["seed"] == 2
    assert card["metadata_sha256"] == hashlib.sha256((out / "metadata.jsonl").read_bytes()).hexdigest()

    data = load_imagefolder(out)  # readable as an ImageFolder, labels from the manifest
    assert data.classes == ["3", "1"] and data.labels.tolist() == [0] * 5 + [1] * 5


def _run(gen, out, **kw):
    args = dict(strategy="templates", classes=DIGITS, per_class=3, seed=0)
    args.update(kw)
    return generate(gen, args["strategy"], args["classes"], out, args["per_class"], seed=args["seed"],
                    progress=False)


def _pngs(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture
def full_run(tmp_path, tiny_generator):
    a = tmp_path / "A"
    _run(tiny_generator, a)
    return a


def test_resume_after_deleting_images_and_cutting_the_last_shard_line(tmp_path, tiny_generator, full_run):
    b = tmp_path / "B"
    _run(tiny_generator, b)
    for name in ("0/0000_000000.png", "4/0004_000002.png", "7/0007_000001.png"):
        (b / name).unlink()
    shard = b / "shards" / "rank0.jsonl"
    text = shard.read_text()
    last = text.rstrip("\n").rfind("\n") + 1
    shard.write_text(text[:last + 25])  # the last row cut mid-line, as by a kill
    _run(tiny_generator, b)
    assert (b / "metadata.jsonl").read_bytes() == (full_run / "metadata.jsonl").read_bytes()
    assert _pngs(b) == _pngs(full_run)
    assert len(_pngs(b)) == 30


def test_resume_after_a_kill_mid_run(tmp_path, tiny_generator, full_run):
    b = tmp_path / "B"
    _run(tiny_generator, b)
    # rebuild the state a kill leaves: the first 12 images done, the 12th row cut mid-line, no manifest
    (b / "metadata.jsonl").unlink()
    (b / "dataset_card.json").unlink()
    shard = b / "shards" / "rank0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    for line in lines[12:]:
        (b / json.loads(line)["file_name"]).unlink()
    shard.write_text("".join(lines[:11]) + lines[11][:30])
    _run(tiny_generator, b)
    assert (b / "metadata.jsonl").read_bytes() == (full_run / "metadata.jsonl").read_bytes()
    assert _pngs(b) == _pngs(full_run)


def test_rerun_of_a_finished_folder_changes_nothing(tiny_generator, full_run):
    before = _pngs(full_run), (full_run / "metadata.jsonl").read_bytes()
    card = _run(tiny_generator, full_run)
    assert (_pngs(full_run), (full_run / "metadata.jsonl").read_bytes()) == before
    assert card["num_images"] == 30


@pytest.mark.parametrize("change", [{"seed": 1}, {"per_class": 4}, {"strategy": "label"},
                                    {"classes": DIGITS[:5]}])
def test_rerun_with_other_settings_raises(tiny_generator, full_run, change):
    manifest = (full_run / "metadata.jsonl").read_bytes()
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"already holds a generation run with other settings \(.*{key}"):
        _run(tiny_generator, full_run, **change)
    assert (full_run / "metadata.jsonl").read_bytes() == manifest


def test_rerun_with_other_sampling_settings_raises(tiny_generator_dir, full_run):
    other = create_generator("digits-ddpm", path=tiny_generator_dir, steps=3, batch_size=8)
    with pytest.raises(ValueError, match=r"other settings \(generator\)"):
        _run(other, full_run)


def test_unsupported_strategy_raises(tmp_path, tiny_generator):
    tiny_generator.strategies = ("label",)
    with pytest.raises(ValueError, match=r"generator 'digits-ddpm' cannot run strategy 'templates'; "
                                         r"it supports \['label'\]"):
        _run(tiny_generator, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_class_and_bad_per_class_raise(tmp_path, tiny_generator):
    with pytest.raises(ValueError, match="not 'zebra'"):
        _run(tiny_generator, tmp_path / "x", classes=["zebra"])
    with pytest.raises(ValueError, match="--per-class must be at least 1"):
        _run(tiny_generator, tmp_path / "y", per_class=0)


def test_copy_of_a_finished_folder_is_complete(tmp_path, tiny_generator, full_run):
    # a finished folder carries everything it needs: a copy resumes to the same manifest without work
    c = tmp_path / "C"
    shutil.copytree(full_run, c)
    (c / "metadata.jsonl").unlink()
    _run(tiny_generator, c)
    assert (c / "metadata.jsonl").read_bytes() == (full_run / "metadata.jsonl").read_bytes()


def test_sample_without_guidance_and_from_an_init_image(tiny_generator):
    g = tiny_generator
    gens = [torch.Generator().manual_seed(1)]
    plain = digits_ddpm.sample(g.unet, g.scheduler, [1], ["printed"], gens, steps=2, guidance=1.0)
    assert tuple(plain.shape) == (1, 1, 28, 28) and plain.dtype == torch.uint8
    init = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    edited = digits_ddpm.sample(g.unet, g.scheduler, [1], [None], [torch.Generator().manual_seed(1)],
                                steps=4, init=init, strength=0.25)
    assert tuple(edited.shape) == (1, 1, 28, 28)
    assert not np.array_equal(edited.numpy(), plain.numpy())


def test_save_sample_grid_layout(tmp_path, tiny_generator):
    from PIL import Image

    path = digits_ddpm.save_sample_grid(tiny_generator.unet, tmp_path / "samples.png", per_class=2, steps=2)
    with Image.open(path) as im:
        # 2 styles x 10 classes = 20 rows of 2 samples, 28 px each with 2 px padding
        assert im.size == (2 * 30 + 2, 20 * 30 + 2)


def test_shipped_generator_is_recorded_without_its_absolute_path(tiny_generator_dir):
    from genrobust.generate import create_generator
    from genrobust.generate.generators import SHIPPED

    if not (SHIPPED / "unet").is_dir():
        pytest.skip("the shipped digits-ddpm checkpoint is missing")
    assert create_generator("digits-ddpm", steps=2).config()["path"] == "shipped"
    assert create_generator("digits-ddpm", path=tiny_generator_dir, steps=2).config()["path"] == str(tiny_generator_dir)
