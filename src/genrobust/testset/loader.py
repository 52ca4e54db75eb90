"""Reading a version back: a torch Dataset of (image, label), and a writable export for Hugging Face
`datasets` (a version folder already is an `imagefolder` dataset: class folders plus `metadata.jsonl`)."""
import pathlib
import shutil

import torch

from . import store


class GeneratedTestSet(torch.utils.data.Dataset):
    """A test-set version as a Dataset of (image, label), in `metadata.jsonl` order.

    Without a transform an image is a uint8 tensor C x H x W (C = 1 for greyscale PNGs), so the default
    DataLoader collate works; a transform receives the PIL image (torchvision transforms, timm's).
    Attributes: `classes`, `class_to_idx`, `targets`, `rows` (the metadata), `card`, `path`.
    """

    def __init__(self, path, transform=None, root=None, verify=False):
        from ..data.folder import read_jsonl

        self.path = store.resolve(path, root)
        if verify:
            store.check_intact(self.path)
        self.card = store.read_card(self.path)
        self.classes = list(self.card["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.rows = read_jsonl(self.path / store.METADATA)
        self.targets = [int(r["label"]) for r in self.rows]
        self.transform = transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image

        with Image.open(self.path / self.rows[i]["file_name"]) as im:
            im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
        if self.transform is not None:
            return self.transform(im), self.targets[i]
        a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        return (a[None] if a.ndim == 2 else a.permute(2, 0, 1)), self.targets[i]


def load_testset(path, transform=None, root=None, verify=False):
    """A test-set version (a folder, `NAME/VERSION`, or `NAME` for its latest version under `root`) as a torch
    Dataset of (image, label); `verify` rechecks every file's sha256 first."""
    return GeneratedTestSet(path, transform=transform, root=root, verify=verify)


def export(ref, out, root=None):
    """Copy a verified version to `out` as plain writable files (for `datasets.load_dataset(out)["test"]` or an
    upload to the Hub: README.md carries the dataset-card header, which declares the `test` split). Returns
    `out`."""
    path = store.resolve(ref, root)
    store.check_intact(path)
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new folder")
    files = [store.CARD, *store.read_card(path)["files"]]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path / name, out / name)  # copyfile, not copy2: the copy is writable
    return out
