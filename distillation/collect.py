"""distill.py collect: the teacher's verdicts on the x0 the sampler predicts, with those x0.

Each prompt of the CSV is sampled with VL-DNP and the teacher as its proposer (a VLM, CLIP), exactly
as generate.py and evaluate.py run it: its negatives apply, so the x0 of later queries are the ones
VL-DNP meets. `QueryLatents`, a hook after VL-DNP's, keeps x_t, x0 and t at every query step; the
hook's trace holds the teacher's answer to each. distillation/data.py says where they go.
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from distillation.data import RECORDS_FILE, DataError, add_prompt, done_keys, latest_records, prepare_data_dir, \
    write_settings
from evaluation.prompts import PromptRow
from evaluation.run import Sampling, row_values
from evaluation.run_folder import cut_torn_tail, skipped_warning
from files import printable
from methods.options import prepare_all
from sampler.loop import NonFiniteError, generate
from vlm.latent_proposer import latent_space


class QueryLatents:
    """A sampler hook placed after VL-DNP's (`hook`, a methods.vldnp.DynamicNegatives): at each of
    its query steps, copies of x_t and of the x0 prediction the proposer was shown [B, C, h, w], and
    the timestep, by step."""

    def __init__(self, hook):
        self.hook, self.steps = hook, {}

    def __call__(self, state):
        if state.i in self.hook.query_steps:
            self.steps[state.i] = (state.x.to("cpu", copy=True), state.x0.to("cpu", copy=True), state.t)


@dataclass
class Collection:
    """Everything a collect run needs; `method` is a methods.vldnp.VLDNP with the teacher as its
    proposer. `images` are made per prompt, from one seed (the row's, else base_seed + case)."""
    out: Path
    rows: list[PromptRow]
    method: object
    settings: dict  # what decides the data; compared on resume
    sampling: Sampling
    guidance_scale: float  # where the CSV gives none
    base_seed: int
    images: int
    device: torch.device
    dtype: torch.dtype
    load_pipe: Callable
    check_pipe: Callable = lambda pipe: None  # raises for a model the run cannot use
    allow_failures: bool = False
    progress: bool = True
    info: dict = field(default_factory=dict)


def collect(spec: Collection) -> int:
    """Collects (or resumes) the data. Returns the exit status: 0 when every prompt is done, 1 when
    some failed (a re-run retries them). Raises DataError, or a one-line ValueError for a part that
    cannot load, before the first image."""
    concepts = list(spec.method.task.concepts)
    info = prepare_data_dir(spec.out, spec.settings, {**spec.info, "concepts": concepts})
    cut_torn_tail(spec.out / RECORDS_FILE)
    bad = []  # the lines of records.jsonl that are no record
    done, changed = done_keys(spec.out, {str(row.case): row_values(spec, row) for row in spec.rows}, bad)
    if bad:
        print(skipped_warning(bad, "skipped as a torn line is: a prompt left without a record is made again"),
              file=sys.stderr, flush=True)
    todo = [row for row in spec.rows if str(row.case) not in done]
    print(f"{len(spec.rows)} prompts x {spec.images} images: {len(spec.rows) - len(todo)} done before, "
          f"{len(todo)} to make" + (f" ({len(changed)} whose row changed)" if changed else ""), flush=True)
    failed = 0
    if todo:
        try:
            warning = prepare_all([spec.method], spec.device, spec.dtype, spec.allow_failures)
        except ValueError as e:
            raise DataError(str(e)) from None
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        pipe = spec.load_pipe()
        spec.check_pipe(pipe)
        problem = spec.method.check(pipe)
        if problem:
            raise DataError(problem)
        write_settings(spec.out, spec.settings, {**info, "latent_space": latent_space(pipe)})
        for row in tqdm(todo, desc="prompts", unit="prompt", disable=not spec.progress, dynamic_ncols=True):
            record = collect_prompt(spec, row, pipe)
            if record["status"] != "ok":
                failed += 1
                tqdm.write(f"warning: case {row.case} failed: {printable(record['error'])}", file=sys.stderr)
    keys = {str(row.case) for row in spec.rows}
    records = [r for r in latest_records(spec.out) if r["key"] in keys]
    queries = sum(len(r["examples"]) for r in records)
    errors = sum(e["error"] is not None for r in records for e in r["examples"])
    advice = "; re-run the same command to retry them"  # a failed prompt is made again
    if spec.allow_failures:  # its failed queries let pass, a prompt is done
        advice = "; --allow-vlm-failures keeps their prompts done: a re-run does not ask them again"
    print(printable(f"records: {spec.out / RECORDS_FILE} ({len(records)} prompts, {queries} queries, {errors} failed "
                    f"and left out of training{advice if errors else ''})"), flush=True)
    return 1 if failed else 0


def collect_prompt(spec: Collection, row: PromptRow, pipe) -> dict:
    """Samples `spec.images` images of one prompt with the teacher; writes their query tensors and
    the prompt's record (distillation/data.py's add_prompt) and returns the record."""
    key, sampling = str(row.case), spec.sampling
    values = row_values(spec, row)
    seed, cfg_scale = values["seed"], values["guidance"]
    record = {"key": key, "case": row.case, "row": row.index, **values, "images": spec.images, "shard": None,
              "examples": [], "status": "ok", "error": None}
    start = time.perf_counter()
    plan = spec.method.plan(pipe, row.prompt, spec.images)
    latents = QueryLatents(plan.hook)
    arguments = {**plan.arguments, "hooks": [*plan.arguments["hooks"], latents]}
    try:
        generate(pipe, plan.prompt, steps=sampling.steps, guidance_scale=cfg_scale, height=sampling.height,
                 width=sampling.width, batch=spec.images, seed=seed, sampler=sampling.sampler, progress=False,
                 **arguments)
    except NonFiniteError as e:
        return add_prompt(spec.out, {**record, "status": "failed", "error": str(e),
                                     "seconds": round(time.perf_counter() - start, 3)}, None)
    finally:
        plan.finish()
    concepts, x_t, x0, t = set(spec.method.task.concepts), [], [], []
    for b, queries in enumerate(plan.hook.trace):
        for query in queries:
            x, predicted, timestep = latents.steps[query.step]
            x_t.append(x[b])
            x0.append(predicted[b])
            t.append(float(timestep))
            record["examples"].append({
                "index": len(t) - 1, "image": b, "step": query.step, "timestep": query.timestep,
                "concepts": [item for item in query.items if item in concepts],
                "items": query.items, "raw": query.raw, "error": query.error})
    errors = [e["error"] for e in record["examples"] if e["error"] is not None]
    if errors and not spec.allow_failures:
        record.update(status="failed", error=f"{len(errors)} of {len(t)} teacher queries failed, the first: {errors[0]}")
    tensors = {"x0": torch.stack(x0), "x_t": torch.stack(x_t), "t": torch.tensor(t, dtype=torch.float64)}
    return add_prompt(spec.out, {**record, "seconds": round(time.perf_counter() - start, 3)}, tensors)
