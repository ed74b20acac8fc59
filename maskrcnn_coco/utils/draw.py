"""The project's one drawing module: instances (masks, boxes, class names, scores, ids) on images,
ground truth beside predictions, and contact sheets, as uint8 ``(3, H, W)`` tensors.

Drawn with torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes`` and ``make_grid``;
captions with PIL. Text that is not ASCII (a class name as written: ``自転車``) is drawn in an
installed font that has its glyphs; a character no installed font has is written as its escape
(``\\u81ea``; ``utils.fonts.pil_labels``). Used by the diagnosis contact sheets ("annotations to
check"), the tracker's prediction images and the predict/browse commands.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from maskrcnn_coco.utils.fonts import PIL_FONT_SIZE, pil_labels

# Colour-blind-friendly palette (Okabe-Ito, then Tableau), picked per class name.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
           "#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1", "#FF9DA7")


_LABEL_BACKGROUNDS = "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


def class_colour(name: str) -> str:
    """A stable colour for a class name (the same in every picture of a run)."""
    digest = hashlib.md5(str(name).encode("utf-8")).digest()
    return PALETTE[digest[0] % len(PALETTE)]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A ``(3, H, W)`` image as uint8: floats are taken as [0, 1]; grey (1 channel) is repeated."""
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].contiguous()


def draw_instances(
    image: torch.Tensor,
    boxes: torch.Tensor | None = None,
    names: Sequence[str] = (),
    masks: torch.Tensor | None = None,
    scores: Sequence[float] | torch.Tensor | None = None,
    ids: Sequence[object] | None = None,
    *,
    mask_alpha: float = 0.45,
    width: int = 2,
) -> torch.Tensor:
    """``image`` with each instance's mask (boolean or probabilities > 0.5), box and caption
    (``name``, then ``score`` and ``#id`` when given) in its class colour; uint8 ``(3, H, W)``."""
    out = to_uint8(image)
    n = len(names)
    if n == 0:
        return out
    colours = [class_colour(name) for name in names]
    if masks is not None and len(masks):
        m = masks.detach().cpu()
        if m.dim() == 4:  # (N, 1, H, W) mask probabilities of a model's output
            m = m[:, 0]
        m = m > 0.5 if m.dtype != torch.bool else m
        out = draw_segmentation_masks(out, m, alpha=mask_alpha, colors=colours)
    if boxes is not None and len(boxes):
        captions = []
        score_list = scores.tolist() if isinstance(scores, torch.Tensor) else list(scores or [])
        for i, name in enumerate(names):
            caption = str(name)
            if i < len(score_list):
                caption += f" {float(score_list[i]):.2f}"
            if ids is not None and i < len(ids):
                caption += f" #{ids[i]}"
            captions.append(caption)
        captions, font = pil_labels(captions)
        fonts = {"font": font, "font_size": PIL_FONT_SIZE} if font else {}  # None: PIL's default font, as before
        extra = ({"fill_labels": True, "label_colors": "black", "label_background_colors": colours}
                 if _LABEL_BACKGROUNDS else {})  # readable captions on busy images (torchvision >= 0.23)
        out = draw_bounding_boxes(out, boxes.detach().cpu().float(), labels=captions, colors=colours, width=width,
                                  **fonts, **extra)
    return out


def _caption(tile: torch.Tensor, text: str) -> torch.Tensor:
    """``tile`` with ``text`` on a dark band above it."""
    (text,), path = pil_labels([text])
    font = ImageFont.truetype(path, PIL_FONT_SIZE) if path else None
    pil = Image.fromarray(tile.permute(1, 2, 0).numpy())
    band = 12 * (text.count("\n") + 1) + 2
    canvas = Image.new("RGB", (pil.width, pil.height + band), (30, 30, 30))
    canvas.paste(pil, (0, band))
    ImageDraw.Draw(canvas).multiline_text((2, 1), text, fill=(255, 255, 255), font=font, spacing=1)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def side_by_side(left: torch.Tensor, right: torch.Tensor, titles: tuple[str, str] | None = None, gap: int = 4) -> torch.Tensor:
    """Two uint8 images next to each other (e.g. ground truth | predictions), each titled."""
    if titles:
        left, right = _caption(left, titles[0]), _caption(right, titles[1])
    h = max(left.shape[1], right.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, h - t.shape[1]), value=255)  # noqa: E731
    spacer = torch.full((3, h, gap), 255, dtype=torch.uint8)
    return torch.cat([pad(left), spacer, pad(right)], dim=2)


