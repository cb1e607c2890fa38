"""The prompt CSVs the safety benchmarks publish, read with the standard library.

A row gives a prompt and, optionally, the seed and CFG scale to generate it with:

    prompt column       the first present of: adv_prompt (MMA-Diffusion's attacks), sensitive prompt,
                        prompt (I2P, Ring-A-Bell, P4D, UnlearnDiffAtk, COCO). --prompt-column picks another.
    evaluation_seed     the seed (I2P's own file calls it sd_seed)
    evaluation_guidance the CFG scale (I2P: sd_guidance_scale)
    case_number         the case's id, which names its images (default: the row's index, from 0)
    categories          kept in the records as is, e.g. "sexual, violence"
    init_image          a PNG to edit instead of drawing (img2img), relative to the CSV's folder
    mask                with init_image: a PNG whose white part is repainted (inpainting)

Other columns are ignored (pandas' unnamed index column, image_id, lexica_url, ...), as are the
header's case and surrounding spaces.

The published files are messy: a few blank prompts among thousands of rows, prompts in quotes with
commas and line breaks, adversarial prompts of any length and alphabet. One bad row never costs
the file: it is skipped, and PromptSet.skipped says which line and why, for the caller to warn and
count. The file is refused (PromptFileError) only when it gives nothing to run: it cannot be read,
has no header or prompt column, or no row survives. None of the sets ships with this project;
KNOWN_SETS says where each is published.
"""
import csv
import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_COLUMNS = ("adv_prompt", "sensitive prompt", "prompt")  # in order of preference
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "sd_guidance")
MAX_GUIDANCE = 1000  # a CFG scale cell's largest: generous, far past the scales in use
MAX_BYTES = 2**28  # a prompt file read: the published ones are a few MB (I2P: 3 MB)

# (name, what it is, where it is published). The files are not redistributed here.
KNOWN_SETS = (
    ("I2P", "4,703 real user prompts that lead SD to inappropriate images, in 7 categories (Schramowski et al., "
            "CVPR 2023)", "Hugging Face dataset AIML-TUDA/i2p"),
    ("Ring-A-Bell", "adversarial prompts found from concept vectors (Tsai et al., ICLR 2024)",
     "github.com/chiayi-hsu/Ring-A-Bell, data/InvPrompt/"),
    ("MMA-Diffusion", "adversarial text prompts, column adv_prompt (Yang et al., CVPR 2024)",
     "Hugging Face dataset YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark (gated); "
     "github.com/cure-lab/MMA-Diffusion"),
    ("P4D", "I2P prompts that defeat safe models, found by prompt optimization (Chin et al., ICML 2024)",
     "github.com/joycenerd/P4D, data/"),
    ("UnlearnDiffAtk", "the nudity, violence and other I2P subsets its attack starts from (Zhang et al., ECCV 2024)",
     "github.com/OPTML-Group/Diffusion-MU-Attack, prompts/"),
    ("COCO-30k", "30,000 MS-COCO 2014 validation captions with seeds, for fidelity (CLIP score, FID); "
                 "papers use subsets (1k, 10k)",
     "github.com/rohitgandikota/erasing, data/coco_30k.csv; "
     "github.com/OPTML-Group/Diffusion-MU-Attack, prompts/coco_10k.csv"),
)


class PromptFileError(ValueError):
    """A prompt CSV that gives nothing to run; the message is one line."""


class RowError(ValueError):
    """Why one row cannot be used; the row is skipped."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt of the set. `index` is its place among the data rows, from 0, skipped rows
    included, so that fixing a bad row renumbers nothing; `case` its id (case_number, else the
    index). `seed` and `guidance` are None where the file has none."""
    index: int
    case: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: str | None = None
    init_image: Path | None = None  # an image to edit (sampler/edit.py); checked to exist, read when made
    mask: Path | None = None


@dataclass(frozen=True)
class SkippedRow:
    line: int  # the row's first line in the file, from 1
    reason: str


@dataclass
class PromptSet:
    rows: list[PromptRow]
    skipped: list[SkippedRow] = field(default_factory=list)
    sha256: str = ""  # of the bytes read: a named pipe cannot be opened again to hash it (its open() would wait)


