"""What an ImageFolder holds, from file names alone: a plan never opens an image.

`list_folder(root)` returns a `Listing` (classes, relative file names, labels, manifest rows or None, the
card's channel count). A folder with `metadata.jsonl` is listed from it (one file read). A folder without one
is scanned with `os.scandir` only (no image is opened, no file is stat-ed) and the scan is cached on disk,
outside the data folder (ImageNet is often read-only):

- location: `$GENROBUST_CACHE/listings/`, else `$XDG_CACHE_HOME/genrobust/listings/` (`~/.cache/...`); one
  JSON entry per folder, named by the sha256 of its resolved path. Safe to delete at any time.
- key: each class directory's (mtime_ns, size, inode). Adding, removing or renaming a file changes its
  directory's mtime, so only the changed class directories are scanned again; a class directory added or
  removed is seen from the root's own listing (one scandir of ~1,000 entries, done on every call).
  A directory modified less than `RACY_NS` before it was scanned may change again within the same timestamp
  tick: its entry is not trusted and it is rescanned until it is older (git's "racy" rule).
- concurrency: whoever must scan takes an exclusive `fcntl.flock` on `<entry>.lock` first and reads the
  entry again once it holds the lock; eight ranks or study cells starting together on one folder wait for the
  first, then read its listing. Under torchrun this is "the ranks use one rank's listing" without a process
  group. flock works across the processes of one machine, and across machines only where the cache folder is
  on a file system with working locks (NFSv4, Lustre with flock); point `$GENROBUST_CACHE` there to share it
  between nodes, else each node lists once.
- a file that is listed and then deleted is found where it is decoded (counted against `--max-corrupt` while
  streaming), never by stat-ing 1.28 M files at plan time.
"""
import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib
import time

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 2
# Timestamps are coarse (a few ms on ext4, 1-2 s on some network file systems): a directory changed this
# close to its scan might change again without its mtime moving.
RACY_NS = 2_000_000_000


def default_cache_dir():
    """`$GENROBUST_CACHE/listings`, else `$XDG_CACHE_HOME/genrobust/listings` (`~/.cache/genrobust/listings`)."""
    if os.environ.get("GENROBUST_CACHE"):
        return pathlib.Path(os.environ["GENROBUST_CACHE"]) / "listings"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "genrobust" / "listings"


class Listing:
    """An ImageFolder by names: classes, files relative to `root` (posix), labels into `classes`.

    `rows` are the manifest rows when the folder has `metadata.jsonl` (else None); `channels` is the card's
    "channels" (None when the card does not say).
    """

    def __init__(self, root, classes, dirs=None, rows=None, channels=None):
        self.root, self.classes, self.rows, self.channels = pathlib.Path(root), list(classes), rows, channels
        # [(class directory, its sorted image names joined by newlines)] when listed from the directories:
        # a plan only counts them, and 1.28 M str objects would cost a quarter second it does not need
        self._dirs = dirs

    def __len__(self):
        return len(self.rows) if self.rows is not None else sum(_count(t) for _, t in self._dirs)

    @functools.cached_property
    def files(self):
        if self.rows is not None:
            return [r["file_name"] for r in self.rows]
        return [f"{d}/{n}" for d, t in self._dirs if t for n in t.split("\n")]

    @functools.cached_property
    def labels(self):
        index = {c: i for i, c in enumerate(self.classes)}
        if self.rows is not None:
            return [index[_row_class(r)] for r in self.rows]
        return [y for d, t in self._dirs for y in [index[d]] * _count(t)]

    def paths(self):
        """Absolute paths as strings (1.28 M `Path` objects would cost seconds and hundreds of MB)."""
        root = str(self.root)
        return [f"{root}/{f}" for f in self.files]

    def counts(self):
        """Images per class name."""
        out = dict.fromkeys(self.classes, 0)
        if self.rows is not None:
            for r in self.rows:
                out[_row_class(r)] += 1
        else:
            for d, t in self._dirs:
                out[d] += _count(t)
        return out


def _count(names):
    return names.count("\n") + 1 if names else 0


def _row_class(row):
    return row.get("class_name") or pathlib.PurePosixPath(row["file_name"]).parent.name


def _is_class_dir(entry):
    return not entry.name.startswith(".") and entry.name != "shards" and entry.is_dir()


