"""Tiny COCO-format dataset and tiny Mask R-CNN config for the inference / analysis / data-picture tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# Non-contiguous ids: outputs must be mapped back to them in the results json.
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}, {"id": 11, "name": "diamond"}]
SIZE = 128


def make_tiny_coco(root: Path, num_images: int = 3) -> tuple[Path, Path]:
    """Writes ``num_images`` PNGs with a few filled shapes and a COCO json with polygon masks.

    Returns:
        (json path, image folder).
    """
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        img = np.full((SIZE, SIZE, 3), 40, np.uint8)
        for k, cat in enumerate(CATEGORIES):
            x0, y0 = int(rng.integers(4, 60)), int(rng.integers(4, 60))
            w, h = (30, 30) if k != 1 else (50, 12)
            img[y0 : y0 + h, x0 : x0 + w] = (80 * (k + 1), 255 - 70 * k, 60 + 60 * k)
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat["id"], "iscrowd": 0,
                "bbox": [x0, y0, w, h], "area": w * h, "segmentation": [[float(v) for v in poly]],
            })
        name = f"img_{i}.png"
        Image.fromarray(img).save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": SIZE, "width": SIZE})
    json_path = root / "instances.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return json_path, image_dir


def write_tiny_config(root: Path, json_path: Path, image_dir: Path) -> Path:
    """A ViT (embed 64, depth 2) Mask R-CNN at 128 px with light heads, on the tiny dataset ("tiny_shapes")."""
    text = f"""
_BASE_: "{ROOT / 'configs' / 'Base-MaskRCNN-ViT.yaml'}"
MODEL:
  DEVICE: "cpu"
  VIT:
    SIZE: "custom"
    EMBED_DIM: 64
    DEPTH: 2
    NUM_HEADS: 4
    PRETRAIN_IMG_SIZE: 128
    INPUT_SIZE: 128
    WINDOW_SIZE: 4
    GLOBAL_ATTN_INDEXES: [1]
    DROP_PATH_RATE: 0.0
    OUT_CHANNELS: 64
  ANCHOR_GENERATOR:
    SIZES: [[16], [32], [64], [128], [256]]
  RPN:
    PRE_NMS_TOPK_TEST: 200
    POST_NMS_TOPK_TEST: 50
  ROI_HEADS:
    NUM_CLASSES: 3
    BATCH_SIZE_PER_IMAGE: 32
  ROI_BOX_HEAD:
    NUM_CONV: 1
    CONV_DIM: 64
    FC_DIM: 128
  ROI_MASK_HEAD:
    NUM_CONV: 1
    CONV_DIM: 64
DATASETS:
  REGISTER: [["tiny_shapes", "{json_path}", "{image_dir}"]]
  TRAIN: ("tiny_shapes",)
  TEST: ("tiny_shapes",)
INPUT:
  MIN_SIZE_TRAIN: (128,)
  MAX_SIZE_TRAIN: 128
  MIN_SIZE_TEST: 128
  MAX_SIZE_TEST: 128
  LSJ:
    ENABLED: True
    IMAGE_SIZE: 128
DATALOADER:
  NUM_WORKERS: 0
SOLVER:
  IMS_PER_BATCH: 2
TEST:
  DETECTIONS_PER_IMAGE: 10
"""
    path = root / "tiny_maskrcnn.yaml"
    path.write_text(text)
    return path


def save_untrained_detector(config: Path, seed: int = 0) -> Path:
    """The whole Mask R-CNN of ``config`` at its seeded initial weights, saved as a detection checkpoint next to the
    config: the weights the inference tests load (prediction refuses a checkpoint that leaves part of the model
    untrained, and running without weights)."""
    import torch
    from detectron2.modeling import build_model

    from mae_det.engine.det_trainer import build_checkpointer
    from mae_det.engine.predictor import load_predict_cfg

    cfg = load_predict_cfg(str(config), ["OUTPUT_DIR", str(config.parent)])
    torch.manual_seed(seed)
    build_checkpointer(cfg, build_model(cfg)).save(f"detector_seed{seed}")
    return config.parent / f"detector_seed{seed}.pth"


def write_tiny_pretrain_config(root: Path) -> Path:
    """A tiny MAE (embed 64, depth 2, 2-block decoder) at 64 px; its DATA.PATH does not exist (not needed)."""
    path = root / "tiny_mae.yaml"
    path.write_text(f"""
_BASE_: "{ROOT / 'configs' / 'pretrain' / 'Base-Pretrain.yaml'}"
MODEL:
  ARCH: "mae_vit_tiny_patch16"
  EMBED_DIM: 64
  DEPTH: 2
  NUM_HEADS: 4
  PATCH_SIZE: 8
  IMG_SIZE: 64
  DECODER_EMBED_DIM: 32
  DECODER_DEPTH: 2
  DECODER_NUM_HEADS: 4
DATA:
  PATH: "{root / 'no_such_folder'}"
""")
    return path
