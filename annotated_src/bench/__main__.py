"""`python -m annotated_src.bench [suite ...] [--json PATH] [--quick]`: time the chapters."""

from __future__ import annotations

import argparse
import importlib
import json
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


if __name__ == "__main__":
    sys.exit(main())
