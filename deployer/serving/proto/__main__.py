"""`python -m deployer.serving.proto [OUT_DIR]`: compile the V2 gRPC .proto (build step)."""

from __future__ import annotations

import sys
from pathlib import Path

from deployer.serving.proto import generate


def main(argv: list[str]) -> int:
    """Generate the protobuf module; prints where it went."""
    out = generate(Path(argv[0]) if argv else None)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
