import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mae_det.evaluation.operating_point import operating_point


def _gt(boxes: list[tuple], crowd: tuple = ()) -> dict:
    """boxes: (image_id, category_id, x, y, w, h); crowd: the same for crowd regions."""
    anns = [{"id": i + 1, "image_id": b[0], "category_id": b[1], "bbox": list(b[2:]), "area": b[4] * b[5],
             "iscrowd": int(i >= len(boxes))} for i, b in enumerate([*boxes, *crowd])]
    images = sorted({a["image_id"] for a in anns} | {1})
    return {"images": [{"id": i, "width": 100, "height": 100} for i in images], "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}


def _det(image_id: int, cat: int, box: tuple, score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def test_perfect_detections_find_everything():
    gt = _gt([(1, 1, 10, 10, 20, 20), (1, 2, 50, 50, 30, 30), (2, 3, 0, 0, 10, 10)])
    res = [_det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    op = operating_point(gt, res)
    assert (op["objects"], op["detections"]) == (3, 3)
    assert op["found"] == op["found_right_class"] == op["precision"] == 100.0


def test_a_box_in_place_with_the_wrong_class_is_found_but_not_right():
    gt = _gt([(1, 1, 10, 10, 20, 20), (1, 2, 50, 50, 30, 30)])
    res = [_det(1, 1, (10, 10, 20, 20), 0.9), _det(1, 3, (50, 50, 30, 30), 0.8)]
    op = operating_point(gt, res)
    assert op["found"] == 100.0
    assert op["found_right_class"] == 50.0
    assert op["precision"] == 50.0


def test_threshold_iou_and_duplicates():
    gt = _gt([(1, 1, 0, 0, 20, 20), (1, 1, 60, 60, 20, 20)])
    res = [
        _det(1, 1, (0, 0, 20, 20), 0.95),
        _det(1, 1, (1, 1, 20, 20), 0.9),     # a duplicate of the first object: wrong, the object is taken
        _det(1, 1, (60, 60, 20, 20), 0.3),   # below the score threshold: not shown, not counted
        _det(1, 1, (70, 70, 20, 20), 0.6),   # IoU 1/7 with the second object: not found
    ]
    op = operating_point(gt, res)
    assert (op["objects"], op["detections"]) == (2, 3)
    assert op["found"] == op["found_right_class"] == 50.0
    assert op["precision"] == pytest.approx(100 / 3)
    low = operating_point(gt, res, score=0.2)
    assert low["found_right_class"] == 100.0 and low["detections"] == 4
    assert operating_point(gt, res, iou=0.1)["found"] == 100.0  # the 1/7-IoU box counts at a looser IoU


def test_greedy_in_score_order_takes_the_best_free_object():
    # The top detection overlaps both objects (IoU 0.74 and 0.90) and takes the better one, so the next detection,
    # which overlaps only the first object (IoU 0.67; 0.43 with the second), still finds it. Taking the first
    # object above the IoU threshold instead would leave one object unfound.
    gt = _gt([(1, 1, 0, 0, 20, 20), (1, 1, 4, 0, 20, 20)])
    res = [_det(1, 1, (3, 0, 20, 20), 0.9), _det(1, 1, (-4, 0, 20, 20), 0.8)]
    assert operating_point(gt, res)["found_right_class"] == 100.0


def test_crowd_regions_neither_count_as_objects_nor_make_detections_wrong():
    gt = _gt([(1, 1, 0, 0, 20, 20)], crowd=((1, 1, 50, 50, 40, 40),))
    res = [_det(1, 1, (0, 0, 20, 20), 0.9), _det(1, 1, (55, 55, 20, 20), 0.8), _det(1, 2, (55, 55, 20, 20), 0.7)]
    op = operating_point(gt, res)
    assert op["objects"] == 1
    assert op["detections"] == 2  # the class-1 box inside the class-1 crowd is ignored; the class-2 one is wrong
    assert op["precision"] == 50.0


def test_no_detections_and_unknown_images():
    gt = _gt([(1, 1, 0, 0, 20, 20)])
    op = operating_point(gt, [])
    assert op["found"] == 0.0 and op["precision"] is None
    with pytest.raises(ValueError, match="image_id 7, which the ground truth does not have"):
        operating_point(gt, [_det(7, 1, (0, 0, 5, 5), 0.9)])


def test_recall_equals_cocoeval_on_one_class():
    """At score 0, on one class, found_right_class is COCOeval's recall at IoU 0.5 (area all, maxDets 100)."""
    rng = np.random.default_rng(0)
    boxes, res = [], []
    for image_id in range(1, 31):
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = (float(v) for v in (*rng.uniform(0, 60, 2), *rng.uniform(8, 40, 2)))
            boxes.append((image_id, 1, x, y, w, h))
            for _ in range(rng.integers(0, 3)):  # jittered copies: some match, some are duplicates or misses
                j = rng.normal(0, 6, 4)
                res.append(_det(image_id, 1, (x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])),
                                float(rng.uniform())))
    gt = _gt(boxes)
    gt["categories"] = gt["categories"][:1]
    recall_50 = _cocoeval_recall(gt, res)
    op = operating_point(gt, res, score=0.0)
    assert 30 < recall_50 < 95  # the draw has both hits and misses
    assert op["found_right_class"] == pytest.approx(recall_50)


def _cocoeval_recall(gt: dict, results: list[dict]) -> float:
    """COCOeval's box recall at IoU 0.5, area "all", maxDets 100, of the first class, in %."""
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
    return 100.0 * float(ev.eval["recall"][0, 0, 0, -1])


def test_a_tied_detection_takes_the_last_object_like_cocoeval():
    """Exact IoU ties (integer boxes) are broken as COCOeval breaks them: a detection takes the last best object."""
    gt = _gt([(1, 1, 0, 0, 10, 10), (1, 1, 2, 0, 10, 10)])
    gt["categories"] = gt["categories"][:1]
    results = [_det(1, 1, (1, 0, 10, 10), 0.9),    # IoU 9/11 with both objects
               _det(1, 1, (-2, 0, 10, 10), 0.8)]   # 2/3 with the first, 3/7 with the second
    # Taking the first object (the first of the tie) would leave the second detection nothing: recall 50.
    assert _cocoeval_recall(gt, results) == 100.0
    op = operating_point(gt, results, score=0.0)
    assert (op["found"], op["found_right_class"], op["precision"]) == (100.0, 100.0, 100.0)
