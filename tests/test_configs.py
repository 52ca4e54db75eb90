"""The YAML recipes in configs/ and `train --config`; `train --pretrained` from local timm weights.

Every configs/*.yaml is checked by glob: it parses through the CLI's config mechanism, and the data pipeline and
model it names are built on tiny stand-in folders (the trainer replaced by one forward pass: a ResNet-50 epoch
on CPU is too slow for a test).
"""
import json
import pathlib

import pytest
import torch
import yaml

from genrobust import train as tr
from genrobust.cli import apply_config, build_parser, main, read_config

import realistic
from conftest import write_imagefolder
from helpers import fails

CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml")
                 if not p.name.endswith("-study.yaml"))  # study configs: tests/test_study.py
WNIDS = tuple(realistic.imagenet100_classes(3))


def _parse(argv):
    """`genrobust train ARGV` as cmd_train sees it, the config applied."""
    argv = ["train", *argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
    return apply_config(args)


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """ImageNet-like train and generated folders (tests/realistic.py): JPEGs and PNGs of mixed sizes (50 to 500
    px, aspect 1:3 to 3:1) and modes (the first file greyscale, CMYK, RGBA, palette, EXIF-rotated, a PNG under
    a .JPEG name), upper- and lower-case extensions; no corrupt file (these runs are about the recipes)."""
    root = tmp_path_factory.mktemp("fake-imagenet")
    realistic.imagefolder(root / "train", WNIDS, 4)
    realistic.imagefolder(root / "generated", WNIDS, 4, seed=1)
    return root / "train", root / "generated"


def _stand_ins(cfg, fake_imagenet, tmp_path):
    """Flags that point a recipe at tiny stand-in data and keep its model, augmentation and pipeline."""
    real, generated = fake_imagenet
    argv = ["--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"]
    if str(cfg.get("real", "")).startswith("imagefolder:"):
        argv += ["--real", f"imagefolder:{real}", "--input-size", "32"]
    elif cfg.get("generated"):  # an embedded real set (digits): a generated folder of its classes and shape
        from genrobust.data import load_dataset

        data = load_dataset(cfg["real"])
        need = -(-round(cfg.get("ratio", 1) * len(data)) // len(data.classes))
        generated = write_imagefolder(tmp_path / "generated", classes=tuple(data.classes), per_class=need,
                                      size=data.images.shape[-1], mode="L" if data.images.shape[1] == 1 else "RGB")
    if cfg.get("generated"):
        argv += ["--generated", str(generated)]
    return argv


def _one_batch(calls):
    """A stand-in for `train`: the trainer's own model, augmentation and batches, one forward pass."""
    from genrobust.augment import create_augmentation

    def fake_train(data, out, config, device="cpu", data_info=None, **kwargs):
        cfg = config.resolved()
        channels = data.images.shape[1] if hasattr(data, "images") else data.channels
        model = tr.create_classifier(cfg.model, len(data.classes), channels, pretrained=cfg.pretrained)
        size = tr._input_size(data, model, cfg)
        if hasattr(data, "images"):
            batches = tr._InMemory(data, torch.device(device))
        else:
            batches = tr._Streamed(data, torch.device(device), size, cfg.workers, "bilinear")
        plan = tr.epoch_plan(len(data), cfg.batch_size, cfg.seed, 0)
        x, y, n = next(iter(batches(plan[:1])))
        augment = create_augmentation(cfg.augmentation, flip=cfg.flip)
        x, y = augment(x.float().div_(255), torch.nn.functional.one_hot(y, len(data.classes)).float(),
                       torch.Generator().manual_seed(0))
        mean, std = tr.normalization(model, channels)
        with torch.inference_mode():
            logits = model.eval()((x - mean) / std)
        batches.close()
        calls.append({"config": cfg, "data": data, "info": data_info, "x": x, "logits": logits, "size": size})
        return [{"train_acc": 0.0}]

    return fake_train


# --- every recipe in configs/ --------------------------------------------------------------------------

def test_there_are_recipes_for_the_paper_grid():
    names = {p.stem for p in CONFIGS}
    for data in ("imagenet100", "imagenet1k"):
        for model in ("resnet18", "resnet50"):
            assert {f"{data}-{model}-real", f"{data}-{model}-real+generated"} <= names
    assert {"digits-real", "digits-real+generated"} <= names
    assert (CONFIGS[0].parent / "README.md").exists()
    readme = (CONFIGS[0].parent / "README.md").read_text()
    assert all(p.name in readme for p in CONFIGS), "configs/README.md lists every recipe"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_parses_and_builds_its_model_and_data(path, fake_imagenet, tmp_path, monkeypatch, capsys):
    cfg = yaml.safe_load(path.read_text())
    train_parser = build_parser().parse_args(["train"]).parsers[1]
    dests = {a.dest for a in train_parser._actions}
    assert set(cfg) <= dests, f"unknown keys {set(cfg) - dests}"
    assert read_config(path, train_parser).keys() == cfg.keys()
    monkeypatch.setenv("GENROBUST_DATA", str(tmp_path / "not-used"))
    args = _parse(["--config", str(path)])
    for key, value in cfg.items():
        if key in ("real", "generated"):
            continue
        assert getattr(args, key) == value, key
    assert args.out and (args.real.startswith("imagefolder:") or args.real.startswith("digits-"))
    # The pipeline on stand-in data, through the CLI: the same checks and data assembly as a real run.
    calls = []
    monkeypatch.setattr(tr, "train", _one_batch(calls))
    assert main(["train", "--config", str(path), *_stand_ins(cfg, fake_imagenet, tmp_path)]) == 0, \
        capsys.readouterr().err
    (call,) = calls
    config, data, info = call["config"], call["data"], call["info"]
    assert config.model == cfg["model"] and config.augmentation == cfg.get("augmentation", "standard")
    assert config.config_file == str(path) and config.lr == cfg["lr"]
    assert call["logits"].shape == (len(call["x"]), len(data.classes)) and torch.isfinite(call["logits"]).all()
    if cfg.get("generated"):
        assert info["mode"] == cfg["mode"] and info["ratio"] == cfg["ratio"]
        assert sum(info["counts"]["generated"].values()) == round(cfg["ratio"] * sum(info["counts"]["real"].values()))
    else:
        assert info["mode"] == "real-only"
    if cfg.get("stream") == "on":
        assert info["stream"] and call["size"] == (32, 32) and data.channels == 3
        assert list(data.classes) == list(WNIDS)


def test_a_recipe_trains_end_to_end_and_lands_in_the_checkpoint(fake_imagenet, tmp_path, monkeypatch):
    """One real (tiny) run: the file's values and its path reach config.yaml, overrides win, data reach data.json."""
    path = CONFIGS[0].parent / "imagenet100-resnet18-real+generated.yaml"
    cfg = yaml.safe_load(path.read_text())
    real, generated = fake_imagenet
    monkeypatch.setenv("GENROBUST_DATA", str(real.parent))  # only to show it is expanded; --real replaces it
    out = tmp_path / "ck"
    assert main(["train", "--config", str(path), "--real", f"imagefolder:{real}", "--generated", str(generated),
                 "--epochs", "1", "--batch-size", "8", "--input-size", "32", "--workers", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["config_file"] == str(path) and saved["epochs"] == 1 and saved["batch_size"] == 8
    for key in ("model", "lr", "weight_decay", "momentum", "schedule", "warmup_epochs", "label_smoothing",
                "augmentation", "flip", "amp", "seed"):
        assert saved[key] == cfg[key], key
    info = json.loads((out / "data.json").read_text())
    assert info["generated"] == [str(generated)] and info["ratio"] == 1 and info["stream"] is True
    assert info["counts"]["generated"] == dict.fromkeys(WNIDS, 4)
    assert tr.is_complete(out)


# --- the config mechanism ------------------------------------------------------------------------------

def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flags_override_the_file(tmp_path):
    path = _write(tmp_path, "model: resnet18\nlr: 0.4\nweight_decay: 1e-4\nflip: true\nepochs: 7\n"
                            "generated: [a, b]\nmilestones: [0.3, 0.6]\nstream: 'on'\nout: runs/x\n")
    args = _parse(["--config", str(path)])
    assert (args.model, args.lr, args.weight_decay, args.flip, args.epochs) == ("resnet18", 0.4, 1e-4, True, 7)
    assert args.generated == ["a", "b"] and args.milestones == [0.3, 0.6] and args.stream == "on"
    assert args.out == "runs/x" and args.batch_size == 128  # a key left out keeps the flag's default
    args = _parse(["--config", str(path), "--lr", "0.05", "--no-flip", "--generated", "c", "--epochs", "7",
                   "--milestones", "0.5", "--out", "elsewhere"])
    assert (args.lr, args.flip, args.generated, args.milestones, args.out) == (0.05, False, ["c"], [0.5], "elsewhere")
    assert args.model == "resnet18" and args.config == str(path)


def test_environment_variables_in_the_file(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, "real: imagefolder:$GENROBUST_TEST_ROOT/train\ngenerated: ['${GENROBUST_TEST_ROOT}/g']\n")
    monkeypatch.setenv("GENROBUST_TEST_ROOT", "/data")
    args = _parse(["--config", str(path)])
    assert args.real == "imagefolder:/data/train" and args.generated == ["/data/g"]
    monkeypatch.delenv("GENROBUST_TEST_ROOT")
    line = fails(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "ck")])
    assert "real 'imagefolder:$GENROBUST_TEST_ROOT/train' uses $GENROBUST_TEST_ROOT, which is not set" in line
    # a flag that replaces the value needs no variable
    args = _parse(["--config", str(path), "--real", "digits-mnist/train", "--generated", "g"])
    assert args.real == "digits-mnist/train" and args.generated == ["g"]


@pytest.mark.parametrize("text, message", [
    ("batch_sise: 8\n", "unknown key 'batch_sise'; did you mean batch_size?"),
    ("batch-size: 8\n", "unknown key 'batch-size'; did you mean batch_size?"),
    ("zzzz: 1\n", "unknown key 'zzzz'; keys are flag names with underscores"),
    ("epochs: 1.5\n", "epochs 1.5 is not a valid int"),
    ("stream: on\n", "stream must be a string, got True (YAML reads a bare on/off/yes/no as true/false: quote it)"),
    ("optimizer: lamb\n", "optimizer 'lamb' is not one of sgd, adamw"),
    ("generated: runs/g\n", "generated must be a non-empty list (generated: [...])"),
    ("flip: 1\n", "flip must be true or false"),
    ("epochs:\n", "epochs is empty"),
    ("- epochs\n", "expected a mapping of flag names to values, got list"),
    ("lr: [0.1\n", "not valid YAML"),
], ids=["typo", "hyphens", "far-off", "float-for-int", "bare-on", "choice", "not-a-list", "not-a-bool", "empty",
        "not-a-mapping", "bad-yaml"])
def test_bad_recipes_are_one_line_errors(capsys, tmp_path, text, message):
    path = _write(tmp_path, text)
    line = fails(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "ck")])
    assert line.startswith(f"genrobust: error: --config {path}") and message in line, line


