"""Paper-scale generators built on diffusers pipelines: text-to-image, image variation, img2img, class-conditional.

Each registers into `GENERATORS`. A generator loads its pipeline once (from a hub id or a local folder), and
`generate(requests, sources)` makes one image per request from that request's seed alone: every request
gets its own `torch.Generator`, passed to the pipeline as a list, so an image regenerated alone matches the
one made in a batch (bitwise on CPU; see tests/test_pipelines.py).
"""
import hashlib
import inspect
import logging
import os
import pathlib
import re

import torch

from .. import context
from .generators import GENERATORS
from .strategies import Prompts

logger = logging.getLogger(__name__)

# name -> (diffusers class, extra config). Each is built from the pipeline's own scheduler config, so the
# beta schedule and prediction type the model was trained with carry over.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion ships it
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
# Schedulers that draw fresh noise at every step. DiTPipeline does not pass its generator to the scheduler,
# so with these an image would depend on the global RNG, not on its seed.
STOCHASTIC_SCHEDULERS = ("ddpm", "euler-a")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A hub id is "name" or "owner/name"; anything else (or anything that exists on disk) is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_SNAPSHOT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")
HOW_TO_GET_WEIGHTS = ("on a machine with network access run `hf download {id} --local-dir DIR` "
                      "(`huggingface-cli download` in older huggingface_hub), copy DIR here and pass it as the model")


def imagenet_prompts():
    """The paper's prompts: "a photo of a {}." and the 80 CLIP ImageNet templates (shipped reference data)."""
    from ..evaluate import reference

    return Prompts(label="a photo of a {}.", templates=tuple(reference("clip_imagenet_templates.json")["templates"]))


