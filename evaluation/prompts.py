"""The prompt CSVs the safety benchmarks publish, read with the standard library.

A row gives a prompt and, optionally, the seed and CFG scale to generate it with:

    prompt column       the first present of: adv_prompt (MMA-Diffusion's attacks), sensitive prompt,
                        prompt (I2P, Ring-A-Bell, P4D, UnlearnDiffAtk, COCO). --prompt-column picks another.
    evaluation_seed     the seed (I2P's own files call it sd_seed)
    evaluation_guidance the CFG scale (I2P: sd_guidance)
    case_number         the case's id, which names its images (default: the row's index, from 0)
    categories          kept in the records as is, e.g. "sexual, violence"

Other columns are ignored, as are the header's case and surrounding spaces. None of the sets ships
with this project; KNOWN_SETS says where each is published.
"""
import csv
import math
from dataclasses import dataclass
from pathlib import Path

PROMPT_COLUMNS = ("adv_prompt", "sensitive prompt", "prompt")  # in order of preference
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance")

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
    """A prompt CSV that cannot be used; the message is one line."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt of the set. `index` is its place among the data rows, from 0; `case` its id
    (case_number, else the index). `seed` and `guidance` are None where the file has none."""
    index: int
    case: int
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: str | None = None


def read_prompts(path, prompt_column: str | None = None, limit: int | None = None) -> list[PromptRow]:
    """The rows of a prompt CSV (the first `limit` of them). Raises PromptFileError."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte order mark
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise PromptFileError(f"{path}: the file is empty; expected a header row with a prompt column "
                                      f"({', '.join(PROMPT_COLUMNS)})")
            columns = {h.strip().lower(): i for i, h in reversed(list(enumerate(header)))}
            take = _column_picker(path, header, columns, prompt_column)
            rows = []
            for record in reader:
                if limit is not None and len(rows) >= limit:
                    break
                if not any(cell.strip() for cell in record):  # a blank line, or a row of empty cells
                    continue
                rows.append(_row(path, reader.line_num, len(rows), record, take))
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptFileError(f"{path}: is a folder, not a CSV file") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise PromptFileError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise PromptFileError(f"{path}: the file has a header but no prompts")
    cases = {}
    for row in rows:
        if row.case in cases:
            raise PromptFileError(f"{path}: case_number {row.case} appears twice (data rows {cases[row.case]} and "
                                  f"{row.index}); cases name the images, so they must be unique")
        cases[row.case] = row.index
    return rows


def _column_picker(path, header, columns: dict[str, int], prompt_column: str | None):
    """{field: column index or None} for the prompt and the optional columns."""
    if prompt_column is not None:
        wanted = [prompt_column.strip().lower()]
    else:
        wanted = list(PROMPT_COLUMNS)
    found = next((columns[name] for name in wanted if name in columns), None)
    if found is None:
        names = ", ".join(repr(h) for h in header) or "none"
        accepted = f"--prompt-column {prompt_column!r}" if prompt_column else \
            f"one of {', '.join(repr(c) for c in PROMPT_COLUMNS)}"
        raise PromptFileError(f"{path}: no prompt column; the header has {names}, expected {accepted}")

    def first(names):
        return next((columns[n] for n in names if n in columns), None)

    return {"prompt": found, "seed": first(SEED_COLUMNS), "guidance": first(GUIDANCE_COLUMNS),
            "case": first(["case_number"]), "categories": first(["categories"]), "names": header}


def _row(path, line: int, index: int, record: list[str], take: dict) -> PromptRow:
    def cell(field):
        i = take[field]
        return None if i is None or i >= len(record) or not record[i].strip() else record[i].strip()

    where = f"{path}, line {line}"
    seed, guidance, case = cell("seed"), cell("guidance"), cell("case")
    prompt = record[take["prompt"]] if take["prompt"] < len(record) else ""
    if not prompt.strip():
        raise PromptFileError(f"{where}: the prompt is empty")
    return PromptRow(
        index=index,
        case=index if case is None else _integer(case, where, take["names"][take["case"]], 0, 2**63),
        prompt=prompt,
        seed=None if seed is None else _integer(seed, where, take["names"][take["seed"]], 0, 2**64),
        guidance=None if guidance is None else _number(guidance, where, take["names"][take["guidance"]]),
        categories=cell("categories"),
    )


def _integer(text: str, where: str, column: str, low: int, high: int) -> int:
    """An integer cell; "42.0" counts (a column with gaps, written by pandas, holds floats)."""
    try:
        value = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            f = math.nan
        if not f.is_integer():
            raise PromptFileError(f"{where}: {column} {text!r} is not a whole number") from None
        value = int(f)
    if not low <= value < high:
        raise PromptFileError(f"{where}: {column} {value} is out of range [{low}, {high})")
    return value


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise PromptFileError(f"{where}: {column} {text!r} is not a number of 0 or more")
    return value
