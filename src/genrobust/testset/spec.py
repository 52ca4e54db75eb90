"""Build specs: what a test-set version is made of (YAML, generated or study folders, flags), resolved
into the `inputs` a version records and is keyed by (`inputs_sha256`).

A build spec (YAML, read as data):

    classes: ["0", "1", ...]        # default: the sources' classes (the base version's for a derived one)
    quota: 80                       # images per class kept after the filters (default: all)
    real: digits-mnist/test         # the real counterpart `testset evaluate` scores models on
    licence: MIT
    description: ...
    filters: {duplicates: 2, near_copies: 2, reference: [digits-mnist/train], clip_model: DIR, clip_threshold: 20}
    sources:
      - {id: handwritten, generator: digits-ddpm, strategy: label, per_class: 50, seed: 0, params: {steps: 20}}
      - {folder: runs/gen/templates}  # an existing generated folder (any ImageFolder)
    # derived versions only:
    based_on: v1
    remove_classes: ["7"]
    regenerate_classes: ["1"]       # every image of the class replaced by the new sources' images
    remove_images: ["1/handwritten-0001_000003.png"]
"""
import copy
import hashlib
import json
import logging
import pathlib
import re

from . import store

logger = logging.getLogger(__name__)

SPEC_KEYS = ("description", "licence", "citation", "classes", "quota", "real", "filters", "sources", "based_on",
             "remove_classes", "regenerate_classes", "remove_images")
SOURCE_KEYS = ("id", "generator", "strategy", "per_class", "per_image", "seed", "classes", "params", "source",
               "folder")
# Hamming distances of 64-bit pHashes. Measured on digits-mnist (28 px): a test image lies within 2 bits of some
# train image in 1.7% of cases and within 4 bits in 13.1%, so 2 is the default (docs/testsets.md).
FILTER_DEFAULTS = {"duplicates": 2, "near_copies": 2, "reference": [], "clip_model": None, "clip_threshold": None}
# The real counterpart of a set made only by a generator of a known world.
DEFAULT_REAL = {"digits-ddpm": "digits-mnist/test"}
DEFAULT_LICENCE = "unspecified"
SOURCE_STRATEGIES = ("image", "image-label", "captions")  # strategies that start from real images
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- reading ----------------------------------------------------------------------------------------------

def read_spec_file(path):
    """A YAML build spec (read as data, never run)."""
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from {path}: no such file or folder")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--from {path}: not valid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"--from {path}: expected a mapping (a build spec), got {type(cfg).__name__}")
    if "strategies" in cfg and "sources" not in cfg:
        raise ValueError(f"--from {path}: this looks like a study config; a build spec lists sources (see "
                         "docs/testsets.md). To reuse a study's generated images, pass its folder (--from runs/study)")
    unknown = sorted(set(cfg) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"--from {path}: unknown key {unknown[0]!r}; a build spec has {', '.join(SPEC_KEYS)} "
                         "(see docs/testsets.md)")
    return cfg


def _is_imagefolder(path):
    from ..data.folder import IMAGE_SUFFIXES
    return (path / "metadata.jsonl").is_file() or any(
        f.suffix.lower() in IMAGE_SUFFIXES for d in path.iterdir() if d.is_dir() for f in d.iterdir())


def folder_sources(path):
    """`--from DIR`: a generated folder (or any ImageFolder), or a study/quickstart folder whose `generated/`
    cells each become a source."""
    path = pathlib.Path(path)
    if _is_imagefolder(path):
        return [{"folder": str(path)}]
    cells = path / "generated" if (path / "generated").is_dir() else path
    found = sorted(d for d in cells.iterdir() if d.is_dir() and (d / "metadata.jsonl").is_file())
    if not found:
        raise ValueError(f"--from {path}: not a generated folder (metadata.jsonl or class folders of images), nor a "
                         "study folder with generated/*/metadata.jsonl, nor a YAML build spec")
    return [{"folder": str(d)} for d in found]


def read_from(items):
    """Merge `--from` items (YAML specs and folders) into one spec; sources keep their order."""
    spec = {"sources": []}
    for item in items:
        part = {"sources": folder_sources(item)} if pathlib.Path(item).is_dir() else read_spec_file(item)
        for key, value in part.items():
            if key == "sources":
                spec["sources"] += list(value or [])
            elif key in spec and spec[key] != value:
                raise ValueError(f"--from {item}: {key!r} is {value!r}, but an earlier --from set it to {spec[key]!r}")
            else:
                spec[key] = value
    return spec


def merge(spec, overrides):
    """Flags over a spec: top-level keys given replace the spec's; `filters` merge key by key."""
    out = copy.deepcopy(spec)
    for key, value in overrides.items():
        if key == "filters":
            out["filters"] = {**(out.get("filters") or {}), **value}
        elif key == "sources":
            out["sources"] = list(out.get("sources") or []) + list(value)
        else:
            out[key] = value
    return out


# --- resolving ---------------------------------------------------------------------------------------------

