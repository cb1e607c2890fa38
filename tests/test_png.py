"""png.py's reader against Pillow's: every colour type and bit depth it takes, every filter type,
as diffusers' load_image (convert("RGB")) gives them; the files it refuses, each in one line."""
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import png
import png_reader
from helpers import inflating_png


def smooth_rows(h=19, w=23, channels=3, seed=0) -> np.ndarray:
    """Smooth rows with noise, so that Pillow's adaptive filtering picks several filter types."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(-6, 7, (h, w, channels))
    return (np.cumsum(steps, axis=1) + np.arange(h)[:, None, None] * 9) % 256


def pil_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# Pillow warns that its own palette-with-transparency file is better read as RGBA: the reference's
# advice to its users, not ours to act on.
@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_pillow_files_read_as_pillow_reads_them(tmp_path, mode):
    rgba = Image.fromarray(smooth_rows(channels=4).astype(np.uint8), "RGBA")
    path = tmp_path / f"{mode}.png"
    (rgba if mode == "RGBA" else rgba.convert(mode)).save(path)
    ours = png_reader.read_image(path)
    assert ours.dtype == torch.uint8 and ours.shape == (19, 23, 3)
    assert np.array_equal(ours.numpy(), pil_rgb(path))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_palettes_of_every_depth(tmp_path, bits):
    image = Image.fromarray(smooth_rows().astype(np.uint8)).quantize(2**bits)
    image.save(tmp_path / "p.png", bits=bits)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(png_reader.read_image(tmp_path / "p.png").numpy(), pil_rgb(tmp_path / "p.png"))


def filtered(rows: np.ndarray, kind: int, unit: int) -> np.ndarray:
    """PNG filter `kind` applied to uint8 rows [H, N] (the encoder's side of PNG spec sec. 9.2)."""
    x = rows.astype(np.int32)
    a = np.pad(x, ((0, 0), (unit, 0)))[:, :-unit]  # left
    b = np.pad(x, ((1, 0), (0, 0)))[:-1]  # above
    c = np.pad(b, ((0, 0), (unit, 0)))[:, :-unit]  # above left
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    predictor = [0, a, b, (a + b) // 2, np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))][kind]
    return ((x - predictor) % 256).astype(np.uint8)


def handmade_png(pixels: np.ndarray, colour: int, kinds: list[int]) -> bytes:
    """An 8-bit PNG whose row y is filtered with kinds[y % len(kinds)]."""
    H, W = pixels.shape[:2]
    rows = pixels.reshape(H, -1).astype(np.uint8)
    unit = rows.shape[1] // W
    by_kind = {kind: filtered(rows, kind, unit) for kind in set(kinds)}  # each row picks from its kind's
    data = b"".join(bytes([kind]) + by_kind[kind][y].tobytes() for y in range(H) for kind in [kinds[y % len(kinds)]])
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (png.SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("kinds", [[0], [1], [2], [3], [4], [4, 3, 2, 1, 0]], ids=["none", "sub", "up", "average",
                                                                                  "paeth", "mixed"])
@pytest.mark.parametrize("colour,channels", [(2, 3), (6, 4), (0, 1)], ids=["rgb", "rgba", "grey"])
def test_every_filter_type(tmp_path, kinds, colour, channels):
    pixels = smooth_rows(channels=channels, seed=len(kinds))
    (tmp_path / "f.png").write_bytes(handmade_png(pixels, colour, kinds))
    ours = png_reader.read_image(tmp_path / "f.png").numpy()
    assert np.array_equal(ours, pil_rgb(tmp_path / "f.png"))
    assert np.array_equal(ours[..., 0], pixels[..., 0])


def test_written_pngs_read_back_with_their_text(tmp_path):
    image = torch.from_numpy(smooth_rows().astype(np.uint8))
    png.write_png(tmp_path / "ours.png", image, {"parameters": "a cat\nSteps: 3", "ünï": "tëxt ✓"})
    back, text = png_reader.read_png(tmp_path / "ours.png")
    assert torch.equal(back, image) and text == {"parameters": "a cat\nSteps: 3", "ünï": "tëxt ✓"}


@pytest.mark.parametrize("case,expected", [
    ("jpeg", "a JPEG; only PNG images are read"),
    ("missing", "cannot read it"),
    ("sixteen", "16 bits per sample"),
    ("interlaced", "interlaced"),
    ("truncated", "truncated"),
    ("crc", "CRC"),
    ("garbage", "not a PNG file"),
])
def test_unreadable_files_are_one_line(tmp_path, case, expected):
    path = tmp_path / "in.png"
    good = tmp_path / "good.png"
    Image.fromarray(smooth_rows().astype(np.uint8)).save(good)
    if case == "jpeg":
        Image.fromarray(smooth_rows().astype(np.uint8)).save(path, format="JPEG")
    elif case == "sixteen":
        Image.fromarray((smooth_rows(channels=1)[..., 0] * 200).astype(np.uint16)).save(path)
    elif case == "interlaced":  # Pillow writes none: the IHDR's interlace byte set, its CRC made anew
        data = bytearray(good.read_bytes())
        data[28] = 1
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        path.write_bytes(bytes(data))
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-30])
    elif case == "crc":
        data = bytearray(good.read_bytes())
        data[40] ^= 0xFF  # inside IDAT
        path.write_bytes(bytes(data))
    elif case == "garbage":
        path.write_bytes(b"hello, world")
    with pytest.raises(png_reader.ImageFileError) as e:
        png_reader.read_image(path)
    message = str(e.value)
    assert expected in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("width,height,limit", [(8193, 1, "a side of at most 8192 is read"),
                                                (1, 8193, "a side of at most 8192 is read"),
                                                (4097, 4097, "at most 2^24 (4096x4096) are read")])
def test_a_png_too_large_for_any_edit_is_refused_before_its_rows_are_read(tmp_path, width, height, limit):
    """A few KB of compressed rows can name a 2^20 x 1 image, or a 16384 x 16384 one, whose filters take
    minutes to undo (one anti-diagonal at a time); no Stable Diffusion edit uses such sizes."""
    (tmp_path / "large.png").write_bytes(handmade_png(np.zeros((height, width, 1)), 0, [0]))
    with pytest.raises(png_reader.ImageFileError) as e:
        png_reader.read_image(tmp_path / "large.png")
    assert str(e.value) == (f"{tmp_path / 'large.png'}: a PNG of {width}x{height} pixels; {limit}, more than any "
                            "Stable Diffusion edit can use: resize it")


def test_a_decompression_bomb_is_refused_without_inflating_it(tmp_path):
    """16 KB of IDAT inflating to 16 MiB under a 16x16 header: refused in one line, after inflating at most
    the image's rows and EXTRA_ROWS more (tracemalloc sees the inflated bytes; the file is read in MiB blocks)."""
    bomb = inflating_png(tmp_path / "bomb.png", 2**24)
    assert bomb.stat().st_size < 2**15
    tracemalloc.start()
    try:
        with pytest.raises(png_reader.ImageFileError) as e:
            png_reader.read_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value) == (f"{bomb}: a damaged PNG or a decompression bomb (its image data inflates past the 16x16 "
                            "pixels the header gives)")
    assert peak < 2**22  # a quarter of what it inflates to


