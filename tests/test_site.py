"""The site generator's pieces, on the small fixture under `tests/fixtures/site/`.

Sectioning of a module, notebook cells to rows, math, cross-links, the results table, bad input
(each stops the build naming the file and the line, and leaves the previous site untouched), and a
deterministic build.
"""

from __future__ import annotations

import filecmp
import functools
import html.parser
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "site"
# The generator lives in `site/sitegen` (`site` is not a package: Python has a `site` module).
sys.path.append(str(REPO / "site"))  # appended: `site/build.py` must not shadow a `build` module

from sitegen.build import build, read_chapters, read_results, resolve_definition, results_rows  # noqa: E402
from sitegen.errors import BuildError  # noqa: E402
from sitegen.highlight import highlight_lines  # noqa: E402
from sitegen.markdown import Renderer, latex_to_mathml, split_clauses, split_front_matter  # noqa: E402
from sitegen.notebook import notebook_imports, read_notebook  # noqa: E402
from sitegen.sanitize import clean  # noqa: E402
from sitegen.source import parse_module  # noqa: E402

TINY = FIXTURE / "annotated_src" / "tiny.py"
NOTEBOOK = FIXTURE / "notebooks" / "01_tiny.ipynb"


def tiny_module():
    return parse_module(TINY.read_text(), path="annotated_src/tiny.py", name="tiny")


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "_build"
    build(FIXTURE, out)
    return out


def copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(FIXTURE, root)
    return root


# ---------------------------------------------------------------- sectioning of source


def test_front_matter_becomes_title_and_summary():
    mod = tiny_module()
    assert mod.title == "Tiny attention"
    assert mod.summary == "Scaled dot-product attention in a few lines, to test the site."
    assert "---" not in mod.intro and mod.intro.lstrip().startswith("# Tiny attention")


def test_module_without_front_matter_falls_back_to_name_and_first_line():
    path = FIXTURE / "annotated_src" / "helpers.py"
    mod = parse_module(path.read_text(), path="annotated_src/helpers.py", name="helpers")
    assert mod.title == "helpers"
    assert mod.summary.startswith("Argument checks for the fixture package")


def test_sections_pair_prose_with_the_code_that_follows_with_real_line_numbers():
    mod = tiny_module()
    lines = TINY.read_text().splitlines()
    # The module docstring is the first section's prose, beside the imports.
    assert "# Tiny attention" in mod.sections[0].prose[0][1]
    assert mod.sections[0].trimmed_code()[0] == (line_of(TINY, "from __future__"), "from __future__ import annotations")
    # Every code line keeps its number in the file.
    for s in mod.sections:
        for n, text in s.code:
            assert lines[n - 1] == text
    by_prose = {s.prose[0][1].splitlines()[0] if s.prose else "": s for s in mod.sections}
    scale_section = by_prose[r"## The scale $1/\sqrt{d}$"]
    assert [t for _, t in scale_section.trimmed_code()] == ['SCALE_NOTE = "1 / sqrt(d)"']
    assert scale_section.prose[0][0] == line_of(TINY, "# ## The scale")


def test_docstring_joins_the_comments_above_its_def_and_leaves_the_code_column():
    mod = tiny_module()
    section = next(s for s in mod.sections if s.prose and s.prose[0][1].startswith("## Attention"))
    texts = [t for _, t in section.prose]
    assert texts[1].startswith("Softmax-weighted sum of `v`")
    # Docstring values are read with their escapes resolved: `\\sqrt` in the source is `\sqrt`.
    assert r"\sqrt{d}" in texts[1] and r"\\sqrt" not in texts[1]
    code = [t for _, t in section.trimmed_code()]
    assert code[0] == "def attention(q, k, v):"
    assert not any('"""' in t for t in code)


def test_docstring_without_comments_above_starts_its_own_section_with_the_def_line():
    mod = tiny_module()
    section = next(s for s in mod.sections if s.prose and s.prose[0][1].startswith("The factor"))
    assert [t for _, t in section.trimmed_code()][0] == "def scale(d: int) -> float:"
    cls = next(s for s in mod.sections if s.prose and s.prose[0][1].startswith("A module-like wrapper"))
    assert "It holds nothing but" in cls.prose[0][1]
    assert [t for _, t in cls.trimmed_code()][0] == "class Tiny:"


def test_a_comment_inside_a_function_splits_the_code():
    mod = tiny_module()
    section = next(s for s in mod.sections if s.prose and s.prose[0][1].startswith("The scores"))
    assert [t for _, t in section.trimmed_code()][0].strip().startswith("scores = ")


def test_definitions_and_imports_are_found():
    mod = tiny_module()
    assert mod.definitions["attention"] == line_of(TINY, "def attention(")
    assert mod.definitions["Tiny"] == line_of(TINY, "class Tiny")
    assert mod.definitions["Tiny.__call__"] == line_of(TINY, "def __call__")
    assert mod.definitions["SCALE_NOTE"] == line_of(TINY, "SCALE_NOTE =")
    assert mod.imports["check_positive"] == ("annotated_src.helpers", "check_positive")


