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
