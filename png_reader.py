"""Reading PNG files with zlib and numpy alone: the images an edit starts from (sampler/edit.py).

A PNG is an 8-byte signature and a list of chunks: length, type, data, CRC-32 of type+data (png.py
writes them). IHDR gives the size and pixel format, tEXt/iTXt hold text, PLTE a palette, IDAT the
zlib-compressed rows, each prefixed by a filter byte (0: none, 1: sub, 2: up, 3: average, 4: Paeth;
PNG spec, sec. 9), and IEND closes the file.

We read what users bring for img2img and inpainting: grey, grey + alpha, RGB, RGBA and palette
images of 8 bits per sample (grey and palette also of 1, 2 and 4), any filters, as RGB the way
diffusers' load_image (PIL's convert("RGB")) gives them: grey repeated, the palette looked up,
alpha dropped. Other files (JPEG, 16-bit or interlaced PNGs) are refused in one line that says how
to save them, so the runtime needs no image library. A leaf: only edits need it (docs/fork.md).
"""
import os
import stat
import struct
import zlib

import numpy as np
import torch

from png import SIGNATURE


class ImageFileError(ValueError):
    """An image file that cannot be read; the message is one line naming the file."""


# Signatures of the formats people try instead, to name them in the refusal.
OTHER_FORMATS = {b"\xff\xd8\xff": "a JPEG", b"GIF8": "a GIF", b"RIFF": "a WebP (or other RIFF) file", b"BM": "a BMP",
                 b"II*\0": "a TIFF", b"MM\0*": "a TIFF"}
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel: grey, RGB, palette, grey+alpha, RGBA
DEPTHS = {0: (1, 2, 4, 8), 2: (8,), 3: (1, 2, 4, 8), 4: (8,), 6: (8,)}  # the bit depths read
MAX_SIDE, MAX_PIXELS = 8192, 2**24  # 4096 x 4096 take seconds to read, and far more than any edit
MAX_BYTES = 5 * MAX_PIXELS  # a file read: the most pixels as RGBA stored uncompressed, and 16 MiB of other chunks
EXTRA_ROWS = 2**16  # bytes of rows past the image still inflated (and ignored, as PIL does); more are refused
MAX_TEXTS = 256  # text chunks kept, the first; a file may hold millions of tiny ones


