"""The dataset browser (``scripts/browse_dataset.py``, ``cli/browse.py``): the ground truth drawn where the
training pipeline puts it, read back from the PNGs it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_exports import labelme
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms import v2

from maskrcnn_coco.cli import browse
from maskrcnn_coco.cli.browse import INDEX_KEY, TracedTransforms, main
from maskrcnn_coco.config import AugmentConfig
from maskrcnn_coco.data.coco import build_datasets, build_transforms
from maskrcnn_coco.data.samplers import SeededSamples
from maskrcnn_coco.utils.draw import class_colour

from conftest import REPO, tiny_data_cfg

SHAPES = ["data.num_train=8", "data.num_val=4", "data.image_size=64"]


def browse_main(out: Path, *args: str) -> int:
    return main(["--output", str(out), "--no-progress", *args])


def read(path: Path) -> torch.Tensor:
    """A PNG as int ``(3, H, W)``."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).int()


def untouched(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixels no box outline or caption can reach: 3 px or more from every box's edges, and outside the
    band of each box's caption (drawn inside its top-left corner, maybe wider than the box)."""
    free = torch.ones(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.round().int().tolist():
        top, left = max(0, y1 - 3), max(0, x1 - 3)
        for x in (x1, x2):
            free[top:y2 + 4, max(0, x - 3):x + 4] = False
        for y in (y1, y2):
            free[max(0, y - 3):y + 4, left:x2 + 4] = False
        free[top:y1 + 22, left:] = False
    return free


def blend(raw: torch.Tensor, colour: str, alpha: float = 0.45) -> torch.Tensor:
    """``draw_segmentation_masks``'s colour of a mask pixel over ``raw`` (int ``(3, N)``)."""
    rgb = torch.tensor([int(colour[i:i + 2], 16) for i in (1, 3, 5)]).view(3, 1)
    return (raw * (1 - alpha) + rgb * alpha).round().int()


@pytest.fixture
def shapes_train():
    """The CLI's shapes train split as training builds it, read without augmentation."""
    dataset = build_datasets(tiny_data_cfg(), splits=("train",), progress=False)["train"]
    view = dataset.with_transforms(build_transforms(False, AugmentConfig(), dataset.mapping))
    view.mapping = dataset.mapping
    return view


def test_writes_one_png_per_image_and_the_contact_sheet(tmp_path, capsys, shapes_train):
    assert browse_main(tmp_path, "--num-images", "3", *SHAPES) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted([*(f"train_{i}.png" for i in shapes_train.ids[:3]), "contact_sheet.png"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"train: 3 of 8 images, no augmentation -> {tmp_path}"
    assert lines[-1] == f"Wrote 3 images and the contact sheet to {tmp_path}"
    # 64 px images are enlarged 4x (--min-side 256) so the captions stay legible.
    assert read(tmp_path / f"train_{shapes_train.ids[0]}.png").shape == (3, 256, 256)
    assert read(tmp_path / "contact_sheet.png").shape[1] > 256


def x4(t: torch.Tensor) -> torch.Tensor:
    """What ``--min-side 256`` does to a 64 px image: 4x, nearest neighbour."""
    return t.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)


def test_masks_are_coloured_where_the_target_mask_is_and_nowhere_far_from_the_objects(tmp_path, shapes_train):
    assert browse_main(tmp_path, "--num-images", "4", *SHAPES) == 0
    names = shapes_train.mapping.names
    coloured = kept = 0
    for index in range(4):
        _, target = shapes_train[index]
        image_id = target["image_id"]
        info = shapes_train.coco.imgs[image_id]
        raw = x4(read(Path(shapes_train.root) / info["file_name"]))
        png = read(tmp_path / f"train_{image_id}.png")
        assert png.shape == raw.shape == (3, 256, 256)
        free = untouched(target["boxes"] * 4, 256, 256)
        masks = x4(target["masks"].bool())
        for mask, label in zip(masks, target["labels"].tolist()):
            inside = mask & free
            coloured += int(inside.sum())
            expected = blend(raw[:, inside], class_colour(names[label - 1]))
            assert ((png[:, inside] - expected).abs() <= 1).all()
        far = free & ~masks.any(0)
        kept += int(far.sum())
        assert torch.equal(png[:, far], raw[:, far])
    assert coloured > 1000 and kept > 1000


def test_ids_pick_those_images_and_an_unknown_id_is_one_error_line(tmp_path, capsys, shapes_train):
    wanted = [shapes_train.ids[5], shapes_train.ids[2]]
    assert browse_main(tmp_path / "a", "--ids", f"{wanted[0]},{wanted[1]}", *SHAPES) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(["contact_sheet.png", *(f"train_{i}.png" for i in wanted)])
    capsys.readouterr()

    assert browse_main(tmp_path / "b", "--ids", f"{wanted[0]},999", *SHAPES) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: image id 999 is not in the train split's annotation file ")
    assert err.rstrip().endswith("instances_train.json")
    assert not (tmp_path / "b").exists()

    assert browse_main(tmp_path / "c", "--ids", "12,x", *SHAPES) == 2
    assert capsys.readouterr().err.startswith("Error: --ids: 'x' is not an image id")


def test_random_sample_is_seeded(tmp_path, shapes_train):
    for name in ("a", "b"):
        assert browse_main(tmp_path / name, "--random", "--seed", "3", "--num-images", "3", *SHAPES) == 0
    a, b = (sorted(p.name for p in (tmp_path / n).iterdir()) for n in ("a", "b"))
    assert a == b and len(a) == 4


def test_augmented_with_hflip_is_the_mirrored_picture(tmp_path, shapes_train):
    flip = ["--augmented", "data.augment.hflip_prob=1"]
    assert browse_main(tmp_path / "plain", "--num-images", "2", *SHAPES) == 0
    assert browse_main(tmp_path / "aug", "--num-images", "2", *flip, *SHAPES) == 0
    compared = with_mask = 0
    for index in range(2):
        _, target = shapes_train[index]
        image_id = target["image_id"]
        plain, aug = read(tmp_path / "plain" / f"train_{image_id}.png"), read(tmp_path / "aug" / f"train_{image_id}.png")
        boxes = target["boxes"] * 4
        flipped_boxes = torch.stack([256 - boxes[:, 2], boxes[:, 1], 256 - boxes[:, 0], boxes[:, 3]], dim=1)
        # Away from outlines and captions (not mirror images of each other), every pixel is the mirrored
        # one, mask colour included: the masks moved with their objects.
        same = untouched(flipped_boxes, 256, 256) & untouched(boxes, 256, 256).flip(-1)
        assert torch.equal(aug[:, same], plain.flip(-1)[:, same])
        assert not torch.equal(aug, plain)
        compared += int(same.sum())
        with_mask += int((same & x4(target["masks"].bool()).any(0).flip(-1)).sum())
    assert compared > 1000 and with_mask > 1000


def test_traced_pipeline_equals_the_training_one_and_names_the_annotations_it_keeps(shapes_train):
    """Scale jitter pushes objects out of the image: the sanitising step drops them, and the traced
    indices say exactly which annotations the remaining instances are."""
    augment = AugmentConfig(hflip_prob=0.5, scale_range=[1.5, 3.0])
    pipeline = build_transforms(True, augment, shapes_train.mapping)
    training = SeededSamples(shapes_train.with_transforms(pipeline))
    traced = SeededSamples(shapes_train.with_transforms(TracedTransforms(pipeline)))
    # The pipeline without its sanitising step (and tv_tensor stripping): every instance, transformed.
    unsanitised = v2.Compose([s for s in pipeline.transforms if not isinstance(s, v2.SanitizeBoundingBoxes)][:-1])
    raw = shapes_train.with_transforms(None)
    dropped = 0
    for index in range(len(shapes_train)):
        for seed in range(2):
            image, target = training[(index, seed)]
            t_image, t_target = traced[(index, seed)]
            assert torch.equal(image, t_image)
            for key in ("boxes", "masks", "labels"):
                assert torch.equal(target[key], t_target[key]), key
            torch.manual_seed(seed)
            _, every = unsanitised(*raw[index])
            kept = t_target[INDEX_KEY]
            assert torch.equal(every["boxes"][kept], t_target["boxes"])
            assert torch.equal(every["masks"][kept], t_target["masks"])
            usable = browse.usable_annotations(shapes_train, target["image_id"])
            assert len(every["boxes"]) == len(usable)
            dropped += len(usable) - len(kept)
    assert dropped > 0


def test_model_input_is_the_size_the_model_resizes_to(tmp_path, shapes_train):
    sizes = ["model.min_size=100", "model.max_size=120"]
    assert browse_main(tmp_path, "--num-images", "1", "--model-input", "--min-side", "0", *sizes, *SHAPES) == 0
    transform = GeneralizedRCNNTransform(100, 120, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    image, _ = shapes_train[0]
    resized, _ = transform.resize(image, None)
    assert tuple(resized.shape) == (3, 100, 100)
    assert read(tmp_path / f"train_{shapes_train.ids[0]}.png").shape == resized.shape


def export_with_box_only(root: Path) -> list[str]:
    """labelme's export (64x48 images, 2 objects each) with annotation 3 box-only and an extra image
    without annotations (dropped from training)."""
    images, annotations = labelme(root)
    data = json.loads(annotations.read_text())
    data["annotations"][3]["segmentation"] = []
    data["images"].append({**data["images"][0], "id": 7, "file_name": "JPEGImages/0.jpg"})
    annotations.write_text(json.dumps(data))
    return ["data=coco", f"data.root={root}", f"data.train_images={images}", f"data.val_images={images}",
            f"data.train_annotations={annotations}", f"data.val_annotations={annotations}", "data.augment.hflip_prob=0"]


def test_coco_export_box_only_object_is_drawn_with_its_box_and_marked(tmp_path, monkeypatch, capsys):
    overrides = export_with_box_only(tmp_path / "export")
    calls = []
    real = browse.draw_instances

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(browse, "draw_instances", recording)
    out = tmp_path / "out"
    assert browse_main(out, "--ids", "1", "--min-side", "0", "--model-input", "model.min_size=192", "model.max_size=400", *overrides) == 0
    (args, kwargs), = calls
    image, _, names, masks = args
    assert names == ["square", "circle"] and kwargs["ids"] == ["2", "3 (box only)"]  # the placeholder category left out
    assert tuple(image.shape) == (3, 192, 256)  # 48x64 resized as the model resizes: x4
    assert masks[0].any() and not masks[1].any()
    # The box-only object (a bright 10 px square at 40,6: 160,24 to 200,64 at x4) keeps its pixels: no mask.
    png = read(out / "train_1.png")
    assert png.shape == (3, 192, 256)
    inside = torch.zeros(192, 256, dtype=torch.bool)
    inside[24 + 22:64 - 3, 160 + 3:200 - 3] = True  # below its caption, inside its outline
    assert (png[:, inside] > 200).all()
    capsys.readouterr()

    assert browse_main(tmp_path / "o2", "--ids", "7", *overrides) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: image id 7 is in ") and "the train split does not use it" in err


def test_sheet_caption_counts_box_only_objects():
    anns = [{"id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]}, {"id": 2, "segmentation": []}]
    assert browse.sheet_caption("val", 12, anns) == "val 12: 2 objects, 1 box only"
    assert browse.sheet_caption("train", 3, anns[:1]) == "train 3: 1 object"


@pytest.mark.slow
def test_script_help_and_a_real_call(tmp_path):
    script = str(REPO / "scripts" / "browse_dataset.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: browse_dataset.py")
    assert "--augmented" in proc.stdout and "--model-input" in proc.stdout
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, script, "--output", str(out), "--num-images", "2", "--augmented", "--no-progress", *SHAPES],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith(f"Wrote 2 images and the contact sheet to {out}")
    assert len(list(out.glob("train_*.png"))) == 2 and (out / "contact_sheet.png").is_file()