def test_syntax_error_names_file_and_line():
    with pytest.raises(BuildError, match=r"^annotated_src/bad\.py:3: syntax error"):
        parse_module("x = 1\n\ndef f(:\n    pass\n", path="annotated_src/bad.py", name="bad")


def test_backslash_escape_in_a_non_raw_docstring_names_file_and_line():
    source = 'def f():\n    """Logits\n\n    $q^\\top k$."""\n'
    assert "\\top" in source  # the file holds a backslash and a t, which Python reads as a tab
    with pytest.raises(BuildError, match=r"^m\.py:4: the docstring holds a tab"):
        parse_module(source, path="m.py", name="m")
    parse_module(source.replace('"""Logits', 'r"""Logits'), path="m.py", name="m")


def test_highlight_keeps_one_html_string_per_line_and_links_names():
    code = 'x = """a\nb"""\nattention(x)'
    out = highlight_lines(code, {"attention": "tiny.html#attention"})
    assert len(out) == 3
    assert '<a class="xref' in out[2] and 'href="tiny.html#attention"' in out[2]
    assert "&lt;" in highlight_lines("a < b")[0]


# ---------------------------------------------------------------- math and markdown


def test_latex_becomes_mathml_with_the_source_as_annotation():
    out = latex_to_mathml(r"\frac{a}{\sqrt{d}}", display=True, path="p.py", line=4)
    assert out.startswith("<math") and 'display="block"' in out and "<mfrac>" in out
    assert '<annotation encoding="application/x-tex">\\frac{a}{\\sqrt{d}}</annotation>' in out


@pytest.mark.parametrize("latex", [r"\frac{1}{", r"x^{", r"\begin{pmatrix} a", r"\notacommand x", ""])
def test_broken_latex_names_file_and_line(latex):
    with pytest.raises(BuildError, match=r"^m\.py:12: "):
        latex_to_mathml(latex, display=False, path="m.py", line=12)


def test_markdown_leaves_no_dollar_and_reports_the_line_of_broken_math():
    html = Renderer().render("Inline $a_i$ and\n\n$$\\sum_j w_j = 1$$\n\nA price of 5$ stays.", path="x.md")
    assert "<math" in html and 'display="block"' in html
    assert html.count("$") == 1  # only the literal one, which is not math
    with pytest.raises(BuildError, match=r"^x\.py:13: broken LaTeX"):
        Renderer().render("one\n\ntwo\n\nthree $\\frac{1}{$ four", path="x.py", first_line=9)


def test_operator_names_and_functions_are_set_as_names():
    out = latex_to_mathml(r"\operatorname{RoPE}(q) + \cos x", display=False, path="p", line=1)
    assert "<mi>RoPE</mi>" in out and "<mo>RoPE</mo>" not in out
    assert '<mi>cos</mi><mspace width="0.1667em"></mspace>' in out


@pytest.mark.parametrize("latex, wanted, unwanted", [
    # `\bmod` is a binary operator with TeX's medium spaces, not a name glued to its neighbours.
    (r"j \bmod r", '<mo lspace="0.2222em" rspace="0.2222em">mod</mo>', "<mi>mod</mi>"),
    # `/` is an ordinary symbol: no operator spacing around it.
    (r"a/b", '<mi>a</mi><mo lspace="0em" rspace="0em">/</mo><mi>b</mi>', "<mo>/</mo>"),
    (r"10000^{-2i/d}", '<mo lspace="0em" rspace="0em">/</mo>', "<mo>/</mo>"),
    # A prime follows its letter (its glyph is already raised): never a superscript of it.
    (r"k'", '<mi>k</mi><mo lspace="0em" rspace="0em">′</mo>', "<msup>"),
    (r"x_i^\prime", '<msub><mi>x</mi><mi>i</mi></msub><mo lspace="0em" rspace="0em">′</mo>', "<msubsup>"),
    (r"f''(x)", '<mi>f</mi><mo lspace="0em" rspace="0em">″</mo>', "<msup>"),
])
def test_math_spacing_follows_tex(latex, wanted, unwanted):
    out = latex_to_mathml(latex, display=False, path="p", line=1)
    assert wanted in out and unwanted not in out.split("<annotation")[0], out


def test_a_display_of_several_clauses_is_cut_at_qquad_only_at_the_top_level():
    assert split_clauses(r"a = b, \qquad c = \left( x \qquad y \right), \qquad "
                         r"\begin{pmatrix} a \qquad b \\ c \end{pmatrix} \qquad {x \qquad y}") == [
        "a = b,", r"c = \left( x \qquad y \right),", r"\begin{pmatrix} a \qquad b \\ c \end{pmatrix}", r"{x \qquad y}"]
    html = Renderer().render("$$k = W_K x, \\qquad v = W_V x$$", path="x")
    assert html.count('<span class="math-clause"><math') == 2 and 'class="math-display math-clauses"' in html
    assert html.count('display="block"') == 2


