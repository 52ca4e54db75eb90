"""Shared test setup: offline, CPU only, two threads; a tiny random-weight digits-ddpm; tiny ImageFolders."""
import os

# Before torch is imported anywhere: no network, no GPU. A passive OpenMP wait policy keeps two torch
# threads from busy-waiting when the CPUs are shared (busy-waiting made a training step ~20x slower).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Folder listings are cached under $GENROBUST_CACHE: tests keep theirs out of the user's ~/.cache.
os.environ["GENROBUST_CACHE"] = __import__("tempfile").mkdtemp(prefix="genrobust-test-cache-")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_UNET = dict(block_out_channels=(8, 8, 8), norm_num_groups=4)


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory):
    """A digits-ddpm folder (unet/, scheduler/, card.json) with tiny random weights, fixed by seed."""
    from genrobust.generate import digits_ddpm

    torch.manual_seed(0)
    unet = digits_ddpm.build_unet(**TINY_UNET)
    out = tmp_path_factory.mktemp("tiny-digits-ddpm")
    digits_ddpm.save(unet, out, training={"note": "random weights for tests", "overrides": str(TINY_UNET)})
    return out


def write_imagefolder(root, classes=("0", "1", "2"), per_class=3, size=28, mode="L", seed=0):
    """Write `per_class` random PNGs per class as `<root>/<class>/<i>.png` (no metadata.jsonl)."""
    from PIL import Image

    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{i:02d}.png")
    return root


@pytest.fixture
def tiny_images(tmp_path):
    """Factory: `tiny_images(name, classes=..., per_class=..., size=..., mode=...)` -> an ImageFolder in
    tmp_path holding random PIL PNGs."""
    def make(name="images", **kwargs):
        return write_imagefolder(tmp_path / name, **kwargs)
    return make


@pytest.fixture
def tiny_generator(tiny_generator_dir):
    from genrobust.generate import create_generator

    return create_generator("digits-ddpm", path=tiny_generator_dir, steps=2, batch_size=8)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A test_resnet (BatchNorm) trained for 2 epochs on 40 digits; also the in-memory model train() built."""
    from genrobust import train as tr
    from helpers import digits_subset

    built = []
    create = tr.create_classifier

    def recording(*args, **kwargs):
        built.append(create(*args, **kwargs))
        return built[-1]

    data = digits_subset()
    out = tmp_path_factory.mktemp("ckpt") / "tiny-resnet"
    config = tr.TrainConfig(model="test_resnet", epochs=2, batch_size=32, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "create_classifier", recording)
        rows = tr.train(data, out, config, data_info={"real": "digits-mnist/train", "label": "tiny real"},
                        progress=False)
    return {"out": out, "rows": rows, "model": built[0].eval(), "data": data, "config": config}


# --- realistic ImageNet-shaped trees (tests/realistic.py) ----------------------------------------------------

@pytest.fixture(scope="session")
def realistic_tree(tmp_path_factory):
    """A read-only $GENROBUST_DATA of ImageNet-like files (mixed sizes, modes, extensions, EXIF, a PNG under
    a .JPEG name, one corrupt file per train folder): `realistic.Tree`; its `root` is the data root. Tests
    that change files build their own with `realistic.data_root` or `realistic.imagefolder`."""
    import realistic

    return realistic.data_root(tmp_path_factory.mktemp("realistic-data"))


@pytest.fixture(scope="session")
def realistic_study_root(tmp_path_factory):
    """The realistic data root plus the tiny random SD pipelines where the paper study configs expect the
    user's local models (`models/stable-diffusion-v1-5`, `models/sd-image-variations-diffusers`)."""
    import realistic

    root = tmp_path_factory.mktemp("realistic-study-data")
    realistic.data_root(root)
    realistic.models(root)
    return root
