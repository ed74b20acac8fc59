"""``data/exif.py``: images loaded in their displayed (EXIF-applied) frame, the raw frame when the
annotation file has only the raw size, and size mismatches that name the orientation."""

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from maskrcnn_coco.data.exif import (
    EXIF_SIZE_MISMATCH,
    ORIENTATION_NAMES,
    Frame,
    decode_problem,
    displayed_size,
    exif_orientation,
    frame_for,
    load_oriented,
    plan_frames,
)
from maskrcnn_coco.data.validate import MISSING_FILE, SIZE_MISMATCH, UNDECODABLE

W, H = 64, 40  # stored (raw) size: not square, so 90-degree cases swap it
RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)


def quadrants(width: int = W, height: int = H, mode: str = "RGB") -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, yellow bottom-right: every flip and turn differs."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = RED
    a[: height // 2, width // 2 :] = GREEN
    a[height // 2 :, : width // 2] = BLUE
    a[height // 2 :, width // 2 :] = YELLOW
    return Image.fromarray(a).convert(mode)


def write(path, orientation: int | None = None, image: Image.Image | None = None, **kwargs):
    image = image or quadrants()
    if orientation is not None:
        exif = Image.Exif()
        exif[274] = orientation
        kwargs["exif"] = exif.tobytes()
    if path.suffix == ".jpg":
        kwargs["quality"] = 95
    image.save(path, **kwargs)
    return path


def corner_colours(image: Image.Image) -> list[tuple[int, ...]]:
    """Mean colour of each quadrant (TL, TR, BL, BR), rounded to tens: JPEG-tolerant."""
    a = np.asarray(image.convert("RGB"), np.float64)
    h, w = a.shape[:2]
    parts = [a[: h // 2, : w // 2], a[: h // 2, w // 2 :], a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :]]
    return [tuple(round(v / 10) * 10 for v in p.reshape(-1, 3).mean(0)) for p in parts]


def near(colours, expected) -> bool:
    return all(max(abs(c - e) for c, e in zip(got, want)) <= 20 for got, want in zip(colours, expected))


@pytest.mark.parametrize("k", range(1, 9))
def test_every_orientation_loads_as_exif_transpose_shows_it(tmp_path, k):
    path = write(tmp_path / f"o{k}.jpg", k)
    assert exif_orientation(path) == k
    shown = displayed_size(W, H, k)
    assert shown == ((H, W) if k >= 5 else (W, H))
    frame = frame_for(path, *shown, "apply")
    assert frame == Frame(k, k != 1, False, None)
    loaded = load_oriented(path, frame)
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert loaded.mode == "RGB" and loaded.size == shown == expected.size
    # The same decoder and a lossless transpose: identical pixels, not merely close ones.
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    assert decode_problem(path, *shown, "apply") is None


def test_names_say_which_way_the_display_turns(tmp_path):
    # 6: the stored top row becomes the displayed right column (turned clockwise); 8 the other way.
    clockwise = load_oriented(write(tmp_path / "6.jpg", 6), frame_for(tmp_path / "6.jpg", H, W))
    assert near(corner_colours(clockwise), [BLUE, RED, YELLOW, GREEN]) and ORIENTATION_NAMES[6] == "rotated 90° clockwise"
    counter = load_oriented(write(tmp_path / "8.jpg", 8), frame_for(tmp_path / "8.jpg", H, W))
    assert near(corner_colours(counter), [GREEN, YELLOW, RED, BLUE]) and "counter-clockwise" in ORIENTATION_NAMES[8]
    mirrored = load_oriented(write(tmp_path / "2.jpg", 2), frame_for(tmp_path / "2.jpg", W, H))
    assert near(corner_colours(mirrored), [GREEN, RED, YELLOW, BLUE]) and ORIENTATION_NAMES[2] == "mirrored left-right"


@pytest.mark.parametrize("k", [5, 6, 7, 8])
def test_annotated_in_the_raw_frame_loads_raw(tmp_path, k):
    path = write(tmp_path / f"o{k}.jpg", k)
    frame = frame_for(path, W, H, "apply")
    assert frame == Frame(k, False, True, None)
    loaded = load_oriented(path, frame)
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(loaded), np.asarray(raw.convert("RGB")))
    assert decode_problem(path, W, H, "apply") is None


@pytest.mark.parametrize("k", range(2, 9))
def test_a_size_matching_neither_frame_names_the_orientation(tmp_path, k):
    path = write(tmp_path / f"o{k}.jpg", k)
    frame = frame_for(path, 30, 20, "apply")
    assert frame.problem and not frame.raw_only
    assert f"EXIF orientation {k}, {ORIENTATION_NAMES[k]}" in frame.problem
    assert frame.problem.startswith(f"is {W}x{H} pixels (") and frame.problem.endswith("but the annotation file says 30x20")
    assert ("displayed 40x64" in frame.problem) == (k >= 5)
    assert decode_problem(path, 30, 20) == (EXIF_SIZE_MISMATCH, frame.problem)


def test_orientation_1_mismatch_reads_as_validate_does(tmp_path):
    path = write(tmp_path / "plain.jpg")
    problem = frame_for(path, 30, 20).problem
    assert problem == f"is {W}x{H} pixels but the annotation file says 30x20"
    assert "EXIF" not in problem
    assert decode_problem(path, 30, 20) == (SIZE_MISMATCH, problem)


def test_square_images_turned_90_are_displayed(tmp_path):
    path = write(tmp_path / "sq.jpg", 6, quadrants(48, 48))
    frame = frame_for(path, 48, 48)
    assert frame == Frame(6, True, False, None)  # raw and displayed sizes both match: displayed wins
    assert near(corner_colours(load_oriented(path, frame)), [BLUE, RED, YELLOW, GREEN])


def test_ignore_always_loads_raw(tmp_path):
    path = write(tmp_path / "o6.jpg", 6)
    frame = frame_for(path, W, H, "ignore")
    assert frame == Frame(6, False, False, None)
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(load_oriented(path, frame)), np.asarray(raw.convert("RGB")))
    # The displayed size under ignore: the message says which policy would load it.
    problem = frame_for(path, H, W, "ignore").problem
    assert "EXIF orientation 6, rotated 90° clockwise" in problem and "data.exif=apply" in problem
    assert decode_problem(path, H, W, "ignore") == (EXIF_SIZE_MISMATCH, problem)
    # A size no frame has: no suggestion that the other policy would help.
    other = frame_for(path, 30, 20, "ignore").problem
    assert "EXIF orientation 6" in other and "data.exif" not in other
    with pytest.raises(ValueError, match="EXIF policy"):
        frame_for(path, W, H, "auto")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL warns, then we read 1
def test_absent_corrupt_or_odd_orientations_read_as_1(tmp_path):
    assert exif_orientation(write(tmp_path / "none.jpg")) == 1
    for value in (0, 9, 300):
        assert exif_orientation(write(tmp_path / f"v{value}.jpg", value)) == 1
    # An APP1 block that says Exif but holds garbage, and one whose IFD offset points nowhere.
    assert exif_orientation(write(tmp_path / "junk.jpg", exif=b"Exif\x00\x00" + b"\xff\x13garbage" * 4)) == 1
    assert exif_orientation(write(tmp_path / "offset.jpg", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")) == 1
    frame = frame_for(tmp_path / "junk.jpg", W, H)
    assert frame == Frame() and load_oriented(tmp_path / "junk.jpg", frame).size == (W, H)
    with pytest.raises(FileNotFoundError):
        exif_orientation(tmp_path / "absent.jpg")


def test_png_and_other_modes(tmp_path):
    plain = write(tmp_path / "plain.png")
    assert exif_orientation(plain) == 1 and frame_for(plain, W, H) == Frame()
    # A PNG with an eXIf chunk (Pillow writes it before the pixels), in RGBA: converted, then turned.
    rgba = write(tmp_path / "rgba.png", 6, quadrants(mode="RGBA"))
    assert exif_orientation(rgba) == 6
    loaded = load_oriented(rgba, frame_for(rgba, H, W))
    assert loaded.mode == "RGB" and corner_colours(loaded) == corner_colours(quadrants().transpose(Image.Transpose.ROTATE_270))
    # A greyscale JPEG: load_rgb's conversion composes with the turn.
    grey = write(tmp_path / "grey.jpg", 8, quadrants(mode="L"))
    loaded = load_oriented(grey, frame_for(grey, H, W))
    with Image.open(grey) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(expected))


def test_headers_only_no_pixels_decoded(tmp_path, monkeypatch):
    files = [write(tmp_path / "a.jpg", 6), write(tmp_path / "b.png", 3), write(tmp_path / "c.png")]

    def refuse(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    assert [exif_orientation(p) for p in files] == [6, 3, 1]
    records = [{"id": i, "file_name": p.name, "width": W, "height": H} for i, p in enumerate(files)]
    assert plan_frames(tmp_path, records).read == 3


def test_plan_frames_over_a_mixed_folder(tmp_path):
    specs = [  # (id, file, orientation, annotated size)
        (1, "shown6.jpg", 6, (H, W)),
        (2, "shown3.jpg", 3, (W, H)),
        (3, "mirror2.jpg", 2, (W, H)),
        (4, "raw6.jpg", 6, (W, H)),
        (5, "raw8.jpg", 8, (W, H)),
        (6, "wrong8.jpg", 8, (30, 20)),
        (7, "plain.png", None, (W, H)),
        (8, "plainwrong.jpg", None, (30, 20)),
    ]
    records = []
    for image_id, name, k, (w, h) in specs:
        write(tmp_path / name, k)
        records.append({"id": image_id, "file_name": name, "width": w, "height": h})
    records += [
        {"id": 9, "file_name": "absent.jpg", "width": W, "height": H},  # missing: reported elsewhere
        {"id": 10, "file_name": "shown6.jpg", "width": None, "height": H},  # bad record: reported elsewhere
    ]
    (tmp_path / "notimage.jpg").write_bytes(b"not an image")
    records.append({"id": 11, "file_name": "notimage.jpg", "width": W, "height": H})

    plan = plan_frames(tmp_path, records, "apply", workers=2)
    assert plan.read == 8 and plan.rotated == 6
    assert set(plan.frames) == {1, 2, 3, 4, 5, 6} and plan.frame(7) is None
    assert plan.frames[1].apply and plan.frames[2].apply and plan.frames[3].apply
    assert [r["image_id"] for r in plan.raw_only] == [4, 5]
    assert plan.raw_only[0] == {"image_id": 4, "file": "raw6.jpg", "orientation": 6}
    assert [(p["image_id"], p["kind"]) for p in plan.problems] == [(6, EXIF_SIZE_MISMATCH), (8, SIZE_MISMATCH)]
    assert plan.problems[0]["file"] == "wrong8.jpg" and "EXIF orientation 8" in plan.problems[0]["problem"]
    assert plan.summary_lines("train.json") == [
        "3 images in train.json carry an EXIF rotation: loaded as displayed "
        "(as annotation tools show them; data.exif=ignore loads raw pixels)",
        "2 images in train.json are annotated in their raw frame (the JSON's size is the raw pixels') though their "
        "EXIF says rotated: loaded without rotation, e.g. image 4 (raw6.jpg, orientation 6), image 5 (raw8.jpg, orientation 8)",
    ]
    # Loading by the plan: displayed, raw, and as stored.
    assert load_oriented(tmp_path / "shown6.jpg", plan.frame(1)).size == (H, W)
    assert load_oriented(tmp_path / "raw6.jpg", plan.frame(4)).size == (W, H)
    assert load_oriented(tmp_path / "plain.png", plan.frame(7)).size == (W, H)

    one = plan_frames(tmp_path, [records[0], records[3]], "apply", workers=1)
    assert one.summary_lines("val.json") == [
        "1 image in val.json carries an EXIF rotation: loaded as displayed (as annotation tools show them; data.exif=ignore loads raw pixels)",
        "1 image in val.json is annotated in its raw frame (the JSON's size is the raw pixels') though its EXIF says rotated: "
        "loaded without rotation, e.g. image 4 (raw6.jpg, orientation 6)",
    ]

    ignored = plan_frames(tmp_path, records, "ignore", workers=2)
    assert ignored.rotated == 6 and not ignored.raw_only and not any(f.apply for f in ignored.frames.values())
    assert {p["image_id"] for p in ignored.problems} == {1, 6, 8}  # shown6 is annotated as displayed
    assert ignored.summary_lines("train.json") == [
        "6 images in train.json carry an EXIF rotation: loaded as stored "
        "(data.exif=ignore; data.exif=apply loads them as displayed, as annotation tools show them)"
    ]
    assert plan_frames(tmp_path, records[6:8]).summary_lines("x.json") == []


def test_decode_problem_names_missing_and_undecodable_files(tmp_path):
    assert decode_problem(tmp_path / "absent.jpg", W, H) == (MISSING_FILE, "file not found")
    path = write(tmp_path / "cut.jpg", 6)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    kind, problem = decode_problem(path, H, W)
    assert kind == UNDECODABLE and problem.startswith("cannot be decoded (")
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    assert decode_problem(tmp_path / "junk.jpg", W, H)[0] == UNDECODABLE
