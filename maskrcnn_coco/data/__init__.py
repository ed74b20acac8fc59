"""Datasets and loaders: COCO-format files (``coco``) and the built-in synthetic set (``shapes``)."""

from maskrcnn_coco.data.coco import CategoryMapping, DataBundle, DataError, build_data, build_datasets

__all__ = ["CategoryMapping", "DataBundle", "DataError", "build_data", "build_datasets"]
