"""The built site in a real browser: Debian's Chromium driven by Playwright.

Two sites are built: the repository's, and the fixture's (which has a notebook with stored
outputs, a fast path with a kernel module, and hostile prose and outputs). Both are served over
HTTP on 127.0.0.1 under sub-paths. Every page is opened at 1440x900 and 390x844 in the light theme,
and a sample of pages in the dark theme at both sizes. For every page: no console error, no failed
request, no request leaving 127.0.0.1, no script of the content run; math rendered (no raw LaTeX in
the visible text), display equations inside their column on the desktop, no code block that needs
a sideways scroll, list markers shown, tables inside their box, no page wider than the screen;
prose and code side by side on the desktop and stacked on the phone; breadcrumb, contents,
previous/next (top and bottom) and a source link; text legible in the dark theme; what a first
visit loads. Then: every local link leads to a file and an id, every page is reachable from the
index, search ranks definitions first, gives one hit per section and marks the words on the page
it opens, the contents follow the reading, images open larger, line anchors scroll, math spacing,
and a page opened from `file://`. Screenshots go to `test-artifacts/site/`.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "site"
ARTIFACTS = REPO / "test-artifacts" / "site"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The main site under test is the repository's; SITE_SRC_ROOT points it at another source root
# (for example a copy with freshly executed notebooks).
SRC_ROOT = Path(os.environ.get("SITE_SRC_ROOT") or REPO)
sys.path.append(str(REPO / "site"))  # appended: `site/build.py` must not shadow a `build` module

from sitegen.build import build  # noqa: E402

# Text outside code that still looks like LaTeX: a dollar sign or a backslash command.
RAW_LATEX = re.compile(r"\$|\\[A-Za-z]+")

# One walk over the page, in the browser: what the checks below need.
PAGE_REPORT_JS = r"""
() => {
  const visible = [];
  const walker = document.createTreeWalker(document.querySelector("main"), NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest("pre, code, .code, script, style")) continue;
    if (!el.checkVisibility()) continue;
    if (el.closest("annotation")) { visible.push("[visible annotation] " + n.data); continue; }
    visible.push(n.data);
  }
  const maths = Array.from(document.querySelectorAll("math"));
  const rowLayout = Array.from(document.querySelectorAll(".section")).filter(
      s => s.querySelector(".prose > :not(.section-link):not(.line-anchor)") && s.querySelector(":scope > .code .codeblock")).map(s => {
    const p = s.querySelector(".prose").getBoundingClientRect(), c = s.querySelector(":scope > .code").getBoundingClientRect();
    return {id: s.id, pl: p.left, pr: p.right, pt: p.top, pb: p.bottom, cl: c.left, cr: c.right, ct: c.top};
  });
  const pres = Array.from(document.querySelectorAll("main .codeblock pre, main .prose pre"));
  const displays = Array.from(document.querySelectorAll(".math-display"));
  // A list marker is cut when the box that clips the item starts less than a marker's width before it.
  const clipped = Array.from(document.querySelectorAll(".prose li")).filter(li => {
    if (!li.checkVisibility() || getComputedStyle(li).listStyleType === "none") return false;
    const left = li.getBoundingClientRect().left;
    for (let a = li; a && !a.classList.contains("prose"); a = a.parentElement) {
      if (a !== li && getComputedStyle(a).overflowX !== "visible" && left - a.getBoundingClientRect().left < 12) return true;
      if (a === li && getComputedStyle(a).overflowX !== "visible") return true;
    }
    return false;
  });
  const overTables = Array.from(document.querySelectorAll(".suite table, table.record, .results table")).filter(tb => {
    const box = tb.parentElement.getBoundingClientRect(), r = tb.getBoundingClientRect();
    return tb.checkVisibility() && (r.right > box.right + 1 || tb.parentElement.scrollWidth > tb.parentElement.clientWidth + 1);
  }).length;
  const proseTables = Array.from(document.querySelectorAll(".prose .table-scroll")).filter(
      tb => tb.checkVisibility() && tb.scrollWidth > tb.clientWidth + 1).length;
  const toc = document.getElementById("toc");
  const tocTargets = toc ? Array.from(toc.querySelectorAll("a")).map(a => decodeURIComponent(a.hash.slice(1))) : [];
  const resources = performance.getEntriesByType("resource").concat(performance.getEntriesByType("navigation"));
  return {
    text: visible.join(" "),
    maths: maths.length,
    // Laid out by the browser's MathML engine (display "math" or "block math"), and not empty.
    emptyMaths: maths.filter(m => m.checkVisibility()).filter(m => { const r = m.getBoundingClientRect();
      return r.width < 1 || r.height < 1 || !getComputedStyle(m).display.includes("math"); }).length,
    shownAnnotations: Array.from(document.querySelectorAll("annotation")).filter(a => getComputedStyle(a).display !== "none").length,
    rows: rowLayout,
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    ids: Array.from(document.querySelectorAll("[id]")).map(e => e.id),
    scrollWidth: document.documentElement.scrollWidth,
    provenance: document.querySelector("#nb-provenance") !== null,
    brokenImages: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
    codeBlocks: pres.length,
    codeScrolls: pres.filter(p => p.checkVisibility() && p.scrollWidth > p.clientWidth + 1).length,
    displays: displays.length,
    displaysCut: displays.filter(d => d.checkVisibility() && d.scrollWidth > d.clientWidth + 1).map(d => d.querySelector("annotation")?.textContent.slice(0, 60)),
    displaysScaled: displays.filter(d => d.style.fontSize).map(d => parseFloat(d.style.fontSize)),
    markersClipped: clipped.length,
    listItems: document.querySelectorAll(".prose li").length,
    tablesOver: overTables,
    proseTables: proseTables,
    toc: toc ? tocTargets.length : null,
    tocMissing: tocTargets.filter(id => !document.getElementById(id)),
    crumbHome: document.querySelector(".crumbs a[href='index.html']") !== null,
    navTop: document.querySelectorAll(".chapter-nav-top a[rel]").length,
    navBottom: document.querySelectorAll(".chapter-nav-bottom a[rel]").length,
    source: document.querySelector("a[data-rel=source]")?.getAttribute("href") || null,
    bytes: resources.reduce((s, e) => s + (e.decodedBodySize || 0), 0),
    loaded: resources.map(e => e.name),
  };
}
"""

# Text against its background in the dark theme: (what, contrast ratio) for the main kinds of text.
CONTRAST_JS = r"""
() => {
  const lum = c => { const v = c.match(/[\d.]+/g).slice(0, 3).map(x => { x = x / 255; return x <= .03928 ? x / 12.92 : ((x + .055) / 1.055) ** 2.4; });
    return .2126 * v[0] + .7152 * v[1] + .0722 * v[2]; };
  const bg = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
    if (c && !c.startsWith("rgba(0, 0, 0, 0)") && c !== "transparent") return c; } return "rgb(255, 255, 255)"; };
  const out = [];
  for (const sel of [".prose p", ".prose p a", ".code .line", ".code .k", ".code .s2", ".code .nf", ".code .mi", ".code .lc",
                     ".pill", ".crumbs a", ".toc-toggle", "pre.output", ".search input", ".chapter-nav a", ".chapter p"]) {
    const el = document.querySelector(sel);
    if (!el) continue;
    const a = lum(getComputedStyle(el).color), b = lum(bg(el));
    out.push([sel, (Math.max(a, b) + .05) / (Math.min(a, b) + .05)]);
  }
  return out;
}
"""

DESKTOP, PHONE = (1440, 900), (390, 844)
# The pages also checked in the dark theme (a sample: the layout is the light theme's).
DARK_SAMPLE = ("repo-index", "repo-rope", "repo-kv_cache", "repo-_decode_kernels", "repo-01_rotary_embeddings",
               "repo-results", "fixture-tiny", "fixture-tiny_fast", "fixture-01_tiny", "fixture-hostile",
               "fixture-99_hostile")
# A first visit of any page (its HTML, styles, scripts, font, images) stays under this many bytes.
FIRST_VISIT_BUDGET = 700_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both sites built under one directory and served over HTTP on 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    build(SRC_ROOT, root / "repo" / "_build")
    build(FIXTURE, root / "fixture" / "_build")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's Chromium. Install it with "
                    "`apt-get update && apt-get install -y chromium` (`make browser` does it).", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def new_context(browser, size, scheme="light"):
    width, height = size
    if width < 600:
        return browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme,
                                   device_scale_factor=1, is_mobile=True, has_touch=True)
    return browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme)


class Watch:
    """Everything a page does that it should not: console errors, failed or foreign requests, dialogs."""

    def __init__(self, page, allowed_prefix: str):
        self.problems: list[str] = []
        self.allowed = allowed_prefix
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.on("request", self._request)
        page.on("dialog", self._dialog)

    def _request(self, r):
        if not (r.url.startswith(self.allowed) or r.url.startswith("data:") or r.url == "about:blank"):
            self.problems.append(f"request leaving the site: {r.url}")

    def _dialog(self, d):
        self.problems.append(f"a dialog opened: {d.message}")
        d.dismiss()


def page_urls(root: Path, base: str) -> list[tuple[str, str]]:
    out = []
    for site in ("repo", "fixture"):
        for p in sorted((root / site / "_build").glob("*.html")):
            out.append((f"{site}-{p.stem}", f"{base}/{site}/_build/{p.name}"))
    return out


def source_lines(root: Path, name: str, href: str | None) -> int | None:
    """The number of lines of a module page's source file (shipped with the site), or None."""
    if not href or not href.endswith(".py"):
        return None
    site = name.split("-", 1)[0]
    return len((root / site / "_build" / href).read_text().splitlines())


