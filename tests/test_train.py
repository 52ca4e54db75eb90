"""The trainer: recipe, checkpoints, resume, NaN stops, streaming, DDP under torchrun, and its CLI errors."""
import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genrobust import train as tr
from genrobust.cli import main
from genrobust.data import load_dataset
from genrobust.data.folder import export_imageset
from genrobust.data.imageset import ImageSet
from genrobust.data.mixing import FileSet, build_training_set
from helpers import digits_subset, fails

DIGITS = [str(i) for i in range(10)]
FAST = "test_efficientnet_ln"  # a tiny timm model without BatchNorm: ~0.05 s per epoch of 40 digits
REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**kw):
    return tr.TrainConfig(**{"model": FAST, "epochs": 2, "batch_size": 16, "seed": 0, **kw})


# --- recipe --------------------------------------------------------------------------------------------

def test_checkpoint_folder(trained):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "complete.json", "config.yaml", "data.json",
                                                     "metrics.csv", "model.safetensors"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {**trained["config"].to_dict(), "lr": 0.1, "weight_decay": 5e-4, "in_chans": 1,
                   "input_size": [28, 28], "num_classes": 10}
    assert json.loads((out / "classes.json").read_text()) == DIGITS
    info = json.loads((out / "data.json").read_text())
    assert info == {"name": "digits-mnist/train[:40]", "num_images": 40, "real": "digits-mnist/train",
                    "label": "tiny real"}
    done = json.loads((out / "complete.json").read_text())
    assert done["epochs"] == 2 and done["steps"] == 4 and done["world_size"] == 1 and done["amp"] == "none"
    with open(out / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in metrics] == [1, 2]
    assert list(metrics[0]) == ["epoch", "train_loss", "train_acc", "lr", "seconds"]
    assert [float(r["train_loss"]) for r in metrics] == [r["train_loss"] for r in trained["rows"]]
    assert tr.read_metrics(out) == trained["rows"]
    assert all(0 <= float(r["train_acc"]) <= 1 for r in metrics)
    # warm-up then cosine: 2 steps per epoch, warm-up 2 steps, so the last lr is 0.1 * 0.5 * (1 + cos(pi/2))
    assert float(metrics[0]["lr"]) == pytest.approx(0.1)
    assert float(metrics[1]["lr"]) == pytest.approx(0.05)


def test_lr_schedules_exact():
    assert [tr.lr_at(s, 10, 2, 1.0) for s in (0, 1)] == [0.5, 1.0]
    assert tr.lr_at(2, 10, 2, 1.0) == 1.0
    assert tr.lr_at(6, 10, 2, 1.0) == pytest.approx(0.5)
    assert tr.lr_at(10, 10, 2, 1.0) == pytest.approx(0.0)
    # cyclic: up during the warm-up, then linearly down to 0 at the end
    assert [tr.lr_at(s, 10, 2, 1.0, "cyclic") for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    # step: x 0.1 from 50% and again from 75% of the 20 steps, after a 2-step warm-up
    lrs = [tr.lr_at(s, 20, 2, 1.0, "step", (0.5, 0.75), 0.1) for s in range(20)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:10] == [1.0] * 8
    assert lrs[10:15] == pytest.approx([0.1] * 5) and lrs[15:] == pytest.approx([0.01] * 5)
    assert tr.lr_at(0, 10, 0, 1.0) == 1.0  # no warm-up
    assert tr._lr_at is tr.lr_at


def test_config_resolution_and_checks():
    assert (tr.TrainConfig().resolved().lr, tr.TrainConfig().resolved().weight_decay) == (0.1, 5e-4)
    adamw = tr.TrainConfig(optimizer="adamw").resolved()
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.05)
    assert tr.TrainConfig(optimizer="adamw", lr=3e-4, weight_decay=0.0).resolved().lr == 3e-4
    for bad, match in [({"optimizer": "adam"}, "optimizer must be one of sgd, adamw"),
                       ({"schedule": "linear"}, "schedule must be one of"), ({"amp": "fp8"}, "amp must be"),
                       ({"epochs": 0}, "epochs must be >= 1"), ({"label_smoothing": 1.0}, "label smoothing"),
                       ({"lr": -1.0}, "lr must be > 0"), ({"milestones": (0.5, 1.5)}, "milestones")]:
        with pytest.raises(ValueError, match=match):
            tr.TrainConfig(**bad).resolved()