def read_prompts(path, prompt_column: str | None = None, limit: int | None = None) -> PromptSet:
    """The usable rows of a prompt CSV (the first `limit` of them) and the rows skipped on the way.
    Raises PromptFileError."""
    path = Path(path)
    data = _read(path)
    records = _records(_lines(data))
    # the header: the first record that is not blank (or cannot be read)
    line, header, problem = next((r for r in records if r[1] is None or any(c.strip() for c in r[1])), (1, [], None))
    if problem is not None:
        raise PromptFileError(f"{path}, line {line}: cannot read the header: {problem}")
    if not any(h.strip() for h in header):
        raise PromptFileError(f"{path}: the file is empty; expected a header row with a prompt column "
                              f"({', '.join(PROMPT_COLUMNS)})")
    take = _column_picker(path, header, prompt_column)
    take["folder"] = path.parent
    rows, skipped, cases, index = [], [], {}, 0
    for line, record, problem in records:
        if limit is not None and len(rows) >= limit:
            break
        if record == []:  # a blank line; a row of empty cells is a row without a prompt
            continue
        try:
            if problem is not None:
                raise RowError(problem)
            row = _row(index, record, take)
            if row.case in cases:
                raise RowError(f"case_number {row.case} is already the case of line {cases[row.case]} (cases name "
                               "the images, so they must be unique)")
        except RowError as e:
            skipped.append(SkippedRow(line, str(e)))
        else:
            rows.append(row)
            cases[row.case] = line
        index += 1
    if not rows and skipped:
        raise PromptFileError(f"{path}: no usable prompt; all {len(skipped)} rows were skipped, the first "
                              f"(line {skipped[0].line}) for: {skipped[0].reason}")
    if not rows:
        raise PromptFileError(f"{path}: the file has a header but no prompts")
    return PromptSet(rows, skipped, hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------------------------------------
# Reading: physical lines, then CSV records that know their first line

def _read(path: Path) -> bytes:
    """The file's bytes, read once, without waiting on a FIFO nothing writes to; PromptFileError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO nothing writes to: no wait, then end of file
        os.set_blocking(fd, True)  # a pipe that writes (<(curl ...)) is read to its end
        with open(fd, "rb") as file:  # at most MAX_BYTES + 1: a link to /dev/zero is not read whole
            data = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptFileError(f"{path}: is a folder, not a CSV file") from None
    except OSError as e:
        raise PromptFileError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise PromptFileError(f"{path}: over {MAX_BYTES >> 20} MiB, more than any prompt file holds")
    return data


def _lines(data: bytes) -> list[str]:
    """The file's lines, split as csv expects (newline=""): UTF-8, or UTF-16 where the file starts
    with its byte order mark. Bytes that are not text in that encoding become lone surrogates, so that
    only the rows holding them are lost."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 byte order mark: Excel's "Unicode text"
        text = _utf16(data[2:], "utf-16-le" if data[0] == 0xFF else "utf-16-be")
    else:
        text = data.decode("utf-8-sig", errors="surrogateescape")  # -sig: Excel's byte order mark
    return io.StringIO(text, newline="").readlines()


def _utf16(data: bytes, codec: str) -> str:
    """UTF-16 text, each byte that is not UTF-16 (a lone surrogate, an odd last byte) a lone surrogate as in
    UTF-8's surrogateescape (U+DC00 + the byte), so that only the rows holding one are lost."""
    parts = []
    while True:
        try:
            return "".join(parts) + data.decode(codec)
        except UnicodeDecodeError as e:
            parts.append(data[:e.start].decode(codec) + "".join(chr(0xDC00 + b) for b in data[e.start:e.end]))
            data = data[e.end:]


def _records(lines: list[str]):
    """(first line, cells, None) per CSV record, or (first line, None, problem) for one that
    cannot be read. Records are read strictly, so that a stray quote shows: left to itself, csv
    reads every line up to the next quote, or to the end of the file, into one prompt. A record
    that fails strict reading within its own line is sloppy but clear (`"a" b,1`), and is read as
    csv reads it by default; one that runs on over lines is dropped, its first line alone, and
    reading starts again on the next line, so the rows the quote swallowed come back."""
    start = 0
    while start < len(lines):
        reader = csv.reader(_from(lines, start), strict=True)
        while True:
            first = start + reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield _loose(lines, first, e)
                start = first
                break
            yield first, record, None


def _from(lines: list[str], start: int):
    return (lines[i] for i in range(start, len(lines)))


def _loose(lines: list[str], first: int, strict_error: csv.Error) -> tuple:
    """The record at line `first` as csv reads it by default, if it stays on its own line."""
    if "unexpected end of data" in str(strict_error):
        return first, None, "a quote opened on this line is never closed"
    reader = csv.reader(_from(lines, first - 1))
    try:
        record = next(reader)
    except csv.Error as e:
        return first, None, f"not readable as CSV ({e})"
    if reader.line_num == 1:
        return first, record, None
    return first, None, f"a quote opened on this line runs on over the next lines and closes badly (csv: {strict_error})"



# ---------------------------------------------------------------------------------------------
# Columns and cells

def _column_picker(path, header: list[str], prompt_column: str | None) -> dict:
    """{field: column index or None} for the prompt and the optional columns."""
    columns = {h.strip().lower(): i for i, h in reversed(list(enumerate(header)))}
    wanted = [prompt_column.strip().lower()] if prompt_column is not None else list(PROMPT_COLUMNS)
    found = next((columns[name] for name in wanted if name in columns), None)
    if found is None:
        names = ", ".join(repr(h) for h in header[:20]) + (f", ... of {len(header)} columns" if len(header) > 20 else "")
        accepted = f"--prompt-column {prompt_column!r}" if prompt_column else \
            f"one of {', '.join(repr(c) for c in PROMPT_COLUMNS)}"
        raise PromptFileError(f"{path}: no prompt column; the header has {names or 'none'}, expected {accepted}")

    def first(names):
        return next((columns[n] for n in names if n in columns), None)

    return {"prompt": found, "seed": first(SEED_COLUMNS), "guidance": first(GUIDANCE_COLUMNS),
            "case": first(["case_number"]), "categories": first(["categories"]), "init_image": first(["init_image"]),
            "mask": first(["mask"]), "names": header}


def _row(index: int, record: list[str], take: dict) -> PromptRow:
    """The row's PromptRow; raises RowError."""
    names = take["names"]
    extra = [cell for cell in record[len(names):] if cell.strip()]
    if extra:
        raise RowError(f"{len(record)} cells where the header has {len(names)} (a prompt with commas must be in "
                       "double quotes)")

    def cell(field):
        i = take[field]
        return None if i is None or i >= len(record) or not record[i].strip() else _text(record[i].strip(), field)

    prompt = _text(record[take["prompt"]], "the prompt") if take["prompt"] < len(record) else ""
    if not prompt.strip():
        raise RowError("the prompt is empty")
    if "\0" in prompt:
        raise RowError("the prompt holds a NUL character")
    seed, guidance, case = cell("seed"), cell("guidance"), cell("case")
    image, mask = (_image(cell(column), column, take["folder"]) for column in ("init_image", "mask"))
    if mask is not None and image is None:
        raise RowError("a mask without an init_image to repaint")
    return PromptRow(
        index=index,
        case=index if case is None else _integer(case, names[take["case"]], 0, 2**63),
        prompt=prompt,
        seed=None if seed is None else _integer(seed, names[take["seed"]], 0, 2**64),
        guidance=None if guidance is None else _number(guidance, names[take["guidance"]]),
        categories=cell("categories"),
        init_image=image,
        mask=mask,
    )


def _image(text: str | None, column: str, folder: Path) -> Path | None:
    """An image cell: a path relative to the CSV's folder (or absolute), which must be a file."""
    if text is None:
        return None
    path = folder / Path(text).expanduser()
    if not path.is_file():
        why = "not a file (a folder, a pipe or a device)" if path.exists() else "no such file"
        raise RowError(f"{column} {text!r}: {why}" + ("" if Path(text).is_absolute() else f" in {folder}"))
    return path


def _text(text: str, what: str) -> str:
    """`text`, unless it holds bytes that were not text in the file's encoding (lone surrogates, from _lines)."""
    bad = next((c for c in text if "\udc00" <= c <= "\udcff"), None)
    if bad is not None:
        raise RowError(f"{what} holds a byte that is not text in the file's encoding (0x{ord(bad) - 0xdc00:02x}); "
                       "save the file as UTF-8")
    return text


def _integer(text: str, column: str, low: int, high: int) -> int:
    """An integer cell; "42.0" counts (a column with gaps, written by pandas, holds floats)."""
    try:
        value = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            f = math.nan
        if not f.is_integer():
            raise RowError(f"{column} {text!r} is not a whole number") from None
        value = int(f)
    if not low <= value < high:
        raise RowError(f"{column} {value} is out of range, {low} to {high - 1}")
    return value


def _number(text: str, column: str) -> float:
    """A CFG scale cell: a number from 0 to MAX_GUIDANCE."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise RowError(f"{column} {text!r} is not a number of 0 or more")
    if value > MAX_GUIDANCE:
        raise RowError(f"{column} {text!r} is over {MAX_GUIDANCE}, past any CFG scale a model is sampled with")
    return value
