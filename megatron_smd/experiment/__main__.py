"""``python -m megatron_smd.experiment compare|report|golden ...``: ``smd experiment ...`` under this name."""

from __future__ import annotations

import sys

from ..cli import run

PROG = "python -m megatron_smd.experiment"


def main(argv: list[str] | None = None) -> int:
    return run("experiment", argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
