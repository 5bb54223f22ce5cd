"""The build: read every module and notebook, render the pages, write them elsewhere, then swap.

Inputs, all under a source root (the repository by default):

* `annotated_src/*.py` and `annotated_src/bench/*.py`: one page per module;
* `notebooks/*.ipynb` with their stored outputs: one page per notebook;
* `annotated_src/__init__.py`: `CHAPTERS` (read with `ast`, without importing the package) gives the
  chapters in reading order, and its docstring opens the index;
* `annotated_src/bench/results.json`, when present: the index's table of headline results.

The output is a directory of flat HTML pages with relative links, plus `assets/`, `images/` and
`notebooks/` (the `.ipynb` files, for download). Nothing in it depends on the time of the build.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import jinja2

from .errors import BuildError
from .highlight import highlight_lines, pygments_css
from .markdown import Renderer
from .sanitize import clean as clean_fragment
from .notebook import Notebook, read_notebook
from .source import Module, parse_module

HERE = Path(__file__).resolve().parent
SITE_NAME = "Attention, Annotated"


# ---------------------------------------------------------------- inputs


def read_chapters(init_path: Path, display: str | None = None) -> list[tuple[str, str]]:
    """`CHAPTERS` from `annotated_src/__init__.py`, read with `ast` (the package imports torch)."""
    if not init_path.exists():
        return []
    shown = display or str(init_path)
    text = init_path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text, filename=str(init_path))
    except SyntaxError as e:
        raise BuildError(shown, e.lineno, f"syntax error: {e.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CHAPTERS" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise BuildError(shown, node.lineno, "CHAPTERS must be a literal list of (module, notebook)") from None
            if not all(isinstance(c, (tuple, list)) and len(c) == 2 and all(isinstance(x, str) for x in c)
                       for c in value):
                raise BuildError(shown, node.lineno, "CHAPTERS must be a list of (module, notebook) string pairs")
            return [tuple(c) for c in value]
    return []


def read_text(path: Path, shown: str) -> str:
    """A source file's text; bytes that are not UTF-8 stop the build at their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BuildError(shown, line, f"invalid UTF-8 (byte 0x{data[e.start]:02x}): a source file is UTF-8") from None


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of every module that gets a page, sorted by name."""
    pkg = root / "annotated_src"
    out = []
    for sub, prefix in ((pkg, ""), (pkg / "bench", "bench")):
        for p in sorted(sub.glob("*.py")) if sub.is_dir() else []:
            if p.name == "__init__.py":
                if prefix:
                    out.append((prefix, p))
            else:
                out.append(((prefix + "." if prefix else "") + p.stem, p))
    return sorted(out)


def read_results(path: Path) -> dict | None:
    """The committed benchmark output (the `--json` of `python -m annotated_src.bench`), or None."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BuildError(path, e.lineno, f"not valid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results", []), list):
        raise BuildError(path, 1, "expected an object with a `results` list")
    return data


def results_rows(data: dict) -> list[dict]:
    """The rows of the headline table, with the ratio against the baseline and the ceiling fraction.

    A row measured on another device than the rest carries its run's ceilings in `extra.ceilings`;
    its fraction is of those, and its case names that device."""
    top = data.get("ceilings") or {}
    results = [r for r in data.get("results", []) if isinstance(r, dict)]
    by_key = {(r.get("suite"), r.get("case"), r.get("name")): r for r in results}
    rows = []
    for r in results:
        ms = r.get("ms")
        ms_ok = isinstance(ms, (int, float)) and ms > 0 and not math.isnan(ms)
        vs = ""
        base = by_key.get((r.get("suite"), r.get("case"), r.get("baseline"))) if r.get("baseline") else None
        if base is not None and ms_ok and isinstance(base.get("ms"), (int, float)):
            vs = f"{base['ms'] / ms:.2f}× vs {r['baseline']}"
        own = (r.get("extra") or {}).get("ceilings") if isinstance(r.get("extra"), dict) else None
        ceil = own if isinstance(own, dict) else top
        case = r.get("case", "")
        if ceil is not top and ceil.get("device") and ceil.get("device") != top.get("device"):
            case = f"{case} ({ceil['device']})"
        frac = ""
        if ms_ok and r.get("bytes_moved") and ceil.get("copy_gbps"):
            gbps = r["bytes_moved"] / (ms * 1e-3) / 1e9
            frac = f"{gbps:,.0f} GB/s = {gbps / ceil['copy_gbps']:.0%} of copy"
        elif ms_ok and r.get("flops"):
            # Judged by the matrix ceiling of the arithmetic done (`flops_dtype`): bf16, or float32
            # with or without TF32; none where the run did not measure that ceiling.
            kind = r.get("flops_dtype", "bf16")
            peak = ceil.get({"bf16": "matmul_tflops", "tf32": "tf32_matmul_tflops", "fp32": "fp32_matmul_tflops"}.get(kind, ""))
            if peak:
                tf = r["flops"] / (ms * 1e-3) / 1e12
                frac = f"{tf:,.1f} TFLOP/s = {tf / peak:.0%} of {kind.upper() if kind != 'bf16' else 'bf16'} matmul"
        rows.append({"suite": r.get("suite", ""), "case": case, "name": r.get("name", ""),
                     "ms": f"{ms:.4g}" if ms_ok else "—", "vs": vs, "frac": frac})
    return rows