def test_prose_links_to_sources_and_notebooks_go_to_their_pages():
    r = Renderer(link_map={"annotated_src/tiny.py": "tiny.html", "01_tiny.ipynb": "01_tiny.html"})
    html = r.render("[a](../annotated_src/tiny.py#L3) [b](01_tiny.ipynb) [c](https://example.org/x.py) [d](#here)",
                    path="x")
    assert 'href="tiny.html#L3"' in html and 'href="01_tiny.html"' in html
    assert 'href="https://example.org/x.py"' in html and 'href="#here"' in html
    # A path written as code is a link too (not inside another link, and only a known file).
    html = r.render("See `annotated_src/tiny.py`, [`annotated_src/tiny.py`](x.html), `tiny.py` and `annotated_src/no.py`.",
                    path="x")
    assert html.count('href="tiny.html"') == 1 and 'href="x.html"' in html
    assert "<code>tiny.py</code>" in html and "<code>annotated_src/no.py</code>" in html


def test_heading_ids_are_unique_across_one_page():
    r = Renderer(reserved_ids={"attention"})
    html = r.render("## Attention\n\ntext", path="a") + r.render("## Attention", path="a")
    assert 'id="attention-2"' in html and 'id="attention-3"' in html


def test_front_matter_lines_with_a_colon_in_the_value():
    fields, rest, line = split_front_matter("---\ntitle: Fast\nsummary: The step: five kernels, one graph.\n---\n# x\n",
                                            path="f.py", first_line=2)
    assert fields == {"title": "Fast", "summary": "The step: five kernels, one graph."} and rest == "# x\n"
    assert line == 6


def test_invalid_front_matter_names_the_line():
    with pytest.raises(BuildError, match=r"^f\.py:\d+: invalid front matter"):
        split_front_matter("---\ntitle: x\n  nested: [unclosed\n---\n# x\n", path="f.py", first_line=2)


# ---------------------------------------------------------------- notebooks


def test_notebook_cells_to_rows_with_outputs_and_provenance():
    nb = read_notebook(NOTEBOOK.read_text(), path="notebooks/01_tiny.ipynb", name="01_tiny")
    assert nb.title == "Tiny attention, checked"
    assert nb.provenance == {"date": "2026-11-25", "torch": "2.11.0+cu130", "python": "3.11.9",
                             "device": "NVIDIA H100 80GB HBM3", "cuda": "13.0"}
    # Markdown cells go with the code cell after them; trailing Markdown gets a row of its own.
    assert [len(r.prose) for r in nb.rows] == [1, 0, 1, 0, 0, 1]
    assert nb.rows[0].code.startswith("from annotated_src.notebook_utils")
    assert nb.rows[-1].code is None and "weights sum" in nb.rows[-1].prose[0][1]
    kinds = [[o.kind for o in r.outputs] for r in nb.rows]
    assert kinds == [["stream"], [], ["stream"], ["image"], ["html"], []]
    image = nb.rows[3].outputs[0]
    assert image.data.startswith(b"\x89PNG") and image.content.endswith(".png")


def test_notebook_imports_and_their_lines():
    src = "import torch\nfrom annotated_src.tiny import (Tiny,\n    attention as att)\nfrom annotated_src import helpers\n%time x = 1"
    assert notebook_imports(src) == {"Tiny": ("tiny", "Tiny", 2), "att": ("tiny", "attention", 3),
                                     "helpers": ("helpers", "", 4)}


def test_invalid_notebook_json_names_file_and_line():
    raw = NOTEBOOK.read_text().replace('"cell_type": "code"', '"cell_type" "code"', 1)
    line = next(i for i, x in enumerate(raw.splitlines(), 1) if '"cell_type" "code"' in x)
    with pytest.raises(BuildError, match=rf"^notebooks/x\.ipynb:{line}: not valid JSON"):
        read_notebook(raw, path="notebooks/x.ipynb", name="x")


def test_notebook_that_is_json_but_not_a_notebook():
    with pytest.raises(BuildError, match=r"^notebooks/x\.ipynb:1: not a valid notebook"):
        read_notebook('{"cells": 3}', path="notebooks/x.ipynb", name="x")


# ---------------------------------------------------------------- cross-links


def test_cross_links_resolve_definitions_reexports_and_pages():
    mods = {name: parse_module((FIXTURE / "annotated_src" / f"{name}.py").read_text(),
                               path=f"annotated_src/{name}.py", name=name) for name in ("tiny", "helpers")}
    assert resolve_definition(mods, "tiny", "attention") == ("tiny.html", "attention")
    # A name a module imports from another module links to where it is defined.
    assert resolve_definition(mods, "tiny", "check_positive") == ("helpers.html", "check_positive")
    assert resolve_definition(mods, "helpers", "") == ("helpers.html", "")
    assert resolve_definition(mods, "tiny", "nope") is None
    assert resolve_definition(mods, "nope", "x") is None