def check_page(page, name: str, url: str, width: int, problems: list[str], seen: dict, root: Path):
    page.goto(url, wait_until="load")
    page.evaluate("document.fonts.ready")
    page.wait_for_timeout(30)  # equations are fitted once the fonts are in
    report = page.evaluate(PAGE_REPORT_JS)
    where = f"{name} at {width}px"
    # The fixture's hostile pages try every way to run a script: none may have run.
    pwned = page.evaluate("window.__pwned")
    if pwned is not None:
        problems.append(f"{where}: a script from the content ran ({pwned!r})")
    for m in RAW_LATEX.finditer(report["text"]):
        context = report["text"][max(0, m.start() - 40): m.end() + 40]
        problems.append(f"{where}: raw LaTeX in the visible text: ...{context}...")
        break
    if report["emptyMaths"]:
        problems.append(f"{where}: {report['emptyMaths']} of {report['maths']} math elements have no size")
    if report["shownAnnotations"]:
        problems.append(f"{where}: LaTeX annotations are displayed")
    if len(report["ids"]) != len(set(report["ids"])):
        dups = sorted({i for i in report["ids"] if report["ids"].count(i) > 1})
        problems.append(f"{where}: duplicate ids {dups[:5]}")
    if report["brokenImages"]:
        problems.append(f"{where}: images that did not load: {report['brokenImages']}")
    if report["scrollWidth"] > width + 1:
        problems.append(f"{where}: the page is {report['scrollWidth']}px wide (horizontal scrolling)")
    if report["codeScrolls"]:
        problems.append(f"{where}: {report['codeScrolls']} of {report['codeBlocks']} code blocks need a sideways scroll")
    if width >= 1000 and report["displaysCut"]:
        problems.append(f"{where}: display equations wider than their column: {report['displaysCut']}")
    if report["markersClipped"]:
        problems.append(f"{where}: {report['markersClipped']} of {report['listItems']} list markers are cut off")
    if width >= 1000 and report["proseTables"]:
        problems.append(f"{where}: {report['proseTables']} tables in prose need a sideways scroll")
    if report["tablesOver"]:
        problems.append(f"{where}: {report['tablesOver']} tables are wider than their box")
    if report["tocMissing"]:
        problems.append(f"{where}: contents entries without a target: {report['tocMissing'][:5]}")
    if not name.endswith("-index"):
        if not report["crumbHome"]:
            problems.append(f"{where}: no breadcrumb link to the index")
        if not report["source"]:
            problems.append(f"{where}: no link to the page's source")
    if report["navTop"] != report["navBottom"]:
        problems.append(f"{where}: previous/next links differ top ({report['navTop']}) and bottom ({report['navBottom']})")
    n_lines = source_lines(root, name, report["source"])
    if n_lines:
        missing = sorted(set(range(1, n_lines + 1)) - {int(i[1:]) for i in report["ids"] if re.fullmatch(r"L\d+", i)})
        if missing:
            problems.append(f"{where}: lines without an anchor: {missing[:10]}")
    if any("search-index.js" in u for u in report["loaded"]):
        problems.append(f"{where}: the search index is loaded before any search")
    for r in report["rows"]:
        if width >= 1000:
            if not (r["pr"] <= r["cl"] + 1 and abs(r["pt"] - r["ct"]) < 2):
                problems.append(f"{where}: section {r['id']}: prose and code are not side by side ({r})")
        elif not (r["ct"] >= r["pb"] - 1 and abs(r["pl"] - r["cl"]) < 2):
            problems.append(f"{where}: section {r['id']}: prose and code are not stacked ({r})")
    if width >= 1000:
        seen["side-by-side"] = seen.get("side-by-side", 0) + len(report["rows"])
        seen["code blocks"] = seen.get("code blocks", 0) + report["codeBlocks"]
        seen["display equations"] = seen.get("display equations", 0) + report["displays"]
        seen.setdefault("bytes", {})[name] = report["bytes"]
    seen["maths"] = seen.get("maths", 0) + report["maths"]
    seen["list items"] = seen.get("list items", 0) + report["listItems"]
    return report


