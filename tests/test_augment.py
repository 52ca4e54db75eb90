import pytest
import torch

from genrobust.augment import AUGMENTATIONS, create_augmentation, list_augmentations

CASES = [(name, {}) for name in list_augmentations()] + [("standard", {"flip": True})]


def _batch(channels=1, size=28):
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, channels, size, size, generator=g)


def test_registered_augmentations():
    assert list_augmentations() == ["none", "standard"]
    assert all(AUGMENTATIONS.info(n)["description"] for n in list_augmentations())


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 16)])
def test_shape_dtype_range_and_seed(name, kwargs, channels, size):
    aug = create_augmentation(name, **kwargs)
    x = _batch(channels, size)
    before = x.clone()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert torch.equal(x, before)  # the input batch is not modified in place


def test_none_is_the_identity():
    x = _batch()
    assert torch.equal(create_augmentation("none")(x, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("kwargs", [{}, {"flip": True}])
def test_standard_depends_on_the_seed(kwargs):
    aug = create_augmentation("standard", **kwargs)
    x = _batch()
    a = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    # each image gets its own crop: the same image repeated is not augmented identically
    rep = aug(x[:1].repeat(4, 1, 1, 1), torch.Generator().manual_seed(3))
    assert not torch.equal(rep[0], rep[1])


def test_standard_keeps_most_of_a_centred_digit():
    # scale >= 0.7 of the area: a bright centre square stays (mostly) in view
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out = create_augmentation("standard")(x, torch.Generator().manual_seed(0))
    assert (out.sum(dim=(1, 2, 3)) > 0.5 * 64).all()


def test_standard_without_flip_never_mirrors():
    # a left-heavy image cropped with scale >= 0.7 stays left-heavy unless it is flipped
    x = torch.zeros(200, 1, 28, 28)
    x[:, :, 4:24, 4:9] = 1.0
    cols = torch.arange(28).float()

    def mean_col(batch):
        return (batch.sum(dim=(1, 2)) * cols).sum(-1) / batch.sum(dim=(1, 2, 3))

    plain = create_augmentation("standard")(x, torch.Generator().manual_seed(0))
    flipped = create_augmentation("standard", flip=True)(x, torch.Generator().manual_seed(0))
    assert (mean_col(plain) < 13.5).all()
    assert (mean_col(flipped) > 13.5).sum() > 50
