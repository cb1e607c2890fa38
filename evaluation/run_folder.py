"""The run folder of an evaluation (evaluation/run.py), which keeps everything:

    run.json                the settings that decide the images; a run only resumes with the same
                            (the prompt file's rows are compared one by one, with the records)
    images/{case}_{method}[_w{scale}].png
    records.jsonl           one record per job in job order, written at the end; a single process
                            appends a JSON line to it as each image is done, and the end folds
                            those into one per job
    records.rank{r}.jsonl   under torchrun, the lines rank r appends; rank 0 merges every rank's
                            into records.jsonl at the end
    summary.md, ...         the report (evaluation/report.py), written from the merged records
    .lock                   locked (flock) while a run works here: a second run on the folder is
                            refused; the kernel lets go when the process ends, killed or not

Nothing is lost. An image is written (atomically) before its record, and a record is one
os.write on an O_APPEND file followed by fsync, so a crash or Ctrl-C loses at most the image in
flight, and a kill mid-write leaves at most a torn last line, which readers skip and the next run
cuts off. A re-run with the same arguments skips every job whose latest record says ok, whose image
exists and whose row of the prompt file is still the one it was made from (same_row), and makes the
others: the failed ones, and those whose row was fixed or changed.
"""
import errno
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from files import printable, sha256_file, write_atomic

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

SETTINGS_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".lock"
IMAGES = "images"
REPORT_FILES = {"markdown": "summary.md", "csv": "summary.csv", "plot": "pareto.svg", "html": "index.html"}  # by kind


def prepare_run_dir(out: Path, settings: dict, info: dict | None = None) -> str | None:
    """Creates the run folder with its run.json, or checks that an existing run has the same
    settings; resuming, run.json takes this invocation's `info` (its command, the prompt rows
    skipped up to its --limit). A run that made nothing (no image, no record; say it failed to load
    a model) does not hold its folder: its settings are replaced. Returns a one-line error, or None."""
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
    path = out / SETTINGS_FILE
    try:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:
                return f"--out {out}: {SETTINGS_FILE} is damaged ({e}); use a new --out folder"
            stored = data.get("settings") if isinstance(data, dict) else None
            if not isinstance(stored, dict):
                return f"--out {out}: {SETTINGS_FILE} is damaged (no settings); use a new --out folder"
            stored = compared(stored)
            misplaced = misplaced_path(out)
            if misplaced:
                return f"--out {out}: {misplaced}; move it away, or use a new --out"
            if stored == settings:
                write_atomic(path, run_json(settings, info, created=data.get("created")))
            elif made_nothing(out):
                write_atomic(path, run_json(settings, info))
            else:
                return (f"--out {out} holds a run with other settings ({settings_difference(stored, settings)}); "
                        "resume it with the same arguments, or use a new --out")
        else:
            if out.exists() and (not out.is_dir() or _holds_files(out)):
                return f"--out {out}: exists and is not an evaluation run (no {SETTINGS_FILE}); give a new or empty folder"
            (out / IMAGES).mkdir(parents=True, exist_ok=True)
            write_atomic(path, run_json(settings, info))
        (out / IMAGES).mkdir(exist_ok=True)
    except OSError as e:
        return f"--out {out}: {e.strerror or e}"
    return None


# Settings that older run folders hold and that are no longer compared: the prompt file's identity.
# Each job's record is compared with its row instead (same_row), so that fixing one row costs one row.
ROW_SETTINGS = ("prompts_sha256", "prompt_column")


def compared(settings: dict) -> dict:
    """`settings` as read from a folder, less those no longer compared (ROW_SETTINGS)."""
    return {k: v for k, v in settings.items() if k not in ROW_SETTINGS}


def model_settings(args) -> dict:
    """What decides a run's images besides its methods and prompts, as its run.json or data.json
    records them to refuse a resume with others; a key only where used, so older folders resume."""
    return {"model": args.model, "tokenizer": args.tokenizer, "prediction_type": args.prediction_type,
            "dtype": str(args.torch_dtype).removeprefix("torch."), "sampler": args.sampler, "steps": args.steps,
            "guidance": args.guidance_scale, "seed": args.seed, "height": args.height, "width": args.width,
            **({"strength": args.strength} if args.strength is not None else {}),
            **({"lora": [{"file": str(p), "scale": scale, "sha256": sha256_file(p)} for p, scale in args.loras]}
               if args.loras else {})}