def check_theme_toggle(page, where: str, problems: list[str]):
    bg = lambda: page.evaluate("getComputedStyle(document.body).backgroundColor")  # noqa: E731
    theme = lambda: page.evaluate("document.documentElement.getAttribute('data-theme')")  # noqa: E731
    before = bg()
    page.click("#theme-toggle")
    first = theme()
    if first not in ("light", "dark") or bg() == before:
        problems.append(f"{where}: the theme toggle did not change the theme ({first}, {before} -> {bg()})")
    page.click("#theme-toggle")
    if theme() == first or bg() != before:
        problems.append(f"{where}: the theme toggle did not switch back ({theme()}, {bg()} != {before})")


def check_search(page, where: str, query: str, problems: list[str]) -> list[str]:
    page.fill("#search-box", query)
    results = page.locator("#search-results a")
    try:
        results.first.wait_for(state="visible", timeout=3000)
    except Exception:
        problems.append(f"{where}: no search results for {query!r}")
        return []
    hrefs = results.evaluate_all("els => els.map(a => a.href)")
    shown = page.locator("#search-results").inner_text()
    if "$" in shown:
        problems.append(f"{where}: raw LaTeX in the search results: {shown[:200]!r}")
    page.fill("#search-box", "")
    return hrefs


def test_every_page_in_a_real_browser(served, browser):
    root, base = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    seen: dict = {}
    links: dict[str, set[str]] = {}
    ids: dict[str, set[str]] = {}
    pages = page_urls(root, base)
    assert len(pages) >= 4, pages

    passes = [(DESKTOP, "light", pages), (PHONE, "light", pages),
              (DESKTOP, "dark", [p for p in pages if p[0] in DARK_SAMPLE]),
              (PHONE, "dark", [p for p in pages if p[0] in DARK_SAMPLE])]
    for size, scheme, sample in passes:
        width = size[0]
        ctx = new_context(browser, size, scheme)
        page = ctx.new_page()
        watch = Watch(page, base + "/")
        for name, url in sample:
            report = check_page(page, name, url, width, problems, seen, root)
            suffix = "" if scheme == "light" else "-dark"
            page.screenshot(path=str(ARTIFACTS / f"{name}-{width}{suffix}.png"))
            if scheme == "dark":
                for what, ratio in page.evaluate(CONTRAST_JS):
                    if ratio < 4.5:
                        problems.append(f"{name} at {width}px, dark: {what} has a contrast of {ratio:.2f} (< 4.5)")
            elif width == DESKTOP[0]:
                if report["provenance"] or name.endswith("-index"):  # notebooks and the index, whole
                    page.screenshot(path=str(ARTIFACTS / f"{name}-{width}-full.png"), full_page=True)
                links[url] = set(report["links"])
                ids[url] = set(report["ids"])
                check_theme_toggle(page, name, problems)
                query = "rotary" if name.startswith("repo") else "softmax"
                check_search(page, name, query, problems)
            problems += [f"{name} at {width}px ({scheme}): {p}" for p in watch.problems]
            watch.problems.clear()
        page.close()
        ctx.close()

    # Every local link leads to a file of the site, and its #fragment to an id on that page.
    served_root = root.resolve()
    for source, hrefs in sorted(links.items()):
        for href in sorted(hrefs):
            parsed = urllib.parse.urlsplit(href)
            if f"{parsed.scheme}://{parsed.netloc}" != base:
                continue  # an external link (a paper): never requested, only linked
            target = served_root / urllib.parse.unquote(parsed.path).lstrip("/")
            if not target.is_file():
                problems.append(f"{source}: broken link {href}")
                continue
            if parsed.fragment:
                page_url = f"{base}{parsed.path}"
                if page_url in ids and urllib.parse.unquote(parsed.fragment) not in ids[page_url]:
                    problems.append(f"{source}: link to a missing anchor {href}")
    # Every page is reachable from its site's index by following links.
    for site in ("repo", "fixture"):
        start = f"{base}/{site}/_build/index.html"
        reached, todo = {start}, [start]
        while todo:
            for href in links.get(todo.pop(), ()):
                url = urllib.parse.urlsplit(href)._replace(query="", fragment="").geturl()
                if url in links and url not in reached:
                    reached.add(url)
                    todo.append(url)
        orphans = sorted(u for u in links if u.startswith(f"{base}/{site}/") and u not in reached)
        if orphans:
            problems.append(f"pages no link leads to from the index: {orphans}")
    heaviest = max(seen["bytes"].items(), key=lambda kv: kv[1])
    (ARTIFACTS / "first-visit-bytes.txt").write_text(
        "".join(f"{n}\t{b}\n" for n, b in sorted(seen["bytes"].items(), key=lambda kv: -kv[1])))
    if heaviest[1] > FIRST_VISIT_BUDGET:
        problems.append(f"a first visit of {heaviest[0]} loads {heaviest[1]:,} bytes (> {FIRST_VISIT_BUDGET:,})")
    assert seen.get("maths", 0) > 0, "no math element on any page"
    assert seen.get("side-by-side", 0) > 10, "too few sections with prose and code"
    assert seen.get("code blocks", 0) > 50 and seen.get("display equations", 0) > 5 and seen.get("list items", 0) > 5, seen
    assert not problems, "\n".join(problems[:40])


