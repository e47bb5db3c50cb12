"""Images for records: user-supplied files, and FigStep-style typographic renderings.

A typographic image holds the request text followed by an empty numbered list "1." "2." "3.", black
on white. Each character is drawn with a font that covers it (Noto per script, Latin for digits and
punctuation a script font lacks), shaped by libraqm (Arabic joining, Thai and Bengali marks) and laid
out right-to-left for Arabic and Hebrew. Fonts come from Debian fonts-noto-core and fonts-noto-cjk;
$SHIELD_DS_FONT_DIRS (os.pathsep-separated) replaces the default font directories.
"""

from __future__ import annotations

import functools
import os
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from shield_ds.data.records import SafetyRecord
from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError

log = get_logger("data")

DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")

# (first, last, script) for the scripts that need their own font; anything else is "common"
# (spaces, digits, punctuation) or Latin/Greek/Cyrillic, which the base font covers.
SCRIPT_RANGES = [
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0530, 0x058F, "armenian"),
    (0x0590, 0x05FF, "hebrew"), (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"),
    (0x08A0, 0x08FF, "arabic"), (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bengali"),
    (0x0A00, 0x0A7F, "gurmukhi"), (0x0A80, 0x0AFF, "gujarati"), (0x0B00, 0x0B7F, "oriya"),
    (0x0B80, 0x0BFF, "tamil"), (0x0C00, 0x0C7F, "telugu"), (0x0C80, 0x0CFF, "kannada"),
    (0x0D00, 0x0D7F, "malayalam"), (0x0D80, 0x0DFF, "sinhala"), (0x0E00, 0x0E7F, "thai"),
    (0x0E80, 0x0EFF, "lao"), (0x0F00, 0x0FFF, "tibetan"), (0x1000, 0x109F, "myanmar"),
    (0x10A0, 0x10FF, "georgian"), (0x1100, 0x11FF, "hangul"), (0x1200, 0x139F, "ethiopic"),
    (0x1780, 0x17FF, "khmer"), (0x2E80, 0x2FFF, "cjk"), (0x3000, 0x30FF, "cjk"),
    (0x3130, 0x318F, "hangul"), (0x3400, 0x4DBF, "cjk"), (0x4E00, 0x9FFF, "cjk"),
    (0xA960, 0xA97F, "hangul"), (0xA980, 0xA9DF, "javanese"), (0xAC00, 0xD7AF, "hangul"),
    (0xF900, 0xFAFF, "cjk"), (0xFB1D, 0xFB4F, "hebrew"), (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"), (0xFF00, 0xFFEF, "cjk"), (0x20000, 0x2FA1F, "cjk"),
]
RTL_SCRIPTS = {"arabic", "hebrew"}
# Scripts written without spaces between words: lines may break between any two characters.
UNSPACED_SCRIPTS = {"cjk", "thai", "lao", "khmer", "myanmar", "tibetan", "javanese"}
# Font files tried in order; a CJK collection holds one face per region (picked by language).
FONT_FILES = {
    "latin": ["NotoSans-Regular.ttf", "DejaVuSans.ttf", "LiberationSans-Regular.ttf"],
    "greek": ["NotoSans-Regular.ttf", "DejaVuSans.ttf"],
    "cyrillic": ["NotoSans-Regular.ttf", "DejaVuSans.ttf"],
    "arabic": ["NotoSansArabic-Regular.ttf", "NotoNaskhArabic-Regular.ttf", "NotoSansArabicUI-Regular.ttf"],
    "thai": ["NotoSansThai-Regular.ttf", "NotoSansThaiUI-Regular.ttf", "NotoSerifThai-Regular.ttf"],
    "cjk": ["NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSansSC-Regular.otf"],
    "hangul": ["NotoSansCJK-Regular.ttc", "NotoSansCJKkr-Regular.otf", "NotoSansKR-Regular.otf"],
}
CJK_FACE = {"zh": "SC", "ja": "JP", "ko": "KR"}
APT_PACKAGES = "fonts-noto-core fonts-noto-cjk"

_WARNED: set[str] = set()


def script_of(char: str) -> str | None:
    """The script a character needs a font for; "latin" for letters of the Latin range, None for common."""
    code = ord(char)
    for first, last, script in SCRIPT_RANGES:
        if first <= code <= last:
            return script
    if char.isalpha():
        return "latin"
    return None


def _is_mark(char: str) -> bool:
    return unicodedata.category(char) in ("Mn", "Mc", "Me") or char in "\u200c\u200d"


def _font_dirs() -> tuple[str, ...]:
    env = os.environ.get("SHIELD_DS_FONT_DIRS")
    dirs = env.split(os.pathsep) if env else DEFAULT_FONT_DIRS
    return tuple(str(Path(d).expanduser()) for d in dirs if d)


@functools.lru_cache(maxsize=8)
def _font_index(dirs: tuple[str, ...]) -> dict[str, str]:
    """File name -> path of every font file under `dirs` (the first one found wins)."""
    index: dict[str, str] = {}
    for root in dirs:
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.lower().endswith((".ttf", ".otf", ".ttc")):
                    index.setdefault(name, os.path.join(dirpath, name))
    return index


@functools.lru_cache(maxsize=64)
def _face_index(path: str, want: str) -> int:
    """Index of the face in a font collection whose name ends with `want` (e.g. "SC"); 0 if none."""
    if not path.lower().endswith(".ttc"):
        return 0
    for index in range(16):
        try:
            family = ImageFont.truetype(path, 12, index=index).getname()[0] or ""
        except OSError:
            break
        if "Mono" not in family and family.endswith(want):
            return index
    return 0


@functools.lru_cache(maxsize=64)
def _cmap(path: str, index: int) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(path, fontNumber=index, lazy=True).getBestCmap())


def _font_file(script: str, language: str) -> tuple[str, int] | None:
    """(path, face index) of the font for `script`, or None when no font is installed for it."""
    index = _font_index(_font_dirs())
    names = FONT_FILES.get(script, [f"NotoSans{script.capitalize()}-Regular.ttf"])
    for name in names:
        if name in index:
            path = index[name]
            want = CJK_FACE.get(language, "KR" if script == "hangul" else "SC")
            return path, _face_index(path, want)
    return None


@functools.lru_cache(maxsize=256)
def _font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, index=index)


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


