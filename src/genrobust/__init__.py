"""genrobust: make image classifiers robust with generated data, and measure whether they are."""
__version__ = "0.1.0"


def load_testset(path, transform=None, root=None, verify=False):
    """A generated test-set version as a torch Dataset of (image, label); see genrobust.testset.load_testset."""
    from .testset import load_testset as load  # torch loads only when a test set is

    return load(path, transform=transform, root=root, verify=verify)
