"""data/layouts.py: COCO 2017, Roboflow and CVAT folder layouts under data.root, and data.val_fraction."""

import json
import re

import pytest
from omegaconf import OmegaConf

from maskrcnn_coco.cli.probe import compose_config
from maskrcnn_coco.config import CocoDataConfig
from maskrcnn_coco.data.coco import DataError
from maskrcnn_coco.data.layouts import resolve_layout
from maskrcnn_coco.utils.errors import ConfigError, UserError

CATEGORIES = [{"id": 1, "name": "a"}]


def export(ann_file, image_dir, ids):
    """A COCO file listing ``ids`` and their (empty placeholder) image files in ``image_dir``."""
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (image_dir / f"{i}.jpg").write_bytes(b"")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in ids]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0} for i in ids]
    ann_file.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": CATEGORIES}))


def coco2017(root):
    export(root / "annotations" / "instances_train2017.json", root / "train2017", range(10))
    export(root / "annotations" / "instances_val2017.json", root / "val2017", range(10, 13))
    return root


def roboflow(root, splits=("train", "valid", "test")):
    for k, split in enumerate(splits):
        export(root / split / "_annotations.coco.json", root / split, range(100 * k, 100 * k + 10))
    return root


def cvat(root, subsets=("default",), nested=True):
    for k, subset in enumerate(subsets):
        export(root / "annotations" / f"instances_{subset}.json", root / "images" / (subset if nested else ""),
               range(100 * k, 100 * k + 10))
    return root


def data_cfg(root=None, **keys):
    """data=coco as the entry point composes it (conf/data/coco.yaml), values interpolated."""
    overrides = ["data=coco", *([f"data.root={root}"] if root is not None else []),
                 *(f"data.{k}={v}" for k, v in keys.items())]
    return compose_config(None, overrides).data


def test_coco2017_is_recognised(tmp_path):
    root = coco2017(tmp_path / "coco")
    paths = resolve_layout(data_cfg(root), tmp_path / "split")
    assert paths.layout == "coco2017" and paths.split is None
    assert paths.as_dict() == {
        "train_images": root / "train2017", "val_images": root / "val2017",
        "train_annotations": root / "annotations/instances_train2017.json",
        "val_annotations": root / "annotations/instances_val2017.json",
    }
    assert paths.lines == [f"Data layout: coco2017 (recognised from data.root={root}): train {root}/annotations/"
                           f"instances_train2017.json + {root}/train2017, val {root}/annotations/instances_val2017.json "
                           f"+ {root}/val2017"]
    assert not (tmp_path / "split").exists()


def test_roboflow_is_recognised(tmp_path):
    root = roboflow(tmp_path / "d")
    paths = resolve_layout(data_cfg(root), tmp_path / "split")
    assert paths.layout == "roboflow"
    assert (paths.train_annotations, paths.train_images) == (root / "train/_annotations.coco.json", root / "train")
    assert (paths.val_annotations, paths.val_images) == (root / "valid/_annotations.coco.json", root / "valid")
    assert paths.lines == [f"Data layout: roboflow (recognised from data.root={root}): train {root}/train/"
                           f"_annotations.coco.json + {root}/train, val {root}/valid/_annotations.coco.json + {root}/valid"]


def test_roboflow_without_valid_asks_for_a_fraction(tmp_path):
    root = roboflow(tmp_path / "d", splits=("train",))
    with pytest.raises(ConfigError) as err:
        resolve_layout(data_cfg(root), tmp_path / "split")
    assert str(err.value) == (f"The Roboflow export at {root} has no validation split ({root}/valid/_annotations.coco.json "
                              f"not found); set data.val_fraction=0.1 to cut a val split from {root}/train/"
                              "_annotations.coco.json, or data.val_annotations and data.val_images")


def test_roboflow_without_valid_splits_train(tmp_path):
    root = roboflow(tmp_path / "d", splits=("train",))
    split = tmp_path / "split"
    paths = resolve_layout(data_cfg(root, val_fraction=0.2, split_seed=5), split)
    assert paths.layout == "roboflow" and paths.split is not None and not paths.split.reused
    assert paths.as_dict() == {"train_images": root / "train", "val_images": root / "train",
                               "train_annotations": split / "train_split.json", "val_annotations": split / "val_split.json"}
    assert paths.lines == [
        f"Data layout: roboflow (recognised from data.root={root}): train {root}/train/_annotations.coco.json + "
        f"{root}/train, val cut from it by data.val_fraction=0.2 (same images folder)",
        f"Split _annotations.coco.json (10 images) into 8 train / 2 val images (data.val_fraction=0.2, "
        f"data.split_seed=5); written to {split}",
    ]
    assert len(json.loads(paths.val_annotations.read_text())["images"]) == 2
    again = resolve_layout(data_cfg(root, val_fraction=0.2, split_seed=5), split)
    assert again.split.reused and again.lines[1].endswith(f"; re-used from {split}")


