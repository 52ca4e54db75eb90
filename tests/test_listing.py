"""Folder listings: names only (no image opened), cached on disk, re-listed when a folder changes, scanned once
when several processes start together; and planning a paper-scale study never opens an image."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from genrobust.data import listing as lst
from genrobust.data.listing import list_folder

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def _age(root, seconds=60):
    """Move every directory's mtime into the past: fresh ones are "racy" and never trusted from the cache."""
    past = time.time() - seconds
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(d, (past, past))


def _tree(root):
    """A hand-made ImageFolder: suffixes in both cases, hidden files and folders, a non-image, `shards/`."""
    files = {"b/x.JPEG": b"j", "b/y.jpeg": b"j", "b/z.Png": b"p", "b/.hidden.png": b"h", "b/notes.txt": b"t",
             "a/2.png": b"p", "a/1.jpg": b"j", "a/sub.png/inner.png": b"nested", ".git/c.png": b"h",
             "shards/rank0.png": b"s", "c/readme.md": b"no images in this class"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "top.png").write_bytes(b"a file at the root is no class")
    _age(root)
    return root


def test_listing_is_exact(tmp_path):
    root = _tree(tmp_path / "f")
    got = list_folder(root, cache_dir=tmp_path / "cache")
    assert got.classes == ["a", "b", "c"]  # an empty class folder is still a class, as in torchvision
    assert got.files == ["a/1.jpg", "a/2.png", "b/x.JPEG", "b/y.jpeg", "b/z.Png"]
    assert got.labels == [0, 0, 1, 1, 1] and len(got) == 5 and got.rows is None and got.channels is None
    assert got.counts() == {"a": 2, "b": 3, "c": 0}
    assert got.paths()[0] == f"{root.resolve()}/a/1.jpg"


