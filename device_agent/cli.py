"""The ``edgefed-agent`` command line (filled in by the runtime work)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefed-agent", description="edgefed device agent")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
