"""Where test sets live and what a built version is: the root folder, names, cards, the sha256 of every
file, `verify` and `diff`.

Layout: `<root>/<NAME>/<VERSION>/` is one immutable version (an ImageFolder with `metadata.jsonl`, `card.json`,
`README.md`, `filtered.jsonl`, and `CHANGELOG.md` when derived from another version); `<root>/<NAME>/
.<VERSION>.partial/` holds a build in progress; `<root>/<NAME>/evaluations/<VERSION>/` holds benchmark results.
"""
import hashlib
import json
import os
import pathlib
import re
import stat

ROOT_ENV = "GENROBUST_TESTSETS"
DEFAULT_ROOT = "runs/testsets"
CARD = "card.json"
METADATA = "metadata.jsonl"
README = "README.md"
CHANGELOG = "CHANGELOG.md"
FILTERED = "filtered.jsonl"
EVALUATIONS = "evaluations"
FORMAT = "genrobust-testset/1"
# The files that are the data: their hashes make `content_sha256`, the fingerprint a citation names.
# README/CHANGELOG/filtered.jsonl are listed in the card too, but rewording them does not change the data.
DOC_FILES = (README, CHANGELOG, FILTERED)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_root():
    """`$GENROBUST_TESTSETS`, else `runs/testsets` (relative to the current folder)."""
    return pathlib.Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def check_name(text, what):
    """Names and versions become folder names: letters, digits, `.`, `_`, `-`, starting alphanumeric."""
    if not isinstance(text, str) or not _NAME.match(text):
        raise ValueError(f"{what} {text!r} must be letters, digits, '.', '_' or '-', starting with a letter or digit")
    if what == "version" and text == EVALUATIONS:
        raise ValueError(f"version {text!r} is reserved for benchmark results; choose another (e.g. v1)")
    return text


def version_key(version):
    """Natural order: v2 < v10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def versions(root, name):
    """Built versions of a test set, oldest first."""
    folder = pathlib.Path(root) / name
    if not folder.is_dir():
        return []
    return sorted((d.name for d in folder.iterdir() if (d / CARD).is_file()), key=version_key)


def list_testsets(root=None):
    """{name: [versions]} of every test set under the root (partial builds are not versions)."""
    root = pathlib.Path(root) if root else default_root()
    if not root.is_dir():
        return {}
    return {d.name: versions(root, d.name) for d in sorted(root.iterdir()) if d.is_dir() and versions(root, d.name)}


def resolve(ref, root=None):
    """The folder of a version: `ref` is a version folder, `NAME/VERSION`, or `NAME` (its latest version)."""
    path = pathlib.Path(ref)
    if (path / CARD).is_file():
        return path
    root = pathlib.Path(root) if root else default_root()
    name, _, version = str(ref).partition("/")
    built = versions(root, name)
    if not built:
        raise FileNotFoundError(f"no test set {ref!r}: not a version folder, and {root / name} holds no built "
                                f"version (build one with `genrobust testset build {name} --version v1 ...`, or "
                                "pass --root)")
    version = version or built[-1]
    if version not in built:
        raise FileNotFoundError(f"test set {name} has no version {version!r} under {root}; built: {', '.join(built)}")
    return root / name / version


def read_card(path):
    return json.loads((pathlib.Path(path) / CARD).read_text())


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder):
    """{relative POSIX path: sha256} of every file in a version folder except `card.json` (it holds them)."""
    folder = pathlib.Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != CARD}


def content_sha256(files):
    """One fingerprint of the data (images and metadata.jsonl) from their hashes; docs files left out."""
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()) if name not in DOC_FILES)
    return sha256_bytes(lines.encode())


def make_read_only(folder):
    """Clear the write bits of every file: a built version is not edited in place by accident."""
    for p in pathlib.Path(folder).rglob("*"):
        if p.is_file():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def verify(path):
    """Recheck a version against its card: every listed file's sha256, files missing or not listed, and the
    card's content fingerprint. Returns {"checked", "changed", "missing", "extra", "fingerprint_ok", "ok"}."""
    path = pathlib.Path(path)
    card = read_card(path)
    listed, actual = card["files"], file_hashes(path)
    result = {"checked": len(listed),
              "changed": sorted(f for f in listed if f in actual and actual[f] != listed[f]),
              "missing": sorted(f for f in listed if f not in actual),
              "extra": sorted(f for f in actual if f not in listed),
              "fingerprint_ok": content_sha256(listed) == card.get("content_sha256")}
    result["ok"] = result["fingerprint_ok"] and not (result["changed"] or result["missing"] or result["extra"])
    return result


