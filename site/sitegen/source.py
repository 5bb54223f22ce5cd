"""A Python module split into sections: prose (comments and docstrings) beside the code it precedes.

The rules, those of nn.labml.ai's pages:

* the module docstring (its front matter removed) is the first section, prose only;
* a run of comment-only lines starts a new section whose prose is the comments' text (Markdown);
  the code that follows, up to the next such run, is the section's code;
* a function's or class's docstring is prose too: it joins the comments right above the `def`
  (when nothing but the `def` line sits between them), or else starts a section of its own that
  holds the `def` line; the docstring's lines are left out of the code column.

Lines keep their numbers in the file, so the code column shows the real line numbers.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize

from .errors import BuildError
from .markdown import split_front_matter


@dataclasses.dataclass
class Section:
    prose: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (first line, markdown)
    code: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (line number, text)

    def trimmed_code(self) -> list[tuple[int, str]]:
        """The code without its leading and trailing blank lines."""
        code = list(self.code)
        while code and not code[0][1].strip():
            code.pop(0)
        while code and not code[-1][1].strip():
            code.pop()
        return code

    @property
    def first_line(self) -> int:
        lines = [n for n, _ in self.prose] + [n for n, _ in self.code]
        return min(lines) if lines else 0


@dataclasses.dataclass
class Module:
    path: str
    name: str  # dotted, e.g. `rope` or `bench.core`
    front: dict
    intro: str  # the module docstring without its front matter
    intro_line: int
    sections: list[Section]
    definitions: dict[str, int]  # top-level (and `Class.method`) name -> line
    imports: dict[str, tuple[str, str]]  # name -> (module it comes from, name there), function-local ones too
    source: str
    # Every `annotated_src` module this one imports, anywhere in the file: (module, name imported from it),
    # both relative to the package (`from annotated_src import _x as y` -> ("", "_x")).
    package_imports: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)  # definition -> "def", "class", "value"
    doc_summaries: dict[str, str] = dataclasses.field(default_factory=dict)  # definition -> docstring's first line

    @property
    def title(self) -> str:
        return self.front.get("title") or self.name

    @property
    def summary(self) -> str:
        if self.front.get("summary"):
            return self.front["summary"]
        for line in self.intro.strip().splitlines():
            if line.strip() and not line.startswith("#"):
                return line.strip()
        return ""


def _docstring_of(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _top_level(body: list[ast.stmt]):
    """The module's statements, looking inside top-level `if`, `try` and `with` blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.With)):
            yield from _top_level(node.body + getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody
                                  + [x for h in node.handlers for x in h.body])


_ESCAPED = {"\t": "tab (\\t, as in \\top or \\tau)", "\b": "backspace (\\b, as in \\beta)",
            "\f": "form feed (\\f, as in \\frac)", "\a": "bell (\\a, as in \\alpha)",
            "\v": "vertical tab (\\v, as in \\vec)", "\r": "carriage return (\\r, as in \\rho)"}


def _check_docstring(node: ast.Expr, path: str) -> str:
    """The docstring's text; a control character read from a backslash escape stops the build.

    In a docstring that is not a raw string, `\\top` is a tab followed by `op`: the LaTeX would be
    silently wrong on the page.
    """
    value = node.value.value
    for i, ch in enumerate(value):
        if ch in _ESCAPED:
            line = node.lineno + value[:i].count("\n")
            raise BuildError(path, line, f"the docstring holds a {_ESCAPED[ch]} character read from a backslash "
                             "escape: write it as a raw string r\"\"\"...\"\"\" or double the backslash")
    return value


def _comment_lines(source: str, path: str) -> dict[int, str]:
    """Line number -> text of every line that holds nothing but a comment."""
    out = {}
    lines = source.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                if not lines[row - 1][:col].strip() and not tok.string.startswith("#!"):
                    text = tok.string[1:]
                    out[row] = text[1:] if text.startswith(" ") else text
    except (tokenize.TokenError, SyntaxError) as e:
        raise BuildError(path, getattr(e, "lineno", None) or 1, f"cannot tokenize: {e}") from None
    return out


