"""data/split.py: a deterministic train/val split of one COCO file, written atomically and re-used."""

import json
import os
import re

import pytest

from maskrcnn_coco.data.coco import DataError
from maskrcnn_coco.data.split import choose_val_ids, format_split, split_annotations, val_count

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]


def coco_file(path, image_ids, anns_per_image=2, **extra):
    """A COCO file with ``anns_per_image`` annotations per image plus ``extra`` top-level keys."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in image_ids]
    anns = [{"id": 100 * i + k, "image_id": i, "category_id": 1 + 6 * (k % 2), "bbox": [0, 0, 2, 2], "area": 4,
             "iscrowd": 0} for i in image_ids for k in range(anns_per_image)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"year": 2024}, "licenses": [{"id": 1}], **extra, "images": images,
                                "annotations": anns, "categories": CATEGORIES}))
    return path


def read(path):
    return json.loads(path.read_text())


def test_counts_and_contents(tmp_path):
    source = coco_file(tmp_path / "all.json", range(1, 21), custom_key={"kept": True})
    train_file, val_file, info = split_annotations(source, 0.25, 0, tmp_path / "out")
    assert (train_file, val_file) == (tmp_path / "out" / "train_split.json", tmp_path / "out" / "val_split.json")
    train, val = read(train_file), read(val_file)
    assert len(val["images"]) == 5 and len(train["images"]) == 15
    train_ids, val_ids = {im["id"] for im in train["images"]}, {im["id"] for im in val["images"]}
    assert train_ids | val_ids == set(range(1, 21)) and not train_ids & val_ids
    assert (sorted(info.train_image_ids), sorted(info.val_image_ids)) == (sorted(train_ids), sorted(val_ids))
    for part, ids in ((train, train_ids), (val, val_ids)):
        assert {a["image_id"] for a in part["annotations"]} == ids and len(part["annotations"]) == 2 * len(ids)
        assert part["categories"] == CATEGORIES  # all categories in both, used or not
        assert part["info"] == {"year": 2024} and part["licenses"] == [{"id": 1}] and part["custom_key"] == {"kept": True}
    record = read(tmp_path / "out" / "split.json")
    stat = source.stat()
    assert record["source"] == str(source.absolute()) and record["size"] == stat.st_size
    assert record["mtime_ns"] == stat.st_mtime_ns and record["val_fraction"] == 0.25 and record["seed"] == 0
    assert set(record["val_image_ids"]) == val_ids and set(record["train_image_ids"]) == train_ids
    assert not info.reused
    assert format_split(info) == (f"Split all.json (20 images) into 15 train / 5 val images (data.val_fraction=0.25, "
                                  f"data.split_seed=0); written to {tmp_path / 'out'}")


@pytest.mark.parametrize(("fraction", "n", "expected"), [(0.1, 1000, 100), (0.1, 3, 1), (0.01, 10, 1), (0.9, 2, 1),
                                                         (0.99, 10, 9), (0.25, 10, 3), (0.5, 7, 4)])
def test_val_count_rounds_and_keeps_both_sides(fraction, n, expected):
    assert val_count(fraction, n) == expected


def test_thousands_separator_in_the_line(tmp_path):
    source = coco_file(tmp_path / "train.json", range(1000), anns_per_image=0)
    *_, info = split_annotations(source, 0.1, 0, tmp_path / "out")
    assert format_split(info).startswith("Split train.json (1,000 images) into 900 train / 100 val images "
                                         "(data.val_fraction=0.1, data.split_seed=0); written to ")


def test_same_seed_same_split_other_seed_another(tmp_path):
    ids = list(range(200))
    assert choose_val_ids(ids, 0.1, 0) == choose_val_ids(list(reversed(ids)), 0.1, 0)  # order of the file is irrelevant
    assert choose_val_ids(ids, 0.1, 0) != choose_val_ids(ids, 0.1, 1)
    source = coco_file(tmp_path / "all.json", ids, anns_per_image=0)
    *_, a = split_annotations(source, 0.1, 0, tmp_path / "a")
    *_, b = split_annotations(source, 0.1, 0, tmp_path / "b")
    *_, c = split_annotations(source, 0.1, 1, tmp_path / "c")
    assert a.val_image_ids == b.val_image_ids and set(a.val_image_ids) != set(c.val_image_ids)
    assert read(tmp_path / "a" / "val_split.json") == read(tmp_path / "b" / "val_split.json")


def test_adding_images_does_not_reshuffle_the_others():
    ids = list(range(100))
    before = choose_val_ids(ids, 0.2, 0)
    for added in range(100, 160):
        after = choose_val_ids([*ids, added], 0.2, 0)
        moved = {i for i in ids if (i in before) != (i in after)}
        assert len(moved) <= 1  # at most the image at the boundary changes side
    # Any number added: the old images in val stay the lowest-ranked old ones, so the old val set only
    # grows or shrinks at its boundary; no old image is swapped for another.
    for extra in (10, 50, 300):
        after = choose_val_ids([*ids, *range(1000, 1000 + extra)], 0.2, 0) & set(ids)
        assert after <= before or before <= after


def test_reused_while_source_fraction_and_seed_are_the_same(tmp_path):
    source = coco_file(tmp_path / "all.json", range(10))
    out = tmp_path / "out"
    *_, first = split_annotations(source, 0.2, 3, out)
    written = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    *_, again = split_annotations(source, 0.2, 3, out)
    assert again.reused and again.val_image_ids == first.val_image_ids
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == written  # nothing rewritten
    assert format_split(again).endswith(f"; re-used from {out}")

    for fraction, seed in ((0.3, 3), (0.2, 4)):  # another fraction or seed: written anew
        *_, info = split_annotations(source, fraction, seed, out)
        assert not info.reused and read(out / "split.json")["val_fraction"] == fraction
    coco_file(source, range(12))  # the source changes (size and mtime)
    *_, info = split_annotations(source, 0.3, 4, out)
    assert not info.reused and info.num_images == 12 and len(read(out / "train_split.json")["images"]) == 8


def test_rewritten_when_only_the_mtime_changes_or_a_file_is_gone(tmp_path):
    source = coco_file(tmp_path / "all.json", range(10))
    out = tmp_path / "out"
    split_annotations(source, 0.2, 0, out)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not split_annotations(source, 0.2, 0, out)[2].reused
    (out / "val_split.json").unlink()
    assert not split_annotations(source, 0.2, 0, out)[2].reused and (out / "val_split.json").is_file()


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    source = coco_file(tmp_path / "all.json", range(10))
    out = tmp_path / "out"
    split_annotations(source, 0.2, 0, out)
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "train_split.json", "val_split.json"]

    # A crash while writing (here: json.dumps fails on the second file) leaves no temp file and no record.
    import maskrcnn_coco.data.split as split_module

    calls = []
    real_dumps = json.dumps

    def failing_dumps(obj, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(split_module.json, "dumps", failing_dumps)
    with pytest.raises(OSError, match="disk full"):
        split_annotations(source, 0.3, 0, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["train_split.json", "val_split.json"]  # no split.json, no .tmp
    assert not split_annotations(source, 0.3, 0, out)[2].reused  # so the next run writes it all again


def test_orphan_annotations_stay_in_train_and_order_is_kept(tmp_path):
    source = coco_file(tmp_path / "all.json", range(10))
    data = read(source)
    data["annotations"].append({"id": 9999, "image_id": 12345, "category_id": 1, "bbox": [0, 0, 1, 1]})
    source.write_text(json.dumps(data))
    train_file, val_file, _ = split_annotations(source, 0.2, 0, tmp_path / "out")
    train, val = read(train_file), read(val_file)
    assert all(a["image_id"] != 12345 for a in val["annotations"])
    assert train["annotations"][-1]["id"] == 9999
    ids = [a["id"] for a in train["annotations"]]
    assert ids == sorted(ids)  # the source's order


@pytest.mark.parametrize(("content", "message"), [
    ({"images": [{"id": 1}], "annotations": [], "categories": []}, "lists 1 image(s); data.val_fraction needs at least 2"),
    ({"images": [], "annotations": [], "categories": []}, "lists 0 image(s)"),
    ({"annotations": []}, "is not a COCO annotation file (no 'images' list)"),
    ({"images": [{"id": 1}, {"id": 1}]}, "lists 1 image(s)"),  # distinct ids are what is split
    ({"images": [{"file_name": "x.png"}, {"id": 2}]}, "an entry of 'images' has no 'id'"),
])
def test_bad_files_are_one_line_data_errors(tmp_path, content, message):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps(content))
    with pytest.raises(DataError, match=re.escape(message)) as err:
        split_annotations(source, 0.5, 0, tmp_path / "out")
    assert str(source) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"Annotation file not found: {tmp_path / 'nope.json'}")):
        split_annotations(tmp_path / "nope.json", 0.1, 0, tmp_path / "out")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(f"Could not read COCO annotations {tmp_path / 'broken.json'}")):
        split_annotations(tmp_path / "broken.json", 0.1, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_image_added_to_the_file_leaves_the_others_where_they_were(tmp_path):
    source = coco_file(tmp_path / "all.json", range(100))
    *_, before = split_annotations(source, 0.2, 0, tmp_path / "out")
    # An id that lands in train (4 in 5 do): val keeps its 20 images, the same ones.
    added = next(i for i in range(1000, 2000) if i not in choose_val_ids([*range(100), i], 0.2, 0))
    coco_file(source, [*range(100), added])
    *_, after = split_annotations(source, 0.2, 0, tmp_path / "out")
    assert not after.reused and sorted(after.val_image_ids) == sorted(before.val_image_ids)
    assert sorted(after.train_image_ids) == sorted([*before.train_image_ids, added])


def test_records_sharing_an_id_stay_together(tmp_path):
    source = coco_file(tmp_path / "all.json", range(10))
    data = read(source)
    data["images"].append({"id": 3, "file_name": "3b.png", "width": 8, "height": 8})  # a merged export's repeat
    source.write_text(json.dumps(data))
    train_file, val_file, info = split_annotations(source, 0.5, 0, tmp_path / "out")
    side = read(val_file) if 3 in info.val_image_ids else read(train_file)
    assert sorted(im["file_name"] for im in side["images"] if im["id"] == 3) == ["3.png", "3b.png"]
    assert info.num_images == 10 and len(info.val_image_ids) == 5  # distinct ids
