"""The cached, memory-mapped split index (data/index_cache.py): written once, read back without the
annotation file being parsed, equal to a fresh build (samples, ground truth, lines said), rebuilt
when the file, the image folder or a setting changes; one build per node with two gloo ranks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from test_exports import NO_AUG, TOOLS

from maskrcnn_coco.data import coco as coco_module
from maskrcnn_coco.data import index_cache
from maskrcnn_coco.data.coco import build_coco_dataset, build_data, build_transforms
from maskrcnn_coco.data.index_cache import INDEX_DIR, META, IndexCache
from maskrcnn_coco.utils.errors import DataError

from conftest import tiny_data_cfg


def build(images, path, **kw):
    kw = {"train": True, "augment": NO_AUG, "drop_empty": True, "crowd": "train", "index_cache": "auto", **kw}
    return build_coco_dataset(images, path, **kw)


class Loads:
    """Counts how often an annotation file is parsed."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = coco_module.load_coco

        def counting(path):
            self.count += 1
            return real(path)

        monkeypatch.setattr(coco_module, "load_coco", counting)


def samples(dataset):
    plain = dataset.with_transforms(build_transforms(False, NO_AUG, dataset.mapping))
    return [plain[i] for i in range(len(plain))]


def assert_equal_samples(a, b):
    assert len(a) == len(b) > 0
    for (image, target), (ref_image, ref_target) in zip(a, b):
        assert torch.equal(image, ref_image) and target.keys() == ref_target.keys()
        for key in target:
            assert torch.equal(torch.as_tensor(target[key]), torch.as_tensor(ref_target[key])), key


@pytest.mark.parametrize("tool", ["cvat", "labelme"])
def test_a_second_build_reads_the_index_without_parsing_the_file_and_equals_the_first(tool, tmp_path, monkeypatch, caplog):
    images, path = TOOLS[tool](tmp_path)
    loads = Loads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="maskrcnn_coco.data.coco"):
        fresh = build(images, path)
    said_fresh = [r.getMessage() for r in caplog.records if r.name == "maskrcnn_coco.data.coco"]
    caplog.clear()
    folders = list((path.parent / INDEX_DIR).iterdir())
    assert loads.count == 1 and len(folders) == 1 and (folders[0] / META).is_file()
    assert not [p for p in folders[0].iterdir() if p.name.endswith(".tmp")]

    with caplog.at_level(logging.INFO, logger="maskrcnn_coco.data.coco"):
        cached = build(images, path)
    assert loads.count == 1  # the annotation file was not parsed again
    assert [r.getMessage() for r in caplog.records if r.name == "maskrcnn_coco.data.coco"] == said_fresh
    assert isinstance(cached.records._data, np.memmap)
    assert cached.ids == fresh.ids and cached.usable_ann_ids == {a for a in fresh.usable_ann_ids
                                                                  if fresh.coco.anns[a]["image_id"] in set(fresh.ids)}
    assert cached.frames == fresh.frames and cached.mapping.coco_ids == fresh.mapping.coco_ids
    assert_equal_samples(samples(cached), samples(fresh))
    for image_id in fresh.ids:  # the annotation ids each target lists, from the index alone
        assert cached.annotation_ids(image_id) == [a["id"] for a in fresh.coco.imgToAnns[image_id] if a["id"] in fresh.usable_ann_ids]
    assert cached.annotation_ids(-5) is None
    # The ground truth (loaded on first use) is the checked COCO of the fresh build, indexes included.
    assert cached.index._coco is None
    assert cached.coco.dataset == fresh.coco.dataset and cached.coco.imgToAnns == fresh.coco.imgToAnns
    assert cached.coco.skipped_annotations == fresh.coco.skipped_annotations
    assert loads.count == 1


def test_the_index_is_rebuilt_when_the_file_the_folder_or_a_setting_changes(tmp_path, monkeypatch, caplog):
    images, path = TOOLS["labelme"](tmp_path)
    loads = Loads(monkeypatch)
    first = build(images, path)
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO):
        changed = build(images, path)
    assert loads.count == 2 and len(changed.usable_ann_ids) == len(first.usable_ann_ids) - 1
    assert "The index of annotations.json is rebuilt: the annotation file changed" in caplog.text

    os.utime(path, ns=(1, 1))  # same bytes, another modification time
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build(images, path)
    assert loads.count == 3 and "the annotation file's modification time changed" in caplog.text
    build(images, path)
    assert loads.count == 3

    (images / "JPEGImages" / "extra.txt").write_text("x")  # a file added where the images are
    os.utime(images / "JPEGImages", ns=(2, 2))
    os.utime(images, ns=(3, 3))
    build(images, path)
    assert loads.count == 4

    build(images, path, crowd="ignore")  # another setting: another index beside the first
    build(images, path, crowd="ignore")
    assert loads.count == 5 and len(list((path.parent / INDEX_DIR).iterdir())) == 2
    build(images, path, index_cache="off")
    assert loads.count == 6


