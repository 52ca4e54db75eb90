"""Evaluation: declared eval sets (registry `eval_sets`) and scoring of checkpoints into tidy result rows."""
import json
import logging
import pathlib
from dataclasses import dataclass

import torch

from .registry import Registry

logger = logging.getLogger(__name__)
EVAL_SETS = Registry("eval set")
SUITES = {"digits": ("digits-mnist/test", "digits-uci", "digits-fonts/unseen")}


@dataclass(frozen=True)
class EvalSet:
    """A declared evaluation set: where its images come from, which classes it scores, and its role."""

    name: str
    dataset: str
    role: str  # "id" (in-distribution) or "shift"
    description: str = ""
    class_subset: tuple = None  # None: all of the model's classes
    metric: str = "top1"


def _declare(name, dataset, role, description):
    EVAL_SETS.register(name, role=role, description=description)(
        lambda: EvalSet(name, dataset, role, description))


_declare("digits-mnist/test", "digits-mnist/test", "id", "MNIST sample, held-out test split (1,000)")
_declare("digits-uci", "digits-uci", "shift", "UCI digits: other writers, other scanner (1,797)")
_declare("digits-fonts/unseen", "digits-fonts/unseen", "shift",
         "digits in font families no training saw: STIX, Computer Modern (renditions)")


def create_eval_set(name):
    """A registered eval set, or `imagefolder:PATH` for any ImageFolder (a generated test set included)."""
    if name.startswith("imagefolder:"):
        return EvalSet(name, name, "shift", "user ImageFolder")
    return EVAL_SETS.create(name)


def list_eval_sets(pattern="*"):
    return EVAL_SETS.list(pattern)


def resolve_eval_sets(names):
    """Expand suite names (e.g. `digits`) into eval set names, keeping order and dropping repeats."""
    out = []
    for n in names:
        for m in SUITES.get(n, (n,)):
            if m not in out:
                out.append(m)
    return out


def accuracy(logits, labels, class_subset=None):
    """Top-1 accuracy; with `class_subset`, logits outside the subset are masked before the argmax."""
    if class_subset is not None:
        mask = torch.full((logits.shape[1],), float("-inf"))
        mask[list(class_subset)] = 0
        logits = logits + mask
    return (logits.argmax(1) == labels).float().mean().item()


def _model_name(checkpoint):
    return pathlib.Path(checkpoint).name


def read_results(path):
    from .data.folder import read_jsonl
    path = pathlib.Path(path)
    return read_jsonl(path) if path.exists() else []


def evaluate(checkpoint, eval_sets, results, device="cpu", force=False, model_name=None):
    """Score a checkpoint on eval sets; append one row per (checkpoint, eval set) to `results` (jsonl).

    Pairs already in `results` are skipped unless `force`. Returns the new rows.
    """
    from .data import load_dataset
    from .data.folder import align_classes
    from .train import load_checkpoint, predict

    checkpoint = pathlib.Path(checkpoint)
    results = pathlib.Path(results)
    sets = [create_eval_set(n) for n in resolve_eval_sets(eval_sets)]
    old = read_results(results)
    done = {(r["checkpoint"], r["eval_set"]) for r in old}
    todo = [s for s in sets if force or (str(checkpoint), s.name) not in done]
    if not todo:
        return []
    model, cfg, classes = load_checkpoint(checkpoint, device)
    data_info = json.loads((checkpoint / "data.json").read_text()) if (checkpoint / "data.json").exists() else {}
    rows = []
    for s in todo:
        data = align_classes(load_dataset(s.dataset, channels=cfg["in_chans"]), classes)
        if tuple(data.images.shape[1:]) != (cfg["in_chans"], *cfg["input_size"]):
            raise ValueError(f"{s.name}: images are {tuple(data.images.shape[1:])}, the model was trained on "
                             f"{(cfg['in_chans'], *cfg['input_size'])}")
        logits = predict(model, data.images, device)
        acc = accuracy(logits, data.labels, s.class_subset)
        rows.append({"model": model_name or _model_name(checkpoint), "checkpoint": str(checkpoint),
                     "train_data": data_info.get("label", data_info.get("name")),
                     "augmentation": cfg.get("augmentation"), "seed": cfg.get("seed"), "eval_set": s.name,
                     "role": s.role, "metric": s.metric, "value": round(acc, 6), "n": len(data),
                     "class_subset": "all" if s.class_subset is None else list(s.class_subset)})
        logger.info("%s on %s: %.2f%%", rows[-1]["model"], s.name, 100 * acc)
    results.parent.mkdir(parents=True, exist_ok=True)
    if force:
        # Rescored pairs replace their old rows (rather than pose as extra seeds), and only once the new
        # rows exist: a rescoring that fails midway loses nothing.
        from .data.folder import write_jsonl
        redo = {(r["checkpoint"], r["eval_set"]) for r in rows}
        write_jsonl(results, [r for r in old if (r["checkpoint"], r["eval_set"]) not in redo] + rows)
    else:
        with open(results, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return rows
