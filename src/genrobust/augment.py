"""Augmentation baselines, applied to whole batches on the training device. Registry `augmentations`.

Every augmentation maps a float batch in [0, 1] (`N x C x H x W`) to one of the same shape and range, drawing
its randomness from the `torch.Generator` it is given, so a seeded run is repeatable.
"""
import torch
import torch.nn.functional as F

from .registry import Registry

AUGMENTATIONS = Registry("augmentation")


@AUGMENTATIONS.register("none", description="no augmentation")
def _none(flip=False):
    return lambda x, generator: x


@AUGMENTATIONS.register("standard", description="random resized crop (scale 0.7-1, aspect 3/4-4/3), plus a "
                                                "horizontal flip where the domain allows it (not for digits)")
def _standard(flip=False, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)):
    def apply(x, generator):
        n = x.shape[0]
        rand = torch.rand(n, 4, generator=generator).to(x.device)
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
            flips = torch.rand(n, generator=generator).to(x.device) < 0.5
            theta[flips, 0, 0] *= -1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    return apply


def create_augmentation(name, **kwargs):
    return AUGMENTATIONS.create(name, **kwargs)


def list_augmentations(pattern="*"):
    return AUGMENTATIONS.list(pattern)
