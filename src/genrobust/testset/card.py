"""The card of a version: `card.json` (what made it, what the filters did, the sha256 of every file, how to
cite it), its human-readable `README.md` (with the Hugging Face dataset-card header) and, for a derived
version, `CHANGELOG.md`."""
import json

from . import phash, store

# The method this toolkit follows, which introduced ImageNet-G-v1 (an evolving generated test set).
PAPER_BIBTEX = """@article{bansal2023leaving,
  title   = {Leaving Reality to Imagination: Robust Classification via Generated Datasets},
  author  = {Bansal, Hritik and Grover, Aditya},
  journal = {arXiv preprint arXiv:2302.02503},
  year    = {2023}
}"""
# Licence names the Hugging Face Hub knows; anything else is written as `other` with its name.
HF_LICENCES = {"mit", "apache-2.0", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
               "cc-by-nc-sa-4.0", "openrail", "creativeml-openrail-m", "unknown"}
REASON_TEXT = {"removed": "removed by the spec", "clip": "CLIP score under the threshold",
               "near_copy": "near-copy of a reference image", "duplicate": "duplicate within the set",
               "quota": "over the per-class quota"}


def left_out_counts(cands, classes):
    """{reason: {class: images}} of the candidates left out, classes in the set's order."""
    order = {c: i for i, c in enumerate(classes)}
    out = {}
    for c in sorted(cands, key=lambda c: order.get(c.row["class_name"], len(order))):
        if c.reason is not None:
            per = out.setdefault(c.reason, {})
            per[c.row["class_name"]] = per.get(c.row["class_name"], 0) + 1
    return out


def make_card(inputs, key, rows, staged, base_card, cands, report, changes, started):
    """card.json's content (without `files` and `content_sha256`, added once the files are written)."""
    from .. import __version__

    counts = dict.fromkeys(inputs["classes"], 0)
    for r in rows:
        counts[r["class_name"]] += 1
    left = left_out_counts(cands, inputs["classes"])
    card = {"format": store.FORMAT, "name": inputs["name"], "version": inputs["version"],
            "description": inputs["description"], "licence": inputs["licence"],
            "created": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "genrobust_version": __version__,
            "based_on": inputs["based_on"], "inputs_sha256": key, "real": inputs["real"],
            "classes": list(inputs["classes"]), "num_images": len(rows), "counts": counts,
            "sources": _sources(inputs, staged, base_card, cands, rows),
            "filters": _filters(inputs, left, report), "inputs": inputs}
    if changes is not None:
        card["changes"] = {**changes, "remove_classes": inputs["remove_classes"],
                           "regenerate_classes": inputs["regenerate_classes"],
                           "remove_images": len(inputs["remove_images"]),
                           "new_sources": [s["id"] for s in inputs["sources"]],
                           "left_out_from_base": _base_left_out(cands)}
    return card


def _sources(inputs, staged, base_card, cands, rows):
    """Every source whose images are in the version: the base version's, then the new ones."""
    per = {}
    for c in cands:
        e = per.setdefault(c.row["source"], {"candidates": 0, "kept": 0, "left_out": {}})
        e["candidates"] += 1
        if c.reason is None:
            e["kept"] += 1
        else:
            e["left_out"][c.reason] = e["left_out"].get(c.reason, 0) + 1
    out = []
    for s in (base_card or {}).get("sources", []):
        if s["id"] in per:
            out.append({**s, **per[s["id"]]})
    for st in staged:
        out.append({**_source_record(st, rows), **per.get(st.source["id"], {"candidates": 0, "kept": 0,
                                                                             "left_out": {}})})
    return out


def _source_record(st, rows):
    s = st.source
    rec = {"id": s["id"], "kind": s["kind"], "added_in": None, "classes": s["classes"],
           "distinct_prompts": len({r.get("prompt") for r in st.rows if r.get("prompt")})}
    if s["kind"] == "generator":
        g = st.generator
        rec.update(generator=s["generator"], revision=g["revision"], strategy=s["strategy"], seed=s["seed"],
                   per_class=s["per_class"], per_image=s["per_image"], source=s["source"], params=s["params"],
                   generator_config=g["config"], generation=g["generation"], prompt_templates=g["prompt_templates"],
                   quality_control=st.card.get("quality_control", {}))
    else:
        c = st.card
        rec.update(folder=s["folder"], content_sha256=s["content_sha256"], generator=c.get("generator"),
                   revision=(c.get("generation") or {}).get("revision"), strategy=c.get("strategy"),
                   seed=c.get("seed"), quality_control=c.get("quality_control", {}))
    rec["added_in"] = next((r["added_in"] for r in rows if r["source"] == s["id"]), None)
    return rec


