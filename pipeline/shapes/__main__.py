"""python -m pipeline.shapes render --n 100 --out DIR  — render the shapes world as a COCO dataset."""
from __future__ import annotations

import argparse

from .coco import render_coco
from .world import HELD_OUT_SEED


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.shapes", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render N scenes to OUT/images + OUT/annotations.json")
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--first-seed", type=int, default=HELD_OUT_SEED,
                   help="seeds below 1,000,000 are the bundled model's training scenes")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 16:
        ap.error("--n must be >= 1 and --size >= 16")
    path = render_coco(args.out, args.n, args.size, args.first_seed)
    print(f"wrote {args.n} images and {path}")


if __name__ == "__main__":
    main()