def contact_sheet(tiles: Sequence[torch.Tensor], captions: Sequence[str] | None = None, columns: int = 4,
                  tile_size: int | None = 256) -> torch.Tensor:
    """A grid of uint8 tiles (resized so the longer side is ``tile_size``; None keeps them), each under
    its caption; uint8 ``(3, H, W)``."""
    if not tiles:
        raise ValueError("contact_sheet needs at least one tile")
    prepared = []
    for i, tile in enumerate(tiles):
        tile = to_uint8(tile)
        if tile_size:
            scale = tile_size / max(tile.shape[1:])
            size = (max(1, round(tile.shape[1] * scale)), max(1, round(tile.shape[2] * scale)))
            pil = Image.fromarray(tile.permute(1, 2, 0).numpy()).resize(size[::-1], Image.BILINEAR)
            tile = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
        if captions is not None and i < len(captions):
            tile = _caption(tile, captions[i])
        prepared.append(tile)
    h = max(t.shape[1] for t in prepared)
    w = max(t.shape[2] for t in prepared)
    padded = [torch.nn.functional.pad(t, (0, w - t.shape[2], 0, h - t.shape[1]), value=255) for t in prepared]
    return make_grid(padded, nrow=max(1, min(columns, len(padded))), padding=4, pad_value=255)


def enlarged(image: torch.Tensor, boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
             min_side: int = 256) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``image`` (and its ``boxes``, ``masks``) enlarged by the integer factor that brings its longer side
    to at least ``min_side`` (nearest neighbour; factor 1, unchanged, for a large enough image or
    ``min_side=0``), so the captions stay legible on a small image."""
    scale = max(1, min_side // max(image.shape[-2:])) if min_side else 1
    if scale == 1:
        return image, boxes, masks
    image = image.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    if boxes is not None:
        boxes = boxes * scale
    if masks is not None:
        masks = masks.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return image, boxes, masks


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG (e.g. a matplotlib figure) as a uint8 ``(3, H, W)`` image (alpha dropped)."""
    with Image.open(path) as pil:
        return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 ``(3, H, W)`` image as PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(path)
    return path


def thumbnail(image: torch.Tensor, size: int = 256) -> torch.Tensor:
    """``image`` resized (bilinear) so that its longer side is ``size``, as ``contact_sheet`` resizes its
    tiles; uint8 ``(3, H, W)``. A caller building a sheet from many large pictures keeps these instead."""
    tile = to_uint8(image)
    scale = size / max(tile.shape[1:])
    height, width = max(1, round(tile.shape[1] * scale)), max(1, round(tile.shape[2] * scale))
    pil = Image.fromarray(tile.permute(1, 2, 0).numpy()).resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def colour_key(names: Sequence[str], width: int = 512) -> torch.Tensor:
    """A key of class colours: each name beside a swatch of its colour (``class_colour``, the colour
    ``draw_instances`` gives it), in rows that fit ``width`` pixels; uint8 ``(3, H, width)``."""
    names = list(dict.fromkeys(str(n) for n in names))
    texts, path = pil_labels(names)
    font = ImageFont.truetype(path, PIL_FONT_SIZE) if path else ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_height, swatch, x, y = 16, 12, 4, 2
    places = []
    for name, text in zip(names, texts):
        item = swatch + 4 + int(probe.textlength(text, font=font)) + 12
        if x > 4 and x + item > width:  # the next row
            x, y = 4, y + row_height
        places.append((x, y, name, text))
        x += item
    canvas = Image.new("RGB", (width, y + row_height + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for x, y, name, text in places:
        draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=class_colour(name), outline=(60, 60, 60))
        draw.text((x + swatch + 4, y + 1), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def stacked(top: torch.Tensor, bottom: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """Two uint8 images one above the other, left-aligned on white (e.g. a contact sheet and its
    ``colour_key``)."""
    top, bottom = to_uint8(top), to_uint8(bottom)
    width = max(top.shape[2], bottom.shape[2])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[2]), value=255)  # noqa: E731
    return torch.cat([pad(top), torch.full((3, gap, width), 255, dtype=torch.uint8), pad(bottom)], dim=1)
