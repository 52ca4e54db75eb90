"""Standalone generated test sets ("ImageNet-G"): build versioned sets from generators and generated folders,
card and verify them, diff versions, benchmark model zoos on them, and load or export them.

    build(name, version, spec)      -> a version folder under the root (store.default_root())
    verify(path) / diff(a, b)       -> hash checks, per-class changes
    benchmark(ref, models)          -> result rows, leaderboard, accuracy-on-the-line plot
    load_testset(ref) / export(ref, out)
"""
from .bench import benchmark, leaderboard
from .builder import build
from .loader import GeneratedTestSet, export, load_testset
from .store import default_root, diff, list_testsets, resolve, verify

__all__ = ["GeneratedTestSet", "benchmark", "build", "default_root", "diff", "export", "leaderboard",
           "list_testsets", "load_testset", "resolve", "verify"]
