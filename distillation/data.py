"""The data folder distill.py collect writes and distill.py train reads:

    data.json                   the settings that decide the data (a folder resumes only with the same),
                                the task's concepts, and the model's latent space once it has loaded
    records.jsonl               one JSON line per prompt done: each of its images' queries, with the
                                teacher's verdict (the task's concepts it found, its raw answer, its error)
                                and where the query's tensors are in the prompt's shard
    shards/{case}.{n}.safetensors  per prompt, attempt n: x0 and x_t [N, C, h, w] as the sampler made them
                                (in the model's dtype), and the timestep t [N], one row per query

A shard is written (atomically) before its record, and a record is appended whole (evaluation/run_folder.py's
append_record), so a kill loses at most the prompt in flight; a re-run skips every prompt whose record
says ok, whose shard exists and whose row of the prompt file still gives the prompt, seed and CFG
scale it was made with (evaluation/run_folder.py same_row); a changed row is made again. A prompt
whose teacher failed on some query is recorded as failed, and retried on a re-run; until then, the
queries that were answered are data.
"""
import itertools
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save

from checkpoint.tensors import CheckpointError, read_safetensors
from evaluation.run_folder import append_record, compared, is_count, read_records, same_row, settings_difference, \
    strict_json
from files import write_atomic, write_json

SETTINGS_FILE = "data.json"
RECORDS_FILE = "records.jsonl"
SHARDS = "shards"


class DataError(ValueError):
    """A data folder that cannot be used; the message is one line."""


def prepare_data_dir(out: Path, settings: dict, info: dict) -> dict:
    """Creates the data folder with its data.json, or checks that the folder's data were made with
    the same `settings` (then data.json takes this run's `info`). Returns the info written (with when
    the folder was created). Raises DataError."""
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
    path = out / SETTINGS_FILE
    try:
        if path.is_file():
            stored = read_settings(out)
            stored["settings"] = compared(stored["settings"])  # an older folder's prompt file's sha256
            if stored["settings"] != settings:
                raise DataError(f"--out {out} holds data made with other settings "
                                f"({settings_difference(stored['settings'], settings)}); resume it with the same "
                                "arguments, or use a new --out")
            info = {**stored, **info}
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DataError(f"--out {out}: exists and holds no collected data (no {SETTINGS_FILE}); give a new or "
                            "empty folder")
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        return write_settings(out, settings, info)
    except OSError as e:
        raise DataError(f"--out {out}: {e.strerror or e}") from None


