"""The sampling loop: text -> latents -> DDIM or DPM-Solver++ steps with classifier-free guidance -> images.

Each step runs the UNet once, batched over every active branch, combines the branches with the
guidance formula (`guide`, the one place it is written), and then calls the hooks. A hook is any
callable taking a `StepState`. It can read x_t, the guided prediction and the predicted clean
image, and it can change `state.guidance`: negative prompts, their scale, the CFG scale. Changes
apply from the step the hook ran at, so the loop re-runs the UNet on the branches whose text
changed, and only on those, before it takes the step.

The UNet's output is ε, or v for v-prediction models (x0 for "sample" ones): the branches'
outputs are named `out_u`, `out_c`, `out_n`, not ε. Guidance is linear, so it combines any of
them by the same formula, and the sampler's `predict` turns the result into (x0, ε).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sampler.base import SAMPLERS
from sampler.schedule import randn


@dataclass
class Guidance:
    """The conditioning for each image in the batch. Hooks may change any field.

    uncond:    what the unconditional branch sees, "" by default. A classic negative prompt goes
               here: it replaces the unconditional branch.
    negative:  a negative for the three-branch form, or None. Images with None run no extra branch.
    scale:     g, the classifier-free guidance scale (generate's guidance_scale). At g <= 1 with no
               negatives, the unconditional branch is skipped and the output is out_c, as diffusers does.
    negative_scale: w_neg, how hard the three-branch negative pushes.
    rule:      None for `guide`; else a callable (out_u, out_c, out_n, guidance, step) -> guided output
               that combines the same branches differently, e.g. Safe Latent Diffusion (sampler/sld.py).
               It may be called twice for one step (after a hook changed a branch) and must then
               give the same answer.
    """
    prompt: list[str]
    uncond: list[str]
    negative: list[str | None]
    scale: float = 7.5
    negative_scale: float = 7.5
    rule: Callable | None = None

    def snapshot(self) -> tuple:
        """Everything the guided output depends on, copied: equal snapshots give the same output."""
        return (tuple(self.prompt), tuple(self.uncond), tuple(self.negative), self.scale, self.negative_scale,
                self.rule)

    def rows(self) -> list[tuple[str, int, str]]:
        """The (branch, image, text) rows the UNet must run: u, c and n for uncond, cond, negative.
        A row's text is all its conditioning, encoded by `TextCache`."""
        B = len(self.prompt)
        has_negative = any(n is not None for n in self.negative)
        rows = [("u", b, self.uncond[b]) for b in range(B)] if self.scale > 1 or has_negative else []
        rows += [("c", b, self.prompt[b]) for b in range(B)]
        return rows + [("n", b, n) for b, n in enumerate(self.negative) if n is not None]


def guide(out_u, out_c, out_n, scale: float, negative_scales: torch.Tensor | None):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) with an optional negative branch, as in
    VL-DNP (Chang et al. 2025):

        ε = ε_u + g(ε_c − ε_u) − w_neg(ε_n − ε_u)

    out_u, out_c, out_n are the UNet's outputs for the three branches [B, 4, h, w]: ε, or v for
    v-prediction models; the formula is linear, so it is the same for either. `scale` is g;
    `negative_scales` [B, 1, 1, 1] holds w_neg per image, 0 where an image has no negative. out_n
    is None when no image has one."""
    out = out_u + scale * (out_c - out_u)
    if out_n is not None:
        out = out - negative_scales * (out_n - out_u)
    return out


@dataclass
class StepState:
    """What a hook sees at step i (of num_steps) at timestep t. `eps` is the positive guided
    prediction as ε, ε_u + g(ε_c − ε_u) with the negative term left out, and `x0` the clean latents
    it predicts, so a hook sees what the prompt is forming. `decode_x0()` gives them as images in
    [-1, 1]; `decode_x0(k)` a k times smaller preview, for a viewer that looks at no more."""
    i: int
    t: int
    num_steps: int
    x: torch.Tensor  # [B, 4, h, w], x_t
    eps: torch.Tensor  # [B, 4, h, w]
    x0: torch.Tensor  # [B, 4, h, w]
    guidance: Guidance
    pipe: object = field(repr=False)

    def decode_x0(self, factor: int = 1) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1]. With factor k > 1, a preview of about H/k × W/k decoded from
        x0 average-pooled over k×k latents (8⌈h/k⌉ × 8⌈w/k⌉ pixels for h × w latents): about k²
        times cheaper, and an approximation of the whole image scaled down, since each latent
        mostly encodes its own 8×8 pixels."""
        x0 = self.x0
        if factor > 1:
            h, w = x0.shape[-2:]
            x0 = F.adaptive_avg_pool2d(x0, (-(-h // factor), -(-w // factor)))  # [B, 4, ⌈h/k⌉, ⌈w/k⌉]
        return self.pipe.vae.decode(x0)


Hook = Callable[[StepState], None]


class NonFiniteError(RuntimeError):
    pass


class TextCache:
    """The UNet's conditioning by text: the text encoder's hidden states, so each distinct text is
    encoded once per run. The loop asks for conditioning only through here."""

    def __init__(self, pipe):
        self.pipe, self.cache = pipe, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            ids = self.pipe.tokenizer(new).to(self.pipe.device)
            for text, hidden in zip(new, self.pipe.text_encoder(ids)):
                self.cache[text] = hidden
        return torch.stack([self.cache[t] for t in texts])  # [len(texts), 77, D]


@torch.no_grad()
def generate(pipe, prompt, negative_prompt=None, *, steps=50, guidance_scale=None, height=None, width=None,
             batch=1, seed=0, eta=0.0, hooks: list[Hook] = (), negative=None, negative_scale=7.5,
             rule=None, sampler="ddim", progress=True, **renamed) -> torch.Tensor:
    """Generates images; returns uint8 [B, H, W, 3].

    prompt / negative_prompt: a string or one per image. `batch` images are made per prompt.
    guidance_scale: g, the classifier-free guidance scale, 7.5 when not given. `guidance=` is its
    old name and still works.
    negative: a fixed three-branch negative (str, or one per image); hooks can set it later.
    rule: another way to combine the branches than `guide` (see Guidance.rule).
    sampler: a key of SAMPLERS, "ddim" or "dpm++2m" (deterministic: eta must be 0).
    The initial latents and the DDIM noise come from one CPU generator seeded with `seed`, drawn
    as diffusers draws them, so a seed gives the same image as diffusers' StableDiffusionPipeline."""
    guidance = guidance_per_image(prompt, batch, negative_prompt, negative, cfg_scale(guidance_scale, renamed),
                                  negative_scale, rule)
    height, width = height or pipe.default_size, width or pipe.default_size
    if height % pipe.vae_scale or width % pipe.vae_scale:
        raise ValueError(f"size {height}x{width}: height and width must be multiples of {pipe.vae_scale}, "
                         "the VAE's scale")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
    solver = SAMPLERS[sampler](pipe.scheduler, steps)

    # 1. Text: the rows of guidance.rows() name their texts; each is encoded once, when a row first needs it.
    text = TextCache(pipe)

    # 2. x_T ~ N(0, I), drawn in the model's dtype from a CPU generator, as diffusers draws it.
    generator = torch.Generator("cpu").manual_seed(seed)
    B, h, w = len(guidance.prompt), height // pipe.vae_scale, width // pipe.vae_scale
    x = randn((B, pipe.unet.config.in_channels, h, w), generator, pipe.device, pipe.dtype)  # [B, 4, h, w]

    # 3. Per step: UNet over the active branches, guidance, x0, hooks, solver step.
    bad_step = torch.tensor(-1, device=pipe.device)  # first step with NaN/inf, found without a sync per step
    for i, t in enumerate(tqdm(solver.timesteps.tolist(), disable=not progress, desc="sampling", leave=False)):
        outputs = run_unet(pipe, x, t, guidance.rows(), text)  # {(branch, b, text): [4, h, w]}
        out_pos, out = combine(outputs, guidance, i)  # [B, 4, h, w] each: without the negative term, and with
        x0, eps = solver.predict(out_pos, i, x)  # [B, 4, h, w] each
        if hooks:
            before = guidance.snapshot()
            state = StepState(i, t, steps, x, eps, x0, guidance, pipe)
            for hook in hooks:
                hook(state)
            if guidance.snapshot() != before:  # a text, a scale or the rule changed: re-run new rows only
                outputs.update(run_unet(pipe, x, t, [r for r in guidance.rows() if r not in outputs], text))
                _, out = combine(outputs, guidance, i)
        x, _ = solver.step(out, i, x, eta=eta, generator=generator)  # [B, 4, h, w], x at the next timestep
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


def guidance_per_image(prompt, batch, negative_prompt, negative, scale, negative_scale, rule) -> Guidance:
    """The Guidance of generate()'s arguments, `batch` images per prompt."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    B = len(prompts) * batch

    def per_image(v):  # one value for all, or one per prompt, repeated for the prompt's batch images
        if v is None or isinstance(v, str):
            return [v] * B
        if len(v) != len(prompts):
            raise ValueError(f"got {len(v)} negative prompts for {len(prompts)} prompts")
        return [p for p in v for _ in range(batch)]

    return Guidance(prompt=per_image(prompts), uncond=per_image(negative_prompt or ""), negative=per_image(negative),
                    scale=scale, negative_scale=negative_scale, rule=rule)


def run_unet(pipe, x, t, rows, text) -> dict:
    """One batched UNet call over `rows` of (branch, image, text); returns {row: model output}."""
    if not rows:
        return {}
    latents = x[[b for _, b, _ in rows]]  # [R, 4, h, w]
    out = pipe.unet(latents, t, text([txt for _, _, txt in rows]))  # [R, 4, h, w]
    return dict(zip(rows, out))


def combine(outputs: dict, guidance: Guidance, step: int):
    """Stacks the branch outputs per image and applies `guide` (or `guidance.rule`). Returns the
    guided output without the negative term, and the full guided output, each [B, 4, h, w]."""
    rows = guidance.rows()
    pick = lambda branch, texts: torch.stack([outputs[(branch, b, text)] for b, text in enumerate(texts)])
    out_c = pick("c", guidance.prompt)
    out_u = pick("u", guidance.uncond) if rows[0][0] == "u" else out_c  # no uncond branch: the output is out_c
    positive = guide(out_u, out_c, None, guidance.scale, None)
    if guidance.rule is None and all(n is None for n in guidance.negative):
        return positive, positive
    out_n = torch.stack([outputs[("n", b, n)] if n is not None else out_u[b]
                         for b, n in enumerate(guidance.negative)])
    if guidance.rule is not None:
        return positive, guidance.rule(out_u, out_c, out_n, guidance, step)
    w = torch.tensor([0.0 if n is None else guidance.negative_scale for n in guidance.negative], dtype=out_c.dtype,
                     device=out_c.device)
    return positive, guide(out_u, out_c, out_n, guidance.scale, w[:, None, None, None])


def non_finite(pipe, what: str) -> NonFiniteError:
    dtype = str(pipe.dtype).removeprefix("torch.")
    hint = "try --dtype fp32" if pipe.dtype != torch.float32 else "the weights may be broken"
    return NonFiniteError(f"{what} in {dtype}; {hint}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounded as diffusers rounds."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)