def test_search_leads_to_the_section(served, browser):
    root, base = served
    ctx = new_context(browser, DESKTOP)
    page = ctx.new_page()
    watch = Watch(page, base + "/")
    page.goto(f"{base}/fixture/_build/index.html")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "search-box"
    page.keyboard.type("variance scores")
    first = page.locator("#search-results a").first
    first.wait_for(state="visible", timeout=3000)
    href = first.get_attribute("href")
    assert href.startswith("tiny.html?q=variance%20scores#"), href
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"tiny\.html\?q=[^#]+#"))
    target = page.evaluate("location.hash.slice(1)")
    assert page.locator(f"[id='{target}']").is_visible()
    # The words searched for are marked in the section the result leads to.
    marks = page.locator(".section", has=page.locator(f"[id='{target}']")).locator("mark.search-hit")
    assert {m.lower() for m in marks.all_inner_texts()} >= {"variance", "scores"}, marks.all_inner_texts()
    assert marks.first.is_visible()
    page.screenshot(path=str(ARTIFACTS / "search-marked.png"))
    page.fill("#search-box", "zzzzqqq")
    assert "No results" in page.locator("#search-results").inner_text()
    page.screenshot(path=str(ARTIFACTS / "search-no-results.png"))
    # A definition whose name matches comes first.
    page.fill("#search-box", "attention")
    page.locator("#search-results a").first.wait_for(state="visible", timeout=3000)
    first = page.locator("#search-results a").first
    assert first.locator(".r-kind").inner_text() == "def" and first.get_attribute("href").endswith("#attention")
    page.screenshot(path=str(ARTIFACTS / "search-results.png"))
    assert not watch.problems, watch.problems
    # One hit per section in the repository's site: no two results read the same.
    page.goto(f"{base}/repo/_build/index.html")
    for query in ("log-sum-exp", "cache", "rotary"):
        page.fill("#search-box", query)
        page.locator("#search-results a").first.wait_for(state="visible", timeout=3000)
        shown = page.locator("#search-results a").evaluate_all(
            "els => els.map(a => a.querySelector('.r-title').textContent + ' | ' + a.querySelector('.r-where').textContent)")
        assert len(shown) == len(set(shown)), (query, shown)
        hrefs = page.locator("#search-results a").evaluate_all("els => els.map(a => a.getAttribute('href'))")
        assert len(hrefs) == len(set(hrefs)), (query, hrefs)
    ctx.close()


