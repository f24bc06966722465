#!/usr/bin/env python
"""Generate the embedded shapes dataset (COCO instance segmentation + single-object classification split).

    python tools/generate_shapes.py --root datasets/shapes --num-pool 2000 --num-train 200 --seed 0
    python tools/generate_shapes.py --root datasets/shapes --semantic-only   # add semantic/ to an existing one

--semantic also writes semantic/{train,val}/ label PNGs (background = class 0) and semantic/classes.txt from the
instance masks (see mae_det.data.shapes.write_semantic_split).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.data.shapes import ShapesConfig, generate_shapes, write_semantic_split  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="datasets/shapes", help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --root")
    parser.add_argument("--semantic", action="store_true", help="also write the semantic-segmentation label maps")
    parser.add_argument("--semantic-only", action="store_true",
                        help="only (re)write the label maps of the dataset already in --root")
    for f in dataclasses.fields(ShapesConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float if f.default is None else type(f.default),
                            default=f.default,
                            help=f"(default {f.default})")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.semantic_only:
        try:
            write_semantic_split(args.root)
        except (OSError, KeyError, ValueError) as e:
            sys.exit(f"generate_shapes: {args.root}: cannot write the semantic split: {e}")
        return
    try:
        cfg = ShapesConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ShapesConfig)})
        info = generate_shapes(args.root, cfg, overwrite=args.overwrite)
        if args.semantic:
            write_semantic_split(args.root)
    except (FileExistsError, ValueError) as e:
        sys.exit(f"generate_shapes: {e}")
    total = sum(info["counts"].values())
    print(f"[shapes] wrote {total} images to {args.root} in {time.perf_counter() - t0:.1f}s "
          f"({info['instances']} instances)")


if __name__ == "__main__":
    main()