def read_png(path) -> tuple[torch.Tensor, dict[str, str]]:
    """(uint8 [H, W, 3] RGB, its text chunks) of a PNG file; ImageFileError, one line, for a file that
    cannot be read."""
    try:  # opened without waiting (a named pipe's open waits for a writer), then refused unless a file
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ImageFileError(f"{path}: not a regular file (a named pipe or a device); give a PNG file")
            data = bytearray()  # at most MAX_BYTES + 1
            while len(data) <= MAX_BYTES and (block := file.read(2**20)):
                data += block
    except OSError as e:
        raise ImageFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise ImageFileError(f"{path}: over {MAX_BYTES >> 20} MiB, more than a PNG of 2^24 (4096x4096) pixels holds; "
                             "give an image of the size to edit")
    if not data.startswith(SIGNATURE):
        kind = next((name for magic, name in OTHER_FORMATS.items() if data.startswith(magic)), "not a PNG file")
        raise ImageFileError(f"{path}: {kind}; only PNG images are read: save it as PNG (8 bits per sample)")
    chunks = _chunks(data, path)
    kind, header = next(chunks, (b"", b""))  # none: the file is only its signature and IEND
    if kind != b"IHDR" or len(header) != 13:
        raise ImageFileError(f"{path}: a damaged PNG (no IHDR chunk first)")
    W, H, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if colour not in CHANNELS or depth not in DEPTHS[colour]:
        raise ImageFileError(f"{path}: a PNG of {depth} bits per sample (colour type {colour}); only 8-bit images "
                             "(1, 2 or 4 bits for grey and palette) are read: save it with 8 bits per sample")
    if interlace:
        raise ImageFileError(f"{path}: an interlaced PNG; save it without interlacing")
    if max(W, H) > MAX_SIDE:  # the filters are undone one anti-diagonal at a time: H + W - 1 steps
        raise ImageFileError(f"{path}: a PNG of {W}x{H} pixels; a side of at most {MAX_SIDE} is read, more than any "
                             "Stable Diffusion edit can use: resize it")
    if not 0 < W * H <= MAX_PIXELS:
        raise ImageFileError(f"{path}: a PNG of {W}x{H} pixels; at most 2^24 (4096x4096) are read, more than any "
                             "Stable Diffusion edit can use: resize it")
    text, palette, compressed = {}, None, bytearray()  # only what is read is kept: other chunks cost nothing
    for kind, body in chunks:
        if kind == b"IDAT":
            compressed += body
        elif kind == b"PLTE":
            palette = np.frombuffer(body[:len(body) // 3 * 3], dtype=np.uint8).reshape(-1, 3)
        elif kind in (b"tEXt", b"iTXt") and b"\0" in body and len(text) < MAX_TEXTS:
            key, value = body.split(b"\0", 1)
            try:
                text[key.decode("latin-1")] = (value.decode("latin-1") if kind == b"tEXt"
                                               else value[2:].split(b"\0", 2)[2].decode("utf-8"))
            except (IndexError, UnicodeDecodeError):  # a damaged text chunk costs only itself
                pass
    if colour == 3 and palette is None:
        raise ImageFileError(f"{path}: a palette PNG without its palette (PLTE chunk)")
    bits = CHANNELS[colour] * depth  # per pixel
    unit = max(bits // 8, 1)  # the filters' "bytes per pixel"
    row_bytes = (W * bits + 7) // 8
    raw = _inflate(compressed, H * (row_bytes + 1), path, W, H)
    if len(raw) < H * (row_bytes + 1):
        raise ImageFileError(f"{path}: a truncated PNG ({len(raw)} bytes of rows where {H}x{W} needs "
                             f"{H * (row_bytes + 1)})")
    rows = np.frombuffer(raw, dtype=np.uint8, count=H * (row_bytes + 1)).reshape(H, row_bytes + 1)
    if rows[:, 0].max() > 4:
        raise ImageFileError(f"{path}: a damaged PNG (filter type {rows[:, 0].max()} in a row; the types are 0-4)")
    samples = _samples(unfilter(rows[:, 0], rows[:, 1:], unit), W, depth, CHANNELS[colour])  # [H, W, channels]
    if colour == 3:
        if samples.max() >= len(palette):
            raise ImageFileError(f"{path}: a damaged PNG (a pixel indexes past its {len(palette)}-colour palette)")
        rgb = palette[samples[..., 0]]
    elif colour in (0, 4):
        grey = samples[..., 0] * (255 // (2**depth - 1))  # 1, 2, 4 bits scaled to 8, as PIL reads them
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:
        rgb = samples[..., :3]
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.uint8)), text


def read_image(path) -> torch.Tensor:
    """uint8 [H, W, 3], the RGB pixels of a PNG file (read_png)."""
    return read_png(path)[0]


def _chunks(data: bytes, path):
    """(type, data) per chunk up to IEND, each CRC checked."""
    pos = len(SIGNATURE)
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        if len(crc) < 4:
            raise ImageFileError(f"{path}: a truncated PNG (its {kind.decode('latin-1')!r} chunk runs past the end)")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise ImageFileError(f"{path}: a damaged PNG (the CRC of its {kind.decode('latin-1')!r} chunk is wrong)")
        if kind == b"IEND":
            return
        yield kind, body
        pos += 12 + length
    raise ImageFileError(f"{path}: a truncated PNG (no IEND chunk)")


def _inflate(data: bytes, size: int, path, W: int, H: int) -> bytes:
    """The rows the zlib stream `data` holds, inflated up to `size` + EXTRA_ROWS bytes and no further:
    a few KB can inflate to gigabytes (a decompression bomb), so a stream longer than that is refused.
    Bytes after the stream's end are neither inflated nor read, as PIL ignores them."""
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(data, size + EXTRA_ROWS + 1)  # [max_length]: stops there
    except zlib.error as e:
        raise ImageFileError(f"{path}: a damaged PNG (its image data does not decompress: {e})") from None
    if len(raw) > size + EXTRA_ROWS:
        raise ImageFileError(f"{path}: a damaged PNG or a decompression bomb (its image data inflates past the "
                             f"{W}x{H} pixels the header gives)")
    if not stream.eof:
        raise ImageFileError(f"{path}: a truncated PNG (its image data stops before the end of its zlib stream)")
    return raw


def unfilter(types: np.ndarray, rows: np.ndarray, unit: int) -> np.ndarray:
    """The PNG filters undone (PNG spec, sec. 9.2): uint8 rows [H, N] whose row y was filtered with
    types[y], `unit` bytes per pixel. Byte x of row y is reconstructed from the bytes a (left, x - unit),
    b (above) and c (above left), so all pixels on one anti-diagonal y + x/unit are done at once."""
    H, N = rows.shape
    U = N // unit  # pixels per row; a byte when pixels are smaller
    filtered = rows.reshape(H, U, unit).astype(np.int32)
    out = np.zeros((H + 1, U + 1, unit), dtype=np.int32)  # a zero row above and a zero column on the left
    types = types.astype(np.int32)
    for d in range(H + U - 1):
        y = np.arange(max(0, d - U + 1), min(H, d + 1))
        x = d - y
        a, b, c = out[y + 1, x], out[y, x + 1], out[y, x]  # [n, unit] each
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        t = types[y][:, None]
        predictor = np.select([t == 1, t == 2, t == 3, t == 4], [a, b, (a + b) // 2, paeth], 0)
        out[y + 1, x + 1] = (filtered[y, x] + predictor) & 0xFF
    return out[1:, 1:].reshape(H, N).astype(np.uint8)


def _samples(rows: np.ndarray, W: int, depth: int, channels: int) -> np.ndarray:
    """Unfiltered rows [H, N] -> samples [H, W, channels]; samples of 1, 2 or 4 bits are unpacked,
    the first in each byte in its high bits."""
    if depth == 8:
        return rows[:, :W * channels].reshape(len(rows), W, channels)
    shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)  # e.g. 6, 4, 2, 0 for 2 bits
    values = (rows[:, :, None] >> shifts) & (2**depth - 1)  # [H, N, 8/depth]
    return values.reshape(len(rows), -1)[:, :W, None]
