"""`python -m annotated_src.bench [suite ...] [--json PATH] [--quick]`: time the chapters."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

from . import SUITES
from .core import ceilings, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotated_src.bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(SUITES)})")
    parser.add_argument("--json", metavar="PATH", help="also write the results and ceilings as JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"suites: got {unknown}, expected names from {list(SUITES)}")
    device = _device(parser, args.device)
    if args.json:
        # Fail now, not after every suite has run.
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f"--json: got {args.json!r}, expected a path in an existing folder ({folder} does not exist)")
        if not os.access(folder, os.W_OK):
            parser.error(f"--json: got {args.json!r}, expected a path in a writable folder")
    c = ceilings(device)
    results, failures = [], {}
    for name in args.suites or list(SUITES):
        module = importlib.import_module(SUITES[name])
        try:
            results += module.run(device, quick=args.quick)
        except Exception as e:  # one broken suite must not hide the others' numbers
            failures[name] = f"{type(e).__name__}: {e}"
            print(f"suite {name} failed: {failures[name]}", file=sys.stderr)
        print(format_table([r for r in results if r.suite == name], c), flush=True)
        print(flush=True)
    print(format_table(results, c))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": c.__dict__, "torch": torch.__version__,
                       "results": [r.to_dict() for r in results], "failures": failures}, f, indent=1)
    return 1 if failures else 0


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """The device to time on: `name` if given and present, else CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        parser.error(f"--device: got {name!r}, expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: got {name!r}, expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device: got {name!r}, but no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device: got {name!r}, expected an index below {torch.cuda.device_count()}")
    return device


if __name__ == "__main__":
    sys.exit(main())
