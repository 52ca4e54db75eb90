"""Plain file I/O every stage shares: atomic writes (a killed writer never leaves a half file) and JSON lines."""
import json
import os
import pathlib


def atomic_write_bytes(path, data):
    """Write to a temp file beside `path`, then rename: a killed writer never leaves a half file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path):
    path = pathlib.Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); fix or delete that line") from None
    return rows