def test_a_read_only_annotation_folder_puts_the_index_in_the_cache_folder(tmp_path, monkeypatch):
    images, path = TOOLS["labelme"](tmp_path / "data")
    monkeypatch.setenv("MASKRCNN_COCO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(index_cache, "_writable", lambda folder: False)
    build(images, path)
    assert [p.parent.name for p in (tmp_path / "cache" / "index").iterdir()] == ["index"]
    chosen = tmp_path / "elsewhere"
    build(images, path, index_cache=str(chosen))
    assert len(list(chosen.iterdir())) == 1 and (next(chosen.iterdir()) / META).is_file()


def test_an_unusable_split_is_not_cached_and_fails_the_same_way_each_time(tmp_path):
    images, path = TOOLS["labelme"](tmp_path)
    (images / "JPEGImages" / "1.jpg").unlink()
    for _ in range(2):
        with pytest.raises(DataError, match=r"1 images listed in annotations.json cannot be used"):
            build(images, path)
    assert not any((path.parent / INDEX_DIR).glob(f"*/{META}"))


def test_a_damaged_index_is_named_and_rebuilt(tmp_path, monkeypatch, caplog):
    images, path = TOOLS["labelme"](tmp_path)
    first = build(images, path)
    meta = next((path.parent / INDEX_DIR).iterdir()) / META
    meta.write_bytes(b"not a pickle")
    loads = Loads(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = build(images, path)
    assert loads.count == 1 and again.ids == first.ids
    assert f"The index in {meta.parent} cannot be read" in caplog.text
    assert pickle.loads(meta.read_bytes())["ids"] == first.ids  # rewritten


def test_the_training_config_caches_the_shapes_splits(tmp_path, monkeypatch):
    cfg = tiny_data_cfg(cache_dir=str(tmp_path / "shapes"))
    assert cfg.index_cache == "auto"
    loads = Loads(monkeypatch)
    first = build_data(cfg, seed=0, progress=False)
    second = build_data(cfg, seed=0, progress=False)
    assert loads.count == 2  # train and val, parsed by the first build only
    for a, b in ((first.train_loader.dataset.dataset, second.train_loader.dataset.dataset),
                 (first.val_loader.dataset, second.val_loader.dataset)):
        assert a.ids == b.ids and all(a.records[i] == b.records[i] for i in range(len(a)))
    assert list(first.train_loader.batch_sampler) == list(second.train_loader.batch_sampler)  # aspect groups


def _node_rank_main(rank, world, init_file, images, path, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real = coco_module.load_coco
        parsed = []

        def counting(p):
            parsed.append(str(p))
            return real(p)

        coco_module.load_coco = counting
        dataset = build(images, path)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"parsed": len(parsed), "ids": dataset.ids, "memmap": isinstance(dataset.records._data, np.memmap)}, f)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_local_rank_0_builds_the_index_and_the_other_rank_maps_it(tmp_path):
    images, path = TOOLS["cvat"](tmp_path)
    mp.spawn(_node_rank_main, args=(2, str(tmp_path / "init"), images, path, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["parsed"] for r in ranks] == [1, 0]  # the node parsed the annotation file once
    assert ranks[0]["ids"] == ranks[1]["ids"] and ranks[1]["memmap"]


def test_the_cache_key_names_every_setting(tmp_path):
    images, path = TOOLS["labelme"](tmp_path)
    base = {"train": True, "drop_empty": True, "max_images": None, "on_invalid": "error", "exif": "apply", "crowd": "ignore"}
    folders = {IndexCache.for_split("auto", path, images, base).folder}
    for key, other in (("train", False), ("drop_empty", False), ("max_images", 2), ("on_invalid", "drop"),
                       ("exif", "ignore"), ("crowd", "train")):
        folders.add(IndexCache.for_split("auto", path, images, {**base, key: other}).folder)
    assert len(folders) == 7
    assert IndexCache.for_split("off", path, images, base) is None


def test_the_start_analyses_are_kept_beside_the_index_and_need_no_ground_truth_later(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from maskrcnn_coco.analysis.audit import _dataset_boxes
    from maskrcnn_coco.analysis.split_stats import dataset_mask_box, dataset_split_stats
    from maskrcnn_coco.data.coco import class_instance_counts

    images, path = TOOLS["cvat"](tmp_path)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)

    def analyses(dataset):
        return (class_instance_counts(dataset), dataset_split_stats(dataset, "train"), dataset_mask_box(dataset),
                _dataset_boxes(dataset, model))

    plain = analyses(build(images, path, index_cache="off"))
    first = analyses(build(images, path))  # computed from the checked COCO, kept as memo-*.pkl
    cached = build(images, path)
    again = analyses(cached)
    assert cached.index._coco is None  # nothing asked for the ground truth
    folder = next((path.parent / INDEX_DIR).iterdir())
    assert len(list(folder.glob("memo-*.pkl"))) == 4
    for a, b, c in zip(plain, first, again):
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b) and np.array_equal(a, c)
        else:  # the pixel sample's timing aside
            assert b == c and dataclasses.replace(a, seconds=0) == dataclasses.replace(b, seconds=0) if hasattr(a, "seconds") else a == b == c
    assert plain[0] == {"circle": 3, "square": 3}

    # A rebuilt index drops the analyses of the one it replaces.
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    changed = build(images, path)
    assert not list(folder.glob("memo-*.pkl"))
    assert sum(class_instance_counts(changed).values()) == sum(plain[0].values()) - 1


def test_a_file_changed_while_its_index_was_built_is_noticed_at_the_next_start(tmp_path, monkeypatch):
    images, path = TOOLS["labelme"](tmp_path)
    real = coco_module.index_split

    def edited_meanwhile(*args, **kwargs):
        index = real(*args, **kwargs)
        path.write_text(path.read_text() + "\n")  # another process saves the file during the build
        return index

    monkeypatch.setattr(coco_module, "index_split", edited_meanwhile)
    build(images, path)
    monkeypatch.setattr(coco_module, "index_split", real)
    loads = Loads(monkeypatch)
    build(images, path)
    assert loads.count == 1  # the index was stored with the file it was built from, so it is rebuilt