def _filters(inputs, left, report):
    f = inputs["filters"]
    out = {"hash": phash.NAME, "order": ["clip", "near_copies", "duplicates", "quota"]}
    out["clip"] = None if not f["clip_model"] else {
        "model": f["clip_model"], "threshold": f["clip_threshold"], "prompt": "a photo of a {class}.",
        "left_out": left.get("clip", {})}
    out["near_copies"] = None if not f["reference"] or f["near_copies"] is None else {
        "reference": f["reference"], "max_distance": f["near_copies"],
        "reference_images": report.get("reference_images", {}), "left_out": left.get("near_copy", {})}
    out["duplicates"] = None if f["duplicates"] is None else {"max_distance": f["duplicates"],
                                                              "left_out": left.get("duplicate", {})}
    out["quota"] = {"per_class": inputs["quota"], "left_out": left.get("quota", {}), "short": report.get("short", {})}
    if left.get("removed"):
        out["removed_by_spec"] = left["removed"]
    if report.get("outside_classes"):
        out["outside_classes"] = report["outside_classes"]
    return out


def _base_left_out(cands):
    out = {}
    for c in cands:
        if c.base and c.reason is not None:
            out[c.reason] = out.get(c.reason, 0) + 1
    return out


def citation(card):
    """(one-line text, BibTeX) for a version; a spec's own `citation` replaces the set's entry."""
    ref = f"{card['name']} {card['version']}"
    text = (f"{ref} (content sha256 {card['content_sha256'][:16]}), a generated test set built with genrobust "
            f"{card['genrobust_version']}, following Bansal & Grover (2023).")
    key = "".join(ch if ch.isalnum() else "_" for ch in ref)
    own = card["inputs"].get("citation") or (
        f"@misc{{{key},\n  title  = {{{ref}: a generated test set}},\n"
        f"  note   = {{Built with genrobust {card['genrobust_version']}; content sha256 {card['content_sha256']}}},\n"
        f"  year   = {{{card['created'][:4]}}}\n}}")
    return text, own + "\n\n" + PAPER_BIBTEX


# --- README.md ---------------------------------------------------------------------------------------------

def _size_category(n):
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def _front_matter(card):
    lic = str(card["licence"]).lower()
    lines = ["---", f"license: {lic if lic in HF_LICENCES else 'other'}"]
    if lic not in HF_LICENCES:
        lines.append(f"license_name: {json.dumps(str(card['licence']))}")
    lines += [f"pretty_name: {json.dumps(card['name'] + ' ' + card['version'])}", "task_categories:",
              "- image-classification", "tags:", "- synthetic", "- genrobust", "size_categories:",
              f"- {_size_category(card['num_images'])}",
              # a test set is one `test` split: `datasets.load_dataset(FOLDER)` gives DatasetDict({"test": ...})
              "configs:", "- config_name: default", "  data_files:", "  - split: test", "    path:",
              '    - "*/*.png"', "    - metadata.jsonl", "---"]
    return "\n".join(lines)


def _table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in body]) + "\n"


def _sources_table(card):
    body = []
    for s in card["sources"]:
        amount = (f"{s['per_class']}/class" if s.get("per_class") else
                  f"{s['per_image']}/source image" if s.get("per_image") else "")
        body.append([s["id"], s.get("added_in") or "", s.get("generator") or "folder", f"`{s.get('revision') or ''}`",
                     s.get("strategy") or "", s.get("seed") if s.get("seed") is not None else "", amount,
                     s["candidates"], s["kept"]])
    return _table(["source", "added in", "generator", "revision", "strategy", "seed", "amount", "candidates",
                   "kept"], body)


