"""A detector at one score threshold, as a user sees its pictures: how many objects it finds, how many with the
right class, and how many of its boxes are right.

COCO AP averages over every threshold; a figure drawn at score >= 0.5 shows one operating point of the same
detections. This module measures that point over a whole split, so that a claim like "most objects are found with
the right class" is a number rather than a reading of a few panels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils


def _greedy_match(ious: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """COCO's matching: detections in the given (descending score) order each take the unmatched object of
    highest IoU, if that IoU is >= ``threshold``; of objects with equal IoU the last, as COCOeval (its loop keeps
    replacing the match while ``iou >= best``), since integer boxes tie exactly.

    Args:
        ious: (D, G) IoU of each detection with each object.

    Returns:
        (D,) and (G,) booleans: which detections and which objects were matched.
    """
    det_hit = np.zeros(ious.shape[0], dtype=bool)
    obj_hit = np.zeros(ious.shape[1], dtype=bool)
    for d in range(ious.shape[0]):
        free = np.where(obj_hit, -1.0, ious[d])
        if free.size and free.max() >= threshold:
            obj_hit[free.size - 1 - free[::-1].argmax()] = det_hit[d] = True
    return det_hit, obj_hit


def _ious(dets: list[dict], objs: list[dict], crowd: bool = False) -> np.ndarray:
    """(D, G) box IoU (xywh); against crowd regions, COCO's intersection over the detection's area."""
    if not dets or not objs:
        return np.zeros((len(dets), len(objs)))
    return np.asarray(mask_utils.iou([d["bbox"] for d in dets], [o["bbox"] for o in objs], [int(crowd)] * len(objs)))


def operating_point(gt: dict, results: Sequence[dict], *, score: float = 0.5, iou: float = 0.5) -> dict[str, Any]:
    """Recall and precision of the detections with score >= ``score``, matched at box IoU >= ``iou``.

    Matching follows COCOeval (greedy by descending score, each object matched once, a detection left over that
    covers a crowd region of its class is ignored rather than counted wrong), so at ``score=0`` on a
    single-class split, ``found_right_class`` is COCOeval's recall at IoU 0.5 with maxDets 100.

    Args:
        gt: COCO ground truth (``images``, ``annotations``; ``iscrowd`` optional).
        results: COCO detection results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        score: the threshold a user would draw or deploy at.
        iou: the box IoU that counts as found.

    Returns:
        ``objects`` and ``detections`` (counts; crowd regions and ignored detections excluded), ``found`` (% of
        objects matched by a detection of any class: localization alone), ``found_right_class`` (% matched by a
        detection of their class) and ``precision`` (% of detections matched to an object of their class; None
        without detections).

    Raises:
        ValueError: a result names an image the ground truth does not have.
    """
    image_ids = {img["id"] for img in gt["images"]}
    objs_of: dict[Any, list[dict]] = defaultdict(list)
    crowds_of: dict[Any, list[dict]] = defaultdict(list)
    for ann in gt["annotations"]:
        (crowds_of if ann.get("iscrowd", 0) else objs_of)[ann["image_id"]].append(ann)
    dets_of: dict[Any, list[dict]] = defaultdict(list)
    for r in results:
        if r["image_id"] not in image_ids:
            raise ValueError(f"detection results name image_id {r['image_id']!r}, which the ground truth does not have")
        if r["score"] >= score:
            dets_of[r["image_id"]].append(r)

    objects = found = right = detections = correct = 0
    for image_id in image_ids:
        objs, crowds = objs_of[image_id], crowds_of[image_id]
        dets = sorted(dets_of[image_id], key=lambda r: -r["score"])
        objects += len(objs)
        found += int(_greedy_match(_ious(dets, objs), iou)[1].sum())  # any class: where the boxes are
        for cat in {o["category_id"] for o in objs} | {d["category_id"] for d in dets}:
            cat_dets = [d for d in dets if d["category_id"] == cat]
            det_hit, obj_hit = _greedy_match(_ious(cat_dets, [o for o in objs if o["category_id"] == cat]), iou)
            cat_crowds = [c for c in crowds if c["category_id"] == cat]
            leftover = [d for d, hit in zip(cat_dets, det_hit) if not hit]
            ignored = int((_ious(leftover, cat_crowds, crowd=True) >= iou).any(axis=1).sum()) if cat_crowds else 0
            right += int(obj_hit.sum())
            correct += int(det_hit.sum())
            detections += len(cat_dets) - ignored

    def pct(n: int, d: int) -> float | None:
        return 100.0 * n / d if d else None

    return {"score": score, "iou": iou, "objects": objects, "detections": detections, "found": pct(found, objects),
            "found_right_class": pct(right, objects), "precision": pct(correct, detections)}
