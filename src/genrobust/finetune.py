"""Fine-tuning a generator on a real training set: `genrobust generator finetune`.

The paper's later version fine-tunes Stable Diffusion on the real ImageNet training images (one epoch,
prompts built from class names) and finds real + *base* SD data more robust than real + *fine-tuned* SD
data: fitting the generator to the real distribution buys fidelity and costs diversity. This module makes
the fine-tuned generator; `genrobust generate stats` measures both effects.

- `text2img` (Stable Diffusion 1.x/2.x and other UNet text-to-image pipelines): the standard denoising
  objective (epsilon or v-prediction, as the scheduler says) on VAE latents, VAE and text encoder frozen,
  each image's prompt built from its class name. Full UNet fine-tuning or LoRA (peft) on the attention
  projections; gradient accumulation, gradient checkpointing, mixed precision and EMA; one process or
  several under `accelerate launch` / `torchrun`. The output is a whole pipeline folder (LoRA merged into
  the UNet, the adapter kept in `lora/`), so `genrobust generate --generator text2img --model OUT` loads it
  like any local model.
- `digits-ddpm`: the shipped generator fine-tuned on `digits-mnist/train` (the classifier's own real data)
  in the handwritten style; the output loads with `--generator-path OUT`.

Both write `card.json` (base model and its revision, data, hyper-parameters, seed, command, loss log) and
`README.md`, checkpoint every `save_every` steps and resume when rerun on the same folder; a complete folder
is returned as it is.
"""
import contextlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import time

import torch
import torch.nn.functional as F

from . import context
from .data.folder import atomic_write_text

logger = logging.getLogger(__name__)

FINETUNABLE = ("digits-ddpm", "text2img")
MODES = ("full", "lora")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CHECKPOINTS = "checkpoints"
RECORD = "finetune.json"
CARD = "card.json"
# LoRA on the attention projections, as diffusers' train_text_to_image_lora.py does.
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
# Settings that change how fast a run goes, not what it computes: a resume may change them.
RUNTIME_FIELDS = ("grad_checkpointing", "workers", "save_every")

# digits-ddpm defaults: measured on 2 CPU cores (see docs/finetune.md and bench/bench_finetune.py).
DIGITS = dict(steps=600, lr=2e-4, batch_size=64, warmup=50, save_every=200)
# text2img defaults: diffusers' train_text_to_image(.py|_lora.py) learning rates; steps default to one epoch
# (the paper's fine-tune), batch is the global batch of one micro-step.
TEXT2IMG = dict(lr={"full": 1e-5, "lora": 1e-4}, batch_size=16, lora_rank=4, ema_decay=0.9999, warmup=0,
                save_every=500, prompt="a photo of a {}.", weight_decay=1e-2, max_grad_norm=1.0)


