"""Entry point of the ``flext-sidecar`` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Say plainly that the sidecar is not part of this version yet."""
    del argv
    sys.stderr.write(
        "flext-sidecar: error: the sidecar is not available in this version of flext-mesh "
        "(it arrives with the sidecar issue); run the control plane with 'flext-mesh serve'\n"
    )
    raise SystemExit(2)
