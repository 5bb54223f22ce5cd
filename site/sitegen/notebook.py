"""A notebook (with its stored outputs) as rows: Markdown cells on the left, code and outputs on the right.

Consecutive Markdown cells are the prose of the code cell that follows them; a code cell with no
Markdown before it gets a row with empty prose; Markdown at the end gets a row of its own. The
notebook is never executed: what is shown is what is stored in the `.ipynb`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import hashlib
import json
import re

from .errors import BuildError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROVENANCE_LINE = re.compile(r"^\s*([A-Za-z_]+):\s?(.*?)\s*$")
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif"}
# The first bytes of each kind of image: a file of another kind, or a truncated one, is corrupt.
IMAGE_MAGIC = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",), "image/gif": (b"GIF87a", b"GIF89a")}


@dataclasses.dataclass
class Output:
    kind: str  # "stream", "stderr", "text", "html", "image", "svg", "markdown", "error"
    content: str  # text, HTML, or for an image the file name under images/
    data: bytes = b""  # an image's bytes


@dataclasses.dataclass
class Row:
    prose: list[tuple[int, str]]  # (cell index, markdown source)
    code: str | None = None
    cell_index: int | None = None
    execution_count: int | None = None
    outputs: list[Output] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Notebook:
    path: str
    name: str
    raw: str  # the .ipynb text (copied for download, and used to locate lines)
    rows: list[Row]
    provenance: dict[str, str]
    imports: dict[str, tuple[str, str, int, int]]  # name -> (module, name there, cell index, line in cell)
    title: str

    def json_line(self, cell_index: int, line_in_cell: int) -> int | None:
        """The line of the `.ipynb` file that holds line `line_in_cell` (1-based) of cell `cell_index`."""
        return locate_cell_line(self.raw, cell_index, line_in_cell)


def _cell_starts(lines: list[str]) -> list[int]:
    """The (0-based) lines that open a cell: cells hold `"cell_type":` (any key order)."""
    return [i for i, line in enumerate(lines) if re.match(r'\s*"cell_type"\s*:', line)]


def cell_at_line(raw: str, line: int) -> int | None:
    """The index of the cell that holds `line` (1-based) of the `.ipynb` text, or None."""
    starts = _cell_starts(raw.splitlines())
    # A cell's lines run from the `{` before its "cell_type" (a few lines up, at most) to the next cell.
    before = [k for k, s in enumerate(starts) if s < line - 1 + 8]
    if not before:
        return None
    k = before[-1]
    return k if starts[k] <= line - 1 or k == 0 else k - 1


def _cell_bounds(starts: list[int], cell_index: int, n_lines: int) -> tuple[int, int] | None:
    """The first line of cell `cell_index` and the first line after it (0-based), or None."""
    if cell_index >= len(starts):
        return None
    return starts[cell_index], starts[cell_index + 1] if cell_index + 1 < len(starts) else n_lines


def locate_output_line(raw: str, cell_index: int, needle: str, occurrence: int) -> int | None:
    """The line of the `occurrence`-th (0-based) `needle` inside cell `cell_index` of the `.ipynb` text."""
    lines = raw.splitlines()
    starts = _cell_starts(lines)
    bounds = _cell_bounds(starts, cell_index, len(lines))
    if bounds is None:
        return None
    lo, hi = bounds
    found = [i + 1 for i in range(lo, hi) if needle in lines[i]]
    return found[occurrence] if occurrence < len(found) else locate_cell_line(raw, cell_index, 1)


def locate_cell_line(raw: str, cell_index: int, line_in_cell: int) -> int | None:
    lines = raw.splitlines()
    # Cells start with `"cell_type":` (any key order): find the one numbered `cell_index`.
    starts = _cell_starts(lines)
    bounds = _cell_bounds(starts, cell_index, len(lines))
    if bounds is None:
        return None
    lo, hi = bounds
    # The cell may begin before its "cell_type" key: look from the previous "{".
    while lo > 0 and lines[lo].strip() != "{" and lo > (starts[cell_index - 1] if cell_index else 0):
        lo -= 1
    for i in range(lo, hi):
        if re.match(r'\s*"source"\s*:', lines[i]):
            if lines[i].rstrip().endswith("["):
                return i + 1 + line_in_cell
            return i + 1
    return lo + 1


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def decode_notebook(data: bytes, *, path: str) -> str:
    """The `.ipynb` file's bytes as text; bytes that are not UTF-8 stop the build at their line and cell."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        cell = cell_at_line(data.decode("utf-8", errors="replace"), line)
        where = f"cell {cell + 1}: " if cell is not None else ""
        raise BuildError(path, line, f"{where}invalid UTF-8 (byte 0x{data[e.start]:02x}): "
                         "a notebook is UTF-8 JSON") from None