def test_notebook_page_links_imported_names_to_their_definitions(built):
    page = (built / "01_tiny.html").read_text()
    assert 'href="tiny.html#attention"' in page and 'href="tiny.html#Tiny"' in page
    assert 'href="helpers.html"' in page  # `from annotated_src import helpers`
    module_page = (built / "tiny.html").read_text()
    assert 'id="attention"' in module_page and 'id="Tiny"' in module_page
    # A module's imports from another module of the package link to their definitions too.
    assert 'href="helpers.html#check_positive"' in module_page
    # Module page <-> notebook page.
    assert 'href="01_tiny.html"' in module_page and 'href="tiny.html"' in page


def test_function_local_and_aliased_module_imports_resolve():
    mods = {name: parse_module((FIXTURE / "annotated_src" / f"{name}.py").read_text(),
                               path=f"annotated_src/{name}.py", name=name)
            for name in ("tiny", "tiny_fast", "_tiny_kernels", "helpers")}
    # `from annotated_src import _tiny_kernels as kern`, inside a function.
    assert resolve_definition(mods, "tiny_fast", "kern") == ("_tiny_kernels.html", "")
    assert resolve_definition(mods, "tiny", "tiny_fast") == ("tiny_fast.html", "")
    assert ("", "_tiny_kernels") in mods["tiny_fast"].package_imports


def test_fast_page_and_kernels_are_reachable_from_their_chapter_and_back(built):
    lesson, fast, kernels = ((built / f"{n}.html").read_text() for n in ("tiny", "tiny_fast", "_tiny_kernels"))
    assert 'href="tiny_fast.html" data-rel="fast"' in lesson
    assert 'href="tiny_fast.html">how it is made fast</a>' in lesson  # the prose link to annotated_src/tiny_fast.py
    assert 'href="tiny.html" data-rel="lesson"' in fast and 'href="_tiny_kernels.html" data-rel="uses"' in fast
    assert '<a class="xref n" href="_tiny_kernels.html">kern</a>' in fast
    assert 'href="tiny_fast.html" data-rel="used-by"' in kernels and 'href="tiny.html" data-rel="lesson"' in kernels
    assert "How it is made fast</span>" in fast and "Chapter 1: Tiny attention</a>" in fast  # the breadcrumb
    index = (built / "index.html").read_text()
    chapter = index.split('<li class="chapter"')[1]
    assert 'href="tiny_fast.html">How it is made fast</a>' in chapter and 'href="_tiny_kernels.html"' in chapter
    others = index[index.index('id="others-h"'):]
    assert "tiny_fast.html" not in others and "_tiny_kernels.html" not in others and "helpers.html" in others


def test_every_line_of_a_module_has_an_anchor(built):
    for name in ("tiny", "tiny_fast", "hostile"):
        page = (built / f"{name}.html").read_text()
        n_lines = len((FIXTURE / "annotated_src" / f"{name}.py").read_text().splitlines())
        ids = set(re.findall(r'id="(L\d+)"', page))
        assert ids == {f"L{n}" for n in range(1, n_lines + 1)}, name
    page = (built / "tiny.html").read_text()
    comment = line_of(TINY, "# Dividing by")
    # A comment line's anchor sits just before the prose it became.
    assert re.search(rf'id="L{comment}"></span>(<span class="line-anchor" id="L\d+"></span>)*<h2 id="the-scale', page)


def test_every_page_links_to_its_source(tmp_path, built):
    for name in ("tiny", "_tiny_kernels", "helpers", "bench"):
        page = (built / f"{name}.html").read_text()
        href = re.search(r'<a class="pill source" href="([^"]+)" data-rel="source"', page).group(1)
        assert (built / href).read_bytes() == (FIXTURE / href.removeprefix("source/")).read_bytes()
        assert 'data-rel="repository"' not in page  # no address configured
    assert 'href="notebooks/01_tiny.ipynb" download data-rel="source"' in (built / "01_tiny.html").read_text()
    assert 'data-rel="pair"' not in (built / "01_tiny.html").read_text()  # no jupytext pair in the fixture
    # The repository's address, from pyproject.toml or given.
    root = copy_fixture(tmp_path)
    (root / "pyproject.toml").write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://git.example/x"\n')
    (root / "notebooks" / "01_tiny.py").write_text("# %% [markdown]\n# # Tiny attention, checked\n")
    build(root, tmp_path / "a")
    assert 'href="https://git.example/x/blob/HEAD/annotated_src/tiny.py" data-rel="repository"' in \
        (tmp_path / "a" / "tiny.html").read_text()
    # A notebook's jupytext pair is shipped and linked too.
    assert 'href="source/notebooks/01_tiny.py" data-rel="pair"' in (tmp_path / "a" / "01_tiny.html").read_text()
    assert (tmp_path / "a" / "source" / "notebooks" / "01_tiny.py").read_text().startswith("# %% [markdown]")
    build(root, tmp_path / "b", repo_url="https://code.example/y/{path}?plain=1")
    assert 'href="https://code.example/y/notebooks/01_tiny.ipynb?plain=1" data-rel="repository"' in \
        (tmp_path / "b" / "01_tiny.html").read_text()


