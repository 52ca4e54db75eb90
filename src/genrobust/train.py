"""Classifier training: a timm model, batch augmentation on the device, SGD or AdamW under a warm-up schedule,
one metrics row per epoch, a checkpoint every epoch that `resume` continues from, and DDP under torchrun.

Two input paths, one loop. An `ImageSet` (uint8 in memory: the digits world) is indexed batch by batch; a
`FileSet` (an ImageFolder too large for memory) is decoded by DataLoader workers (`StreamingImages`), which crop
each full image at random as timm's ImageNet recipe does and flip it. Either way a batch reaches the device as
uint8 and is augmented there (streamed batches without a second crop).

Checkpoint folder (DESIGN.md): `config.yaml` (the resolved config), `classes.json` and `data.json` at the start;
`metrics.csv` and `checkpoints/epoch-NNNN/` (weights and training state; only the last epoch's is kept) after
every epoch, and `skipped.txt` when streamed files could not be decoded; at the end `model.safetensors`, then
`complete.json`. A folder holding `model.safetensors` and `complete.json` is a complete checkpoint; the epoch
folders are removed then.
"""
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import shutil
import time

import torch
import torch.nn.functional as F

from . import context
from .augment import create_augmentation
from .data import decode
from .data.folder import atomic_write_text

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"
CHECKPOINTS = "checkpoints"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "cyclic")
AMP = ("auto", "bf16", "fp16", "none")
# Defaults that depend on the optimizer (None in TrainConfig): SGD's from the ResNet recipes, AdamW's from DeiT.
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.1, "weight_decay": 5e-4}, "adamw": {"lr": 1e-3, "weight_decay": 0.05}}
# Fields that change how fast a run goes or record where its recipe came from, but not what it computes: a
# resume may change them.
RUNTIME_FIELDS = ("workers", "config_file")
# Recipe fields newer than some checkpoints: a config.yaml without one was trained with this value.
ADDED_FIELDS = {"crop_scale": [0.08, 1.0], "crop_ratio": [3 / 4, 4 / 3], "interpolation": None}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random")
# Weight files looked for in a --pretrained folder, in this order (the names timm's hub format saves).
PRETRAINED_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass
class TrainConfig:
    """The training recipe. `batch_size` is the global batch: under torchrun each rank takes its share."""

    model: str = "resnet10t"
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float = None  # None: 0.1 for sgd, 1e-3 for adamw
    momentum: float = 0.9  # sgd only
    weight_decay: float = None  # None: 5e-4 for sgd, 0.05 for adamw; never on norms and biases
    schedule: str = "cosine"  # cosine | step | cyclic, each after a linear warm-up
    warmup_epochs: float = 1
    milestones: tuple = (0.5, 0.75)  # step: lr x gamma at these fractions of training
    gamma: float = 0.1
    label_smoothing: float = 0.1
    augmentation: str = "standard"
    flip: bool = False  # horizontal flips in the augmentation (not for digits)
    # Streamed (ImageFolder) data only: timm's RandomResizedCrop of the full decoded image, in the workers
    crop_scale: tuple = (0.08, 1.0)  # area fraction of the crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect ratio (w / h) of the crop
    interpolation: str = None  # resampling filter (bilinear, bicubic, ...); None: the model's own (timm config)
    amp: str = "auto"  # auto (bf16 where supported, else fp16) | bf16 | fp16 | none; CUDA only
    channels_last: bool = True  # CUDA only
    input_size: int = None  # streamed images are cropped to it; None: the model's own (timm data config)
    workers: int = None  # DataLoader workers decoding streamed images; None: context.default_workers()
    seed: int = 0
    pretrained: str = None  # local timm weights to start from (see `create_classifier`); None: random init
    config_file: str = None  # the YAML recipe (`train --config`) these values came from: a record only

    def to_dict(self):
        d = dataclasses.asdict(self)
        for k in ("milestones", "crop_scale", "crop_ratio"):
            d[k] = list(d[k]) if isinstance(d[k], (tuple, list)) else d[k]
        return d

    def resolved(self):
        """A copy with the optimizer's defaults filled in, checked: bad values are errors, not corrections."""
        checks = [(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
                  (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
                  (self.amp in AMP, f"amp must be one of {', '.join(AMP)}"),
                  (self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.warmup_epochs >= 0, "warm-up epochs must be >= 0"),
                  (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
                  (self.lr is None or self.lr > 0, "lr must be > 0"),
                  (self.weight_decay is None or self.weight_decay >= 0, "weight decay must be >= 0"),
                  (all(0 < m < 1 for m in self.milestones), "step milestones must be fractions in (0, 1)"),
                  (self.input_size is None or self.input_size >= 8, "input size must be >= 8"),
                  (_pair(self.crop_scale) and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                   "crop scale must be two area fractions 0 < min <= max <= 1"),
                  (_pair(self.crop_ratio) and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
                   "crop ratio must be two aspect ratios 0 < min <= max"),
                  (self.interpolation is None or self.interpolation in INTERPOLATIONS,
                   f"interpolation must be one of {', '.join(INTERPOLATIONS)}"),
                  (self.workers is None or self.workers >= 0, "workers must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad training config: {msg} (got {self.to_dict()})")
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        return dataclasses.replace(self, lr=self.lr if self.lr is not None else defaults["lr"],
                                   weight_decay=self.weight_decay if self.weight_decay is not None
                                   else defaults["weight_decay"], milestones=tuple(self.milestones),
                                   crop_scale=tuple(self.crop_scale), crop_ratio=tuple(self.crop_ratio))


def _pair(v):
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)


def check_model_name(name):
    """An unknown timm model name is an error that suggests close matches."""
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {name!r}{hint}")


def pretrained_file(path):
    """The weight file `--pretrained path` names: the file itself, or a folder's model.safetensors or
    pytorch_model.bin; a missing one is an error."""
    p = pathlib.Path(path)
    if p.is_dir():
        found = [p / n for n in PRETRAINED_FILES if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"--pretrained {path}: the folder holds no {' or '.join(PRETRAINED_FILES)}")
        return found[0]
    if not p.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such file or folder (give a local .safetensors, .bin or "
                                f".pth file, or a folder holding {' or '.join(PRETRAINED_FILES)})")
    return p


def create_classifier(name, num_classes, in_chans, pretrained=None):
    """A timm model by name; an unknown name is an error that suggests close matches.

    Args:
        pretrained: None (random weights), or local timm weights: a .safetensors / .bin / .pth file or a folder
            holding one of PRETRAINED_FILES. Nothing is downloaded. timm adapts them as it does its own: the
            classifier head stays at random init when num_classes differs from the model's pretrained config
            (1000 for ImageNet models), and the stem conv is summed over RGB when in_chans is 1.
    """
    import timm

    check_model_name(name)
    if pretrained is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    file = pretrained_file(pretrained)
    try:
        # A `file` in the pretrained config takes precedence over the hub and URLs; timm reads .safetensors with
        # safetensors and anything else with torch.load(weights_only=True), so no pickle code runs.
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)},
                                 num_classes=num_classes, in_chans=in_chans)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and pickle each raise their own kinds
        why = " ".join(str(e).split())[:300] or e.__class__.__name__
        raise ValueError(f"cannot load --pretrained {file} into {name}: {why}") from e


