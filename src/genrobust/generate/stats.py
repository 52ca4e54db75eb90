"""Fidelity, diversity and distance to the real data of a generated folder (`genrobust generate stats`).

Fine-tuning a generator on the real training set is expected to buy fidelity and cost diversity; these
numbers let that be measured rather than asserted:

- **fidelity**: accuracy of a classifier trained on real data on the generated images (per class and
  overall): does an image show the class it was asked for?
- **diversity**: mean pairwise distance between embeddings of images of the same class (cosine distance
  by default, or L2), per class and the mean over classes: how different are a class's images?
- **Fréchet distance** to a real set (FID's formula on the same embeddings): how far is the generated
  distribution from the real one, in mean and covariance together?

The pure functions (`fidelity`, `diversity`, `frechet_distance`) take arrays; `folder_stats` loads the
images and models, computes all three and writes `stats.json`.
"""
import json
import logging
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from .. import context

logger = logging.getLogger(__name__)

METRICS = ("cosine", "l2")


# --- pure functions -------------------------------------------------------------------------------------

def fidelity(pred, labels, classes=None):
    """Accuracy of predicted class indices against the intended labels, per class and overall.

    Returns {"accuracy": float, "per_class": {class: accuracy}, "n": int}; `classes` names the indices (by
    default their numbers as strings); a class without images is left out of `per_class`.
    """
    pred, labels = np.asarray(pred).ravel(), np.asarray(labels).ravel()
    if len(pred) != len(labels) or len(labels) == 0:
        raise ValueError(f"fidelity needs one prediction per label and at least one image; got {len(pred)} "
                         f"predictions and {len(labels)} labels")
    right = pred == labels
    names = classes or [str(c) for c in range(int(labels.max()) + 1)]
    per_class = {names[c]: float(right[labels == c].mean()) for c in range(len(names)) if (labels == c).any()}
    return {"accuracy": float(right.mean()), "per_class": per_class, "n": int(len(labels))}


def pairwise_mean(emb, metric="cosine"):
    """Mean distance over the n(n-1)/2 distinct pairs of rows of `emb` (n >= 2).

    cosine: 1 - cos(a, b) (in [0, 2]; ignores feature scale); l2: Euclidean distance.
    """
    x = torch.as_tensor(np.asarray(emb), dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"diversity needs at least 2 embeddings (rows of a 2-D array), got shape {tuple(x.shape)}")
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        d = 1.0 - x @ x.T
    elif metric == "l2":
        d = torch.cdist(x, x)
    else:
        raise ValueError(f"unknown diversity metric {metric!r}; choose from {', '.join(METRICS)}")
    n = len(x)
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


def diversity(emb, labels=None, classes=None, metric="cosine"):
    """Within-class diversity: the mean pairwise embedding distance of each class, and their mean.

    Pairs never cross classes: a set that shows ten different classes is not diverse for that reason.
    Returns {"mean": float, "per_class": {class: float}, "metric": metric}; classes with fewer than 2 images
    are left out. Without `labels` all rows form one class, "all".
    """
    emb = np.asarray(emb)
    if labels is None:
        per_class = {"all": pairwise_mean(emb, metric)}
    else:
        labels = np.asarray(labels).ravel()
        if len(labels) != len(emb):
            raise ValueError(f"diversity: {len(emb)} embeddings but {len(labels)} labels")
        names = classes or [str(c) for c in range(int(labels.max()) + 1)]
        per_class = {names[c]: pairwise_mean(emb[labels == c], metric) for c in range(len(names))
                     if (labels == c).sum() >= 2}
    if not per_class:
        raise ValueError("diversity needs a class with at least 2 images")
    return {"mean": float(np.mean(list(per_class.values()))), "per_class": per_class, "metric": metric}


def frechet_distance(emb_a, emb_b):
    """Fréchet distance between Gaussians fitted to two embedding sets (FID's formula):

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)), covariances with the n - 1 denominator.

    Computed in float64. The last trace is taken as the sum of square roots of the eigenvalues of the
    symmetric S_a^(1/2) S_b S_a^(1/2), which has the eigenvalues of S_a S_b: unlike `scipy.linalg.sqrtm` of
    the non-symmetric product (pytorch-fid's way) it stays real and accurate when the covariances are
    singular, as they are with fewer images than embedding dimensions. Rounding can leave a tiny negative
    value for identical sets; the result is clamped at 0.
    """
    a, b = (np.asarray(e, dtype=np.float64) for e in (emb_a, emb_b))
    if a.ndim == 1:
        a, b = a[:, None], b.reshape(len(b), -1)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two sets of >= 2 embeddings of one dimension, got shapes "
                         f"{a.shape} and {b.shape}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    diff = a.mean(0) - b.mean(0)
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product(cov_a, cov_b)
    return float(max(value, 0.0))


