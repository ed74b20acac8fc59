"""COCO evaluation: detections to COCO results and COCOeval metrics."""

from maskrcnn_coco.evaluation.coco_eval import coco_metrics, predictions_to_coco

__all__ = ["coco_metrics", "predictions_to_coco"]
