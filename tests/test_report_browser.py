"""report.html in a real browser: headless chromium opens it offline and sees every image, with no errors.

Skipped where no chromium is installed, except where GENROBUST_REQUIRE_BROWSER=1 (`.ci/run` sets it after
installing chromium): there a missing browser fails the test, so CI cannot pass without running it.
"""
import os
import html
import json
import re
import shutil
import subprocess

import pytest

from conftest import write_imagefolder
from genrobust.report import write_report

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)

pytestmark = pytest.mark.browser
REQUIRED = os.environ.get("GENROBUST_REQUIRE_BROWSER") == "1"
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="no chromium, chromium-browser or "
                                    "google-chrome on PATH (Debian: apt-get install chromium)")


@pytest.fixture(autouse=True)
def _browser_present():
    if REQUIRED:
        assert CHROMIUM is not None, "GENROBUST_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)"

# Injected first in <head>: records script errors, failed resource loads, rejections and console.error; after
# `load`, writes a verdict on every image into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.onerror = function (msg, src, line) { window.__errors.push("onerror: " + msg + " " + src + ":" + line); };
window.addEventListener("error", function (e) {
  if (e.target && e.target !== window) window.__errors.push("failed to load " + (e.target.src || e.target.href));
}, true);
window.addEventListener("unhandledrejection", function (e) { window.__errors.push("rejection: " + e.reason); });
var __consoleError = console.error;
console.error = function () {
  window.__errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
  __consoleError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var verdict = {errors: window.__errors, images: imgs.length,
                 loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length};
  var pre = document.createElement("pre");
  pre.id = "verdict";
  pre.textContent = JSON.stringify(verdict);
  document.body.appendChild(pre);
});
</script>"""


def acc(model, eval_set, value, role="shift"):
    return {"model": model, "checkpoint": f"ck/{model}", "train_data": "real", "augmentation": "standard",
            "seed": 0, "eval_set": eval_set, "role": role, "metric": "top1", "value": value, "n": 100,
            "class_subset": "all", "num_classes": 10}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report with 2 shifts (2 accuracy-on-the-line plots) and 1 generated folder (1 sample grid)."""
    tmp = tmp_path_factory.mktemp("browser")
    base = tmp / "baseline.jsonl"
    base.write_text("".join(json.dumps(r) + "\n" for i, x in enumerate((0.6, 0.7, 0.8, 0.9))
                            for r in (acc(f"b{i}", "id", x, "id"), acc(f"b{i}", "uci", x - 0.2),
                                      acc(f"b{i}", "fonts", x - 0.1))))
    gen = write_imagefolder(tmp / "label", classes=("0", "1", "2"), per_class=4)
    (gen / "dataset_card.json").write_text(json.dumps({"strategy": "label", "generator": {"name": "digits-ddpm"},
                                                        "classes": ["0", "1", "2"], "num_images": 12}))
    rows = [acc("real+gen", "id", 0.85, "id"), acc("real+gen", "uci", 0.7), acc("real+gen", "fonts", 0.8)]
    write_report(rows, tmp / "report", baseline=base, generated=[gen])
    return tmp / "report" / "report.html"


def browse(page, tmp_path):
    """Load a copy of `page` with the probe injected in headless chromium; return the probe's verdict."""
    copy = tmp_path / "probed.html"
    copy.write_text(page.read_text().replace("<head>", "<head>\n" + PROBE, 1))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           copy.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="verdict">(.*?)</pre>', dom, re.S)
    assert found, f"chromium printed no verdict; the page did not finish loading:\n{dom[:2000]}"
    return json.loads(html.unescape(found.group(1)))


@needs_chromium
def test_report_loads_in_chromium(report, tmp_path):
    verdict = browse(report, tmp_path)
    assert verdict == {"errors": [], "images": 3, "loaded": 3}


@needs_chromium
def test_probe_catches_a_broken_image(report, tmp_path):
    # The check is not vacuous: an image that cannot decode is seen as not loaded.
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace("</main>", '<img src="data:image/png;base64,AAAA"></main>'))
    verdict = browse(broken, tmp_path)
    assert verdict["images"] == 4 and verdict["loaded"] == 3


def test_report_needs_no_external_resources(report):
    text = report.read_text()
    assert 'src="http' not in text and "<link" not in text and "<script src" not in text
    assert "<script" not in text  # the report runs no code at all
