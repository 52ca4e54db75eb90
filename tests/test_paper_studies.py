"""The paper-scale study configs (configs/imagenet100-study.yaml, configs/imagenet1k-study.yaml), each run end
to end on tiny fake ImageNet folders with tiny random-weight SD pipelines saved where the config expects the
user's local models. The grid is the config's own (strategies, generators, amounts, augmentations, controls,
models, evaluation sets, baseline); only sizes shrink: images, steps, epochs, batch, one process."""
import json
import pathlib

import numpy as np
import pytest
import yaml

import tiny_models
from genrobust import evaluate as ev
from genrobust.study import load_study, plan, resolve_study, run_study

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
SHRINK = {"per_class": 2, "epochs": 1, "processes": 1}
GENERATOR_SHRINK = {"steps": 2, "height": 64, "width": 64, "batch_size": 4}
TRAIN_SHRINK = {"input_size": 32, "workers": 0, "batch_size": 8}


def _jpegs(folder, n, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")


def _classes():
    """Three ImageNet-100 wnids: one in ImageNet-R, one mapped to an ObjectNet class, one in neither."""
    in100 = ev.reference("imagenet100_wnids.json")["wnids"]
    r = set(ev.reference("imagenet_r_wnids.json")["wnids"])
    on = {w: c["objectnet_folder"] for c in ev.reference("objectnet_to_imagenet.json")["classes"]
          for w in c["imagenet_wnids"]}
    r_class = next(w for w in in100 if w in r)
    on_class = next(w for w in in100 if w in on)
    plain = next(w for w in in100 if w not in r and w not in on)
    return sorted([r_class, on_class, plain]), on


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """$GENROBUST_DATA as the configs expect it: real train folders, the evaluation sets, retrieval folders and
    the local model folders (tiny random SD pipelines)."""
    root = tmp_path_factory.mktemp("genrobust-data")
    classes, on = _classes()
    v2_folder = {w: str(i) for i, w in enumerate(ev.reference("imagenet_v2_folder_order.json")["folder_to_wnid"])}
    for i, w in enumerate(classes):
        for train in ("imagenet100/train", "imagenet/train", "retrieval/imagenet100", "retrieval/imagenet1k"):
            _jpegs(root / train / w, 2, seed=i)
        _jpegs(root / "imagenet/val" / w, 2, seed=10 + i)
        _jpegs(root / "imagenetv2-matched-frequency-format-val" / v2_folder[w], 2, seed=20 + i)
        _jpegs(root / "imagenet-sketch/sketch" / w, 2, seed=30 + i)
        if w in set(ev.reference("imagenet_r_wnids.json")["wnids"]):
            _jpegs(root / "imagenet-r" / w, 2, seed=40 + i)
        if w in on:
            _jpegs(root / "objectnet-1.0/images" / on[w], 2, seed=50 + i)
    tiny_models.tiny_sd(root / "models" / "stable-diffusion-v1-5")
    tiny_models.tiny_sd_variation(root / "models" / "sd-image-variations-diffusers")
    return root


def _shrunk(name):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg.update(SHRINK)
    cfg["generator"].update(GENERATOR_SHRINK)
    for g in cfg["generators"].values():
        g.update(GENERATOR_SHRINK)
    cfg["train"].update(TRAIN_SHRINK)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet100-study.yaml", "imagenet1k-study.yaml"])
def test_paper_study_config_end_to_end(name, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("GENROBUST_DATA", str(data_root))
    full = load_study(CONFIGS / name)
    assert full["per_class"] == 1300 and full["models"] == ["resnet18", "resnet50"]
    assert [s["strategy"] for s in full["strategies"]] == ["label", "templates", "image", "image-label"]
    assert full["generators"]["variations"]["guidance"] == 3.0 and full["processes"] == 8

    cfg, out = resolve_study(_shrunk(name)), tmp_path / "out"
    cells = plan(cfg, out)
    done = run_study(cfg, out, progress=False)
    assert not done["failed"] and done["report"] is not None
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    arms = {r["model"] for r in rows}
    for model in ("resnet18", "resnet50"):
        assert {f"real-standard@{model}", f"real+label-k1@{model}", f"image-variation-only@{model}",
                f"real+img2img-k1@{model}", f"real-step-matched@{model}", f"real+retrieval-k1@{model}",
                f"real-augmix@{model}"} <= arms
    assert {r["eval_set"] for r in rows} == {"imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r",
                                             "objectnet"}
    gen = [c for c in cells if c.kind == "generation"]
    assert [c.inputs["generator"]["name"] for c in gen] == ["text2img", "text2img", "image-variation", "img2img"]
    manifest = [json.loads(line) for line in (gen[2].folder / "metadata.jsonl").read_text().splitlines()]
    assert {r["guidance_scale"] for r in manifest} == {3.0} and len(manifest) == 6
    md = (out / "report.md").read_text()
    assert "## Study figures" in md and "testbed" in md
