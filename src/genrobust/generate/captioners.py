"""Image captioners for the `captions` strategy (registry `captioners`), and the rule that puts the class in.

A captioner describes a real image of a class; `class_prompt` makes sure the prompt built from that caption
still names the class, so a text-to-image model is asked for the right class whatever the caption says.
"""
import logging
import re

import torch

from .. import context
from ..registry import Registry
from .pipelines import from_pretrained, resolve_dtype

logger = logging.getLogger(__name__)
CAPTIONERS = Registry("captioner")


class Blip:
    """BLIP image captioning (transformers BlipForConditionalGeneration), greedy, so captions are deterministic.

    Args:
        model: a hub id (e.g. "Salesforce/blip-image-captioning-large") or a local folder saved with
            save_pretrained holding the model and its BlipProcessor.
        max_new_tokens: the longest caption, in tokens.
    """

    name = "blip"

    def __init__(self, model, device="cpu", dtype="auto", batch_size=32, max_new_tokens=30):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device = context.resolve_device(device)
        self.model_name, self.device, self.batch_size = str(model), device, batch_size
        self.max_new_tokens = max_new_tokens
        self.dtype = resolve_dtype(dtype, device)
        self.processor = from_pretrained(BlipProcessor, model, "config.json")
        self.model = from_pretrained(BlipForConditionalGeneration, model, "config.json", dtype=self.dtype)
        self.model.to(device).eval()

    def config(self):
        return {"name": self.name, "model": self.model_name, "max_new_tokens": self.max_new_tokens,
                "dtype": str(self.dtype).removeprefix("torch.")}

    @torch.inference_mode()
    def caption(self, images):
        """One caption per image (PIL images), lower-case and stripped, in batches of `batch_size`."""
        captions = []
        for start in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[start:start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            ids = self.model.generate(pixel_values=inputs["pixel_values"].to(self.dtype), do_sample=False,
                                      num_beams=1, max_new_tokens=self.max_new_tokens)
            captions += [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return captions


@CAPTIONERS.register("blip", description="BLIP image captioning (transformers), greedy decoding")
def _blip(**kwargs):
    return Blip(**kwargs)


def create_captioner(name, **kwargs):
    return CAPTIONERS.create(name, **kwargs)


def list_captioners(pattern="*"):
    return CAPTIONERS.list(pattern)


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def names_class(caption, class_name):
    """Whether the caption names the class: the class name's words appear in it, whole and in order.

    Case and punctuation are ignored ("Hen-of-the-woods" is named by "a hen of the woods on a log"); a
    plural or a synonym is not a match ("goldfishes" does not name "goldfish").
    """
    words, target = _words(caption), _words(class_name)
    if not target:
        raise ValueError(f"class name {class_name!r} has no words")
    return any(words[i:i + len(target)] == target for i in range(len(words) - len(target) + 1))


def class_prompt(caption, class_name):
    """A prompt from a caption that is sure to name the class.

    A caption that names the class (see `names_class`) is the prompt as it is (stripped); otherwise the
    class is appended: "a dog on a beach." + "tabby cat" -> "a dog on a beach, a photo of a tabby cat".
    An empty caption gives "a photo of a {class_name}".
    """
    caption = caption.strip()
    if caption and names_class(caption, class_name):
        return caption
    body = caption.rstrip(" .,;:")
    return f"{body}, a photo of a {class_name}" if body else f"a photo of a {class_name}"