def resolve_dtype(dtype, device):
    """"auto" is float16 on CUDA and float32 elsewhere (half precision is slow or unsupported on CPU)."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_scheduler(name):
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from: {', '.join(SCHEDULERS)}")


def make_scheduler(name, config):
    """The scheduler called `name`, configured from `config` (usually the pipeline's current scheduler's)."""
    import diffusers

    check_scheduler(name)
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


def _offline():
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def resolve_model(model, marker):
    """(what to pass to from_pretrained, local_files_only) for a hub id or a local folder.

    A local path must be a folder holding `marker` (model_index.json for diffusers, config.json for
    transformers); a missing one fails here, before any hub lookup.
    """
    text = str(model)
    path = pathlib.Path(text).expanduser()
    if path.exists() or not _HUB_ID.fullmatch(text):
        if not path.is_dir():
            raise FileNotFoundError(f"no model folder at {text}; pass a folder saved with save_pretrained, or a "
                                    "hub id whose weights are in the local cache")
        if not (path / marker).is_file():
            raise FileNotFoundError(f"{text} is not a saved model folder (it has no {marker})")
        return str(path), True
    return text, _offline()


def from_pretrained(loader, model, marker, method="from_pretrained", **kwargs):
    """`loader.from_pretrained(model, ...)`, offline when HF_HUB_OFFLINE=1 or `model` is a local folder.

    A hub model that is not in the local cache fails with one message saying how to provide the weights.
    """
    name, local_only = resolve_model(model, marker)
    try:
        return getattr(loader, method)(name, local_files_only=local_only, **kwargs)
    except OSError as e:
        if local_only and not pathlib.Path(name).is_dir():
            raise ValueError(f"model {name!r} is not available offline: it is neither a folder here nor in the "
                             f"local Hugging Face cache (HF_HUB_OFFLINE=1); {HOW_TO_GET_WEIGHTS.format(id=name)}"
                             ) from e
        raise


def weights_revision(component):
    """The hub snapshot commit the component was read from, else the first 16 hex of its weights' sha256."""
    folder = pathlib.Path(str(component.config._name_or_path))
    match = _SNAPSHOT.search(str(folder.resolve()) + os.sep) or _SNAPSHOT.search(str(folder) + os.sep)
    if match:
        return match.group(1)
    for pattern in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*.safetensors",
                    "diffusion_pytorch_model.bin", "diffusion_pytorch_model-*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            h = hashlib.sha256()
            for file in files:  # one file: exactly the file's sha256; shards: over their bytes in order
                with open(file, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            return h.hexdigest()[:16]
    raise FileNotFoundError(f"no weights file in {folder} to identify the model by")


def to_uint8(images):
    """Pipeline output (float in [0, 1], N x C x H x W tensor or N x H x W x C array) -> uint8 C x H x W tensors."""
    if not torch.is_tensor(images):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    # round as diffusers' numpy_to_pil does, so these match the PIL images the pipeline would return
    return [img.float().mul(255).round().clamp(0, 255).to(torch.uint8).cpu() for img in images]


class DiffusersGenerator:
    """What every diffusers-backed generator shares: loading, scheduler, dtype, device, manifest fields."""

    name = None
    strategies = ()
    loader = "DiffusionPipeline"  # a diffusers class with from_pretrained
    default_guidance = 7.5
    default_batch_size = 8

    def __init__(self, model, steps=50, guidance=None, scheduler=None, height=None, width=None,
                 negative_prompt=None, dtype="auto", device="cpu", batch_size=None, compile=False,
                 revision=None):
        import diffusers

        check_scheduler(scheduler)  # before minutes of loading
        device = context.resolve_device(device)  # under torchrun, "cuda" is this rank's GPU
        self.model, self.steps, self.scheduler_name = str(model), int(steps), scheduler
        self.guidance = self.default_guidance if guidance is None else float(guidance)
        self.negative_prompt, self.device, self.hub_revision = negative_prompt, device, revision
        self.batch_size = batch_size or self.default_batch_size
        self.dtype = resolve_dtype(dtype, device)
        self.prompts = imagenet_prompts()
        self.pipe = from_pretrained(getattr(diffusers, self.loader), model, "model_index.json",
                                    dtype=self.dtype, revision=revision)
        if scheduler is not None:
            self.pipe.scheduler = make_scheduler(scheduler, self.pipe.scheduler.config)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.denoiser_name = "unet" if getattr(self.pipe, "unet", None) is not None else "transformer"
        self.revision = weights_revision(getattr(self.pipe, self.denoiser_name))
        native = self.native_size()
        self.height, self.width = int(height or native[0]), int(width or native[1])
        if compile:
            if torch.device(device).type == "cuda":
                # the denoiser runs steps x batches times; compiling it is where the time goes
                setattr(self.pipe, self.denoiser_name, torch.compile(getattr(self.pipe, self.denoiser_name)))
            else:
                logger.warning("compile=True is only used on CUDA; running %s uncompiled on %s", self.name, device)

    def native_size(self):
        """(height, width) the model was trained at: latent sample size x the VAE's downscaling."""
        sample = getattr(self.pipe, "default_sample_size", None)
        if sample is None:
            sample = getattr(self.pipe, self.denoiser_name).config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else sample
        scale = getattr(self.pipe, "vae_scale_factor", None)  # DiTPipeline has none: read it off its VAE
        if scale is None:
            scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return h * scale, w * scale

    def classes(self):
        return None  # a text or image prompt takes any class name

    @property
    def strength(self):
        return None

    def info(self):
        """Per-image manifest fields that describe how this generator ran."""
        return {"generator": self.name, "revision": self.revision, "scheduler": type(self.pipe.scheduler).__name__,
                "steps": self.steps, "guidance_scale": self.guidance, "strength": self.strength,
                "height": self.height, "width": self.width, "dtype": str(self.dtype).removeprefix("torch."),
                "negative_prompt": self.negative_prompt}

    def config(self):
        """The settings a resumed run must share (the model as given: a hub id or a local path)."""
        return {"name": self.name, "model": self.model, "revision": self.hub_revision, "steps": self.steps,
                "guidance": self.guidance, "strength": self.strength, "scheduler": self.scheduler_name,
                "height": self.height, "width": self.width, "negative_prompt": self.negative_prompt,
                "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size}

    def generators(self, requests):
        # One generator per request: image i depends on requests[i].seed only, whatever the batch.
        return [torch.Generator(self.device).manual_seed(r.seed) for r in requests]

    def sources_for(self, requests, sources):
        if sources is None or len(sources) != len(requests):
            got = "none" if sources is None else len(sources)
            raise ValueError(f"generator {self.name!r} needs one source image per request "
                             f"({len(requests)} requests, {got} sources)")
        return [img.convert("RGB") for img in sources]

    def finish(self, out):
        """(uint8 images, flags): flags[i] is "nsfw" where the pipeline's safety checker flagged image i."""
        images = to_uint8(out.images)
        nsfw = getattr(out, "nsfw_content_detected", None)
        flags = [("nsfw" if nsfw is not None and nsfw[i] else None) for i in range(len(images))]
        return images, flags

    def negative(self, n):
        return None if self.negative_prompt is None else [self.negative_prompt] * n

    @torch.inference_mode()
    def generate(self, requests, sources=None):
        raise NotImplementedError


def _prompts_of(name, requests):
    missing = [r.key for r in requests if not r.prompt]
    if missing:
        raise ValueError(f"generator {name!r} needs a prompt in every request; requests {missing[:3]} have none")
    return [r.prompt for r in requests]


class Text2Image(DiffusersGenerator):
    """Stable Diffusion and compatible text-to-image pipelines (AutoPipelineForText2Image picks the class)."""

    name = "text2img"
    strategies = ("label", "templates", "captions")
    loader = "AutoPipelineForText2Image"

    @torch.inference_mode()
    def generate(self, requests, sources=None):
        out = self.pipe(prompt=_prompts_of(self.name, requests), negative_prompt=self.negative(len(requests)),
                        height=self.height, width=self.width, num_inference_steps=self.steps,
                        guidance_scale=self.guidance, generator=self.generators(requests), output_type="pt")
        return self.finish(out)


class ImageVariation(DiffusersGenerator):
    """Stable Diffusion image variations: conditions on the CLIP image embedding of a real image only."""

    name = "image-variation"
    strategies = ("image",)
    loader = "StableDiffusionImageVariationPipeline"
    default_guidance = 3.0  # the lambdalabs model card's setting

    def __init__(self, model, negative_prompt=None, **kwargs):
        if negative_prompt is not None:
            raise ValueError("image-variation conditions on an image only; it takes no negative_prompt")
        super().__init__(model, **kwargs)

    @torch.inference_mode()
    def generate(self, requests, sources=None):
        out = self.pipe(image=self.sources_for(requests, sources), height=self.height, width=self.width,
                        num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=self.generators(requests), output_type="pt")
        return self.finish(out)


class Image2Image(DiffusersGenerator):
    """SDEdit with Stable Diffusion: a real image, noised to `strength`, denoised towards its class prompt."""

    name = "img2img"
    strategies = ("image-label",)
    loader = "AutoPipelineForImage2Image"

    def __init__(self, model, strength=0.8, **kwargs):
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"img2img strength must be in (0, 1], got {strength}")
        self._strength = float(strength)
        super().__init__(model, **kwargs)
        if int(self.steps * self._strength) < 1:
            raise ValueError(f"img2img runs int(steps * strength) denoising steps; {self.steps} x {self._strength} "
                             "is none: raise steps or strength")

    @property
    def strength(self):
        return self._strength

    @torch.inference_mode()
    def generate(self, requests, sources=None):
        from PIL import Image, ImageOps

        # Fit each source to the output size here (scale, then centre-crop: no stretching): the pipeline
        # would otherwise size the whole batch by its first image, and an image would depend on its batch-mates.
        images = [ImageOps.fit(img, (self.width, self.height), Image.Resampling.BICUBIC)
                  for img in self.sources_for(requests, sources)]
        out = self.pipe(prompt=_prompts_of(self.name, requests), image=images, strength=self.strength,
                        negative_prompt=self.negative(len(requests)), num_inference_steps=self.steps,
                        guidance_scale=self.guidance, generator=self.generators(requests), output_type="pt")
        return self.finish(out)


class ClassConditional(DiffusersGenerator):
    """Class-conditional pipelines (DiT): a class name maps to the model's label id.

    Names resolve through the pipeline's `id2label` (every comma-separated synonym), and, for a
    1,000-class model, through ImageNet wnids and CLIP class names (shipped reference data). A name that
    maps to several ids (ImageNet has two "crane"s) or to none is an error.
    """

    name = "class-conditional"
    strategies = ("class",)
    default_guidance = 4.0  # DiTPipeline's default
    default_batch_size = 32

    def __init__(self, model, negative_prompt=None, height=None, width=None, **kwargs):
        if negative_prompt is not None:
            raise ValueError("class-conditional generation takes no negative_prompt")
        if kwargs.get("scheduler") in STOCHASTIC_SCHEDULERS:
            raise ValueError(f"scheduler {kwargs['scheduler']!r} draws noise from the global RNG in "
                             "class-conditional pipelines, so images would not follow their seeds; choose from: "
                             f"{', '.join(s for s in SCHEDULERS if s not in STOCHASTIC_SCHEDULERS)}")
        super().__init__(model, **kwargs)
        if "class_labels" not in inspect.signature(self.pipe.__call__).parameters:
            raise ValueError(f"{model} holds a {type(self.pipe).__name__}, not a class-conditional pipeline "
                             "(one whose call takes class_labels, e.g. DiTPipeline)")
        if (height or self.height, width or self.width) != (self.height, self.width):
            raise ValueError(f"{model} makes {self.height}x{self.width} images only; drop height/width")
        self.num_classes = self.pipe.transformer.config.num_embeds_ada_norm
        self._ids, self._classes = self._label_index()

    def _label_index(self):
        """({name: set of ids}, [one unambiguous name per id]) from id2label and, for ImageNet-1k, wnids."""
        # DiTPipeline keeps id2label only as its collapsed `labels` dict (a name shared by two ids maps to
        # one of them); read model_index.json again to see every id a name stands for.
        config = from_pretrained(type(self.pipe), self.model, "model_index.json", revision=self.hub_revision,
                                 method="load_config")
        id2label = config.get("id2label") or {}
        candidates = [[] for _ in range(self.num_classes)]  # names per id, most readable first
        reference_classes = []
        if self.num_classes == 1000:  # an ImageNet-1k model: its label ids are ImageNet indices
            from ..evaluate import reference

            reference_classes = reference("imagenet_classes.json")["classes"]
            for c in reference_classes:
                candidates[c["index"]].append(c["clip_name"])
        for key, value in id2label.items():
            candidates[int(key)].extend(label.strip() for label in value.split(","))
        for c in reference_classes:
            candidates[c["index"]].append(c["wnid"])
        ids = {}
        for i, names in enumerate(candidates):
            for name in names:
                ids.setdefault(name, set()).add(i)
        if not ids:
            raise ValueError(f"{self.model} has no id2label in model_index.json and is not a 1,000-class "
                             "ImageNet model, so class names cannot be mapped to its label ids")
        classes = []
        for i, names in enumerate(candidates):
            unique = [name for name in names if ids[name] == {i}]
            if not unique:
                raise ValueError(f"class id {i} of {self.model} has no name of its own in id2label")
            classes.append(unique[0])
        return ids, classes

    def classes(self):
        return list(self._classes)

    def label_id(self, class_name):
        ids = self._ids.get(class_name)
        if not ids:
            raise ValueError(f"class {class_name!r} is not a class of {self.model}; its classes are "
                             f"{', '.join(self._classes[:5])}, ... (classes() lists all {self.num_classes})")
        if len(ids) > 1:
            raise ValueError(f"class name {class_name!r} is ambiguous in {self.model}: it names ids {sorted(ids)}; "
                             f"use {' or '.join(repr(self._classes[i]) for i in sorted(ids))}")
        return next(iter(ids))

    @torch.inference_mode()
    def generate(self, requests, sources=None):
        ids = [self.label_id(r.class_name) for r in requests]
        out = self.pipe(class_labels=ids, guidance_scale=self.guidance, num_inference_steps=self.steps,
                        generator=self.generators(requests), output_type="pt")
        return self.finish(out)


for _cls, _description in (
        (Text2Image, "Stable Diffusion (or compatible) text-to-image from a prompt per request"),
        (ImageVariation, "Stable Diffusion image variations of a real source image"),
        (Image2Image, "Stable Diffusion img2img: a real source image and its class prompt at `strength`"),
        (ClassConditional, "class-conditional diffusion (DiT) from a class name")):
    GENERATORS.register(_cls.name, description=_description)(_cls)
