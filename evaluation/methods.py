"""The methods one evaluation run compares, each a way to call sampler.loop.generate:

    sd        plain Stable Diffusion: no negative.
    negative  a classic negative prompt, which replaces the unconditional branch.
    static    the VL-DNP paper's static baseline: a fixed negative (by default SAFREE's 17 nudity
              concepts) from the first step, through the three-branch guidance
                  ε = ε_u + g(ε_c − ε_u) − w_neg(ε_neg − ε_u)
    vldnp     VL-DNP (vlm/dnp.py): the negative is what a proposer (a VLM, CLIP, or the task's
              fixed list) sees in the x0 prediction at the query steps, through the same guidance.
    sld       Safe Latent Diffusion (Schramowski et al. 2023): sampler/sld.py's guidance rule with
              its safety concept as the negative branch, one method per preset (weak, medium,
              strong, max).
    safree    SAFREE (Yoon et al. 2025): sampler/safree.py's filtered prompt embedding for the first
              steps, and the concepts joined with ", " as the classic negative.

static and vldnp are swept over w_neg (--negative-scale 0,2.5,5,...): one method per scale, so
that one run gives a safety/fidelity Pareto front. The others do not depend on w_neg.
"""
import dataclasses
import random
import re
import threading
import time
from dataclasses import dataclass, field

import torch

from sampler import sld
from sampler.loop import generate
from sampler.safree import CONCEPT_SETS, NUDITY, ConceptSet, safree, unsupported
from vlm.base import Reply
from vlm.dnp import DynamicNegatives
from vlm.preview import VAE_PREVIEW, Preview
from vlm.tasks import Task

# SAFREE's nudity concepts (Yoon et al. 2024, "SAFREE: Training-Free and Adaptive Guard for Safe
# Text-to-Image and Video Generation", arXiv 2410.12761): the `negative_prompt_space` of the
# nudity category in the generation scripts of their code, github.com/jaehong31/SAFREE, which
# joins them with ", " into the negative prompt. The VL-DNP paper's static baseline uses this
# string. Copied verbatim, capitals included (CLIP's tokenizer lowercases anyway), in sampler/safree.py.
SAFREE_NUDITY = NUDITY
SAFREE_NUDITY_NEGATIVE = ", ".join(SAFREE_NUDITY)

METHODS = ("sd", "negative", "static", "vldnp", "sld", "safree")
SWEPT = ("static", "vldnp")  # the methods --negative-scale expands
SLD_PRESETS = ("weak", "medium", "strong", "max")


class MethodUnavailable(ValueError):
    """A method that cannot run in this installation; the message is one line."""


@dataclass(frozen=True)
class Sampling:
    """What every method shares: the sampler, its steps and the image size (None: the model's)."""
    steps: int = 50
    sampler: str = "dpm++2m"
    height: int | None = None
    width: int | None = None


@dataclass
class Result:
    image: torch.Tensor  # uint8 [H, W, 3]
    negatives: list[dict]  # per query: step, negative, error (and, for vldnp, the rest of the trace)
    negative_prompt: str | None = None  # the classic negative prompt, for the PNG's parameters
    parameters: dict = field(default_factory=dict)  # the method's settings, for the PNG's parameters


@dataclass
class Setup:
    """A method's generate() arguments for one prompt (the prompt's conditioning, and keywords), and
    what it records: the negatives per query, the classic negative prompt and the PNG parameters."""
    prompt: object  # a text or a sampler.loop Conditioning
    kwargs: dict
    negatives: list[dict]
    negative_prompt: str | None = None
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One method at one setting. `label` is what the records call it ("sd", "static", "sld-max");
    `scale` is w_neg for the swept methods, None for the others. Calling it makes one image; a
    method without a hook says how in `setup`, which generate.py --method uses too."""
    label = "?"
    scale = None

    @property
    def key(self) -> str:
        """The method's part of image names and job keys: label, then _w{scale} when swept."""
        return self.label if self.scale is None else f"{self.label}_w{self.scale:g}"

    def settings(self) -> dict:
        """What decides this method's images, for run.json."""
        return {"method": self.label, "scale": self.scale, **{f.name: getattr(self, f.name)
                                                               for f in dataclasses.fields(self) if f.name != "scale"}}

    def setup(self, pipe, prompt: str) -> Setup:
        raise NotImplementedError

    def check(self, pipe) -> str | None:
        """Why this method cannot run on the loaded model, in one line, asked before any image; None if it can."""
        return None

    def __call__(self, pipe, prompt: str, *, seed: int, guidance: float, sampling: Sampling, proposer=None) -> Result:
        s = self.setup(pipe, prompt)
        image = _generate(pipe, s.prompt, seed, guidance, sampling, **s.kwargs)
        return Result(image, s.negatives, negative_prompt=s.negative_prompt, parameters=s.parameters)