def resolve(spec, name, version, base_card=None, classes_of=None):
    """Check a spec and fill in every default: the `inputs` of a version.

    Args:
        base_card: the card of the version named by `based_on` (its inputs are inherited).
        classes_of: `classes_of(source)` -> the class list a generator knows (None: any), used only when the
            spec names no classes.
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"build spec: unknown key {unknown[0]!r}; keys are {', '.join(SPEC_KEYS)}")
    base = (base_card or {}).get("inputs", {})
    if spec.get("based_on") and base_card is None:
        raise ValueError("build spec: based_on needs the base version's card")
    changes = _changes(spec, base_card)
    taken = {s["id"] for s in base.get("sources", [])}
    sources = _ids([_source(s, i) for i, s in enumerate(spec.get("sources") or [])], taken)
    classes = _classes(spec, base_card, changes, sources, classes_of)
    _check_sources(sources, classes, changes, base_card)
    inputs = {"name": name, "version": version,
              "description": _inherit(spec, base, "description", f"A generated test set ({name})."),
              "licence": _inherit(spec, base, "licence", DEFAULT_LICENCE),
              "citation": _inherit(spec, base, "citation", None),
              "classes": classes, "quota": _quota(_inherit(spec, base, "quota", None)),
              "real": _inherit(spec, base, "real", None) or _default_real(sources),
              "filters": _filters(spec, base), "sources": sources,
              "based_on": None if base_card is None else {"version": base_card["version"],
                                                          "content_sha256": base_card["content_sha256"]},
              **changes}
    if not sources and base_card is None:
        raise ValueError(f"{name}/{version}: nothing to build from: give --from (a build spec or generated "
                         "folders) or --strategy/--per-class for one generated source")
    return inputs


def _inherit(spec, base, key, default):
    if spec.get(key) is not None:
        return spec[key]
    return base.get(key, default)


def _quota(q):
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
        raise ValueError(f"quota must be a whole number of images per class >= 1, got {q!r}")
    return q


def _default_real(sources):
    gens = {s.get("generator") for s in sources if s["kind"] == "generator"}
    if len(gens) == 1 and not any(s["kind"] == "folder" for s in sources):
        return DEFAULT_REAL.get(gens.pop())
    return None


def _filters(spec, base):
    given = spec.get("filters") or {}
    unknown = sorted(set(given) - set(FILTER_DEFAULTS))
    if unknown:
        raise ValueError(f"build spec: unknown filter {unknown[0]!r}; filters are {', '.join(FILTER_DEFAULTS)}")
    f = {**FILTER_DEFAULTS, **base.get("filters", {}), **given}
    ref = f["reference"]
    f["reference"] = [ref] if isinstance(ref, str) else list(ref or [])
    for key in ("duplicates", "near_copies"):
        v = f[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64):
            raise ValueError(f"filter {key} is a Hamming distance between 64-bit hashes (0..64) or null (off), "
                             f"got {v!r}")
    if f["clip_threshold"] is not None and f["clip_model"] is None:
        raise ValueError("filter clip_threshold needs clip_model (a local CLIP folder or cached hub id)")
    return f


def _changes(spec, base_card):
    keys = ("remove_classes", "regenerate_classes", "remove_images")
    changes = {k: [str(x) for x in (spec.get(k) or [])] for k in keys}
    if base_card is None:
        used = [k for k in keys if changes[k]]
        if used:
            raise ValueError(f"{used[0]} needs --based-on VERSION (it changes an earlier version)")
        return changes
    for k in ("remove_classes", "regenerate_classes"):
        bad = [c for c in changes[k] if c not in base_card["classes"]]
        if bad:
            raise ValueError(f"{k}: {bad} are not classes of {base_card['name']}/{base_card['version']} "
                             f"({base_card['classes'][:10]}...)")
    both = set(changes["remove_classes"]) & set(changes["regenerate_classes"])
    if both:
        raise ValueError(f"classes {sorted(both)} are both removed and regenerated; choose one")
    missing = [f for f in changes["remove_images"] if f not in base_card["files"]]
    if missing:
        raise ValueError(f"remove_images: {missing[:3]} are not images of {base_card['name']}/{base_card['version']}")
    return changes


def _source(raw, i):
    where = f"source {i + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping (generator, strategy, per_class, ... or folder), got {raw!r}")
    unknown = sorted(set(raw) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(SOURCE_KEYS)}")
    classes = None if raw.get("classes") is None else [str(c) for c in raw["classes"]]
    if "folder" in raw:
        return _folder_source(raw, where, classes)
    return _generator_source(raw, where, classes)


def _folder_source(raw, where, classes):
    from ..data.folder import folder_classes

    extra = sorted(set(raw) - {"folder", "id", "classes"})
    if extra:
        raise ValueError(f"{where}: a folder source takes id and classes only, not {extra[0]!r}")
    folder = pathlib.Path(raw["folder"])
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: no folder {folder}")
    own = folder_classes(folder)
    return {"id": raw.get("id"), "kind": "folder", "folder": str(folder), "classes": classes or own,
            "content_sha256": folder_content_sha256(folder)}


def _generator_source(raw, where, classes):
    from ..generate import GENERATORS, create_strategy

    generator, strategy = raw.get("generator", "digits-ddpm"), raw.get("strategy", "label")
    GENERATORS.get(generator)
    create_strategy(strategy)
    if strategy == "captions":
        raise ValueError(f"{where}: the captions strategy needs a captioner; generate with `genrobust generate "
                         "--strategy captions` and add the folder as a source")
    per_class, per_image = raw.get("per_class"), raw.get("per_image")
    if (per_class is None) == (per_image is None):
        raise ValueError(f"{where}: give exactly one of per_class and per_image (images per class, or per real "
                         "source image)")
    if strategy in SOURCE_STRATEGIES and not raw.get("source"):
        raise ValueError(f"{where}: strategy {strategy!r} starts from real images: give source (e.g. "
                         "digits-mnist/train)")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params is a mapping of generator arguments (steps, guidance, ...), got {params!r}")
    return {"id": raw.get("id"), "kind": "generator", "generator": generator, "strategy": strategy,
            "per_class": per_class, "per_image": per_image, "seed": int(raw.get("seed", 0)),
            "params": dict(sorted(params.items())), "source": raw.get("source"), "classes": classes}


def _ids(sources, taken):
    """Explicit ids are checked; missing ones are made from the strategy and seed (or the folder's name)."""
    seen = set(taken)
    for s in sources:
        if s["id"] is not None:
            if not _ID.match(str(s["id"])):
                raise ValueError(f"source id {s['id']!r}: letters, digits, '.', '_' or '-' only")
            if s["id"] in seen:
                where = "an earlier version" if s["id"] in taken else "another source"
                raise ValueError(f"source id {s['id']!r} is already used by {where}; ids name images, choose "
                                 "another")
            seen.add(s["id"])
    for s in sources:
        if s["id"] is None:
            stem = (re.sub(r"[^A-Za-z0-9._-]+", "-", pathlib.Path(s["folder"]).name).strip("-") or "folder"
                    if s["kind"] == "folder" else f"{s['strategy']}-s{s['seed']}")
            sid, n = stem, 2
            while sid in seen:
                sid, n = f"{stem}-{n}", n + 1
            s["id"] = sid
            seen.add(sid)
    return sources


def _classes(spec, base_card, changes, sources, classes_of):
    """The set's classes: the spec's, else the base's (less removed ones) plus any a source adds."""
    if spec.get("classes"):
        return [str(c) for c in spec["classes"]]
    classes = [] if base_card is None else [c for c in base_card["classes"] if c not in changes["remove_classes"]]
    for s in sources:
        own = s["classes"]
        if own is None and not classes:
            own = classes_of(s) if classes_of else None
            if own is None:
                raise ValueError(f"source {s['id']}: generator {s['generator']!r} takes any class names: give "
                                 "classes (in the spec, or --classes a,b,c)")
        classes += [c for c in own or [] if c not in classes]
    return classes


def _check_sources(sources, classes, changes, base_card):
    for s in sources:
        if s["kind"] == "generator" and s["classes"] is None:
            s["classes"] = list(classes)
        bad = [c for c in s["classes"] if c not in classes]
        if bad and s["kind"] == "generator":
            raise ValueError(f"source {s['id']}: classes {bad} are not classes of the set ({classes[:10]}...)")
    covered = {c for s in sources for c in s["classes"]}
    orphan = [c for c in changes["regenerate_classes"] if c not in covered]
    if orphan:
        raise ValueError(f"regenerate_classes {orphan}: no source generates them; add a source for those classes")
    if base_card is None:
        empty = [c for c in classes if c not in covered]
        if empty:
            raise ValueError(f"classes {empty[:5]} have no source; give a source for them or leave them out")


def folder_content_sha256(folder):
    """A folder source's fingerprint: its labelled images' bytes and names (not its path)."""
    from ..data.folder import list_labelled_files

    folder = pathlib.Path(folder)
    _, _, paths, _ = list_labelled_files(folder)
    lines = "".join(f"{p.relative_to(folder).as_posix()} {store.sha256_file(p)}\n" for p in paths)
    return store.sha256_bytes(lines.encode())


def identity(inputs):
    """The inputs without what differs between machines (a folder source's path: its content hash stays)."""
    out = copy.deepcopy(inputs)
    for s in out["sources"]:
        s.pop("folder", None)
    return out


def inputs_sha256(inputs):
    return hashlib.sha256(json.dumps(identity(inputs), sort_keys=True).encode()).hexdigest()


def source_key(source, filters):
    """The staging folder's key: a source's identity plus the CLIP model that scores it while generating."""
    ident = {k: v for k, v in source.items() if k != "folder"}
    ident["clip_model"] = filters["clip_model"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def differences(old, new):
    """Top-level input keys whose values differ (for the refusal to rebuild a version)."""
    a, b = identity(old), identity(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