def write_settings(out: Path, settings: dict, info: dict) -> dict:
    """Writes data.json: `settings` and `info`; returns the info written."""
    info = {**info, "created": info.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    info.pop("settings", None)
    write_json(out / SETTINGS_FILE, {**info, "settings": settings})
    return info


def read_settings(folder: Path) -> dict:
    path = Path(folder) / SETTINGS_FILE
    try:
        data = strict_json(path.read_text(encoding="utf-8"))  # the card, strict JSON, copies its settings
    except FileNotFoundError:
        raise DataError(f"{folder}: no {SETTINGS_FILE}; collect data into it first with distill.py collect") from None
    except (ValueError, OSError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise DataError(f"{path}: unreadable ({why}); collect into a new folder") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise DataError(f"{path}: holds no settings; collect into a new folder")
    return data


def add_prompt(out: Path, record: dict, tensors: dict[str, torch.Tensor] | None) -> dict:
    """Writes one prompt's query tensors (x0, x_t [N, C, h, w], t [N]; None when it has none) to a
    shard of its own, then appends its record, naming the shard; returns the record. Each attempt at
    a prompt has its own shard, numbered with the first number no file has (reading the records for it,
    once per prompt, made a collection quadratic), so a record never names tensors another attempt wrote."""
    if tensors is not None:
        shard = lambda n: f"{SHARDS}/{record['key']}.{n}.safetensors"
        record = {**record, "shard": shard(next(n for n in itertools.count() if not (out / shard(n)).exists()))}
        write_atomic(out / record["shard"], save({k: v.contiguous() for k, v in tensors.items()}))
    append_record(out / RECORDS_FILE, record)
    return record


def latest_records(folder: Path, bad: list[str] | None = None) -> list[dict]:
    """One record per prompt: its latest ok record, else its latest failed one, of those whose shard
    is there. A line that is not a record as collect writes it is skipped, and named in `bad`."""
    best = {}
    for r in read_records(Path(folder) / RECORDS_FILE, record_problem, bad):
        if r.get("shard") and (Path(folder) / r["shard"]).is_file():
            if r["key"] not in best or r.get("status") == "ok" or best[r["key"]].get("status") != "ok":
                best[r["key"]] = r
    return list(best.values())


def done_keys(folder: Path, rows: dict[str, dict], bad: list[str] | None = None) -> tuple[set[str], set[str]]:
    """Of the prompts `rows` names (key: the row values that decide its data, evaluation/run.py
    row_values), those done, whose latest record is ok and made from these values, and those whose
    row changed since."""
    latest = {r["key"]: r for r in latest_records(folder, bad) if r["key"] in rows}
    changed = {key for key, r in latest.items() if not same_row(r, rows[key])}
    return {key for key, r in latest.items() if r["status"] == "ok" and key not in changed}, changed


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


# A record's fields (distillation/collect.py collect_prompt) that resuming and training read, and what
# each must be; and each of its examples'.
RECORD_FIELDS = {
    "key": (lambda v: isinstance(v, str) and v.isdigit(), "a case number"),
    "prompt": (lambda v: isinstance(v, str), "text"),
    "status": (lambda v: v in ("ok", "failed"), '"ok" or "failed"'),
    "examples": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of objects"),
}
EXAMPLE_FIELDS = {
    "index": (is_count, "a whole number >= 0"),
    "image": (is_count, "a whole number >= 0"),
    "error": (lambda v: v is None or isinstance(v, str), "text or null"),
    "concepts": (_names, "a list of names"),
}


def record_problem(record: dict) -> str | None:
    """Why `record` is not one that collect writes, as far as resuming and training read it; None
    when they can trust it."""
    for name, (test, what) in RECORD_FIELDS.items():
        if name not in record or not test(record[name]):
            return f'"{name}" is not {what}'
    shard = record.get("shard")
    if shard is not None and not (isinstance(shard, str)
                                  and re.fullmatch(rf"{SHARDS}/{record['key']}\.[0-9]+\.safetensors", shard)):
        return f'"shard" is not {SHARDS}/{record["key"]}.N.safetensors'
    for n, example in enumerate(record["examples"]):
        for name, (test, what) in EXAMPLE_FIELDS.items():
            if name not in example or not test(example[name]):
                return f'example {n}\'s "{name}" is not {what}'
    return None


def shard_problem(shard: dict[str, torch.Tensor], rows: list[int], channels: int | None, size=None) -> str | None:
    """Why a shard cannot give the x0 [N, C, h, w] and t [N] of the examples at `rows`: a tensor
    missing, of another shape or dtype (`channels` C, `size` the [C, h, w] of the shards before; x_t x0's shape),
    a row past its end, a timestep outside SD's [0, 1000]. None when it can."""
    x0, t = shard.get("x0"), shard.get("t")
    if x0 is None or t is None:
        return f"no {'x0' if x0 is None else 't'} tensor"
    if not x0.is_floating_point() or not t.is_floating_point():
        return f"x0 of dtype {str(x0.dtype).removeprefix('torch.')}, t of {str(t.dtype).removeprefix('torch.')}, " \
               "and both must be floating point"
    if x0.ndim != 4 or (channels is not None and x0.shape[1] != channels):
        return f"x0 of shape {list(x0.shape)}, not [N, {channels or 'C'}, h, w]"
    if size is not None and x0.shape[1:] != size:
        return f"x0 of shape {list(x0.shape)}, where the shards before have [N, {', '.join(map(str, size))}]"
    if t.shape != x0.shape[:1]:
        return f"t of shape {list(t.shape)}, not [{len(x0)}]"
    if rows and max(rows) >= len(x0):
        return f"no row {max(rows)} of x0 (it has {len(x0)})"
    if "x_t" in shard and shard["x_t"].shape != x0.shape:
        return f"x_t of shape {list(shard['x_t'].shape)}, not {list(x0.shape)}"
    if not bool(((t[rows] >= 0) & (t[rows] <= 1000)).all()):
        return "a timestep outside [0, 1000]"
    return None


def check_training_data(data: dict, path: Path):
    """Raises a one-line DataError unless data.json (`data`, read from `path`) holds what training
    reads: the task's concepts, the latent space collect found, and the settings the card copies."""
    problem = _training_data_problem(data)
    if problem:
        raise DataError(f"{path}: {problem}; collect data into a new folder with distill.py collect")


def _training_data_problem(data: dict) -> str | None:
    concepts, space, settings = data.get("concepts"), data.get("latent_space"), data["settings"]
    if not _names(concepts) or not concepts or len(set(concepts)) != len(concepts):
        return "no concepts (a list of distinct names)"
    if space is None:
        return "no latent_space: its collection never loaded the model"
    scaling = space.get("scaling_factor") if isinstance(space, dict) else None
    if not (isinstance(space, dict) and isinstance(space.get("family"), str)
            and is_count(space.get("latent_channels")) and 0 < space["latent_channels"] <= 4096
            and isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and 0 < scaling < math.inf):
        return "a latent_space that is not {family, latent_channels, scaling_factor}"
    method = settings.get("method")
    if not (isinstance(method, dict) and isinstance(method.get("task"), str) and "proposer" in method
            and isinstance(method.get("query_steps"), list)):
        return "no settings.method {task, proposer, query_steps}"
    return next((f"no settings.{k}" for k in ("model", "sampler", "steps", "guidance", "height", "width")
                 if k not in settings), None)


@dataclass
class Examples:
    """The answered queries of a data folder, in record order: x0 [N, C, h, w] (the stored dtype),
    the timesteps t [N], the teacher's labels [N, n] over the task's concepts (1: found), and each
    example's prompt, by which training splits."""
    x0: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    prompts: list[str]
    images: int  # images with at least one answered query
    failed: int  # queries the teacher failed, left out


def read_examples(folder: Path, concepts: list[str], channels: int | None = None,
                  bad: list[str] | None = None) -> Examples:
    """Every answered query of the folder. A failed query (an error, a timeout, a refusal) is no
    verdict, so it is left out, never read as "nothing seen". A record or shard that is not as collect
    writes it (`channels` latent channels) is left out too, and named in `bad`. Raises DataError."""
    x0, t, labels, prompts, images, failed, bad = [], [], [], [], set(), 0, [] if bad is None else bad
    for record in latest_records(folder, bad):
        answered = [e for e in record["examples"] if e["error"] is None]
        failed += len(record["examples"]) - len(answered)
        if not answered:
            continue
        try:
            shard = read_safetensors(Path(folder) / record["shard"])
        except CheckpointError as e:
            raise DataError(str(e)) from None
        rows = [e["index"] for e in answered]
        problem = shard_problem(shard, rows, channels, x0[0].shape[1:] if x0 else None) or finite_problem(shard, rows)
        if problem:
            bad.append(f"{Path(folder) / record['shard']}: {problem}")
            continue
        rows = torch.tensor(rows)
        x0.append(shard["x0"][rows])
        t.append(shard["t"][rows])
        labels += [[float(c in e["concepts"]) for c in concepts] for e in answered]
        prompts += [record["prompt"]] * len(answered)
        images |= {(record["key"], e["image"]) for e in answered}
    if not prompts:
        raise DataError(f"{folder}: no answered query to learn from" + (f" ({failed} failed)" if failed else "")
                        + "; collect more with distill.py collect")
    return Examples(torch.cat(x0), torch.cat(t), torch.tensor(labels), prompts, len(images), failed)


def finite_problem(shard: dict[str, torch.Tensor], rows: list[int]) -> str | None:
    """Why the x0, x_t or t of the answered queries at `rows` cannot be learnt from: NaN or inf, which
    would make a network that scores NaN, read as "nothing found"; None when they are finite."""
    for name in ("x0", "x_t", "t"):
        if name in shard and not torch.isfinite(shard[name][rows]).all():
            return f"its {name} holds NaN or inf where the teacher answered"
    return None