def class_dirs(root):
    """The class directories of a folder, sorted: hidden entries and the runner's `shards/` are not classes."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if _is_class_dir(e))


def scan_class_dir(path):
    """Sorted image names in one class directory: suffix (any case) and directory entry type only.

    A name with a newline in it is left out: cached listings are newline-separated."""
    names = []
    with os.scandir(path) as it:
        for e in it:
            n = e.name
            if (not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES and "\n" not in n
                    and e.is_file()):
                names.append(n)
    names.sort()
    return names


def read_card(root):
    path = pathlib.Path(root) / "dataset_card.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); fix or delete it") from None


def resolve_classes(root, card=None, rows=None, dirs=None):
    """Class names of a folder: the card's list, else the manifest's ids, else the sorted class folders."""
    card = read_card(root) if card is None else card
    if card.get("classes"):
        return list(card["classes"])
    if rows is None and (pathlib.Path(root) / "metadata.jsonl").exists():
        from .files import read_jsonl
        rows = read_jsonl(pathlib.Path(root) / "metadata.jsonl")
    if rows:
        by_id = {int(r["class_id"]): r["class_name"] for r in rows if "class_id" in r}
        if by_id and sorted(by_id) == list(range(len(by_id))):
            return [by_id[i] for i in range(len(by_id))]
    return list(class_dirs(root) if dirs is None else dirs)


def list_folder(root, cache_dir=None):
    """List an ImageFolder (`<root>/<class>/<image>`, or the files its `metadata.jsonl` names) without
    opening an image; the directory scan is cached (see the module docstring).

    Args:
        cache_dir: where listings are cached (default `default_cache_dir()`); an unwritable one only
            disables the cache.
    Raises FileNotFoundError for a missing folder, ValueError for one without images or with an image of a
    class the folder's card does not list.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}; give an ImageFolder (<root>/<class>/<image>)")
    root = root.resolve()
    card = read_card(root)
    meta = root / "metadata.jsonl"
    if meta.exists():
        from .files import read_jsonl
        rows = read_jsonl(meta)
        listing = Listing(root, resolve_classes(root, card, rows), rows=rows, channels=card.get("channels"))
        unknown = [r for r in rows if _row_class(r) not in set(listing.classes)]
        if unknown:
            r = unknown[0]
            raise ValueError(f"{root}: image {r['file_name']} has class {_row_class(r)!r}, not in the folder's "
                             "classes")
    else:
        dirs = class_dirs(root)
        scanned = _scan_cached(root, dirs, default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir))
        listing = Listing(root, resolve_classes(root, card, dirs=dirs), dirs=scanned, channels=card.get("channels"))
        known = set(listing.classes)
        for d, names in scanned:
            if names and d not in known:
                raise ValueError(f"{root}: image {d}/{names.split(chr(10))[0]} has class {d!r}, not in the "
                                 "folder's classes")
    if not len(listing):
        raise ValueError(f"{root} holds no images in class folders; expected <root>/<class>/<image>.png "
                         "(an ImageFolder)")
    return listing


# --- the cached scan ---------------------------------------------------------------------------------

def _stamp(st):
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _entry_path(cache_dir, root):
    return cache_dir / f"{hashlib.sha256(str(root).encode()).hexdigest()}.json"


def _read_entry(path, root):
    """{class dir: [stamp, racy, names joined by newlines]} from a cache entry; {} when absent, unreadable or
    not this root's.

    An entry is one JSON object, each class's names one string: 1.28 M names load in ~0.1 s (as 1.28 M
    JSON strings, ~0.4 s)."""
    try:
        with open(path, "rb") as f:
            entry = json.loads(f.read())
        if entry.get("version") != CACHE_VERSION or entry.get("root") != str(root):
            return {}
        return {d: v for d, v in entry["dirs"].items() if isinstance(v[2], str)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError):  # unreadable, or another kind
        return {}


def _fresh(cached, d, stamp):
    c = cached.get(d)
    return c is not None and not c[1] and c[0] == stamp


@contextlib.contextmanager
def _locked(path):
    """An exclusive flock on `path` (None when the cache folder cannot hold one: then no lock, no cache)."""
    import fcntl
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        logger.warning("cannot use the listing cache %s (%s); listing without it", path.parent, e)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on a file system without locks: list anyway
            logger.warning("cannot lock %s (%s); other processes may list the same folder", path, e)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _scan_cached(root, dirs, cache_dir):
    """[(class dir, its sorted names joined by newlines)] for `dirs`, from the cache where each directory's
    stamp still matches."""
    entry = _entry_path(cache_dir, root)
    stamps = {d: _stamp(os.stat(root / d)) for d in dirs}
    cached = _read_entry(entry, root)
    if all(_fresh(cached, d, stamps[d]) for d in dirs):
        return [(d, cached[d][2]) for d in dirs]
    with _locked(entry.with_suffix(".lock")) as usable:
        cached = _read_entry(entry, root) if usable else {}  # another process may have listed meanwhile
        out, rescanned = {}, 0
        for d in dirs:
            if _fresh(cached, d, stamps[d]):
                out[d] = cached[d]
                continue
            # stat before the scan: a file added during the scan moves the mtime past the stored one
            now, st = time.time_ns(), os.stat(root / d)
            out[d] = [_stamp(st), now - st.st_mtime_ns < RACY_NS, "\n".join(scan_class_dir(root / d))]
            rescanned += 1
        logger.debug("%s: scanned %d of %d class folders", root, rescanned, len(dirs))
        if usable:
            _write_entry(entry, {"version": CACHE_VERSION, "root": str(root), "dirs": out})
    return [(d, out[d][2]) for d in dirs]


def _write_entry(path, entry):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(entry, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("cannot write the listing cache %s (%s); the next run lists the folder again", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