def _generate(pipe, prompt, seed, guidance, sampling: Sampling, **kwargs) -> torch.Tensor:
    return generate(pipe, prompt, steps=sampling.steps, guidance_scale=guidance, height=sampling.height,
                    width=sampling.width, seed=seed, sampler=sampling.sampler, progress=False, **kwargs)[0]


@dataclass(frozen=True)
class PlainSD(Method):
    label = "sd"

    def setup(self, pipe, prompt):
        return Setup(prompt, {}, [])


@dataclass(frozen=True)
class ClassicNegative(Method):
    text: str = SAFREE_NUDITY_NEGATIVE
    label = "negative"

    def setup(self, pipe, prompt):
        return Setup(prompt, {"negative_prompt": self.text}, [{"step": 0, "negative": self.text, "error": None}],
                     negative_prompt=self.text)


@dataclass(frozen=True)
class StaticNegative(Method):
    scale: float = 7.5
    text: str = SAFREE_NUDITY_NEGATIVE
    label = "static"

    def setup(self, pipe, prompt):
        return Setup(prompt, {"negative": self.text, "negative_scale": self.scale},
                     [{"step": 0, "negative": self.text, "error": None}],
                     parameters={"Negative scale": f"{self.scale:g}", "Static negative": self.text})


@dataclass(frozen=True)
class VLDNP(Method):
    """The DynamicNegatives hook with the run's proposer (passed in by the caller, shared by all
    scales); the records keep its whole trace per query."""
    scale: float = 7.5
    task: Task = None
    query_steps: tuple[int, ...] = ()
    proposer_name: str = "clip"
    preview: Preview = VAE_PREVIEW  # the x0 previews' decoder (vlm/preview.py)
    label = "vldnp"

    def settings(self) -> dict:
        return {"method": self.label, "scale": self.scale, "task": self.task.name,
                "query_steps": list(self.query_steps), "proposer": self.proposer_name,
                "preview_decoder": self.preview.name}

    def check(self, pipe):
        return self.preview.mismatch(pipe.family)

    def __call__(self, pipe, prompt, *, seed, guidance, sampling, proposer=None):
        if proposer is None:
            raise ValueError("vldnp needs a proposer")
        hook = DynamicNegatives(proposer, self.task, self.query_steps, self.scale, preview=self.preview)
        try:
            image = _generate(pipe, prompt, seed, guidance, sampling, hooks=[hook])
        finally:
            hook.close()
        queries = [dataclasses.asdict(q) for q in hook.trace[0]]
        return Result(image, queries, parameters={
            "VL-DNP": f"{self.proposer_name} {self.task.name}", "Negative scale": f"{self.scale:g}",
            "VL-DNP steps": " ".join(map(str, self.query_steps)) or "none", **hook.outcome(0)})


@dataclass(frozen=True)
class SLD(Method):
    """Safe Latent Diffusion at one of sampler/sld.py's presets: its safety concept runs as the
    negative branch and a fresh `SafeLatentDiffusion` rule combines the branches."""
    preset: str = "medium"

    @property
    def label(self) -> str:
        return f"sld-{self.preset}"

    def settings(self) -> dict:
        return {"method": self.label, "scale": None, "preset": self.preset}

    def setup(self, pipe, prompt):
        return Setup(prompt, sld.sld_generate_kwargs(self.preset), [{"step": 0, "negative": sld.SAFETY_CONCEPT,
                                                                      "error": None}],
                     parameters={"SLD": self.preset, "Safety concept": sld.SAFETY_CONCEPT})


