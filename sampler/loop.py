"""The sampling loop: text -> latents -> sampler steps (sampler/base.py) with classifier-free guidance -> images.

Each step runs the UNet once, batched over every active branch, combines the branches with the
guidance formula (`guide`, the one place it is written), and then calls the hooks. A hook is any
callable taking a `StepState`. It can read x_t, the guided prediction and the predicted clean
image, and it can change `state.guidance`: negative prompts, their scale, the CFG scale. Changes
apply from the step the hook ran at, so the loop re-runs the UNet on the branches whose text
changed, and only on those, before it takes the step.

A branch's conditioning is a text, encoded once per run by the pipeline's text encoders; or an
`Embedded`, hidden states made some other way (SAFREE's projected prompt, methods/safree.py); or a
schedule, any object whose `at(step)` gives the text or Embedded for that step (`Switch`). So a
method that changes what a branch sees over the steps is a Guidance entry, not a fork of this loop.

The UNet's output is ε, or v for v-prediction models (x0 for "sample" ones): the branches'
outputs are named `out_u`, `out_c`, `out_n`, not ε. Guidance is linear, so it combines any of
them by the same formula, and the sampler's `predict` turns the result into (x0, ε).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leaves import Leaves
from sampler.base import SAMPLERS
from sampler.schedule import randn

# An optional guard: whether the images asked for fit in memory, checked before sampling (TooLargeError).
GUARDS = Leaves("guard", {"memory": "sampler.memory:check_memory"})
# An optional part: editing an image instead of drawing one (img2img and inpainting).
EDITS = Leaves("edit", {"img2img": "sampler.edit"})


@dataclass(frozen=True, eq=False)
class Embedded:
    """A branch conditioned on given text-encoder states instead of a text. Equal only to itself,
    so the loop caches it by identity. `text` is the words it stands for, for metadata and for a
    hook that asks about the prompt."""
    hidden: torch.Tensor  # [77, D], as Pipeline.encode_text gives for one text
    pooled: torch.Tensor | None = None  # [P], for models with added conditioning
    text: str = ""


@dataclass(frozen=True)
class Switch:
    """Conditioning that changes once: `before` at steps i <= last_step (0-based), `after` later."""
    before: "str | Embedded"
    after: "str | Embedded"
    last_step: int

    def at(self, step: int) -> "str | Embedded":
        return self.before if step <= self.last_step else self.after


Conditioning = str | Embedded | Switch  # or any object with at(step) -> str | Embedded


def at_step(entry, step: int):
    """What a Guidance entry conditions on at `step`: a text or an Embedded (None stays None)."""
    return entry.at(step) if hasattr(entry, "at") else entry


def words(entry) -> str | None:
    """The text a Guidance entry stands for (at step 0, for a schedule), for metadata and VLM queries."""
    entry = at_step(entry, 0)
    return entry.text if isinstance(entry, Embedded) else entry


@dataclass
class Guidance:
    """The conditioning for each image in the batch. Hooks may change any field. Each entry of
    prompt, uncond and negative is a text or another `Conditioning`.

    uncond:    what the unconditional branch sees: by default the pipeline's `unconditional`, the
               empty text (SDXL: zeros). A classic negative prompt goes here: it replaces the branch.
    negative:  a negative for the three-branch form, or None. Images with None run no extra branch.
    scale:     g, the classifier-free guidance scale (generate's guidance_scale). At g <= 1 with no
               negatives, the unconditional branch is skipped and the output is out_c, as diffusers does.
    negative_scale: w_neg, how hard the three-branch negative pushes: one per image, or one for all.
    rule:      None for `guide`; else a callable (out_u, out_c, out_n, guidance, step) -> guided output
               that combines the branches otherwise, e.g. Safe Latent Diffusion (methods/sld.py); it may
               be called twice for one step (after a hook changed a branch) and must then agree."""
    prompt: list[Conditioning]
    uncond: list[Conditioning]
    negative: list[Conditioning | None]
    negative_scale: list[float] | float
    scale: float = 7.5
    rule: Callable | None = None

    def snapshot(self) -> tuple:
        """Everything the guided output depends on, copied: equal snapshots give the same output."""
        return (tuple(self.prompt), tuple(self.uncond), tuple(self.negative), tuple(self.negative_scales()),
                self.scale, self.rule)

    def negative_scales(self) -> list[float]:
        """w_neg per image."""
        w = self.negative_scale
        return list(w) if isinstance(w, (list, tuple)) else [w] * len(self.prompt)

    def set_negative_scale(self, b: int, w: float):
        """Sets image b's w_neg; the other images keep theirs."""
        self.negative_scale = self.negative_scales()
        self.negative_scale[b] = w

    def rows(self, step: int) -> list[tuple[str, int, str | Embedded]]:
        """The (branch, image, conditioning) rows the UNet must run at `step`: u, c and n for uncond,
        cond, negative. A row's conditioning (a text or an Embedded) is all it depends on besides x_t."""
        B = len(self.prompt)
        has_negative = any(n is not None for n in self.negative)
        rows = [("u", b, at_step(self.uncond[b], step)) for b in range(B)] if self.scale > 1 or has_negative else []
        rows += [("c", b, at_step(self.prompt[b], step)) for b in range(B)]
        return rows + [("n", b, at_step(n, step)) for b, n in enumerate(self.negative) if n is not None]


def guide(out_u, out_c, out_n, scale: float, negative_scales: torch.Tensor | None):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) with an optional negative branch, as in
    VL-DNP (Chang et al. 2025):

        ε = ε_u + g(ε_c − ε_u) − w_neg(ε_n − ε_u)

    out_u, out_c, out_n [B, 4, h, w] are the branches' UNet outputs, ε or v alike (the formula is
    linear). `scale` is g; `negative_scales` [B, 1, 1, 1] holds w_neg per image, 0 where an image has
    no negative. out_n is None when no image has one."""
    out = out_u + scale * (out_c - out_u)
    if out_n is not None:
        out = out - negative_scales * (out_n - out_u)
    return out


@dataclass
class StepState:
    """What a hook sees at step i (of num_steps) at timestep t. `eps` is the positive guided
    prediction as ε, ε_u + g(ε_c − ε_u) with the negative term left out, and `x0` the clean latents
    it predicts, so a hook sees what the prompt is forming (as images: `decode_x0`).

    `outputs` holds the UNet's output per row of `guidance.rows(i)`, (branch, image, conditioning) ->
    [4, h, w]; the rows a hook's change adds are added to the same dict once the hooks have run, so a
    hook that keeps it finds them at the next step. `sampler` is the Sampler (sampler/base.py) taking
    the steps and `eta` the noise it is given, for a hook that weighs a step (methods/dng.py).

    An image edit (sampler/edit.py) takes the last num_steps of a longer schedule: i counts the steps
    it takes. `drawn` [1, 1, h, w] is 1 where x is the sampler's draw and 0 where inpainting with a
    4-channel UNet put the image back; None when all of x is drawn."""
    i: int
    t: int | float  # Euler's "linspace" layout runs the UNet at fractional timesteps
    num_steps: int
    x: torch.Tensor  # [B, 4, h, w], x_t
    eps: torch.Tensor  # [B, 4, h, w]
    x0: torch.Tensor  # [B, 4, h, w]
    guidance: Guidance
    pipe: object = field(repr=False)
    outputs: dict = field(default_factory=dict, repr=False)
    sampler: object = field(default=None, repr=False)
    eta: float = 0.0
    drawn: torch.Tensor | None = field(default=None, repr=False)

    def decode_x0(self, factor: int = 1) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1]; with factor k > 1, a k² times cheaper preview of 8⌈h/k⌉ × 8⌈w/k⌉
        pixels decoded from `pool_latents`."""
        return self.pipe.vae.decode(pool_latents(self.x0, factor))


