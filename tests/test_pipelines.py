"""Paper-scale generators, captioners and filters, on tiny random-weight models saved and loaded back as a
user's local models are (tests/tiny_models.py)."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import genrobust.generate.pipelines as pipelines
import tiny_models
from genrobust.generate import Request, create_generator, list_generators
from genrobust.generate.captioners import class_prompt, create_captioner, names_class
from genrobust.generate.filters import ClipScorer, is_blank, select
from genrobust.generate.generators import file_sha256

IMAGE_KINDS = ("image-variation", "img2img")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {"sd": tiny_models.tiny_sd(root / "sd"), "variation": tiny_models.tiny_sd_variation(root / "variation"),
            "dit": tiny_models.tiny_dit(root / "dit"), "blip": tiny_models.tiny_blip(root / "blip"),
            "clip": tiny_models.tiny_clip(root / "clip")}


FOLDER_OF = {"text2img": "sd", "img2img": "sd", "image-variation": "variation", "class-conditional": "dit"}
EXTRA = {"img2img": {"strength": 0.5, "steps": 4}}  # int(4 * 0.5) = 2 denoising steps


def make(kind, folders, **kwargs):
    return create_generator(kind, model=str(folders[FOLDER_OF[kind]]), **{"steps": 2, **EXTRA.get(kind, {}),
                                                                         **kwargs})


@pytest.fixture(scope="module")
def generators(folders):
    return {kind: make(kind, folders) for kind in FOLDER_OF}


def requests(n=3, names=("goldfish", "tench", "n01443537")):
    return [Request(class_id=i, class_name=names[i % len(names)], index=i, seed=1000 + i,
                    prompt=f"a photo of a {names[i % len(names)]}.") for i in range(n)]


def sources(n=3, seed=0):
    rng = np.random.default_rng(seed)  # sizes differ on purpose: each is resized on its own
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def run(gen, reqs, srcs=None):
    return gen.generate(reqs, srcs if gen.name in IMAGE_KINDS else None)


def test_registered_with_their_strategies():
    assert {"text2img", "image-variation", "img2img", "class-conditional"} <= set(list_generators())
    assert pipelines.Text2Image.strategies == ("label", "templates", "captions")
    assert pipelines.ImageVariation.strategies == ("image",)
    assert pipelines.Image2Image.strategies == ("image-label",)
    assert pipelines.ClassConditional.strategies == ("class",)


@pytest.mark.parametrize("kind,size", [("text2img", 64), ("img2img", 64), ("image-variation", 64),
                                       ("class-conditional", 32)])
def test_images_flags_info_config(generators, folders, kind, size):
    gen = generators[kind]
    images, flags = run(gen, requests(), sources())
    assert [tuple(im.shape) for im in images] == [(3, size, size)] * 3
    assert all(im.dtype == torch.uint8 for im in images)
    assert flags == [None, None, None]
    weights = "transformer" if kind == "class-conditional" else "unet"
    info = gen.info()
    assert info == {"generator": kind, "revision": file_sha256(folders[FOLDER_OF[kind]] / weights /
                                                               "diffusion_pytorch_model.safetensors"),
                    "scheduler": "DDIMScheduler", "steps": EXTRA.get(kind, {}).get("steps", 2),
                    "guidance_scale": {"image-variation": 3.0, "class-conditional": 4.0}.get(kind, 7.5),
                    "strength": 0.5 if kind == "img2img" else None, "height": size, "width": size,
                    "dtype": "float32", "negative_prompt": None}
    assert gen.config()["model"] == str(folders[FOLDER_OF[kind]])
    assert gen.prompts.label == "a photo of a {}."
    assert len(gen.prompts.templates) == 80 and gen.prompts.templates[0] == "a bad photo of a {}."


@pytest.mark.parametrize("kind", list(FOLDER_OF))
def test_an_image_follows_its_seed_alone(generators, kind):
    """Batch of 3 vs each alone. Not bitwise on CPU: batched kernels change floats by ~1e-6, which moves a
    pixel by one uint8 level when it sits on a rounding edge. The same batch twice is bitwise equal."""
    gen, reqs, srcs = generators[kind], requests(), sources()
    batch, _ = run(gen, reqs, srcs)
    alone = [run(gen, [r], [s])[0][0] for r, s in zip(reqs, srcs)]
    for b, a in zip(batch, alone):
        assert (b.int() - a.int()).abs().max() <= 1
        assert (b.int() - a.int()).abs().float().mean() < 0.01
    again, _ = run(gen, reqs, srcs)
    assert all(torch.equal(a, b) for a, b in zip(batch, again))
    assert not torch.equal(batch[0], batch[1])  # other seeds, other images


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler"),
                                      ("euler", "EulerDiscreteScheduler"),
                                      ("euler-a", "EulerAncestralDiscreteScheduler"), ("pndm", "PNDMScheduler"),
                                      ("lms", "LMSDiscreteScheduler"), ("unipc", "UniPCMultistepScheduler"),
                                      ("ddpm", "DDPMScheduler")])
def test_scheduler_by_name(folders, name, cls):
    gen = make("text2img", folders, scheduler=name)
    assert type(gen.pipe.scheduler).__name__ == cls == gen.info()["scheduler"]
    assert gen.pipe.scheduler.config.beta_schedule == "scaled_linear"  # the model's schedule carries over
    if name == "dpm-solver++":
        assert gen.pipe.scheduler.config.algorithm_type == "dpmsolver++"
    reqs = requests(2)
    first, _ = gen.generate(reqs)
    second = gen.generate(reqs[1:])[0][0]
    assert (first[1].int() - second.int()).abs().max() <= 1  # stochastic schedulers follow the seeds too


def test_unknown_scheduler_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; choose from: ddim, dpm-solver\+\+, euler, "
                                         r"euler-a, pndm, lms, unipc, ddpm"):
        create_generator("text2img", model=str(tmp_path / "not-there"), scheduler="heun")


def test_missing_local_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at .*not-there"):
        create_generator("text2img", model=str(tmp_path / "not-there"))
    with pytest.raises(FileNotFoundError, match="is not a saved model folder .*no model_index.json"):
        create_generator("img2img", model=str(tmp_path))


def test_hub_id_not_cached_fails_offline_with_one_message():
    how = r"`hf download genrobust-test/no-such-model --local-dir DIR`"
    with pytest.raises(ValueError, match=r"'genrobust-test/no-such-model' is not available offline: .*" + how):
        create_generator("text2img", model="genrobust-test/no-such-model")
    with pytest.raises(ValueError, match="not available offline"):
        create_captioner("blip", model="genrobust-test/no-such-model")
    with pytest.raises(ValueError, match="not available offline"):
        ClipScorer("genrobust-test/no-such-model")


def test_hub_id_in_the_cache_loads_offline_and_is_pinned_to_its_commit(folders, tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--genrobust-test--tiny-sd"
    shutil.copytree(folders["sd"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    gen = create_generator("text2img", model="genrobust-test/tiny-sd", steps=2)
    assert gen.revision == commit
    assert gen.config()["model"] == "genrobust-test/tiny-sd"


def test_negative_prompt_and_size(folders, generators):
    gen = make("text2img", folders, negative_prompt="blurry", height=32, width=48)
    images, _ = gen.generate(requests(1))
    assert tuple(images[0].shape) == (3, 32, 48)
    assert gen.info()["negative_prompt"] == "blurry" and gen.config()["negative_prompt"] == "blurry"
    with pytest.raises(ValueError, match="takes no negative_prompt"):
        make("image-variation", folders, negative_prompt="blurry")


def test_image_generators_need_sources(generators):
    for kind in IMAGE_KINDS:
        with pytest.raises(ValueError, match="needs one source image per request"):
            generators[kind].generate(requests(2))
        with pytest.raises(ValueError, match=r"\(2 requests, 1 sources\)"):
            generators[kind].generate(requests(2), sources(1))
    with pytest.raises(ValueError, match="needs a prompt"):
        generators["text2img"].generate([Request(class_id=0, class_name="tench", index=0, seed=1)])


def test_img2img_strength(folders):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        make("img2img", folders, strength=0)
    with pytest.raises(ValueError, match="2 x 0.4 is none"):
        make("img2img", folders, strength=0.4, steps=2)


@pytest.mark.parametrize("kind", ["text2img", "image-variation", "img2img"])
def test_safety_checker_flags_become_nsfw(folders, kind):
    gen = make(kind, folders)  # its own: the checker must not leak into the shared generators
    checker = tiny_models.attach_safety_checker(gen.pipe, indices={1})
    images, flags = run(gen, requests(), sources())
    assert flags == [None, "nsfw", None]
    assert checker.calls == [3]
    assert images[1].max() == 0 and images[0].max() > 0  # kept (blacked out by the checker), not dropped


def test_class_conditional_names(generators):
    gen = generators["class-conditional"]
    classes = gen.classes()
    assert len(classes) == 1000 and classes[:3] == ["tench", "goldfish", "great white shark"]
    # CLIP names first; where two ids share every readable name (ImageNet's two "missile"s), the wnid
    assert classes[657] == "n03773504" and classes[744] == "projectile"
    assert all(gen.label_id(name) == i for i, name in enumerate(classes))
    assert gen.label_id("Carassius auratus") == 1  # an id2label synonym
    assert gen.label_id("n01443537") == 1  # a wnid
    with pytest.raises(ValueError, match=r"'crane' is ambiguous .* ids \[134, 517\]; use 'crane bird' or "
                                         r"'construction crane'"):
        gen.label_id("crane")
    with pytest.raises(ValueError, match="'unicorn' is not a class of"):
        gen.generate([Request(class_id=0, class_name="unicorn", index=0, seed=1)])


def test_class_conditional_labels_reach_the_model(generators):
    gen = generators["class-conditional"]
    same = [Request(class_id=0, class_name=n, index=0, seed=7) for n in ("goldfish", "n01443537", "tench")]
    images, _ = gen.generate(same)
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


def test_class_conditional_rejects_seedless_schedulers(folders):
    with pytest.raises(ValueError, match="scheduler 'euler-a' draws noise from the global RNG"):
        make("class-conditional", folders, scheduler="euler-a")


def test_blip_captions_batched_and_deterministic(folders):
    blip = create_captioner("blip", model=str(folders["blip"]), batch_size=2, max_new_tokens=6)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "white", "black")] + sources(2)
    captions = blip.caption(images)
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
    assert len(set(captions)) >= 3  # the images steer the words, so a caption can be told from its neighbours
    assert blip.caption(images) == captions
    assert [blip.caption([im])[0] for im in images] == captions
    assert all(len(c.split()) <= 6 for c in captions)


@pytest.mark.parametrize("caption,name,expected", [
    ("a goldfish in a bowl.", "goldfish", "a goldfish in a bowl."),
    ("A Great White Shark, underwater", "great white shark", "A Great White Shark, underwater"),
    ("a hen of the woods on a log", "hen-of-the-woods", "a hen of the woods on a log"),
    ("a dog on a beach.", "tabby cat", "a dog on a beach, a photo of a tabby cat"),
    ("a white shark near a great reef", "great white shark",
     "a white shark near a great reef, a photo of a great white shark"),  # words out of order
    ("two goldfishes", "goldfish", "two goldfishes, a photo of a goldfish"),  # a plural is not the name
    ("a catalog", "cat", "a catalog, a photo of a cat"),  # whole words only
    ("  ", "tench", "a photo of a tench"),
    ("", "tench", "a photo of a tench"),
])
def test_class_prompt(caption, name, expected):
    assert class_prompt(caption, name) == expected
    assert names_class(class_prompt(caption, name), name)


def test_is_blank():
    assert is_blank(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert is_blank(torch.full((3, 8, 8), 200, dtype=torch.uint8))
    checker = (torch.arange(64).reshape(8, 8) + torch.arange(8).reshape(8, 1)) % 2  # 0/1 checkerboard
    assert is_blank(128 + checker.to(torch.uint8).expand(3, 8, 8))  # +-0.5 around 128.5: std 0.5
    assert is_blank(126 + 3 * checker.to(torch.uint8))  # 126/129 alternating: std 1.5
    assert not is_blank(126 + 4 * checker.to(torch.uint8))  # 126/130: std exactly 2, not below
    one_stray = torch.zeros(1, 16, 16, dtype=torch.uint8)
    one_stray[0, 0, 0] = 255  # a range rule would keep this; its std is 15.9
    assert not is_blank(one_stray)
    assert is_blank(np.zeros((8, 8), dtype=np.uint8)) and is_blank(one_stray, threshold=16)


def test_clip_scores(folders):
    scorer = ClipScorer(str(folders["clip"]), batch_size=2)
    images = sources(3, seed=1)
    texts = ["a photo of a dog", "cat", "a red cat on the dog"]
    scores = scorer.score(images, texts)
    assert len(scores) == 3 and all(isinstance(s, float) and -100 <= s <= 100 for s in scores)
    alone = [scorer.score([im], [t])[0] for im, t in zip(images, texts)]
    assert np.allclose(scores, alone, atol=1e-4)
    # the same number from CLIP's own forward pass: logits_per_image = exp(logit_scale) * cosine
    inputs = scorer.processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    expected = 100 * out.logits_per_image.diag() / scorer.model.logit_scale.exp()
    assert np.allclose(scores, expected.tolist(), atol=1e-4)
    uint8 = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    assert np.allclose(scorer.score(uint8, texts), scores, atol=1e-4)
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(images, texts[:2])


def test_select():
    scores = {"cat": [30.0, 10.0, 25.0, 30.0, float("nan")], "dog": [5.0, 40.0]}
    assert select(scores) == {"cat": [0, 1, 2, 3, 4], "dog": [0, 1]}
    assert select(scores, threshold=25.0) == {"cat": [0, 2, 3], "dog": [1]}
    assert select(scores, top_k=2) == {"cat": [0, 3], "dog": [0, 1]}
    assert select(scores, top_k=1) == {"cat": [0], "dog": [1]}  # a tie goes to the lower index
    assert select(scores, threshold=26.0, top_k=1) == {"cat": [0], "dog": [1]}
    assert select(scores, threshold=50.0) == {"cat": [], "dog": []}
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        select(scores, top_k=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            select(scores, top_k=bad)


def test_clip_top_k_zero_is_refused_by_the_cli_as_by_select(capsys):
    from genrobust.cli import main
    with pytest.raises(SystemExit):
        main(["generate", "--generator", "digits-ddpm", "--strategy", "label", "--per-class", "1",
              "--out", "unused", "--clip-top-k", "0"])
    assert "argument --clip-top-k: must be >= 1, got 0" in capsys.readouterr().err


def test_compile_is_cuda_only(folders, caplog):
    gen = make("text2img", folders, compile=True)
    assert "compile=True is only used on CUDA" in caplog.text
    assert type(gen.pipe.unet).__name__ == "UNet2DConditionModel"


def test_importing_the_registry_entries_stays_light():
    import subprocess
    import sys

    code = ("import sys, genrobust.generate.pipelines, genrobust.generate.captioners, genrobust.generate.filters; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kind,strategy", [("text2img", "templates"), ("img2img", "image-label"),
                                           ("image-variation", "image"), ("class-conditional", "class")])
def test_every_image_regenerated_from_its_manifest_row_alone_is_identical(folders, tmp_path, kind, strategy):
    """The runner's batches hold several requests; `regenerate` rebuilds any one of them from its row only
    (no other image's request), and the PNG comes back bit for bit."""
    from conftest import write_imagefolder
    from genrobust.data.folder import encode_png
    from genrobust.generate import runner

    gen = make(kind, folders, batch_size=4)
    kw = {"per_class": 3}
    if strategy in ("image", "image-label"):
        src = write_imagefolder(tmp_path / "src", classes=("tench", "goldfish"), per_class=2, size=40, mode="RGB")
        kw = {"per_image": 1, "source": f"imagefolder:{src}"}
    out = tmp_path / "g"
    runner.generate(gen, strategy, ["tench", "goldfish"], out, seed=3, progress=False, **kw)
    rows = runner.read_manifest(out)
    assert len(rows) >= 4 and {r["batch_size"] for r in rows} == {4, len(rows) - 4} - {0}
    for r in rows:
        img = runner.regenerate(gen, out, r["file_name"], source=kw.get("source"))
        assert encode_png(img) == (out / r["file_name"]).read_bytes(), r["file_name"]
