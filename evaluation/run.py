"""One evaluation run: every (prompt, method) pair is a job that makes one image, and the run
folder keeps everything:

    run.json                the settings that decide the images; a run only resumes with the same
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
cuts off. A re-run with the same arguments skips every job whose record says ok and whose image
exists, and retries the failed ones.

Many processes: `torchrun --nproc_per_node=N evaluate.py ...` starts N ranks (and more on other
nodes, with torchrun's rendezvous flags; the run folder must then be on a shared file system).
torch.distributed, gloo on CPU and NCCL on CUDA, only coordinates: rank 0 checks the run folder
and lists the jobs still to do; they are dealt round-robin, job i of that list to rank
i mod world_size; each rank writes its own records file; after a barrier, rank 0 merges the
files and writes the report. Rank r uses cuda:LOCAL_RANK.
"""
import errno
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import png
from evaluation.prompts import PromptRow
from files import write_atomic
from methods import Method
from png_reader import read_image
from sampler import edit
from sampler.loop import NonFiniteError, generate

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

SETTINGS_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".lock"
IMAGES = "images"
# Ranks wait for each other at the end, and a resumed run can leave one rank hours of work more
# than another; the default collective timeout (10 to 30 minutes) would kill the waiting ones.
DIST_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Sampling:
    """What every method shares: the sampler, its steps and the image size (None: the model's)."""
    steps: int = 50
    sampler: str = "dpm++2m"
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class Job:
    """Make `row`'s prompt with `method`. `index` orders the jobs (prompt-major) and does not
    depend on --limit, so records of a shorter and a longer run of the same set agree."""
    index: int
    row: PromptRow
    method: Method

    @property
    def key(self) -> str:
        return f"{self.row.case}_{self.method.key}"

    @property
    def image(self) -> str:
        return f"{IMAGES}/{self.key}.png"


def make_jobs(rows: list[PromptRow], methods: list[Method]) -> list[Job]:
    return [Job(row.index * len(methods) + m, row, method) for row in rows for m, method in enumerate(methods)]


@dataclass
class RunSpec:
    """Everything a run needs. The heavy parts load only on ranks with work, the small ones first, so
    that one that cannot load stops the run before the diffusion model is fetched: `make_metrics()`
    (None: no metrics), then what each method needs besides the model (Method.prepare: a VLM that
    answers, CLIP), then `load_pipe()`."""
    out: Path
    rows: list[PromptRow]
    methods: list[Method]
    settings: dict  # what decides the images and metrics; stored in run.json and compared on resume
    sampling: Sampling
    guidance_scale: float  # where the CSV gives none
    base_seed: int  # seed = base_seed + case where the CSV gives none
    model_name: str
    device: torch.device
    dtype: torch.dtype
    load_pipe: Callable
    make_metrics: Callable = lambda: None
    allow_vlm_failures: bool = False
    strength: float | None = None  # how much the rows with an init_image change it (None: generate()'s default)
    write_report: Callable | None = None  # (run_dir, records) -> {name: path}
    progress: bool = True
    info: dict = field(default_factory=dict)  # stored in run.json, not compared (the command, the file name)


