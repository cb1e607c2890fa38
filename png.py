"""PNG files with the standard library alone (zlib), and their tEXt metadata: the `parameters` text
(`parameters_text`) holds the prompt and settings in the layout AUTOMATIC1111 and other SD tools read.

A PNG is an 8-byte signature and a list of chunks: length, type, data, CRC-32 of type+data. IHDR gives the size and
pixel format, tEXt holds keyword/value text (Latin-1; iTXt UTF-8), IDAT the zlib-compressed rows, each row prefixed by a
filter byte (0: none), and IEND closes the file. Reading PNGs (the images an edit starts from) is png_reader.py's.
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


SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a"}  # as those tools say


def parameters_text(prompt: str, negative_prompt: str | None, *, steps: int, sampler: str, guidance_scale: float,
                    seed: int, width: int, height: int, model: str, strength: float | None = None, loras=(),
                    extra: dict | None = None) -> str:
    """`strength`: an edit's (img2img, inpainting) "Denoising strength". `extra` holds further settings in
    order; a value with a comma is quoted, so the line still splits.
    `loras` (checkpoint/lora.py's LoraInfo) are written as A1111 writes them: a `<lora:name:scale>` tag
    each after the prompt, and their short hashes in "Lora hashes"."""
    settings = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": f"{guidance_scale:g}",
                "Seed": seed, "Size": f"{width}x{height}", "Model": model,
                **({} if strength is None else {"Denoising strength": f"{strength:g}"}), **(extra or {})}
    if loras:
        prompt = " ".join([prompt, *(lora.tag for lora in loras)])
        settings["Lora hashes"] = ", ".join(f"{lora.name}: {lora.hash}" for lora in loras)
    line = ", ".join(f"{k}: {json.dumps(v) if ',' in str(v) else v}" for k, v in settings.items())
    negative = [f"Negative prompt: {negative_prompt}"] if negative_prompt else []
    return "\n".join([prompt, *negative, line])
