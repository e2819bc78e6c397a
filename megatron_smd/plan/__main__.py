"""``python -m megatron_smd.plan --config CFG [--json | --shell] [key=value ...]``: ``smd plan`` under
this name (what the launch scripts run, with ``--shell``)."""

from __future__ import annotations

import sys

from ..cli import run

PROG = "python -m megatron_smd.plan"


def main(argv: list[str] | None = None) -> int:
    return run("plan", argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
