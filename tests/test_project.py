"""The project's own promises: dependency lists agree, notebooks are paired, executed on a GPU,
and hold outputs that nbval can compare."""

from __future__ import annotations

import nbformat
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
SOURCES = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalised (`Foo_bar>=1` -> `foo-bar`)."""
    out = set()
    for req in requirements:
        if req.startswith("-e"):
            continue
        name = re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]
        out.add(re.sub(r"[-_.]+", "-", name).lower())
    return out


def test_environment_yml_installs_what_pyproject_lists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml: expected one pip: section"
    assert _names(pip_lists[0]) == wanted
    # The package itself is installed editable, so `import annotated_src` works in the env.
    assert "-e ." in pip_lists[0]


def test_every_chapter_has_a_notebook_source():
    from annotated_src import CHAPTERS

    for module, notebook in CHAPTERS:
        if (ROOT / "annotated_src" / f"{module}.py").exists():
            assert (ROOT / "notebooks" / f"{notebook}.py").exists(), f"{module}: no notebooks/{notebook}.py"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_each_notebook_source_has_its_executed_pair(src):
    assert src.with_suffix(".ipynb").exists(), f"{src.name}: no executed {src.with_suffix('.ipynb').name}"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_pair_in_sync(nb_path, tmp_path):
    """Regenerating the .py from the .ipynb (one fixed direction) gives the committed .py."""
    out = tmp_path / nb_path.with_suffix(".py").name
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "py:percent", "--output", str(out),
                    str(nb_path)], check=True, cwd=ROOT)
    strip = lambda s: "\n".join(l for l in s.splitlines() if "jupytext_version" not in l).strip()
    assert strip(out.read_text()) == strip(nb_path.with_suffix(".py").read_text()), (
        f"{nb_path.name} and its .py differ: run `jupytext --to py:percent {nb_path}` or re-execute")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_stored_from_a_gpu_run(nb_path):
    nb = nbformat.read(nb_path, as_version=4)  # joins multi-line sources and texts into strings
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and c["source"].strip()]
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unrun, f"{nb_path.name}: code cells {unrun} have no stored output (nbval would check nothing)"
    assert any(c["outputs"] for c in code), f"{nb_path.name}: no outputs at all"
    # The first code cell is the provenance cell, and it names the CUDA GPU the outputs came from.
    first = "".join(o.get("text", "") for o in code[0]["outputs"])
    assert "provenance()" in code[0]["source"], f"{nb_path.name}: the first code cell is not the provenance cell"
    assert re.search(r"device: NVIDIA (H100|H200)", first), f"{nb_path.name}: outputs not from a CUDA GPU: {first!r}"
    # No stderr (warnings, tracebacks) in any stored output.
    for i, c in enumerate(code):
        for o in c["outputs"]:
            assert not (o["output_type"] == "stream" and o["name"] == "stderr"), f"{nb_path.name}: stderr in cell {i}"
            assert o["output_type"] != "error", f"{nb_path.name}: an error in cell {i}"


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 2)[:2]
    text = "\n".join(first_section)
    assert "make site" in text and "make test" in text


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_bench_cli_rejects_unknown_suite():
    proc = subprocess.run([sys.executable, "-m", "annotated_src.bench", "no-such-suite"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode != 0 and "no-such-suite" in proc.stderr


# ---------------------------------------------------------------- the shape of every chapter

PACKAGE = ROOT / "annotated_src"
LESSONS = ["rope", "retro", "dilated_attention", "continual_mha", "kv_cache"]
# What belongs on a chapter's fast-path page, never in its lesson.
MACHINERY = re.compile(r"import triton|triton\.jit|\btl\.|CUDAGraph|torch\.cuda\.graph\b|torch\.ops\.aten\._|gdc_wait")
LONGEST_LESSON_FUNCTION = 80


def _imports_of(path: Path) -> set[str]:
    """The package modules `path` imports, function-local imports included (`annotated_src.x`)."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in modules}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ((base,) if base else ()))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in modules}


def test_no_import_cycle_in_the_package():
    """Lessons import their fast paths, never the other way round; no cycle anywhere."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        # Importing a submodule runs its package's __init__ first; that edge is not a cycle.
        graph[name] = {m for m in _imports_of(path) if not name.startswith(m + ".") and m != name}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_holds_no_kernel_machinery(lesson):
    lines = (PACKAGE / f"{lesson}.py").read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if MACHINERY.search(line)]
    assert not hits, f"annotated_src/{lesson}.py: kernel machinery on lines {hits}; it belongs in {lesson}_fast.py"


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_functions_are_short(lesson):
    import ast

    tree = ast.parse((PACKAGE / f"{lesson}.py").read_text())
    long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            doc = body[0] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else None
            n = node.end_lineno - node.lineno + 1 - ((doc.end_lineno - doc.lineno + 1) if doc else 0)
            if n > LONGEST_LESSON_FUNCTION:
                long.append(f"{node.name} ({n} lines)")
    assert not long, f"annotated_src/{lesson}.py: functions over {LONGEST_LESSON_FUNCTION} lines: {long}"


@pytest.mark.parametrize("lesson", LESSONS)
def test_fast_path_is_a_page_of_its_own_below_its_lesson(lesson):
    fast = PACKAGE / f"{lesson}_fast.py"
    assert fast.exists(), f"annotated_src/{lesson}_fast.py: missing"
    imported = _imports_of(fast)
    assert f"annotated_src.{lesson}" not in imported, f"{fast.name} imports its lesson"
    # Each page links to the other.
    assert f"annotated_src/{lesson}.py" in fast.read_text(), f"{fast.name} does not link back to its lesson"
    assert f"annotated_src/{lesson}_fast.py" in (PACKAGE / f"{lesson}.py").read_text(), (
        f"{lesson}.py does not link to its fast-path page")


def test_every_chapter_is_in_every_list():
    """A chapter joins: CHAPTERS, the fast-path switch, a notebook pair, a test file, a benchmark
    suite, and CONTRIBUTING.md's list."""
    from annotated_src import CHAPTERS, fastpath
    from annotated_src.bench import SUITES

    assert [m for m, _ in CHAPTERS] == LESSONS == list(fastpath.CHAPTERS)
    suites = {Path(module.replace(".", "/")).stem for module in SUITES.values()}
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    for module, notebook in CHAPTERS:
        assert (ROOT / "notebooks" / f"{notebook}.py").exists(), f"{module}: no notebooks/{notebook}.py"
        assert (ROOT / "tests" / f"test_{module}.py").exists(), f"{module}: no tests/test_{module}.py"
        assert any(module.startswith(s) for s in suites), f"{module}: no benchmark suite in annotated_src.bench.SUITES"
        for name in (f"{module}.py", f"{module}_fast.py", notebook):
            assert name in contributing, f"{module}: CONTRIBUTING.md does not list {name}"