def pool_latents(x0: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, 4, h, w] -> [B, 4, ⌈h/k⌉, ⌈w/k⌉], the average of each k×k block (k = `factor`); each latent
    mostly encodes its own 8×8 pixels, so this decodes to about the whole image scaled down."""
    if factor <= 1:
        return x0
    h, w = x0.shape[-2:]
    return F.adaptive_avg_pool2d(x0, (-(-h // factor), -(-w // factor)))


Hook = Callable[[StepState], None]


class NonFiniteError(RuntimeError):
    pass


class TextCache:
    """The UNet's conditioning per text or Embedded: the pipeline's text-encoder states, so each
    distinct text is encoded once per run. The loop asks for conditioning only through here."""

    def __init__(self, pipe):
        self.pipe, self.cache = pipe, {}

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [N, 77, D] and pooled [N, P] (None for models without pooled conditioning)."""
        new = list(dict.fromkeys(t for t in items if isinstance(t, str) and t not in self.cache))
        if new:
            hidden, pooled = self.pipe.encode_text(new)
            for k, text in enumerate(new):
                self.cache[text] = (hidden[k], None if pooled is None else pooled[k])
        pairs = [self.cache[t] if isinstance(t, str) else (t.hidden, t.pooled) for t in items]
        hidden = torch.stack([h.to(self.pipe.device, self.pipe.dtype) for h, _ in pairs])  # [N, 77, D]
        if pairs[0][1] is None:
            return hidden, None
        return hidden, torch.stack([p.to(self.pipe.device, self.pipe.dtype) for _, p in pairs])  # [N, P]


