"""What a page may contain: every piece of HTML from an input goes through `nh3` (Rust's ammonia).

Prose (a module's comments and docstrings, a notebook's Markdown cells, Markdown outputs) and
notebook outputs (`text/html`, `image/svg+xml`) are written by people and programs the site does
not control. They keep what a page legitimately needs -- text markup, tables, images, MathML, SVG
plots -- and lose everything that runs or fetches: `<script>`, `<style>`, event handlers,
`javascript:` links, frames, objects, forms, and any image, stylesheet or SVG reference to another
host (a page of the site never makes a request that leaves its folder).
"""

from __future__ import annotations

import re

import nh3

MATHML_TAGS = {
    "math", "semantics", "annotation", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup", "msub",
    "msubsup", "mfrac", "msqrt", "mroot", "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mstyle",
    "mpadded", "mphantom", "menclose", "merror", "mmultiscripts", "mprescripts", "none",
}
MATHML_ATTRIBUTES = {
    "display", "xmlns", "mathvariant", "stretchy", "fence", "separator", "lspace", "rspace", "width", "height",
    "depth", "linethickness", "accent", "accentunder", "columnalign", "rowalign", "columnspacing", "rowspacing",
    "columnlines", "rowlines", "frame", "displaystyle", "scriptlevel", "minsize", "maxsize", "movablelimits",
    "symmetric", "largeop", "form", "encoding", "notation", "align", "voffset", "mathsize", "mathcolor",
    "mathbackground", "columnspan", "rowspan",
}
SVG_TAGS = {
    "svg", "g", "defs", "path", "rect", "circle", "ellipse", "line", "polyline", "polygon", "text", "tspan",
    "use", "clipPath", "mask", "linearGradient", "radialGradient", "stop", "symbol", "title", "desc", "image",
    "pattern", "marker",
}
SVG_ATTRIBUTES = {
    "xmlns", "version", "viewBox", "preserveAspectRatio", "width", "height", "x", "y", "x1", "x2", "y1", "y2",
    "cx", "cy", "r", "rx", "ry", "d", "points", "transform", "fill", "fill-opacity", "fill-rule", "stroke",
    "stroke-width", "stroke-linecap", "stroke-linejoin", "stroke-miterlimit", "stroke-dasharray",
    "stroke-dashoffset", "stroke-opacity", "opacity", "clip-path", "clip-rule", "clipPathUnits", "mask",
    "font-family", "font-size", "font-style", "font-weight", "text-anchor", "dominant-baseline",
    "alignment-baseline", "letter-spacing", "dx", "dy", "href", "xlink:href", "offset", "stop-color",
    "stop-opacity", "gradientUnits", "gradientTransform", "patternUnits", "patternTransform", "markerWidth",
    "markerHeight", "refX", "refY", "orient", "markerUnits", "marker-start", "marker-mid", "marker-end",
    "style", "visibility", "display",
}
# The CSS a style attribute may keep: colours, type and the drawing of a plot; nothing that places a
# box over the page (`position`, `z-index`, ...) or fetches.
STYLE_PROPERTIES = {
    "color", "background-color", "font-weight", "font-style", "font-size", "font-family", "text-align",
    "text-decoration", "vertical-align", "white-space", "width", "height", "max-width", "min-width", "padding",
    "margin", "border", "border-collapse", "border-bottom", "border-top", "border-left", "border-right",
    "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-linecap", "stroke-linejoin",
    "stroke-miterlimit", "stroke-dasharray", "stroke-dashoffset", "stroke-opacity", "opacity", "clip-path",
    "clip-rule", "stop-color", "stop-opacity", "text-anchor", "dominant-baseline", "letter-spacing",
}
HTML_TAGS = (set(nh3.ALLOWED_TAGS) - {"map", "area"}) | {"figure", "figcaption"}
HTML_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "th": {"colspan", "rowspan", "align", "scope"}, "td": {"colspan", "rowspan", "align"},
    "col": {"span"}, "colgroup": {"span"}, "ol": {"start", "type", "reversed"}, "li": {"value"},
    "table": {"border"}, "abbr": {"title"}, "time": {"datetime"}, "details": {"open"},
}
ALL_TAGS = HTML_TAGS | MATHML_TAGS | SVG_TAGS
GENERIC = {"id", "class", "title", "lang", "dir", "style"}

# A reference that stays on the site: a fragment, a relative path, or an image held in the page.
_LOCAL = re.compile(r"^(#|(?![a-z][a-z0-9+.-]*:)(?!//)(?!\\)[^\s]*$|data:image/(png|jpeg|gif|webp);)", re.I)
# A link the reader may follow (never requested by the page itself).
_LINK = re.compile(r"^(https?:|mailto:)", re.I)
# In CSS (a style attribute, or an SVG presentation attribute): a url() to anything but a fragment,
# an @import, an escape (which could spell either), or a legacy expression().
_CSS_FETCH = re.compile(r"url\(\s*['\"]?\s*(?!#)|@import|\\|expression\s*\(|image-set\(", re.I)
# An `<img>` left without a `src` (ammonia writes attributes double-quoted and escaped).
_NO_SOURCE = re.compile(r'<img(?![^>]*\ssrc=")(?:[^>]*?\salt="([^"]*)")?[^>]*>')


class Sanitiser:
    """One page's sanitiser: ids stay unique and never take one of the page's own.

    `generated` holds the ids the generator made itself (heading anchors): those are kept, once.
    Ids written in the input (an SVG's clip paths, say) are kept unless the page already uses them.
    """

    def __init__(self, reserved: set[str] | None = None):
        self.reserved = reserved if reserved is not None else set()
        self.generated: set[str] = set()
        self._seen: set[str] = set()

    def _filter(self, tag: str, attr: str, value: str) -> str | None:
        v = value.strip()
        if attr == "id":
            if v in self._seen or (v in self.reserved and v not in self.generated):
                return None
            self._seen.add(v)
            return value
        if attr in ("href", "xlink:href", "src"):
            if tag == "a":
                return value if (_LINK.match(v) or _LOCAL.match(v)) else None
            return value if _LOCAL.match(v) else None
        if _CSS_FETCH.search(v):
            return None
        return value

    def clean(self, html: str) -> str:
        out = nh3.clean(
            html,
            tags=ALL_TAGS,
            attributes={"*": GENERIC, "math": MATHML_ATTRIBUTES, **{t: MATHML_ATTRIBUTES for t in MATHML_TAGS},
                        **{t: SVG_ATTRIBUTES for t in SVG_TAGS}, **HTML_ATTRIBUTES},
            generic_attribute_prefixes={"aria-"},
            attribute_filter=self._filter,
            url_schemes={"http", "https", "mailto", "data"},
            filter_style_properties=STYLE_PROPERTIES,
            link_rel=None,
            strip_comments=True,
        )
        self.reserved |= self._seen
        # An image whose source was removed (another host) would show as broken: its text stays.
        return _NO_SOURCE.sub(lambda m: f'<span class="removed-image">{m.group(1) or ""}</span>', out)


def clean(html: str, reserved: set[str] | None = None) -> str:
    """`html` with only what a page may show (see the module docstring)."""
    return Sanitiser(reserved).clean(html)
