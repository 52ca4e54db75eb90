"""Classifier training on in-memory uint8 images (digits scale): timm model, batched augmentation,
SGD + cosine schedule with warm-up, one metrics row per epoch, a self-describing checkpoint folder."""
import csv
import dataclasses
import json
import logging
import math
import pathlib
import time

import torch
import torch.nn.functional as F

from .augment import create_augmentation
from .data.folder import atomic_write_text

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    model: str = "resnet10t"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    augmentation: str = "standard"
    seed: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


def create_classifier(name, num_classes, in_chans):
    """A timm model by name; an unknown name is an error that suggests close matches."""
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {name!r}{hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def normalization(model, channels):
    """Mean/std resolved from the model's own data config, reduced to the input's channel count."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    if channels == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def _lr_at(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _param_groups(model, weight_decay):
    # No weight decay on norms and biases: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(data, out, config, device="cpu", data_info=None, progress=True):
    """Train a classifier on an ImageSet and write the checkpoint folder `out`.

    Args:
        data: ImageSet (uint8 images, labels, classes).
        out: checkpoint folder (model.safetensors, config.yaml, classes.json, metrics.csv, data.json).
        config: TrainConfig.
        data_info: what the data is (sources, counts, ratio), written to data.json.
    Returns the list of metric rows.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if len(data.classes) < 2:
        raise ValueError(f"{data.name} has {len(data.classes)} class; a classifier needs at least 2")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    channels = data.images.shape[1]
    model = create_classifier(config.model, len(data.classes), channels).to(device)
    mean, std = (t.to(device) for t in normalization(model, channels))
    augment = create_augmentation(config.augmentation)
    opt = torch.optim.SGD(_param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum,
                          nesterov=True)
    images, labels = data.images, data.labels
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    rows, step, t0 = [], 0, time.time()
    bar = tqdm(range(config.epochs), desc=f"train {config.model} on {data.name}", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(data), config.batch_size):
            idx = perm[i:i + config.batch_size]
            x = images[idx].to(device).float().div_(255)
            x = (augment(x, gen) - mean) / std
            y = labels[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, config.lr)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        rows.append({"epoch": epoch + 1, "train_loss": round(loss_sum / len(data), 5),
                     "train_acc": round(correct / len(data), 5), "lr": round(opt.param_groups[0]["lr"], 6),
                     "seconds": round(time.time() - t0, 2)})
        bar.set_postfix(loss=rows[-1]["train_loss"], acc=rows[-1]["train_acc"])
    _write_checkpoint_files(out, config, data, rows, data_info)
    # weights last and atomically: a folder with model.safetensors is a complete checkpoint
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out / "model.safetensors")
    return rows


def _write_checkpoint_files(out, config, data, rows, data_info):
    import yaml

    cfg = {**config.to_dict(), "in_chans": int(data.images.shape[1]),
           "input_size": list(data.images.shape[2:]), "num_classes": len(data.classes)}
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(out / "classes.json", json.dumps(list(data.classes)))
    atomic_write_text(out / "data.json", json.dumps({"name": data.name, "num_images": len(data),
                                                     **(data_info or {})}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def load_checkpoint(path, device="cpu"):
    """A checkpoint folder -> (model in eval mode, config dict, class list)."""
    import yaml
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if not (path / "model.safetensors").exists() or not (path / "config.yaml").exists():
        raise FileNotFoundError(f"{path} is not a genrobust checkpoint folder (needs model.safetensors and "
                                "config.yaml, as `genrobust train` writes)")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    classes = json.loads((path / "classes.json").read_text())
    model = create_classifier(cfg["model"], cfg["num_classes"], cfg["in_chans"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.to(device).eval(), cfg, classes


@torch.inference_mode()
def predict(model, images, device="cpu", batch_size=512):
    """Logits for uint8 images, normalised as in training."""
    mean, std = (t.to(device) for t in normalization(model, images.shape[1]))
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float().div_(255)
        outs.append(model((x - mean) / std).float().cpu())
    return torch.cat(outs)