@torch.no_grad()
def generate(pipe, prompt, negative_prompt=None, *, steps=50, guidance_scale=None, height=None, width=None,
             batch=1, seed=0, eta=0.0, hooks: list[Hook] = (), negative=None, negative_scale=7.5,
             rule=None, sampler="ddim", original_size=None, crop_top_left=None, target_size=None,
             init_image=None, mask=None, strength=None, progress=True, **renamed) -> torch.Tensor:
    """Generates images; returns uint8 [B, H, W, 3].

    prompt / negative_prompt: a text or other Conditioning, or a list of them, one per prompt.
    `batch` images are made per prompt.
    guidance_scale: g, the classifier-free guidance scale, 7.5 when not given. `guidance=` is its
    old name and still works.
    negative: a fixed three-branch negative (str, or one per prompt); hooks can set it later.
    negative_scale: w_neg, one for all images or one per prompt; hooks can set it per image.
    rule: another way to combine the branches than `guide` (see Guidance.rule).
    sampler: a key of SAMPLERS: "ddim" (eta > 0 adds DDIM's noise), "dpm++2m", "euler" or "euler-a".
    original_size, crop_top_left, target_size: SDXL's micro-conditioning, (height, width) pairs;
    by default the image's size, (0, 0) and the image's size (Pipeline.time_ids).
    init_image: uint8 [H, W, 3], an image to edit (img2img; sampler/edit.py), of the size made;
    `strength` in (0, 1] says how much of it changes (0.8 when not given; 1 with a mask).
    mask: bool [H, W], True where init_image is repainted (inpainting; an inpainting model needs it).
    The initial latents and the DDIM noise come from one CPU generator seeded with `seed`, drawn
    as diffusers draws them, so a seed gives the same image as diffusers' StableDiffusionPipeline
    (and its Img2Img and Inpaint pipelines for an edit)."""
    guidance = guidance_per_image(prompt, batch, negative_prompt, negative, cfg_scale(guidance_scale, renamed),
                                  negative_scale, rule, pipe.unconditional)
    edit = None  # sampler/edit.py, for an edit (or an inpainting model, which needs one)
    if init_image is not None or mask is not None or strength is not None or pipe.inpainting:
        edit = EDITS["img2img"]
        height, width, strength = edit.check_edit(pipe, init_image, mask, strength, height, width)
    height, width = height or pipe.default_size, width or pipe.default_size
    if height % pipe.vae_scale or width % pipe.vae_scale:
        raise ValueError(f"size {height}x{width}: height and width must be multiples of {pipe.vae_scale}, "
                         "the VAE's scale")
    start = 0 if edit is None else edit.first_step(steps, strength)
    if GUARDS.present("memory"):
        GUARDS["memory"](pipe, guidance, height, width, hooks)  # TooLargeError when the images cannot fit
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
    solver = SAMPLERS[sampler](pipe.scheduler, steps, start)

    # 1. Text: the rows of guidance.rows(i) name their texts; each is encoded once, when a row first needs it.
    text = TextCache(pipe)
    sizes = dict(original_size=original_size, crop_top_left=crop_top_left or (0, 0), target_size=target_size)
    time_ids = pipe.time_ids(height, width, **sizes)  # [6] for models with size conditioning, else None
    if time_ids is None and (original_size or crop_top_left or target_size):
        raise ValueError("original_size, crop_top_left and target_size are SDXL's; "
                         "this model takes no size conditioning")

    # 2. x_T = s·z, z ~ N(0, I) drawn in the model's dtype from a CPU generator, as diffusers draws it;
    #    s is the sampler's init_noise_scale (1 but for Euler's "linspace" and "trailing" layouts).
    #    An edit starts from the image's latents noised to the first step it takes instead (sampler/edit.py).
    generator = torch.Generator("cpu").manual_seed(seed)
    B, h, w = len(guidance.prompt), height // pipe.vae_scale, width // pipe.vae_scale
    shape = (B, pipe.vae.config.latent_channels, h, w)
    if edit is None:
        x, known = randn(shape, generator, pipe.device, pipe.dtype) * solver.init_noise_scale, None  # [B, 4, h, w]
    else:
        x, known = edit.start(pipe, solver, init_image, mask, strength, shape, generator)
    extra = None if known is None else known.extra  # [B, 5, h, w]: an inpainting UNet's mask and masked image
    drawn = None if known is None or known.latents is None else known.mask

    # 3. Per step: UNet over the active branches, guidance, x0, hooks, solver step.
    bad_step = torch.tensor(-1, device=pipe.device)  # first step with NaN/inf, found without a sync per step
    for i, t in enumerate(tqdm(solver.timesteps.tolist(), disable=not progress, desc="sampling", leave=False)):
        outputs = run_unet(pipe, x, t, guidance.rows(i), text, time_ids, extra)  # {(branch, b, cond): [4, h, w]}
        out_pos, out = combine(outputs, guidance, i)  # [B, 4, h, w] each: without the negative term, and with
        x0, eps = solver.predict(out_pos, i, x)  # [B, 4, h, w] each
        if hooks:
            before = guidance.snapshot()
            state = StepState(i, t, solver.num_steps, x, eps, x0, guidance, pipe, outputs, solver, eta, drawn)
            for hook in hooks:
                hook(state)
            if guidance.snapshot() != before:  # a text, a scale or the rule changed: re-run new rows only
                outputs.update(run_unet(pipe, x, t, [r for r in guidance.rows(i) if r not in outputs], text,
                                        time_ids, extra))
                _, out = combine(outputs, guidance, i)
        x, _ = solver.step(out, i, x, eta=eta, generator=generator)  # [B, 4, h, w], x at the next timestep
        if known is not None:
            x = known.blend(solver, x, i)  # inpainting with a 4-channel UNet: the image back outside the mask
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(x).all(), i, bad_step)

    # 4. Decode the latents to pixels.
    if bad_step >= 0:
        i = int(bad_step)
        raise non_finite(pipe, f"NaN/inf in the latents at step {i} (t={solver.timesteps[i].item()})")
    images = pipe.vae.decode(x)  # [B, 3, H, W]
    if not torch.isfinite(images).all():
        raise non_finite(pipe, "NaN/inf in the VAE's decoded images, from finite latents")
    return to_uint8(images)