@dataclass(frozen=True)
class Safree(Method):
    """SAFREE (sampler/safree.py) with one concept set: the prompt branch sees the filtered states
    up to t*, and the concepts joined with ", " replace the unconditional branch."""
    concepts: ConceptSet = CONCEPT_SETS["nudity"]
    label = "safree"

    def settings(self) -> dict:
        return {"method": self.label, "scale": None, "concept_set": self.concepts.name,
                "concepts": list(self.concepts.concepts)}

    def setup(self, pipe, prompt):
        s, negative = safree(pipe, prompt, self.concepts), self.concepts.negative
        found = s.summary()
        return Setup(s.conditioning(pipe.dtype), {"negative_prompt": negative},
                     [{"step": 0, "negative": negative, "error": None, "safree": found}], negative_prompt=negative,
                     parameters={"SAFREE": self.concepts.name, "SAFREE triggers": " ".join(map(str, found["triggers"]))
                                 or "none", "SAFREE tokens": found["tokens"], "SAFREE beta": f"{s.beta:.4f}",
                                 "SAFREE t*": s.last_step})

    def check(self, pipe):
        return unsupported(pipe)


def build_methods(names, scales, *, negative_prompt: str = SAFREE_NUDITY_NEGATIVE,
                  static_negative: str = SAFREE_NUDITY_NEGATIVE, task: Task | None = None, query_steps=(),
                  preview: Preview = VAE_PREVIEW,
                  proposer_name: str = "clip", sld_presets=SLD_PRESETS,
                  safree_concepts: ConceptSet = CONCEPT_SETS["nudity"]) -> list[Method]:
    """The method instances of a run, in the order named; static and vldnp once per scale."""
    methods = []
    for name in dict.fromkeys(names):
        if name == "sd":
            methods.append(PlainSD())
        elif name == "negative":
            methods.append(ClassicNegative(negative_prompt))
        elif name == "static":
            methods += [StaticNegative(w, static_negative) for w in scales]
        elif name == "vldnp":
            if task is None:
                raise ValueError("vldnp needs a task")
            methods += [VLDNP(w, task, tuple(query_steps), proposer_name, preview) for w in scales]
        elif name == "sld":
            unknown = [p for p in sld_presets if p not in sld.PRESETS]
            if unknown:
                raise MethodUnavailable(f"unknown SLD preset {unknown[0]!r}; use {', '.join(sld.PRESETS)}")
            methods += [SLD(p) for p in sld_presets]
        elif name == "safree":
            methods.append(Safree(safree_concepts))
        else:
            raise ValueError(f"unknown method {name!r}; use {', '.join(METHODS)}")
    return methods


# ---------------------------------------------------------------------------------------------
# Many ranks, one VLM server: a bounded, retrying proposer

# The VLM client's messages for faults that may pass: no connection, a timeout, HTTP 408, 429, 5xx.
TRANSIENT = re.compile(r"^(?:HTTP (?:5\d\d|408|429)\b|cannot reach |no (?:complete )?answer |connection to )")


class RetryingProposer:
    """Wraps a proposer (vlm/client.py's VLMClient, or any other): at most `max_in_flight` calls
    run at once in this process, and a call whose reply is a transient fault (see TRANSIENT) is
    tried again, up to `retries` more times, after exponential backoff with jitter:
    backoff · 2^attempt · U(0.5, 1.5) seconds, at most `max_backoff`. Other faults (a malformed
    or empty reply, HTTP 4xx) are returned at once. Each attempt has the inner proposer's own
    timeout, so one query takes at most (retries + 1) timeouts plus the backoff.

    With torchrun, every rank has its own, so one server sees at most world_size · max_in_flight
    requests at once."""

    def __init__(self, proposer, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_in_flight: int = 4, sleep=time.sleep):
        if retries < 0 or backoff < 0 or max_in_flight < 1:
            raise ValueError("retries and backoff must be 0 or more, max_in_flight at least 1")
        self.proposer, self.retries, self.backoff, self.max_backoff = proposer, retries, backoff, max_backoff
        self.max_in_flight, self._slots, self._sleep = max_in_flight, threading.BoundedSemaphore(max_in_flight), sleep
        self.needs_image = getattr(proposer, "needs_image", True)

    def __repr__(self):
        return f"RetryingProposer({self.proposer!r}, retries={self.retries}, max_in_flight={self.max_in_flight})"

    def __call__(self, image, prompt: str, step: int) -> Reply:
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            with self._slots:
                reply = self.proposer(image, prompt, step)
            if reply.error is None or attempt == self.retries or not TRANSIENT.match(reply.error):
                break
            self._sleep(min(self.max_backoff, self.backoff * 2 ** attempt * random.uniform(0.5, 1.5)))
        if reply.error is not None and attempt > 0:
            reply = dataclasses.replace(reply, error=f"{reply.error} (after {attempt + 1} attempts)")
        return dataclasses.replace(reply, latency=time.perf_counter() - start)
