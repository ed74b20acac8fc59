"""Installed fonts that can show a text as written (class names in any script), for matplotlib and PIL.

Class names come as written (``café``, ``自転車``); a font without their glyphs draws empty boxes
and matplotlib warns "Glyph ... missing from font(s)". So a picture shows a name as written when an
installed font has its glyphs, else an ASCII stand-in that every font draws:

* matplotlib (which falls back from font to font per glyph, ``font.family`` as a list): ``plot_labels``
  gives each label to draw, the name or else its key (``tracking.scalars.class_keys``, which the
  caller passes), and ``plot_fonts(labels)`` the ``rc_context`` whose ``font.family`` adds the
  installed fonts those labels need after the configured ones;
* PIL / torchvision's ``draw_bounding_boxes`` (one font file per call, no fallback): ``pil_labels``
  gives the texts to draw and the one TrueType file that has all their glyphs (None: all ASCII, PIL's
  default font draws them, as before); where no font has them all, the characters the best font
  lacks are written as escapes (``自`` -> ``\\u81ea``, which reads as the key's ``u81ea``): the drawing
  code is on the bottom floor (``utils``), which cannot ask ``tracking`` for the key.

The fonts are those matplotlib's ``font_manager`` knows (the system's and its own DejaVu and STIX),
matplotlib's default font first, then common wide-coverage families (Noto CJK, WenQuanYi, Droid Sans
Fallback, ...), then the rest by name. Fonts whose code points do not mean their characters (TeX's
``cm*``, STIX's non-Unicode and size variants) and matplotlib's "Last Resort" (a box per Unicode
block: tofu by another name) are never used. A font's character map is read once per process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

# Families tried right after the default font, in this order (the usual CJK and fallback fonts on Linux).
PREFERRED_FAMILIES = (
    "DejaVu Sans", "Noto Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
    "Noto Sans CJK HK", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback",
    "IPAexGothic", "IPAGothic", "TakaoGothic", "Unifont",
)
# Families whose glyphs are not the characters their code points name, or a placeholder for every one.
_UNUSABLE = re.compile(r"^(cm[a-z]+\d+|STIXNonUnicode|STIXSize\w+|Last Resort.*)$")
# Pillow's default font (a FreeType font since Pillow 10.1) is 10 pixels: a chosen font is drawn the same.
PIL_FONT_SIZE = 10


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    """The code points ``path`` has glyphs for (empty for a file FreeType cannot read)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@functools.cache
def _fonts() -> tuple[tuple[str, str], ...]:
    """``(family, file)`` of every usable installed font, in search order (module docstring)."""
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties())
    rank = {family: i for i, family in enumerate(PREFERRED_FAMILIES)}
    entries = sorted(
        (e for e in font_manager.fontManager.ttflist if not _UNUSABLE.match(e.name)),
        key=lambda e: (e.fname != default, rank.get(e.name, len(rank)),
                       e.style != "normal" or e.weight not in (400, "normal", "regular"), e.name, e.fname),
    )
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.fname not in seen:
            seen.add(e.fname)
            out.append((e.name, e.fname))
    return tuple(out)


def _needed(text: str) -> set[int]:
    return {ord(ch) for ch in text if ch != "\n"}  # matplotlib and PIL break lines at "\n", drawing no glyph


@functools.cache
def _font_with(code: int) -> tuple[str, str] | None:
    """The first font (search order) with a glyph for ``code``."""
    return next((font for font in _fonts() if code in _charmap(font[1])), None)


def font_path_for(text: str) -> str | None:
    """The file of the first installed font (search order) with a glyph for every character of ``text``;
    None when no single font has them all."""
    needed = _needed(text)
    return next((path for _, path in _fonts() if needed <= _charmap(path)), None)


def has_glyphs(text: str) -> bool:
    """Whether the installed fonts, together, have a glyph for every character of ``text`` (what
    matplotlib's per-glyph fallback can draw)."""
    return all(_font_with(code) is not None for code in _needed(text))


def _escaped(text: str) -> str:
    # A pair of "$" would start matplotlib's mathtext: a name is drawn literally.
    return text.replace("$", r"\$")


def plot_labels(names: Sequence[Any], keys: Sequence[str]) -> list[str]:
    """The labels matplotlib should draw for ``names``: each name as written where the installed fonts
    have its glyphs, else its ASCII key (``keys``: ``tracking.scalars.class_keys``); ``$`` escaped."""
    return [_escaped(str(n) if has_glyphs(str(n)) else k) for n, k in zip(names, keys, strict=True)]


def fallback_families(texts: Iterable[str]) -> list[str]:
    """The families, beyond matplotlib's configured ``font.family``, that ``texts`` need for their
    glyphs (in search order; a glyph no font has adds nothing)."""
    from matplotlib import font_manager, rcParams

    configured = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
    missing = set().union(*map(_needed, texts)) - _charmap(configured)
    families: list[str] = []
    for code in sorted(missing):
        font = _font_with(code)
        if font is not None and font[0] not in families:
            families.append(font[0])
    return families


@contextlib.contextmanager
def plot_fonts(texts: Iterable[str]) -> Iterator[None]:
    """A matplotlib ``rc_context`` whose ``font.family`` is the configured one followed by the
    families ``texts`` need (``fallback_families``); make the figure's texts inside it, since a text
    takes its font when it is made."""
    import matplotlib

    extra = fallback_families(list(texts))
    family = list(matplotlib.rcParams["font.family"])
    quiet = _OtherWeight(extra)
    logger = logging.getLogger("matplotlib.font_manager")
    logger.addFilter(quiet)
    try:
        with matplotlib.rc_context({"font.family": [*family, *(f for f in extra if f not in family)]}):
            yield
    finally:
        logger.removeFilter(quiet)


class _OtherWeight(logging.Filter):
    """Drops matplotlib's warning that a fallback family lacks the text's weight: many CJK families
    come in one weight (WenQuanYi Zen Hei: medium), which is the one to use."""

    def __init__(self, families: Sequence[str]):
        super().__init__()
        self.families = set(families)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("findfont: Failed to find font weight")
                    and len(args) > 1 and args[1] in self.families)


def _escaped_missing(text: str, chars: frozenset[int]) -> str:
    return "".join(ch if ch == "\n" or ord(ch) in chars else ch.encode("ascii", "backslashreplace").decode("ascii")
                   for ch in text)


def pil_labels(texts: Sequence[str]) -> tuple[list[str], str | None]:
    """``texts`` as one PIL font draws them, and that font's file: None when all are ASCII (PIL's default
    font, as before); else the first font (search order) with every glyph of all of them; else the font
    with the most of their glyphs, each character it lacks written as its escape (``\\u81ea``)."""
    texts = [str(t) for t in texts]
    if all(t.isascii() for t in texts):
        return texts, None
    needed = set().union(*map(_needed, texts))
    path = font_path_for("".join(texts))
    if path is None:
        # max() keeps the first of equals: the search order decides ties.
        path = max((p for _, p in _fonts()), key=lambda p: len(needed & _charmap(p)))
    return [_escaped_missing(t, _charmap(path)) for t in texts], path