# ---------------------------------------------------------------- the site model


@dataclasses.dataclass
class Page:
    file: str  # e.g. `rope.html`
    title: str
    description: str
    kind: str  # "index", "module", "notebook", "results"
    context: dict
    search: list[dict]


PAGE_IDS = {"page-top", "page-main", "search-box", "search-results", "theme-toggle", "toc", "toc-toggle",
            "toc-panel", "lightbox", "nb-provenance", "chapters-h", "results-h", "others-h", "othernb-h"}
# A module named `<chapter>_fast` is the fast path of that chapter: "how it is made fast".
FAST_SUFFIX = "_fast"


def module_page_name(name: str) -> str:
    return f"{name}.html"


def notebook_page_name(name: str) -> str:
    return f"{name}.html"


def resolve_definition(modules: dict[str, Module], module: str, name: str, seen=()) -> tuple[str, str] | None:
    """(page, anchor) of `name` as seen from `annotated_src.<module>`, following re-exports; None if absent."""
    mod = modules.get(module)
    if mod is None or (module, name) in seen:
        return None
    if not name:
        return module_page_name(module), ""
    if name in mod.definitions:
        return module_page_name(module), name
    if name in mod.imports:
        src, orig = mod.imports[name]
        if src.startswith("."):
            base = module.split(".")[:-1] if not mod.path.endswith("__init__.py") else module.split(".")
            up = len(src) - len(src.lstrip("."))
            parts = base[: len(base) - (up - 1)] if up > 1 else base
            target = ".".join(parts + ([src.lstrip(".")] if src.lstrip(".") else []))
        elif src == "annotated_src":
            target = ""
        elif src.startswith("annotated_src."):
            target = src[len("annotated_src."):]
        else:
            return None
        # A module imported by name from its package: `from annotated_src import _kernels as k`.
        sub = f"{target}.{orig}" if target and orig else orig
        if sub and sub in modules:
            return module_page_name(sub), ""
        return resolve_definition(modules, target, orig, seen + ((module, name),))
    # A submodule imported by name from a package: `from annotated_src.bench import core`.
    if f"{module}.{name}" in modules:
        return module_page_name(f"{module}.{name}"), ""
    return None


def imported_modules(mod: Module, modules: dict[str, Module]) -> list[str]:
    """The modules of the package that `mod` imports, anywhere in its file, in name order."""
    out = set()
    for src, name in mod.package_imports:
        sub = f"{src}.{name}" if src and name else name
        if sub and sub in modules:
            out.add(sub)
        elif src in modules:
            out.add(src)
    out.discard(mod.name)
    return sorted(out)


_HEADER_ANCHOR = re.compile(r'<a class="header-anchor"[^>]*>.*?</a>', re.S)


