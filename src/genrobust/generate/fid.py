"""FID and KID on Inception-v3 features: the generative metrics papers report (Heusel et al. 2017; Bińkowski et
al. 2018), computed with torchmetrics on the FID reference network (torch-fidelity's port of the TF Inception).

The reference weights (`pt_inception-2015-12-05-6726825d.pth`) are read from a file given as `weights`, else from
torch hub's cache, and never unpickled: torch-fidelity's own loader calls `torch.load(weights_only=False)`, so
genrobust reads them with safetensors or `torch.load(weights_only=True)` and hands the tensors over.
"""
import contextlib
import pathlib

import torch

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURES = 2048  # the pool3 features FID is defined on


def _state_dict(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights {path}: no such file (the FID reference weights, "
                                f"{WEIGHTS_FILE}, or a .safetensors copy)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors, zip and unpickling errors alike
        raise ValueError(f"--inception-weights {path} is not a readable weight file ({e.__class__.__name__}); "
                         f"give {WEIGHTS_FILE} or a .safetensors copy of it") from None


def _default_weights():
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if not cached.is_file():
        raise FileNotFoundError(f"FID and KID need the Inception weights {WEIGHTS_FILE}: none in torch hub's cache "
                                f"({cached.parent}); pass --inception-weights FILE (on a machine with network, "
                                "torch-fidelity downloads it to that cache)")
    return cached


@contextlib.contextmanager
def _handing_over(state):
    """torch-fidelity builds the network, then fetches the weights by URL: give it ours instead."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        fe.load_state_dict_from_url = original


def load_inception(weights=None, device="cpu"):
    """The FID reference Inception-v3 (2048-d pool features), from `weights` or torch hub's cache."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"FID and KID need torchmetrics and torch-fidelity ({e.name} is missing): "
                                  "pip install 'genrobust[metrics]'") from None
    state = _state_dict(weights or _default_weights())
    with _handing_over(state):
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURES)])
        except RuntimeError as e:  # missing or mis-shaped keys
            raise ValueError(f"--inception-weights {weights}: not the Inception-v3 FID weights "
                             f"({' '.join(str(e).split())[:200]})") from None
    return net.to(device).eval()


def _rgb(batch):
    """uint8 N x C x H x W with C = 1 or 3 -> uint8 N x 3 x H x W (torchmetrics resizes to 299 itself)."""
    if batch.dtype != torch.uint8:
        raise ValueError(f"FID takes uint8 images, got {batch.dtype}")
    return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


def fid_kid(real_batches, generated_batches, weights=None, device="cpu", kid_subset_size=1000, seed=0):
    """FID and KID (mean and std over subsets) between two image sets given as iterables of uint8 batches.

    Returns {"fid": float, "kid_mean": float, "kid_std": float, "n_real": int, "n_generated": int,
    "feature_network": ...}. KID's subsets hold min(kid_subset_size, n_real, n_generated) images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net = load_inception(weights, device)
    real, gen = [_rgb(b) for b in real_batches], [_rgb(b) for b in generated_batches]
    n_real, n_gen = sum(len(b) for b in real), sum(len(b) for b in gen)
    if n_real < 2 or n_gen < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n_real} real and {n_gen} generated")
    fid = FrechetInceptionDistance(feature=net).to(device)
    kid = KernelInceptionDistance(feature=net, subset_size=min(kid_subset_size, n_real, n_gen)).to(device)
    for batches, is_real in ((real, True), (gen, False)):
        for b in batches:
            b = b.to(device)
            fid.update(b, real=is_real)
            kid.update(b, real=is_real)
    torch.manual_seed(seed)  # KID draws its subsets from the global generator
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "n_real": n_real, "n_generated": n_gen,
            "feature_network": f"Inception-v3 (FID reference weights, {FEATURES}-d pool features)"}