def test_pages_have_contents_breadcrumbs_and_chapter_links_top_and_bottom(built):
    page = (built / "tiny.html").read_text()
    toc = page[page.index('<nav class="toc"'):page.index("</nav>", page.index('<nav class="toc"'))]
    assert re.findall(r'href="#([^"]+)"', toc) == ["the-scale", "attention-2", "the-fast-path"]
    assert "header-anchor" not in toc and "<math" in toc  # headings with their math, without the "#"
    assert 'data-label="The scale 1 / √ d"' in toc  # the top bar names the section in plain text
    assert '<li><a href="index.html">All chapters</a></li>' in page
    assert page.count('class="chapter-nav chapter-nav-top"') == 1 and page.count("chapter-nav-bottom") == 1
    # A page without two headings lists its definitions.
    kernels = (built / "_tiny_kernels.html").read_text()
    assert 'href="#weighted_sum"' not in kernels or "<code>weighted_sum</code>" in kernels


def test_search_index_has_one_entry_per_heading_and_the_definitions(built):
    search = (built / "assets" / "search-index.js").read_text()
    entries = json.loads(search[len("window.SEARCH_INDEX = "):].rstrip().rstrip(";"))
    urls = [e["u"] for e in entries]
    assert len(urls) == len(set(urls))
    # No two entries read the same (where and heading), a notebook named like its module included.
    shown = [(e["t"], e["h"]) for e in entries if e.get("k") != "d"]
    assert len(shown) == len(set(shown)), sorted(shown)
    assert any(e["t"] == "Tiny attention, checked (notebook)" for e in entries)
    tiny = [e for e in entries if e["u"].startswith("tiny.html#")]
    assert [e["h"] for e in tiny if e.get("k") != "d"] == ["Tiny attention", "The scale 1 / √ d", "Attention",
                                                           "The fast path"]
    defs = {e["h"]: e for e in tiny if e.get("k") == "d"}
    assert defs["attention"]["u"] == "tiny.html#attention" and defs["attention"]["x"].startswith("Softmax-weighted")
    assert "Tiny.__call__" in defs and "SCALE_NOTE" not in defs
    # Loaded on first use, not by every page.
    assert "search-index.js" not in (built / "tiny.html").read_text()


def test_the_math_font_is_a_small_woff2(built):
    fonts = list((built / "assets").glob("*.woff2"))
    assert len(fonts) == 1 and fonts[0].stat().st_size < 200_000 and not list((built / "assets").glob("*.ttf"))
    assert fonts[0].name in (built / "assets" / "style.css").read_text()


def test_a_module_and_a_notebook_of_one_name_stop_the_build(tmp_path):
    root = copy_fixture(tmp_path)
    shutil.copy(root / "notebooks" / "01_tiny.ipynb", root / "notebooks" / "tiny.ipynb")
    with pytest.raises(BuildError, match=r"^notebooks/tiny\.ipynb:1: a module and a notebook are both named"):
        build(root, tmp_path / "out")


# ---------------------------------------------------------------- the index and chapters


def test_chapters_are_read_without_importing():
    assert read_chapters(FIXTURE / "annotated_src" / "__init__.py") == [("tiny", "01_tiny"),
                                                                       ("missing_chapter", "02_missing")]
    assert read_chapters(REPO / "annotated_src" / "__init__.py")[0] == ("rope", "01_rotary_embeddings")


def test_results_table_rows_and_missing_date(tmp_path):
    data = read_results(FIXTURE / "annotated_src" / "bench" / "results.json")
    rows = results_rows(data)
    assert rows[1]["vs"] == "1.60× vs naive"
    assert rows[0]["frac"] == "1,500 GB/s = 50% of copy"
    assert rows[2]["frac"] == "350.0 TFLOP/s = 50% of bf16 matmul"
    # Float32 work is judged by a float32 ceiling, and by none where the run measured none.
    fp32 = dict(data["results"][2], flops_dtype="fp32")
    assert results_rows(dict(data, results=[fp32]))[0]["frac"] == ""
    ceilings = dict(data["ceilings"], fp32_matmul_tflops=700.0)
    assert results_rows(dict(data, ceilings=ceilings, results=[fp32]))[0]["frac"] == "350.0 TFLOP/s = 50% of FP32 matmul"
    # A row from another device: its own ceilings, and its case names the device.
    other = dict(data["results"][0], extra={"ceilings": {"device": "Other GPU", "copy_gbps": 1500.0}})
    row = results_rows(dict(data, results=[other]))[0]
    assert row["frac"] == "1,500 GB/s = 100% of copy" and row["case"].endswith("(Other GPU)")
    del data["date"]
    p = tmp_path / "results.json"
    p.write_text(json.dumps(data))
    assert read_results(p)["results"] and read_results(tmp_path / "absent.json") is None


