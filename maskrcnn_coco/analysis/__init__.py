"""Reading finished runs back: the epoch history by tag, the sweep objective and sweep summaries,
and a run's TensorBoard scalars (``read_scalars``)."""

from maskrcnn_coco.analysis.runs import read_scalars

__all__ = ["read_scalars"]
