"""Evaluation: declared eval sets (registry `eval_sets`) and scoring of checkpoints into tidy result rows.

An eval set is a record: where its images are (a registered in-memory dataset, or a folder under the data
root with a documented layout), its classes, which model classes count as right for each (ObjectNet: any of
several ImageNet classes), preprocessing (ObjectNet's border crop) and its in-distribution counterpart.
Logits are always masked to the classes a set shares with the model, and for every shift the ID set is scored
on the same classes: the x-axis of the effective-robustness line.
"""
import functools
import json
import logging
import math
import os
import pathlib
from dataclasses import dataclass

import torch

from .data.decode import whole_batch
from .registry import Registry

logger = logging.getLogger(__name__)
EVAL_SETS = Registry("eval set")
SUITES = {
    "digits": ("digits-mnist/test", "digits-uci", "digits-fonts/unseen"),
    "imagenet": ("imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet"),
    "paper": ("imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r", "objectnet"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@functools.lru_cache(maxsize=None)
def reference(name):
    """A reference data file shipped in the package (class lists, mappings; sources in its README)."""
    import importlib.resources
    return json.loads(importlib.resources.files("genrobust").joinpath(f"assets/reference/{name}").read_text())


@dataclass(frozen=True)
class EvalSet:
    """A declared evaluation set.

    Images come from `dataset` (a registered in-memory dataset spec) or from a folder: `path`, or the first of
    `subdirs` that exists under the data root, laid out as `layout` says. Eval class i lives in folder
    `folders[i]` and is named `classes[i]`; `targets[i]` are the model classes counted as right for it
    (default: the class itself). None means "every subfolder is a class, named by its folder".
    """

    name: str
    role: str  # "id" (in-distribution) or "shift"
    description: str = ""
    dataset: str = None
    path: str = None
    subdirs: tuple = ()
    layout: str = ""
    folders: tuple = None
    classes: tuple = None
    targets: tuple = None
    border: int = 0  # pixels cropped from every side before resizing (ObjectNet: 2, which removes the thin red
    # frame its images carry with a pixel to spare)
    id_set: str = None
    metric: str = "top1"

    def root(self, data_root):
        """The set's folder; a missing one is an error that names the expected layout."""
        if self.path is not None:
            root = pathlib.Path(self.path)
            if not root.is_dir():
                raise FileNotFoundError(f"{self.name}: no folder {root}; expected an ImageFolder "
                                        "(one subfolder of images per class)")
            return root
        if data_root is None:
            raise FileNotFoundError(f"{self.name} is read from a folder under the data root: pass --data-root "
                                    f"DIR or set GENROBUST_DATA (expected DIR/{self.layout})")
        for sub in self.subdirs:
            if (pathlib.Path(data_root) / sub).is_dir():
                return pathlib.Path(data_root) / sub
        raise FileNotFoundError(f"{self.name}: no folder {pathlib.Path(data_root) / self.subdirs[0]}; expected "
                                f"{self.layout} under the data root (see README, 'Evaluation data')")

    def class_table(self, data_root=None):
        """(folders, classes, targets) with defaults filled in; folder sets without a declared list list theirs."""
        folders, classes = self.folders, self.classes
        if folders is None and self.dataset is None:
            folders = tuple(sorted(p.name for p in self.root(data_root).iterdir() if p.is_dir()))
            if not folders:
                raise ValueError(f"{self.name}: {self.root(data_root)} has no class subfolders")
        if classes is None:
            classes = folders
        targets = self.targets or tuple((c,) for c in classes)
        return folders, classes, targets


def _register(s):
    EVAL_SETS.register(s.name, role=s.role, description=s.description)(lambda: s)


def _digits_sets():
    _register(EvalSet("digits-mnist/test", "id", "MNIST sample, held-out test split (1,000)",
                      dataset="digits-mnist/test"))
    _register(EvalSet("digits-uci", "shift", "UCI digits: other writers, other scanner (1,797)",
                      dataset="digits-uci", id_set="digits-mnist/test"))
    _register(EvalSet("digits-fonts/unseen", "shift",
                      "digits in font families no training saw: STIX, Computer Modern (renditions)",
                      dataset="digits-fonts/unseen", id_set="digits-mnist/test"))


def _imagenet_sets():
    # Declared with their class lists from the reference data, read only when a set is created.
    specs = {
        "imagenet-val": ("id", "ImageNet validation (50,000; 1,000 classes)", ("imagenet/val",),
                         "imagenet/val/<wnid>/*.JPEG", None),
        "imagenet-v2": ("shift", "ImageNet-V2 matched-frequency (10,000; folders 0..999 are class indices)",
                        ("imagenetv2-matched-frequency-format-val", "imagenet-v2"),
                        "imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg", "v2"),
        "imagenet-sketch": ("shift", "ImageNet-Sketch (50,889; 1,000 classes)",
                            ("imagenet-sketch/sketch", "imagenet-sketch", "sketch"),
                            "imagenet-sketch/sketch/<wnid>/*.JPEG", None),
        "imagenet-r": ("shift", "ImageNet-R renditions (30,000; 200 classes)", ("imagenet-r",),
                       "imagenet-r/<wnid>/*.jpg", "r"),
        "imagenet-a": ("shift", "ImageNet-A natural adversarial examples (7,500; 200 classes)",
                       ("imagenet-a",), "imagenet-a/<wnid>/*.jpg", "a"),
        "objectnet": ("shift", "ObjectNet 1.0 (113 classes mapped to 125 ImageNet classes; any-of scoring; "
                               "2-pixel border crop)", ("objectnet-1.0/images", "objectnet/images"),
                      "objectnet-1.0/images/<objectnet_folder>/*.png", "objectnet"),
    }
    for name, (role, desc, subdirs, layout, kind) in specs.items():
        EVAL_SETS.register(name, role=role, description=desc)(
            functools.partial(_imagenet_set, name, role, desc, subdirs, layout, kind))


def _imagenet_set(name, role, desc, subdirs, layout, kind):
    wnids = tuple(c["wnid"] for c in reference("imagenet_classes.json")["classes"])
    folders, classes, targets, border = wnids, wnids, None, 0
    if kind == "v2":
        classes = tuple(reference("imagenet_v2_folder_order.json")["folder_to_wnid"])
        folders = tuple(str(k) for k in range(len(classes)))
    elif kind == "r":
        folders = classes = tuple(reference("imagenet_r_wnids.json")["wnids"])
    elif kind == "a":
        folders = classes = tuple(reference("imagenet_a_wnids.json")["wnids"])
    elif kind == "objectnet":
        rows = reference("objectnet_to_imagenet.json")["classes"]
        folders = tuple(r["objectnet_folder"] for r in rows)
        classes = tuple(r["objectnet_label"] for r in rows)
        targets = tuple(tuple(r["imagenet_wnids"]) for r in rows)
        border = 2
    return EvalSet(name, role, desc, subdirs=subdirs, layout=layout, folders=folders, classes=classes,
                   targets=targets, border=border, id_set=None if role == "id" else "imagenet-val")


_digits_sets()
_imagenet_sets()


def create_eval_set(name, folder_id_set=None):
    """A registered eval set, or `imagefolder:PATH` for any ImageFolder (a generated test set included).

    A folder set is a shift whose in-distribution counterpart is `folder_id_set` (None: it has none).
    """
    if name.startswith("imagefolder:"):
        return EvalSet(name, "shift", "user ImageFolder", path=name.split(":", 1)[1], id_set=folder_id_set)
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


# --- scoring (pure functions) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassPlan:
    """How an eval set's classes meet a model's: which eval classes are scored, the logit mask, the hits."""

    keep: list  # eval class indices that share at least one target with the model
    mask: torch.Tensor  # bool over model classes: the logits that may win
    hits: torch.Tensor  # bool [len(keep), num model classes]: prediction k is right for kept class i
    subset: str  # "all" when every model class is scored, else the name of the set whose classes are
    dropped: list  # eval classes left out (no target among the model's classes)


def class_plan(name, classes, targets, model_classes, restrict=None):
    """Match eval classes to model classes by id (wnid, digit name), never by position.

    Args:
        name: the eval set's name (for the subset label and errors).
        classes, targets: eval class names and, per class, the model class names that count as right.
        model_classes: the checkpoint's class list.
        restrict: optional bool mask over model classes (score an ID set on a shift's classes).
    """
    index = {c: k for k, c in enumerate(model_classes)}
    allowed = torch.ones(len(model_classes), dtype=torch.bool) if restrict is None else restrict
    keep, rows, dropped = [], [], []
    for i, (c, ts) in enumerate(zip(classes, targets)):
        ks = [index[t] for t in ts if t in index and allowed[index[t]]]
        if ks:
            keep.append(i)
            row = torch.zeros(len(model_classes), dtype=torch.bool)
            row[ks] = True
            rows.append(row)
        else:
            dropped.append(c)
    if not keep:
        raise ValueError(f"{name} shares no class with the checkpoint ({len(model_classes)} classes, e.g. "
                         f"{list(model_classes)[:3]}; the set's are e.g. {list(classes)[:3]}): check that the "
                         "model was trained on the classes this set scores")
    hits = torch.stack(rows)
    mask = hits.any(0)
    subset = "all" if bool(mask.all()) else name
    return ClassPlan(keep, mask, hits, subset, dropped)


def masked_predictions(logits, mask):
    """Argmax over the allowed classes only: a class outside the eval set can never be predicted."""
    return logits.masked_fill(~mask.to(logits.device), float("-inf")).argmax(1)


def score(logits, labels, plan):
    """(correct count, n) over images whose eval class the plan keeps; labels are eval class indices."""
    size = max(int(labels.max()) if len(labels) else 0, max(plan.keep)) + 1
    pos = torch.full((size,), -1, dtype=torch.long)  # eval class -> row of plan.hits, -1: not scored
    pos[torch.tensor(plan.keep)] = torch.arange(len(plan.keep))
    lab = pos[labels]
    sel = lab >= 0
    pred = masked_predictions(logits[sel], plan.mask)
    return int(plan.hits[lab[sel], pred].sum()), int(sel.sum())


def accuracy(logits, labels, class_subset=None):
    """Top-1 accuracy with labels in the model's own class indices; `class_subset` masks the logits."""
    if class_subset is not None:
        mask = torch.zeros(logits.shape[1], dtype=torch.bool)
        mask[list(class_subset)] = True
        return (masked_predictions(logits, mask) == labels).float().mean().item()
    return (logits.argmax(1) == labels).float().mean().item()


# --- results files -----------------------------------------------------------------------------------------

REQUIRED = ("model", "eval_set", "metric", "value")
KNOWN = frozenset(REQUIRED + (
    "checkpoint", "train_data", "augmentation", "seed", "role", "n", "class_subset", "num_classes", "id_set",
    "missing_classes", "ci_low", "ci_high", "id_value", "shift_value", "predicted", "baseline", "baseline_n",
    "slope", "intercept", "reference", "unreadable"))


def read_results(path):
    from .data.folder import read_jsonl
    path = pathlib.Path(path)
    return read_jsonl(path) if path.exists() else []


def check_rows(rows):
    """Drop rows that would give a wrong number (missing columns, NaN, accuracy outside [0, 1]); say why.

    Returns (kept rows, warnings). Unknown columns are kept but named, since they often mean a typo.
    """
    kept, warnings, unknown = [], [], set()
    for i, r in enumerate(rows):
        missing = [c for c in REQUIRED if r.get(c) is None]
        value = r.get("value")
        if missing:
            warnings.append(f"row {i + 1} ({r.get('model')}, {r.get('eval_set')}) lacks {', '.join(missing)}; "
                            "left out")
        elif not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            warnings.append(f"row {i + 1} ({r['model']}, {r['eval_set']}) has value {value!r}; left out")
        elif r["metric"] == "top1" and not 0 <= value <= 1:
            warnings.append(f"row {i + 1} ({r['model']}, {r['eval_set']}) has accuracy {value}, outside [0, 1] "
                            "(percent instead of a fraction?); left out")
        else:
            kept.append(r)
        unknown |= set(r) - KNOWN
    if unknown:
        warnings.append(f"unknown columns {sorted(unknown)} (kept, but not used)")
    return kept, warnings


# --- loading images ----------------------------------------------------------------------------------------

class FolderImages(torch.utils.data.Dataset):
    """Images of a folder eval set, decoded in DataLoader workers into uint8 tensors at the model's size: timm's
    eval transform (shorter side to size / crop_pct, centre crop; data/decode.py), after `border` pixels trimmed.

    The loader asks for whole batches and gets `(images, labels, unreadable files)`: a file that fails to decode
    is left out of its batch and named, never a crash in a worker.
    """

    def __init__(self, files, labels, channels, size, crop_pct=0.875, border=0, interpolation="bicubic"):
        from .data.decode import path_array

        self.files, self.labels = path_array(files), labels
        self.channels, self.size, self.crop_pct, self.border = channels, tuple(size), crop_pct, border
        self.interpolation = interpolation

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from .data import decode

        mode = "L" if self.channels == 1 else "RGB"
        x = decode.eval_image(os.fsdecode(self.files[i]), self.size, mode, self.crop_pct, self.interpolation,
                              self.border)
        return x, self.labels[i]

    def __getitems__(self, indices):
        images, labels, bad = [], [], []
        for i in indices:
            try:
                x, y = self[i]
            except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unreadable
                bad.append((os.fsdecode(self.files[i]), " ".join(f"{e.__class__.__name__}: {e}".split())[:200]))
                continue
            images.append(x)
            labels.append(int(y))
        c, (h, w) = self.channels, self.size
        x = torch.stack(images) if images else torch.empty(0, c, h, w, dtype=torch.uint8)
        return x, torch.tensor(labels, dtype=torch.long), bad



def _readable(loader, name, total, max_corrupt, unreadable):
    """The loader's (images, labels), each unreadable file logged once and collected into `unreadable`; more than
    `max_corrupt` of the set is an error naming them."""
    for x, y, bad in loader:
        for path, why in bad:
            logger.warning("%s: unreadable image %s (%s): not scored", name, path, why)
            unreadable.append(path)
        if len(unreadable) > max_corrupt * total:
            raise ValueError(f"{name}: {len(unreadable)} of its {total} images are unreadable (more than the "
                             f"--max-corrupt {max_corrupt:g} allows), e.g. {', '.join(unreadable[:5])}: delete or "
                             "replace them, or raise --max-corrupt")
        if len(y):
            yield x, y


def list_folder_images(s, data_root):
    """(files, eval class labels, missing class folders) for a folder eval set."""
    root = s.root(data_root)
    folders, _, _ = s.class_table(data_root)
    files, labels, missing = [], [], []
    for i, f in enumerate(folders):
        d = root / f
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if d.is_dir() else []
        if not imgs:
            missing.append(f)
        files += imgs
        labels += [i] * len(imgs)
    if not files:
        raise FileNotFoundError(f"{s.name}: no images under {root}; expected {s.layout or 'one subfolder per class'}")
    if missing:
        logger.warning("%s: %d of %d class folders missing or empty under %s (e.g. %s); scored on the rest",
                       s.name, len(missing), len(folders), root, ", ".join(missing[:3]))
    return files, torch.tensor(labels), missing


# --- inference ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def infer(model, batches, device, channels):
    """Logits for uint8 batches: normalised as in training, channels_last and autocast on CUDA."""
    from .train import normalization

    cuda = str(device).startswith("cuda")
    mean, std = (t.to(device) for t in normalization(model, channels))
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    logits, labels, n = None, None, 0
    for x, y in batches:
        x = x.to(device, non_blocking=True).float().div_(255)
        x = (x - mean) / std
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", enabled=cuda):
            out = model(x).float().cpu()
        if logits is None or n + len(out) > len(logits):
            # One buffer grown by doubling, not a small tensor kept per batch: those, interleaved with each
            # batch's large transient tensors, fragment glibc's heap (+270 MB over 782 batches of 64 in
            # bench/bench_stream.py; flat with the buffer)
            cap = max(4096, 2 * (n + len(out)))
            logits = _grown(logits, n, (cap, out.shape[1]), out.dtype)
            labels = _grown(labels, n, (cap,), torch.long)
        logits[n:n + len(out)] = out
        labels[n:n + len(out)] = torch.as_tensor(y)
        n += len(out)
    if logits is None:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return logits[:n].clone(), labels[:n].clone()


def _grown(buffer, n, shape, dtype):
    new = torch.empty(shape, dtype=dtype)
    if buffer is not None:
        new[:n] = buffer[:n]
    return new


def _memory_batches(images, labels, batch_size):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


class Scorer:
    """Loads each eval set at most once per checkpoint and keeps its logits for the subsets scored on it."""

    def __init__(self, model, cfg, data_root, device, batch_size, workers, max_corrupt=0.01):
        from . import context

        self.model, self.cfg, self.data_root = model, cfg, data_root
        self.device, self.batch_size, self.max_corrupt = device, batch_size, max_corrupt
        self.workers = context.default_workers() if workers is None else workers
        self.cache = {}

    def logits(self, s):
        if s.name not in self.cache:
            self.cache[s.name] = self._run(s)
        return self.cache[s.name]

    def _run(self, s):
        channels, size = self.cfg["in_chans"], tuple(self.cfg["input_size"])
        if s.dataset is not None:
            from .data import load_dataset
            data = load_dataset(s.dataset, channels=channels)
            if tuple(data.images.shape[2:]) != size:
                raise ValueError(f"{s.name}: images are {tuple(data.images.shape[1:])}, the model was trained "
                                 f"on {(channels, *size)}")
            logits, labels = infer(self.model, _memory_batches(data.images, data.labels, self.batch_size),
                                   self.device, channels)
            return logits, labels, [], []
        files, labels, missing = list_folder_images(s, self.data_root)
        crop_pct, interpolation = _preprocessing(self.model, self.cfg)
        # one pass per set: a loader per set, so persistent workers would only idle
        loader = torch.utils.data.DataLoader(
            FolderImages(files, labels, channels, size, crop_pct, s.border, interpolation),
            batch_size=self.batch_size, num_workers=self.workers, collate_fn=whole_batch,
            pin_memory=str(self.device).startswith("cuda"), prefetch_factor=4 if self.workers > 0 else None)
        from tqdm.auto import tqdm
        unreadable = []
        batches = _readable(tqdm(loader, desc=f"score {s.name}", leave=False, disable=len(loader) < 5), s.name,
                            len(files), self.max_corrupt, unreadable)
        logits, labels = infer(self.model, batches, self.device, channels)
        return logits, labels, missing, unreadable


def _crop_pct(model):
    import timm.data
    return timm.data.resolve_model_data_config(model).get("crop_pct", 0.875)


def _preprocessing(model, cfg):
    """(crop_pct, interpolation) of the eval transform: the model's own (timm data config), the filter the
    checkpoint trained with where its recipe set one (as timm's train script evaluates)."""
    import timm.data
    data_cfg = timm.data.resolve_model_data_config(model)
    interpolation = cfg.get("interpolation") or data_cfg.get("interpolation", "bicubic")
    if interpolation == "random":  # a training-time choice; evaluate with one fixed filter, as timm does
        interpolation = "bicubic"
    return data_cfg.get("crop_pct", 0.875), interpolation


def table_classes(s, data_root):
    if s.dataset is not None:
        from .data import load_dataset
        classes = tuple(load_dataset(s.dataset).classes)
        return classes, tuple((c,) for c in classes)
    _, classes, targets = s.class_table(data_root)
    return classes, targets


def evaluate(checkpoint, eval_sets, results, device="cpu", force=False, model_name=None, data_root=None,
             batch_size=256, workers=None, folder_id_set=None, max_corrupt=0.01):
    """Score a checkpoint on eval sets; append one row per (checkpoint, eval set, class subset) to `results`.

    Args:
        eval_sets: names or suites; `imagefolder:PATH` for any folder.
        data_root: the folder holding the ImageNet-family sets (README, 'Evaluation data').
        workers: DataLoader workers decoding folder sets (None: context.default_workers()).
        max_corrupt: fraction of a folder set's images that may be unreadable: they are skipped, named in a
            warning and counted in the row's `unreadable`; more is an error.
        folder_id_set: the in-distribution counterpart of `imagefolder:` sets (e.g. digits-mnist/test).
    For each shift, the set's in-distribution counterpart is scored on the same classes (role `id`). Pairs
    already in `results` are skipped unless `force`. Returns the new rows.
    """
    from .context import resolve_device
    from .train import load_checkpoint

    device = resolve_device(device)  # under torchrun, "cuda" is this rank's GPU
    checkpoint, results = pathlib.Path(checkpoint), pathlib.Path(results)
    sets = [create_eval_set(n, folder_id_set) for n in resolve_eval_sets(eval_sets)]
    old = read_results(results)
    done = {(r.get("checkpoint"), r["eval_set"], _subset_key(r.get("class_subset", "all"))) for r in old}
    model, cfg, model_classes = load_checkpoint(checkpoint, device)
    info = _data_info(checkpoint)
    scorer = Scorer(model, cfg, data_root, device, batch_size, workers, max_corrupt)
    base = {"model": model_name or checkpoint.name, "checkpoint": str(checkpoint),
            "train_data": info.get("label", info.get("name")), "augmentation": cfg.get("augmentation"),
            "seed": cfg.get("seed")}
    rows = []
    for s in sets:
        classes, targets = table_classes(s, data_root)
        plan = class_plan(s.name, classes, targets, model_classes)
        if plan.dropped:
            logger.warning("%s: %d of its %d classes are not among the checkpoint's and are not scored (e.g. %s)",
                           s.name, len(plan.dropped), len(classes), ", ".join(map(str, plan.dropped[:3])))
        if force or (str(checkpoint), s.name, plan.subset) not in done:
            rows.append(result_row(base, s, plan, *scorer.logits(s)))
        if s.id_set:
            rows += _id_row(base, s, plan, scorer, model_classes, data_root, done, rows, force)
    _append(results, old, rows, force)
    return rows


def _id_row(base, s, plan, scorer, model_classes, data_root, done, rows, force):
    """The ID set scored on the shift's classes, unless already there (from another shift or an earlier run)."""
    key = (base["checkpoint"], s.id_set, plan.subset)
    if (not force and key in done) or any((r["checkpoint"], r["eval_set"], r["class_subset"]) == key
                                          for r in rows):
        return []
    ids = create_eval_set(s.id_set)
    try:
        logits = scorer.logits(ids)
    except FileNotFoundError as e:
        logger.warning("%s: no in-distribution counterpart, so no effective robustness for it: %s", s.name, e)
        return []
    classes, targets = table_classes(ids, data_root)
    id_plan = class_plan(ids.name, classes, targets, model_classes, restrict=plan.mask)
    id_plan = ClassPlan(id_plan.keep, id_plan.mask, id_plan.hits, plan.subset, id_plan.dropped)
    return [result_row(base, ids, id_plan, *logits)]


def result_row(base, s, plan, logits, labels, missing, unreadable=()):
    correct, n = score(logits, labels, plan)
    if n == 0:
        raise ValueError(f"{s.name}: none of its images belong to the classes shared with the checkpoint")
    row = {**base, "eval_set": s.name, "role": s.role, "metric": s.metric, "value": round(correct / n, 6),
           "n": n, "class_subset": plan.subset, "num_classes": int(plan.mask.sum()), "id_set": s.id_set}
    if missing:
        row["missing_classes"] = len(missing)
    if unreadable:  # skipped, so not in n
        row["unreadable"] = len(unreadable)
    logger.info("%s on %s (%s): %.2f%%", base["model"], s.name, plan.subset, 100 * correct / n)
    return row


def _subset_key(v):
    return v if isinstance(v, str) else json.dumps(v)


def _data_info(checkpoint):
    p = checkpoint / "data.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _append(results, old, rows, force):
    results.parent.mkdir(parents=True, exist_ok=True)
    if force:
        # Rescored pairs replace their old rows (rather than pose as extra seeds), and only once the new
        # rows exist: a rescoring that fails midway loses nothing.
        from .data.folder import write_jsonl
        redo = {(r["checkpoint"], r["eval_set"], r["class_subset"]) for r in rows}
        write_jsonl(results, [r for r in old if (r.get("checkpoint"), r["eval_set"],
                                                 _subset_key(r.get("class_subset", "all"))) not in redo] + rows)
    elif rows:
        import fcntl
        with open(results, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # study workers score at once into one file
            f.write("".join(json.dumps(r) + "\n" for r in rows))