def finetune(generator, dataset, out, *, model=None, steps=None, lr=None, batch_size=None, seed=0, mode=None,
             lora_rank=None, grad_accum=None, grad_checkpointing=None, mixed_precision=None, ema=None,
             ema_decay=None, warmup=None, prompt=None, resolution=None, save_every=None, workers=None,
             device="cpu", progress=True, command=None, callback=None):
    """Fine-tune `generator` on the real `dataset`, writing a generator folder to `out`; returns `out`.

    Args:
        generator: "text2img" or "digits-ddpm".
        dataset: a dataset spec (`digits-mnist/train`, `imagefolder:PATH`, or a folder path).
        model: the base: a diffusers folder or cached hub id (text2img); a digits-ddpm folder (None: shipped).
        steps: optimizer steps (text2img default: one epoch; digits-ddpm 600).
        mode: "full" or "lora" (text2img); lora_rank: LoRA rank (alpha = rank).
        grad_accum: micro-batches per optimizer step; batch_size is the global batch of one micro-batch.
        mixed_precision: "auto" (bf16/fp16 on CUDA, none on CPU), "no", "fp16", "bf16".
        ema, ema_decay: keep and save an EMA of the trained weights (digits-ddpm always does).
        prompt: the class prompt template, one `{}` (text2img; default "a photo of a {}.").
        resolution: training size in pixels (text2img; default the model's native size).
        callback: `callback(step, loss)` after every optimizer step (text2img), e.g. for logging.
    Options a generator does not have are errors, not ignored.
    """
    from .generate import GENERATORS

    GENERATORS.get(generator)  # a misspelt name fails with suggestions
    if generator not in FINETUNABLE:
        raise ValueError(f"generator {generator!r} cannot be fine-tuned here; choose from {', '.join(FINETUNABLE)}")
    if generator == "digits-ddpm":
        text2img_only = {
            "mode": mode not in (None, "full"), "lora_rank": lora_rank is not None,
            "grad_accum": grad_accum not in (None, 1), "grad_checkpointing": bool(grad_checkpointing),
            "mixed_precision": mixed_precision not in (None, "auto", "no"), "ema": ema is False,
            "prompt": prompt is not None, "resolution": resolution is not None, "callback": callback is not None,
            "workers": workers is not None}
        given = [k for k, v in text2img_only.items() if v]
        if given:
            raise ValueError(f"digits-ddpm fine-tunes its whole UNet in float32 with EMA, conditioned on class and "
                             f"style; it takes no {', '.join(given)} (text2img options)")
        return finetune_digits(out, dataset, steps=steps or DIGITS["steps"], lr=lr or DIGITS["lr"], seed=seed,
                               device=device, progress=progress, command=command, base=model,
                               batch_size=batch_size or DIGITS["batch_size"], warmup=DIGITS["warmup"]
                               if warmup is None else warmup, ema_decay=ema_decay or 0.999,
                               save_every=save_every or DIGITS["save_every"])
    if model is None:
        raise ValueError("text2img fine-tuning needs the base model (--model): a local diffusers folder or a hub id "
                         "whose weights are in the local cache")
    mode = mode or "full"
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose from {', '.join(MODES)}")
    return finetune_text2img(
        model, dataset, out, steps=steps, lr=lr or TEXT2IMG["lr"][mode], batch_size=batch_size or
        TEXT2IMG["batch_size"], seed=seed, mode=mode, lora_rank=lora_rank or TEXT2IMG["lora_rank"],
        grad_accum=grad_accum or 1, grad_checkpointing=bool(grad_checkpointing),
        mixed_precision=mixed_precision or "auto", ema=bool(ema), ema_decay=ema_decay or TEXT2IMG["ema_decay"],
        warmup=TEXT2IMG["warmup"] if warmup is None else warmup, prompt=prompt or TEXT2IMG["prompt"],
        resolution=resolution, save_every=save_every or TEXT2IMG["save_every"],
        workers=context.default_workers(cap=4) if workers is None else workers, device=device, progress=progress,
        command=command, callback=callback)


# --- the output folder: start, resume, or return it complete -------------------------------------------------

def _differences(old, new):
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in RUNTIME_FIELDS]
    return [f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in keys if old.get(k) != new.get(k)]


def prepare_out(out, record, is_complete):
    """"complete", "resume" or "start" for `out`; a folder made with other settings is an error.

    `record` holds every setting that decides the result; `is_complete(out)` says whether the run finished.
    """
    out = pathlib.Path(out)
    path = out / RECORD
    if path.exists():
        diffs = _differences(json.loads(path.read_text()), record)
        if diffs:
            raise ValueError(f"{out} holds a fine-tuning run made with {'; '.join(diffs)}; rerun with its settings "
                             "to resume or reuse it, or choose another --out")
        return "complete" if is_complete(out) else "resume"
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no fine-tuning run ({RECORD}); choose a new or empty --out")
    return "start"


def _write_record(out, record):
    atomic_write_text(pathlib.Path(out) / RECORD, json.dumps(record, indent=2))


def _versions():
    import importlib.metadata as md

    names = ("genrobust", "torch", "diffusers", "transformers", "accelerate", "peft")
    found = {}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found


# --- digits-ddpm -----------------------------------------------------------------------------------------

def _base_digits(base):
    from .generate.generators import SHIPPED, file_sha256

    path = pathlib.Path(base) if base else SHIPPED
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} is not a digits-ddpm folder (no unet/ weights); omit --generator-path to "
                                "fine-tune the shipped one")
    name = "shipped" if path == SHIPPED else str(path)
    return path, name, file_sha256(weights)