def normalization(model, channels):
    """Mean/std resolved from the model's own data config, reduced to the input's channel count."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    if channels == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def lr_at(step, total, warmup, base, schedule="cosine", milestones=(0.5, 0.75), gamma=0.1):
    """Learning rate at optimizer step `step` of `total`: a linear warm-up over `warmup` steps, then

    - cosine: half a cosine from `base` to 0;
    - step: `base` x `gamma` at each milestone (a fraction of all steps);
    - cyclic: one triangular cycle, the peak at the end of the warm-up, then linearly to 0 (one-cycle).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "cyclic":
        return base * max(0.0, 1 - t)
    if schedule == "step":
        return base * gamma ** sum(step >= m * total for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


_lr_at = lr_at  # the name tests and older code use


def _param_groups(model, weight_decay):
    """timm's parameter groups, as its recipes use them: no weight decay on norms and biases (1-d), nor on what
    the model lists in `no_weight_decay()` (a ViT's position embedding and class token), which decay only hurts."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    no_decay, decay = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    # decayed group first, as checkpoints of earlier versions store the optimizer state: they still resume
    return [decay, no_decay]


def _optimizer(model, cfg):
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def _amp(cfg, device):
    """(autocast dtype or None, GradScaler): mixed precision on CUDA only (bf16 on CPU is slower than fp32)."""
    amp = cfg.amp
    if device.type != "cuda":
        if amp not in ("auto", "none"):
            logger.warning("--amp %s applies on CUDA only; training in float32 on %s", amp, device)
        amp = "none"
    elif amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    # fp16 needs loss scaling (its small gradients underflow); bf16 has float32's range and does not
    return dtype, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def derived_seed(*parts):
    """A 60-bit seed derived from (run seed, epoch, rank, purpose): independent streams that a resumed run
    re-derives from the epoch alone, on every rank, with nothing to carry over."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def epoch_plan(n, batch_size, seed, epoch, rank=0, world=1):
    """This rank's batches of an epoch: [(dataset indices, size of the global batch)].

    Every rank draws the same seeded permutation and takes its contiguous slice of each global batch, so the
    ranks see disjoint images and together exactly the one-process epoch. Under DDP a last batch too small to
    give every rank an image is dropped.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch, "perm")))
    plan = []
    for i in range(0, n, batch_size):
        batch = perm[i:i + batch_size]
        if len(batch) < world:
            break
        plan.append((batch.tensor_split(world)[rank], len(batch)))
    return plan


# --- input: in memory or streamed ------------------------------------------------------------------

class _InMemory:
    """Batches gathered from a uint8 ImageSet; on CUDA the whole set lives on the device when it is small."""

    def __init__(self, data, device):
        images, labels = data.images, data.labels
        if device.type == "cuda" and images.numel() <= 2**31:
            images, labels = images.to(device), labels.to(device)
        self.images, self.labels, self.device = images, labels, device

    def __call__(self, plan, epoch=0):
        for idx, n in plan:
            idx = idx.to(self.images.device)
            yield (self.images[idx].to(self.device, non_blocking=True),
                   self.labels[idx].to(self.device, non_blocking=True), n)

    def close(self):
        pass


class StreamingImages(torch.utils.data.Dataset):
    """Images on disk, decoded in DataLoader workers into uint8 `C x H x W` batches at the model's size.

    Training (`train=True`): timm's ImageNet train transform on the full decoded image (a random resized crop of
    `scale` and `ratio`, then a flip when `flip`; data/decode.py). Each sample's randomness comes from
    (run seed, epoch, dataset index) alone, so a run gives the same crops whatever the worker count, and a
    resumed run the same as an uninterrupted one. `train=False`: the eval transform (resize, centre crop).

    The loader asks for a whole batch, `(epoch, [indices])`, and gets `(images, labels, skipped files)`. A file
    that fails to decode is replaced by the next readable one in index order (so the batch keeps its size and
    every rank its share) and named in `skipped`; the trainer counts those against `max_corrupt`.
    """

    def __init__(self, files, labels, channels, size, interpolation="bilinear", *, train=True, seed=0,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=False, crop_pct=0.875, draft=True,
                 max_corrupt=0.01):
        self.files, self.labels = decode.path_array(files), torch.as_tensor(labels)
        self.channels, self.size, self.interpolation = channels, tuple(size), interpolation
        self.train, self.seed, self.scale, self.ratio = train, seed, tuple(scale), tuple(ratio)
        self.flip, self.crop_pct, self.draft = flip, crop_pct, draft
        # how far to look for a readable replacement before the folder is plainly broken
        self.tries = max(10, math.ceil(max_corrupt * len(self.files)) + 1)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        """Sample `i` of epoch 0 (or `(epoch, i)`): (image, label); a bad file is replaced as in a batch."""
        epoch, i = i if isinstance(i, tuple) else (0, i)
        x, y, _ = self.__getitems__((epoch, [i]))
        return x[0], int(y[0])

    def __getitems__(self, key):
        epoch, indices = key
        c, (h, w) = self.channels, self.size
        images = torch.empty(len(indices), c, h, w, dtype=torch.uint8)
        labels, skipped = torch.empty(len(indices), dtype=torch.long), []
        for k, i in enumerate(indices):
            for j in range(i, i + self.tries):
                j %= len(self.files)
                path = os.fsdecode(self.files[j])
                try:
                    images[k] = self.decode(path, derived_seed(self.seed, epoch, j, "crop"))
                    labels[k] = self.labels[j]
                    break
                except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unreadable
                    skipped.append((path, " ".join(f"{e.__class__.__name__}: {e}".split())[:200]))
            else:
                names = ", ".join(p for p, _ in skipped[-3:])
                raise ValueError(f"{self.tries} unreadable images in a row (e.g. {names}); check the folder or "
                                 "raise --max-corrupt")
        return images, labels, skipped

    def decode(self, path, seed=0):
        import random

        mode = "L" if self.channels == 1 else "RGB"
        if not self.train:
            return decode.eval_image(path, self.size, mode, self.crop_pct, self.interpolation)
        return decode.train_image(path, self.size, mode, random.Random(seed), self.scale, self.ratio,
                                  self.interpolation, self.flip, self.draft)



class _PlanSampler:
    """A batch sampler replaying this epoch's plan as `(epoch, [indices])`: set before each epoch, read in the
    main process, so the workers learn the epoch from the batch itself."""

    plan, epoch = (), 0

    def __iter__(self):
        return iter([(self.epoch, idx) for idx in self.plan])

    def __len__(self):
        return len(self.plan)


class _Streamed:
    """Batches of a FileSet from DataLoader workers; unreadable files are logged once each and counted, and more
    than `max_corrupt` of the set is an error that names them."""

    def __init__(self, data, device, size, workers, interpolation, *, seed=0, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), flip=False, max_corrupt=None, check=True):
        self.device, self.sampler = device, _PlanSampler()
        workers = context.default_workers() if workers is None else workers
        self.max_corrupt = getattr(data, "max_corrupt", 0.01) if max_corrupt is None else max_corrupt
        self.total, self.check, self.skipped = len(data), check, {}
        dataset = StreamingImages(data.files, data.labels, data.channels, size, interpolation, seed=seed,
                                  scale=scale, ratio=ratio, flip=flip, max_corrupt=self.max_corrupt)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=decode.whole_batch,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None)

    def __call__(self, plan, epoch=0):
        self.sampler.plan, self.sampler.epoch = [idx.tolist() for idx, _ in plan], epoch
        for (x, y, skipped), (_, n) in zip(self.loader, plan):
            self.note(skipped)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), n

    def note(self, skipped):
        """Record unreadable files (each logged once); stop when they pass `max_corrupt` of the set."""
        for path, why in skipped:
            if path not in self.skipped:
                self.skipped[path] = why
                logger.warning("unreadable image %s (%s): skipped, the next image takes its place", path, why)
        if self.check:
            check_corrupt(list(self.skipped), self.total, self.max_corrupt)

    def close(self):
        del self.loader  # persistent workers exit with it


def check_corrupt(bad, total, max_corrupt, what="the training set"):
    """More than `max_corrupt` of `total` images unreadable is an error naming the first few."""
    if len(bad) > max_corrupt * total:
        raise ValueError(f"{len(bad)} of the {total} images in {what} are unreadable (more than the --max-corrupt "
                         f"{max_corrupt:g} allows), e.g. {', '.join(map(str, bad[:5]))}: delete or replace them, "
                         "or raise --max-corrupt")


def _input_size(data, model, cfg):
    """(H, W) the model trains at: an in-memory set's own, a streamed set's configured or the model's."""
    import timm.data

    if hasattr(data, "images"):
        if cfg.input_size is not None and cfg.input_size != data.images.shape[2]:
            raise ValueError(f"--input-size {cfg.input_size} applies to streamed images; {data.name} is in memory "
                             f"at {tuple(data.images.shape[2:])} (pass --stream on to resize it)")
        return tuple(data.images.shape[2:])
    if cfg.input_size is not None:
        return (cfg.input_size, cfg.input_size)
    return tuple(timm.data.resolve_model_data_config(model)["input_size"][1:])


