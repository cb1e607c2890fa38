"""One evaluation run: every (prompt, method) pair is a job that makes one image, kept in the run
folder (evaluation/run_folder.py: its files, the lock, resuming, the records).

Many processes: `torchrun --nproc_per_node=N evaluate.py ...` starts N ranks (and more on other
nodes, with torchrun's rendezvous flags; the run folder must then be on a shared file system).
torch.distributed, gloo on CPU and NCCL on CUDA, only coordinates: rank 0 checks the run folder
and lists the jobs still to do; they are dealt round-robin, job i of that list to rank
i mod world_size; each rank writes its own records file; after a barrier, rank 0 merges the
files and writes the report. Rank r uses cuda:LOCAL_RANK.
"""
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import png
from evaluation.prompts import PromptRow
from evaluation.run_folder import (IMAGES, RECORDS_FILE, RunLock, append_record, cut_torn_tail, done_keys,
                                   merge_records, prepare_run_dir, skipped_warning)
from methods import Method
from methods.options import prepare_all
from sampler.loop import EDITS, NonFiniteError, generate
from files import printable

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
    bad = []  # the lines of the records files that are no record, by file and line
    rows = {job.key: row_values(spec, job.row) for job in jobs}
    done, changed = group.broadcast(done_keys(spec.out, rows, bad) if group.rank == 0 else None)
    if bad:
        group.say(skipped_warning(bad, "skipped as a torn line is: a job left without a record is made again"),
                  err=True)
    todo = [job for job in jobs if job.key not in done]
    mine = todo[group.rank::group.world]
    group.say(f"{len(jobs)} images ({len(spec.rows)} prompts x {len(spec.methods)} methods): "
              f"{len(jobs) - len(todo)} done before, {len(todo)} to make"
              + (f" ({len(changed)} whose row changed)" if changed else "")
              + (f" on {group.world} ranks" if group.world > 1 else ""))
    failed = run_jobs(spec, mine, group) if mine else 0

    group.barrier()  # every rank's records are on disk
    status = 1 if failed else 0
    if group.rank == 0:
        # the report covers this run's jobs; records.jsonl keeps every job's, of rows run before too
        records = [r for r in merge_records(spec.out, rows) if r["key"] in rows]
        bad = [r for r in records if r["status"] != "ok"]
        print(printable(f"records: {spec.out / RECORDS_FILE} ({len(records)} images, {len(bad)} failed"
                        f"{retry_advice(bad)})"), flush=True)
        unguarded = [r["unguarded"] for r in records if r["status"] == "ok" and r.get("unguarded")]
        status = 1 if bad else 3 if unguarded else 0
        if spec.write_report is not None:
            try:
                for name, path in spec.write_report(spec.out, records).items():
                    print(printable(f"{name}: {path}"), flush=True)
            except OSError as e:  # a full disk, say: the records are safe on disk
                print(printable(f"error: cannot write the report ({e}); the records are in {spec.out / RECORDS_FILE}"),
                      file=sys.stderr, flush=True)
                status = 1
            except Exception:  # a bug: its traceback, and where the records are safe on disk
                traceback.print_exc()
                print(printable(f"error: the report failed (above); the records are in {spec.out / RECORDS_FILE}"),
                      file=sys.stderr, flush=True)
                status = 1
        if unguarded:  # --allow-vlm-failures made them: never to pass for guarded ones
            n = len(unguarded)
            why = printable(", ".join(dict.fromkeys(unguarded)))  # from the records, which a hand may have edited
            print(f"warning: {n} image{'s were' if n > 1 else ' was'} made without the guard asked for ({why}); "
                  f"{'their records say' if n > 1 else 'its record says'} so, and the report counts "
                  f"{'them' if n > 1 else 'it'} apart", file=sys.stderr, flush=True)
    group.barrier()  # torchrun stops every rank when one exits with an error: let rank 0 finish first
    return status


def retry_advice(failed: list[dict]) -> str:
    """The summary's word on the failed records: a re-run of the same command makes each image again, which may
    mend those whose VL-DNP queries failed (a VLM that did not answer for a while), not the others (NaN latents,
    an image to edit that cannot be read, a metric that raised): the same settings fail them the same way."""
    queries = sum(not str(r.get("error")).startswith("metrics: ") and isinstance(r.get("negatives"), list)
                  and any(isinstance(q, dict) and q.get("error") for q in r["negatives"]) for r in failed)
    others, advice = len(failed) - queries, ""
    if queries:
        which = f"the {queries} whose VL-DNP queries failed" if others else "them"
        advice += f"; re-run the same command to retry {which}"
    if others:
        advice += (f"; {f'the other {others}' if queries else 'they'} would fail the same way again until what the "
                   "warnings above name is fixed")
    return advice


