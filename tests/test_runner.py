"""The generation runner at scale: source strategies, sharding, quality control, captions, regeneration."""
import json
import os
import subprocess
import sys

import pytest
import torch

from genrobust.data.folder import read_jsonl
from genrobust.generate import runner
from genrobust.generate.strategies import Prompts, Sources, create_strategy, derive_seed

PROMPTS = Prompts(label="a photo of a {}.", templates=("a sketch of a {}.", "a toy {}."))


class FakeGenerator:
    """Images that are a function of the seed; chosen seeds come out flagged (nsfw) or black."""

    name = "fake"
    prompts = PROMPTS
    strategies = ("label", "templates", "class", "image", "image-label", "captions")
    revision = "0" * 16

    def __init__(self, batch_size=4, nsfw=lambda s: False, blank=lambda s: False):
        self.batch_size, self.nsfw, self.blank = batch_size, nsfw, blank
        self.calls = []

    def classes(self):
        return None

    def info(self):
        return {"generator": self.name, "revision": self.revision, "scheduler": "none", "steps": 1,
                "height": 8, "width": 8, "dtype": "uint8"}

    def config(self):
        return {"name": self.name, "batch_size": self.batch_size}

    def generate(self, requests, sources=None):
        self.calls.append([r.key for r in requests])
        images = []
        for r in requests:
            img = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(r.seed),
                                dtype=torch.uint8)
            if sources is not None:  # an image variation: the source shows through
                img = (img // 2 + torch.from_numpy(__import__("numpy").array(sources[len(images)]))
                       .permute(2, 0, 1)[:, :8, :8] // 2)
            images.append(torch.zeros_like(img) if self.blank(r.seed) else img)
        return images, ["nsfw" if self.nsfw(r.seed) else None for r in requests]


class FakeCaptioner:
    name = "fake-captioner"
    batch_size = 2

    def __init__(self):
        self.seen = 0

    def caption(self, images):
        self.seen += len(images)
        return [f"a thing with mean {int(__import__('numpy').asarray(im).mean())}" for im in images]


def _pngs(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


# --- strategies that start from real images ----------------------------------------------------------

def test_per_image_requests_cycle_through_every_source(tiny_images):
    src = Sources(f"imagefolder:{tiny_images('src', classes=('cat', 'dog'), per_class=2)}")
    reqs = create_strategy("image-label")(["cat", "dog"], None, 7, PROMPTS, sources=src, per_image=3)
    assert len(reqs) == 12
    cat = [r for r in reqs if r.class_name == "cat"]
    assert [r.index for r in cat] == list(range(6))
    assert [r.source_image for r in cat] == [src.refs("cat")[0]] * 3 + [src.refs("cat")[1]] * 3
    assert all(r.prompt == "a photo of a cat." and r.seed == derive_seed(7, 0, r.index) for r in cat)
    per_class = create_strategy("image")(["cat", "dog"], 3, 7, PROMPTS, sources=src)
    assert [r.source_image for r in per_class[:3]] == [src.refs("cat")[i] for i in (0, 1, 0)]
    assert all(r.prompt is None for r in per_class)


def test_source_strategy_errors(tiny_images):
    src = Sources(f"imagefolder:{tiny_images('src', classes=('cat',), per_class=1)}")
    image = create_strategy("image")
    with pytest.raises(ValueError, match="starts from real images: pass --source"):
        image(["cat"], 2, 0, PROMPTS)
    with pytest.raises(ValueError, match="exactly one of --per-class N and --per-image K"):
        image(["cat"], 2, 0, PROMPTS, sources=src, per_image=1)
    with pytest.raises(ValueError, match="no readable image of class 'dog'"):
        image(["dog"], 2, 0, PROMPTS, sources=src)
    with pytest.raises(ValueError, match="--per-image needs a strategy that starts from real images"):
        create_strategy("label")(["cat"], None, 0, PROMPTS, per_image=2)


def test_unreadable_sources_are_skipped_when_decoded_and_reported(tmp_path, tiny_images, caplog):
    root = tiny_images("src", classes=("cat",), per_class=3)
    bad = sorted((root / "cat").iterdir())[1]
    bad.write_bytes(b"not a png")
    src = Sources(f"imagefolder:{root}", max_corrupt=0.5)
    assert src.skipped == [] and len(src.refs("cat")) == 3  # listed, not opened, at start
    assert src.load_or_skip(f"cat/{bad.name}") is None and src.skipped == [f"cat/{bad.name}"]
    card = runner.generate(FakeGenerator(), "image", ["cat"], tmp_path / "g", per_image=1,
                           source=f"imagefolder:{root}", progress=False, max_corrupt=0.5)
    assert card["num_images"] == 2 and card["skipped_sources"] == [f"cat/{bad.name}"]
    assert card["quality_control"]["given_up"] == {"cat": 1}
    assert "1 requests given up because their source image would not decode" in caplog.text
    assert "failed quality control" not in caplog.text  # given up at once, not after max_attempts tries
    with pytest.raises(ValueError, match=r"1 of 3 source images .* unreadable \(e\.g\. cat/"):
        runner.generate(FakeGenerator(), "image", ["cat"], tmp_path / "g2", per_image=1,
                        source=f"imagefolder:{root}", progress=False)


# --- quality control ----------------------------------------------------------------------------------

def test_flagged_and_blank_images_are_regenerated_with_the_next_seed(tmp_path):
    gen = FakeGenerator(nsfw=lambda s: s % 3 == 0, blank=lambda s: s % 5 == 1)
    out = tmp_path / "g"
    card = runner.generate(gen, "label", ["a", "b"], out, per_class=20, seed=1, progress=False, max_attempts=3)
    rows = read_jsonl(out / "metadata.jsonl")
    plan = json.loads((out / "shards" / "plan.json").read_text())["keys"]
    shard = [json.loads(line) for line in (out / "shards" / "rank0.jsonl").read_text().splitlines()]
    given_up = [r for r in shard if r["file_name"] is None]
    assert len(rows) + len(given_up) == len(plan) == 40
    for r in rows:
        assert r["seed"] % 3 != 0 and r["seed"] % 5 != 1  # never a flagged or blank image
        i = int(r["file_name"].split("_")[1].split(".")[0])
        expected = [derive_seed(1, r["class_id"], i, k) for k in range(len(r["attempts"]) + 1)]
        assert [a["seed"] for a in r["attempts"]] + [r["seed"]] == expected
        for a in r["attempts"]:
            assert a["reason"] == ("nsfw" if a["seed"] % 3 == 0 else "blank")
    assert all(len(r["attempts"]) == 3 for r in given_up)
    reasons = {}
    for r in shard:
        for a in r["attempts"]:
            reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
    assert card["quality_control"]["failed_attempts"] == reasons and sum(reasons.values()) > 0
    assert sum(card["quality_control"].get("given_up", {}).values()) == len(given_up)
    assert card["num_images"] == len(rows)


# --- sharding -----------------------------------------------------------------------------------------

def test_two_shards_merge_into_the_one_process_result(tmp_path):
    one = tmp_path / "one"
    runner.generate(FakeGenerator(), "templates", ["a", "b", "c"], one, per_class=5, seed=3, progress=False)
    two = tmp_path / "two"
    first = runner.generate(FakeGenerator(), "templates", ["a", "b", "c"], two, per_class=5, seed=3,
                            progress=False, shard=(0, 2))
    assert first is None and not (two / "metadata.jsonl").exists()  # the other half is not done yet
    with pytest.raises(ValueError, match="7 of 15 requests are not done yet"):
        runner.merge(two)
    card = runner.generate(FakeGenerator(), "templates", ["a", "b", "c"], two, per_class=5, seed=3,
                           progress=False, shard=(1, 2))
    assert card["num_images"] == 15

    def rows(folder):  # the batches differ between one and two processes; nothing else may
        return [{k: v for k, v in r.items() if k not in ("batch_id", "batch_pos", "batch_size")}
                for r in read_jsonl(folder / "metadata.jsonl")]
    assert rows(two) == rows(one)
    assert _pngs(two) == _pngs(one)
    assert sorted(p.name for p in (two / "shards").iterdir()) == ["plan.json", "rank0.jsonl", "rank1.jsonl"]
    with pytest.raises(ValueError, match="shard index must be in 0..1"):
        runner.generate(FakeGenerator(), "templates", ["a"], tmp_path / "x", per_class=1, shard=(2, 2))


def test_torchrun_two_processes(tmp_path, tiny_generator_dir):
    """Two CPU processes under torchrun (gloo) give the same folder as one process, to the byte."""
    args = ["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2", "--per-class", "3",
            "--classes", "0,1,2", "--batch-size", "4", "--seed", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "genrobust.cli", *args, "--out", str(one)], check=True, env=env,
                   capture_output=True)
    two = tmp_path / "two"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", "-m", "genrobust.cli",
                           *args, "--out", str(two)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (two / "shards").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    rows = [read_jsonl(f / "metadata.jsonl") for f in (one, two)]
    assert rows[0] == rows[1] and len(rows[0]) == 9  # requests, seeds, prompts, batches and sha256s
    for r in rows[0]:  # and the image files themselves
        assert (one / r["file_name"]).read_bytes() == (two / r["file_name"]).read_bytes()


# --- captions -----------------------------------------------------------------------------------------

def test_captions_are_cached_and_keep_the_class_name(tmp_path, tiny_images):
    from genrobust.generate.captioners import class_prompt

    root = tiny_images("src", classes=("cat", "dog"), per_class=2)
    cap = FakeCaptioner()
    out = tmp_path / "g"
    kw = dict(per_image=2, source=f"imagefolder:{root}", progress=False)
    runner.generate(FakeGenerator(), "captions", ["cat", "dog"], out, captioner=cap, **kw)
    assert cap.seen == 4  # each source image captioned once, though used twice
    rows = read_jsonl(out / "metadata.jsonl")
    assert len(rows) == 8
    for r in rows:
        assert r["caption"].startswith("a thing with mean ")
        assert r["prompt"] == class_prompt(r["caption"], r["class_name"]) and r["class_name"] in r["prompt"]
    (out / "metadata.jsonl").unlink()
    again = FakeCaptioner()
    runner.generate(FakeGenerator(), "captions", ["cat", "dog"], out, captioner=again, **kw)
    assert again.seen == 0 and read_jsonl(out / "metadata.jsonl") == rows
    with pytest.raises(ValueError, match="needs a captioner"):
        runner.generate(FakeGenerator(), "captions", ["cat"], tmp_path / "h", **kw)


# --- determinism and the digits generator's new strategies --------------------------------------------

def test_an_image_regenerated_from_its_manifest_row_is_identical(tmp_path, tiny_generator):
    out = tmp_path / "g"
    runner.generate(tiny_generator, "templates", ["3", "5", "8"], out, per_class=4, seed=9, progress=False)
    rows = read_jsonl(out / "metadata.jsonl")
    from genrobust.data.folder import encode_png
    for r in (rows[0], rows[5], rows[-1]):
        img = runner.regenerate(tiny_generator, out, r["file_name"])
        assert encode_png(img) == (out / r["file_name"]).read_bytes()


@pytest.mark.parametrize("strategy", ["image", "image-label", "class"])
def test_digits_ddpm_runs_the_source_and_class_strategies(tmp_path, tiny_generator, strategy):
    kw = {"per_class": 3} if strategy == "class" else {"per_image": 1, "source": "digits-mnist/test"}
    out = tmp_path / strategy
    card = runner.generate(tiny_generator, strategy, ["0", "7"], out, progress=False, **kw)
    expected = 6 if strategy == "class" else 200  # one per source image: 100 test images per class
    assert card["num_images"] == expected
    row = read_jsonl(out / "metadata.jsonl")[0]
    if strategy != "class":
        assert row["source_image"].startswith("digits-mnist/test#") and row["strength"] == 0.8
        img = runner.regenerate(tiny_generator, out, row["file_name"], source="digits-mnist/test")
        from genrobust.data.folder import encode_png
        assert encode_png(img) == (out / row["file_name"]).read_bytes()


# --- the CLIP-score filter ----------------------------------------------------------------------------

class FakeScorer:
    model_name = "fake-clip"

    def score(self, images, texts):
        return [float(sum(im.getpixel((0, 0)))) / 7.65 for im in images]  # 0..100 from the first pixel


def test_clip_threshold_retries_and_top_k_keeps_the_best(tmp_path):
    from genrobust.generate.runner import ClipFilter

    out = tmp_path / "g"
    clip = ClipFilter(FakeScorer(), threshold=30.0, top_k=3)
    card = runner.generate(FakeGenerator(), "label", ["a", "b"], out, per_class=5, seed=0, progress=False,
                           clip=clip, max_attempts=6)
    shard = [json.loads(line) for line in (out / "shards" / "rank0.jsonl").read_text().splitlines()]
    kept = [r for r in shard if r["file_name"]]
    assert all(r["scores"]["clip"] >= 30 for r in kept)
    assert all(a["reason"] == "clip<30" for r in shard for a in r["attempts"])
    rows = read_jsonl(out / "metadata.jsonl")
    for cls in ("a", "b"):
        mine = sorted((r["scores"]["clip"] for r in kept if r["class_name"] == cls), reverse=True)
        assert sorted((r["scores"]["clip"] for r in rows if r["class_name"] == cls), reverse=True) == mine[:3]
    assert card["clip_filter"] == {"model": "fake-clip", "threshold": 30.0, "top_k": 3}
    assert sum(card["quality_control"]["clip_top_k_left_out"].values()) == len(kept) - len(rows)


def test_clip_scorer_on_a_tiny_clip(tmp_path):
    from tiny_models import tiny_clip

    from genrobust.generate.filters import ClipScorer
    from genrobust.generate.runner import ClipFilter

    clip = ClipFilter(ClipScorer(str(tiny_clip(tmp_path / "clip"))))
    scores = clip.score([torch.zeros(1, 8, 8, dtype=torch.uint8), torch.full((3, 8, 8), 200, dtype=torch.uint8)],
                        ["cat", "dog"])
    assert len(scores) == 2 and all(-100 <= s <= 100 for s in scores)


def test_safety_checker_flags_are_regenerated_never_kept(tmp_path):
    """A tiny Stable Diffusion whose (fake) safety checker flags position 1 of every batch."""
    from tiny_models import attach_safety_checker, tiny_sd

    from genrobust.data.folder import encode_png
    from genrobust.generate import create_generator

    gen = create_generator("text2img", model=str(tiny_sd(tmp_path / "sd")), steps=2, batch_size=4,
                           height=32, width=32)
    checker = attach_safety_checker(gen.pipe, indices=[1])
    out = tmp_path / "g"
    card = runner.generate(gen, "label", ["cat", "dog"], out, per_class=4, seed=0, progress=False)
    rows = read_jsonl(out / "metadata.jsonl")
    # two fixed batches; their two flagged requests retried together, where position 1 is flagged again
    assert card["num_images"] == 8 and checker.calls == [4, 4, 2, 1]
    flagged = [r for r in rows if r["attempts"]]
    assert sorted(len(r["attempts"]) for r in flagged) == [1, 2]
    assert all(a["reason"] == "nsfw" for r in flagged for a in r["attempts"])
    assert card["quality_control"]["failed_attempts"] == {"nsfw": 3}
    checker.indices = set()
    for r in rows:  # nothing black was kept, and every image comes back from its manifest row
        assert encode_png(runner.regenerate(gen, out, r["file_name"])) == (out / r["file_name"]).read_bytes()