def cfg_scale(guidance_scale, renamed: dict) -> float:
    """generate()'s CFG scale from `guidance_scale` or `guidance`, its old name, given in `renamed`."""
    unknown = set(renamed) - {"guidance"}
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument {min(unknown)!r}")
    if "guidance" not in renamed:
        return 7.5 if guidance_scale is None else guidance_scale
    if guidance_scale is not None:
        raise TypeError("generate() got both guidance_scale and guidance, its old name; give guidance_scale")
    return renamed["guidance"]


def guidance_per_image(prompt, batch, negative_prompt, negative, scale, negative_scale, rule,
                       unconditional="") -> Guidance:
    """The Guidance of generate()'s arguments, `batch` images per prompt."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    B = len(prompts) * batch

    def per_image(v):  # one value for all, or one per prompt, repeated for the prompt's batch images
        if not isinstance(v, (list, tuple)):
            return [v] * B
        if len(v) != len(prompts):
            raise ValueError(f"got {len(v)} values for {len(prompts)} prompts; give one, or one per prompt")
        return [p for p in v for _ in range(batch)]

    return Guidance(prompt=per_image(prompts), negative=per_image(negative),
                    uncond=per_image(unconditional if negative_prompt is None else negative_prompt),
                    negative_scale=per_image(negative_scale), scale=scale, rule=rule)


def run_unet(pipe, x, t, rows, text, time_ids=None, extra=None) -> dict:
    """One batched UNet call over `rows` of (branch, image, conditioning); returns {row: model output}.
    `extra` [B, C, h, w] is what an inpainting UNet takes beside each image's x_t."""
    if not rows:
        return {}
    latents = x if extra is None else torch.cat([x, extra], dim=1)  # [B, 4 (+5), h, w]
    latents = latents[[b for _, b, _ in rows]]  # [R, 4 (+5), h, w]
    hidden, pooled = text([cond for _, _, cond in rows])  # [R, 77, D], [R, P] or None
    if pooled is None:
        out = pipe.unet(latents, t, hidden)  # [R, 4, h, w]
    else:
        out = pipe.unet(latents, t, hidden, pooled=pooled, time_ids=time_ids.expand(len(rows), -1))
    return dict(zip(rows, out))


