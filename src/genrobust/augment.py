"""Augmentation baselines, applied to whole batches in the training loop. Registry `AUGMENTATIONS`.

Every factory returns an `Augmentation`, called as `x, y = aug(x, y, generator)`: `x` is a float batch
`N x C x H x W` in [0, 1] (never modified in place), `y` soft targets `N x K`. The result has the same dtype and
range; label-mixing baselines (mixup, cutmix) also mix `y`, the others return it unchanged. All randomness comes
from the CPU `torch.Generator`, so a seeded run is repeatable. AugMix with `jsd=True` returns `3N` images
(clean, aug1, aug2) for the consistency loss `jsd_loss`.

The baselines other than `none` and `standard` run on top of the standard crop (and flip where the domain allows
it), as in the papers they come from; `crop=False` applies the baseline alone.
"""
import contextlib

import torch
import torch.nn.functional as F

from .registry import Registry

AUGMENTATIONS = Registry("augmentation")


class Augmentation:
    """A batch augmentation: `x, y = aug(x, y, generator)`.

    Args:
        apply: `(x, y, generator) -> (x, y)`, the baseline itself.
        crop: a `(x, generator) -> x` step run first (the standard crop and flip), or None.
        jsd: True where `apply` returns `3N` images for `jsd_loss`; the trainer then adds
            `jsd_weight * jsd_loss(logits, N)` to the cross-entropy of the first N logits.
    """

    def __init__(self, apply, crop=None, jsd=False, jsd_weight=12.0):
        self.apply, self.crop, self.jsd, self.jsd_weight = apply, crop, jsd, jsd_weight

    def __call__(self, x, y, generator):
        _check_batch(x, y)
        if self.crop is not None:
            x = self.crop(x, generator)
        return self.apply(x, y, generator)


def _check_batch(x, y):
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float N x C x H x W image batch, got {x.dtype} of shape {tuple(x.shape)}")
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"expected N x K soft targets for {x.shape[0]} images, got shape {tuple(y.shape)}")


def _images_only(fn):
    return lambda x, y, generator: (fn(x, generator), y)


def _base(crop, flip):
    return _crop_and_flip(flip) if crop else None


@contextlib.contextmanager
def _seeded(generator):
    """Let code that draws from torch's global CPU RNG (torchvision v2, distributions) depend on `generator` only."""
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    # devices=[]: only the CPU state is saved and restored, and only the CPU generator is seeded, so the caller's
    # CUDA random state is left alone
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _rand(generator, *shape, device="cpu"):
    return torch.rand(*shape, generator=generator).to(device)


def _per_image(x, transform, generator):
    """Apply a torchvision v2 transform to each image on its own (its own random op), as uint8 on the CPU."""
    images = x.detach().mul(255).round().to("cpu", torch.uint8)
    with _seeded(generator):
        out = torch.stack([transform(image) for image in images])
    return out.to(x.device, x.dtype).div_(255)


# ---------------------------------------------------------------------------------------------- none, standard

@AUGMENTATIONS.register("none", description="no augmentation")
def _none(flip=False, crop=True):
    return Augmentation(lambda x, y, generator: (x, y))


def _crop_and_flip(flip, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)):
    def apply(x, generator):
        n = x.shape[0]
        rand = _rand(generator, n, 4, device=x.device)
        area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
        log_r = torch.log(torch.tensor(ratio, device=x.device))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * rand[:, 1])
        sw = torch.sqrt(area * aspect).clamp(max=1.0)
        sh = torch.sqrt(area / aspect).clamp(max=1.0)
        # crop centre anywhere the crop still fits inside the image (normalised coordinates)
        tx = (1 - sw) * (2 * rand[:, 2] - 1)
        ty = (1 - sh) * (2 * rand[:, 3] - 1)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sw, sh, tx, ty
        if flip:
            flips = _rand(generator, n, device=x.device) < 0.5
            theta[flips, 0, 0] *= -1
        return _warp(x, theta)
    return apply


def _warp(x, theta):
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


@AUGMENTATIONS.register("standard", description="random resized crop (scale 0.7-1, aspect 3/4-4/3), plus a "
                                                "horizontal flip where the domain allows it (not for digits)")
def _standard(flip=False, crop=True, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)):
    # crop=False: streamed images were already cropped (and flipped) from the full image in the DataLoader workers
    return Augmentation(lambda x, y, generator: (x, y), crop=_crop_and_flip(flip, scale, ratio) if crop else None)


# ------------------------------------------------------------------------------------ torchvision policies
# None of these policies contains a flip, so `flip` only reaches the standard step they run on.