def test_index_lists_chapters_in_order_and_marks_missing_ones(built):
    index = (built / "index.html").read_text()
    assert index.index("Tiny attention") < index.index("missing chapter")
    assert 'href="tiny.html"' in index and 'href="01_tiny.html"' in index
    assert "02_missing</code>: not yet available" in index and 'href="02_missing.html"' not in index
    assert "NVIDIA H100 80GB HBM3" in index and "2026-11-25" in index and 'title="vs naive">1.60×' in index
    record = (built / "results.html").read_text()
    assert 'href="results.html"' in index and "1.60× vs naive" in record and "50% of copy" in record


def test_missing_notebook_is_announced_not_linked(tmp_path):
    root = copy_fixture(tmp_path)
    (root / "notebooks" / "01_tiny.ipynb").unlink()
    out = tmp_path / "out"
    build(root, out)
    page = (out / "tiny.html").read_text()
    assert "not yet available" in page and "01_tiny.html" not in page
    assert not (out / "01_tiny.html").exists()


def test_new_module_appears_without_touching_the_generator(tmp_path):
    root = copy_fixture(tmp_path)
    (root / "annotated_src" / "bench" / "tiny.py").write_text('"""Timing of tiny."""\n\n\ndef run(device):\n    return []\n')
    out = tmp_path / "out"
    build(root, out)
    assert (out / "bench.tiny.html").exists()
    assert 'href="bench.tiny.html"' in (out / "index.html").read_text()


def test_build_output_files(built):
    assert (built / "notebooks" / "01_tiny.ipynb").read_bytes() == NOTEBOOK.read_bytes()
    assert len(list((built / "images").glob("*.png"))) == 1
    search = (built / "assets" / "search-index.js").read_text()
    assert search.startswith("window.SEARCH_INDEX = ")
    entries = json.loads(search[len("window.SEARCH_INDEX = "):].rstrip().rstrip(";"))
    assert any(e["u"].startswith("tiny.html#") and "softmax" in e["x"].lower() for e in entries)
    # Search results show headings and text without LaTeX source.
    assert any(e["h"] == "The scale 1 / √ d" for e in entries), sorted({e["h"] for e in entries})
    assert not any(re.search(r"\$|\\[a-z]", e["h"] + e["t"] + e["x"]) for e in entries)
    for page in built.glob("*.html"):
        text = page.read_text()
        namespaces = ('xmlns="http://www.w3.org/1998/Math/MathML"', 'xmlns="http://www.w3.org/2000/svg"')
        assert "http://" not in functools.reduce(lambda s, ns: s.replace(ns, ""), namespaces, text)
        assert 'src="/' not in text and 'href="/' not in text


# ---------------------------------------------------------------- hostile input is made harmless


class Elements(html.parser.HTMLParser):
    """Every element of a page: (tag, attributes, the text of a script or style element)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, dict, str]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs), ""))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_data(self, data):
        if self.found and self.found[-1][0] in ("script", "style"):
            tag, attrs, text = self.found[-1]
            self.found[-1] = (tag, attrs, text + data)


OWN_SCRIPTS = ("assets/site.js",)
# Where a reference to another host may appear: a link the reader follows, never a fetch.
FOLLOWED = {("a", "href")}


def active_content(page_html: str) -> list[str]:
    """What in a page could run, or make a request leave the site, and is not the site's own."""
    bad = []
    for tag, attrs, text in Elements(page_html).found:
        if tag == "script" and not (attrs.get("src") in OWN_SCRIPTS or text.startswith("try{var t=localStorage")):
            bad.append(f"script {attrs} {text[:60]!r}")
        if tag in ("iframe", "frame", "object", "embed", "form", "input", "base", "style", "foreignobject",
                   "animate", "set") or (tag == "meta" and "http-equiv" in attrs):
            bad.append(f"<{tag} {attrs}>")
        if tag == "link" and not (attrs.get("href") or "").startswith("assets/"):
            bad.append(f"<link {attrs}>")
        for name, value in attrs.items():
            value = (value or "").strip()
            if name.startswith("on"):
                bad.append(f"<{tag} {name}={value!r}>")
            if name in ("href", "src", "xlink:href", "action", "data", "srcset", "formaction"):
                remote = re.match(r"^[a-z][a-z0-9+.-]*:|^//", value, re.I) and not value.startswith("data:image/")
                if re.match(r"^\s*javascript:", value, re.I) or remote and (tag, name) not in FOLLOWED:
                    bad.append(f"<{tag} {name}={value!r}>")
            if re.search(r"url\(\s*['\"]?(?!#)", value, re.I):
                bad.append(f"<{tag} {name}={value!r}>")
    return bad


@pytest.mark.parametrize("page", ["hostile.html", "99_hostile.html", "index.html"])
def test_hostile_prose_and_outputs_are_made_harmless(built, page):
    text = (built / page).read_text()
    main = text[text.index("<main"):text.index("</main>")]
    assert active_content(main) == []
    assert [a.get("src") for tag, a, _ in Elements(text).found if tag == "script" and a.get("src")] == list(OWN_SCRIPTS)
    assert "__pwned" not in "".join(t for tag, _, t in Elements(text).found if tag == "script")


