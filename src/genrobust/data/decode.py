"""Image files to uint8 tensors, as timm's ImageNet transforms make them: run in DataLoader workers.

- `train_image`: RandomResizedCrop of the full decoded image (timm's `RandomResizedCropAndInterpolation`: the
  same box for the same `random.Random` state), then a horizontal flip where the recipe allows it.
- `eval_image`: the shorter side resized to `floor(size / crop_pct)`, then the centre crop (timm's eval
  transform, torchvision's Resize and CenterCrop arithmetic).

Every image is decoded in the frame its EXIF orientation says (real ImageNet holds rotated JPEGs), and converted
to RGB (or L for one channel) as timm's and torchvision's loaders do, with `convert`: the colour of transparent
pixels of RGBA/LA/P images is kept as stored, not composited on a background, so a model sees what it would see
under those loaders. 16-bit and 32-bit greyscale (I;16, I) are scaled into 0..255 rather than clipped.

Differences from timm, on purpose (tests/test_transforms.py checks the rest pixel for pixel):
- JPEG draft: a crop box at least twice the output size is decoded at 1/2, 1/4 or 1/8 scale (the DCT's own
  downscale), never below the output resolution; the crop then resamples from that. Turn off with `draft=False`.
- The flip is drawn from the same seeded `random.Random` as the box (timm draws it from torch's global RNG).
- Eval: an image already at the model's input size is kept as it is (generated test sets are written at that
  size) rather than resized by 1/crop_pct and cropped back.
- Colour jitter (timm's train default 0.4) and normalisation are not here: normalisation runs on the device,
  and augmentations are the recipe's `augmentation`.
"""
import math

import numpy as np
import torch

# PIL resampling filters by timm's names for them
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random")
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


def resample(name):
    from PIL import Image

    filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
    if name not in filters:
        raise ValueError(f"unknown interpolation {name!r}; choose from {', '.join(INTERPOLATIONS)}")
    return filters[name]


def crop_params(width, height, scale, ratio, rng):
    """(top, left, h, w) of a random resized crop: timm's `RandomResizedCropAndInterpolation.get_params`, drawing
    from `rng` (a `random.Random`) in the same order, so one state gives timm's box."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # after 10 misses: the central crop at the nearest allowed aspect
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _orientation(im):
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the image
        return 1


def _upright(im, orientation):
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if orientation != 1 else im


def convert(im, mode):
    """`im` in `mode` ("RGB" or "L"). High-bit greyscale is scaled to 8 bits (PIL's convert would clip it)."""
    from PIL import Image

    if im.mode == mode:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a.astype(np.float64) / 257  # 65535 -> 255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return im if mode == "L" else im.convert(mode)
    return im.convert(mode)


def to_tensor(im):
    """A PIL image -> uint8 C x H x W."""
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return a[None] if a.ndim == 2 else a.permute(2, 0, 1)


def train_image(path, size, mode, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                flip=False, draft=True):
    """A random resized crop of the file's full image, resized to `size` (H, W), flipped with probability 1/2
    when `flip`; uint8 C x H x W. All randomness from `rng` (a `random.Random`)."""
    from PIL import Image

    out_h, out_w = size
    with Image.open(path) as im:
        orientation = _orientation(im)
        w0, h0 = im.size
        width, height = (h0, w0) if orientation in _TRANSPOSED else (w0, h0)
        top, left, h, w = crop_params(width, height, scale, ratio, rng)
        name = rng.choice(("bilinear", "bicubic")) if interpolation == "random" else interpolation
        flipped = flip and rng.random() < 0.5
        # Decode at 1/2^k only while the crop box keeps at least the output resolution
        reduce = min(w / out_w, h / out_h)
        s = 1
        if draft and im.format == "JPEG" and reduce >= 2:
            drafted = im.draft(None, (math.ceil(w0 / reduce), math.ceil(h0 / reduce)))
            if drafted is not None:
                s = w0 / drafted[1][2]
        im = _upright(im, orientation)
        box = (left, top, left + w, top + h)
        if s == 1:
            # crop, convert, resize: timm's order where it matters (convert is per pixel, so it commutes with
            # the crop, and converting the crop alone is cheaper)
            im = im.crop(box)
            im = _resize_converted(im, mode, (out_w, out_h), resample(name))
        else:
            im = convert(im, mode).resize((out_w, out_h), resample(name), box=tuple(v / s for v in box))
    if flipped:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(im)


def _resize_converted(im, mode, wh, filt):
    # A greyscale crop for an RGB model is resized in L and then replicated: the same pixels, a third of the work
    if im.mode == "L" and mode == "RGB":
        return im.resize(wh, filt).convert("RGB")
    return convert(im, mode).resize(wh, filt)


def eval_size(height, width, size, crop_pct):
    """(new H, new W) of timm's eval resize: the shorter side to floor(size / crop_pct), torchvision's rounding."""
    out_h, out_w = size
    if out_h == out_w:
        short_target = math.floor(out_h / crop_pct)
        if width <= height:
            return int(short_target * height / width), short_target
        return short_target, int(short_target * width / height)
    # timm's ResizeKeepRatio for non-square targets: one scale that covers both sides
    target = (math.floor(out_h / crop_pct), math.floor(out_w / crop_pct))
    r = max(target[0] / height, target[1] / width)
    return round(height * r), round(width * r)


def eval_image(path, size, mode, crop_pct=0.875, interpolation="bicubic", border=0):
    """The file's image, `border` pixels trimmed from each side, resized and centre-cropped to `size` (H, W) as
    timm's eval transform does; an image already at `size` is kept as it is. uint8 C x H x W."""
    from PIL import Image

    out_h, out_w = size
    with Image.open(path) as im:
        im = convert(_upright(im, _orientation(im)), mode)
        im.load()  # before the file closes (an image already upright and in `mode` is still lazy)
    if border:
        im = im.crop((border, border, im.width - border, im.height - border))
    if (im.height, im.width) != (out_h, out_w):
        new_h, new_w = eval_size(im.height, im.width, size, crop_pct)
        if (new_h, new_w) != (im.height, im.width):
            im = im.resize((new_w, new_h), resample(interpolation))
        top, left = int(round((im.height - out_h) / 2.0)), int(round((im.width - out_w) / 2.0))
        im = im.crop((left, top, left + out_w, top + out_h))
    return to_tensor(im)


# --- datasets of files read in DataLoader workers (training, evaluation, statistics, fine-tuning) ----------

def path_array(files):
    """Paths as one numpy bytes array: a forked worker reads it without touching a Python object per path, so
    it shares the parent's pages rather than copying them (a list of 1.28 M str is refcounted page by page)."""
    import os

    return np.array([os.fsencode(f) for f in files], dtype=bytes)


def whole_batch(batch):
    """A DataLoader collate_fn for datasets whose `__getitems__` returns the batch already stacked."""
    return batch