# --- distributed ---------------------------------------------------------------------------------------

def _distributed(device):
    """(rank, world size, device, whether this call started the process group) from the process context
    (torchrun and `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    ctx = context.current(device)  # "auto"/"cuda" -> cuda:LOCAL_RANK
    device = torch.device(ctx.device)
    if ctx.world_size == 1:
        return 0, 1, device, False
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's collectives and DDP use the current device
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _all_reduce(t, world, op="sum"):
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t


# --- training ------------------------------------------------------------------------------------------

def train(data, out, config, device="cpu", data_info=None, progress=True, resume=False, force=False,
          on_epoch_end=None):
    """Train a classifier on an ImageSet (in memory) or a FileSet (streamed) and write the checkpoint `out`.

    Under torchrun (WORLD_SIZE > 1 in the environment) this is DDP: every rank calls it with the same data;
    each trains on its slice of every batch, gradients are averaged, only rank 0 writes files.

    Args:
        data: ImageSet (uint8 images, labels, classes) or data.mixing.FileSet.
        out: checkpoint folder (see the module docstring).
        config: TrainConfig.
        device: "cpu", "cuda", "auto", ...; under torchrun "cuda" and "auto" are cuda:LOCAL_RANK.
        data_info: what the data is (sources, mode, counts), written to data.json.
        resume: continue from the last completed epoch in `out` (a run with another config is an error).
        force: train from scratch even if `out` holds a complete checkpoint.
        on_epoch_end: called with each epoch's metrics row once its checkpoint is saved.
    Returns the metric rows, one per epoch.
    """
    from tqdm.auto import tqdm

    from .augment import jsd_loss

    cfg = config.resolved()
    if resume and force:
        raise ValueError("--resume continues a run, --force starts it over: pass one of them")
    if len(data.classes) < 2:
        raise ValueError(f"{data.name} has {len(data.classes)} class; a classifier needs at least 2")
    if len(data) == 0:
        raise ValueError(f"{data.name} holds no images")
    out = pathlib.Path(out)
    rank, world, device, started = _distributed(device)
    try:
        if len(data) < world:
            raise ValueError(f"{data.name} has {len(data)} images, fewer than the {world} processes")
        channels = data.images.shape[1] if hasattr(data, "images") else data.channels
        torch.manual_seed(cfg.seed)
        model = create_classifier(cfg.model, len(data.classes), channels, pretrained=cfg.pretrained)
        size = _input_size(data, model, cfg)
        streamed = not hasattr(data, "images")
        if streamed and cfg.interpolation is None:
            import timm.data
            cfg = dataclasses.replace(cfg, interpolation=timm.data.resolve_model_data_config(model).get(
                "interpolation", "bilinear"))
        record = {**cfg.to_dict(), "in_chans": int(channels), "input_size": list(size),
                  "num_classes": len(data.classes)}
        meta = {"name": data.name, "num_images": len(data), **(data_info or {})}
        state = _prepare(out, record, list(data.classes), meta, resume, force, rank, world)
        if state == "complete":
            return read_metrics(out)
        if state is not None:
            model.load_state_dict(state["model"])
        model.to(device)
        cuda = device.type == "cuda"
        if cuda and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = _optimizer(model, cfg)
        amp_dtype, scaler = _amp(cfg, device)
        ddp = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None)
        rows, step, start = [], 0, 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            if state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            rows, step, start = json.loads(state["rows"]), state["step"], state["epoch"]
            if state.get("world_size", world) != world:
                logger.warning("resuming a run trained on %d processes on %d: later epochs will not match an "
                               "uninterrupted run exactly", state["world_size"], world)
            logger.info("resuming %s after epoch %d of %d", out, start, cfg.epochs)
        mean, std = (t.to(device) for t in normalization(model, channels))
        if streamed:
            # the workers crop (and flip) the full image, as timm does: the batch augmentation must not crop again
            augment = create_augmentation(cfg.augmentation, flip=cfg.flip, crop=False)
            batches = _Streamed(data, device, size, cfg.workers, cfg.interpolation, seed=cfg.seed,
                                scale=cfg.crop_scale, ratio=cfg.crop_ratio, flip=cfg.flip, check=world == 1)
        else:
            augment = create_augmentation(cfg.augmentation, flip=cfg.flip)
            batches = _InMemory(data, device)
        steps_per_epoch = len(epoch_plan(len(data), cfg.batch_size, cfg.seed, 0, rank, world))
        total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
        # Checking the loss forces a device sync: every step on one CPU process (free), else every 50 steps.
        check_every = 1 if (device.type == "cpu" and world == 1) else 50
        num_classes = len(data.classes)
        t0, before = time.time(), rows[-1]["seconds"] if rows else 0.0
        bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, disable=not progress or rank != 0,
                   desc=f"train {cfg.model} on {data.name}")
        for epoch in bar:
            torch.manual_seed(derived_seed(cfg.seed, epoch, rank, "torch"))  # dropout, drop-path
            aug_gen = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, rank, "augment"))
            plan = epoch_plan(len(data), cfg.batch_size, cfg.seed, epoch, rank, world)
            ddp.train()
            sums, count = torch.zeros(2, dtype=torch.float64, device=device), 0  # loss sum, correct; images
            finite, first = [], step
            inner = tqdm(batches(plan, epoch), total=len(plan), leave=False, desc=f"epoch {epoch + 1}",
                         disable=not progress or rank != 0 or len(plan) < 50)
            for i, (x, y, n_global) in enumerate(inner):
                lr = lr_at(step, total, warmup, cfg.lr, cfg.schedule, cfg.milestones, cfg.gamma)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = augment(x.float().div_(255), F.one_hot(y, num_classes).float(), aug_gen)
                x = (x - mean) / std
                if cuda and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = ddp(x)
                logits, n = logits.float(), len(y)
                # soft targets (mixup, cutmix) and hard ones alike; label smoothing applies to both
                loss_sum = F.cross_entropy(logits[:n], y, label_smoothing=cfg.label_smoothing, reduction="sum")
                if augment.jsd:  # AugMix: x held (clean, aug1, aug2); the consistency term is a mean over n
                    loss_sum = loss_sum + augment.jsd_weight * jsd_loss(logits, n) * n
                # The global batch's mean loss: each rank divides its sum by the global batch size, and DDP's
                # gradient average (/ world) is undone by * world; exact even for unequal slices.
                loss = loss_sum * (world / n_global)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                step += 1
                # accumulated on the device: no sync per step (train accuracy against the soft target's argmax)
                sums += torch.stack([loss_sum.detach().double(), (logits[:n].argmax(1) == y.argmax(1)).sum().double()])
                count += n
                finite.append(torch.isfinite(loss_sum.detach()))
                if (i + 1) % check_every == 0 or i + 1 == len(plan):
                    ok = _all_reduce(torch.stack(finite).int(), world, "min")
                    if not bool(ok.all()):
                        bad = first + int((ok == 0).nonzero()[0])
                        raise FloatingPointError(
                            f"loss became nan or inf at epoch {epoch + 1}, step {bad + 1} (lr {lr:.3g}); stopped. "
                            f"{_kept(out, rows)} Lower --lr or check the data")
                    finite, first = [], step
            inner.close()
            if streamed:
                _skipped_files(out, batches, world, rank)
            totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=device)])
            loss_sum, correct, count = _all_reduce(totals, world).tolist()
            rows.append({"epoch": epoch + 1, "train_loss": round(loss_sum / count, 5),
                         "train_acc": round(correct / count, 5), "lr": round(lr, 6),
                         "seconds": round(before + time.time() - t0, 2)})
            if rank == 0:
                _save_epoch(out, model, opt, scaler, step, rows, world)
                logger.info("epoch %d/%d: loss %.4f, acc %.4f, lr %.4g (%.1f s)", epoch + 1, cfg.epochs,
                            rows[-1]["train_loss"], rows[-1]["train_acc"], lr, rows[-1]["seconds"])
            bar.set_postfix(loss=rows[-1]["train_loss"], acc=rows[-1]["train_acc"])
            if on_epoch_end is not None:
                on_epoch_end(rows[-1])
        batches.close()
        if rank == 0:
            _finish(out, model, rows, step, world, device, amp_dtype)
        _barrier(world)
        return rows
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _skipped_files(out, batches, world, rank):
    """Unreadable files of all ranks, written to `skipped.txt` in the checkpoint folder (path, tab, why); more
    than --max-corrupt of the set stops the run on every rank alike."""
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, batches.skipped)
        for part in everyone:
            for path, why in part.items():
                batches.skipped.setdefault(path, why)
    check_corrupt(sorted(batches.skipped), batches.total, batches.max_corrupt)
    if rank == 0 and batches.skipped:
        file = out / "skipped.txt"
        known = dict(line.split("\t", 1) for line in file.read_text().splitlines() if "\t" in line) \
            if file.exists() else {}
        known.update(batches.skipped)
        atomic_write_text(file, "".join(f"{p}\t{w}\n" for p, w in sorted(known.items())))


def _kept(out, rows):
    good = rows[-1]["epoch"] if rows else 0
    if good == 0:
        return "No epoch finished, so no checkpoint was kept."
    return f"The checkpoint of epoch {good} is kept in {out / CHECKPOINTS}."


# --- the checkpoint folder -----------------------------------------------------------------------------

def _weights(model):
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def _epoch_dirs(out):
    root = pathlib.Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.name.startswith("epoch-") and (d / "model.safetensors").exists()
                  and (d / "state.pt").exists())


def is_complete(out):
    out = pathlib.Path(out)
    return (out / "model.safetensors").exists() and (out / COMPLETE).exists()


def _save_epoch(out, model, opt, scaler, step, rows, world):
    """Weights (safetensors) and training state (tensors and plain types: loadable with weights_only=True)
    into a temporary folder, renamed into place: an epoch's checkpoint appears whole or not at all."""
    from safetensors.torch import save_file

    epoch = rows[-1]["epoch"]
    root = out / CHECKPOINTS
    tmp = root / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_weights(model), tmp / "model.safetensors")
    # The RNG needs no saving: every epoch re-derives its generators from (seed, epoch, rank). The lr
    # schedule is a function of the step.
    torch.save({"epoch": epoch, "step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "rows": json.dumps(rows), "world_size": world}, tmp / "state.pt")
    final = root / f"epoch-{epoch:04d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _epoch_dirs(out):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    _write_metrics(out, rows)


def _load_epoch(folder):
    from safetensors.torch import load_file

    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    state["model"] = load_file(folder / "model.safetensors")
    return state


def _finish(out, model, rows, step, world, device, amp_dtype):
    """Final weights, then the marker: a kill in between leaves a folder that --resume completes."""
    from safetensors.torch import save_file

    _write_metrics(out, rows)
    tmp = out / ".model.safetensors.tmp"
    save_file(_weights(model), tmp)
    os.replace(tmp, out / "model.safetensors")
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    atomic_write_text(out / COMPLETE, json.dumps({
        "epochs": rows[-1]["epoch"], "steps": step, "seconds": rows[-1]["seconds"], "world_size": world,
        "device": device.type, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
        "torch": torch.__version__, "model_sha256": digest}, indent=2))
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def _write_metrics(out, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def read_metrics(out):
    """metrics.csv as rows of numbers."""
    with open(pathlib.Path(out) / "metrics.csv", newline="") as f:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _differences(out, record, classes, meta):
    """What differs between the run in `out` and this one: ["model 'resnet10t' (now 'test_resnet')", ...]."""
    import yaml

    old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    old = {**ADDED_FIELDS, **old}
    diffs = [f"{k} {old.get(k)!r} (now {record.get(k)!r})" for k in record
             if k not in RUNTIME_FIELDS and old.get(k) != record.get(k)]
    if (out / "classes.json").exists() and json.loads((out / "classes.json").read_text()) != classes:
        diffs.append("another class list")
    if (out / "data.json").exists():
        old_meta = json.loads((out / "data.json").read_text())
        diffs += [f"data {k} {old_meta.get(k)!r} (now {meta.get(k)!r})" for k in ("name", "num_images", "counts")
                  if old_meta.get(k) != meta.get(k)]
    return diffs


def _prepare(out, record, classes, meta, resume, force, rank, world):
    """Decide what to do with what `out` already holds; return the state to resume, None, or "complete".

    Every rank reads the folder and reaches the same decision; only rank 0 changes it.
    """
    import yaml

    complete, last = is_complete(out), (_epoch_dirs(out) or [None])[-1]
    if complete and not (resume or force):
        old = yaml.safe_load((out / "config.yaml").read_text()) or {}
        raise ValueError(f"{out} already holds a complete checkpoint ({old.get('model')}, {old.get('epochs')} "
                         "epochs); pass --force to train it again from scratch, or choose another --out")
    state = None
    if resume and (complete or last is not None) and (out / "config.yaml").exists():
        diffs = _differences(out, record, classes, meta)
        if diffs:
            raise ValueError(f"cannot resume {out}: it was trained with {'; '.join(diffs)}; pass --force to start "
                             "over, or choose another --out")
        if complete:
            logger.info("%s is already complete; nothing to resume", out)
            return "complete"
        state = _load_epoch(last)
    elif resume:
        logger.info("%s holds no finished epoch to resume; starting from epoch 1", out)
    elif last is not None and not complete:
        logger.warning("%s holds a run stopped after %s; starting over (pass --resume to continue it)", out,
                       last.name.replace("-", " ").lstrip("0"))
    _barrier(world)
    if rank == 0:
        if state is None:
            for p in (out / COMPLETE, out / "model.safetensors", out / "metrics.csv", out / "skipped.txt"):
                p.unlink(missing_ok=True)
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(record, sort_keys=False))
        atomic_write_text(out / "classes.json", json.dumps(classes))
        atomic_write_text(out / "data.json", json.dumps(meta, indent=2))
    _barrier(world)
    return state


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