def read_notebook(raw: str | bytes, *, path: str, name: str) -> Notebook:
    """Parse and validate the `.ipynb` text (or bytes) at `path`."""
    if isinstance(raw, bytes):
        raw = decode_notebook(raw, path=path)
    try:
        json.loads(raw)
    except json.JSONDecodeError as e:
        raise BuildError(path, e.lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None
    import nbformat  # slow to import: only when there is a notebook

    try:
        nb = nbformat.reads(raw, as_version=4)
        nbformat.validate(nb)
    except nbformat.ValidationError as e:
        raise BuildError(path, 1, f"not a valid notebook: {e.message}") from None
    except Exception as e:
        raise BuildError(path, 1, f"not a valid notebook: {e}") from None

    rows: list[Row] = []
    pending: list[tuple[int, str]] = []
    imports: dict[str, tuple[str, str, int, int]] = {}
    provenance: dict[str, str] = {}
    first_code = True
    image_no = 0
    title = ""
    for index, cell in enumerate(nb.cells):
        source = _text(cell.source)
        if cell.cell_type == "markdown":
            if not title:
                m = re.search(r"^#\s+(.+)$", source, re.M)
                title = m.group(1).strip() if m else ""
            pending.append((index, source))
            continue
        if cell.cell_type != "code":
            continue
        outputs = []
        for n_out, out in enumerate(cell.get("outputs", [])):
            if out.output_type == "stream":
                text = _ANSI.sub("", _text(out.text))
                kind = "stderr" if out.name == "stderr" else "stream"
                if outputs and outputs[-1].kind == kind:
                    outputs[-1].content += text
                else:
                    outputs.append(Output(kind, text))
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                img = next((t for t in IMAGE_TYPES if t in data), None)
                if img:
                    seen = sum(1 for o in cell.get("outputs", [])[:n_out] if img in o.get("data", {}))
                    where = f"cell {index + 1}: output {n_out + 1}: {img}"
                    line = locate_output_line(raw, index, f'"{img}"', seen)
                    try:
                        blob = base64.b64decode(re.sub(r"\s+", "", _text(data[img])), validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise BuildError(path, line, f"{where} is not valid base64 ({e})") from None
                    if not blob.startswith(IMAGE_MAGIC[img]):
                        raise BuildError(path, line, f"{where} does not hold a {IMAGE_TYPES[img].upper()} image "
                                         f"(it starts with {blob[:8]!r})")
                    image_no += 1
                    digest = hashlib.sha256(blob).hexdigest()[:12]
                    outputs.append(Output("image", f"{name}-{image_no}-{digest}.{IMAGE_TYPES[img]}", blob))
                elif "image/svg+xml" in data:
                    outputs.append(Output("svg", _text(data["image/svg+xml"])))
                elif "text/html" in data:
                    outputs.append(Output("html", _text(data["text/html"])))
                elif "text/markdown" in data:
                    outputs.append(Output("markdown", _text(data["text/markdown"])))
                elif "text/plain" in data:
                    outputs.append(Output("text", _ANSI.sub("", _text(data["text/plain"]))))
            elif out.output_type == "error":
                outputs.append(Output("error", _ANSI.sub("", "\n".join(out.get("traceback", [])))))
        if first_code:
            first_code = False
            for o in outputs:
                if o.kind in ("stream", "text"):
                    for line in o.content.splitlines():
                        m = _PROVENANCE_LINE.match(line)
                        if m:
                            provenance[m.group(1)] = m.group(2)
        for imp_name, (module, orig, line) in notebook_imports(source).items():
            imports.setdefault(imp_name, (module, orig, index, line))
        rows.append(Row(prose=pending, code=source, cell_index=index, outputs=outputs,
                        execution_count=cell.get("execution_count")))
        pending = []
    if pending:
        rows.append(Row(prose=pending))
    return Notebook(path=path, name=name, raw=raw, rows=rows, provenance=provenance, imports=imports,
                    title=title or name)


def notebook_imports(source: str) -> dict[str, tuple[str, str, int]]:
    """Names a code cell imports from `annotated_src`: name -> (module, name there, line in cell).

    `from annotated_src.rope import apply_rotary` gives `apply_rotary -> (rope, apply_rotary)`;
    `from annotated_src import rope` gives `rope -> (rope, "")`, a link to the whole page.
    """
    # IPython syntax (`%magic`, `!cmd`) is not Python: blank it out, keeping the line numbers.
    cleaned = "\n".join("" if re.match(r"\s*[%!]", line) else line for line in source.splitlines())
    try:
        tree = ast.parse(cleaned)
    except SyntaxError:
        return {}
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "annotated_src":
                for a in node.names:
                    out[a.asname or a.name] = (a.name, "", getattr(a, "lineno", node.lineno))
            elif node.module.startswith("annotated_src."):
                module = node.module[len("annotated_src."):]
                for a in node.names:
                    if a.name != "*":
                        out[a.asname or a.name] = (module, a.name, getattr(a, "lineno", node.lineno))
    return out