def combine(outputs: dict, guidance: Guidance, step: int):
    """Stacks the branch outputs per image and applies `guide` (or `guidance.rule`). Returns the
    guided output without the negative term, and the full guided output, each [B, 4, h, w]."""
    rows = guidance.rows(step)
    pick = lambda branch: torch.stack([outputs[row] for row in rows if row[0] == branch])  # [B, 4, h, w]
    out_c = pick("c")
    out_u = pick("u") if rows[0][0] == "u" else out_c  # no uncond branch: the output is out_c
    positive = guide(out_u, out_c, None, guidance.scale, None)
    if guidance.rule is None and all(n is None for n in guidance.negative):
        return positive, positive
    out_n = torch.stack([outputs[("n", b, at_step(n, step))] if n is not None else out_u[b]
                         for b, n in enumerate(guidance.negative)])
    if guidance.rule is not None:
        return positive, guidance.rule(out_u, out_c, out_n, guidance, step)
    w = torch.tensor([0.0 if n is None else w for n, w in zip(guidance.negative, guidance.negative_scales())],
                     dtype=out_c.dtype, device=out_c.device)
    return positive, guide(out_u, out_c, out_n, guidance.scale, w[:, None, None, None])


def non_finite(pipe, what: str) -> NonFiniteError:
    dtype = str(pipe.dtype).removeprefix("torch.")
    hint = "try --dtype fp32" if pipe.dtype != torch.float32 else "the weights may be broken"
    return NonFiniteError(f"{what} in {dtype}; {hint}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounded as diffusers rounds."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)