def test_card_and_manifest_are_honoured(tmp_path):
    root = _tree(tmp_path / "f")
    (root / "dataset_card.json").write_text(json.dumps({"classes": ["b", "a", "c"], "channels": 1}))
    got = list_folder(root, cache_dir=tmp_path / "cache")
    assert got.classes == ["b", "a", "c"] and got.labels == [1, 1, 0, 0, 0] and got.channels == 1
    rows = [{"file_name": "b/x.JPEG", "class_name": "b", "seed": 3}, {"file_name": "a/gone.png", "class_name": "a"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = list_folder(root, cache_dir=tmp_path / "cache")
    # a listed file that is gone is not stat-ed here: it is found where it is decoded
    assert got.rows == rows and got.files == ["b/x.JPEG", "a/gone.png"] and got.labels == [0, 1]


def test_listing_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_folder(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images in class folders"):
        list_folder(tmp_path / "empty", cache_dir=tmp_path / "cache")
    root = _tree(tmp_path / "f")
    (root / "dataset_card.json").write_text(json.dumps({"classes": ["a"]}))
    with pytest.raises(ValueError, match=r"image b/x.JPEG has class 'b', not in the folder's classes"):
        list_folder(root, cache_dir=tmp_path / "cache")


def _count_scandir(monkeypatch):
    calls = []
    real = os.scandir

    def counting(path="."):
        calls.append(pathlib.Path(path).name)
        return real(path)

    monkeypatch.setattr(lst.os, "scandir", counting)
    return calls


def test_second_listing_comes_from_the_cache(tmp_path, monkeypatch):
    root = _tree(tmp_path / "f")
    first = list_folder(root, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1 and not list(root.rglob("*.lock"))
    calls = _count_scandir(monkeypatch)
    again = list_folder(root, cache_dir=tmp_path / "cache")
    assert calls == ["f"]  # the root's own entries only (to see class folders come and go); no class is scanned
    assert (again.files, again.labels, again.classes) == (first.files, first.labels, first.classes)


def test_a_changed_folder_is_listed_again(tmp_path, monkeypatch):
    root = _tree(tmp_path / "f")
    cache = tmp_path / "cache"
    list_folder(root, cache_dir=cache)
    calls = _count_scandir(monkeypatch)
    (root / "b" / "new.jpg").write_bytes(b"j")
    (root / "a" / "1.jpg").unlink()
    assert list_folder(root, cache_dir=cache).files == ["a/2.png", "b/new.jpg", "b/x.JPEG", "b/y.jpeg", "b/z.Png"]
    assert sorted(calls) == ["a", "b", "f"]  # only the changed class folders
    (root / "d").mkdir()
    (root / "d" / "q.webp").write_bytes(b"w")
    assert list_folder(root, cache_dir=cache).files[-1] == "d/q.webp"
    # just changed, so not trusted yet: a file added within the same timestamp tick is still seen
    (root / "d" / "r.webp").write_bytes(b"w")
    assert list_folder(root, cache_dir=cache).files[-2:] == ["d/q.webp", "d/r.webp"]


def test_unusable_cache_folder_only_disables_the_cache(tmp_path):
    root = _tree(tmp_path / "f")
    (tmp_path / "file").write_text("not a folder")
    assert list_folder(root, cache_dir=tmp_path / "file" / "cache").files[0] == "a/1.jpg"


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("GENROBUST_CACHE", str(tmp_path / "c"))
    assert lst.default_cache_dir() == tmp_path / "c" / "listings"
    monkeypatch.delenv("GENROBUST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert lst.default_cache_dir() == tmp_path / "x" / "genrobust" / "listings"


# Each process counts the class folders it scans (os.scandir wrapped in the child, nothing in the library),
# and every class scan is slowed down so that the processes really overlap.
CHILD = textwrap.dedent("""
    import json, os, pathlib, sys, time
    from genrobust.data import listing
    root, cache, go, out = map(pathlib.Path, sys.argv[1:5])
    real, scanned = os.scandir, []
    def slow(path="."):
        if pathlib.Path(path).parent == root.resolve():
            scanned.append(pathlib.Path(path).name)
            time.sleep(0.05)
        return real(path)
    listing.os.scandir = slow
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.005)
    started = time.time()
    got = listing.list_folder(root, cache_dir=cache)
    out.write_text(json.dumps({"scanned": scanned, "n": len(got), "files": got.files[:3],
                               "started": started, "ended": time.time()}))
""")


def test_processes_starting_together_scan_a_folder_once(tmp_path):
    root = tmp_path / "f"
    classes = [f"n{i:08d}" for i in range(20)]
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{c}_{i}.JPEG").write_bytes(b"not decoded")
    _age(root)
    go, n = tmp_path / "go", 4
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1] / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, root, tmp_path / "cache", go, tmp_path / f"out{i}"],
                              env=env) for i in range(n)]
    deadline = time.time() + 120
    while not all((tmp_path / f"out{i}.ready").exists() for i in range(n)) and time.time() < deadline:
        time.sleep(0.05)  # every child imported (torch takes seconds) and waits at the start line
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * n
    outs = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(n)]
    assert all(o["n"] == 100 and o["files"] == [f"{classes[0]}/{classes[0]}_{i}.JPEG" for i in range(3)]
               for o in outs)
    scans = sorted(c for o in outs for c in o["scanned"])
    assert scans == classes  # each class folder scanned once, by one process, for all four
    # the listing took >= 1 s (20 slowed scans) and every process had started before the first one ended
    assert max(o["started"] for o in outs) < min(o["ended"] for o in outs)


# --- planning never opens an image --------------------------------------------------------------------

def test_planning_a_paper_study_never_opens_an_image(tmp_path, monkeypatch):
    """An ImageNet-shaped tree of files that are not images at all: resolving the study, computing its cells and
    the dry run list names only."""
    import PIL.Image

    from genrobust import evaluate as ev
    from genrobust.study import load_study, plan, run_study

    data = tmp_path / "data"
    wnids = ev.reference("imagenet100_wnids.json")["wnids"]
    for j, w in enumerate(wnids):
        for train in ("imagenet100/train", "retrieval/imagenet100"):
            (data / train / w).mkdir(parents=True)
            for i in range(3 + j % 2):
                (data / train / w / f"{w}_{i}.JPEG").write_bytes(os.urandom(16))
    monkeypatch.setenv("GENROBUST_DATA", str(data))

    def refuse(*args, **kwargs):
        raise AssertionError(f"an image was opened while planning: {args[:1]}")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    cfg = load_study(CONFIGS / "imagenet100-study.yaml")
    assert cfg["num_real"] == 350 and cfg["classes"] == sorted(wnids)
    cells = plan(cfg, tmp_path / "out")
    assert {c.kind for c in cells} == {"generation", "training"}
    lines = []
    run_study(cfg, tmp_path / "out", dry_run=True, echo=lines.append)
    assert f"{len(cells)} cells" in lines[-1]
