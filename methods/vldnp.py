"""VL-DNP: dynamic, VLM-guided negative prompts (Chang, Kim, Choi 2025, arXiv 2510.26052).

At chosen steps i, the sampler's prediction of the clean image, x0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t
with the positive guided ε = ε_u + g(ε_c − ε_u), is decoded by the VAE (or, on request, a cheaper
preview decoder: vlm/preview.py) and shown to a proposer (a VLM, CLIP, ...). What it sees becomes a
negative prompt that applies from step i on, as a third guidance branch:

    ε = ε_u + g(ε_c − ε_u) − w_neg(ε_neg − ε_u)

`DynamicNegatives` is the sampler hook (sampler/loop.py) that does this for each image of the batch.
`VLDNP` is the method: the hook at one w_neg, or with --negative-schedule dng at a strength that follows
Dynamic Negative Guidance's posterior for the negative it sees (methods/dng.py, a leaf imported only then).
"""
import dataclasses
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from leaves import Leaves
from methods.base import Method, Plan, classic_negative
from sampler.loop import words
from vlm.base import Latents, Reply, one_line, prepare_image, valid_text
from vlm.tasks import MAX_REPLY_CHARS, NUDITY, Task

PAPER_STEPS = (5, 6, 7, 9, 12, 16, 21, 27, 34, 42)  # 0-based step indices, of 50 steps
FRAME_SIZE = 256  # longer side of the filmstrip frames, at most
LEAVES = Leaves("output", {"trace": "vlm.trace"})  # the --trace file