def trace_sqrt_product(cov_a, cov_b):
    """Tr((A B)^(1/2)) for symmetric positive semi-definite A and B."""
    w, v = np.linalg.eigh(cov_a)
    half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = half @ cov_b @ half
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


# --- models ------------------------------------------------------------------------------------------

class Model:
    """A timm model, the class names its outputs index (None for an embedder alone), and the channels and size
    its inputs must have."""

    def __init__(self, net, channels, size, classes, name, source):
        self.net, self.channels, self.size = net, int(channels), tuple(size)
        self.classes, self.name, self.source = classes, name, source

    def describe(self):
        return {"model": self.name, "source": self.source, "channels": self.channels, "input_size": list(self.size)}


def load_model(spec, weights=None, device="cpu"):
    """A genrobust checkpoint folder, or a timm model name with local weights (`weights`), as a `Model`."""
    from ..train import check_model_name, create_classifier, load_checkpoint

    path = pathlib.Path(str(spec))
    if path.is_dir():
        if weights is not None:
            raise ValueError(f"{spec} is a checkpoint folder with its own weights; drop the weights file "
                             f"{weights}")
        net, cfg, classes = load_checkpoint(path, device=device)
        return Model(net, cfg["in_chans"], cfg["input_size"], list(classes), cfg["model"], str(path))
    if path.exists() or "/" in str(spec) or path.suffix in (".safetensors", ".bin", ".pth"):
        raise FileNotFoundError(f"no checkpoint folder at {spec}; give a folder written by `genrobust train`, or "
                                "a timm model name with --embedder-weights FILE")
    check_model_name(str(spec))
    if weights is None:
        raise ValueError(f"timm model {spec!r} needs local weights (--embedder-weights FILE): embeddings of "
                         "random weights measure nothing")
    import timm.data

    net = create_classifier(str(spec), num_classes=0, in_chans=3, pretrained=weights).to(device).eval()
    size = timm.data.resolve_model_data_config(net)["input_size"][1:]
    return Model(net, 3, size, None, str(spec), str(weights))


