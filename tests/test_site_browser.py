"""The built site in a real browser: Debian's Chromium driven by Playwright.

Two sites are built: the repository's, and the fixture's (which has a notebook with stored
outputs). Both are served over HTTP on 127.0.0.1 under sub-paths, and every page is opened at a
desktop width (1400 px) and a phone width (390 px). For every page: no console error, no failed
request, no request leaving 127.0.0.1, math rendered (no raw LaTeX in the visible text), prose and
code side by side on the desktop and stacked on the phone, the theme toggle and the search work.
Then every local link is checked against the pages' files and ids, and a page is opened from
`file://`. Screenshots go to `test-artifacts/site/`.
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
      s => s.querySelector(".prose > :not(.section-link)") && s.querySelector(":scope > .code .codeblock")).map(s => {
    const p = s.querySelector(".prose").getBoundingClientRect(), c = s.querySelector(":scope > .code").getBoundingClientRect();
    return {id: s.id, pl: p.left, pr: p.right, pt: p.top, pb: p.bottom, cl: c.left, cr: c.right, ct: c.top};
  });
  return {
    text: visible.join(" "),
    maths: maths.length,
    // Laid out by the browser's MathML engine (display "math" or "block math"), and not empty.
    emptyMaths: maths.filter(m => { const r = m.getBoundingClientRect();
      return r.width < 1 || r.height < 1 || !getComputedStyle(m).display.includes("math"); }).length,
    shownAnnotations: Array.from(document.querySelectorAll("annotation")).filter(a => getComputedStyle(a).display !== "none").length,
    rows: rowLayout,
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    ids: Array.from(document.querySelectorAll("[id]")).map(e => e.id),
    scrollWidth: document.documentElement.scrollWidth,
    provenance: document.querySelector("#nb-provenance") !== null,
    brokenImages: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
  };
}
"""


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


class Watch:
    """Everything a page does that it should not: console errors, failed or foreign requests."""

    def __init__(self, page, allowed_prefix: str):
        self.problems: list[str] = []
        self.allowed = allowed_prefix
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.on("request", self._request)

    def _request(self, r):
        if not (r.url.startswith(self.allowed) or r.url.startswith("data:") or r.url == "about:blank"):
            self.problems.append(f"request leaving the site: {r.url}")


def page_urls(root: Path, base: str) -> list[tuple[str, str]]:
    out = []
    for site in ("repo", "fixture"):
        for p in sorted((root / site / "_build").glob("*.html")):
            out.append((f"{site}-{p.stem}", f"{base}/{site}/_build/{p.name}"))
    return out


def check_page(page, name: str, url: str, width: int, problems: list[str], seen: dict):
    page.goto(url, wait_until="load")
    page.evaluate("document.fonts.ready")
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
    for r in report["rows"]:
        if width >= 1000:
            if not (r["pr"] <= r["cl"] + 1 and abs(r["pt"] - r["ct"]) < 2):
                problems.append(f"{where}: section {r['id']}: prose and code are not side by side ({r})")
        elif not (r["ct"] >= r["pb"] - 1 and abs(r["pl"] - r["cl"]) < 2):
            problems.append(f"{where}: section {r['id']}: prose and code are not stacked ({r})")
    if width >= 1000 and "side-by-side" not in seen:
        seen["side-by-side"] = 0
    if width >= 1000:
        seen["side-by-side"] = seen.get("side-by-side", 0) + len(report["rows"])
    seen.setdefault("maths", 0)
    seen["maths"] += report["maths"]
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

    desktop = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="light")
    phone = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="light",
                                device_scale_factor=1, is_mobile=True, has_touch=True)
    for ctx, width in ((desktop, 1400), (phone, 390)):
        page = ctx.new_page()
        watch = Watch(page, base + "/")
        for name, url in pages:
            report = check_page(page, name, url, width, problems, seen)
            page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"))
            if width == 1400:
                if report["provenance"] or name.endswith("-index"):  # notebooks and the index, whole
                    page.screenshot(path=str(ARTIFACTS / f"{name}-{width}-full.png"), full_page=True)
                links[url] = set(report["links"])
                ids[url] = set(report["ids"])
                check_theme_toggle(page, name, problems)
                query = "rotary" if name.startswith("repo") else "softmax"
                if not check_search(page, name, query, problems):
                    continue
            problems += [f"{name} at {width}px: {p}" for p in watch.problems]
            watch.problems.clear()
        page.close()
    desktop.close()
    phone.close()

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
    assert seen.get("maths", 0) > 0, "no math element on any page"
    assert seen.get("side-by-side", 0) > 10, "too few sections with prose and code"
    assert not problems, "\n".join(problems[:40])


def test_search_leads_to_the_section(served, browser):
    root, base = served
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    watch = Watch(page, base + "/")
    page.goto(f"{base}/fixture/_build/index.html")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "search-box"
    page.keyboard.type("softmax weighted")
    first = page.locator("#search-results a").first
    first.wait_for(state="visible", timeout=3000)
    href = first.get_attribute("href")
    assert href.startswith("tiny.html#"), href
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"tiny\.html#"))
    target = page.evaluate("location.hash.slice(1)")
    assert page.locator(f"[id='{target}']").is_visible()
    page.fill("#search-box", "zzzzqqq")
    assert "No results" in page.locator("#search-results").inner_text()
    page.screenshot(path=str(ARTIFACTS / "search-no-results.png"))
    page.fill("#search-box", "attention checked")
    page.locator("#search-results a").first.wait_for(state="visible", timeout=3000)
    page.screenshot(path=str(ARTIFACTS / "search-results.png"))
    assert not watch.problems, watch.problems
    ctx.close()


def test_theme_follows_the_system_and_the_choice_persists(served, browser):
    root, base = served
    url = f"{base}/fixture/_build/tiny.html"
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="dark")
    page = ctx.new_page()
    page.goto(url)
    dark_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") is None
    page.screenshot(path=str(ARTIFACTS / "fixture-tiny-1400-dark.png"))
    page.click("#theme-toggle")  # dark (system) -> light (chosen)
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") == "light"
    light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light_bg != dark_bg
    page.goto(f"{base}/fixture/_build/01_tiny.html")  # the choice holds on the next page
    assert page.evaluate("document.documentElement.getAttribute('data-theme')") == "light"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == light_bg
    ctx.close()
    light = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="light")
    page = light.new_page()
    page.goto(f"{base}/fixture/_build/01_tiny.html")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == light_bg
    page.click("#theme-toggle")
    page.screenshot(path=str(ARTIFACTS / "fixture-01_tiny-1400-dark.png"), full_page=True)
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == dark_bg
    light.close()


def test_copy_button_copies_the_code_without_line_numbers(served, browser):
    root, base = served
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
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
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="dark")
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
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
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
    page.wait_for_url(re.compile(r"^file://.*tiny\.html#"))
    page.wait_for_load_state("networkidle")
    assert page.locator(".output-image img").count() == 0 or True
    page.goto((out / "01_tiny.html").as_uri(), wait_until="networkidle")
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert not watch.problems, watch.problems
    ctx.close()
