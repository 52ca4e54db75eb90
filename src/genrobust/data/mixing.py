"""Real:generated mixing. `add` mode: the real set plus k x |real| generated images, class-balanced."""
import pathlib

import torch

from .folder import align_classes
from .imageset import ImageSet, concat


def balanced_counts(total, num_classes, generator):
    """Split `total` over classes as evenly as possible; the remainder goes to classes picked by seed."""
    base, rem = divmod(total, num_classes)
    counts = [base] * num_classes
    for c in torch.randperm(num_classes, generator=generator)[:rem].tolist():
        counts[c] += 1
    return counts


def mix_add(real, generated, ratio, seed=0):
    """Real images plus round(ratio * |real|) generated ones, class-balanced, drawn without replacement.

    Args:
        real: the real ImageSet.
        generated: an ImageSet (e.g. several generated folders concatenated), or None when ratio is 0.
        ratio: k >= 0.
    Returns (mixed ImageSet with an `origin` column, {"real": {class: n}, "generated": {class: n}}).
    """
    if ratio < 0:
        raise ValueError(f"--ratio must be >= 0 (k x |real| generated images are added), got {ratio}")
    real = _with_origin(real, "real")
    if ratio == 0 or generated is None:
        if ratio > 0:
            raise ValueError(f"--ratio {ratio} needs generated data; pass --generated FOLDER")
        return real, {"real": real.counts(), "generated": dict.fromkeys(real.classes, 0)}
    generated = align_classes(generated, real.classes)
    g = torch.Generator().manual_seed(seed)
    need = balanced_counts(round(ratio * len(real)), len(real.classes), g)
    have = torch.bincount(generated.labels, minlength=len(real.classes)).tolist()
    short = [(real.classes[c], have[c], n) for c, n in enumerate(need) if n > have[c]]
    if short:
        name, h, n = short[0]
        raise ValueError(f"{generated.name} has {h} images of class {name!r} but ratio {ratio} needs {n}; "
                         "generate more per class or lower --ratio")
    picks = []
    for c, n in enumerate(need):
        idx = torch.nonzero(generated.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    chosen = _with_origin(generated.subset(torch.cat(picks)), "generated")
    mixed = concat([real, chosen], f"{real.name}+{generated.name}@{ratio}")
    return mixed, {"real": real.counts(), "generated": chosen.counts()}


def _with_origin(data, origin):
    return ImageSet(data.name, data.images, data.labels, data.classes,
                    {**data.meta, "origin": [origin] * len(data)})


def build_training_set(real=None, generated=(), ratio=1.0, seed=0):
    """Load and mix training data from specs.

    Args:
        real: a dataset spec (`digits-mnist/train`, `imagefolder:PATH`) or None for generated-only.
        generated: generated folders (paths); several are pooled before sampling.
        ratio: k in `add` mode (ignored for generated-only, which uses every generated image).
    Returns (ImageSet, info dict for the checkpoint's data.json).
    """
    from . import load_dataset
    from .folder import load_imagefolder

    if real is None and not generated:
        raise ValueError("no training data: give a real dataset, generated folders, or both")
    real_set = load_dataset(real) if real else None
    channels = real_set.images.shape[1] if real_set is not None else None
    gen_sets = [load_imagefolder(g, channels=channels, name=str(g)) for g in generated]
    if gen_sets:
        classes = real_set.classes if real_set is not None else gen_sets[0].classes
        gen = concat([align_classes(g, classes) for g in gen_sets], "+".join(str(g) for g in generated))
    else:
        gen = None
    info = {"real": real, "generated": [str(g) for g in generated]}
    if real_set is None:
        mixed = _with_origin(gen, "generated")
        info.update(mode="generated-only", counts={"real": {}, "generated": mixed.counts()},
                    label=f"generated only ({', '.join(pathlib.Path(g).name for g in generated)})")
        return mixed, info
    mixed, counts = mix_add(real_set, gen, ratio if gen is not None else 0.0, seed)
    label = real if gen is None else f"{real} + {ratio:g}x {'+'.join(pathlib.Path(g).name for g in generated)}"
    info.update(mode="add" if gen is not None else "real-only", ratio=ratio if gen is not None else 0.0,
                seed=seed, counts=counts, label=label)
    return mixed, info