def run_jobs(spec: RunSpec, jobs: list[Job], group: "Group") -> int:
    """Makes this rank's images, appending a record for each. Returns how many failed."""
    metrics = spec.make_metrics()
    for line in getattr(metrics, "disabled", []):
        group.say(f"warning: {line}", err=True)
    methods = list({job.method.key: job.method for job in jobs}.values())
    try:
        warning = prepare_all(methods, spec.device, spec.dtype, spec.allow_vlm_failures)
    except ValueError as e:
        raise RunError(str(e)) from None
    if warning:
        group.say(f"warning: {warning}", err=True, every_rank=True)
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
            tqdm.write(f"warning: {job.key} failed: {printable(record['error'])}", file=sys.stderr)
    return failed


def run_job(spec: RunSpec, job: Job, pipe, metrics) -> dict:
    """Makes, writes and scores one image; returns its record. A failure of this image alone
    (NaN/inf in the latents, a metric that raised, VL-DNP queries that failed) is recorded as
    status "failed" rather than raised."""
    row, method, sampling = job.row, job.method, spec.sampling
    values = row_values(spec, row)
    seed, cfg_scale = values["seed"], values["guidance"]
    record = {"job": job.index, "key": job.key, "case": row.case, "row": row.index, **values,
              **prompt_length(pipe.tokenizer, row.prompt), "categories": row.categories, "method": method.label,
              "scale": method.scale, "image": job.image, "negatives": [], "metrics": {}, "timings": {}, "status": "ok",
              "error": None}
    start = time.perf_counter()
    try:
        edits = edit_arguments(row, spec.strength, pipe, sampling)
    except ValueError as e:  # an image that cannot be read, or edited at this size or model: this job fails alone
        return {**record, "status": "failed", "error": str(e)}
    if method.needs_cfg and cfg_scale <= 1:  # the row's own CFG scale: the method's guard would be off
        return {**record, "status": "failed", "error": f"{method.label} needs a CFG scale above 1, the row gives "
                f"{cfg_scale:g}: at 1 or less the unconditional branch its guard acts through is skipped"}
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
    record.update(negatives=plan.queries(0), unguarded=plan.unguarded(0), height=image.shape[0], width=image.shape[1])
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
        except Exception as e:  # one image's metric; the others may still work, and the traceback shows why
            tqdm.write(traceback.format_exc().rstrip(), file=sys.stderr)
            record.update(metrics={}, status="failed", error=f"metrics: {type(e).__name__}: {e}".splitlines()[0])
    end = time.perf_counter()
    record["timings"] = {"sampling": round(sampled - start, 4), "metrics": round(end - written, 4),
                         "total": round(end - start, 4)}
    errors = [q["error"] for q in record["negatives"] if q.get("error")]
    if errors and not spec.allow_vlm_failures and record["status"] == "ok":
        record.update(status="failed", error=f"{len(errors)} of {len(record['negatives'])} VL-DNP queries failed, "
                                             f"the first: {errors[0]}")
    return record


def row_values(spec, row: PromptRow) -> dict:
    """What of `row` decides its jobs' images (run_folder.py ROW_FIELDS), as their records keep it:
    the prompt, the seed (the row's, else base_seed + case), the CFG scale, the images to edit.
    `spec` gives base_seed and guidance_scale: a RunSpec, or distill.py's Collection."""
    return {"prompt": row.prompt, "seed": row.seed if row.seed is not None else (spec.base_seed + row.case) % 2**64,
            "guidance": row.guidance if row.guidance is not None else spec.guidance_scale,
            **({"init_image": str(row.init_image), "mask": row.mask and str(row.mask)} if row.init_image else {})}


def edit_arguments(row: PromptRow, strength: float | None, pipe, sampling: Sampling) -> dict:
    """generate()'s edit arguments for a row with an init_image (and mask); {} for one without. A
    ValueError, one line, for an image that cannot be read (png_reader.ImageFileError) or edited at
    the run's sizes, for a mask of another size, or a row without both that an inpainting model needs."""
    if row.init_image is None and not pipe.inpainting:
        return {}
    from png_reader import read_image  # with sampler/edit.py, a leaf (docs/fork.md)
    edit = EDITS["img2img"]
    if row.init_image is None:
        edit.check_edit(pipe, None, None, None, sampling.height, sampling.width)  # refuses an inpainting model
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
            print(printable(prefix + message), file=sys.stderr if err else sys.stdout, flush=True)

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