def _digits_complete(steps):
    def complete(out):
        # README.md is written last, after the sample grid
        card = out / CARD
        if not (card.exists() and (out / "README.md").exists()):
            return False
        return json.loads(card.read_text()).get("training", {}).get("steps_done") == steps
    return complete


def finetune_digits(out, dataset="digits-mnist/train", steps=DIGITS["steps"], lr=DIGITS["lr"], seed=0,
                    device="cpu", progress=True, command=None, *, base=None, batch_size=DIGITS["batch_size"],
                    style="handwritten", warmup=DIGITS["warmup"], ema_decay=0.999,
                    save_every=DIGITS["save_every"], sample_grid=True):
    """Fine-tune digits-ddpm (the shipped one, or `base`) on a real digits set; returns the folder.

    The folder loads with `DigitsDDPM(path=out)` / `genrobust generate --generator-path out`. Every image of
    `dataset` is trained with `style` (with classifier-free dropout of class and style, as in pretraining).
    A complete folder is returned without training; a partial one made with the same settings resumes from
    its last checkpoint (`train_state.pt`, every `save_every` steps); other settings are an error.
    `sample_grid` writes `samples.png` (rows of handwritten 0-9, then printed) to look at.
    """
    from .generate import digits_ddpm

    device = context.resolve_device(device)  # under torchrun, "cuda" is this rank's GPU
    out = pathlib.Path(out)
    base_path, base_name, revision = _base_digits(base)
    record = {"generator": "digits-ddpm", "base": base_name, "base_revision": revision, "dataset": dataset,
              "style": style, "steps": steps, "lr": lr, "batch_size": batch_size, "warmup": warmup,
              "ema_decay": ema_decay, "seed": seed, "save_every": save_every}
    if steps < 1 or lr <= 0 or batch_size < 1 or save_every < 1:
        raise ValueError(f"fine-tuning needs steps, batch size and save_every >= 1 and lr > 0; got steps {steps}, "
                         f"batch size {batch_size}, save_every {save_every}, lr {lr}")
    state = prepare_out(out, record, _digits_complete(steps))
    if state == "complete":
        logger.info("%s is already fine-tuned (%d steps); reusing it", out, steps)
        return out
    images, labels, _ = digits_ddpm.styled_set(dataset, style)  # a bad dataset fails before anything is written
    counts = dict(zip(map(str, range(10)), torch.bincount(labels, minlength=10).tolist()))
    out.mkdir(parents=True, exist_ok=True)
    _write_record(out, record)
    extra = {"finetune": {"base": {"path": base_name, "revision": revision}, "dataset": dataset, "style": style,
                          "num_images": len(images), "counts": counts, "versions": _versions()}}
    t0 = time.time()
    digits_ddpm.train(out, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                      seed=seed, device=device, save_every=save_every, command=command, progress=progress,
                      init=base_path, dataset=dataset, style=style, card=extra, sample_grid=sample_grid)
    card = json.loads((out / CARD).read_text())
    atomic_write_text(out / "README.md", _digits_readme(out, card, time.time() - t0))
    return out


def _digits_readme(out, card, seconds):
    ft, tr = card["finetune"], card["training"]
    grid = " `samples.png`: rows of handwritten 0-9, then printed." if (out / "samples.png").exists() else ""
    return f"""# digits-ddpm fine-tuned on {ft['dataset']}

Base: `{ft['base']['path']}` digits-ddpm (weights sha256 {ft['base']['revision']}), fine-tuned on
`{ft['dataset']}` ({ft['num_images']} images, style "{ft['style']}") for {tr['steps']} steps at batch
{tr['batch_size']}, lr {tr['lr']} (warm-up {tr['warmup']}, cosine), EMA {tr['ema_decay']}, seed {tr['seed']}
(last run of this command: {seconds:.0f} s).

Made by: `{tr.get('command') or 'genrobust.finetune.finetune_digits(...)'}`

Use it: `genrobust generate --generator digits-ddpm --generator-path {out} --strategy label --out DIR`.
`card.json` holds every setting and the loss log.{grid}
"""


# --- text2img ----------------------------------------------------------------------------------------

