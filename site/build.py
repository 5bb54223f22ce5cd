"""Build the side-by-side site: `python site/build.py [--out DIR] [--src-root DIR] [--repo-url URL]`.

Reads `annotated_src/` and `notebooks/*.ipynb` (stored outputs; nothing is executed) under the
source root, writes the pages into a fresh directory and swaps it in place of `--out`
(`site/_build/` by default), so a failed build leaves the previous site as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The generator is the package `sitegen` next to this file (`site` itself is not a package: that
# name belongs to Python's own `site` module).
sys.path.insert(0, str(HERE))

from sitegen.build import build  # noqa: E402
from sitegen.errors import BuildError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python site/build.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "_build", help="output directory (default: site/_build)")
    parser.add_argument("--src-root", type=Path, default=HERE.parent,
                        help="directory holding annotated_src/ and notebooks/ (default: the repository)")
    parser.add_argument("--repo-url", default=None,
                        help="where the sources are online, for the pages' source links: a URL with `{path}` in it, "
                             "or a repository's address (default: [project.urls] Repository in pyproject.toml)")
    args = parser.parse_args(argv)
    try:
        index = build(args.src_root, args.out, args.repo_url)
    except BuildError as e:
        print(f"site build failed: {e}", file=sys.stderr)
        return 1
    print(f"site built: open {index.as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
