"""Helpers shared by test files (pytest puts this folder on sys.path)."""
import torch

from genrobust.cli import main
from genrobust.data import load_dataset


def fails(capsys, argv):
    """Run the CLI expecting a clean failure; return its one error line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("genrobust: error:")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").endswith(lines[0])  # the message is one line, and the last one
    return lines[0]


def digits_subset(per_class=4, split="digits-mnist/train"):
    """The first `per_class` images of each digit of a split."""
    data = load_dataset(split)
    idx = [i for c in range(10) for i in torch.nonzero(data.labels == c).flatten()[:per_class].tolist()]
    return data.subset(idx, name=f"{split}[:{10 * per_class}]")