def default_query_steps(num_steps: int) -> list[int]:
    """The paper's schedule, rescaled from 50 steps to `num_steps` (rounded, deduplicated)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return sorted({int(s * num_steps / 50 + 0.5) for s in PAPER_STEPS} & set(range(num_steps)))


@dataclass
class Query:
    """One query for one image, as the trace records it. `negative` is the negative in force for
    the image once the answer took effect (None: no negative branch; after a fault, the one kept),
    and `took_effect` the step it applied from: the query's own step, or with asynchronous
    queries a later one. An answer that came after sampling ended took effect nowhere
    (`took_effect` None), and its `negative` is the one in force at the end."""
    step: int
    timestep: int | float  # a training timestep; Euler's "linspace" layout visits fractional ones
    raw: str = ""
    items: list[str] = field(default_factory=list)
    negative: str | None = None
    error: str | None = None
    latency: float | None = None
    took_effect: int | None = None


class DynamicNegatives:
    """The VL-DNP sampler hook, for one generate() call. At each step of `query_steps` (None: the
    paper's, rescaled to the run's steps) it decodes x0 and asks `proposer` about each image with its
    prompt (a proposer that reads latents, `wants = "latents"`, vlm/base.py, is shown x0 undecoded).
    An answer sets the image's negative (the task's negative of the items, replacing or accumulating
    per `task.mode`; no items, no negative branch) and its w_neg; a failed query keeps the negative in
    force. Synchronous answers apply from the query step, as in the paper; `asynchronous` ones from
    the first step after they arrive.

    x0 is decoded by `preview` (vlm/preview.py; None: the model's VAE) only as large as the proposer
    looks at it (`input_scale`, vlm/base.py), unless `full_decode`. `timeout` bounds the wait for an
    answer it needs (None: no limit). Call `close()` afterwards to collect the answers outstanding."""

    def __init__(self, proposer, task: Task, query_steps=None, negative_scale: float = 7.5, asynchronous: bool = False,
                 max_workers: int = 4, full_decode: bool = False, timeout: float | None = None, preview=None):
        self.proposer, self.task, self.preview, self.full_decode = proposer, task, preview, full_decode
        self.timeout = timeout
        self.query_steps = None if query_steps is None else sorted({int(s) for s in query_steps})
        self.negative_scale, self.asynchronous, self.max_workers = negative_scale, asynchronous, max_workers
        self.prompts: list[str] = []
        self.negatives: list[str | None] = []  # per image, the negative in force (at the end: the one kept)
        self.trace: list[list[Query]] = []  # per image, per query
        self.frames: list[list[torch.Tensor]] = []  # per image, the uint8 x0 image sent with each query
        self._items: list[list[str]] = []  # per image, all items so far (accumulate mode)
        self._pending: list[deque] = []  # per image, (Query, Future) in query order
        self._pool, self._started = None, False
        self.decode_factor: int | None = None  # k of the x0 previews, once decoded

    def __call__(self, state) -> None:
        if state.i == 0 or not self._started:
            self._start(state)
        for b, pending in enumerate(self._pending):  # answers that arrived since the last step
            while pending and pending[0][1].done():
                query, future = pending.popleft()
                self._apply(state, b, query, future.result())
        if state.i in self.query_steps:
            self._query(state)
        if state.i == state.num_steps - 1 and self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # later answers cannot apply

    def _start(self, state):
        if self._started:
            raise RuntimeError("a DynamicNegatives hook serves one generate() call; make a new one per call")
        self._started = True
        self.query_steps = default_query_steps(state.num_steps) if self.query_steps is None else self.query_steps
        if self.query_steps and not 0 <= self.query_steps[0] <= self.query_steps[-1] < state.num_steps:  # never run
            raise ValueError(f"query steps {self.query_steps}: the chain takes steps 0 to {state.num_steps - 1}")
        self.prompts, self.negatives = [words(p) for p in state.guidance.prompt], list(state.guidance.negative)
        B = len(self.prompts)
        self.trace, self.frames = [[] for _ in range(B)], [[] for _ in range(B)]
        self._items, self._pending = [[] for _ in range(B)], [deque() for _ in range(B)]

    def _query(self, state):
        guidance = state.guidance
        images = None
        wants = getattr(self.proposer, "wants", "image" if getattr(self.proposer, "needs_image", True) else None)
        if wants == "image":
            k = self.decode_factor = self._decode_factor(state)
            images = (state.decode_x0(k) if self.preview is None else self.preview(state, k)).float().cpu()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(guidance.prompt)),
                                            thread_name_prefix="vl-dnp")
        for b, prompt in enumerate(map(words, guidance.prompt)):  # the words, for a prompt given as states
            query = Query(state.i, int(state.t) if float(state.t).is_integer() else float(state.t))
            self.trace[b].append(query)
            image = None if images is None else images[b]  # [3, H, W] in [-1, 1]
            if image is not None:
                self.frames[b].append(prepare_image(image, min(FRAME_SIZE, max(image.shape[-2:]))))
            seen = state.x0[b] if wants == "latents" else image  # [C, h, w] latents, or the image
            if seen is not None and not torch.isfinite(seen).all():  # NaN would be sent as black
                future = Future()
                future.set_result(Reply([], "", "x0 is not finite (NaN/inf); nothing was sent"))
            else:
                shown = Latents(seen, query.timestep) if wants == "latents" else image
                future = self._pool.submit(self._ask, shown, prompt, state.i)
            self._pending[b].append((query, future))
        if not self.asynchronous:
            for b, pending in enumerate(self._pending):
                while pending:
                    query, future = pending.popleft()
                    self._apply(state, b, query, self._wait(future, self.timeout))

    def _decode_factor(self, state) -> int:
        """The largest k for which the x0 preview is still at least input_scale × the image."""
        scale = getattr(self.proposer, "input_scale", None)
        if self.full_decode or scale is None:
            return 1
        vae_scale = state.pipe.vae_scale
        scale = scale(state.x0.shape[-2] * vae_scale, state.x0.shape[-1] * vae_scale)
        return max(1, int(1 / scale + 1e-9)) if scale > 0 else 1

    def _ask(self, image, prompt: str, step: int) -> Reply:
        """Runs one query; never raises. Its latency is the wall time of the proposer call."""
        start = time.perf_counter()
        try:
            reply = self.proposer(image, prompt, step)
            if not isinstance(reply, Reply):
                raise TypeError(f"the proposer returned {type(reply).__name__}, not a Reply")
        except Exception as e:
            reply = Reply([], "", one_line(f"{type(e).__name__}: {e}"))
        return Reply([valid_text(str(item)) for item in reply.items], valid_text(str(reply.raw)),
                     None if reply.error is None else valid_text(str(reply.error)), time.perf_counter() - start)

    def _wait(self, future, timeout: float | None) -> Reply:
        try:
            return future.result(timeout)
        except TimeoutError:
            return Reply([], "", f"no answer within {self.timeout:g} s", self.timeout)

    def _apply(self, state, b: int, query: Query, reply: Reply):
        """Makes image b's answer take effect at this step, or on a fault keeps its negative."""
        guidance = state.guidance
        self._record(b, query, reply)
        query.took_effect = state.i
        if reply.error is None:
            items = list(reply.items)
            if self.task.mode == "accumulate":
                items = self._items[b] = list(dict.fromkeys(self._items[b] + items))
            guidance.negative[b] = self.task.negative(items, state.pipe.tokenizer)
            guidance.set_negative_scale(b, self.negative_scale)
        query.negative = self.negatives[b] = guidance.negative[b]

    def _record(self, b: int, query: Query, reply: Reply):
        query.raw, query.items = str(reply.raw)[:MAX_REPLY_CHARS], [str(item) for item in reply.items]
        query.error, query.latency = reply.error, round(reply.latency, 4)
        if reply.error is not None:  # on the progress bar's own line, so the bar does not overwrite it
            kept = "keeping the negative in force" if self.negatives[b] else "no negative is in force yet"
            tqdm.write(f"warning: VL-DNP query at step {query.step} for image {b} failed: {one_line(reply.error)}; "
                       f"{kept}", file=sys.stderr)

    def close(self):
        """Cancels the queries not yet started, waits for the running ones (all together at most
        `timeout` seconds) and records their answers, which applied at no step."""
        if self._pool is None:
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for b, pending in enumerate(self._pending):
            while pending:
                query, future = pending.popleft()
                if future.cancelled():
                    query.error = "cancelled: sampling ended before the query ran"
                else:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._record(b, query, self._wait(future, left))
                query.negative = self.negatives[b]

    def failed_queries(self, b: int) -> tuple[int, int]:
        """(failed, asked) for image b. A query fails with an error, a timeout, or when sampling ended
        before it ran; then no answer came, and the negative in force was kept."""
        return sum(query.error is not None for query in self.trace[b]), len(self.trace[b])

    def unanswered(self, b: int) -> bool:
        """Whether image b had queries but no answer took effect: every one failed, or (asynchronous)
        the answers came after sampling ended. The image was then made without the dynamic negative."""
        return bool(self.trace[b]) and all(q.error is not None or q.took_effect is None for q in self.trace[b])

    def outcome(self, b: int) -> dict:
        """What the hook did to image b, for its metadata: the negative in force at the last step, "none" when the
        proposer looked and saw nothing, or "unguarded (...)" when no answer took effect, which must never read as
        "none"; how many queries failed, if any did; and which decoder made the x0 previews, if any were made."""
        failed, asked = self.failed_queries(b)
        out = {"VL-DNP failed queries": f"{failed}/{asked}"} if failed else {}
        previews = {"VL-DNP previews": getattr(self.preview, "name", "vae")} if self.decode_factor is not None else {}
        if self.unanswered(b):
            why = "all queries failed" if failed == asked else "no answer in time"
            return {**out, "Dynamic negative": f"unguarded ({why})", **previews}
        return {**out, "Dynamic negative": self.negatives[b] or "none", **previews}


@dataclass(frozen=True)
class VLDNP(Method):
    """VL-DNP at one w_neg. `proposer` is a Proposer (vlm/base.py), or what makes one and its preview
    decoder: vlm/proposers.py's ProposerSource, the one a command line names, shared by the run's w_neg
    values. `preview` decodes a ready proposer's x0 previews (None: the VAE); `timeout` bounds the
    wait for one answer (None: the proposer's own limit). A proposer may say why it cannot read the
    loaded model's x0 (`mismatch(pipe)`, asked before any image) and name the file it came from for the
    PNG (`origin`), as vlm/latent_proposer.py's does. `strength`, a methods.dng.Strength, makes the
    strength DNG's (--negative-schedule dng, named vldnp+dng): a new negative applies at
    w_neg = λπ/(1 − π) and then follows its posterior p_t."""
    name = "vldnp"
    flags = ("negative_scales", "vlm_task", "vlm_steps", "proposer", "vlm_async", "preview_decoder", "full_decode",
             "negative_prompt", "trace", "allow_vlm_failures", "negative_schedule")
    swept = True
    negative_scale: float = 7.5
    task: Task = NUDITY
    query_steps: tuple[int, ...] | None = None  # None: the paper's, rescaled to the run's steps
    proposer: object = None
    preview: object = None  # vlm/preview.py's Preview
    asynchronous: bool = False
    full_decode: bool = False
    timeout: float | None = None
    negative_prompt: str | None = None
    strength: object = None  # a methods.dng.Strength, or None for the constant w_neg
    paper_steps: bool = False  # query_steps are the paper's for --steps, rescaled again to the steps an edit takes

    # The command line's part (methods/vldnp_cli.py, which only a command line needs): its options,
    # their checks, the options it reads, and the instances they ask for.
    @classmethod
    def add_options(cls, parser, many):
        from methods import vldnp_cli
        vldnp_cli.add_options(parser, many)

    @classmethod
    def rules(cls, args):
        from methods import vldnp_cli
        return vldnp_cli.rules(args)

    @classmethod
    def reads(cls, args) -> set[str]:
        from methods import vldnp_cli
        return vldnp_cli.reads(cls, args)

    @classmethod
    def from_args(cls, args, variant=None):
        from methods import vldnp_cli
        cls.no_variant(variant)
        return vldnp_cli.from_args(cls, args, default_query_steps)

    @property
    def label(self) -> str:
        return self.name if self.strength is None else f"{self.name}+dng"

    @property
    def scale(self) -> float:
        """w_neg, or for vldnp+dng λ: the value swept."""
        return self.negative_scale if self.strength is None else self.strength.lam

    def settings(self) -> dict:
        source = hasattr(self.proposer, "make")
        dng = {} if self.strength is None else {"negative_schedule": "dng", "dng": self.strength.description}
        return {"method": self.label, "scale": self.scale, "task": self.task.name,
                "query_steps": None if self.query_steps is None else list(self.query_steps),
                "proposer": self.proposer.description if source else repr(self.proposer),
                "preview_decoder": self.proposer.preview_choice if source else getattr(self.preview, "name", "vae"),
                "negative_prompt": self.negative_prompt, **dng}

    def prepare(self, device, dtype):
        if not hasattr(self.proposer, "make"):
            return None
        self.proposer.make(device, dtype)
        return self.proposer.check() if self.query_steps != () else None

    def looker(self, device=None, dtype=None) -> tuple:
        """(the proposer, the preview decoder or None for the VAE), made if they are not yet."""
        if hasattr(self.proposer, "make"):
            return self.proposer.make(device, dtype)
        return self.proposer, self.preview

    def check(self, pipe):
        proposer, preview = self.looker(pipe.device, pipe.dtype)
        return (preview and preview.mismatch(pipe.family)) or getattr(proposer, "mismatch", lambda pipe: None)(pipe)

    def plan(self, pipe, prompt, batch=1):
        proposer, preview = self.looker(pipe.device, pipe.dtype)
        timeout = self.timeout
        if timeout is None and getattr(proposer, "longest", lambda: None)() is not None:
            timeout = proposer.longest() + 5  # a backstop, past the proposer's own limit
        steps = None if self.paper_steps else self.query_steps  # None: the paper's for the steps the chain takes
        hook = DynamicNegatives(proposer, self.task, steps, self.negative_scale, self.asynchronous,
                                full_decode=self.full_decode, timeout=timeout, preview=preview)
        name = getattr(self.proposer, "description", {}).get("name", type(proposer).__name__)
        strength = None if self.strength is None else self.strength.hook()  # after `hook`, which sets the negatives
        scale = {"Negative scale": f"{self.negative_scale:g}"} if strength is None else \
            {"VL-DNP schedule": "dng", "DNG": self.strength.text()}
        hooks = [hook] if strength is None else [hook, strength]
        origin = {"VL-DNP proposer": proposer.origin} if hasattr(proposer, "origin") else {}  # its file
        return VLDNPPlan(prompt, {"negative_prompt": self.negative_prompt, "hooks": hooks},
                         {"Method": self.label, "VL-DNP": f"{name} {self.task.name}", **origin, **scale},
                         classic_negative(self.negative_prompt), hook, strength)


@dataclass
class VLDNPPlan(Plan):
    """The hook decides per image: what it did to each goes in the PNG, the records and the trace;
    with the dng schedule, so does each image's p_t (`strength`, methods/dng.py's DynamicStrength)."""
    hook: DynamicNegatives = None
    strength: object = None

    def image_parameters(self, b):
        steps = " ".join(map(str, self.hook.query_steps or [])) or "none"
        dng = {} if self.strength is None else {"DNG p_t": self.strength.summary(b)}
        return {**self.parameters, "VL-DNP steps": steps, **self.hook.outcome(b), **dng}

    def queries(self, b):
        return self.negatives + [dataclasses.asdict(q) for q in self.hook.trace[b]]

    def unguarded(self, b):
        if not self.hook.unanswered(b):
            return None
        failed, asked = self.hook.failed_queries(b)
        return "every VL-DNP query failed" if failed == asked else "no VL-DNP answer came before sampling ended"

    def summary(self) -> str | None:
        """How many queries failed, and which images no answer reached (then made without the dynamic negative)."""
        batch = len(self.hook.trace)
        counts = [self.hook.failed_queries(b) for b in range(batch)]
        failed, asked = sum(f for f, _ in counts), sum(a for _, a in counts)
        unanswered = [b for b in range(batch) if self.hook.unanswered(b)]
        if not failed and not unanswered:
            return None
        parts = [f"{failed} of {asked} VL-DNP queries failed"] if failed else []
        if unanswered:
            images = f"image {unanswered[0]}: it was" if len(unanswered) == 1 else \
                f"images {', '.join(map(str, unanswered))}: they were"
            parts.append(f"no {'' if failed else 'VL-DNP '}answer took effect for {images} made without the dynamic "
                         "negative (exit status 3)")
        else:
            parts.append(f"the negative in force was kept, and the PNG{'s count' if batch > 1 else ' counts'} them")
        return "; ".join(parts)

    def trace(self):
        data = LEAVES["trace"].trace_dict(self.hook)
        if self.strength is not None:  # p_t and w_neg at each step, beside each image's queries
            data.update(negative_schedule="dng", dng=self.strength.strength.description)
            for image, dng in zip(data["images"], self.strength.trace_images()):
                image["steps"] = dng["steps"]
        return data

    def write_trace(self, path):
        return LEAVES["trace"].write_trace(self.hook, path, self.trace())

    def finish(self):
        self.hook.close()
