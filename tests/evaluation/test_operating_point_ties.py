"""Exact IoU ties (integer boxes) are broken as COCOeval breaks them: a detection takes the last best object."""
import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mae_det.evaluation.operating_point import operating_point


def _cocoeval_recall(gt: dict, results: list[dict]) -> float:
    """COCOeval's box recall at IoU 0.5, area "all", maxDets 100, in %."""
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
    return 100.0 * float(ev.eval["recall"][0, 0, 0, -1])


def test_a_tied_detection_takes_the_last_object_like_cocoeval():
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 0, 10, 10], "area": 100, "iscrowd": 0}]
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "annotations": anns,
          "categories": [{"id": 1, "name": "a"}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.9},   # IoU 9/11 with both
               {"image_id": 1, "category_id": 1, "bbox": [-2, 0, 10, 10], "score": 0.8}]  # 2/3 with 1, 3/7 with 2
    # Taking object 1 (the first of the tie) would leave the second detection nothing: recall 50.
    assert _cocoeval_recall(gt, results) == 100.0
    op = operating_point(gt, results, score=0.0)
    assert (op["found"], op["found_right_class"], op["precision"]) == (100.0, 100.0, 100.0)
