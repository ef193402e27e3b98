"""``python -m deployer.images base [--tag REF]``: build the local base image (as root).

The same as ``manage.py build_base_image``, for hosts that run the engine but not
the portal.
"""

from __future__ import annotations

import argparse
import sys

from deployer.errors import DeployerError
from deployer.images.base import DEFAULT_LOCAL_BASE_IMAGE, base_image_build


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and build; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m deployer.images")
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="build the base image with debootstrap")
    base.add_argument("--tag", default=DEFAULT_LOCAL_BASE_IMAGE, help="image reference to create")
    base.add_argument("--suite", default="bookworm", help="Debian suite")
    args = parser.parse_args(argv)
    try:
        built = base_image_build(args.tag, suite=args.suite, log=print)
    except DeployerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"{built.ref} {built.image_id} {built.size_bytes} bytes {built.build_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