def prompt_name(class_name):
    """The words a prompt uses for a class: an ImageNet wnid (n01440764) becomes its CLIP name (tench)."""
    if re.fullmatch(r"n\d{8}", class_name):
        from .evaluate import reference

        names = {c["wnid"]: c["clip_name"] for c in reference("imagenet_classes.json")["classes"]}
        return names.get(class_name, class_name)
    return class_name


def load_base(model, revision=None):
    """The base text-to-image pipeline (float32, CPU); anything but a UNet text-to-image pipeline is an error."""
    import diffusers

    from .generate.pipelines import from_pretrained

    pipe = from_pretrained(diffusers.AutoPipelineForText2Image, model, "model_index.json", revision=revision)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipe, c, None) is None]
    if missing or getattr(pipe, "text_encoder_2", None) is not None:
        why = f"it has no {', '.join(missing)}" if missing else "it has a second text encoder (SDXL)"
        raise ValueError(f"{model} holds a {type(pipe).__name__}; fine-tuning supports UNet text-to-image pipelines "
                         f"with one text encoder (Stable Diffusion 1.x/2.x), and {why}")
    return pipe


def _resolve_precision(mixed_precision, device):
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; choose from {', '.join(MIXED_PRECISION)}")
    cuda = torch.device(device).type == "cuda"
    if mixed_precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("fp16 mixed precision needs CUDA; on CPU use --mixed-precision no (or bf16, which is slower "
                         "than float32 on most CPUs)")
    return mixed_precision


def _load_data(dataset):
    """(in-memory ImageSet or streamed FileSet, spec) of a dataset spec or folder path, read as RGB."""
    from .data import load_dataset
    from .data.mixing import read_folder
    from .generate.stats import resolve_images

    spec, folder = resolve_images(dataset)
    if folder is not None:
        files, _ = read_folder(folder, channels=3, stream=True)
        return files, spec
    return load_dataset(spec), spec


class _MemoryImages(torch.utils.data.Dataset):
    """An in-memory ImageSet as RGB uint8 at the training size (digits are 1 x 28 x 28)."""

    def __init__(self, data, size):
        self.images, self.labels, self.size = data.images, data.labels, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from .generate.stats import conform

        return conform(self.images[i:i + 1], 3, self.size)[0], int(self.labels[i])


class _Plan:
    """Batch sampler over micro-batches `start`.. `stop` - 1 of this rank, each epoch a seeded permutation
    (train.epoch_plan), so a resumed run reads exactly the batches the uninterrupted run would have."""

    def __init__(self, n, batch_size, seed, start, stop, rank, world):
        from .train import epoch_plan

        self.args, self.start, self.stop, self._plan = (n, batch_size, seed), start, stop, epoch_plan
        self.rank, self.world = rank, world
        self.per_epoch = len(epoch_plan(n, batch_size, seed, 0, rank, world))
        self.with_epoch = False  # streamed images are asked for as (epoch, indices): train.StreamingImages

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        epoch, plan = None, None
        for k in range(self.start, self.stop):
            if k // self.per_epoch != epoch:
                epoch = k // self.per_epoch
                plan = self._plan(*self.args, epoch, self.rank, self.world)
            idx = plan[k % self.per_epoch][0].tolist()
            yield (epoch, idx) if self.with_epoch else idx


def _loader(data, size, plan, workers):
    from .data.decode import whole_batch
    from .train import StreamingImages

    if hasattr(data, "images"):
        return torch.utils.data.DataLoader(_MemoryImages(data, size), batch_sampler=plan, num_workers=workers,
                                           prefetch_factor=4 if workers > 0 else None)
    # a generator learns whole images: the shorter side resized to the resolution and centre-cropped (the eval
    # transform at crop_pct 1), not the classifier's random resized crops
    dataset = StreamingImages(data.files, data.labels, 3, size, interpolation="bicubic", train=False, crop_pct=1.0,
                              max_corrupt=getattr(data, "max_corrupt", 0.01))
    plan.with_epoch = True
    batches = torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=workers,
                                          collate_fn=whole_batch, prefetch_factor=4 if workers > 0 else None)
    return _named_skips(batches)