def test_optimizers_and_no_decay_on_norms_and_biases():
    model = tr.create_classifier("test_resnet", 4, 1)
    for name, cls in [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)]:
        opt = tr._optimizer(model, tr.TrainConfig(optimizer=name).resolved())
        assert isinstance(opt, cls)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
        assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_amp_and_channels_last_only_on_cuda(caplog):
    dtype, scaler = tr._amp(tr.TrainConfig().resolved(), torch.device("cpu"))
    assert dtype is None and not scaler.is_enabled()
    dtype, scaler = tr._amp(tr.TrainConfig(amp="fp16").resolved(), torch.device("cpu"))
    assert dtype is None and not scaler.is_enabled()
    assert "applies on CUDA only" in caplog.text


def test_epoch_plan_slices_are_disjoint_and_cover_the_epoch():
    one = tr.epoch_plan(23, 8, seed=3, epoch=1)
    assert [n for _, n in one] == [8, 8, 7]
    assert sorted(torch.cat([i for i, _ in one]).tolist()) == list(range(23))
    two = [tr.epoch_plan(23, 8, 3, 1, rank=r, world=2) for r in range(2)]
    for step, (idx, n) in enumerate(one):
        assert torch.equal(torch.cat([two[0][step][0], two[1][step][0]]), idx)  # rank 0 | rank 1 = the batch
        assert two[0][step][1] == two[1][step][1] == n
    assert tr.epoch_plan(23, 8, 3, 2)[0][0].tolist() != one[0][0].tolist()  # a new permutation each epoch
    # a last batch too small to give each of 4 ranks an image is dropped, on every rank alike
    assert [n for _, n in tr.epoch_plan(17, 8, 0, 0, rank=3, world=4)] == [8, 8]


def test_loaded_checkpoint_predicts_like_the_trained_model(trained):
    model, cfg, classes = tr.load_checkpoint(trained["out"])
    assert classes == DIGITS and cfg["model"] == "test_resnet" and not model.training
    images = load_dataset("digits-mnist/test").images[:64]
    expected = tr.predict(trained["model"], images)
    got = tr.predict(model, images)
    assert got.shape == (64, 10)
    assert torch.equal(got, expected)
    # eval mode: a prediction does not depend on the rest of its batch
    assert torch.allclose(tr.predict(model, images[:5], batch_size=1), got[:5], atol=1e-5)


