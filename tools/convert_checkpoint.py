#!/usr/bin/env python
"""Convert a pretrained ViT checkpoint into a Detectron2-ready file for the ViT-FPN model.

    python tools/convert_checkpoint.py --input mae_pretrain_vit_base.pth --output vit_b_d2.pth \\
        [--config-file configs/COCO/mask_rcnn_vit_b_mae.yaml] [--format auto] [KEY VALUE ...]

Inputs: this project's pretraining checkpoints and encoder exports, official MAE checkpoints, timm ViT state
dicts, Hugging Face ViTMAE weights (``pytorch_model.bin`` or ``model.safetensors``) and Detectron2 checkpoints
(ours or ViTDet's). With a config, the encoder is checked against its model (width and depth) and the position
table and patch kernel are resampled to its sizes; without one, keys are only renamed. The output,
``{"model": ..., "__author__": "mae_det", "matching_heuristics": False, "source_format": ...}`` (plus ``pos_grid``, the
position table's token grid, where known), is read by ``MODEL.WEIGHTS`` (the source format lets the load report tell
new tables from missing ones). The --output suffix picks the file type: ``.pth`` / ``.pt`` a torch file,
``.safetensors`` the tensors with the other entries as json in the metadata entry ``"mae_det"``.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.checkpoint.convert import FORMATS, convert_to_detectron2  # noqa: E402
from mae_det.checkpoint.io import CheckpointError, save_checkpoint  # noqa: E402

OUTPUT_SUFFIXES = (".pth", ".pt", ".safetensors")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", required=True,
        help="checkpoint file to convert (of a Hugging Face model folder: its model.safetensors or pytorch_model.bin)",
    )
    parser.add_argument("--output", required=True, help="Detectron2-ready .pth, .pt or .safetensors file to write")
    parser.add_argument("--config-file", default="", help="detection config of the target model (optional)")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="input format (default: detect)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix not in OUTPUT_SUFFIXES:
        sys.exit(f"convert_checkpoint: --output {output}: expected a file name ending in {', '.join(OUTPUT_SUFFIXES)} "
                 "(MODEL.WEIGHTS reads a file by its suffix)")
    if output.exists() and os.path.exists(args.input) and os.path.samefile(args.input, output):
        sys.exit(f"convert_checkpoint: --output {output} is the input file; write the conversion to another file")
    try:
        cfg = None
        if args.config_file or args.opts:
            from mae_det.config.detection import load_det_cfg

            cfg = load_det_cfg(args.config_file, args.opts, training=False)
        state, info = convert_to_detectron2(args.input, cfg, args.format)
        grid = {} if info["grid"] is None else {"pos_grid": list(info["grid"])}
        save_checkpoint({"model": state, "__author__": "mae_det", "matching_heuristics": False,
                         "source_format": info["origin"], **grid}, output)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"convert_checkpoint: {e}")
    print(f"[convert] {args.input} ({info['format']}) -> {args.output}: {len(state)} tensors under "
          f"{info['encoder_prefix']}..., {len(info['dropped'])} keys dropped")
    for note in info["notes"]:
        print(f"[convert] {note}")


if __name__ == "__main__":
    main()