def test_val_fraction_wins_over_a_val_file(tmp_path):
    root = roboflow(tmp_path / "d")
    paths = resolve_layout(data_cfg(root, val_fraction=0.3), tmp_path / "split")
    assert paths.val_annotations == tmp_path / "split" / "val_split.json" and paths.val_images == root / "train"
    assert paths.lines[0].endswith(f"(same images folder); {root}/valid/_annotations.coco.json unused "
                                   "(data.val_fraction wins)")
    assert paths.lines[1].startswith("Split _annotations.coco.json (10 images) into 7 train / 3 val images")


@pytest.mark.parametrize("nested", [True, False])
def test_cvat_is_recognised_with_nested_or_flat_images(tmp_path, nested):
    root = cvat(tmp_path / "c", nested=nested)
    images = root / "images" / "default" if nested else root / "images"
    with pytest.raises(ConfigError) as err:
        resolve_layout(data_cfg(root), tmp_path / "split")
    assert str(err.value) == (f"The CVAT export at {root} has one annotation file, {root}/annotations/instances_default.json, "
                              f"and no validation subset; set data.val_fraction=0.1 to cut a val split from {root}/"
                              "annotations/instances_default.json, or data.val_annotations and data.val_images")
    paths = resolve_layout(data_cfg(root, val_fraction=0.1), tmp_path / "split")
    assert paths.layout == "cvat" and paths.train_images == paths.val_images == images
    assert paths.lines[0] == (f"Data layout: cvat (recognised from data.root={root}): train {root}/annotations/"
                              f"instances_default.json + {images}, val cut from it by data.val_fraction=0.1 "
                              "(same images folder)")
    assert paths.lines[1].startswith("Split instances_default.json (10 images) into 9 train / 1 val images")


def test_cvat_project_subsets_train_and_validation(tmp_path):
    root = cvat(tmp_path / "c", subsets=("Train", "Validation", "Test"))
    paths = resolve_layout(data_cfg(root), tmp_path / "split")
    assert paths.layout == "cvat"
    assert paths.as_dict() == {
        "train_images": root / "images/Train", "val_images": root / "images/Validation",
        "train_annotations": root / "annotations/instances_Train.json",
        "val_annotations": root / "annotations/instances_Validation.json",
    }
    # Without a Validation subset: the same hint, naming the subsets found.
    (root / "annotations/instances_Validation.json").unlink()
    with pytest.raises(ConfigError, match=re.escape(f"The CVAT export at {root} has no validation subset "
                                                    "(instances_Validation.json; found Test, Train); set "
                                                    "data.val_fraction=0.1 to cut a val split from")):
        resolve_layout(data_cfg(root), tmp_path / "split")


def test_cvat_lone_subset_of_another_name(tmp_path):
    root = cvat(tmp_path / "c", subsets=("batch1",))
    paths = resolve_layout(data_cfg(root, layout="cvat", val_fraction=0.5), tmp_path / "split")
    assert paths.train_images == root / "images/batch1" and paths.split.source == root / "annotations/instances_batch1.json"


def test_detection_order_coco2017_then_roboflow_then_cvat(tmp_path):
    root = cvat(roboflow(tmp_path / "d"))
    assert resolve_layout(data_cfg(root), tmp_path / "s").layout == "roboflow"
    coco2017(root)
    assert resolve_layout(data_cfg(root), tmp_path / "s").layout == "coco2017"


def test_explicit_presets(tmp_path):
    root = cvat(roboflow(coco2017(tmp_path / "d")), subsets=("Train", "Validation"))
    for layout in ("coco2017", "roboflow", "cvat"):
        paths = resolve_layout(data_cfg(root, layout=layout), tmp_path / "s")
        assert paths.layout == layout
        assert paths.lines[0].startswith(f"Data layout: {layout} (data.layout={layout}): train ")
    assert resolve_layout(data_cfg(root, layout="roboflow"), tmp_path / "s").train_images == root / "train"
    assert resolve_layout(data_cfg(root, layout="cvat"), tmp_path / "s").val_images == root / "images/Validation"


