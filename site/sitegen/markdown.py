"""Markdown with LaTeX to HTML: markdown-it-py, dollar math rendered to MathML at build time.

Every math expression is converted by `latex2mathml` when the page is built, so the page needs no
script to show it and screen readers get MathML. An expression that does not convert, or that
leaves an unknown command behind, stops the build with the file and the line where it sits.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET

import latex2mathml.converter
from markdown_it import MarkdownIt
from mdit_py_plugins.anchors import anchors_plugin
from mdit_py_plugins.dollarmath import dollarmath_plugin
from mdit_py_plugins.front_matter import front_matter_plugin

from .errors import BuildError
from .sanitize import Sanitiser

_UNKNOWN_COMMAND = re.compile(r"\\[A-Za-z]+")
_FUNCTION_NAME = re.compile(r"<mi>(?:sin|cos|tan|exp|log|ln|max|min|det|arg|lim|sup|inf|softmax)</mi>(?!<mo[^>]*>&#x00028;|<mo[^>]*>\()")


def _scrollable(mathml: str) -> str:
    """A display equation in a box that scrolls sideways when it is wider than the prose column."""
    return f'<span class="math-display">{mathml}</span>'


def split_clauses(latex: str) -> list[str]:
    """A display equation's clauses: its source cut at each `\\qquad` outside braces, environments and
    `\\left...\\right`, the spacing TeX writers put between the parts of one display."""
    parts, start, depth, i = [], 0, 0, 0
    while i < len(latex):
        c = latex[i]
        if c == "\\":
            m = re.match(r"\\([A-Za-z]+|.)", latex[i:])
            word = m.group(1)
            if word in ("begin", "left"):
                depth += 1
            elif word in ("end", "right"):
                depth -= 1
            elif word == "qquad" and depth == 0:
                parts.append(latex[start:i])
                start = i + m.end()
            i += m.end()
            continue
        depth += c == "{"
        depth -= c == "}"
        i += 1
    parts.append(latex[start:])
    return [p for p in (p.strip() for p in parts) if p]


def display_math(latex: str, *, path: str, line: int | None) -> str:
    """A display equation; one of several clauses is set as clauses that wrap on a narrow column."""
    clauses = split_clauses(latex)
    if len(clauses) < 2:
        return _scrollable(latex_to_mathml(latex, display=True, path=path, line=line))
    inner = "".join(f'<span class="math-clause">{latex_to_mathml(c, display=True, path=path, line=line)}</span>'
                    for c in clauses)
    return f'<span class="math-display math-clauses">{inner}</span>'


# TeX's spacing, where latex2mathml's MathML would get the browser's operator dictionary instead.
_PRIMES = {"\u2032", "\u2033", "\u2034", "\u2057"}
_BINARY_WORDS = {"mod"}  # `\\bmod`: a binary operator, with TeX's medium space on each side
_MEDIUM = "0.2222em"
_MATHML_NS = "http://www.w3.org/1998/Math/MathML"


def tex_spacing(mathml: str) -> str:
    """latex2mathml's output with the spacing TeX gives it.

    * `\\operatorname{RoPE}` comes out as `<mo>RoPE</mo>`, spaced like a `+`: it becomes a name;
      `\\bmod` (`<mo>mod</mo>`) stays a binary operator, with a medium space on each side.
    * `/` is an ordinary symbol in TeX (`a/b` has no space around the slash); MathML's operator
      dictionary spaces it like a relation.
    * a prime `'` is a superscript in TeX's input but its glyph in a Unicode math font is already
      raised: set as a superscript it floats above its letter. It follows its letter instead.
    * `\\cos x` is two identifiers with no space between: the thin space TeX puts is added.
    """
    root = ET.fromstring(mathml.replace(f' xmlns="{_MATHML_NS}"', "", 1))
    for el in root.iter():
        if el.tag == "mo" and el.text in _BINARY_WORDS:
            el.set("lspace", _MEDIUM)
            el.set("rspace", _MEDIUM)
        elif el.tag == "mo" and el.text and re.fullmatch(r"[A-Za-z][A-Za-z0-9]+", el.text):
            el.tag = "mi"
        elif el.tag == "mo" and el.text == "/":
            el.set("lspace", "0em")
            el.set("rspace", "0em")
    changed = True
    while changed:  # `x''` nests one prime's superscript inside the other's
        changed = False
        for parent in list(root.iter()):
            for i, el in enumerate(list(parent)):
                if el.tag in ("msup", "msubsup") and len(el) in (2, 3) and el[-1].tag in ("mi", "mo") \
                        and (el[-1].text or "") and set(el[-1].text) <= _PRIMES:
                    prime = ET.Element("mo", {"lspace": "0em", "rspace": "0em"})
                    prime.text = el[-1].text
                    if el.tag == "msup":
                        base = el[0]
                    else:
                        base = ET.Element("msub")
                        base.extend([el[0], el[1]])
                    group = ET.Element("mrow")
                    group.extend([base, prime])
                    group.tail = el.tail
                    parent[i] = group
                    changed = True
    out = ET.tostring(root, encoding="unicode", short_empty_elements=False)
    out = out.replace("<math", f'<math xmlns="{_MATHML_NS}"', 1)
    return _FUNCTION_NAME.sub(r'\g<0><mspace width="0.1667em"></mspace>', out)


def latex_to_mathml(latex: str, *, display: bool, path: str, line: int | None) -> str:
    """One expression to a `<math>` element; a broken expression raises `BuildError`."""
    source = latex.strip()
    if not source:
        raise BuildError(path, line, "empty math expression")
    try:
        out = latex2mathml.converter.convert(source, display="block" if display else "inline")
    except Exception as e:  # latex2mathml raises its own exception types, often without a message
        raise BuildError(path, line, f"broken LaTeX {source!r}: {type(e).__name__} {e}".rstrip()) from None
    # latex2mathml keeps an unknown command as literal text: e.g. `<mi>\foo</mi>`.
    text = re.sub(r"<[^>]+>", "", out)
    unknown = _UNKNOWN_COMMAND.findall(html.unescape(text))
    if unknown:
        raise BuildError(path, line, f"broken LaTeX {source!r}: unknown command {unknown[0]}")
    out = tex_spacing(out)
    # The source as an annotation, so that copying the rendered text gives the LaTeX back.
    annotation = f'<annotation encoding="application/x-tex">{html.escape(source)}</annotation>'
    return re.sub(r"</math>$", "", out.replace("\n", "")).replace(
        '">', '"><semantics><mrow>', 1) + f"</mrow>{annotation}</semantics></math>"


def _highlight_fence(code: str, lang: str, attrs: str) -> str:
    """Fenced code in prose: Pygments for Python (and unlabelled code), escaped text otherwise."""
    from .highlight import highlight_lines

    if lang.lower() not in ("", "python", "py", "python3", "pycon"):
        return ""  # markdown-it escapes it
    lines = highlight_lines(code.rstrip("\n"))
    return '<pre class="code fenced"><code>' + "\n".join(lines) + "\n</code></pre>\n"


def slugify(text: str) -> str:
    s = re.sub(r"<[^>]+>", "", text).lower()
    s = re.sub(r"[^\w\- ]+", "", s).strip().replace(" ", "-")
    return re.sub(r"-+", "-", s) or "section"


def _breakable_code(table: re.Match) -> str:
    return re.sub(r"<code>([^<]+)</code>",
                  lambda m: "<code>" + re.sub(r"([./_])(?=[^./_])", r"\1<wbr>", m.group(1)) + "</code>", table.group(0))


def _is_path(text: str) -> bool:
    """Whether inline code names a file of the site's sources: `annotated_src/x.py`, `notebooks/x.ipynb`."""
    return bool(re.fullmatch(r"[\w./-]+/[\w.-]+\.(py|ipynb)", text))