class _Typesetter:
    """Chooses a font for every character of one text, at one size."""

    def __init__(self, text: str, language: str):
        counts: dict[str, int] = {}
        for char in text:
            script = script_of(char)
            if script is not None:
                counts[script] = counts.get(script, 0) + 1
        self.primary_script = max(counts, key=counts.get) if counts else "latin"
        self.rtl = self.primary_script in RTL_SCRIPTS
        self.base = _font_file("latin", language)
        self.fonts: dict[str, tuple[str, int] | None] = {}
        for script in sorted(counts, key=lambda s: s != self.primary_script):
            found = _font_file(script, language)
            if found is None:
                _warn_once(f"font:{script}", f"no font covers the {script.capitalize()} script: typographic "
                           f"images will show boxes for it (install Debian {APT_PACKAGES})")
            self.fonts[script] = found
        self.primary = self.fonts.get(self.primary_script) or self.base
        if self.base is None:
            _warn_once("font:latin", f"no Latin font found (install Debian {APT_PACKAGES}); using Pillow's default")
        self.shaped = features.check("raqm")
        if not self.shaped and (counts.keys() & (RTL_SCRIPTS | {"bengali", "thai", "devanagari"})):
            _warn_once("raqm", "Pillow has no libraqm: Arabic, Thai and Bengali text is drawn unshaped "
                       "(install Debian libraqm0)")

    def font_for(self, char: str) -> tuple[str, int] | None:
        """The font for one character: its script's font, else the primary or Latin font that covers it."""
        script = script_of(char)
        if script is not None and script != "latin" and self.fonts.get(script):
            return self.fonts[script]
        for candidate in (self.primary, self.base):
            if candidate is not None and ord(char) in _cmap(*candidate):
                return candidate
        return self.primary

    def runs(self, line: str) -> list[tuple[str, tuple[str, int] | None]]:
        """Split a line into (text, font) runs; marks and spaces stay with the run before them."""
        runs: list[list] = []
        for char in line:
            font = self.font_for(char)
            if runs and (_is_mark(char) or char == " " or runs[-1][1] == font):
                runs[-1][0] += char
            else:
                runs.append([char, font])
        return [(text, font) for text, font in runs]

    def load(self, font: tuple[str, int] | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if font is None:
            return ImageFont.load_default(size)
        return _font(font[0], font[1], size)

    def run_direction(self, text: str) -> str | None:
        if not self.shaped:
            return None
        return "rtl" if any(script_of(c) in RTL_SCRIPTS for c in text) else "ltr"

    def width(self, line: str, size: int) -> float:
        return sum(self.load(font, size).getlength(text, direction=self.run_direction(text))
                   for text, font in self.runs(line))

    def draw_line(self, draw: ImageDraw.ImageDraw, line: str, x_start: float, x_end: float,
                  baseline: float, size: int) -> None:
        """Left-aligned runs for left-to-right text; right-aligned, in reverse order, for right-to-left."""
        x = x_end if self.rtl else x_start
        for text, font in self.runs(line):
            loaded = self.load(font, size)
            direction = self.run_direction(text)
            width = loaded.getlength(text, direction=direction)
            if self.rtl:
                x -= width
            draw.text((x, baseline), text, font=loaded, fill=(0, 0, 0), anchor="ls", direction=direction)
            if not self.rtl:
                x += width

    def line_height(self, size: int) -> float:
        heights = [sum(self.load(font, size).getmetrics()) for font in (self.primary, self.base) if font]
        return max(heights or [size * 1.2]) * 1.1


def _break_units(paragraph: str) -> list[str]:
    """Pieces a line may break between: words with their trailing space, or single characters
    (with their marks) in scripts written without spaces."""
    units: list[str] = []
    for char in paragraph:
        if units and (_is_mark(char) or char == " "):
            units[-1] += char
        elif (not units or units[-1].endswith(" ") or script_of(char) in UNSPACED_SCRIPTS
              or script_of(units[-1][-1]) in UNSPACED_SCRIPTS):
            units.append(char)
        else:
            units[-1] += char
    return units


def _wrap(text: str, setter: _Typesetter, size: int, max_width: float) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for unit in _break_units(paragraph.strip()):
            candidate = current + unit
            if not current or setter.width(candidate.rstrip(), size) <= max_width:
                current = candidate
                continue
            lines.append(current.rstrip())
            current = unit
        lines.append(current.rstrip())
    # a single unit wider than the line (a long word or URL) is cut character by character
    fitted: list[str] = []
    for line in lines:
        while line and setter.width(line, size) > max_width:
            cut = len(line) - 1
            while cut > 1 and (setter.width(line[:cut], size) > max_width or _is_mark(line[cut])):
                cut -= 1
            fitted.append(line[:cut])
            line = line[cut:].lstrip()
        fitted.append(line)
    return fitted


def uncovered_characters(text: str, language: str) -> set[str]:
    """Characters of `text` that no installed font draws (they would render as boxes); tests/test_data.py
    checks with it that the fonts cover every MultiJail language."""
    setter = _Typesetter(text, language)
    missing = set()
    for char in set(text):
        if char.isspace() or unicodedata.category(char) == "Cf":
            continue
        font = setter.font_for(char)
        if font is None or ord(char) not in _cmap(*font):
            missing.add(char)
    return missing


def render_typographic(text: str, language: str, size: int = 512) -> Image.Image:
    """Render `text` FigStep style (the text, then an empty list 1. 2. 3.) into a size x size RGB image.

    The font size shrinks until everything fits; a script without an installed font is warned
    about once (its characters then show as boxes).
    """
    if not text or not text.strip():
        raise ShieldError("render_typographic: empty text")
    setter = _Typesetter(text, language)
    margin = size * 0.06
    max_width = size - 2 * margin
    font_size = max(size // 10, 8)
    while True:
        lines = _wrap(text, setter, font_size, max_width) + ["", "1.", "2.", "3."]
        line_height = setter.line_height(font_size)
        if len(lines) * line_height <= size - 2 * margin or font_size <= max(size // 64, 6):
            break
        font_size = max(int(font_size * 0.9), max(size // 64, 6))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    ascent = max(setter.load(f, font_size).getmetrics()[0] for f in (setter.primary, setter.base) if f) \
        if (setter.primary or setter.base) else font_size
    baseline = margin + ascent
    for line in lines:
        if line:
            setter.draw_line(draw, line, margin, size - margin, baseline, font_size)
        baseline += line_height
    return image


def load_image(record: SafetyRecord, size: int = 512) -> Image.Image | None:
    """The image of a record as RGB: its file ("image"), its rendering ("typographic"), or None ("text")."""
    if record.modality == "text":
        return None
    if record.modality == "typographic":
        return render_typographic(record.image_text or "", record.language, size)
    path = Path(record.image or "")
    if not path.is_file():
        raise ShieldError(f"image file not found: {path} (record {record.id})")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ShieldError(f"unreadable image file: {path} (record {record.id}): {exc}") from None
