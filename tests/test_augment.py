import pytest
import torch

from genrobust.augment import AUGMENTATIONS, create_augmentation, jsd_loss, list_augmentations
from genrobust.registry import UnknownNameError

NAMES = ["augmix", "augmix-jsd", "autoaugment", "cutmix", "mixup", "noise2net", "none", "randaugment",
         "standard", "trivialaugment"]
CASES = ([(name, {}) for name in NAMES] + [("standard", {"flip": True}), ("augmix", {"jsd": True}),
                                           ("augmix", {"all_ops": True}), ("noise2net", {"p": 1.0})])
LABEL_MIXING = {"mixup", "cutmix"}
# the ones that draw an operation per image, checked without the standard crop (itself per image)
PER_IMAGE = [("randaugment", {}), ("autoaugment", {}), ("trivialaugment", {}), ("augmix", {}),
             ("augmix", {"all_ops": True}), ("noise2net", {"p": 1.0})]


def _batch(channels=1, size=28, n=6):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, channels, size, size, generator=g)
    return x, torch.eye(n)  # one class per image, so mixed targets show which image went where


def _run(aug, x, y, seed):
    return aug(x, y, torch.Generator().manual_seed(seed))


def test_registered_augmentations():
    assert list_augmentations() == NAMES
    for name in NAMES:
        assert AUGMENTATIONS.info(name)["description"]
        aug = create_augmentation(name, flip=False)
        assert aug.jsd is (name == "augmix-jsd")
    jsd = create_augmentation("augmix", jsd=True)
    assert jsd.jsd is True and jsd.jsd_weight == 12


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(UnknownNameError, match="did you mean 'mixup'"):
        create_augmentation("mixpu")


def test_bad_batches_are_refused():
    aug = create_augmentation("standard")
    x, y = _batch()
    with pytest.raises(ValueError, match="float N x C x H x W"):
        aug((x * 255).to(torch.uint8), y, torch.Generator())
    with pytest.raises(ValueError, match="soft targets"):
        aug(x, y[:3], torch.Generator())


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 16)])
def test_contract(name, kwargs, channels, size):
    aug = create_augmentation(name, **kwargs)
    x, y = _batch(channels, size)
    x_before, y_before = x.clone(), y.clone()
    a, ya = _run(aug, x, y, 1)
    b, yb = _run(aug, x, y, 1)
    c, _ = _run(aug, x, y, 2)
    rows = 3 * len(x) if aug.jsd else len(x)
    assert a.shape == (rows, *x.shape[1:]) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert name == "none" or not torch.equal(a, c)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # inputs are not modified in place
    if name in LABEL_MIXING:
        assert ya.shape == y.shape
        torch.testing.assert_close(ya.sum(1), torch.ones(len(y)))
    else:
        assert torch.equal(ya, y)


def test_none_is_the_identity():
    x, y = _batch()
    out, yo = _run(create_augmentation("none"), x, y, 0)
    assert torch.equal(out, x) and torch.equal(yo, y)


def test_the_global_rng_is_left_alone():
    # the torchvision policies draw from torch's global RNG inside a fork seeded from the generator
    x, y = _batch()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for name in NAMES:
        _run(create_augmentation(name), x, y, 0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name,kwargs", PER_IMAGE)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_image_gets_its_own_operation(name, kwargs, channels):
    # the same image repeated: one op for the whole batch would give identical copies
    x, _ = _batch(channels, 16, n=1)
    x = x.repeat(8, 1, 1, 1)
    out, _ = _run(create_augmentation(name, crop=False, **kwargs), x, torch.eye(8), 3)
    assert len({tuple(o.flatten().tolist()) for o in out}) >= 4


@pytest.mark.parametrize("kwargs", [{}, {"flip": True}])
def test_standard_depends_on_the_seed(kwargs):
    aug = create_augmentation("standard", **kwargs)
    x, y = _batch()
    a, _ = _run(aug, x, y, 1)
    assert not torch.equal(a, x)
    # each image gets its own crop: the same image repeated is not augmented identically
    rep, _ = _run(aug, x[:1].repeat(4, 1, 1, 1), y[:4], 3)
    assert not torch.equal(rep[0], rep[1])


def test_standard_keeps_most_of_a_centred_digit():
    # scale >= 0.7 of the area: a bright centre square stays (mostly) in view
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out, _ = _run(create_augmentation("standard"), x, torch.eye(64), 0)
    assert (out.sum(dim=(1, 2, 3)) > 0.5 * 64).all()


def _left_heavy(n=200):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 4:24, 4:9] = 1.0
    return x


def _mean_col(batch):
    cols = torch.arange(batch.shape[-1]).float()
    return (batch.sum(dim=(1, 2)) * cols).sum(-1) / batch.sum(dim=(1, 2, 3))