def describe_problems(path, result, limit=5):
    """One line naming what `verify` found wrong."""
    parts = []
    for key in ("changed", "missing", "extra"):
        files = result[key]
        if files:
            more = f" and {len(files) - limit} more" if len(files) > limit else ""
            parts.append(f"{len(files)} {key} ({', '.join(files[:limit])}{more})")
    if not result["fingerprint_ok"]:
        parts.append("the card's file list does not match its content_sha256 (card.json edited?)")
    return f"{path}: " + "; ".join(parts)


def check_intact(path):
    """Raise unless the version verifies (before deriving from it or exporting it)."""
    result = verify(path)
    if not result["ok"]:
        raise ValueError(describe_problems(path, result) + "; a version must match its card.json (restore the "
                         "files, or rebuild the version under a new name)")
    return result


# --- diff --------------------------------------------------------------------------------------------------

def diff_rows(old_rows, old_classes, new_rows, new_classes):
    """Per-class changes between two versions' metadata rows, matching images by file name and sha256.

    A class is `added` or `removed` when only one version has it, `regenerated` when none of its images was
    kept but new ones were added, `changed` when some were, else `unchanged`.
    """
    def by_class(rows):
        out = {}
        for r in rows:
            out.setdefault(r["class_name"], {})[r["file_name"]] = r["sha256"]
        return out

    old, new = by_class(old_rows), by_class(new_rows)
    classes = list(dict.fromkeys([*old_classes, *new_classes]))
    per_class, total = {}, dict.fromkeys(("before", "after", "kept", "added", "removed", "changed"), 0)
    for c in classes:
        o, n = old.get(c, {}), new.get(c, {})
        entry = {"before": len(o), "after": len(n),
                 "kept": sum(1 for f in o if n.get(f) == o[f]),
                 "added": sum(1 for f in n if f not in o), "removed": sum(1 for f in o if f not in n),
                 "changed": sum(1 for f in o if f in n and n[f] != o[f])}
        entry["status"] = _status(c, entry, old_classes, new_classes)
        per_class[c] = entry
        for k in total:
            total[k] += entry[k]
    return {"classes_added": [c for c in new_classes if c not in old_classes],
            "classes_removed": [c for c in old_classes if c not in new_classes],
            "per_class": per_class, "total": total}


def _status(c, e, old_classes, new_classes):
    if c not in old_classes:
        return "added"
    if c not in new_classes:
        return "removed"
    if e["kept"] == 0 and e["before"] and (e["added"] or e["changed"]):
        return "regenerated"
    return "changed" if e["added"] or e["removed"] or e["changed"] else "unchanged"


def diff(old_path, new_path):
    """`diff_rows` of two version folders, with their names."""
    from ..data.folder import read_jsonl

    a, b = pathlib.Path(old_path), pathlib.Path(new_path)
    ca, cb = read_card(a), read_card(b)
    out = diff_rows(read_jsonl(a / METADATA), ca["classes"], read_jsonl(b / METADATA), cb["classes"])
    return {"old": f"{ca['name']}/{ca['version']}", "new": f"{cb['name']}/{cb['version']}", **out}


def diff_table(d):
    """The per-class diff as a markdown table (the CHANGELOG's and `genrobust testset diff`'s)."""
    lines = ["| class | status | before | removed | added | changed | after |", "|---|---|---:|---:|---:|---:|---:|"]
    for c, e in d["per_class"].items():
        lines.append(f"| {c} | {e['status']} | {e['before']} | {e['removed']} | {e['added']} | {e['changed']} | "
                     f"{e['after']} |")
    t = d["total"]
    lines.append(f"| **total** | | {t['before']} | {t['removed']} | {t['added']} | {t['changed']} | {t['after']} |")
    return "\n".join(lines) + "\n"