def _named_skips(batches):
    """(images, labels) batches; files replaced because they would not decode are logged by name."""
    seen = set()
    for images, labels, skipped in batches:
        for path, why in skipped:
            if path not in seen:
                seen.add(path)
                logger.warning("unreadable image %s (%s); fine-tuning on the next image instead", path, why)
        yield images, labels


@torch.no_grad()
def _encode_prompts(pipe, prompts, device, dtype, batch_size=64):
    """The frozen text encoder's hidden states of each class prompt, computed once for the whole run."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(device)
    return torch.cat([pipe.text_encoder(ids[i:i + batch_size])[0].to(dtype) for i in range(0, len(ids), batch_size)])


def _add_lora(unet, rank, seed):
    from peft import LoraConfig

    torch.manual_seed(seed)  # LoRA's A matrices start random: the same on every rank and every resume
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))


def _place(module, device, dtype):
    module.to(device)
    if dtype != torch.float32:  # diffusers warns on any dtype cast, float32 included
        module.to(dtype)
    return module


def _trainable(unet):
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


@torch.no_grad()
def assign(module, state):
    """Copy tensors into `module`'s parameters by name (each keeps its dtype and device)."""
    params = dict(module.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"weights {unknown[:3]} do not fit {type(module).__name__}")
    for name, t in state.items():
        params[name].copy_(t)


class _Run:
    """The state of one text2img fine-tuning run: models, optimizer, EMA, and how to save and restore them."""

    def __init__(self, cfg, pipe, accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.noise_scheduler = _noise_scheduler(pipe)
        device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg["mixed_precision"], torch.float32)
        self.vae = _place(pipe.vae.requires_grad_(False), device, self.weight_dtype).eval()
        self.text_encoder = _place(pipe.text_encoder.requires_grad_(False), device, self.weight_dtype).eval()
        unet = pipe.unet
        if cfg["mode"] == "lora":
            unet.requires_grad_(False)
            # the frozen base may sit in half precision; the adapter trains in float32
            _place(unet, device, self.weight_dtype)
            _add_lora(unet, cfg["lora_rank"], cfg["seed"])
            for p in _trainable(unet).values():
                p.data = p.data.float()
        else:
            unet.requires_grad_(True).to(device)
        unet.train()
        if cfg["grad_checkpointing"]:
            unet.enable_gradient_checkpointing()
        params = list(_trainable(unet).values())
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=TEXT2IMG["weight_decay"])
        self.unet, self.opt = accelerator.prepare(unet, opt)
        self.ema = ({n: p.detach().clone().float() for n, p in _trainable(self.raw_unet).items()}
                    if cfg["ema"] else None)

    @property
    def raw_unet(self):
        return self.acc.unwrap_model(self.unet)

    def trained_state(self, use_ema=True):
        """The trained weights (EMA where kept) on CPU, float32, by parameter name."""
        src = self.ema if (use_ema and self.ema is not None) else _trainable(self.raw_unet)
        return {n: t.detach().float().cpu().contiguous() for n, t in src.items()}

    @torch.no_grad()
    def update_ema(self, step):
        if self.ema is None:
            return
        # warm-up, as digits-ddpm: average over what exists so early snapshots are not the initial weights
        decay = min(self.cfg["ema_decay"], (1 + step) / (10 + step))
        for n, p in _trainable(self.raw_unet).items():
            self.ema[n].lerp_(p.detach().float(), 1.0 - decay)

    def save(self, out, step, log, seconds):
        """A checkpoint folder, written beside and renamed into place: it appears whole or not at all."""
        from safetensors.torch import save_file

        root = pathlib.Path(out) / CHECKPOINTS
        tmp, final = root / f".step-{step:07d}.tmp", root / f"step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.trained_state(use_ema=False), tmp / "trainable.safetensors")
        if self.ema is not None:
            save_file(self.trained_state(use_ema=True), tmp / "ema.safetensors")
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
        # tensors and plain types only: read back with torch.load(weights_only=True)
        torch.save({"optimizer": self.opt.state_dict(), "scaler": scaler}, tmp / "optimizer.pt")
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, "log": log, "seconds": seconds}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, folder):
        """Restore weights, EMA and optimizer from a checkpoint folder; returns its state.json."""
        from safetensors.torch import load_file

        state = load_file(folder / "trainable.safetensors")
        if set(state) != set(_trainable(self.raw_unet)):
            raise ValueError(f"checkpoint {folder} holds other weights than this run trains; delete it to start over")
        assign(self.raw_unet, state)
        if self.ema is not None:
            self.ema = {n: t.to(self.acc.device) for n, t in load_file(folder / "ema.safetensors").items()}
        saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        self.opt.load_state_dict(saved["optimizer"])
        if self.acc.scaler is not None and saved["scaler"] is not None:
            self.acc.scaler.load_state_dict(saved["scaler"])
        return json.loads((folder / "state.json").read_text())


