"""The --trace filmstrip of VL-DNP (methods/vldnp.py): the x0 images a proposer saw, a row per image
and a frame per query, each labelled below with its step."""
from pathlib import Path

import torch

from files import write_json
from png import write_png


def write_with_filmstrip(path: Path, data: dict, rows: list[list[torch.Tensor]],
                         labels: list[list[tuple[int, bool]]]) -> Path:
    """Writes the trace `data` as JSON at `path` and, if images were sent, their filmstrip beside it as
    <stem>.filmstrip.png, named in data["filmstrip"]. A filmstrip that cannot be written raises after
    the JSON, the trace itself, is written."""
    strip, error = filmstrip(rows, labels), None
    if strip is not None:
        try:
            data["filmstrip"] = write_png(path.with_name(path.stem + ".filmstrip.png"), strip).name
        except OSError as e:
            error = e
    write_json(path, data)
    if error is not None:
        raise error
    return path


def filmstrip(rows: list[list[torch.Tensor]], labels: list[list[tuple[int, bool]]]) -> torch.Tensor | None:
    """uint8 [H, W, 3] from rows of uint8 [h, w, 3] frames and their (step, failed) labels, a failed
    query's step in red; None when there is no frame."""
    frames = [frame for row in rows for frame in row]
    if not frames:
        return None
    h, w = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)
    scale = max(1, min(4, w // 48))  # label pixel size
    pad, band = 2 * scale, 5 * scale + 4 * scale  # band: frame bottom to the next row's top
    cols = max(len(row) for row in rows)
    canvas = torch.full((len(rows) * (h + band) + pad, cols * (w + pad) + pad, 3), 40, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            y, x = pad + r * (h + band), pad + c * (w + pad)
            canvas[y:y + frame.shape[0], x:x + frame.shape[1]] = frame
            step, failed = labels[r][c]
            draw_digits(canvas, str(step), y + h + pad, x, scale, (255, 64, 64) if failed else (255, 255, 255))
    return canvas


_DIGITS = {  # 3x5 pixel font, rows top to bottom
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111",
    "3": "111 001 111 001 111", "4": "101 101 111 001 001", "5": "111 100 111 001 111",
    "6": "111 100 111 101 111", "7": "111 001 001 001 001", "8": "111 101 111 101 111",
    "9": "111 101 111 001 111",
}


def draw_digits(canvas: torch.Tensor, digits: str, y: int, x: int, scale: int, color) -> None:
    """Draws `digits` into uint8 [H, W, 3] `canvas` with its top-left corner at (y, x), each font
    pixel `scale` pixels wide; whatever falls outside the canvas is clipped."""
    for k, digit in enumerate(digits):
        glyph = torch.tensor([[bit == "1" for bit in row] for row in _DIGITS[digit].split()])  # [5, 3]
        glyph = glyph.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x0 = x + 4 * scale * k
        region = canvas[y:y + glyph.shape[0], x0:x0 + glyph.shape[1]]
        region[glyph[:region.shape[0], :region.shape[1]]] = torch.tensor(color, dtype=torch.uint8)