class RunError(Exception):
    """A problem with the run folder or a service, found before any image is made: exit code 2.
    `quiet`: another rank reports it."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


# ---------------------------------------------------------------------------------------------
# The run

def execute(spec: RunSpec) -> int:
    """Runs (or resumes) the evaluation on this rank. Returns the exit status: 0 when every image
    is done, 1 when some failed (a re-run retries them). Raises RunError before the work starts."""
    group, lock = Group.start(spec.device), RunLock(spec.out)
    try:
        return _execute(spec, group, lock)
    finally:
        lock.release()
        group.close()


def _execute(spec: RunSpec, group: "Group", lock: "RunLock") -> int:
    error = (lock.take() or prepare_run_dir(spec.out, spec.settings, spec.info)) if group.rank == 0 else None
    error = group.broadcast(error)
    if error:
        raise RunError(error, quiet=group.rank != 0)

    jobs = make_jobs(spec.rows, spec.methods)
    done = group.broadcast(done_keys(spec.out) if group.rank == 0 else None)
    todo = [job for job in jobs if job.key not in done]
    mine = todo[group.rank::group.world]
    group.say(f"{len(jobs)} images ({len(spec.rows)} prompts x {len(spec.methods)} methods): "
              f"{len(jobs) - len(todo)} done before, {len(todo)} to make"
              + (f" on {group.world} ranks" if group.world > 1 else ""))
    failed = run_jobs(spec, mine, group) if mine else 0

    group.barrier()  # every rank's records are on disk
    status = 1 if failed else 0
    if group.rank == 0:
        records = merge_records(spec.out)
        current = {job.key for job in jobs}
        bad = sum(r["status"] != "ok" for r in records if r["key"] in current)
        print(f"records: {spec.out / RECORDS_FILE} ({len(records)} images, {bad} failed"
              + ("; re-run the same command to retry them)" if bad else ")"), flush=True)
        status = 1 if bad else 0
        if spec.write_report is not None:
            try:
                for name, path in spec.write_report(spec.out, records).items():
                    print(f"{name}: {path}", flush=True)
            except Exception:  # the records are safe on disk; say so rather than lose the message
                traceback.print_exc()
                print(f"error: the report failed (above); the records are in {spec.out / RECORDS_FILE}",
                      file=sys.stderr, flush=True)
                status = 1
    group.barrier()  # torchrun stops every rank when one exits with an error: let rank 0 finish first
    return status


def run_jobs(spec: RunSpec, jobs: list[Job], group: "Group") -> int:
    """Makes this rank's images, appending a record for each. Returns how many failed."""
    metrics = spec.make_metrics()
    for line in getattr(metrics, "disabled", []):
        group.say(f"warning: {line}", err=True)
    methods = list({job.method.key: job.method for job in jobs}.values())
    for method in methods:
        problem = method.prepare(spec.device, spec.dtype)
        if problem and not spec.allow_vlm_failures:
            raise RunError(f"the VLM does not answer: {problem}. Start it or fix --vlm-url; "
                           "--allow-vlm-failures runs anyway, recording each failed query")
        if problem:
            group.say(f"warning: the VLM does not answer ({problem}); running anyway", err=True, every_rank=True)
    pipe = spec.load_pipe()
    for method in methods:
        problem = method.check(pipe)
        if problem:
            raise RunError(problem, quiet=group.rank != 0)
    shard = spec.out / (RECORDS_FILE if group.world == 1 else f"records.rank{group.rank}.jsonl")
    cut_torn_tail(shard)
    failed, told = 0, False
    bar = tqdm(jobs, desc="images" if group.world == 1 else f"images (rank 0 of {group.world})", unit="image",
               disable=not spec.progress or group.rank != 0, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.key, refresh=False)
        record = run_job(spec, job, pipe, metrics)
        record.update(rank=group.rank, finished=round(time.time(), 3))
        append_record(shard, record)
        if record["prompt_truncated"] and not told:
            told = True
            tqdm.write(f"warning: case {job.row.case}'s prompt has {record['prompt_tokens']} tokens; the text "
                       f"encoder reads the first {pipe.tokenizer.max_length - 2}, as diffusers does (the records keep "
                       "the whole prompt, and the summary counts the prompts cut)", file=sys.stderr)
        if record["status"] != "ok":
            failed += 1
            tqdm.write(f"warning: {job.key} failed: {record['error']}", file=sys.stderr)
    return failed


def run_job(spec: RunSpec, job: Job, pipe, metrics) -> dict:
    """Makes, writes and scores one image; returns its record. A failure of this image alone
    (NaN/inf in the latents, a metric that raised, VL-DNP queries that failed) is recorded as
    status "failed" rather than raised."""
    row, method, sampling = job.row, job.method, spec.sampling
    seed = row.seed if row.seed is not None else (spec.base_seed + row.case) % 2**64
    cfg_scale = row.guidance if row.guidance is not None else spec.guidance_scale
    record = {"job": job.index, "key": job.key, "case": row.case, "row": row.index, "prompt": row.prompt,
              **prompt_length(pipe.tokenizer, row.prompt), "seed": seed, "guidance": cfg_scale,
              "categories": row.categories, "method": method.label, "scale": method.scale, "image": job.image,
              **({"init_image": str(row.init_image), "mask": row.mask and str(row.mask)} if row.init_image else {}),
              "negatives": [], "metrics": {}, "timings": {}, "status": "ok", "error": None}
    start = time.perf_counter()
    try:
        edits = edit_arguments(row, spec.strength, pipe, sampling)
    except ValueError as e:  # an image that cannot be read, or edited at this size or model: this job fails alone
        return {**record, "status": "failed", "error": str(e)}
    plan = method.plan(pipe, row.prompt)
    try:
        image = generate(pipe, plan.prompt, steps=sampling.steps, guidance_scale=cfg_scale, height=sampling.height,
                         width=sampling.width, seed=seed, sampler=sampling.sampler, progress=False, **edits,
                         **plan.arguments)[0]
    except NonFiniteError as e:
        record["timings"] = {"sampling": _seconds(start), "metrics": 0.0, "total": _seconds(start)}
        return {**record, "status": "failed", "error": str(e)}
    finally:
        plan.finish()
    sampled = time.perf_counter()
    record.update(negatives=plan.queries(0), height=image.shape[0], width=image.shape[1])
    text = png.parameters_text(row.prompt, plan.negative_prompt, steps=sampling.steps, sampler=sampling.sampler,
                               guidance_scale=cfg_scale, seed=seed, width=image.shape[1], height=image.shape[0],
                               model=spec.model_name, strength=edits.get("strength"), loras=pipe.loras,
                               extra=plan.image_parameters(0))
    png.write_png(spec.out / job.image, image, {"parameters": text})
    written = time.perf_counter()
    if metrics is not None:
        try:
            record["metrics"] = metrics(image, row.prompt)
            json.dumps(record["metrics"], allow_nan=False)  # the records are strict JSON, for the HTML page too
        except Exception as e:  # one image's metric; the others may still work
            record.update(metrics={}, status="failed", error=f"metrics: {type(e).__name__}: {e}".splitlines()[0])
    end = time.perf_counter()
    record["timings"] = {"sampling": round(sampled - start, 4), "metrics": round(end - written, 4),
                         "total": round(end - start, 4)}
    errors = [q["error"] for q in record["negatives"] if q.get("error")]
    if errors and not spec.allow_vlm_failures and record["status"] == "ok":
        record.update(status="failed", error=f"{len(errors)} of {len(record['negatives'])} VL-DNP queries failed, "
                                             f"the first: {errors[0]}")
    return record