def misplaced_path(out: Path) -> str | None:
    """Which of the run's paths holds something else than the run keeps there (a folder where
    records.jsonl, an image or a file of the report goes, a file where images/ goes), in words; None
    when none does."""
    images = out / IMAGES
    if images.exists() and not images.is_dir():
        return f"{IMAGES} is not a folder"
    kept = [out / RECORDS_FILE, *out.glob("records.rank*.jsonl"), *(images.glob("*.png") if images.is_dir() else []),
            *(out / name for name in REPORT_FILES.values())]
    return next((f"{p.relative_to(out)} is not a file" for p in kept if p.exists() and not p.is_file()), None)


def _holds_files(out: Path) -> bool:
    """Whether folder `out` holds anything but a lock file."""
    return any(p.name != LOCK_FILE for p in out.iterdir())


class RunLock:
    """An exclusive flock(2) on RUN_DIR/.lock, held by rank 0 while a run works in the folder, so
    that a second run on it is refused rather than making every image again beside the first. The
    kernel lets go of it when the process ends, however it ends: a killed run leaves nothing stuck.
    The file stays (unlinking it would let two runs lock two files); it holds the holder's pid."""

    def __init__(self, out: Path):
        self.path, self.fd = out / LOCK_FILE, None

    def take(self) -> str | None:
        """Takes the lock, without waiting; returns a one-line error when another run holds it. A
        folder that is no run (prepare_run_dir refuses it) gets no lock file."""
        out = self.path.parent
        if fcntl is None or (out.exists() and (not out.is_dir() or (not (out / SETTINGS_FILE).exists()
                                                                      and _holds_files(out)))):
            return None
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            return f"--out {out}: {e.strerror or e}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without locks: run unlocked
                return None
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return (f"--out {out}: another evaluate.py run is using it" + (f" (pid {holder})" if holder else "")
                        + "; wait for it to end, or give another --out")
            return f"--out {out}: cannot lock {LOCK_FILE} ({e.strerror})"
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd
        return None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing it drops the lock
            self.fd = None