def _plain(html_text: str) -> str:
    text = re.sub(r"<annotation[^>]*>.*?</annotation>", " ", html_text, flags=re.S)
    text = re.sub(r'<a class="header-anchor"[^>]*>.*?</a>', " ", text, flags=re.S)
    text = text.replace("<msqrt>", "√")
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _toc(r: Renderer, fallback: list[tuple[str, str]] = ()) -> list[dict]:
    """The page's table of contents: its headings below the title (or `fallback` (id, label) pairs when
    the page has fewer than two)."""
    heads = [(lvl, hid, inline) for lvl, hid, inline in r.headings if hid]
    if heads and heads[0][0] == 1 and sum(1 for h in heads if h[0] == 1) == 1:
        heads = heads[1:]  # the page's own title
    top = min((lvl for lvl, _, _ in heads), default=2)
    items = [{"level": lvl - top, "id": hid,
              "html": clean_fragment(re.sub(r"</?a\b[^>]*>", "", re.sub(_HEADER_ANCHOR, "", inline))),
              "label": _plain(inline)}
             for lvl, hid, inline in heads if lvl - top <= 1]
    if len(items) < 2 and fallback:
        items = [{"level": 0, "id": i, "html": f"<code>{html.escape(label)}</code>", "label": label}
                 for i, label in fallback]
    return items