def test_chunks_the_reader_does_not_use_cost_no_memory(tmp_path):
    """An 80 MiB file of 7 million empty chunks once took 1.8 GB to read, each chunk kept; as many text
    chunks of distinct keywords would have filled a dict. Here 2^17 of each: read in memory of the order of
    the file's (tracemalloc), and the image as Pillow reads it."""
    pixels = smooth_rows(8, 8).astype(np.uint8)
    data = png.encode_png(torch.from_numpy(pixels))
    filler = png._chunk(b"abCd", b"") * 2**17 + b"".join(png._chunk(b"tEXt", b"k%d\0v" % i) for i in range(2**17))
    path = tmp_path / "many.png"
    path.write_bytes(data[:33] + filler + data[33:])  # after the signature and IHDR
    tracemalloc.start()
    try:
        image, text = png_reader.read_png(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(image.numpy(), pil_rgb(path)) and np.array_equal(image.numpy(), pixels)
    assert peak < 4 * path.stat().st_size, (peak, path.stat().st_size)
    assert len(text) <= png_reader.MAX_TEXTS


def test_rows_and_bytes_past_the_image_are_ignored_as_pillow_ignores_them(tmp_path):
    """A few rows too many, and junk after the zlib stream, are read as Pillow reads them: the image's rows."""
    rows = 16 * (1 + 16 * 3)
    for inflated, junk in [(rows, b""), (rows + png_reader.EXTRA_ROWS, b""), (rows, b"junk after the stream")]:
        path = inflating_png(tmp_path / "extra.png", inflated)
        data = path.read_bytes()
        if junk:  # appended to the IDAT chunk, its length and CRC made anew
            body = data[41:-16] + junk
            data = data[:33] + struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(
                ">I", zlib.crc32(b"IDAT" + body)) + data[-12:]
            path.write_bytes(data)
        assert np.array_equal(png_reader.read_image(path).numpy(), pil_rgb(path))
        assert not png_reader.read_image(path).any()
    with pytest.raises(png_reader.ImageFileError, match="inflates past the 16x16 pixels"):
        png_reader.read_image(inflating_png(tmp_path / "extra.png", rows + png_reader.EXTRA_ROWS + 1))


def test_a_file_too_large_for_any_png_is_not_read_whole(tmp_path):
    """A sparse file of MAX_BYTES + 1 (or a link to /dev/zero) is refused after MAX_BYTES + 1 bytes."""
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(png.SIGNATURE)
        f.truncate(png_reader.MAX_BYTES + 1)
    with pytest.raises(png_reader.ImageFileError) as e:
        png_reader.read_image(path)
    assert str(e.value) == (f"{path}: over 80 MiB, more than a PNG of 2^24 (4096x4096) pixels holds; give an image "
                            "of the size to edit")
