"""An in-memory labelled image set: the one record every stage passes around at digits scale."""
from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """Images as uint8 `N x C x H x W`, integer labels into `classes`, and per-image metadata columns.

    `meta` maps a column name (e.g. "source", "style", "strategy") to a list with one value per image.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 N x C x H x W, got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        n = len(self.images)
        if len(self.labels) != n or any(len(v) != n for v in self.meta.values()):
            raise ValueError(f"{self.name}: images, labels and metadata columns differ in length")

    def __len__(self):
        return len(self.images)

    def subset(self, index, name=None):
        index = torch.as_tensor(index, dtype=torch.long)
        idx = index.tolist()
        return ImageSet(
            name=name or self.name,
            images=self.images[index],
            labels=self.labels[index],
            classes=list(self.classes),
            meta={k: [v[i] for i in idx] for k, v in self.meta.items()},
        )

    def counts(self):
        """Images per class name."""
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def concat(sets, name):
    """Concatenate image sets that share a class list; metadata columns missing in one set become None."""
    sets = [s for s in sets if len(s)]
    if not sets:
        raise ValueError(f"{name}: nothing to concatenate")
    classes = sets[0].classes
    for s in sets[1:]:
        if s.classes != classes:
            raise ValueError(f"{s.name}: classes {s.classes} differ from {sets[0].name}'s {classes}")
    keys = sorted({k for s in sets for k in s.meta})
    meta = {k: [x for s in sets for x in s.meta.get(k, [None] * len(s))] for k in keys}
    return ImageSet(name, torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                    list(classes), meta)