def checkpoints(out):
    """The finished checkpoint folders of a run, oldest first."""
    root = pathlib.Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.name.startswith("step-") and (d / "state.json").exists())


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    if sched.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the base's scheduler predicts {sched.config.prediction_type!r}; fine-tuning supports "
                         "epsilon and v_prediction")
    return sched


def _loss(run, sched, images, cond, gen):
    """The denoising loss of one micro-batch: noise (or velocity) prediction MSE on VAE latents."""
    device, dtype = run.acc.device, run.weight_dtype
    x = images.to(device).float().div(127.5).sub(1.0).to(dtype)
    with torch.no_grad():
        dist = run.vae.encode(x).latent_dist
        # the posterior sample drawn from this micro-batch's own generator (not the global RNG), so it is
        # the same on a resumed run
        eps = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
        latents = ((dist.mean + dist.std * eps) * run.vae.config.scaling_factor).float()
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    with run.acc.autocast():
        # LoRA keeps the frozen UNet in the weight dtype; a fully trained UNet is float32 (autocast casts)
        pred = run.unet(noisy.to(dtype if run.cfg["mode"] == "lora" else torch.float32), t,
                        encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), target.float())


def _text2img_complete(out):
    out = pathlib.Path(out)
    return (out / CARD).exists() and (out / "model_index.json").exists()


def is_complete(out):
    """Whether `out` holds a finished fine-tuning run of either kind (a study's cache check)."""
    out = pathlib.Path(out)
    if not (out / RECORD).exists():
        return False
    record = json.loads((out / RECORD).read_text())
    if record.get("generator") == "digits-ddpm":
        return _digits_complete(record["steps"])(out)
    return _text2img_complete(out)


def finetune_text2img(model, dataset, out, *, steps=None, lr=1e-5, batch_size=16, seed=0, mode="full", lora_rank=4,
                      grad_accum=1, grad_checkpointing=False, mixed_precision="auto", ema=False, ema_decay=0.9999,
                      warmup=0, prompt="a photo of a {}.", resolution=None, save_every=500, workers=4,
                      device="cpu", progress=True, command=None, callback=None, revision=None):
    """Fine-tune a diffusers text-to-image pipeline on a real dataset; returns the output pipeline folder.

    Under `accelerate launch` or `torchrun` each process trains on its slice of every global batch (DDP).
    See `finetune` for the arguments.
    """
    from accelerate import Accelerator

    from .generate.pipelines import weights_revision

    out = pathlib.Path(out)
    _check_text2img_args(mode, steps, lr, batch_size, grad_accum, prompt, save_every, warmup)
    device = context.resolve_device(device)
    if torch.device(device).type == "cuda":
        # Accelerator puts a launched rank on cuda:LOCAL_RANK (as resolve_device did) but a single process on
        # the current device: make that the one asked for
        torch.cuda.set_device(device)
    precision = _resolve_precision(mixed_precision, device)
    data, spec = _load_data(dataset)
    pipe = load_base(model, revision=revision)
    size = _resolution(pipe, resolution)
    steps = steps or math.ceil(len(data) / (batch_size * grad_accum))  # one epoch, as the paper
    record = {"generator": "text2img", "model": str(model), "hub_revision": revision,
              "base_revision": weights_revision(pipe.unet), "dataset": spec, "num_images": len(data),
              "prompt": prompt, "resolution": size[0], "steps": steps, "lr": lr, "warmup": warmup,
              "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "mode": mode,
              "lora_rank": lora_rank if mode == "lora" else None, "ema": ema, "ema_decay": ema_decay if ema else None,
              "mixed_precision": precision, "grad_checkpointing": grad_checkpointing, "workers": workers,
              "save_every": save_every}
    acc = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision=precision)
    if batch_size < acc.num_processes:
        raise ValueError(f"batch size {batch_size} is the global batch of one micro-step; give every one of the "
                         f"{acc.num_processes} processes at least one image")
    state = prepare_out(out, record, _text2img_complete)
    acc.wait_for_everyone()  # every rank decides before rank 0 writes
    if state == "complete":
        logger.info("%s is already fine-tuned (%d steps); reusing it", out, steps)
        return out
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_record(out, record)
    acc.wait_for_everyone()
    run = _Run(record, pipe, acc)
    log, step, seconds = [], 0, 0.0
    last = (checkpoints(out) or [None])[-1]
    if last is not None:
        saved = run.load(last)
        log, step, seconds = saved["log"], saved["step"], saved["seconds"]
        logger.info("resuming the fine-tuning in %s at step %d of %d", out, step, steps)
    classes = list(data.classes)
    prompts = {c: prompt.format(prompt_name(c)) for c in classes}
    cond = _encode_prompts(pipe, [prompts[c] for c in classes], acc.device, run.weight_dtype)
    seconds = _train_loop(run, data, size, cond, out, step, steps, log, seconds, workers, progress, callback)
    if acc.is_main_process:
        _save_text2img(run, model, revision, out, record, data, prompts, log, seconds, command)
    acc.wait_for_everyone()
    return out