def test_a_missing_config_file_or_out_is_an_error(capsys, tmp_path):
    line = fails(capsys, ["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "ck")])
    assert line == f"genrobust: error: --config {tmp_path / 'nope.yaml'}: no such file"
    line = fails(capsys, ["train", "--config", str(_write(tmp_path, "epochs: 1\n"))])
    assert "train needs --out FOLDER (or `out:` in the --config file)" in line


def test_yaml_is_data_never_code(tmp_path, capsys):
    path = _write(tmp_path, "model: !!python/object/apply:os.system ['touch pwned']\n")
    line = fails(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "ck")])
    assert "not valid YAML" in line and not pathlib.Path("pwned").exists()


# --- pretrained weights from a local file ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """A test_resnet (1000 classes, as ImageNet weights are) saved as safetensors, as a torch state dict, and
    as a hub-style folder."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    save_file(state, root / "weights.safetensors")
    torch.save(state, root / "weights.pth")
    (root / "hub").mkdir()
    torch.save(state, root / "hub" / "pytorch_model.bin")
    return root, state


def _differing(model, state):
    got = model.state_dict()
    return sorted(k for k in state if got[k].shape != state[k].shape or not torch.equal(got[k], state[k]))


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pth", "hub"])
def test_pretrained_weights_load_and_the_head_is_reset_for_other_classes(saved_weights, name):
    root, state = saved_weights
    same = tr.create_classifier("test_resnet", 1000, 3, pretrained=root / name)
    assert _differing(same, state) == []
    other = tr.create_classifier("test_resnet", 4, 3, pretrained=root / name)
    assert _differing(other, state) == ["fc.bias", "fc.weight"] and other.fc.out_features == 4
    gray = tr.create_classifier("test_resnet", 4, 1, pretrained=root / name)  # stem summed over RGB
    assert torch.allclose(gray.state_dict()["conv1.0.weight"], state["conv1.0.weight"].sum(1, keepdim=True))