def test_training_is_repeatable(trained, tmp_path):
    tr.train(trained["data"], tmp_path / "again", trained["config"], progress=False)
    first = (trained["out"] / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first


@pytest.mark.parametrize("name,kwargs", [("mixup", {}), ("augmix", {"jsd": True})])
def test_soft_target_and_jsd_augmentations_train(tmp_path, monkeypatch, name, kwargs):
    from genrobust import augment

    made = []

    def create(n, **kw):
        made.append(augment.create_augmentation(name, **kw, **kwargs))
        return made[-1]

    monkeypatch.setattr(tr, "create_augmentation", create)
    rows = tr.train(digits_subset(2), tmp_path / name, _config(epochs=1, augmentation=name), progress=False)
    assert made[0].jsd == bool(kwargs) and rows[0]["train_loss"] > 0 and 0 <= rows[0]["train_acc"] <= 1


def test_normalization_reduces_to_one_channel():
    model = tr.create_classifier("test_resnet", 4, 1)
    mean, std = tr.normalization(model, 1)
    assert mean.shape == std.shape == (1, 1, 1, 1)
    mean3, std3 = tr.normalization(tr.create_classifier("test_resnet", 4, 3), 3)
    assert mean3.shape == (1, 3, 1, 1)
    assert mean.item() == pytest.approx(mean3.mean().item())


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown timm model 'test_resnt'; did you mean test_resnet"):
        tr.create_classifier("test_resnt", 10, 1)
    with pytest.raises(ValueError, match=r"unknown timm model 'qqqqzzzz'; see timm.list_models\(\)"):
        tr.create_classifier("qqqqzzzz", 10, 1)


def test_unknown_model_in_train_raises(tmp_path):
    with pytest.raises(ValueError, match="did you mean test_resnet"):
        tr.train(digits_subset(1), tmp_path / "x", tr.TrainConfig(model="test_resnt", epochs=1), progress=False)
    assert not (tmp_path / "x").exists()


def test_one_class_is_an_error(tmp_path):
    one = ImageSet("one", torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["0"])
    with pytest.raises(ValueError, match="one has 1 class; a classifier needs at least 2"):
        tr.train(one, tmp_path / "x", _config(epochs=1), progress=False)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_load_checkpoint_of_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a genrobust checkpoint folder"):
        tr.load_checkpoint(tmp_path)


# --- checkpoints, resume, refusal, NaN -----------------------------------------------------------------

class Killed(Exception):
    pass


def _state(out):
    return load_file(pathlib.Path(out) / "model.safetensors")


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_after_a_kill_between_epochs_matches_an_uninterrupted_run(tmp_path):
    data, config = digits_subset(), tr.TrainConfig(model="test_resnet", epochs=3, batch_size=16, seed=1)
    full = tr.train(data, tmp_path / "full", config, progress=False)

    def kill_after_first(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        tr.train(data, tmp_path / "cut", config, progress=False, on_epoch_end=kill_after_first)
    cut = tmp_path / "cut"
    assert not (cut / "model.safetensors").exists() and not tr.is_complete(cut)
    assert [d.name for d in tr._epoch_dirs(cut)] == ["epoch-0001"]
    state = torch.load(cut / "checkpoints" / "epoch-0001" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 3
    resumed = tr.train(data, cut, config, progress=False, resume=True)
    assert _without_seconds(resumed) == _without_seconds(full)
    assert _same_weights(_state(cut), _state(tmp_path / "full"))  # bitwise, BatchNorm buffers included
    assert not (cut / "checkpoints").exists() and tr.is_complete(cut)


@pytest.mark.parametrize("recipe", [{}, {"optimizer": "adamw", "schedule": "step", "augmentation": "mixup"},
                                    {"schedule": "cyclic", "warmup_epochs": 0.5, "label_smoothing": 0.0}],
                         ids=["sgd-cosine", "adamw-step-mixup", "sgd-cyclic"])
def test_resume_after_a_kill_mid_epoch(tmp_path, monkeypatch, recipe):
    """Killed during epoch 2 (a forward hook raises): the half-done epoch is redone from epoch 1's state."""
    data, config = digits_subset(), _config(epochs=3, **recipe)
    full = tr.train(data, tmp_path / "full", config, progress=False)
    create, calls = tr.create_classifier, []

    def fragile(*args, **kwargs):
        model = create(*args, **kwargs)

        def hook(module, inputs):
            calls.append(1)
            if len(calls) == 5:  # 3 steps per epoch: the 2nd step of epoch 2
                raise Killed

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(tr, "create_classifier", fragile)
    with pytest.raises(Killed):
        tr.train(data, tmp_path / "cut", config, progress=False)
    monkeypatch.setattr(tr, "create_classifier", create)
    # a crash while saving leaves a temporary folder: ignored
    (tmp_path / "cut" / "checkpoints" / ".epoch-0002.tmp").mkdir()
    assert [d.name for d in tr._epoch_dirs(tmp_path / "cut")] == ["epoch-0001"]
    resumed = tr.train(data, tmp_path / "cut", config, progress=False, resume=True)
    assert _without_seconds(resumed) == _without_seconds(full)
    assert _same_weights(_state(tmp_path / "cut"), _state(tmp_path / "full"))


def test_resume_after_sigkill_of_the_cli(tmp_path, caplog):
    """The real thing: `genrobust train` SIGKILLed once an epoch is saved, then `--resume` (about 12 s)."""
    caplog.set_level("INFO", logger="genrobust")
    real = export_imageset(digits_subset(8), tmp_path / "real")
    argv = ["train", "--real", f"imagefolder:{real}", "--model", FAST, "--epochs", "6", "--batch-size", "16",
            "--augmentation", "standard", "--out"]
    assert main(argv + [str(tmp_path / "full")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "genrobust.cli", *argv, str(tmp_path / "cut")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not tr._epoch_dirs(tmp_path / "cut") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    assert not tr.is_complete(tmp_path / "cut")
    assert main(argv + [str(tmp_path / "cut"), "--resume"]) == 0
    assert "resuming" in caplog.text
    assert _same_weights(_state(tmp_path / "cut"), _state(tmp_path / "full"))
    assert _without_seconds(tr.read_metrics(tmp_path / "cut")) == _without_seconds(tr.read_metrics(tmp_path / "full"))


def test_complete_checkpoint_is_refused_kept_or_forced(tmp_path):
    data, config = digits_subset(2), _config(epochs=1)
    rows = tr.train(data, tmp_path / "ck", config, progress=False)
    before = (tmp_path / "ck" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"already holds a complete checkpoint \(test_efficientnet_ln, 1 epochs\); "
                                         r"pass --force"):
        tr.train(data, tmp_path / "ck", config, progress=False)
    assert tr.train(data, tmp_path / "ck", config, progress=False, resume=True) == rows  # nothing to do
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mtime_ns == before
    again = tr.train(data, tmp_path / "ck", config, progress=False, force=True)
    assert _without_seconds(again) == _without_seconds(rows)
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mtime_ns != before
    with pytest.raises(ValueError, match="pass one of them"):
        tr.train(data, tmp_path / "ck", config, progress=False, resume=True, force=True)


def test_resume_with_another_model_or_config_names_the_difference(tmp_path):
    data = digits_subset(2)
    tr.train(data, tmp_path / "ck", _config(epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"cannot resume .*ck: it was trained with model 'test_efficientnet_ln' "
                                         r"\(now 'test_resnet'\)"):
        tr.train(data, tmp_path / "ck", _config(epochs=1, model="test_resnet"), progress=False, resume=True)
    with pytest.raises(ValueError, match=r"lr 0.1 \(now 0.2\)"):
        tr.train(data, tmp_path / "ck", _config(epochs=1, lr=0.2), progress=False, resume=True)
    with pytest.raises(ValueError, match=r"data num_images 20 \(now 40\)"):
        tr.train(digits_subset(4), tmp_path / "ck", _config(epochs=1), progress=False, resume=True)


def test_a_partial_run_without_resume_starts_over(tmp_path, caplog):
    data, config = digits_subset(2), _config(epochs=2)

    def stop(row):
        raise Killed

    with pytest.raises(Killed):
        tr.train(data, tmp_path / "ck", config, progress=False, on_epoch_end=stop)
    rows = tr.train(data, tmp_path / "ck", config, progress=False)
    assert "starting over (pass --resume to continue it)" in caplog.text and len(rows) == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    create = tr.create_classifier
    steps = []

    def poisoned(*args, **kwargs):
        model = create(*args, **kwargs)

        def hook(module, inputs, output):
            steps.append(1)
            return output * float("nan") if len(steps) == 5 else output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(tr, "create_classifier", poisoned)
    data, out = digits_subset(), tmp_path / "ck"  # 40 images, batch 16: 3 steps per epoch; step 5 is epoch 2's 2nd
    with pytest.raises(FloatingPointError, match=r"loss became nan or inf at epoch 2, step 5 \(lr [0-9.e-]+\); "
                                                 r"stopped\. The checkpoint of epoch 1 is kept in"):
        tr.train(data, out, _config(epochs=3), progress=False)
    assert [d.name for d in tr._epoch_dirs(out)] == ["epoch-0001"] and not (out / "model.safetensors").exists()
    assert [r["epoch"] for r in tr.read_metrics(out)] == [1]
    weights = load_file(out / "checkpoints" / "epoch-0001" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_absurd_lr_stops_via_the_cli(capsys, tmp_path):
    real = export_imageset(digits_subset(2), tmp_path / "real")
    line = fails(capsys, ["train", "--real", f"imagefolder:{real}", "--model", FAST, "--epochs", "2",
                           "--lr", "1e30", "--augmentation", "none", "--out", str(tmp_path / "ck")])
    # one step per epoch: the first loss is computed before the absurd update, the second is not finite
    assert "loss became nan or inf at epoch 2, step 2 (lr 1e+30)" in line and "Lower --lr" in line


# --- streaming ----------------------------------------------------------------------------------------

def _write_rgb(root, sizes_by_class):
    """3-channel JPEG and PNG images of different sizes: `{class: [(w, h), ...]}`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, sizes in sizes_by_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_streaming_images_decode_resize_and_skip_bad_files(tmp_path):
    root = _write_rgb(tmp_path / "rgb", {"cat": [(40, 30), (17, 50)], "dog": [(64, 64)]})
    files = sorted(str(p) for p in root.rglob("*.*"))
    ds = tr.StreamingImages(files, [0, 0, 1], channels=3, size=(24, 24))
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == [0, 0, 1][i]
    gray = tr.StreamingImages(files, [0, 0, 1], channels=1, size=(16, 20))
    assert gray[1][0].shape == (1, 16, 20)
    pathlib.Path(files[0]).write_bytes(b"not an image")
    x, y = ds[0]  # replaced by the next image, with a warning
    assert torch.equal(x, ds[1][0]) and y == 0


def test_streamed_training_on_a_folder_of_mixed_sizes(tmp_path):
    root = _write_rgb(tmp_path / "rgb", {"a": [(40, 30), (17, 50), (33, 33), (64, 48)],
                                          "b": [(30, 40), (50, 17), (20, 20), (48, 64)]})
    data, info = build_training_set(f"imagefolder:{root}", [], seed=0)
    assert isinstance(data, FileSet) and info["stream"] is True and data.channels == 3
    config = _config(epochs=2, batch_size=4, input_size=32, workers=2)
    rows = tr.train(data, tmp_path / "ck", config, progress=False, data_info=info)
    assert len(rows) == 2
    model, cfg, classes = tr.load_checkpoint(tmp_path / "ck")
    assert cfg["input_size"] == [32, 32] and cfg["in_chans"] == 3 and classes == ["a", "b"]
    # the streamed path is as repeatable as the in-memory one
    tr.train(data, tmp_path / "again", config, progress=False, data_info=info)
    assert _same_weights(_state(tmp_path / "ck"), _state(tmp_path / "again"))


def test_input_size_is_for_streamed_data_only(tmp_path):
    with pytest.raises(ValueError, match="--input-size 32 applies to streamed images"):
        tr.train(digits_subset(2), tmp_path / "ck", _config(input_size=32), progress=False)


# --- distributed ----------------------------------------------------------------------------------------

def test_torchrun_two_processes_match_one(tmp_path):
    """DDP on CPU (gloo): 2 ranks x 16 images give the one-process run of batch 32 (about 10 s).

    test_efficientnet_ln has no BatchNorm, so each image's gradient does not depend on its batch-mates and
    the runs differ only by float summation order. (With BatchNorm each rank normalises its own 16 images:
    a real but small difference, as in any DDP run without SyncBatchNorm.)
    """
    real = export_imageset(digits_subset(6), tmp_path / "real")  # 60 images: 2 steps of 32 per epoch, the last of 28
    args = ["train", "--real", f"imagefolder:{real}", "--model", FAST, "--epochs", "2", "--batch-size", "32",
            "--augmentation", "none", "--lr", "0.05", "--out"]
    assert main(args + [str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    t0 = time.time()
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "genrobust.cli",
                           *args, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"torchrun 2 processes: {time.time() - t0:.1f} s")
    assert proc.stdout.count("trained ") == 1  # rank 0 alone reports (and writes)
    one, two = tr.read_metrics(tmp_path / "one"), tr.read_metrics(tmp_path / "two")
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1 / 60 + 1e-9)  # at most one image flips
        assert b["lr"] == a["lr"]
    wa, wb = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4) for k in wa)
    assert json.loads((tmp_path / "two" / "complete.json").read_text())["world_size"] == 2


# --- bad input through the CLI: exit 2 and one line naming the input ------------------------------------

@pytest.fixture
def real_folder(tiny_images):
    return tiny_images("real", classes=tuple("0123"), per_class=2)


def test_cli_unknown_model(capsys, tmp_path, real_folder):
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--model", "resnet1o",
                           "--out", str(tmp_path / "ck")])
    assert "unknown timm model 'resnet1o'" in line and "did you mean" in line


def test_cli_one_class(capsys, tmp_path, tiny_images):
    one = tiny_images("one", classes=("7",), per_class=3)
    line = fails(capsys, ["train", "--real", f"imagefolder:{one}", "--model", FAST, "--out", str(tmp_path / "ck")])
    assert f"imagefolder:{one} has 1 class; a classifier needs at least 2" in line


def test_cli_empty_generated_folder(capsys, tmp_path, real_folder):
    empty = tmp_path / "empty"
    (empty / "0").mkdir(parents=True)
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--generated", str(empty),
                           "--model", FAST, "--out", str(tmp_path / "ck")])
    assert f"{empty} holds no images" in line


def test_cli_corrupt_images_skipped_within_max_corrupt(capsys, caplog, tmp_path, tiny_images):
    real = tiny_images("real", classes=("0", "1"), per_class=5)
    gen = tiny_images("gen", classes=("0", "1"), per_class=5)
    bad = gen / "1" / "img02.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["train", "--real", f"imagefolder:{real}", "--generated", str(gen), "--ratio", "0.8", "--model", FAST,
            "--epochs", "1", "--augmentation", "none"]
    line = fails(capsys, argv + ["--out", str(tmp_path / "a")])  # 1 of 10 is 10% > 1%
    assert f"unreadable image {bad}" in line and "1 of 10 images" in line and "--max-corrupt 0.01" in line
    assert main(argv + ["--max-corrupt", "0.2", "--out", str(tmp_path / "b")]) == 0
    assert caplog.text.count("skipping 1 unreadable of 10 images") == 1
    info = json.loads((tmp_path / "b" / "data.json").read_text())
    assert info["skipped"] == [str(bad)] and info["counts"]["generated"] == {"0": 4, "1": 4}


def test_cli_generated_classes_not_in_the_real_data(capsys, tmp_path, real_folder, tiny_images):
    gen = tiny_images("gen", classes=("3", "cat", "dog"), per_class=1)
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--generated", str(gen),
                           "--model", FAST, "--out", str(tmp_path / "ck")])
    assert f"{gen} has classes ['cat', 'dog'] that the real data lacks" in line


def test_cli_resume_a_checkpoint_of_another_model(capsys, tmp_path, real_folder):
    argv = ["train", "--real", f"imagefolder:{real_folder}", "--epochs", "1", "--augmentation", "none",
            "--out", str(tmp_path / "ck")]
    assert main(argv + ["--model", FAST]) == 0
    capsys.readouterr()
    line = fails(capsys, argv + ["--model", "test_resnet", "--resume"])
    assert f"cannot resume {tmp_path / 'ck'}" in line and "model 'test_efficientnet_ln' (now 'test_resnet')" in line
    line = fails(capsys, argv + ["--model", FAST])
    assert "already holds a complete checkpoint" in line and "--force" in line
    assert main(argv + ["--model", FAST, "--force"]) == 0


def test_cli_modes_write_exact_counts(capsys, tmp_path, tiny_images):
    real = tiny_images("real", classes=("0", "1", "2"), per_class=4)
    gen = tiny_images("gen", classes=("2", "0", "1"), per_class=5)
    base = ["train", "--real", f"imagefolder:{real}", "--generated", str(gen), "--model", FAST, "--epochs", "1",
            "--augmentation", "none"]
    assert main(base + ["--mode", "replace", "--fraction", "0.5", "--out", str(tmp_path / "r")]) == 0
    info = json.loads((tmp_path / "r" / "data.json").read_text())
    assert info["mode"] == "replace" and info["num_images"] == 12
    assert info["counts"] == {"real": {"0": 2, "1": 2, "2": 2}, "generated": {"0": 2, "1": 2, "2": 2}}
    assert info["counts_by_folder"] == {str(gen): {"0": 2, "1": 2, "2": 2}}
    assert main(base + ["--mode", "generated-only", "--limit", "7", "--out", str(tmp_path / "g")]) == 0
    info = json.loads((tmp_path / "g" / "data.json").read_text())
    assert info["mode"] == "generated-only" and info["num_images"] == 7
    assert sum(info["counts"]["generated"].values()) == 7 and sorted(info["counts"]["generated"].values()) == [2, 2, 3]
    out = capsys.readouterr().out
    assert "trained test_efficientnet_ln on" in out
