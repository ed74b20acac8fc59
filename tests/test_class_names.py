"""Class names as written (``café``, ``自転車``): one ASCII key each in tags, metric names and files;
the names themselves in pictures (or a clean ASCII stand-in) and beside the keys in the run inspector."""

import json
import logging
import math
import re
import warnings

import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn_coco.analysis.inspect import format_run, load_run, text_width
from maskrcnn_coco.evaluation.coco_eval import coco_metrics
from maskrcnn_coco.evaluation.per_class import _axis_labels, class_metric_names, confusion_matrix, save_confusion
from maskrcnn_coco.tracking.scalars import (
    CLASSES_FILE,
    class_key,
    class_keys,
    class_names_by_key,
    epoch_scalars,
    read_class_names,
    write_class_names,
)
from maskrcnn_coco.utils import fonts
from maskrcnn_coco.utils.draw import contact_sheet, draw_instances
from maskrcnn_coco.utils.errors import UserError

from conftest import square_ann, write_coco_dataset

BICYCLE = "自転車"
SAFE = re.compile(r"^[0-9A-Za-z_.-]+$")
UNASSIGNED = "\u0378"  # no character: no font has a glyph for it


@pytest.fixture
def strict_warnings():
    """Every warning (matplotlib's "Glyph ... missing from font(s)" among them) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------- keys
def test_keys_of_names_as_written():
    assert class_key("café") == "cafe" and class_key("cafe\u0301") == "cafe"  # composed or not
    assert class_key(BICYCLE) == "u81ea_u8ee2_u8eca"
    assert class_key("hello 世界") == "hello_u4e16_u754c" and class_key("Straße") == "Strasse"
    assert class_key("ガ") != class_key("カ")  # a dakuten is no accent: it stays
    names = ["café", BICYCLE, "自行车", "Ωmega", "😀", "a/b c", "", UNASSIGNED]
    keys = class_keys(names)
    assert all(SAFE.match(k) for k in keys), keys
    assert len(set(keys)) == len(keys)


def test_keys_of_safe_names_are_unchanged():
    safe = ["circle", "square", "triangle", "traffic_light", "a-b.c", "A_1", "x__y"]
    assert class_keys(safe) == safe
    # What the sanitiser did before keys existed, still so.
    assert class_key("traffic light") == "traffic_light" and class_key("a/b c") == "a_b_c" and class_key("  ") == "unnamed"


def test_keys_that_collide_get_the_category_id_in_id_order():
    assert class_keys(["a b", "a_b"], [1, 2]) == ["a_b", "a_b_2"]
    assert class_keys(["a_b", "a b"], [2, 1]) == ["a_b_2", "a_b"]  # id order decides, not list order
    assert class_keys(["x", "x", "x"], [7, 3, 5]) == ["x_7", "x", "x_5"]
    assert class_keys(["a", "a", "a_2"], [1, 2, 3]) == ["a", "a_2", "a_2_3"]  # a suffix taken: suffixed again
    assert class_keys(["a", "a"]) == ["a", "a_2"]  # without ids: 1..N
    assert class_names_by_key(["café", "cafe"], [1, 2]) == {"cafe": "café", "cafe_2": "cafe"}


def unicode_coco(tmp_path):
    cats = [{"id": 1, "name": "café"}, {"id": 2, "name": BICYCLE}, {"id": 3, "name": "a b"},
            {"id": 4, "name": "a_b"}, {"id": 5, "name": BICYCLE}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)]
    anns = [square_ann(1, 1, 1, 4, 4, 20), square_ann(2, 1, 2, 30, 30, 20), square_ann(3, 2, 3, 4, 4, 20),
            square_ann(4, 2, 4, 30, 30, 20), square_ann(5, 2, 5, 4, 40, 16)]
    _, ann_file = write_coco_dataset(tmp_path, cats, images, anns, split="val")
    return COCO(str(ann_file))


def test_per_class_metric_names_and_tags_from_unicode_ground_truth(tmp_path):
    coco = unicode_coco(tmp_path)
    assert class_metric_names(coco) == {1: "AP_class_cafe", 2: "AP_class_u81ea_u8ee2_u8eca", 3: "AP_class_a_b",
                                        4: "AP_class_a_b_4", 5: "AP_class_u81ea_u8ee2_u8eca_5"}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in coco.anns.values()]
    metrics = coco_metrics(coco, results, [1, 2])
    for name in class_metric_names(coco).values():
        assert metrics["segm"][name] == pytest.approx(1.0)
    confusion = confusion_matrix(coco, results, [1, 2])
    assert confusion["ground_truth"][:5] == ["café", BICYCLE, "a b", "a_b", BICYCLE]  # names as written
    assert confusion["metric_names"] == list(class_metric_names(coco).values())
    tags = epoch_scalars({"metrics": {**metrics, "confusion": confusion}})
    assert "mAP/segm_AP_class_u81ea_u8ee2_u8eca" in tags and "mAP/bbox_AP_class_cafe" in tags
    assert all(t.isascii() and math.isfinite(v) for t, v in tags.items())


# --------------------------------------------------------------------------------------- fonts
def test_fonts_never_offer_a_placeholder_glyph():
    assert fonts.has_glyphs("abc café") and fonts.font_path_for("café") is not None
    assert not fonts.has_glyphs("x" + UNASSIGNED)  # matplotlib's "Last Resort" font is no answer
    assert fonts.plot_labels(["x" + UNASSIGNED, "$5 off$"], ["x_u0378", "5_off"]) == ["x_u0378", r"\$5 off\$"]


def test_the_confusion_matrix_shows_names_or_keys_without_glyph_warnings(tmp_path, strict_warnings, caplog):
    names = [BICYCLE, "café", "x" + UNASSIGNED]
    keys = class_keys(names)
    confusion = {"ground_truth": [*names, "background"], "predicted": [*names, "missed"],
                 "metric_names": [f"AP_class_{k}" for k in keys],
                 "matrix": [[2, 0, 0, 1], [0, 3, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]],
                 "params": {"iou_threshold": 0.5, "score_threshold": 0.5}}
    with caplog.at_level(logging.WARNING, logger="matplotlib"):
        json_path, png_path = save_confusion(confusion, tmp_path / "confusion", title="epoch 1")
    assert png_path.stat().st_size > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert json.loads(json_path.read_text(encoding="utf-8"))["ground_truth"][0] == BICYCLE
    predicted, ground_truth = _axis_labels(confusion)
    # As written where an installed font has the glyphs (a CJK font: not on every machine), else the key.
    assert ground_truth == [BICYCLE if fonts.has_glyphs(BICYCLE) else keys[0], "café", keys[2], "background"]
    assert predicted[-1] == "missed"


def test_a_matrix_without_metric_names_falls_back_to_keys_of_the_names(tmp_path, strict_warnings):
    confusion = {"ground_truth": ["x" + UNASSIGNED, "background"], "predicted": ["x" + UNASSIGNED, "missed"],
                 "matrix": [[1, 0], [0, 0]]}
    save_confusion(confusion, tmp_path / "old")
    assert _axis_labels(confusion)[1] == ["x_u0378", "background"]


def test_drawn_labels_of_unicode_names(strict_warnings):
    image = torch.zeros(3, 64, 96, dtype=torch.uint8)
    boxes = torch.tensor([[2.0, 2.0, 40.0, 40.0], [50.0, 10.0, 90.0, 60.0]])
    drawn = draw_instances(image, boxes, [BICYCLE, "café"], scores=[0.9, 0.8])
    ascii_drawn = draw_instances(image, boxes, ["bicycle", "cafe"], scores=[0.9, 0.8])
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape and not torch.equal(drawn, ascii_drawn)
    sheet = contact_sheet([drawn], [f"{BICYCLE} café"])
    assert sheet.dtype == torch.uint8

    texts, path = fonts.pil_labels([f"{BICYCLE} 0.90", "café 0.80"])
    assert path is not None
    if fonts.font_path_for(BICYCLE + "café") is not None:
        assert texts == [f"{BICYCLE} 0.90", "café 0.80"]
    else:  # no font has them all: what the chosen font lacks is written as escapes, never tofu
        assert texts[0].isascii() and "\\u81ea" in texts[0]
    assert fonts.pil_labels(["circle 0.90"]) == (["circle 0.90"], None)  # ASCII: PIL's default font, as before
    escaped, _ = fonts.pil_labels(["x" + UNASSIGNED])
    assert escaped == ["x\\u0378"]


# --------------------------------------------------------------------------------------- classes.json
def test_classes_json_round_trip(tmp_path):
    path = write_class_names(tmp_path / "run", [5, 1, 2], [BICYCLE, "café", "a b"])
    assert path == tmp_path / "run" / CLASSES_FILE
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert rows == [{"id": 1, "name": "café", "key": "cafe"}, {"id": 2, "name": "a b", "key": "a_b"},
                    {"id": 5, "name": BICYCLE, "key": "u81ea_u8ee2_u8eca"}]
    assert BICYCLE in path.read_text(encoding="utf-8")  # written as is, not \u-escaped
    assert read_class_names(tmp_path / "run") == {"cafe": "café", "a_b": "a b", "u81ea_u8ee2_u8eca": BICYCLE}
    assert read_class_names(tmp_path / "no_run") == {}
    path.write_text('{"not": "a list"}')
    with pytest.raises(UserError, match=CLASSES_FILE):
        read_class_names(tmp_path / "run")


def test_the_inspector_names_per_class_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [{"epoch": e, "loss/train_total": 1.0 / e, "mAP/segm_AP_class_u81ea_u8ee2_u8eca": 0.1 * e,
                "mAP/segm_AP_class_cafe": 0.2 * e, "mAP/segm_AP_class_circle": 0.3} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    write_class_names(run, [1, 2, 3], [BICYCLE, "café", "circle"])
    text = format_run(load_run(run), all_tags=True)
    lines = {line.split()[0]: line for line in text.splitlines() if "AP_class_" in line}
    assert f"({BICYCLE})" in lines["mAP/segm_AP_class_u81ea_u8ee2_u8eca"]
    assert "(café)" in lines["mAP/segm_AP_class_cafe"]
    assert "(" not in lines["mAP/segm_AP_class_circle"].split("0.3")[0]  # the key is the name: nothing added
    # The wide characters take two columns each: the value columns still line up.
    starts = {text_width(line[: line.index("0.")]) for line in lines.values()}
    assert len(starts) == 1, text
