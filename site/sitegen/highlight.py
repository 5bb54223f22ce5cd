"""Pygments highlighting, one HTML string per source line, so every line keeps its own number."""

from __future__ import annotations

import html

from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer
from pygments.token import STANDARD_TYPES, Name

_LEXER = PythonLexer(stripnl=False, ensurenl=False)
# Token classes shown in the text colour of the code column (plain names, punctuation, spaces).
_PLAIN = {"n", "p", "w"}


def _css_class(ttype) -> str:
    while ttype not in STANDARD_TYPES:
        ttype = ttype.parent
    return STANDARD_TYPES[ttype]


def highlight_lines(code: str, links: dict[str, str] | None = None) -> list[str]:
    """`code` -> one HTML string per line; names in `links` become links to their href."""
    links = links or {}
    out, cur = [], []
    for ttype, value in _LEXER.get_tokens(code):
        cls = _css_class(ttype)
        parts = value.split("\n")
        for i, part in enumerate(parts):
            if i:
                out.append("".join(cur))
                cur = []
            if not part:
                continue
            text = html.escape(part, quote=False)
            if ttype in Name and part in links:
                cur.append(f'<a class="xref {cls}" href="{html.escape(links[part])}">{text}</a>')
            elif cls in _PLAIN:
                cur.append(text)  # names and punctuation take the code's own colour: no span to carry
            elif cls and cur and cur[-1].startswith(f'<span class="{cls}">'):
                # Tokens of one kind in a row (a string's quotes and body) share one span: lighter pages.
                cur[-1] = cur[-1][: -len("</span>")] + text + "</span>"
            elif cls:
                cur.append(f'<span class="{cls}">{text}</span>')
            else:
                cur.append(text)
    out.append("".join(cur))
    n_lines = code.count("\n") + 1
    return (out + [""] * n_lines)[:n_lines]


def pygments_css() -> str:
    """The token colours for the light theme and the dark theme."""
    light = HtmlFormatter(style="friendly").get_style_defs(".code")
    dark = HtmlFormatter(style="monokai").get_style_defs(":root[data-theme=dark] .code")
    dark_auto = HtmlFormatter(style="monokai").get_style_defs(":root:not([data-theme=light]) .code")
    # Keep only the token rules: the backgrounds come from the site's own colours.
    def tokens_only(css: str) -> str:
        keep = [line for line in css.splitlines() if (" .code ." in line or line.startswith(".code .")
                or "] .code ." in line or ") .code ." in line)
                and not any(f".code .{c} " in line for c in _PLAIN)]
        return "\n".join(line for line in keep if "background" not in line.split("{")[1] or "color" in line)
    # The dark colours are for the screen only: a printed page is always light.
    return (tokens_only(light) + "\n@media screen {\n" + tokens_only(dark) + "\n}\n"
            + "@media screen and (prefers-color-scheme: dark) {\n" + tokens_only(dark_auto) + "\n}\n")
