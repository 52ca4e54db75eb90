"""Generators: each turns a batch of requests into uint8 images. Registry `generators`."""
import hashlib
import pathlib
import re

import torch

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
    strategies = ("label", "templates")

    def __init__(self, path=None, steps=20, guidance=2.0, eta=1.0, device="cpu", batch_size=64):
        from . import digits_ddpm

        self.path = pathlib.Path(path) if path else SHIPPED
        self.unet, self.scheduler, self.card = digits_ddpm.load(self.path, device=device)
        self.styles = digits_ddpm.STYLES
        self.steps, self.guidance, self.eta, self.device, self.batch_size = steps, guidance, eta, device, batch_size
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
                "dtype": "float32"}

    def config(self):
        # The shipped checkpoint is named, not located: its absolute path differs per clone, and a resume
        # from another clone must match (the revision hash pins the weights either way).
        path = "shipped" if self.path == SHIPPED else str(self.path)
        return {"name": self.name, "path": path, "steps": self.steps, "guidance": self.guidance,
                "eta": self.eta, "batch_size": self.batch_size}

    def generate(self, requests):
        from . import digits_ddpm

        classes = self.classes()
        ids = []
        for r in requests:
            if r.class_name not in classes:
                raise ValueError(f"digits-ddpm knows classes {classes}, not {r.class_name!r}")
            ids.append(classes.index(r.class_name))
        gens = [torch.Generator().manual_seed(r.seed) for r in requests]
        return digits_ddpm.sample(self.unet, self.scheduler, ids, [self.style_of(r.prompt) for r in requests],
                                  gens, steps=self.steps, guidance=self.guidance, eta=self.eta,
                                  device=self.device)


@GENERATORS.register("digits-ddpm", description="embedded class- and style-conditional DDPM (28x28 digits)")
def _digits_ddpm(**kwargs):
    return DigitsDDPM(**kwargs)


def create_generator(name, **kwargs):
    return GENERATORS.create(name, **kwargs)


def list_generators(pattern="*"):
    return GENERATORS.list(pattern)