def test_standard_without_flip_never_mirrors():
    # a left-heavy image cropped with scale >= 0.7 stays left-heavy unless it is flipped
    x, y = _left_heavy(), torch.eye(200)
    plain, _ = _run(create_augmentation("standard"), x, y, 0)
    flipped, _ = _run(create_augmentation("standard", flip=True), x, y, 0)
    assert (_mean_col(plain) < 13.5).all()
    assert (_mean_col(flipped) > 13.5).sum() > 50


def test_baselines_run_on_the_standard_step():
    # by default the crop (and flip, where allowed) comes first, as in the papers; crop=False leaves it out
    x, y = _left_heavy(), torch.eye(200)
    flipped, _ = _run(create_augmentation("mixup", flip=True, alpha=1e-3), x, y, 0)
    assert (_mean_col(flipped) > 13.5).sum() > 50
    bare, _ = _run(create_augmentation("noise2net", crop=False, p=0.0), x, y, 0)
    assert torch.equal(bare, x)


def _permutation(y_mixed):
    """For one-hot eye(n) targets mixed with a permutation: the partner of each image (itself if unmixed)."""
    off = y_mixed.clone().fill_diagonal_(0)
    return torch.where(off.sum(1) > 0, off.argmax(1), torch.arange(len(y_mixed)))


@pytest.mark.parametrize("seed", range(4))
def test_mixup_mixes_images_and_targets_with_the_same_weight(seed):
    x, y = _batch(3, 16)
    out, ym = _run(create_augmentation("mixup", crop=False, alpha=1.0), x, y, seed)
    perm = _permutation(ym)
    assert sorted(perm.tolist()) == list(range(len(x)))
    i = int((perm != torch.arange(len(x))).nonzero()[0])
    lam = ym[i, i]
    assert 0 < lam < 1
    assert torch.equal(out, lam * x + (1 - lam) * x[perm])
    assert torch.equal(ym, lam * y + (1 - lam) * y[perm])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("size", [(28, 28), (16, 24)])
def test_cutmix_label_weight_is_the_pasted_area(seed, size):
    g = torch.Generator().manual_seed(0)
    # images that differ everywhere, so the pasted box is exactly where the output changed
    x = (torch.arange(8).view(8, 1, 1, 1) + 0.5 * torch.rand(8, 1, *size, generator=g)) / 8
    y = torch.eye(8)
    out, ym = _run(create_augmentation("cutmix", crop=False), x, y, seed)
    perm = _permutation(ym)
    for i in range(8):
        changed = (out[i] != x[i]).any(0)
        area = changed.sum() / changed.numel()
        if perm[i] == i:
            assert not changed.any()
            continue
        assert ym[i, perm[i]] == area.to(ym.dtype) and ym[i, i] == 1 - area
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if len(rows):  # a rectangle, taken from the partner image
            assert changed.sum() == len(rows) * len(cols)
            assert torch.equal(out[i][:, changed], x[perm[i]][:, changed])


def test_augmix_jsd_returns_clean_and_two_augmented_views():
    aug = create_augmentation("augmix", crop=False, jsd=True)
    x, y = _batch(3, 16)
    out, yo = _run(aug, x, y, 0)
    n = len(x)
    assert out.shape == (3 * n, 3, 16, 16) and torch.equal(yo, y)
    assert torch.equal(out[:n], x)
    assert not torch.equal(out[n:2 * n], out[2 * n:])


def test_jsd_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g)
    same = jsd_loss(logits.repeat(3, 1), 4)
    assert same.shape == () and abs(float(same)) < 1e-6
    assert jsd_loss(torch.randn(12, 10, generator=g), 4) > 1e-3
    # bounded by log 3 (three predictions, each certain of a different class)
    certain = torch.eye(3).repeat_interleave(4, 0) * 100
    assert float(jsd_loss(certain, 4)) == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-4)
    with pytest.raises(ValueError, match="3 x 5"):
        jsd_loss(logits, 5)


def test_noise2net_distorts_the_chosen_images_deterministically():
    x, y = _batch(3, 28, n=16)
    aug = create_augmentation("noise2net", crop=False)
    a, _ = _run(aug, x, y, 0)
    b, _ = _run(aug, x, y, 0)
    assert torch.equal(a, b)
    changed = (a != x).flatten(1).any(1)
    assert 0 < changed.sum() < 16  # about half the batch, as in DeepAugment
    assert (a[changed] - x[changed]).abs().mean() > 0.05
    every, _ = _run(create_augmentation("noise2net", crop=False, p=1.0), x, y, 0)
    assert (every != x).flatten(1).any(1).all()