def test_sanitising_keeps_what_pages_need(built):
    nb = (built / "99_hostile.html").read_text()
    tags = [tag for tag, _, _ in Elements(nb).found]
    for kept in ("table", "td", "svg", "clippath", "use", "text", "math", "msup", "strong", "img"):
        assert kept in tags, kept
    assert 'xlink:href="#bar"' in nb and 'clip-path="url(#clip-a)"' in nb and 'style="fill:#1f77b4"' in nb
    module = (built / "hostile.html").read_text()
    assert 'src="data:image/gif;base64,' in module and 'href="https://arxiv.org/abs/2104.09864"' in module
    assert '<span class="removed-image">a remote image</span>' in module
    assert "<details" in module and "<summary>A docstring</summary>" in module
    # An id written in the prose never takes one of the page's own.
    assert module.count('id="search-box"') == 1


def test_a_matplotlib_svg_keeps_every_mark():
    figure = pytest.importorskip("matplotlib.figure")
    import io

    fig = figure.Figure(figsize=(3, 2))  # no pyplot: the backend of the session is left alone
    ax = fig.subplots()
    ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label="squares")
    ax.fill_between([0, 1, 2], [0, 1, 2], alpha=0.3)
    ax.legend()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    raw = buf.getvalue()[buf.getvalue().index("<svg"):]
    out = clean(raw)
    assert raw.count("<path") > 5 and raw.count("<use") > 5
    for mark in ("<path", "<use", "<g ", "<clipPath", "clip-path=", 'style="', "<text"):
        assert out.count(mark) == raw.count(mark), mark


@pytest.mark.parametrize("dirty, expected", [
    ('<img src="x.png" onerror="alert(1)">', '<img src="x.png">'),
    ('<a href="javascript:alert(1)">a</a>', "<a>a</a>"),
    ('<a href=" JaVaScRiPt:alert(1)">a</a>', "<a>a</a>"),
    ('<a href="https://example.org/">a</a>', '<a href="https://example.org/">a</a>'),
    ('<img src="//cdn.invalid/x.png" alt="far">', '<span class="removed-image">far</span>'),
    ('<img src="data:image/svg+xml,<svg onload=alert(1)>">', '<span class="removed-image"></span>'),
    ('<p style="color: red; background: url(https://x.invalid/)">p</p>', "<p>p</p>"),
    ('<p style="color: red">p</p>', '<p style="color:red">p</p>'),
    ('<div style="position: fixed; inset: 0; z-index: 99; color: red">over the page</div>',
     '<div style="color:red">over the page</div>'),
    ('<p style="background: u\\72l(https://x.invalid/)">p</p>', "<p>p</p>"),
    ("<svg><use href='https://x.invalid/a.svg#b'></use></svg>", "<svg><use></use></svg>"),
    ("<svg><a xlink:href='javascript:alert(1)'><text>t</text></a></svg>", "<svg><a><text>t</text></a></svg>"),
    ("<math><mi href='javascript:alert(1)'>x</mi></math>", "<math><mi>x</mi></math>"),
    ("<iframe src='https://x.invalid'></iframe><object data='x'></object><embed src='x'>", ""),
    ("<script>alert(1)</script><style>p{}</style><noscript>n</noscript>", "n"),
    ("<form action='https://x.invalid'><input name=q><button>b</button></form>", "b"),
    ("<meta http-equiv=refresh content='0;url=https://x.invalid'><base href='https://x.invalid/'>", ""),
    ("<svg><foreignObject><img src=x onerror=alert(1)></foreignObject></svg>", "<svg></svg>"),
    ("<svg><animate attributeName='href' to='javascript:alert(1)'/></svg>", "<svg></svg>"),
])
def test_sanitiser_removes_what_runs_or_fetches(dirty, expected):
    assert clean(dirty) == expected


# ---------------------------------------------------------------- bad input stops the build