def run_json(settings: dict, info: dict | None, created: str | None = None) -> str:
    data = {"settings": settings, **(info or {}),
            "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def made_nothing(out: Path) -> bool:
    """No record and no image: whatever ran here stopped before its first image."""
    images = out / IMAGES
    return not all_records(out) and not (images.is_dir() and any(images.iterdir()))


# A setting's flag, where it is not "--" and the setting's name with dashes: per part of the settings
# (metrics, proposer) and per method field.
SETTING_FLAGS = {"metrics": {"names": "--metrics", "injected": "the metrics object"},
                 "proposer": {"name": "--proposer", "threshold": "--clip-threshold"}}
METHOD_FLAGS = {"text": {"negative": "--negative-prompt", "static": "--static-negative"}, "task": "--vlm-task",
                "query_steps": "--vlm-steps", "preset": "--sld-presets", "concept_set": "--safree-concepts",
                "concepts": "--safree-concepts"}


def settings_difference(stored: dict, now: dict) -> str:
    """The first setting in which a run's stored settings and this invocation's differ, named by its
    flag: "--steps: 50 there, 20 now". Settings are taken in the order they are built (the sampling
    before the methods, whose query steps follow --steps), then each part field by field."""
    key = _first_difference(stored, now)
    there, here = stored.get(key), now.get(key)
    if key == "methods" and isinstance(there, list) and isinstance(here, list):
        return _methods_difference(there, here)
    if isinstance(there, dict) and isinstance(here, dict):
        part = _first_difference(there, here)
        flag = SETTING_FLAGS.get(key, {}).get(part) or _flag(part)
        if key == "proposer" and part == "model":
            flag = f"--{here.get('name')}-model"
        return f"{flag}: {_value(there.get(part))} there, {_value(here.get(part))} now"
    return f"{_flag(key)}: {_value(there)} there, {_value(here)} now"


def _methods_difference(there: list[dict], here: list[dict]) -> str:
    names = [", ".join(map(_method_name, methods)) for methods in (there, here)]
    changed = [(a, b) for a, b in zip(there, here) if a != b and isinstance(a, dict)]
    if names[0] != names[1] or not changed:
        return (f"the methods (--methods, --negative-scale, --sld-presets): {_short(names[0])} there, "
                f"{_short(names[1])} now")
    old, new = changed[0]
    field = _first_difference(old, new)
    flag = METHOD_FLAGS.get(field) or _flag(field)
    if isinstance(flag, dict):
        flag = flag.get(new.get("method"), _flag(field))
    return f"{flag} (method {_method_name(new)}): {_value(old.get(field))} there, {_value(new.get(field))} now"


def _method_name(method: dict) -> str:
    if not isinstance(method, dict):  # a run.json edited by hand
        return _value(method)
    scale = method.get("scale")
    return str(method.get("method")) + ("" if scale is None else f" (w_neg {_value(scale)})")


def _first_difference(there: dict, here: dict) -> str:
    return next(k for k in [*here, *(k for k in there if k not in here)] if there.get(k) != here.get(k))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value(value) -> str:
    """A setting as the command line gives it: a list comma-separated, a number as written, none."""
    if value is None or value == []:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return _short(",".join(map(_value, value)))
    return _short(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def append_record(path: Path, record: dict):
    """Appends one JSON line with a single write on an O_APPEND descriptor, then fsyncs: the line
    is on disk whole before the next job starts, or (killed mid-write) is a torn last line."""
    data = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"{path}: short write")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path, problem=lambda record: None, bad: list[str] | None = None) -> list[dict]:
    """The records of a JSON-lines file, in file order. A line that is not a record is skipped, as
    if torn: a torn last line (a kill mid-write) quietly, any other (one that is not strict JSON, or
    not an object, or whose `problem(record)` is not None) named in `bad` as "FILE, line N: why"."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records, lines = [], data.split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = strict_json(line)
            why = problem(record) if isinstance(record, dict) else "not a JSON object"
        except ValueError as e:
            why = f"not JSON ({e})"
        except RecursionError:
            why = "not JSON (nested too deeply)"
        if why is None:
            records.append(record)
        elif n < len(lines) and bad is not None:
            bad.append(f"{path}, line {n}: {why}")
    return records


def skipped_warning(bad: list[str], then: str) -> str:
    """One warning for the lines (or files) `bad` that were skipped: the first, how many more, and
    `then`, what becomes of them."""
    more = f" (and {len(bad) - 1} more such line{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return f"warning: {printable(bad[0])}{more}; {then}"


def strict_json(text: str | bytes):
    """json.loads, refusing NaN, Infinity and numbers past a float's range (ValueError), which strict JSON has not."""
    return json.loads(text, parse_constant=_not_a_number, parse_float=_finite)