def test_contents_follow_the_reading(served, browser):
    root, base = served
    for size in (DESKTOP, PHONE):
        ctx = new_context(browser, size)
        page = ctx.new_page()
        watch = Watch(page, base + "/")
        page.goto(f"{base}/repo/_build/kv_cache.html")
        entries = page.locator("#toc a").all_inner_texts()
        assert len(entries) >= 3, entries
        height = page.evaluate("document.documentElement.scrollHeight")
        page.evaluate(f"window.scrollTo(0, {height // 2})")
        page.wait_for_timeout(150)
        button = page.locator("#toc-toggle")
        assert button.is_visible()
        box = button.bounding_box()
        assert 0 <= box["y"] < 60, box  # in the sticky top bar, while reading the middle of the page
        if size == DESKTOP:
            current = button.inner_text().strip()
            labels = page.locator("#toc a").evaluate_all("els => els.map(a => a.dataset.label)")
            assert current in labels and current != labels[0], (current, labels)
            assert not RAW_LATEX.search(current), current
        assert page.locator("#toc a.current").count() == 1
        button.click()
        assert page.locator("#toc").is_visible()
        page.screenshot(path=str(ARTIFACTS / f"contents-open-{size[0]}.png"))
        link = page.locator("#toc a").nth(2)
        target = link.get_attribute("href")[1:]
        link.click()
        page.wait_for_timeout(150)
        assert not page.locator("#toc").is_visible()
        top = page.evaluate(f"document.getElementById({target!r}).getBoundingClientRect().top")
        assert 0 <= top < 200, top
        assert not watch.problems, watch.problems
        ctx.close()