BAD_INPUTS = {
    "syntax error": ("annotated_src/tiny.py", lambda t: t.replace("def scale(d: int)", "def scale(d: int"),
                     "def scale(d: int", "syntax error"),
    "broken LaTeX in a comment": ("annotated_src/tiny.py",
                                  lambda t: t.replace("keeps the scores' variance", r"keeps $\frac{1}{$ variance"),
                                  r"keeps $\frac{1}{$ variance", "broken LaTeX"),
    "invalid notebook JSON": ("notebooks/01_tiny.ipynb", lambda t: t.replace('"execution_count": 3,', '"execution_count": 3,,', 1),
                              '"execution_count": 3,,', "not valid JSON"),
    "broken LaTeX in a notebook": ("notebooks/01_tiny.ipynb", lambda t: t.replace(r"for every query $i$.", r"for every $\\foo$."),
                                   r"for every $\\foo$.", "broken LaTeX"),
    "corrupt base64 image": ("notebooks/01_tiny.ipynb", lambda t: t.replace('"image/png": "iVBORw0KGgo', '"image/png": "iVBOR%w0KGgo', 1),
                             '"image/png": "iVBOR%w0KGgo', "cell 6: output 1: image/png is not valid base64"),
    "image that is not a PNG": ("notebooks/01_tiny.ipynb", lambda t: t.replace('"image/png": "iVBORw0KGgo', '"image/png": "R0lGODlh', 1),
                                '"image/png": "R0lGODlh', "cell 6: output 1: image/png does not hold a PNG image"),
    "cross-link to a missing name": ("notebooks/01_tiny.ipynb", lambda t: t.replace("scale)", "scale, nothing_here)", 1),
                                     "nothing_here", "cross-link to missing name annotated_src.tiny.nothing_here"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_the_build_with_file_and_line_and_keeps_the_old_site(tmp_path, case):
    rel, edit, needle, message = BAD_INPUTS[case]
    root = copy_fixture(tmp_path)
    out = tmp_path / "out"
    build(root, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    index_before = (out / "index.html").read_bytes()
    path = root / rel
    path.write_text(edit(path.read_text()))
    line = line_of(path, needle)
    with pytest.raises(BuildError) as e:
        build(root, out)
    assert e.value.path == rel and e.value.line == line, str(e.value)
    assert message in e.value.message
    # Nothing half-written: the previous site is intact and no temporary directory is left.
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "index.html").read_bytes() == index_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("rel, needle, message", [
    ("notebooks/01_tiny.ipynb", "The output of a single query", "cell 4: invalid UTF-8 (byte 0xff)"),
    ("annotated_src/tiny.py", "keeps the scores' variance", "invalid UTF-8 (byte 0xff)"),
])
def test_invalid_utf8_names_file_line_and_cell(tmp_path, rel, needle, message):
    root = copy_fixture(tmp_path)
    path = root / rel
    line = line_of(path, needle)
    data = path.read_bytes()
    at = data.index(needle.encode())
    path.write_bytes(data[:at] + b"\xff" + data[at:])
    with pytest.raises(BuildError) as e:
        build(root, tmp_path / "out")
    assert (e.value.path, e.value.line) == (rel, line) and message in e.value.message, str(e.value)


def test_stale_build_directories_are_removed_and_ignored(tmp_path):
    out = tmp_path / "_build"
    # What a build killed hard leaves: its fresh directory, or the old one it was swapping out.
    for stale in ("._build-new-999999999-abcd", "._build-old-999999998-efgh", "._build-new-k2j4l1"):
        (tmp_path / stale / "assets").mkdir(parents=True)
    os.utime(tmp_path / "._build-new-k2j4l1", (time.time() - 3600, time.time() - 3600))  # an older generator's
    (tmp_path / "._build-new-fresh").mkdir()  # an older generator's, maybe still running: kept for now
    (tmp_path / ".other").mkdir()
    build(FIXTURE, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["._build-new-fresh", ".other", "_build"]
    ignore = (REPO / "site" / ".gitignore").read_text().split()
    assert ".*-new-*" in ignore and ".*-old-*" in ignore


def test_command_line_prints_the_file_uri_or_the_error(tmp_path, capsys):
    # `site/build.py` is a script, not a module of a package: load it by its path.
    spec = importlib.util.spec_from_file_location("site_build_cli", REPO / "site" / "build.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "site"
    assert cli.main(["--src-root", str(FIXTURE), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"site built: open {(out / 'index.html').as_uri()}"
    root = copy_fixture(tmp_path)
    (root / "annotated_src" / "tiny.py").write_text("def f(:\n")
    assert cli.main(["--src-root", str(root), "--out", str(out)]) == 1
    assert "annotated_src/tiny.py:1: syntax error" in capsys.readouterr().err


# ---------------------------------------------------------------- determinism


def test_building_twice_gives_identical_files(tmp_path, built):
    again = tmp_path / "again"
    build(FIXTURE, again)
    a = sorted(p.relative_to(built) for p in built.rglob("*"))
    b = sorted(p.relative_to(again) for p in again.rglob("*"))
    assert a == b
    files = [str(p) for p in a if (built / p).is_file()]
    match, mismatch, errors = filecmp.cmpfiles(built, again, files, shallow=False)
    assert not mismatch and not errors


def test_the_repository_builds(tmp_path):
    index = build(REPO, tmp_path / "site")
    assert index.exists()
    for name, _ in read_chapters(REPO / "annotated_src" / "__init__.py"):
        if (REPO / "annotated_src" / f"{name}.py").exists():
            assert (tmp_path / "site" / f"{name}.html").exists()


def test_a_bare_file_name_links_to_the_top_level_module_before_a_bench_suite_of_that_name(tmp_path):
    root = copy_fixture(tmp_path)
    (root / "annotated_src" / "bench" / "tiny.py").write_text('"""The tiny suite."""\n')
    fast = root / "annotated_src" / "tiny_fast.py"
    head, sep, rest = fast.read_text().partition("\n---\n\n")  # after the front matter
    assert sep
    fast.write_text(head + sep + "See [the lesson](tiny.py).\n\n" + rest)
    out = tmp_path / "_build"
    build(root, out)
    page = (out / "tiny_fast.html").read_text()
    assert 'href="tiny.html">the lesson' in page and 'href="bench.tiny.html">the lesson' not in page