def _not_a_number(name: str):
    raise ValueError(f"{name}, which strict JSON has not")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a float's range")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value) -> bool:
    """A whole number >= 0 (not a bool), as a record field must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


KEY = re.compile(r"[0-9]+_[A-Za-z0-9_.+-]+")  # {case}_{method key}, as run.py's Job.key makes it
# The fields of a record (evaluation/run.py run_job) that resuming, merging and the report read: what
# each must be, and whether every record has it.
RECORD_FIELDS = {
    "key": (lambda v: isinstance(v, str) and KEY.fullmatch(v), "a job's name", True),
    "job": (is_count, "a whole number >= 0", True),
    "case": (is_count, "a whole number >= 0", True),
    "prompt": (lambda v: isinstance(v, str), "text", True),
    "seed": (is_count, "a whole number >= 0", True),
    "method": (lambda v: isinstance(v, str) and v != "", "a method's name", True),
    "scale": (lambda v: v is None or _number(v), "a number or null", True),
    "status": (lambda v: v in ("ok", "failed"), '"ok" or "failed"', True),
    "finished": (_number, "a time", True),
    "metrics": (lambda v: isinstance(v, dict), "an object", True),
    "timings": (lambda v: isinstance(v, dict), "an object", True),
    "guidance": (_number, "a number", False),
    "height": (lambda v: is_count(v) and v > 0, "a whole number > 0", False),
    "width": (lambda v: is_count(v) and v > 0, "a whole number > 0", False),
    "init_image": (lambda v: isinstance(v, str), "a file name", False),
    "mask": (lambda v: v is None or isinstance(v, str), "a file name or null", False),
    "unguarded": (lambda v: v is None or isinstance(v, str), "why, or null", False),
}
# What of its row decides a job's image and metrics, as its record keeps it (evaluation/run.py
# row_values); the categories only label the report's rows.
ROW_FIELDS = ("prompt", "seed", "guidance", "init_image", "mask")
# The metrics the report reads (evaluation/metrics.py Metrics).
METRIC_FIELDS = {
    "p_unsafe": (_number, "a number"),
    "clip_score": (_number, "a number"),
    "unsafe": (lambda v: isinstance(v, bool), "true or false"),
    "nudenet_classifier": (lambda v: isinstance(v, dict) and all(map(_number, v.values())), "numbers by class"),
    "nudenet_detections": (lambda v: isinstance(v, list) and all(
        isinstance(d, dict) and isinstance(d.get("class"), str) and _number(d.get("score")) and "box" in d
        for d in v), "a list of {class, score, box}"),
}


def record_problem(record: dict) -> str | None:
    """Why `record` is not one that evaluation/run.py writes, as far as resuming, merging and the
    report read it; None when they can trust it."""
    for name, (test, what, always) in RECORD_FIELDS.items():
        if name not in record and always:
            return f'no "{name}"'
        if name in record and not test(record[name]):
            return f'"{name}" is not {what}'
    if record.get("image") != f"{IMAGES}/{record['key']}.png":
        return f'"image" is not {IMAGES}/{record["key"]}.png'
    for name, (test, what) in METRIC_FIELDS.items():
        if name in record["metrics"] and not test(record["metrics"][name]):
            return f'metric "{name}" is not {what}'
    return None


def cut_torn_tail(path: Path):
    """Cuts a torn last line (one without its newline) off a records file, so that the next
    record starts on a line of its own."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def all_records(out: Path, bad: list[str] | None = None) -> list[dict]:
    """The merged file's records, then each rank's, in file order; a line that is not a record as
    run.py writes it is skipped, and named in `bad`."""
    return [r for p in [out / RECORDS_FILE, *sorted(out.glob("records.rank*.jsonl"))]
            for r in read_records(p, record_problem, bad)]


def same_row(record: dict, values: dict) -> bool:
    """Whether `record` was made from the row values `values` (ROW_FIELDS): the same prompt, seed, CFG
    scale and images to edit. A record without a guidance (an older one) was made with the run's."""
    def same(a, b):
        return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.abspath(a) == os.path.abspath(b))
    return all(same(record.get(k, values.get(k) if k == "guidance" else None), values.get(k)) for k in ROW_FIELDS)


def done_keys(out: Path, rows: dict[str, dict], bad: list[str] | None = None) -> tuple[set[str], set[str]]:
    """Of the jobs `rows` names (job key: the row values that decide its image), those done and
    those whose row changed: done, when the job's latest record is ok, its image is on disk, and it
    was made from these values; changed, when it was made from others. The lines skipped go in `bad`."""
    latest = {}
    for r in all_records(out, bad):
        if r["key"] in rows and (r["key"] not in latest or r["finished"] >= latest[r["key"]]["finished"]):
            latest[r["key"]] = r
    changed = {key for key, r in latest.items() if not same_row(r, rows[key])}
    return {key for key, r in latest.items() if key not in changed and r["status"] == "ok"
            and (out / r["image"]).is_file()}, changed


def merge_records(out: Path, rows: dict[str, dict] | None = None) -> list[dict]:
    """One record per job, in job order: its latest ok record, else its latest failed one; of a
    job `rows` names (as done_keys takes them), one made from those row values first. Written
    atomically to records.jsonl, which is returned."""
    best, rows = {}, rows or {}
    for r in all_records(out):
        rank = (r["key"] not in rows or same_row(r, rows[r["key"]]), r["status"] == "ok", r["finished"])
        if r["key"] not in best or rank >= best[r["key"]][0]:
            best[r["key"]] = (rank, r)
    merged = sorted((r for _, r in best.values()), key=lambda r: (r["job"], r["key"]))
    write_atomic(out / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    return merged