def _filter_lines(card):
    f = card["filters"]
    total = lambda d: sum((d or {}).values())  # noqa: E731
    lines = []
    if f["clip"]:
        lines.append(f"- CLIP score ({f['clip']['model']}, \"a photo of a {{class}}.\") below "
                     f"{f['clip']['threshold']}: {total(f['clip']['left_out'])} left out")
    if f["near_copies"]:
        refs = ", ".join(f"`{r}` ({n})" for r, n in f["near_copies"]["reference_images"].items())
        lines.append(f"- near-copies of reference images ({f['hash']} Hamming distance <= "
                     f"{f['near_copies']['max_distance']}; references: {refs}): "
                     f"{total(f['near_copies']['left_out'])} left out")
    if f["duplicates"]:
        lines.append(f"- duplicates within the set ({f['hash']} Hamming distance <= {f['duplicates']['max_distance']},"
                     f" the earlier image kept): {total(f['duplicates']['left_out'])} left out")
    q = f["quota"]
    lines.append(f"- quota: {q['per_class'] if q['per_class'] else 'none'} per class: {total(q['left_out'])} left out"
                 + (f"; short: {q['short']}" if q["short"] else ""))
    if f.get("removed_by_spec"):
        lines.append(f"- removed by the spec (from the base version): {total(f['removed_by_spec'])}")
    return "\n".join(lines) + "\n"


def readme(card):
    text, bib = citation(card)
    name = f"{card['name']}/{card['version']}"
    based = card["based_on"]
    out = [_front_matter(card), "", f"# {card['name']} {card['version']}", "", card["description"], "",
           f"- **Images**: {card['num_images']} in {len(card['classes'])} classes; built {card['created']} with "
           f"genrobust {card['genrobust_version']}.",
           f"- **Content sha256**: `{card['content_sha256']}` (images and metadata.jsonl); inputs sha256 "
           f"`{card['inputs_sha256']}`.",
           f"- **Real counterpart**: `{card['real']}`." if card["real"] else "- **Real counterpart**: none named.",
           f"- **Based on**: {based['version']} (see CHANGELOG.md)." if based else
           "- **Based on**: none (a first version).",
           f"- **Licence**: {card['licence']}.", "", "## Classes", "",
           _table(["class", "images"], [[c, n] for c, n in card["counts"].items()]), "## Sources", "",
           _sources_table(card), "Per-image prompts, seeds and generation settings are in `metadata.jsonl`; "
           "generator configurations and prompt templates in `card.json` (`sources`).", "", "## Filters", "",
           "Applied in this order; every image left out is listed with its reason in `filtered.jsonl`.", "",
           _filter_lines(card), "## Files", "",
           "- `<class>/<source>-<file>.png`: the images (an ImageFolder); `metadata.jsonl`: one row per image "
           "(file_name, label, class_id, class_name, source, added_in, generator, revision, strategy, prompt, seed, "
           "steps, guidance_scale, strength, source_image, clip_score, phash, sha256).",
           "- `card.json`: everything above, the resolved build inputs, and the sha256 of every file. "
           f"`genrobust testset verify {name}` rechecks them.", "", "## Loading", "", "```python",
           "import genrobust", f"ds = genrobust.load_testset(\"{name}\")  # torch Dataset of (image, label)", "",
           "import datasets", "ds = datasets.load_dataset(\"PATH/TO/THIS/FOLDER\")[\"test\"]  # the card declares "
           "the split", "```", "", "## Citation", "", text, "", "```bibtex", bib, "```", ""]
    return "\n".join(out)


# --- CHANGELOG.md ------------------------------------------------------------------------------------------

def changelog(card):
    ch = card["changes"]
    base = card["based_on"]["version"]
    lines = [f"# {card['name']} {card['version']} (based on {base})", "",
             f"{base} content sha256 `{card['based_on']['content_sha256']}`.", "", "## What changed", ""]
    t = ch["total"]
    lines.append(f"- images: {t['before']} -> {t['after']} ({t['added']} added, {t['removed']} removed, "
                 f"{t['kept']} kept unchanged)")
    for key, label in (("classes_added", "classes added"), ("classes_removed", "classes removed"),
                       ("regenerate_classes", "classes regenerated (every image replaced)")):
        if ch[key]:
            lines.append(f"- {label}: {', '.join(ch[key])}")
    if ch["remove_images"]:
        lines.append(f"- images removed by name: {ch['remove_images']}")
    if ch["left_out_from_base"]:
        why = ", ".join(f"{REASON_TEXT[r]}: {n}" for r, n in ch["left_out_from_base"].items())
        lines.append(f"- {base} images not carried over: {why}")
    new = [s for s in card["sources"] if s["id"] in ch["new_sources"]]
    for s in new:
        what = (f"{s.get('strategy')} with {s.get('generator')}" if s["kind"] == "generator"
                else f"folder {s.get('folder')}")
        lines.append(f"- new source `{s['id']}`: {what}, {s['kept']} of {s['candidates']} candidates kept")
    lines += ["", "## Per class", "", store.diff_table(ch)]
    return "\n".join(lines)