def conform(images, channels, size):
    """uint8 N x C x H x W images in a model's channel count and size (bilinear, antialiased when shrinking)."""
    if images.shape[1] != channels:
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif channels == 1 and images.shape[1] == 3:
            # ITU-R 601 luma, as PIL's convert("L") computes it
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if tuple(images.shape[2:]) != tuple(size):
        images = F.interpolate(images.float(), size=tuple(size), mode="bilinear", antialias=True,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


@torch.inference_mode()
def embed(model, images, device="cpu", batch_size=256):
    """Penultimate features (timm `forward_head(pre_logits=True)`) of uint8 images, as float32 numpy."""
    from ..train import normalization

    net = model.net
    mean, std = (t.to(device) for t in normalization(net, model.channels))
    out = []
    for i in range(0, len(images), batch_size):
        x = conform(images[i:i + batch_size], model.channels, model.size).to(device).float().div_(255)
        x = (x - mean) / std
        out.append(net.forward_head(net.forward_features(x), pre_logits=True).float().flatten(1).cpu())
    return torch.cat(out).numpy()


@torch.inference_mode()
def classify(model, images, device="cpu", batch_size=256):
    """Predicted class indices (into `model.classes`) of uint8 images."""
    from ..train import predict

    logits = [predict(model.net, conform(images[i:i + batch_size], model.channels, model.size), device=device,
                      batch_size=batch_size) for i in range(0, len(images), batch_size)]
    return torch.cat(logits).argmax(1).numpy()


# --- folders -----------------------------------------------------------------------------------------

def resolve_images(spec):
    """(dataset spec to load, folder or None) for a folder path, `imagefolder:PATH` or a dataset spec."""
    from ..data import DATASETS

    text = str(spec)
    if text.startswith("imagefolder:"):
        return text, pathlib.Path(text.removeprefix("imagefolder:"))
    if pathlib.Path(text).is_dir():
        return f"imagefolder:{text}", pathlib.Path(text)
    if text.partition("/")[0] in DATASETS:
        return text, None
    raise FileNotFoundError(f"no folder {text}, and it is no dataset spec; give a generated folder (an "
                            "ImageFolder) or a spec such as digits-mnist/test")


def _load_images(spec, channels):
    """An ImageSet of the images `spec` names (an ImageFolder's images must share a size; generators write
    them so; a real folder is read as a `StreamedSet`)."""
    from ..data import load_dataset

    return load_dataset(resolve_images(spec)[0], channels=channels)


def _relabel(data, classes, what):
    """Labels of `data` as indices into `classes`, matched by class name; an unknown class is an error."""
    missing = [c for c in data.classes if c not in classes]
    if missing:
        raise ValueError(f"{what} has classes {missing[:5]} that the classifier does not know (its classes: "
                         f"{classes[:10]}{', ...' if len(classes) > 10 else ''})")
    remap = torch.tensor([classes.index(c) for c in data.classes])
    return remap[data.labels].numpy()


def set_stats(data, classes, classifier=None, embedder=None, metric="cosine", device="cpu", batch_size=256):
    """Fidelity and diversity of one image set (`classes`: the names labels index) and its embeddings.

    `data` is an ImageSet, or a `StreamedSet` whose batches are decoded as they are scored."""
    if isinstance(data, StreamedSet):
        pred, emb, labels = [], [], []
        for x, y in data.batches():
            if classifier is not None:
                pred.append(classify(classifier, x, device=device, batch_size=batch_size))
            if embedder is not None:
                emb.append(embed(embedder, x, device=device, batch_size=batch_size))
            labels.append(y)
        data.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        pred = np.concatenate(pred) if pred else None
        emb = np.concatenate(emb) if emb else None
    else:
        pred = None if classifier is None else classify(classifier, data.images, device=device,
                                                        batch_size=batch_size)
        emb = None if embedder is None else embed(embedder, data.images, device=device, batch_size=batch_size)
    labels = _relabel(data, classes, data.name)
    row = {"num_images": len(labels), "counts": data.counts()}
    if getattr(data, "unreadable", None):
        row["unreadable"] = list(data.unreadable)
    if classifier is not None:
        row["fidelity"] = fidelity(pred, labels, classes)
    if embedder is not None:
        row["diversity"] = diversity(emb, labels, classes, metric=metric)
    return row, emb


class StreamedSet:
    """A real ImageFolder scored batch by batch, never held in memory: listed without opening a file, each image
    decoded in DataLoader workers as evaluation does (shorter side to size / crop_pct, centre crop to the model's
    input), so folders of mixed sizes, modes and orientations work. Unreadable files are skipped and named;
    more than `max_corrupt` of the folder is an error. `labels` holds the readable images' once scored."""

    def __init__(self, root, model, batch_size=256, workers=None, max_corrupt=0.01, name=None):
        from .. import context
        from ..data.folder import list_labelled_files

        self.root, self.model, self.batch_size, self.max_corrupt = pathlib.Path(root), model, batch_size, max_corrupt
        self.workers = context.default_workers() if workers is None else workers
        self.name = name or f"imagefolder:{root}"
        _, self.classes, self.files, labels = list_labelled_files(self.root)
        self.listed = torch.as_tensor(labels, dtype=torch.long)
        self.labels, self.unreadable = self.listed, []

    def __len__(self):
        return len(self.labels)

    def counts(self):
        return dict(zip(self.classes, torch.bincount(self.labels, minlength=len(self.classes)).tolist()))

    def batches(self):
        """uint8 batches at the model's size, and their labels."""
        from ..data.decode import whole_batch
        from ..evaluate import FolderImages, _preprocessing, _readable

        crop_pct, interpolation = _preprocessing(self.model.net, {})
        loader = torch.utils.data.DataLoader(
            FolderImages(self.files, self.listed, self.model.channels, self.model.size, crop_pct, 0, interpolation),
            batch_size=self.batch_size, num_workers=self.workers, collate_fn=whole_batch)
        self.unreadable = []
        yield from _readable(loader, self.name, len(self.files), self.max_corrupt, self.unreadable)


INCEPTION_SIZE = (299, 299)


def inception_batches(spec, batch_size=64, max_corrupt=0.01, workers=None):
    """uint8 batches of the images `spec` names, for the Inception network: a folder's decoded as evaluation does
    (shorter side to 299 px, centre crop; mixed sizes, modes and a few corrupt files welcome), a registered
    dataset's as they are (torchmetrics resizes them to 299 px)."""
    from .. import context
    from ..data import load_dataset

    spec, root = resolve_images(spec)
    if root is None:
        data = load_dataset(spec)
        for i in range(0, len(data), batch_size):
            yield data.images[i:i + batch_size]
        return
    from ..data.folder import list_labelled_files
    from ..data.decode import whole_batch
    from ..evaluate import FolderImages, _readable

    _, _, files, labels = list_labelled_files(root)
    loader = torch.utils.data.DataLoader(
        FolderImages(files, torch.as_tensor(labels), 3, INCEPTION_SIZE, 1.0, 0, "bicubic"), batch_size=batch_size,
        num_workers=context.default_workers() if workers is None else workers, collate_fn=whole_batch)
    for x, _ in _readable(loader, f"imagefolder:{root}", len(files), max_corrupt, []):
        yield x


def _default_out(folder):
    root = resolve_images(folder)[1]
    if root is None:
        raise ValueError(f"{folder} is a dataset spec, not a folder to write stats.json into; pass --out FILE")
    return root / "stats.json"


def folder_stats(folder, real=None, classifier=None, embedder=None, embedder_weights=None, metric="cosine",
                 device="cpu", batch_size=256, out=None, max_corrupt=0.01, fid=False, inception_weights=None):
    """Fidelity, diversity and Fréchet distance to `real` of a generated folder; writes them as JSON.

    Args:
        folder: a generated folder (any ImageFolder; a dataset spec works too).
        real: a dataset spec (`digits-mnist/test`, `imagefolder:PATH`) for the Fréchet distance and for the
            real set's own fidelity and diversity, the reference to read the generated numbers against.
        classifier: a genrobust checkpoint folder trained on real data (fidelity).
        embedder: a checkpoint folder, or a timm model name with local `embedder_weights` (diversity,
            Fréchet); None uses the classifier.
        metric: "cosine" (1 - cosine similarity) or "l2" for diversity.
        out: where to write the JSON; None writes `<folder>/stats.json`.
        max_corrupt: fraction of a folder's images (generated or real) that may be unreadable (skipped, and
            listed in its block's `unreadable`); more is an error.
        fid: also FID and KID to `real` on Inception-v3 features (generate/fid.py), the metrics papers report;
            `inception_weights` is the reference weights file (default: torch hub's cache).
    Returns the dict written: `generated` and `real` blocks (num_images, counts, fidelity, diversity),
    `frechet` (None without `real`), and what computed them.
    """
    if classifier is None and embedder is None:
        raise ValueError("generate stats needs --classifier (fidelity) and/or --embedder (diversity, Fréchet "
                         "distance); a checkpoint trained on the real data serves as both")
    if fid and real is None:
        raise ValueError("--fid compares the folder with a real set: give --real SPEC (e.g. imagefolder:PATH)")
    if metric not in METRICS:
        raise ValueError(f"unknown diversity metric {metric!r}; choose from {', '.join(METRICS)}")
    if out is None:
        _default_out(folder)  # a dataset spec has no folder to write into: fail before any work
    device = context.resolve_device(device)
    clf = None if classifier is None else load_model(classifier, device=device)
    emb_model = clf if embedder is None else load_model(embedder, weights=embedder_weights, device=device)
    ref = clf or emb_model
    # a folder streams through the eval transform as a real one does: retrieved or foreign folders mix sizes
    # (an image already at the model's size is kept as it is, so a generator's own folder scores the same)
    root = resolve_images(folder)[1]
    gen = StreamedSet(root, ref, batch_size, max_corrupt=max_corrupt) if root is not None \
        else _load_images(folder, ref.channels)
    classes = clf.classes if clf is not None else list(gen.classes)
    result = {"folder": str(folder), "real": real, "classes": list(gen.classes), "metric": metric,
              "classifier": None if clf is None else clf.describe(),
              "embedder": None if emb_model is None else emb_model.describe()}
    result["generated"], gen_emb = set_stats(gen, classes, clf, emb_model, metric, device, batch_size)
    result["real_set"], result["frechet"] = None, None
    if real is not None:
        spec, root = resolve_images(real)
        # a real folder (ImageNet's: mixed sizes, modes, a few corrupt files) streams; dataset specs load
        real_data = StreamedSet(root, ref, batch_size, max_corrupt=max_corrupt) if root is not None \
            else _load_images(real, ref.channels)
        result["real_set"], real_emb = set_stats(real_data, classes, clf, emb_model, metric, device, batch_size)
        if gen_emb is not None:
            result["frechet"] = frechet_distance(gen_emb, real_emb)  # of the classifier's embeddings
    result["fid"] = None
    if fid:
        from .fid import fid_kid, load_inception
        load_inception(inception_weights)  # a missing or wrong weights file fails before any image is decoded
        result["fid"] = fid_kid(real_batches=inception_batches(real, max_corrupt=max_corrupt),
                                generated_batches=inception_batches(folder, max_corrupt=max_corrupt),
                                weights=inception_weights, device=device)
    from ..data.folder import atomic_write_text

    path = pathlib.Path(out) if out else _default_out(folder)

    atomic_write_text(path, json.dumps(result, indent=2))
    result["path"] = str(path)
    return result