def test_images_open_larger_and_line_anchors_scroll(served, browser):
    root, base = served
    ctx = new_context(browser, PHONE)
    page = ctx.new_page()
    watch = Watch(page, base + "/")
    page.goto(f"{base}/fixture/_build/01_tiny.html")
    img = page.locator(".output-image img").first
    small = img.bounding_box()["width"]
    img.click()
    big = page.locator("dialog.lightbox[open] img")
    big.wait_for(state="visible", timeout=3000)
    assert big.bounding_box()["width"] > small, (small, big.bounding_box())
    page.screenshot(path=str(ARTIFACTS / "image-opened-390.png"))
    page.keyboard.press("Escape")
    assert page.locator("dialog.lightbox[open]").count() == 0
    # A comment line's anchor: the page scrolls to the prose that line became.
    line = next(i for i, t in enumerate((FIXTURE / "annotated_src" / "tiny.py").read_text().splitlines(), 1)
                if "# Dividing by" in t)
    page.goto(f"{base}/fixture/_build/tiny.html#L{line}")
    page.wait_for_timeout(100)
    top = page.evaluate(f"document.getElementById('L{line}').getBoundingClientRect().top")
    assert 40 <= top < 200, top
    assert "variance" in page.evaluate(
        f"document.getElementById('L{line}').closest('.prose').textContent")
    assert not watch.problems, watch.problems
    ctx.close()


# TeX's spacing, measured: (LaTeX source, check) on the fixture's page.
SPACING_JS = r"""
(tex) => {
  const math = Array.from(document.querySelectorAll("math")).find(m => m.querySelector("annotation")?.textContent === tex);
  const parts = Array.from(math.querySelectorAll("mi, mo")).map(e => { const r = e.getBoundingClientRect();
    return {t: e.textContent, l: r.left, r: r.right, top: r.top, b: r.bottom}; });
  return {parts, em: parseFloat(getComputedStyle(math).fontSize)};
}
"""


