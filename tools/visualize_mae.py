#!/usr/bin/env python
"""Writes MAE reconstruction grids (original | masked | reconstruction | reconstruction + visible) as PNGs.

Example:
    python tools/visualize_mae.py --checkpoint output/pretrain/checkpoint_last.pth --input images/ --output vis/

Exit codes: 0 done, 1 no grid written (every image unreadable), 2 bad arguments, checkpoint, inputs or ``--output``
(one ``error:`` line; nothing written).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a clone without `pip install -e`

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

import argparse  # noqa: E402
import logging  # noqa: E402

from mae_det.checkpoint import CheckpointError  # noqa: E402
from mae_det.config.pretrain import ConfigError  # noqa: E402
from mae_det.modeling import MAE_FACTORIES  # noqa: E402
from mae_det.utils.visualize import VisualizationError, visualize_images  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="mae_det pretraining checkpoint or official full .pth")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files and/or folders (searched recursively, skipping hidden entries and --output)")
    parser.add_argument("--output", required=True, help="folder for the PNG grids")
    parser.add_argument("--model", choices=sorted(MAE_FACTORIES), default=None,
                        help="factory name (default: from the checkpoint's metadata, else inferred from shapes)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed, in [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (same seed, same masks)")
    parser.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's)")
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="override whether the model predicts per-patch normalized pixels")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        written = visualize_images(
            args.checkpoint, args.input, args.output, model_name=args.model, mask_ratio=args.mask_ratio,
            seed=args.seed, img_size=args.img_size, norm_pix_loss=args.norm_pix_loss,
        )
    except (CheckpointError, ConfigError, VisualizationError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    for path in written:
        print(path)
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