def _check_text2img_args(mode, steps, lr, batch_size, grad_accum, prompt, save_every, warmup):
    checks = [(mode in MODES, f"mode must be one of {', '.join(MODES)}"),
              (steps is None or steps >= 1, "steps must be >= 1"), (lr > 0, "lr must be > 0"),
              (batch_size >= 1, "batch size must be >= 1"), (grad_accum >= 1, "grad accumulation must be >= 1"),
              (save_every >= 1, "save_every must be >= 1"), (warmup >= 0, "warm-up must be >= 0"),
              (prompt.count("{}") == 1, f"the prompt template needs exactly one {{}} for the class name, got "
                                        f"{prompt!r}")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"bad fine-tuning settings: {msg}")


def _resolution(pipe, resolution):
    """(H, W) to train at: the model's native size unless given; it must map to whole latents the UNet takes."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = int(resolution or native)
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if size % multiple:
        raise ValueError(f"resolution {size} must be a multiple of {multiple} for this model (native {native})")
    return size, size


def _train_loop(run, data, size, cond, out, step, steps, log, seconds, workers, progress, callback):
    """Optimizer steps `step`..`steps`: grad_accum micro-batches each, a checkpoint every save_every."""
    from tqdm.auto import tqdm

    from .train import derived_seed

    cfg, acc = run.cfg, run.acc
    sched = run.noise_scheduler
    accum = cfg["grad_accum"]
    plan = _Plan(len(data), cfg["batch_size"], cfg["seed"], step * accum, steps * accum, acc.process_index,
                 acc.num_processes)
    batches = iter(_loader(data, size, plan, workers))
    bar = tqdm(range(step, steps), initial=step, total=steps, desc="fine-tune text2img",
               disable=not (progress and acc.is_main_process))
    t0, running = time.time() - seconds, None
    for step in bar:
        for group in run.opt.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
        total = torch.zeros((), device=acc.device)
        for m in range(accum):
            images, labels = next(batches)
            # every draw of micro-batch k comes from a generator seeded by (seed, k, rank): a resumed run
            # re-derives them from the step it resumes at, so no RNG state has to be saved
            k = step * accum + m
            gen = torch.Generator().manual_seed(derived_seed(cfg["seed"], k, acc.process_index, "noise"))
            # gradients are all-reduced once per optimizer step, at its last micro-batch
            sync = contextlib.nullcontext() if m == accum - 1 else acc.no_sync(run.unet)
            with sync:
                loss = _loss(run, sched, images, cond[labels.to(acc.device)], gen)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step}; lower --lr")
                acc.backward(loss / accum)
            total += loss.detach() / accum
        acc.clip_grad_norm_(list(_trainable(run.raw_unet).values()), TEXT2IMG["max_grad_norm"])
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        run.update_ema(step)
        value = acc.reduce(total, "mean").item()
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if done % cfg["save_every"] == 0 or done == steps:
            log.append({"step": done, "loss": running, "seconds": time.time() - t0})
            if acc.is_main_process:
                run.save(out, done, log, time.time() - t0)
            acc.wait_for_everyone()
        if callback is not None:
            callback(done, value)
    return time.time() - t0


def _merged_unet(unet, trained, cfg):
    """A fresh float32 base UNet given the trained weights: assigned (full), or LoRA merged in; and the
    adapter's own weights (LoRA) or None."""
    from peft.utils import get_peft_model_state_dict

    if cfg["mode"] == "full":
        assign(unet, trained)
        return unet, None
    _add_lora(unet, cfg["lora_rank"], cfg["seed"])
    assign(unet, trained)
    adapter = get_peft_model_state_dict(unet)
    unet.fuse_lora()
    unet.unload_lora()  # plain layers again, holding base + LoRA: a standard UNet folder
    return unet, adapter


