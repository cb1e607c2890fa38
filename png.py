"""PNG files with the standard library alone (zlib), and their tEXt metadata: the `parameters` text
(`parameters_text`) holds the prompt and settings in the layout AUTOMATIC1111 and other SD tools read.

A PNG is an 8-byte signature and a list of chunks: length, type, data, CRC-32 of type+data.
IHDR gives the size and pixel format, tEXt holds keyword/value text (Latin-1; iTXt UTF-8), IDAT
the zlib-compressed rows, each row prefixed by a filter byte (0: none), and IEND closes the file.
"""
import re
import json
import struct
import zlib
from pathlib import Path

import torch

from files import write_atomic

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# A keyword is 1 to 79 printable Latin-1 characters, without leading, trailing or double spaces.
_KEYWORD = re.compile(r"(?! )(?!.*  )[\x20-\x7e\xa1-\xff]{1,79}(?<! )")


def encode_png(image: torch.Tensor, text: dict[str, str] | None = None) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes, with text chunks: tEXt, or iTXt (UTF-8) for text that
    Latin-1, the only encoding tEXt allows, cannot hold. The PNG spec allows no NUL in either
    text: a NUL (a prompt can hold one) is written as \\x00, and a lone surrogate, which UTF-8
    cannot hold, as \\udxxx, so the image is written whatever its text. A keyword outside the
    spec raises ValueError."""
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[2] == 3, "expected uint8 [H, W, 3]"
    H, W, _ = image.shape
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), image.reshape(H, W * 3)], dim=1)  # filter byte 0
    out = SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))  # 8-bit RGB
    for key, value in (text or {}).items():
        if not _KEYWORD.fullmatch(key):
            raise ValueError(f"PNG keyword {key!r}: must be 1 to 79 printable Latin-1 characters, without leading, "
                             "trailing or double spaces")
        value = value.replace("\0", "\\x00")
        try:
            out += _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
        except UnicodeEncodeError:  # keyword, no compression, no language, no translated keyword
            out += _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8", "backslashreplace"))
    return out + _chunk(b"IDAT", zlib.compress(rows.contiguous().numpy().tobytes(), 6)) + _chunk(b"IEND", b"")


def write_png(path, image: torch.Tensor, text: dict[str, str] | None = None) -> Path:
    """Writes the PNG of `image` atomically (files.write_atomic)."""
    return write_atomic(path, encode_png(image, text))


def read_png(path) -> tuple[torch.Tensor, dict[str, str]]:
    """Reads back what write_png writes (8-bit RGB, filter 0 rows): (uint8 [H, W, 3], text chunks)."""
    data = Path(path).read_bytes()
    if not data.startswith(SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    pos, text, idat, size = len(SIGNATURE), {}, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, value = body.split(b"\0", 1)
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            text[key.decode("latin-1")] = rest[2:].split(b"\0", 2)[2].decode("utf-8")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    W, H = size
    rows = torch.frombuffer(bytearray(zlib.decompress(idat)), dtype=torch.uint8).view(H, 1 + W * 3)
    if rows[:, 0].any():
        raise ValueError(f"{path}: only unfiltered rows are supported")
    return rows[:, 1:].reshape(H, W, 3).clone(), text


SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", "euler": "Euler",
                 "euler-a": "Euler a"}  # as those tools write them


def parameters_text(prompt: str, negative_prompt: str | None, *, steps: int, sampler: str, guidance_scale: float,
                    seed: int, width: int, height: int, model: str, extra: dict | None = None) -> str:
    """`extra` holds further settings in order; a value with a comma is quoted, so the line still splits."""
    settings = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": f"{guidance_scale:g}",
                "Seed": seed, "Size": f"{width}x{height}", "Model": model, **(extra or {})}
    line = ", ".join(f"{k}: {json.dumps(v) if ',' in str(v) else v}" for k, v in settings.items())
    negative = [f"Negative prompt: {negative_prompt}"] if negative_prompt else []
    return "\n".join([prompt, *negative, line])