def edit_arguments(row: PromptRow, strength: float | None, pipe, sampling: Sampling) -> dict:
    """generate()'s edit arguments for a row with an init_image (and mask); {} for one without. A
    ValueError, one line, for an image that cannot be read (png_reader.ImageFileError) or edited at
    the run's sizes, for a mask of another size, or a row without both that an inpainting model needs."""
    if row.init_image is None:
        edit.check_edit(pipe, None, None, None, sampling.height, sampling.width)
        return {}
    image = read_image(row.init_image)
    mask = None if row.mask is None else edit.mask_from_image(read_image(row.mask))
    *_, strength = edit.check_edit(pipe, image, mask, strength, sampling.height, sampling.width)
    return {"init_image": image, "mask": mask, "strength": strength}


def prompt_length(tokenizer, prompt: str) -> dict:
    """The prompt's length in the text encoder's tokens, and whether the encoder reads only the
    first max_length - 2 of them (the tokenizer cuts the rest, as diffusers does): a benchmark's
    adversarial prompts can run to thousands of characters."""
    tokens = len(tokenizer.encode(prompt))
    return {"prompt_tokens": tokens, "prompt_truncated": tokens > tokenizer.max_length - 2}


def _seconds(start: float) -> float:
    return round(time.perf_counter() - start, 4)


# ---------------------------------------------------------------------------------------------
# The run folder

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
                stored = data["settings"]
            except (ValueError, KeyError, TypeError) as e:
                return f"--out {out}: {SETTINGS_FILE} is damaged ({e}); use a new --out folder"
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
    if key == "prompts_sha256":
        return f"the prompt file: other contents (sha256 {str(there)[:12]}… there, {str(here)[:12]}… now)"
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
    if names[0] != names[1]:
        return (f"the methods (--methods, --negative-scale, --sld-presets): {_short(names[0])} there, "
                f"{_short(names[1])} now")
    old, new = next((a, b) for a, b in zip(there, here) if a != b)
    field = _first_difference(old, new)
    flag = METHOD_FLAGS.get(field) or _flag(field)
    if isinstance(flag, dict):
        flag = flag.get(new.get("method"), _flag(field))
    return f"{flag} (method {_method_name(new)}): {_value(old.get(field))} there, {_value(new.get(field))} now"


def _method_name(method: dict) -> str:
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


def read_records(path: Path) -> list[dict]:
    """The records of a JSON-lines file; lines that do not parse (a torn last line) are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "key" in record:
            records.append(record)
    return records


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


def all_records(out: Path) -> list[dict]:
    """The merged file's records, then each rank's, in file order."""
    return [r for p in [out / RECORDS_FILE, *sorted(out.glob("records.rank*.jsonl"))] for r in read_records(p)]


def done_keys(out: Path) -> set[str]:
    """The jobs done: a record with status ok, and its image on disk."""
    return {r["key"] for r in all_records(out) if r.get("status") == "ok" and (out / r["image"]).is_file()}


def merge_records(out: Path) -> list[dict]:
    """One record per job, in job order: its latest ok record, else its latest failed one.
    Written atomically to records.jsonl, which is returned."""
    best = {}
    for r in all_records(out):
        rank = (r.get("status") == "ok", r.get("finished", 0))
        if r["key"] not in best or rank >= best[r["key"]][0]:
            best[r["key"]] = (rank, r)
    merged = sorted((r for _, r in best.values()), key=lambda r: (r.get("job", 0), r["key"]))
    write_atomic(out / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    return merged


# ---------------------------------------------------------------------------------------------
# torch.distributed, for coordination only

@dataclass
class Group:
    """This process's place among the ranks torchrun started; rank 0 of 1 without torchrun."""
    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @classmethod
    def start(cls, device: torch.device) -> "Group":
        """Joins the process group torchrun's environment describes (MASTER_ADDR, RANK, ...)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=DIST_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def say(self, message: str, err: bool = False, every_rank: bool = False):
        """Prints on rank 0, or on every rank with the rank named."""
        if self.rank == 0 or every_rank:
            prefix = f"[rank {self.rank}] " if every_rank and self.world > 1 else ""
            print(prefix + message, file=sys.stderr if err else sys.stdout, flush=True)

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