def _save_text2img(run, model, revision, out, record, data, prompts, log, seconds, command):
    """The output pipeline folder (the base's components with the trained UNet), card.json and README.md."""
    from diffusers.utils import convert_state_dict_to_diffusers

    # the base again, float32 on CPU: the frozen parts are saved as stored, not in the training dtype
    pipe = load_base(model, revision=revision)
    pipe.unet, adapter = _merged_unet(pipe.unet, run.trained_state(), run.cfg)
    pipe.save_pretrained(out)
    if adapter is not None:
        type(pipe).save_lora_weights(out / "lora", unet_lora_layers=convert_state_dict_to_diffusers(adapter))
    card = {"generator": "text2img", "finetuned": True,
            "base": {"model": str(model), "hub_revision": revision, "revision": record["base_revision"],
                     "pipeline": type(pipe).__name__},
            "data": {"dataset": record["dataset"], "num_images": len(data), "counts": data.counts(),
                     "prompts": prompts},
            "training": {**record, "steps_done": record["steps"], "world_size": run.acc.num_processes,
                         "device": run.acc.device.type, "seconds": seconds, "log": log},
            "revision": _saved_revision(out / "unet"), "lora": "lora/" if adapter is not None else None,
            "command": command, "versions": _versions()}
    atomic_write_text(out / "README.md", _text2img_readme(out, card))
    atomic_write_text(out / CARD, json.dumps(card, indent=2))  # last: its presence marks the folder complete
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def _saved_revision(folder):
    """What `genrobust generate` will record as this UNet's revision (pipelines.weights_revision)."""
    from types import SimpleNamespace

    from .generate.pipelines import weights_revision

    return weights_revision(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(folder))))


def _text2img_readme(out, card):
    tr, data = card["training"], card["data"]
    lora = (f"LoRA rank {tr['lora_rank']} on {', '.join(LORA_TARGETS)}, merged into `unet/`; the adapter alone is "
            "in `lora/` (`pipe.load_lora_weights(\"lora\")` on the base)" if tr["mode"] == "lora"
            else "full UNet")
    example = next(iter(data["prompts"].values()))
    return f"""# {card['base']['model']} fine-tuned on {data['dataset']}

Base: `{card['base']['model']}` (revision {card['base']['revision']}); trained: {lora}, VAE and text encoder
frozen. Data: `{data['dataset']}`, {data['num_images']} images in {len(data['prompts'])} classes, prompt
template `{tr['prompt']}` (e.g. "{example}"), {tr['resolution']} px.
{tr['steps']} steps x batch {tr['batch_size']} x {tr['grad_accum']} accumulation, lr {tr['lr']}, AdamW,
mixed precision {tr['mixed_precision']}, EMA {tr['ema_decay'] if tr['ema'] else 'off'}, seed {tr['seed']},
{tr['world_size']} process(es) on {tr['device']}, {tr['seconds']:.0f} s.

Made by: `{card['command'] or 'genrobust.finetune.finetune(...)'}`

Use it: `genrobust generate --generator text2img --model {out} --strategy label --classes ... --out DIR`.
`card.json` holds every setting, the class prompts and the loss log.
"""