@AUGMENTATIONS.register("randaugment", description="standard crop, then RandAugment (2 ops at magnitude 9 of "
                                                   "14), each image its own ops")
def _randaugment(flip=False, crop=True, num_ops=2, magnitude=9):
    from torchvision.transforms import v2

    transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    return Augmentation(_images_only(lambda x, g: _per_image(x, transform, g)), crop=_base(crop, flip))


@AUGMENTATIONS.register("autoaugment", description="standard crop, then AutoAugment's learned ImageNet policy "
                                                   "(policy='cifar10'/'svhn' for the others), per image")
def _autoaugment(flip=False, crop=True, policy="imagenet"):
    from torchvision.transforms import v2

    policies = {p.name.lower(): p for p in v2.AutoAugmentPolicy}
    if policy not in policies:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; choose from {sorted(policies)}")
    transform = v2.AutoAugment(policy=policies[policy])
    return Augmentation(_images_only(lambda x, g: _per_image(x, transform, g)), crop=_base(crop, flip))


@AUGMENTATIONS.register("trivialaugment", description="standard crop, then TrivialAugment (wide): one random op "
                                                      "at a random magnitude per image")
def _trivialaugment(flip=False, crop=True):
    from torchvision.transforms import v2

    transform = v2.TrivialAugmentWide()
    return Augmentation(_images_only(lambda x, g: _per_image(x, transform, g)), crop=_base(crop, flip))


# ------------------------------------------------------------------------------------------------- AugMix
# Batched rather than torchvision's v2.AugMix image by image, which costs ~170 ms per 128 digits (~350 ms with
# the two views JSD needs). The operations and their strengths follow the AugMix reference: a strength
# s = U(0.1, severity) / 10 of each operation's maximum.

def _augmix_posterize(x, s, sign):
    bits = 4 - (s * 4).long()
    mask = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
    return torch.bitwise_and(x.mul(255).round().to(torch.uint8), mask).to(x.dtype) / 255


def _augmix_solarize(x, s, sign):
    threshold = (256 - (s * 256).long()).to(x.dtype).view(-1, 1, 1, 1) / 255
    return torch.where(x >= threshold, 1 - x, x)


def _augmix_autocontrast(x, s, sign):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    # flat channels are left as they are, as PIL does
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)


def _augmix_equalize(x, s, sign):
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(x.mul(255).round().to(torch.uint8)).to(x.dtype) / 255


def _augmix_affine(kind):
    def op(x, s, sign):
        h, w = x.shape[-2:]
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        # the reference's parameters are in pixels; normalised coordinates scale x by 2/W and y by 2/H
        if kind == "rotate":
            rad = torch.deg2rad((s * 30).floor() * sign)
            theta[:, 0, 0], theta[:, 1, 1] = torch.cos(rad), torch.cos(rad)
            theta[:, 0, 1], theta[:, 1, 0] = -torch.sin(rad) * h / w, torch.sin(rad) * w / h
        elif kind == "shear_x":
            theta[:, 0, 1] = s * 0.3 * sign * h / w
        elif kind == "shear_y":
            theta[:, 1, 0] = s * 0.3 * sign * w / h
        elif kind == "translate_x":
            theta[:, 0, 2] = (s * w / 3).floor() * sign * 2 / w
        else:
            theta[:, 1, 2] = (s * h / 3).floor() * sign * 2 / h
        return _warp(x, theta)
    return op