def parse_module(source: str, *, path: str, name: str) -> Module:
    """Split `source` (the text of the file at `path`) into sections."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise BuildError(path, e.lineno, f"syntax error: {e.msg}") from None
    lines = source.splitlines()
    comments = _comment_lines(source, path)

    # The module docstring.
    intro, intro_line, skip = "", 1, set()
    doc = _docstring_of(tree)
    if doc is not None:
        skip.update(range(doc.lineno, doc.end_lineno + 1))
        front, intro, intro_line = split_front_matter(inspect.cleandoc(_check_docstring(doc, path)) + "\n", path=path,
                                                      first_line=doc.lineno + 1)
    else:
        front = {}

    # Function and class docstrings: first line -> (last line, header's first line, text).
    docstrings: dict[int, tuple[int, int, str]] = {}
    definitions: dict[str, int] = {}
    imports: dict[str, tuple[str, str]] = {}
    kinds: dict[str, str] = {}
    summaries: dict[str, str] = {}

    def summary_of(node) -> str:
        d = _docstring_of(node)
        text = inspect.cleandoc(d.value.value) if d is not None else ""
        return text.split("\n\n")[0].replace("\n", " ").strip()

    for node in _top_level(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            definitions[node.name] = node.lineno
            kinds[node.name] = "class" if isinstance(node, ast.ClassDef) else "def"
            summaries[node.name] = summary_of(node)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        definitions.setdefault(f"{node.name}.{sub.name}", sub.lineno)
                        kinds.setdefault(f"{node.name}.{sub.name}", "def")
                        summaries.setdefault(f"{node.name}.{sub.name}", summary_of(sub))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        definitions.setdefault(n.id, node.lineno)
                        kinds.setdefault(n.id, "value")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imports[alias.asname or alias.name] = ("." * node.level + node.module, alias.name)
    # Imports anywhere (inside a function too): the names they bind link like top-level ones, and
    # the modules they name are the ones this page uses.
    package_imports: list[tuple[str, str]] = []
    package = name.split(".")[:-1] if not path.endswith("__init__.py") else name.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                src = ".".join(base + ([node.module] if node.module else []))
                written = "." * node.level + (node.module or "")
            elif node.module == "annotated_src" or (node.module or "").startswith("annotated_src."):
                src = node.module[len("annotated_src."):] if "." in node.module else ""
                written = node.module
            else:
                continue
            for alias in node.names:
                if alias.name != "*":
                    package_imports.append((src, alias.name))
                    imports.setdefault(alias.asname or alias.name, (written, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("annotated_src."):
                    package_imports.append((alias.name[len("annotated_src."):], ""))
                    if alias.asname:
                        imports.setdefault(alias.asname, (alias.name, ""))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = _docstring_of(node)
            if d is not None and d.lineno > node.lineno:
                header = min([node.lineno] + [x.lineno for x in node.decorator_list])
                docstrings[d.lineno] = (d.end_lineno, header, inspect.cleandoc(_check_docstring(d, path)))

    sections = [Section(prose=[(intro_line, intro)] if intro.strip() else [])]
    n = 1
    while n <= len(lines):
        if n in skip:
            n += 1
            continue
        if n in comments:
            start, text = n, []
            while n in comments:
                text.append(comments[n])
                n += 1
            cur = sections[-1]
            if cur.code and any(t.strip() for _, t in cur.code) or not cur.prose and cur.code:
                sections.append(Section())
            sections[-1].prose.append((start, "\n".join(text)))
            continue
        if n in docstrings:
            end, header, text = docstrings[n]
            cur = sections[-1]
            moved = [(k, t) for k, t in cur.code if k >= header]
            cur.code = [(k, t) for k, t in cur.code if k < header]
            if cur.prose and not any(t.strip() for _, t in cur.code):
                cur.code = []
                cur.prose.append((n, text))
                cur.code.extend(moved)
            else:
                sections.append(Section(prose=[(n, text)], code=moved))
            n = end + 1
            continue
        sections[-1].code.append((n, lines[n - 1]))
        n += 1
    sections = [s for s in sections if s.prose or s.trimmed_code()]
    return Module(path=path, name=name, front=front, intro=intro, intro_line=intro_line, sections=sections,
                  definitions=definitions, imports=imports, source=source, package_imports=package_imports,
                  kinds=kinds, doc_summaries=summaries)
