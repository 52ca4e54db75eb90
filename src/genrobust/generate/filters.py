"""Filters for generated images: blank (black or flat) images, and CLIP-score selection per class.

Filters only score and choose; the runner records why an image was kept out (`flagged`, `scores`).
"""
import math

import numpy as np
import torch

from .. import context
from .pipelines import from_pretrained, resolve_dtype

# Standard deviation over all pixels and channels, in uint8 levels. A safety checker's black replacement
# has 0, a flat colour with rounding noise stays below 1, a real photograph has tens. A range rule
# (max - min) would call a flat image with one stray pixel not blank; the spread of all pixels does not.
BLANK_STD = 2.0


def is_blank(image, threshold=BLANK_STD):
    """Whether a uint8 image (C x H x W or H x W, tensor or array) is black or near-uniform: std < threshold."""
    pixels = image.double() if torch.is_tensor(image) else torch.from_numpy(np.asarray(image, dtype=np.float64))
    return bool(pixels.std(correction=0) < threshold)


class ClipScorer:
    """CLIP score of (image, text) pairs: 100 x the cosine of their CLIP embeddings (not clamped at 0).

    Args:
        model: a hub id (e.g. "openai/clip-vit-large-patch14") or a local folder holding CLIPModel and
            CLIPProcessor saved with save_pretrained.
    """

    def __init__(self, model, device="cpu", dtype="auto", batch_size=64):
        from transformers import CLIPModel, CLIPProcessor

        device = context.resolve_device(device)
        self.model_name, self.device, self.batch_size = str(model), device, batch_size
        self.dtype = resolve_dtype(dtype, device)
        self.processor = from_pretrained(CLIPProcessor, model, "config.json")
        self.model = from_pretrained(CLIPModel, model, "config.json", dtype=self.dtype).to(device).eval()

    @torch.inference_mode()
    def score(self, images, texts):
        """One score per pair images[i], texts[i]; images are PIL images or uint8 C x H x W tensors."""
        from PIL import Image

        if len(images) != len(texts):
            raise ValueError(f"score takes one text per image; got {len(images)} images and {len(texts)} texts")
        scores = []
        for start in range(0, len(images), self.batch_size):
            batch = [img if isinstance(img, Image.Image) else Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
                     for img in images[start:start + self.batch_size]]
            inputs = self.processor(text=list(texts[start:start + self.batch_size]), images=batch,
                                    return_tensors="pt", padding=True, truncation=True).to(self.device)
            img = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.dtype)))
            txt = _features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                         attention_mask=inputs["attention_mask"]))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            scores += (100 * cos).tolist()
        return scores


def _features(out):
    # transformers 5 returns the projected embedding as `pooler_output` of a model output; 4.x a tensor
    return out if torch.is_tensor(out) else out.pooler_output


def select(scores_by_class, threshold=None, top_k=None):
    """Indices to keep per class: scores >= threshold, then the top_k highest (ties: lower index first).

    Args:
        scores_by_class: {class: [score of image 0, score of image 1, ...]}.
        threshold: keep only scores at or above it (None: no threshold).
        top_k: keep at most this many per class, the highest scores (None: no limit; 0 is an error, as
            `--clip-top-k 0` is: keeping no image is never what a run wants).
    Returns {class: sorted list of kept indices}. NaN scores are never kept when a filter is given; with
    neither filter every index is kept.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (None keeps every image), got {top_k!r}")
    kept = {}
    for name, scores in scores_by_class.items():
        idx = list(range(len(scores)))
        if threshold is not None or top_k is not None:
            idx = [i for i in idx if not math.isnan(scores[i])]
        if threshold is not None:
            idx = [i for i in idx if scores[i] >= threshold]
        if top_k is not None:
            idx = sorted(idx, key=lambda i: (-scores[i], i))[:top_k]
        kept[name] = sorted(idx)
    return kept