class Renderer:
    """A markdown renderer for one page: heading ids are unique across all the page's sections."""

    def __init__(self, reserved_ids: set[str] | None = None, link_map: dict[str, str] | None = None):
        self.ids: set[str] = set(reserved_ids or ())
        # Every rendered piece is sanitised; the ids it may keep are the page's own headings.
        self.sanitiser = Sanitiser(self.ids)
        # Relative links in prose to a source file or a notebook -> the page of the site that shows it.
        self.link_map = link_map or {}
        self.headings: list[tuple[int, str, str]] = []  # (level, id, inline HTML) for the search index
        self.md = (MarkdownIt("commonmark", {"html": True, "typographer": False, "highlight": _highlight_fence})
                   .enable(["table", "strikethrough"])
                   .use(front_matter_plugin)
                   .use(dollarmath_plugin, allow_space=True, allow_digits=False, double_inline=True,
                        allow_labels=False)
                   .use(anchors_plugin, min_level=1, max_level=4, slug_func=self._slug,
                        permalink=True, permalinkSymbol="#"))

    def unique_id(self, base: str) -> str:
        slug, n = base, 1
        while slug in self.ids:
            n += 1
            slug = f"{base}-{n}"
        self.ids.add(slug)
        return slug

    def _rewrite(self, href: str) -> str:
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", href, re.I):
            return href
        path, _, fragment = href.partition("#")
        key = re.sub(r"^(\./|\.\./)+", "", path)
        if key in self.link_map:
            return self.link_map[key] + (f"#{fragment}" if fragment else "")
        return href

    def _slug(self, text: str) -> str:
        slug = self.unique_id(slugify(text))
        self.sanitiser.generated.add(slug)
        return slug

    def clean(self, html_text: str) -> str:
        """HTML from an input (a notebook output), sanitised like the page's prose."""
        return self.sanitiser.clean(html_text)

    def render_inline(self, text: str, *, path: str, line: int | None = None) -> str:
        """One line of Markdown (a summary) without the paragraph around it."""
        html_out = self.render(text, path=path, first_line=line or 1).strip()
        if html_out.startswith("<p>") and html_out.endswith("</p>") and html_out.count("<p>") == 1:
            html_out = html_out[3:-4]
        return html_out

    def render(self, text: str, *, path: str, first_line: int = 1) -> str:
        """Render `text`, which starts at line `first_line` of `path` (for error messages)."""
        env: dict = {}
        tokens = self.md.parse(text, env)
        line = first_line
        for tok in tokens:
            if tok.map:
                line = first_line + tok.map[0]
            if tok.type in ("math_block", "math_block_label"):
                tok.type, tok.content = "html_block", display_math(tok.content, path=path, line=line) + "\n"
            in_link = False
            for child in tok.children or ():
                if child.type == "link_open" and self.link_map:
                    child.attrSet("href", self._rewrite(str(child.attrGet("href") or "")))
                in_link = (in_link or child.type == "link_open") and child.type != "link_close"
                if child.type == "code_inline" and not in_link and _is_path(child.content) \
                        and child.content in self.link_map:
                    # `annotated_src/x_fast.py` written as code is a link to its page too.
                    child.type, child.content = "html_inline", (
                        f'<a href="{html.escape(self.link_map[child.content])}"><code>'
                        f"{html.escape(child.content)}</code></a>")
                if child.type in ("math_inline", "math_inline_double"):
                    if child.type == "math_inline_double":
                        child.type, child.content = "html_inline", display_math(child.content, path=path, line=line)
                    else:
                        mathml = latex_to_mathml(child.content, display=False, path=path, line=line)
                        child.type, child.content = "html_inline", mathml
        for i, tok in enumerate(tokens[:-1]):
            if tok.type == "heading_open":
                inline = self.md.renderer.renderInline(tokens[i + 1].children or [], self.md.options, env)
                self.headings.append((int(tok.tag[1]), str(tok.attrGet("id") or ""), inline))
        out = self.sanitiser.clean(self.md.renderer.render(tokens, self.md.options, env))
        # A table fits its column, its text wrapping; one that cannot (on a phone) scrolls in its box.
        out = re.sub(r"<table\b[^>]*>", lambda m: f'<div class="table-scroll">{m.group(0)}', out)
        out = out.replace("</table>", "</table></div>")
        # In a table, a long name in code may break after a `.`, `/` or `_` rather than widen its column.
        return re.sub(r'<div class="table-scroll">.*?</table></div>', _breakable_code, out, flags=re.S)


def split_front_matter(text: str, *, path: str, first_line: int = 1) -> tuple[dict, str, int]:
    """`---` YAML front matter at the top of `text` -> (fields, the rest, line where the rest starts)."""
    import yaml

    m = re.match(r"\s*^---[ \t]*\n(.*?)^---[ \t]*\n", text, re.S | re.M)
    if not m:
        return {}, text, first_line
    lines = [line for line in m.group(1).splitlines() if line.strip()]
    try:
        fields = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        # Plain `key: value` lines, a colon in the value ("summary: a step: five kernels"): the value
        # is the rest of its line, as the writer meant it.
        if lines and all(re.match(r"^[A-Za-z_]\w*:\s", line) for line in lines):
            return ({line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}, text[m.end():],
                    first_line + text[: m.end()].count("\n"))
        mark = getattr(e, "problem_mark", None)
        line = first_line + text[: m.start(1)].count("\n") + (mark.line if mark else 0)
        raise BuildError(path, line, f"invalid front matter: {e}") from None
    if not isinstance(fields, dict):
        raise BuildError(path, first_line, "front matter must be `key: value` lines")
    rest = text[m.end():]
    return {str(k): str(v) for k, v in fields.items()}, rest, first_line + text[: m.end()].count("\n")