def _grey(x):
    if x.shape[1] == 3:
        return (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(
            1, keepdim=True)
    return x.mean(1, keepdim=True)


def _augmix_enhance(kind):
    def op(x, s, sign):
        # the reference's enhancement factor 0.1 + 1.8 s
        f = (0.1 + 1.8 * s).view(-1, 1, 1, 1)
        if kind == "brightness":
            degenerate = torch.zeros_like(x)
        elif kind == "contrast":
            degenerate = _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x)
        elif kind == "color":
            degenerate = _grey(x).expand_as(x)
        else:  # sharpness: PIL's smoothing kernel, border pixels kept
            c = x.shape[1]
            kernel = torch.tensor([[1., 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
            smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
            degenerate = x.clone()
            degenerate[..., 1:-1, 1:-1] = smooth
        return (degenerate + f * (x - degenerate)).clamp(0, 1)
    return op


_AUGMIX_OPS = {"autocontrast": _augmix_autocontrast, "equalize": _augmix_equalize,
               "posterize": _augmix_posterize, "solarize": _augmix_solarize,
               **{k: _augmix_affine(k) for k in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")}}
# left out by default because they overlap with ImageNet-C's test corruptions (the reference's --all-ops)
_AUGMIX_EXTRA_OPS = {k: _augmix_enhance(k) for k in ("color", "contrast", "brightness", "sharpness")}


def _augmix_step(x, generator, ops, severity, active):
    """One operation per active image, each drawn with its own strength and sign."""
    n = x.shape[0]
    op = torch.randint(len(ops), (n,), generator=generator)
    s = (0.1 + (severity - 0.1) * torch.rand(n, generator=generator)) / 10
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    out = x.clone()
    for k, fn in enumerate(ops):
        idx = ((op == k) & active).nonzero().squeeze(1)
        if len(idx):
            out[idx.to(x.device)] = fn(x[idx.to(x.device)], s[idx].to(x.device), sign[idx].to(x.device))
    return out


def _augmix_images(x, generator, ops, severity, width, depth, alpha):
    n = x.shape[0]
    with _seeded(generator):
        weights = torch.distributions.Dirichlet(torch.full((width,), float(alpha))).sample((n,))
        m = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))
    mix = torch.zeros_like(x)
    for i in range(width):
        # chain depth per image: `depth`, or U{1, 2, 3} where depth < 1 as in the reference
        steps = torch.randint(1, 4, (n,), generator=generator) if depth < 1 else torch.full((n,), depth)
        chain = x
        for d in range(int(steps.max())):
            chain = _augmix_step(chain, generator, ops, severity, steps > d)
        mix += weights[:, i].to(x.device, x.dtype).view(-1, 1, 1, 1) * chain
    m = m.to(x.device, x.dtype).view(-1, 1, 1, 1)
    return ((1 - m) * x + m * mix).clamp(0, 1)


@AUGMENTATIONS.register("augmix", description="standard crop, then AugMix (3 chains of 1-3 ops mixed with the "
                                              "image); jsd=True adds two views for its consistency loss")
def _augmix(flip=False, crop=True, severity=3, width=3, depth=-1, alpha=1.0, all_ops=False, jsd=False,
            jsd_weight=12.0):
    ops = list({**_AUGMIX_OPS, **(_AUGMIX_EXTRA_OPS if all_ops else {})}.values())

    def images(x, generator):
        return _augmix_images(x, generator, ops, severity, width, depth, alpha)

    def apply(x, y, generator):
        if jsd:
            return torch.cat([x, images(x, generator), images(x, generator)]), y
        return images(x, generator), y
    return Augmentation(apply, crop=_base(crop, flip), jsd=jsd, jsd_weight=jsd_weight)


def jsd_loss(logits, n):
    """AugMix's Jensen-Shannon consistency term for logits of (clean, aug1, aug2) stacked as `3n` rows.

    The mean over the three of KL(p_i || M), with M their mixture; 0 when the three predictions agree.
    """
    if logits.shape[0] != 3 * n:
        raise ValueError(f"expected 3 x {n} logits (clean, aug1, aug2), got {logits.shape[0]}")
    probs = F.softmax(logits.float(), dim=1).split(n)
    # clamped as in the AugMix reference, so a vanishing mixture probability cannot give log 0
    log_mixture = torch.clamp((probs[0] + probs[1] + probs[2]) / 3, 1e-7, 1).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / 3


# ----------------------------------------------------------------------------------------- mixup, cutmix

def _beta(alpha, generator):
    with _seeded(generator):
        return float(torch.distributions.Beta(float(alpha), float(alpha)).sample())


@AUGMENTATIONS.register("augmix-jsd", description="augmix with its Jensen-Shannon consistency loss: each image "
                                                  "also seen as two AugMix views (3x the forward passes)")
def _augmix_jsd(flip=False, **kwargs):
    return _augmix(flip=flip, jsd=True, **kwargs)


@AUGMENTATIONS.register("mixup", description="standard crop, then mixup: each image and its target blended "
                                             "with another's, weight lam ~ Beta(0.2, 0.2) per batch")
def _mixup(flip=False, crop=True, alpha=0.2):
    def apply(x, y, generator):
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        lam = torch.tensor(_beta(alpha, generator), device=x.device, dtype=x.dtype)
        return lam * x + (1 - lam) * x[perm], lam.to(y.dtype) * y + (1 - lam.to(y.dtype)) * y[perm]
    return Augmentation(apply, crop=_base(crop, flip))


@AUGMENTATIONS.register("cutmix", description="standard crop, then CutMix: a box of another image pasted in, "
                                              "targets weighted by the pasted area")
def _cutmix(flip=False, crop=True, alpha=1.0):
    def apply(x, y, generator):
        n, _, h, w = x.shape
        perm = torch.randperm(n, generator=generator).to(x.device)
        # box of area (1 - lam) of the image, centred anywhere and clipped to it (CutMix paper, one per batch)
        cut = (1 - _beta(alpha, generator)) ** 0.5
        cy, cx = int(torch.randint(h, (), generator=generator)), int(torch.randint(w, (), generator=generator))
        bh, bw = int(h * cut), int(w * cut)
        y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        # the label weight is the area actually pasted, after clipping
        pasted = torch.tensor((y1 - y0) * (x1 - x0) / (h * w), device=y.device, dtype=y.dtype)
        return out, (1 - pasted) * y + pasted * y[perm]
    return Augmentation(apply, crop=_base(crop, flip))


# ------------------------------------------------------------------------------------------------ Noise2Net
# DeepAugment's Noise2Net (Hendrycks et al. 2021, "The Many Faces of Robustness"): every batch, a freshly
# initialised Res2Net-style network of four residual blocks distorts the image, x <- x + eps * block(x), with
# eps ~ U(eps_max / 2, eps_max). Grouped convolutions give each image its own random network (and here its own
# eps; the reference draws one per batch).

def _random_conv(z, c_out, k, dilation, generator):
    m, c_in, h, w = z.shape
    # PyTorch's default initialisation range; biases are omitted since the normalisation after every
    # convolution would remove them
    bound = (c_in * k * k) ** -0.5
    weight = ((torch.rand(m * c_out, c_in, k, k, generator=generator) * 2 - 1) * bound).to(z.device, z.dtype)
    if k == 1:
        # a batched matrix product: grouped 1x1 convolutions take a slow per-group path on the CPU
        return torch.bmm(weight.view(m, c_out, c_in), z.flatten(2)).view(m, c_out, h, w)
    out = F.conv2d(z.reshape(1, m * c_in, h, w), weight, padding=dilation * (k // 2), dilation=dilation, groups=m)
    return out.view(m, c_out, h, w)


def _norm(t):
    # per image and channel, as the reference's train-mode BatchNorm over a 1 x (N*C) x H x W batch does;
    # group_norm with a group per channel is the fastest form of it on the CPU
    return F.group_norm(t, t.shape[1])


def _res2net_block(z, generator, hidden, scale):
    parts = F.relu(_norm(_random_conv(z, hidden * scale, 1, 1, generator)), inplace=True).split(hidden, dim=1)
    kept, sp = [], None
    for part in parts[:-1]:
        sp = part if sp is None else sp + part
        # random kernel size and dilation per convolution, as in the reference
        k = (1, 3)[int(torch.randint(2, (), generator=generator))]
        dilation = int(torch.randint(1, 4, (), generator=generator))
        sp = F.relu(_norm(_random_conv(sp, hidden, k, dilation, generator)), inplace=True)
        kept.append(sp)
    return _norm(_random_conv(torch.cat(kept + [parts[-1]], 1), z.shape[1], 1, 1, generator))


def _noise2net_images(x, generator, eps_max, hidden, scale, blocks):
    # the reference works on mean/std-normalised images; standardising each image gives the same strength
    # relative to the image's contrast in any domain
    mu = x.mean((1, 2, 3), keepdim=True)
    sigma = x.std((1, 2, 3), keepdim=True).clamp_min(1e-3)
    eps = (eps_max * (1 + torch.rand(x.shape[0], generator=generator)) / 2).to(x.device, x.dtype)
    z = (x - mu) / sigma
    for _ in range(blocks):
        z = z + eps.view(-1, 1, 1, 1) * _res2net_block(z, generator, hidden, scale)
    return (z * sigma + mu).clamp(0, 1)


@AUGMENTATIONS.register("noise2net", description="standard crop, then DeepAugment's Noise2Net on half the "
                                                 "images: a fresh random residual conv net distorts each")
def _noise2net(flip=False, crop=True, p=0.5, eps_max=0.75, hidden=4, scale=4, blocks=4):
    # hidden=4 rather than the reference's 16 keeps it near 20 ms per 128 digits on one CPU core (16: ~100 ms,
    # memory-bound); the output of each block is normalised, so the width changes variety, not strength
    def images(x, generator):
        # the reference distorts half of each batch and leaves the rest clean
        idx = (torch.rand(x.shape[0], generator=generator) < p).nonzero().squeeze(1).to(x.device)
        if not len(idx):
            return x
        out = x.clone()
        out[idx] = _noise2net_images(x[idx], generator, eps_max, hidden, scale, blocks)
        return out
    return Augmentation(_images_only(images), crop=_base(crop, flip))


def create_augmentation(name, **kwargs):
    return AUGMENTATIONS.create(name, **kwargs)


def list_augmentations(pattern="*"):
    return AUGMENTATIONS.list(pattern)
