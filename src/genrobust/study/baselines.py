"""Baseline zoos: standard real-only models whose (ID, shift) accuracies define the effective-robustness line.

On a new dataset there are no published accuracies, so genrobust trains its own line: the same real data,
with architecture, epochs and data fraction varied so that ID accuracy spreads widely. A member that ends near
chance says nothing about the line; it is reported and left out of it (robustness.load_baseline).
"""
import json
import logging
import pathlib
from dataclasses import asdict, dataclass

import torch

from ..data.folder import atomic_write_text
from ..robustness import near_chance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One zoo model: a timm architecture trained for `epochs` on a class-balanced `fraction` of the data."""

    name: str
    model: str
    epochs: int
    fraction: float = 1.0
    batch_size: int = 128
    lr: float = 0.1


# Chosen to spread digits-mnist/test accuracy from roughly 55% to 97% (measured: bench/RESULTS.md). Small
# fractions get small batches and lower learning rates: at batch 128, 100 images are one step an epoch and
# the model stays at chance; at lr 0.1 on 50 images training diverged.
SUITES = {
    "digits": {
        "real": "digits-mnist/train",
        "eval_sets": ("digits",),
        "members": (
            Member("resnet10t-f100-e15", "resnet10t", 15, 1.0),
            Member("resnet10t-f50-e15", "resnet10t", 15, 0.5),
            Member("resnet10t-f25-e15", "resnet10t", 15, 0.25, 64),
            Member("resnet10t-f10-e30", "resnet10t", 30, 0.1, 32),
            Member("resnet10t-f10-e15", "resnet10t", 15, 0.1, 16, 0.05),
            Member("resnet10t-f10-e6", "resnet10t", 6, 0.1, 16, 0.05),
            Member("resnet10t-f5-e40", "resnet10t", 40, 0.05, 16, 0.02),
            Member("resnet18-f100-e10", "resnet18", 10, 1.0),
            Member("resnet18-f25-e10", "resnet18", 10, 0.25, 64),
            Member("mobilenetv3_small_050-f100-e15", "mobilenetv3_small_050", 15, 1.0, 128, 0.05),
            Member("mobilenetv3_small_050-f50-e15", "mobilenetv3_small_050", 15, 0.5, 64, 0.05),
        ),
    },
}


def list_suites():
    return sorted(SUITES)


def fraction_subset(data, fraction, seed):
    """A class-balanced, seeded fraction of an ImageSet (at least one image per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return data
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(len(data.classes)):
        idx = torch.nonzero(data.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]])
    return data.subset(torch.cat(picks).sort().values, name=f"{data.name}[{fraction:g}]")


def train_zoo(suite, out, device="cpu", seed=0, members=None, progress=True):
    """Train (or reuse) every member of a suite, evaluate each on the suite's eval sets, write `zoo.json`.

    Returns the summary dicts (one per member, with its ID accuracy and whether it is on the line).
    """
    from ..data import load_dataset
    from ..evaluate import evaluate, read_results
    from .config import write_config
    from ..train import TrainConfig, train

    if suite not in SUITES:
        raise ValueError(f"unknown baseline suite {suite!r}; choose from {list_suites()}")
    spec = SUITES[suite]
    members = members or spec["members"]
    out = pathlib.Path(out)
    write_config(out, {"command": "baselines train", "suite": suite, "seed": seed, "device": str(device),
                       "real": spec["real"], "members": [asdict(m) for m in members]})
    real = load_dataset(spec["real"])
    results = out / "results.jsonl"
    for i, m in enumerate(members):
        ck = out / "models" / m.name
        if (ck / "model.safetensors").exists():
            logger.info("[%d/%d] %s: already trained, reusing it", i + 1, len(members), m.name)
        else:
            logger.info("[%d/%d] training %s", i + 1, len(members), m.name)
            data = fraction_subset(real, m.fraction, seed)
            config = TrainConfig(model=m.model, epochs=m.epochs, batch_size=m.batch_size, lr=m.lr, seed=seed)
            train(data, ck, config, device=device, progress=progress,
                  data_info={"real": spec["real"], "fraction": m.fraction, "label": f"{spec['real']} "
                             f"({m.fraction:.0%})", "counts": {"real": data.counts(), "generated": {}}})
        evaluate(ck, spec["eval_sets"], results, device=device, model_name=m.name)
    summary = _summarise(members, read_results(results), out)
    atomic_write_text(out / "zoo.json", json.dumps(summary, indent=2))
    return summary


def _summarise(members, rows, out):
    summary = []
    for m in members:
        ck = str(out / "models" / m.name)
        ids = [r for r in rows if r.get("checkpoint") == ck and r.get("role") == "id"
               and r.get("class_subset") == "all"]
        acc = ids[0]["value"] if ids else None
        k = ids[0].get("num_classes") if ids else None
        on_line = acc is not None and k is not None and not near_chance(acc, k)
        summary.append({**asdict(m), "id_accuracy": acc, "on_line": on_line,
                        "note": "" if on_line else "near chance: left out of the line"})
        if not on_line:
            logger.warning("%s ends near chance (%s); it is reported and left out of the line", m.name, acc)
    return summary
