"""``python -m export --from SAVED_DIR --to OUT_DIR --format bitmask|dense|peft``: export a model saved by
``oats.algorithm.compressed.save_compressed`` (or any plain checkpoint) and print the size report's totals."""
from __future__ import annotations

import argparse
import json
import sys

from export.exporter import FORMATS, export_from_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--from", dest="src", required=True, help="directory written by save_compressed / save_pretrained")
    p.add_argument("--to", dest="dst", required=True, help="output directory")
    p.add_argument("--format", default="bitmask", choices=FORMATS + ("compressed-tensors",))
    p.add_argument("--base-format", default="bitmask", choices=("bitmask", "dense"), help="for --format peft: how S is stored")
    p.add_argument("--no-nm", action="store_true", help="never use the N:M layout (bitmask or dense only)")
    a = p.parse_args(argv)
    try:
        rep = export_from_dir(a.src, a.dst, a.format, nm=None if a.no_nm else "auto", base_format=a.base_format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep["total"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