def test_training_starts_from_the_pretrained_weights(saved_weights, tmp_path, monkeypatch, tiny_images):
    """Through the CLI: the model train() builds holds the saved weights (all but the new head) at step 0."""
    root, state = saved_weights
    create, at_step_0 = tr.create_classifier, []

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        at_step_0.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(tr, "create_classifier", recording)
    real = tiny_images("real", classes=("0", "1", "2"), per_class=4, size=32, mode="RGB")
    out = tmp_path / "ck"
    assert main(["train", "--real", f"imagefolder:{real}", "--model", "test_resnet", "--pretrained",
                 str(root / "weights.safetensors"), "--epochs", "1", "--augmentation", "none", "--out", str(out),
                 "--device", "cpu"]) == 0
    (start,) = at_step_0
    assert sorted(k for k in state if not torch.equal(start[k], state[k]) or start[k].shape != state[k].shape) \
        == ["fc.bias", "fc.weight"]
    assert start["fc.weight"].shape == (3, state["fc.weight"].shape[1])
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrained"] == str(root / "weights.safetensors")
    final = tr.load_checkpoint(out)[0].state_dict()  # trained from there: the weights moved
    assert not torch.equal(final["conv1.0.weight"], state["conv1.0.weight"])


def test_missing_or_unreadable_pretrained_weights_are_one_line_errors(capsys, tmp_path, saved_weights):
    argv = ["train", "--model", "test_resnet", "--out", str(tmp_path / "ck"), "--pretrained"]
    line = fails(capsys, argv + [str(tmp_path / "nope.safetensors")])
    assert f"--pretrained {tmp_path / 'nope.safetensors'}: no such file or folder" in line
    (tmp_path / "empty").mkdir()
    line = fails(capsys, argv + [str(tmp_path / "empty")])
    assert "the folder holds no model.safetensors or pytorch_model.bin" in line
    assert not (tmp_path / "ck").exists()  # checked before any data is read
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        tr.create_classifier("test_resnet", 4, 3, pretrained=tmp_path / "nope.pth")
    # a pickle that needs code to load is refused (torch.load weights_only=True)
    torch.save({"model": saved_weights[1], "why": pathlib.Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"cannot load --pretrained .*pickled.pth into test_resnet: .*weights_only"):
        tr.create_classifier("test_resnet", 4, 3, pretrained=tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"cannot load --pretrained .* into resnet18: Error\(s\) in loading"):
        tr.create_classifier("resnet18", 1000, 3, pretrained=saved_weights[0] / "weights.safetensors")