def test_explicit_preset_names_its_missing_files(tmp_path):
    root = roboflow(tmp_path / "d")
    with pytest.raises(DataError) as err:
        resolve_layout(data_cfg(root, layout="cvat"), tmp_path / "s")
    assert str(err.value) == (f"data.layout=cvat, data.root={root}: not found: {root}/annotations/instances_default.json, "
                              f"{root}/images; check data.root, or set data.layout=auto")
    with pytest.raises(DataError) as err:
        resolve_layout(data_cfg(root, layout="coco2017"), tmp_path / "s")
    message = str(err.value)
    for path in ("train2017", "val2017", "annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert f"{root}/{path}" in message
    assert message.startswith(f"data.layout=coco2017, data.root={root}: not found: ")
    # The preset's train files also when the val split is cut from them.
    with pytest.raises(DataError, match=re.escape(f"data.layout=cvat, data.root={root}: not found: {root}/annotations/"
                                                  f"instances_default.json, {root}/images; check data.root")):
        resolve_layout(data_cfg(root, layout="cvat", val_fraction=0.1), tmp_path / "s")


def test_coco2017_without_its_val_file_suggests_a_fraction(tmp_path):
    root = coco2017(tmp_path / "coco")
    (root / "annotations/instances_val2017.json").unlink()
    with pytest.raises(DataError) as err:
        resolve_layout(data_cfg(root), tmp_path / "s")
    assert str(err.value) == (f"Data layout coco2017 (recognised from data.root={root}): not found: {root}/annotations/"
                              f"instances_val2017.json; set data.val_fraction=0.1 to cut a val split from {root}/"
                              "annotations/instances_train2017.json, or data.val_annotations and data.val_images")


def test_paths_set_explicitly_are_used_as_given(tmp_path):
    root = roboflow(tmp_path / "d")
    other = tmp_path / "elsewhere"
    export(other / "val.json", other / "imgs", range(5))
    cfg = data_cfg(root, val_annotations=other / "val.json", val_images=other / "imgs")
    paths = resolve_layout(cfg, tmp_path / "s")
    # auto still recognises the export for the keys left unset: a Roboflow train/ with a val set elsewhere.
    assert (paths.layout, paths.train_images, paths.val_images) == ("roboflow", root / "train", other / "imgs")
    assert paths.lines[0].startswith(f"Data layout: roboflow (recognised from data.root={root}; data.val_images, "
                                     "data.val_annotations as set): train ")
    # Nothing recognised under data.root: the keys as set, the others as the config gives them.
    bare = tmp_path / "bare"
    bare.mkdir()
    paths = resolve_layout(data_cfg(bare, val_annotations=other / "val.json", val_images=other / "imgs"), tmp_path / "s")
    assert paths.layout == "custom"
    assert paths.as_dict() == {"train_images": bare / "train2017", "val_images": other / "imgs",
                               "train_annotations": bare / "annotations/instances_train2017.json",
                               "val_annotations": other / "val.json"}
    assert paths.lines == [f"Data layout: custom (data.val_images, data.val_annotations set explicitly): train "
                           f"{bare}/annotations/instances_train2017.json + {bare}/train2017, val {other}/val.json + "
                           f"{other}/imgs"]
    # An explicit layout takes the keys set, the rest from its preset (here: a val split for a Roboflow export).
    paths = resolve_layout(data_cfg(root, layout="roboflow", val_annotations=other / "val.json",
                                    val_images=other / "imgs"), tmp_path / "s")
    assert (paths.layout, paths.train_images, paths.val_images) == ("roboflow", root / "train", other / "imgs")
    assert paths.lines[0].startswith("Data layout: roboflow (data.layout=roboflow; data.val_images, data.val_annotations "
                                     "as set): train ")


def test_all_four_paths_without_a_root(tmp_path):
    root = coco2017(tmp_path / "coco")
    keys = {"train_images": root / "train2017", "val_images": root / "val2017",
            "train_annotations": root / "annotations/instances_train2017.json",
            "val_annotations": root / "annotations/instances_val2017.json"}
    paths = resolve_layout(data_cfg(None, **keys), tmp_path / "s")
    assert paths.layout == "custom" and paths.as_dict() == keys
    structured = OmegaConf.structured(CocoDataConfig(**{k: str(v) for k, v in keys.items()}))
    assert resolve_layout(structured, tmp_path / "s").as_dict() == keys
    with pytest.raises(ConfigError, match=re.escape("data.layout=cvat: set data.root to the dataset's folder")):
        resolve_layout(data_cfg(None, layout="cvat", **keys), tmp_path / "s")


def test_a_plain_dataclass_is_interpolated(tmp_path):
    root = roboflow(tmp_path / "d")
    assert resolve_layout(CocoDataConfig(root=str(root)), tmp_path / "s").layout == "roboflow"


def test_nothing_recognised_lists_what_was_looked_for(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as err:
        resolve_layout(data_cfg(root), tmp_path / "s")
    assert str(err.value) == (f"Annotation file not found: {root}/annotations/instances_train2017.json (COCO 2017), "
                              f"{root}/train/_annotations.coco.json (Roboflow) or {root}/annotations/instances_default.json "
                              "(CVAT COCO 1.0); set data.root to the dataset's folder, or data.train_annotations and "
                              "data.train_images to its files")
    with pytest.raises(UserError, match=re.escape("(CVAT COCO 1.0); data.root=/nowhere/coco does not exist; set data.root")):
        resolve_layout(data_cfg("/nowhere/coco"), tmp_path / "s")


def test_custom_paths_with_a_fraction_split_the_train_file(tmp_path):
    other = tmp_path / "mine"
    export(other / "all.json", other / "imgs", range(20))
    cfg = data_cfg(tmp_path / "unused", train_annotations=other / "all.json", train_images=other / "imgs",
                   val_fraction=0.25)
    paths = resolve_layout(cfg, tmp_path / "s")
    assert paths.layout == "custom" and paths.val_images == paths.train_images == other / "imgs"
    assert paths.lines[1] == ("Split all.json (20 images) into 15 train / 5 val images (data.val_fraction=0.25, "
                              f"data.split_seed=0); written to {tmp_path / 's'}")
    assert f"{tmp_path}/unused/annotations/instances_val2017.json" not in paths.lines[0]  # absent: not "unused"
