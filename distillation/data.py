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
says ok and whose shard exists. A prompt whose teacher failed on some query is recorded as failed, and
retried on a re-run; until then, the queries that were answered are data.
"""
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save

from checkpoint.tensors import CheckpointError, read_safetensors
from evaluation.run_folder import append_record, read_records, settings_difference
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: no {SETTINGS_FILE}; collect data into it first with distill.py collect") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable ({e}); collect into a new folder") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise DataError(f"{path}: holds no settings; collect into a new folder")
    return data


def add_prompt(out: Path, record: dict, tensors: dict[str, torch.Tensor] | None) -> dict:
    """Writes one prompt's query tensors (x0, x_t [N, C, h, w], t [N]; None when it has none) to a
    shard of its own, then appends its record, naming the shard; returns the record. Each attempt at
    a prompt has its own shard, so a record never names tensors another attempt wrote."""
    if tensors is not None:
        attempt = sum(r["key"] == record["key"] for r in read_records(out / RECORDS_FILE))
        record = {**record, "shard": f"{SHARDS}/{record['key']}.{attempt}.safetensors"}
        write_atomic(out / record["shard"], save({k: v.contiguous() for k, v in tensors.items()}))
    append_record(out / RECORDS_FILE, record)
    return record


def latest_records(folder: Path) -> list[dict]:
    """One record per prompt: its latest ok record, else its latest failed one, of those whose shard
    is there."""
    best = {}
    for r in read_records(Path(folder) / RECORDS_FILE):
        if r.get("shard") and (Path(folder) / r["shard"]).is_file():
            if r["key"] not in best or r.get("status") == "ok" or best[r["key"]].get("status") != "ok":
                best[r["key"]] = r
    return list(best.values())


def done_keys(folder: Path) -> set[str]:
    return {r["key"] for r in latest_records(folder) if r.get("status") == "ok"}


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


def read_examples(folder: Path, concepts: list[str]) -> Examples:
    """Every answered query of the folder. A failed query (an error, a timeout, a refusal) is no
    verdict, so it is left out, never read as "nothing seen". Raises DataError."""
    x0, t, labels, prompts, images, failed = [], [], [], [], set(), 0
    for record in latest_records(folder):
        answered = [e for e in record["examples"] if e["error"] is None]
        failed += len(record["examples"]) - len(answered)
        if not answered:
            continue
        try:
            shard = read_safetensors(Path(folder) / record["shard"])
        except CheckpointError as e:
            raise DataError(str(e)) from None
        rows = torch.tensor([e["index"] for e in answered])
        check_finite(shard, rows, Path(folder) / record["shard"])
        x0.append(shard["x0"][rows])
        t.append(shard["t"][rows])
        labels += [[float(c in e["concepts"]) for c in concepts] for e in answered]
        prompts += [record["prompt"]] * len(answered)
        images |= {(record["key"], e["image"]) for e in answered}
    if not prompts:
        raise DataError(f"{folder}: no answered query to learn from" + (f" ({failed} failed)" if failed else "")
                        + "; collect more with distill.py collect")
    return Examples(torch.cat(x0), torch.cat(t), torch.tensor(labels), prompts, len(images), failed)


def check_finite(shard: dict[str, torch.Tensor], rows: torch.Tensor, path: Path):
    """A DataError naming the shard when the x0, x_t or t of an answered query (`rows`) holds NaN or inf:
    a network fitted to it scores NaN, which would read as "nothing found"."""
    for name in ("x0", "x_t", "t"):
        if name in shard and not torch.isfinite(shard[name][rows]).all():
            raise DataError(f"{path}: its {name} holds NaN or inf where the teacher answered; collect into a new "
                            "folder")