def _section_heading(r: Renderer, before: int, above: tuple[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    """(id, text) of the heading a section is found under (the first heading in it, else the one above
    it), and of the heading the next section sits under (the last one so far)."""
    if len(r.headings) > before:
        first, last = r.headings[before], r.headings[-1]
        return (first[1], _plain(first[2])), (last[1], _plain(last[2]))
    return above, above


def _line_anchors(lines: list[int]) -> str:
    return "".join(f'<span class="line-anchor" id="L{n}"></span>' for n in lines)


def _search_entries(title: str, page: str, sections: list[dict]) -> list[dict]:
    """One search entry per heading of the page (the sections under one heading are one hit, and so
    are the sections above the first heading)."""
    out: list[dict] = []
    for s in sections:
        key = s["heading_id"] or ""
        text = s["search_text"]
        if out and out[-1]["_key"] == key:
            out[-1]["x"] = (out[-1]["x"] + " " + text)[:2000]
            continue
        if not text.strip() and not key:
            continue
        out.append({"_key": key, "t": title, "h": s["heading"], "u": f"{page}#{key or s['id']}", "x": text[:2000]})
    for e in out:
        del e["_key"]
    return out


def render_module_page(mod: Module, chapter: dict | None, rel_path: str, link_map: dict | None = None,
                       modules: dict[str, Module] | None = None, extra: dict | None = None) -> Page:
    r = Renderer(reserved_ids=set(mod.definitions) | PAGE_IDS, link_map=link_map)
    # Names this module imports from another chapter or helper link to their definitions.
    code_links = {}
    for name in sorted(mod.imports):
        target = resolve_definition(modules or {}, mod.name, name)
        if target is not None and target[0] != module_page_name(mod.name):
            code_links[name] = target[0] + (f"#{target[1]}" if target[1] else "")
    source_lines = mod.source.splitlines()
    lines_html = highlight_lines(mod.source, code_links)
    def_lines = {line: name for name, line in sorted(mod.definitions.items(), key=lambda kv: kv[0], reverse=True)}
    # Every line of the file has an anchor (`#L300`): code lines on the code, the lines that became
    # prose (comments, docstrings) just before the prose they became, the rest at their section's top.
    shown = {n for s in mod.sections for n, _ in s.trimmed_code()}
    starts = [s.first_line for s in mod.sections]
    hidden: dict[int, list[int]] = {}
    for n in range(1, len(source_lines) + 1):
        if n not in shown:
            k = max([i for i, first in enumerate(starts) if first <= n], default=0)
            hidden.setdefault(k, []).append(n)
    sections, above, before = [], ("", html.escape(mod.title)), 0
    for k, s in enumerate(mod.sections):
        chunks = sorted(s.prose)
        rest = hidden.get(k, [])
        prose = _line_anchors([n for n in rest if not chunks or n < chunks[0][0]])
        for j, (line, text) in enumerate(chunks):
            end = chunks[j + 1][0] if j + 1 < len(chunks) else None
            prose += _line_anchors([n for n in rest if n >= line and (end is None or n < end)])
            prose += r.render(text, path=rel_path, first_line=line)
        code = [{"n": n, "html": lines_html[n - 1], "anchor": def_lines.get(n), "indent": _indent(t)}
                for n, t in s.trimmed_code()]
        sid = r.unique_id(f"s{s.first_line}")
        heading, above = _section_heading(r, before, above)
        before = len(r.headings)
        sections.append({"id": sid, "prose": prose, "code": code, "text": "\n".join(t for _, t in s.trimmed_code()),
                         "heading_id": heading[0], "heading": heading[1],
                         "search_text": _plain(prose)})
    fallback = [(name, name) for name, _ in sorted(mod.definitions.items(), key=lambda kv: kv[1])
                if mod.kinds.get(name) in ("def", "class") and "." not in name]
    search = _search_entries(mod.title, module_page_name(mod.name), sections)
    page = module_page_name(mod.name)
    for name, _line in sorted(mod.definitions.items(), key=lambda kv: kv[1]):
        if mod.kinds.get(name) in ("def", "class"):
            search.append({"k": "d", "t": mod.title, "h": name, "u": f"{page}#{name}",
                           "x": _plain(Renderer().render(mod.doc_summaries.get(name, ""), path=rel_path))[:200]})
    ctx = {"module": mod, "sections": sections, "chapter": chapter, "rel_path": rel_path,
           "toc": _toc(r, fallback), **(extra or {})}
    return Page(page, mod.title, mod.summary, "module", ctx, search)


def _indent(line: str) -> int:
    """The indentation of a code line, in characters: a wrapped line continues under its own code."""
    return len(line) - len(line.lstrip(" "))


def render_notebook_page(nb: Notebook, modules: dict[str, Module], chapter: dict | None, rel_path: str,
                         title: str, root_names: frozenset = frozenset(),
                         link_map: dict | None = None, extra: dict | None = None) -> tuple[Page, list]:
    r = Renderer(reserved_ids=set(PAGE_IDS), link_map=link_map)
    links = {}
    for name, (module, orig, cell, line) in sorted(nb.imports.items()):
        target = resolve_definition(modules, module, orig)
        if target is None and not orig and module in root_names:
            target = ("index.html", "")  # a name of the package itself: `from annotated_src import CHAPTERS`
        if target is None:
            what = f"annotated_src.{module}.{orig}" if orig else f"annotated_src.{module}"
            raise BuildError(rel_path, nb.json_line(cell, line),
                             f"cell {cell + 1} line {line}: cross-link to missing name {what}")
        page, anchor = target
        links[name] = page + (f"#{anchor}" if anchor else "")
    rows, images = [], []
    above, before = ("", html.escape(title)), 0
    for row in nb.rows:
        prose = ""
        for cell, text in row.prose:
            prose += r.render(text, path=rel_path, first_line=nb.json_line(cell, 1) or 1)
        outputs = []
        for o in row.outputs:
            if o.kind == "image":
                images.append((o.content, o.data))
                size = {}
                if o.data[:8] == b"\x89PNG\r\n\x1a\n" and len(o.data) >= 24:  # the IHDR chunk: width, height
                    size = {"width": int.from_bytes(o.data[16:20], "big"), "height": int.from_bytes(o.data[20:24], "big")}
                outputs.append({"kind": "image", "src": f"images/{o.content}", "cell": row.cell_index, "size": size})
            elif o.kind == "markdown":
                outputs.append({"kind": "html", "html": r.render(o.content, path=rel_path, first_line=nb.json_line(row.cell_index, 1) or 1)})
            elif o.kind in ("html", "svg"):
                outputs.append({"kind": o.kind, "html": r.clean(o.content)})
            else:
                outputs.append({"kind": o.kind, "text": o.content.rstrip("\n")})
        rid = r.unique_id(f"cell-{row.cell_index if row.cell_index is not None else row.prose[0][0]}")
        code = None
        if row.code is not None:
            code = [{"n": i + 1, "html": h, "anchor": None, "indent": _indent(t)}
                    for i, (h, t) in enumerate(zip(highlight_lines(row.code.rstrip("\n"), links),
                                                   row.code.rstrip("\n").split("\n")))]
        heading, above = _section_heading(r, before, above)
        before = len(r.headings)
        text = _plain(prose) + " " + " ".join(o.get("text", "") for o in outputs)
        rows.append({"id": rid, "prose": prose, "code": code, "text": (row.code or "").rstrip("\n"),
                     "outputs": outputs, "cell": row.cell_index, "count": row.execution_count,
                     "heading_id": heading[0], "heading": heading[1], "search_text": text.strip()})
    search = _search_entries(f"{title} (notebook)", notebook_page_name(nb.name), rows)
    ctx = {"nb": nb, "rows": rows, "chapter": chapter, "rel_path": rel_path,
           "download": f"notebooks/{nb.name}.ipynb", "provenance": nb.provenance, "toc": _toc(r), **(extra or {})}
    return Page(notebook_page_name(nb.name), title, "", "notebook", ctx, search), images


def repository_url(root: Path, given: str | None) -> str | None:
    """Where the sources can be read online: `given`, or `[project.urls]` Repository/Source in
    `pyproject.toml`; a `{path}` in it is replaced by the file's path, else `/blob/HEAD/<path>` follows it."""
    if given:
        return given
    path = root / "pyproject.toml"
    if not path.exists():
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10: no TOML reader in the standard library
        return None
    try:
        urls = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("urls", {})
    except tomllib.TOMLDecodeError as e:
        raise BuildError("pyproject.toml", getattr(e, "lineno", None), f"invalid TOML: {e}") from None
    for key, value in urls.items():
        if key.lower().replace(" ", "").replace("-", "") in ("repository", "source", "sourcecode", "code"):
            return str(value)
    return None


def source_link(repo: str | None, path: str) -> str | None:
    if not repo:
        return None
    return repo.replace("{path}", path) if "{path}" in repo else f"{repo.rstrip('/')}/blob/HEAD/{path}"


def chapter_roles(chapters: list[tuple[str, str]], modules: dict[str, Module]) -> dict[str, tuple[int, str]]:
    """module -> (chapter index, role): "lesson", "fast" (`<lesson>_fast`), or "kernels" for a private
    module (`_x`) that only one chapter's lesson and fast path import."""
    roles: dict[str, tuple[int, str]] = {}
    for i, (mod, _) in enumerate(chapters):
        if mod in modules:
            roles[mod] = (i, "lesson")
        if mod + FAST_SUFFIX in modules:
            roles[mod + FAST_SUFFIX] = (i, "fast")
    users: dict[str, set[int]] = {}
    for name, (i, _) in list(roles.items()):
        for dep in imported_modules(modules[name], modules):
            users.setdefault(dep, set()).add(i)
    for dep, chapters_using in users.items():
        if dep not in roles and dep.rsplit(".", 1)[-1].startswith("_") and len(chapters_using) == 1:
            roles[dep] = (next(iter(chapters_using)), "kernels")
    return roles


def headline_results(rows: list[dict]) -> list[dict]:
    """The index's share of the results: per suite, the rows of its first case, with the speed-up alone."""
    out: dict[str, dict] = {}
    for r in rows:
        suite = out.setdefault(r["suite"], {"suite": r["suite"], "case": r["case"], "rows": []})
        if r["case"] == suite["case"]:
            speedup = r["vs"].split(" vs ", 1)
            suite["rows"].append({"name": r["name"], "ms": r["ms"], "speedup": speedup[0],
                                  "baseline": speedup[1] if len(speedup) > 1 else ""})
    return list(out.values())


def collect(root: Path, repo_url: str | None = None) -> tuple[list[Page], list, list[tuple[str, str]]]:
    """Every page of the site (and the images and files to copy), built from `root`."""
    root = root.resolve()
    chapters = read_chapters(root / "annotated_src" / "__init__.py", "annotated_src/__init__.py")
    repo = repository_url(root, repo_url)
    modules: dict[str, Module] = {}
    for name, path in module_files(root):
        rel = path.relative_to(root).as_posix()
        modules[name] = parse_module(read_text(path, rel), path=rel, name=name)
    notebooks: dict[str, Notebook] = {}
    nb_dir = root / "notebooks"
    for p in sorted(nb_dir.glob("*.ipynb")) if nb_dir.is_dir() else []:
        rel = p.relative_to(root).as_posix()
        notebooks[p.stem] = read_notebook(p.read_bytes(), path=rel, name=p.stem)
    clash = sorted(set(modules) & set(notebooks))
    if clash:
        raise BuildError(notebooks[clash[0]].path, 1, f"a module and a notebook are both named {clash[0]!r}: "
                         "their pages would be one file")

    index_renderer = Renderer(reserved_ids=set(PAGE_IDS))

    def summary_html(m: Module) -> str:
        return index_renderer.render_inline(m.summary, path=m.path, line=m.intro_line) if m.summary else ""

    roles = chapter_roles(chapters, modules)
    chapter_of_nb, chapter_list = {}, []
    for i, (mod, nb) in enumerate(chapters, start=1):
        fast = mod + FAST_SUFFIX
        info = {"number": i, "module": mod, "notebook": nb, "prev": None, "next": None,
                "module_page": module_page_name(mod) if mod in modules else None,
                "notebook_page": notebook_page_name(nb) if nb in notebooks else None,
                "fast_page": module_page_name(fast) if fast in modules else None, "fast_module": fast,
                "fast_title": modules[fast].title if fast in modules else "",
                "kernels": [{"name": n, "page": module_page_name(n), "title": modules[n].title}
                            for n, (k, role) in sorted(roles.items()) if k == i - 1 and role == "kernels"],
                "title": modules[mod].title if mod in modules else mod.replace("_", " "),
                "summary": modules[mod].summary if mod in modules else "",
                "summary_html": summary_html(modules[mod]) if mod in modules else "",
                "notebook_title": notebooks[nb].title if nb in notebooks else nb}
        chapter_list.append(info)
        chapter_of_nb[nb] = info
    for a, b in zip(chapter_list, chapter_list[1:]):
        a["next"], b["prev"] = b, a

    root_names = frozenset()
    init_path = root / "annotated_src" / "__init__.py"
    if init_path.exists():
        pkg = parse_module(read_text(init_path, "annotated_src/__init__.py"), path="annotated_src/__init__.py",
                           name="annotated_src")
        root_names = frozenset(pkg.definitions)
    # Links in prose to `notebooks/x.ipynb`, `x.ipynb`, `annotated_src/x.py`, `x.py` go to their pages.
    link_map: dict[str, str] = {}
    for name, nb in notebooks.items():
        for key in (nb.path, f"{name}.ipynb", f"notebooks/{name}.py", f"{name}.py"):
            link_map.setdefault(key, notebook_page_name(name))
    # A bare `x.py` goes to the top-level module before a `bench/x.py` of the same name.
    for name, mod in sorted(modules.items(), key=lambda item: item[0].count(".")):
        link_map[mod.path] = module_page_name(name)
        link_map.setdefault(mod.path.split("/", 1)[1], module_page_name(name))
        link_map.setdefault(Path(mod.path).name, module_page_name(name))

    uses = {name: imported_modules(mod, modules) for name, mod in modules.items()}
    used_by: dict[str, list[str]] = {}
    for name, deps in uses.items():
        for d in deps:
            used_by.setdefault(d, []).append(name)

    def ref(n: str) -> dict:
        return {"name": n, "page": module_page_name(n), "title": modules[n].title}

    pages, images, files = [], [], []
    for name, mod in modules.items():
        k, role = roles.get(name, (None, None))
        chapter = chapter_list[k] if k is not None else None
        extra = {"role": role, "uses": [ref(n) for n in uses[name]],
                 "used_by": [ref(n) for n in sorted(used_by.get(name, []))],
                 "source": {"href": f"source/{mod.path}", "repo": source_link(repo, mod.path), "path": mod.path}}
        pages.append(render_module_page(mod, chapter, mod.path, link_map, modules, extra))
        files.append((f"source/{mod.path}", (root / mod.path).read_bytes()))
    for name, nb in notebooks.items():
        extra = {"source": {"href": f"notebooks/{name}.ipynb", "repo": source_link(repo, nb.path), "path": nb.path,
                            "pair": None}}
        pair = root / "notebooks" / f"{name}.py"  # the jupytext pair, when there is one
        if pair.exists():
            extra["source"]["pair"] = f"source/notebooks/{name}.py"
            files.append((f"source/notebooks/{name}.py", pair.read_bytes()))
        page, imgs = render_notebook_page(nb, modules, chapter_of_nb.get(name), nb.path, nb.title, root_names,
                                          link_map, extra)
        pages.append(page)
        images += imgs

    # The index.
    intro_html, intro_title = "", SITE_NAME
    if init_path.exists():
        intro_title = pkg.front.get("title", SITE_NAME)
        # The H1 is the page's own heading: show the rest of the docstring.
        h1 = re.match(r"\A\s*#\s+[^\n]*\n", pkg.intro)
        intro = pkg.intro[h1.end():] if h1 else pkg.intro
        intro_html = index_renderer.render(intro, path="annotated_src/__init__.py",
                                           first_line=pkg.intro_line + (h1.group(0).count("\n") if h1 else 0))
        summary = pkg.summary
    else:
        summary = ""
    others = [{"page": module_page_name(n), "title": m.title, "summary": summary_html(m), "name": n}
              for n, m in modules.items() if n not in roles]
    in_nb_chapters = {c[1] for c in chapters}
    other_nbs = [{"page": notebook_page_name(n), "title": nb.title, "name": n}
                 for n, nb in notebooks.items() if n not in in_nb_chapters]
    results = read_results(root / "annotated_src" / "bench" / "results.json")
    bench = None
    if results is not None:
        ceil = results.get("ceilings") or {}
        rows = results_rows(results)
        bench = {"rows": rows, "headline": headline_results(rows), "device": ceil.get("device", "unknown device"),
                 "torch": results.get("torch", ""), "date": results.get("date", ""), "note": results.get("note", ""),
                 "copy_gbps": ceil.get("copy_gbps"), "matmul_tflops": ceil.get("matmul_tflops"),
                 "failures": results.get("failures") or {}}
        files.append(("source/annotated_src/bench/results.json",
                      (root / "annotated_src" / "bench" / "results.json").read_bytes()))
        pages.append(Page("results.html", "Benchmark results", "Every row of the committed benchmark record.",
                          "results", {"bench": bench, "toc": [], "chapter": None}, []))
    index_ctx = {"site_name": intro_title, "intro": intro_html, "intro_title": intro_title, "chapters": chapter_list,
                 "others": others, "other_notebooks": other_nbs, "bench": bench, "toc": [], "chapter": None}
    index_search = [{"t": intro_title, "h": c["title"], "u": f"index.html#chapter-{c['number']}", "x": c["summary"]}
                    for c in chapter_list]
    pages.insert(0, Page("index.html", intro_title, summary, "index", index_ctx, index_search))
    for page in pages:
        page.context.setdefault("site_name", intro_title)
    files += [(f"notebooks/{n}.ipynb", nb.raw.encode("utf-8")) for n, nb in notebooks.items()]
    return pages, images, files


# ---------------------------------------------------------------- output


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                              autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def write_site(root: Path, out: Path, repo_url: str | None = None) -> list[str]:
    """Render the site from `root` into the empty directory `out`; return the files written."""
    pages, images, files = collect(root, repo_url)
    env = _env()
    written = []

    def put(rel: str, data: bytes | str):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode("utf-8")
        path.write_bytes(data)
        written.append(rel)

    for page in pages:
        template = env.get_template(f"{page.kind}.html")
        put(page.file, template.render(page=page, **page.context))
    for name, blob in images:
        put(f"images/{name}", blob)
    for rel, raw in files:
        put(rel, raw)
    index = [entry for page in pages for entry in page.search]
    # Loaded by the page the first time the reader searches (a script, so that it works from file://).
    put("assets/search-index.js", "window.SEARCH_INDEX = "
        + json.dumps(index, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + ";\n")
    for asset in sorted((HERE / "static").iterdir()):
        put(f"assets/{asset.name}", asset.read_bytes())
    put("assets/pygments.css", pygments_css())
    return sorted(written)


def _remove_stale(out: Path) -> None:
    """Remove what a build killed hard left beside `out`: `.<out>-new-<pid>-*` and `.<out>-old-<pid>-*`
    directories whose process is gone (a build running beside this one keeps its own)."""
    for p in out.parent.glob(f".{out.name}-[no][el][wd]-*"):
        if not p.is_dir() or not re.fullmatch(rf"\.{re.escape(out.name)}-(?:new|old)-.+", p.name):
            continue
        m = re.fullmatch(rf"\.{re.escape(out.name)}-(?:new|old)-(\d+)-.*", p.name)
        # A name without a process id comes from an older generator: stale once it is ten minutes old.
        stale = not _alive(int(m.group(1))) if m else time.time() - p.stat().st_mtime > 600
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier build of this process that did not finish
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(root: Path, out: Path, repo_url: str | None = None) -> Path:
    """Build into a fresh directory beside `out`, then swap it in: `out` is never left half-written."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-{os.getpid()}-", dir=out.parent))
    try:
        write_site(root, tmp, repo_url)
        os.chmod(tmp, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-{os.getpid()}-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"
