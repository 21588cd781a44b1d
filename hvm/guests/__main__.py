"""``python3 -m hvm.guests``: build every guest image and print its path."""

from __future__ import annotations

import sys
import time

from hvm.guests import GUESTS, GuestBuildError, build_all


def main() -> int:
    start = time.monotonic()
    try:
        images = build_all()
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    width = max(map(len, GUESTS))
    for name, path in images.items():
        print(f"{name:<{width}}  {path}")
    print(f"({len(images)} images, {time.monotonic() - start:.2f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
