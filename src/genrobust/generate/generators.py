"""Generators: each turns a batch of requests into uint8 images. Registry `generators`."""
import hashlib
import pathlib
import re

import torch

from .. import context
from ..registry import Registry
from .strategies import Prompts

GENERATORS = Registry("generator")
SHIPPED = pathlib.Path(__file__).resolve().parent.parent / "assets" / "digits-ddpm"

DIGITS_PROMPTS = Prompts(
    label="a handwritten digit {}.",
    templates=("a handwritten digit {}.", "a printed digit {}."),
)


def file_sha256(path, length=16):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class DigitsDDPM:
    """The embedded class- and style-conditional generator; reads the style from the prompt's words."""

    name = "digits-ddpm"
    prompts = DIGITS_PROMPTS
    strategies = ("label", "templates", "class", "image", "image-label")

    def __init__(self, path=None, steps=20, guidance=2.0, eta=1.0, device="cpu", batch_size=64, strength=0.8):
        from . import digits_ddpm

        self.path = pathlib.Path(path) if path else SHIPPED
        device = context.resolve_device(device)  # under torchrun, "cuda" is this rank's GPU
        self.unet, self.scheduler, self.card = digits_ddpm.load(self.path, device=device)
        self.styles = digits_ddpm.STYLES
        self.steps, self.guidance, self.eta, self.device, self.batch_size = steps, guidance, eta, device, batch_size
        if not 0 < strength <= 1:
            raise ValueError(f"--strength must be in (0, 1], got {strength}")
        self.strength = strength
        self.revision = file_sha256(self.path / "unet" / "diffusion_pytorch_model.safetensors")

    def classes(self):
        return list(self.card["classes"])

    def style_of(self, prompt):
        words = set(re.findall(r"[a-z]+", (prompt or "").lower()))
        found = [s for s in self.styles if s in words]
        if len(found) > 1:
            raise ValueError(f"prompt {prompt!r} names several styles {found}; digits-ddpm takes one")
        return found[0] if found else None

    def info(self):
        """Per-image manifest fields that describe how this generator ran."""
        return {"generator": self.name, "revision": self.revision, "scheduler": "DDIMScheduler",
                "steps": self.steps, "guidance_scale": self.guidance, "eta": self.eta, "height": 28, "width": 28,
                "dtype": "float32", "strength": self.strength}

    def config(self):
        # The shipped checkpoint is named, not located: its absolute path differs per clone, and a resume
        # from another clone must match (the revision hash pins the weights either way).
        path = "shipped" if self.path == SHIPPED else str(self.path)
        return {"name": self.name, "path": path, "steps": self.steps, "guidance": self.guidance,
                "eta": self.eta, "batch_size": self.batch_size, "strength": self.strength}

    def generate(self, requests, sources=None):
        """Images (uint8 `N x 1 x 28 x 28`) and flags (None: this model has no safety checker).

        With `sources` (PIL images, one per request) sampling starts from them (SDEdit at `strength`); a
        request without a prompt is conditioned on its class only (`class`) or, from a source, on nothing
        (`image`).
        """
        from . import digits_ddpm

        classes = self.classes()
        ids, styles = [], []
        for r in requests:
            if r.class_name not in classes:
                raise ValueError(f"digits-ddpm knows classes {classes}, not {r.class_name!r}")
            unconditioned = sources is not None and r.prompt is None
            ids.append(None if unconditioned else classes.index(r.class_name))
            styles.append(self.style_of(r.prompt))
        gens = [torch.Generator().manual_seed(r.seed) for r in requests]
        init = None
        if sources is not None:
            init = torch.stack([_gray28(im) for im in sources])
        images = digits_ddpm.sample(self.unet, self.scheduler, ids, styles, gens, steps=self.steps,
                                    guidance=self.guidance, eta=self.eta, device=self.device, init=init,
                                    strength=self.strength if init is not None else 1.0)
        return images, [None] * len(requests)


def _gray28(image):
    """A PIL source image as the generator's uint8 1 x 28 x 28 input."""
    import numpy as np
    im = image.convert("L")
    if im.size != (28, 28):
        raise ValueError(f"digits-ddpm starts from 28x28 digits, got a {im.size[0]}x{im.size[1]} source image")
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())[None]


GENERATORS.register("digits-ddpm", description="embedded class- and style-conditional DDPM (28x28 digits)")(
    DigitsDDPM)


def create_generator(name, **kwargs):
    return GENERATORS.create(name, **kwargs)


def list_generators(pattern="*"):
    return GENERATORS.list(pattern)
