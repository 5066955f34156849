"""Do two localize methods agree? The stores of one grid localized with
`localize.method=exact` against the same grid's with another method, build by
build (`routing_suite/routing/agreement.py`).

    python -m experiments.localize_agreement outputs/appendix outputs/appendix-attribution
"""

from __future__ import annotations

import argparse
from pathlib import Path

from routing_suite.routing.agreement import build_lines, compare, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="per-build agreement of two localize methods")
    parser.add_argument("exact", type=Path, help="a folder of stores localized with localize.method=exact")
    parser.add_argument("other", type=Path, help="a folder of the same runs localized with another method")
    args = parser.parse_args(argv)
    for root in (args.exact, args.other):
        if not root.is_dir():
            parser.error(f"{root} is not a folder")
    rows = compare(args.exact, args.other)
    if not rows:
        parser.error("no store of the one folder has a counterpart in the other (same cell, build and settings)")
    print("\n".join(build_lines(rows) + summary(rows)))


if __name__ == "__main__":
    main()
