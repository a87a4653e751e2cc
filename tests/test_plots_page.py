"""The `dvc plots show` page (scripts/plots_page.py + `make plots`) in headless Chromium: every declared plot renders
from file:// with no network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)

# Test-only, injected into a copy of the page: every resource it fetches, every uncaught error (a failed vegaEmbed
# is an unhandled rejection) and the images that decoded, kept on <html> for --dump-dom.
PROBE = """<script>
(() => {
  const root = document.documentElement, seen = {resources: [], errors: []};
  const keep = (key, value) => { seen[key].push(value); root.dataset[key] = JSON.stringify(seen[key]); };
  new PerformanceObserver(list => list.getEntries().forEach(entry => keep("resources", entry.name)))
    .observe({type: "resource", buffered: true});
  addEventListener("error", event => keep("errors", event.message || `failed to load ${event.target.src || event.target.href}`), true);
  addEventListener("unhandledrejection", event => keep("errors", String(event.reason)));
  addEventListener("load", () => {
    root.dataset.images = JSON.stringify([...document.images].filter(image => image.naturalWidth > 0).map(image => image.getAttribute("src")));
  });
})();
</script>"""


class Dom(HTMLParser):
    """Per element id: the Vega marks drawn below it, by mark type (paths in a `mark-<type> role-mark` group), and its
    <img> sources; every src/href and <script src> in the document; and the probe's lists (data-* JSON on <html>)."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})

    def __init__(self, text: str):
        super().__init__()
        self.stack: list[tuple[str, str | None, str | None]] = []   # (tag, id, mark type of a Vega data-mark group)
        self.marks: Counter[tuple[str, str]] = Counter()
        self.images: dict[str, list[str]] = {}
        self.links: list[str] = []
        self.script_sources: list[str] = []
        self.probe: dict[str, list[str]] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.probe = {name[len("data-"):]: json.loads(value) for name, value in attrs.items() if name.startswith("data-")}
        self.links += [value for name, value in attrs.items() if name in ("src", "href") and value]
        if tag == "script" and attrs.get("src"):
            self.script_sources.append(attrs["src"])
        mark = next((kind for *_, kind in reversed(self.stack) if kind), None)
        for owner in (element_id for _, element_id, _ in self.stack if element_id):
            if tag == "path" and mark and attrs.get("d"):
                self.marks[owner, mark] += 1
            if tag == "img":
                self.images.setdefault(owner, []).append(attrs.get("src", ""))
        if tag not in self.VOID:
            classes = (attrs.get("class") or "").split()
            kind = next((name[len("mark-"):] for name in classes if name.startswith("mark-")), None) if "role-mark" in classes else None
            self.stack.append((tag, attrs.get("id"), kind))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def html_id(plot_id: str) -> str:
    """The id DVC gives a plot's <div> (dvc_render's remove_special_chars)."""
    return re.sub(r"[^\w-]", "_", plot_id)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    if not CHROMIUM.exists():
        if not os.environ.get("CI"):
            pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); under CI this test must run")
        pytest.fail(f"{CHROMIUM} is absent under CI: .ci/run installs it")
    tmp = tmp_path_factory.mktemp("plots_page")
    template = tmp / "template.html"
    built = subprocess.run([sys.executable, "scripts/plots_page.py", template], cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    dvc("plots", "show", "--html-template", str(template), "-o", str(tmp / "out"))
    return tmp / "out" / "index.html"


@pytest.fixture(scope="module")
def declared() -> dict[str, dict]:
    """Plot id -> its first renderer ({"type": "vega" | "image", "content": the Vega-Lite spec, ...}), as DVC reads dvc.yaml."""
    shown = json.loads(dvc("plots", "show", "--json"))
    assert not shown.get("errors"), shown["errors"]
    return {plot_id: renderers[0] for plot_id, renderers in shown["data"].items()}


def values(spec: dict) -> int:
    """How many data points of a spec from the .dvc/plots templates have a y value: each is drawn as a point."""
    y = spec["encoding"]["y"]["field"]
    return sum(row.get(y) not in (None, "") for row in spec["data"]["values"])


@pytest.fixture(scope="module")
def rendered(page, tmp_path_factory) -> Dom:
    """The page's DOM after Chromium ran its scripts, host names unresolvable (a CDN script could not load)."""
    checked = page.with_name("checked.html")   # next to the page: its static/ images resolve
    checked.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    profile = tmp_path_factory.mktemp("chromium_profile")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000",
               "--dump-dom", checked.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "</html>" in result.stdout, result.stderr[-3000:]
    return Dom(result.stdout)


def test_page_loads_nothing_from_the_network(page):
    source = Dom(page.read_text(encoding="utf-8"))
    assert source.script_sources == [], "the Vega libraries must be inline"
    assert [link for link in source.links if REMOTE.match(link)] == []


def test_every_declared_plot_renders(declared, rendered):
    vega = {plot_id: renderer["content"] for plot_id, renderer in declared.items() if renderer["type"] == "vega"}
    images = [plot_id for plot_id, renderer in declared.items() if renderer["type"] == "image"]
    assert vega and images
    lines = {plot_id: rendered.marks[html_id(plot_id), "line"] for plot_id in vega}
    points = {plot_id: rendered.marks[html_id(plot_id), "symbol"] for plot_id in vega}
    assert [plot_id for plot_id, count in lines.items() if count == 0] == [], "plots with no line drawn"
    assert points == {plot_id: values(spec) for plot_id, spec in vega.items()}, "every value drawn as a point, a lone one too"
    loaded = set(rendered.probe.get("images", []))
    assert [plot_id for plot_id in images if not set(rendered.images.get(html_id(plot_id), [])) & loaded] == [], \
        "image plots whose <img> did not load"
    assert rendered.probe.get("errors", []) == []
    assert [url for url in rendered.probe.get("resources", []) if not url.startswith("file:")] == []
