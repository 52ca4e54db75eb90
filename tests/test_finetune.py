"""Fine-tuning generators on real data (genrobust.finetune): tiny random-weight Stable Diffusion on a tiny fake
ImageFolder, and a reduced digits-ddpm fine-tune; offline, CPU."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from conftest import write_imagefolder
from genrobust import finetune as ft
from genrobust.cli import main
from genrobust.generate import Request, create_generator, digits_ddpm
from helpers import fails

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_models.tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    # 40 px images: the 64 px model's training resizes and crops them
    return write_imagefolder(tmp_path_factory.mktemp("photos") / "real", classes=("cat", "dog"), per_class=4,
                             size=40, mode="RGB")


def run(base, photos, out, **kwargs):
    settings = dict(model=base, steps=3, batch_size=4, save_every=2, workers=0, progress=False, lr=1e-3,
                    command="test")
    return ft.finetune("text2img", f"imagefolder:{photos}", out, **{**settings, **kwargs})


def changed(a, b):
    wa, wb = load_file(a / UNET), load_file(b / UNET)
    assert wa.keys() == wb.keys()
    return {k for k in wa if not torch.equal(wa[k], wb[k])}


@pytest.fixture(scope="module")
def full(base, photos, tmp_path_factory):
    losses = []
    out = run(base, photos, tmp_path_factory.mktemp("full") / "out", callback=lambda step, loss: losses.append(loss))
    return out, losses


def test_full_finetune_trains_and_reloads_as_a_generator(base, full):
    out, losses = full
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert not (out / "checkpoints").exists()  # removed once the folder is complete
    assert len(changed(base, out)) > 0
    card = json.loads((out / "card.json").read_text())
    assert card["base"]["model"] == str(base) and len(card["base"]["revision"]) == 16
    assert card["data"]["num_images"] == 8 and card["data"]["counts"] == {"cat": 4, "dog": 4}
    assert card["data"]["prompts"] == {"cat": "a photo of a cat.", "dog": "a photo of a dog."}
    training = card["training"]
    assert (training["steps"], training["lr"], training["seed"], training["mode"]) == (3, 1e-3, 0, "full")
    assert card["command"] == "test" and "fine-tuned on" in (out / "README.md").read_text()
    gen = create_generator("text2img", model=str(out), steps=2)
    assert gen.revision == card["revision"] != card["base"]["revision"]
    images, _ = gen.generate([Request(class_id=0, class_name="cat", index=0, seed=1, prompt="a photo of a cat.")])
    assert images[0].shape == (3, 64, 64) and images[0].dtype == torch.uint8


def test_lora_changes_only_attention_projections_and_keeps_the_adapter(base, photos, tmp_path):
    out = run(base, photos, tmp_path / "lora", mode="lora", lora_rank=2, lr=5e-2, grad_checkpointing=True)
    keys = changed(base, out)
    assert keys and all(any(f".{t}.weight" in k for t in ft.LORA_TARGETS) for k in keys)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # the adapter on the base computes what the merged UNet computes
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(out / "lora")
    merged = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        a = pipe.unet(x, 10, encoder_hidden_states=cond).sample
        b = merged(x, 10, encoder_hidden_states=cond).sample
    plain = UNet2DConditionModel.from_pretrained(base / "unet", local_files_only=True)
    with torch.no_grad():
        c = plain(x, 10, encoder_hidden_states=cond).sample
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(b, c, atol=1e-5)


class Stop(Exception):
    pass


def stop_at(step):
    def callback(done, loss):
        if done == step:
            raise Stop
    return callback


def test_resumed_run_equals_an_uninterrupted_one(base, photos, tmp_path):
    # EMA and gradient accumulation included: both carry state across steps that a resume must restore
    kwargs = dict(steps=4, ema=True, grad_accum=2, batch_size=3)
    whole = run(base, photos, tmp_path / "whole", **kwargs)
    with pytest.raises(Stop):
        run(base, photos, tmp_path / "cut", callback=stop_at(3), **kwargs)
    assert [d.name for d in ft.checkpoints(tmp_path / "cut")] == ["step-0000002"]
    assert not (tmp_path / "cut" / "card.json").exists()
    resumed = run(base, photos, tmp_path / "cut", **kwargs)
    # bit-exact on CPU: every random draw is re-derived from its micro-batch, weights and optimizer state are
    # restored from safetensors and torch.save
    assert changed(whole, resumed) == set()
    log = json.loads((resumed / "card.json").read_text())["training"]["log"]
    assert [r["step"] for r in log] == [2, 4]


def test_a_complete_folder_is_reused_and_other_settings_are_refused(base, photos, full):
    out, _ = full
    stamp = (out / "card.json").stat().st_mtime_ns
    assert run(base, photos, out) == out
    assert (out / "card.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"lr 0\.001 \(now 0\.002\)"):
        run(base, photos, out, lr=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(generator="img2img"), "cannot be fine-tuned"),
    (dict(generator="text2img", model=None), "needs the base model"),
    (dict(mode="dora"), "unknown fine-tuning mode"),
    (dict(prompt="a photo"), "exactly one"),
    (dict(resolution=62), "multiple of 4"),
    (dict(generator="digits-ddpm", model=None, mode="lora"), "digits-ddpm .* takes no mode"),
])
def test_bad_settings_fail_before_training(base, photos, tmp_path, kwargs, match):
    settings = dict(generator="text2img", model=base, steps=1, batch_size=2, workers=0, progress=False)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ft.finetune(dataset=f"imagefolder:{photos}", out=tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_an_in_memory_dataset_spec_with_its_own_prompt(base, tmp_path):
    # digits are 1 x 28 x 28: made RGB and resized to the model's 64 px
    out = ft.finetune("text2img", "digits-mnist/train", tmp_path / "digits", model=base, steps=1, batch_size=2,
                      workers=0, progress=False, prompt="a handwritten digit {}.")
    data = json.loads((out / "card.json").read_text())["data"]
    assert data["prompts"]["7"] == "a handwritten digit 7." and data["counts"]["7"] == 100


def test_prompts_name_imagenet_wnids_by_their_class_names():
    assert ft.prompt_name("n01440764") == "tench"
    assert ft.prompt_name("goldfish") == "goldfish" and ft.prompt_name("n00000000") == "n00000000"


def test_refuses_a_folder_that_holds_something_else(base, photos, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no fine-tuning run"):
        run(base, photos, tmp_path / "out")


# --- digits-ddpm ---------------------------------------------------------------------------------------

def digits(out, base, **kwargs):
    return ft.finetune_digits(out, "digits-mnist/train", **{"steps": 4, "lr": 1e-3, "base": base, "batch_size": 8,
                                                            "save_every": 2, "progress": False,
                                                            "sample_grid": False, **kwargs})


def test_digits_finetune_of_the_shipped_model_loads_as_a_generator(tmp_path):
    from genrobust.generate.generators import SHIPPED

    # the shipped base (base=None), reduced to 2 steps of 8 images
    out = digits(tmp_path / "ft", None, steps=2, command="genrobust generator finetune ...")
    assert changed(SHIPPED, out)
    card = json.loads((out / "card.json").read_text())
    assert card["finetune"]["base"]["path"] == "shipped" and len(card["finetune"]["base"]["revision"]) == 16
    assert card["finetune"]["num_images"] == 1000 and card["finetune"]["counts"]["0"] == 100
    assert card["training_data"] == ["digits-mnist/train (handwritten)"]
    assert card["training"]["steps_done"] == 2 and card["training"]["command"].startswith("genrobust generator")
    assert "fine-tuned on digits-mnist/train" in (out / "README.md").read_text()
    gen = create_generator("digits-ddpm", path=out, steps=2)
    images, _ = gen.generate([Request(class_id=3, class_name="3", index=0, seed=5, prompt="a handwritten digit 3.")])
    assert images.shape == (1, 1, 28, 28)


def test_digits_finetune_resumes_exactly_and_is_idempotent(tiny_generator_dir, tmp_path, monkeypatch):
    whole = digits(tmp_path / "whole", tiny_generator_dir)
    update, calls = digits_ddpm._ema_update, []

    def dies_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Stop
        update(*args)

    with monkeypatch.context() as m:
        m.setattr(digits_ddpm, "_ema_update", dies_at_step_3)
        with pytest.raises(Stop):
            digits(tmp_path / "cut", tiny_generator_dir)
    assert json.loads((tmp_path / "cut" / "card.json").read_text())["training"]["steps_done"] == 2
    resumed = digits(tmp_path / "cut", tiny_generator_dir)
    assert changed(whole, resumed) == set()
    monkeypatch.setattr(digits_ddpm, "train", lambda *a, **k: pytest.fail("a complete folder was trained again"))
    assert digits(tmp_path / "cut", tiny_generator_dir) == resumed
    with pytest.raises(ValueError, match="steps 4 \\(now 6\\)"):
        digits(tmp_path / "cut", tiny_generator_dir, steps=6)


def test_digits_style_and_data_are_checked(tiny_generator_dir, tmp_path, tiny_images):
    with pytest.raises(ValueError, match="unknown digits style"):
        digits(tmp_path / "a", tiny_generator_dir, style="cursive")
    letters = tiny_images("letters", classes=("a", "b"))
    with pytest.raises(ValueError, match="not digits-ddpm classes"):
        ft.finetune_digits(tmp_path / "b", f"imagefolder:{letters}", base=tiny_generator_dir, progress=False)


# --- CLI -----------------------------------------------------------------------------------------------

def test_cli_finetune_and_its_one_line_errors(base, photos, tmp_path, capsys):
    common = ["generator", "finetune", "--generator", "text2img", "--model", str(base), "--dataset", str(photos),
              "--workers", "0", "--quiet", "--device", "cpu"]
    out = tmp_path / "cli"
    assert main([*common, "--out", str(out), "--steps", "1", "--batch-size", "2"]) == 0
    assert f"fine-tuned text2img written to {out}" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["command"].startswith("genrobust generator finetune --generator text2img")
    assert card["training"]["lr"] == 1e-5  # diffusers' full fine-tuning default
    assert "--generator-path is for digits-ddpm" in fails(capsys, [*common, "--generator-path", "x", "--out",
                                                                   str(tmp_path / "x")])
    missing = ["--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]
    assert "no folder" in fails(capsys, [*common, *missing])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