def test_math_spacing_in_the_browser(served, browser):
    root, base = served
    ctx = new_context(browser, DESKTOP)
    page = ctx.new_page()
    page.goto(f"{base}/fixture/_build/tiny.html")
    page.evaluate("document.fonts.ready")
    m = page.evaluate(SPACING_JS, r"j \bmod r")
    j, mod, r = m["parts"]
    assert mod["t"] == "mod" and mod["l"] - j["r"] > 0.15 * m["em"] and r["l"] - mod["r"] > 0.15 * m["em"], m
    m = page.evaluate(SPACING_JS, "a/b")
    a, slash, b = m["parts"]
    assert slash["l"] - a["r"] < 0.1 * m["em"] and b["l"] - slash["r"] < 0.1 * m["em"], m
    m = page.evaluate(SPACING_JS, "k'")
    k, prime = m["parts"]
    # The prime sits beside the top of its letter, not above it.
    assert prime["b"] > k["top"] + 0.1 * m["em"] and prime["top"] > k["top"] - 0.3 * m["em"], m
    assert prime["l"] - k["r"] < 0.15 * m["em"], m
    # The math font is the WOFF2 subset shipped with the site, and it is in use.
    assert page.evaluate("document.fonts.check(\"16px 'DejaVu Math TeX Gyre'\")")
    fonts = page.evaluate("performance.getEntriesByType('resource').map(e => e.name).filter(n => /\\.(woff2?|ttf|otf)$/.test(n))")
    assert len(fonts) == 1 and fonts[0].endswith("-subset.woff2"), fonts
    page.locator("math", has_text="mod").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "math-spacing.png"))
    ctx.close()


def test_theme_follows_the_system_and_the_choice_persists(served, browser):
    root, base = served
    url = f"{base}/fixture/_build/tiny.html"
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    page = ctx.new_page()
    page.goto(url)
    dark_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") is None
    page.screenshot(path=str(ARTIFACTS / "theme-system-dark-1440.png"))
    page.click("#theme-toggle")  # dark (system) -> light (chosen)
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") == "light"
    light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light_bg != dark_bg
    page.goto(f"{base}/fixture/_build/01_tiny.html")  # the choice holds on the next page
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") == "light"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == light_bg
    ctx.close()
    light = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="light")
    page = light.new_page()
    page.goto(f"{base}/fixture/_build/01_tiny.html")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == light_bg
    page.click("#theme-toggle")
    page.screenshot(path=str(ARTIFACTS / "theme-toggled-dark-1440-full.png"), full_page=True)
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == dark_bg
    light.close()


def test_copy_button_copies_the_code_without_line_numbers(served, browser):
    root, base = served
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = ctx.new_page()
    page.goto(f"{base}/fixture/_build/tiny.html")
    block = page.locator(".codeblock").filter(has_text="def attention").first
    block.hover()
    block.locator(".copy").click()
    page.wait_for_function("document.querySelector('.copy.done') !== null", timeout=3000)
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("def attention(q, k, v):\n"), copied[:80]
    assert not re.search(r"^\s*\d+\s*def", copied, re.M)
    ctx.close()


def test_print_style_stacks_and_hides_the_controls(served, browser):
    root, base = served
    # A reader in the dark theme still prints black on white.
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    page = ctx.new_page()
    page.goto(f"{base}/fixture/_build/tiny.html")
    page.emulate_media(media="print")
    assert page.locator(".topbar").is_hidden()
    section = page.locator(".section").filter(has=page.locator(".codeblock")).nth(1)
    p = section.locator(".prose").bounding_box()
    c = section.locator(".code").bounding_box()
    assert c["y"] >= p["y"] + p["height"] - 1
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    assert page.evaluate("getComputedStyle(document.querySelector('.section > .code')).backgroundColor") in (
        "rgb(255, 255, 255)", "rgba(0, 0, 0, 0)")
    page.pdf(path=str(ARTIFACTS / "fixture-tiny.pdf"))
    ctx.close()


def test_works_from_file_urls(tmp_path, browser):
    out = tmp_path / "site"
    build(FIXTURE, out)
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    page = ctx.new_page()
    watch = Watch(page, "file://")
    # Each page is left only once nothing is in flight: a navigation cancels the requests of the
    # page it leaves (the favicon, say), and the browser reports those as failed.
    for name in ("index.html", "01_tiny.html", "tiny.html"):
        page.goto((out / name).as_uri(), wait_until="networkidle")
        assert page.locator("math").count() > 0 or name == "index.html"
        assert page.evaluate("getComputedStyle(document.querySelector('.topbar')).position") == "sticky"  # CSS loaded
    page.fill("#search-box", "softmax")
    page.locator("#search-results a").first.wait_for(state="visible", timeout=3000)
    page.locator("#search-results a").first.click()
    page.wait_for_url(re.compile(r"^file://.*\.html\?q=softmax#"))
    page.wait_for_load_state("networkidle")
    assert page.locator("mark.search-hit").count() > 0
    page.goto((out / "01_tiny.html").as_uri(), wait_until="networkidle")
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert not watch.problems, watch.problems
    ctx.close()
