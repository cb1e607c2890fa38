"""The sampling loop: text -> latents -> DDIM or DPM-Solver++ steps with classifier-free guidance -> images.

Each step runs the UNet once, batched over every active branch, combines the branches with the
guidance formula (`guide`, the one place it is written), and then calls the hooks. A hook is any
callable taking a `StepState`. It can read x_t, the guided prediction and the predicted clean
image, and it can change `state.guidance`: negative prompts, their scale, the CFG scale. Changes
apply from the step the hook ran at, so the loop re-runs the UNet on the branches whose text
changed, and only on those, before it takes the step.
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
    scale:     g, the classifier-free guidance scale. At g <= 1 with no negatives, the unconditional
               branch is skipped and ε = ε_c, as diffusers does.
    negative_scale: w_neg, how hard the three-branch negative pushes.
    rule:      None for `guide`; else a callable (eps_u, eps_c, eps_n, guidance, step) -> ε that
               combines the same branches differently, e.g. Safe Latent Diffusion (sampler/sld.py).
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
        """Everything the guided ε depends on, copied: equal snapshots give the same ε."""
        return (tuple(self.prompt), tuple(self.uncond), tuple(self.negative), self.scale, self.negative_scale,
                self.rule)

    def rows(self) -> list[tuple[str, int, str]]:
        """The (branch, image, text) rows the UNet must run: u, c and n for uncond, cond, negative."""
        B = len(self.prompt)
        has_negative = any(n is not None for n in self.negative)
        rows = [("u", b, self.uncond[b]) for b in range(B)] if self.scale > 1 or has_negative else []
        rows += [("c", b, self.prompt[b]) for b in range(B)]
        return rows + [("n", b, n) for b, n in enumerate(self.negative) if n is not None]


def guide(eps_u, eps_c, eps_n, g: float, w: torch.Tensor):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) with an optional negative branch, as in
    VL-DNP (Chang et al. 2025): ε = ε_u + g(ε_c − ε_u) − w_neg(ε_n − ε_u). `w` holds w_neg per image,
    0 where an image has no negative; eps_n is None when no image has one."""
    eps = eps_u + g * (eps_c - eps_u)
    if eps_n is not None:
        eps = eps - w * (eps_n - eps_u)
    return eps


@dataclass
class StepState:
    """What a hook sees at step i (of num_steps) at timestep t. `eps` is the positive guided
    prediction ε_u + g(ε_c − ε_u), the negative term left out, and `x0` the clean latents it
    predicts, so a hook sees what the prompt is forming. `decode_x0()` gives them as images in
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
    """Text encoder outputs by prompt, so each distinct text is encoded once per run."""

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
def generate(pipe, prompt, negative_prompt=None, *, steps=50, guidance=7.5, height=None, width=None,
             batch=1, seed=0, eta=0.0, hooks: list[Hook] = (), negative=None, negative_scale=7.5,
             rule=None, sampler="ddim", progress=True) -> torch.Tensor:
    """Generates images; returns uint8 [B, H, W, 3].

    prompt / negative_prompt: a string or one per image. `batch` images are made per prompt.
    negative: a fixed three-branch negative (str, or one per image); hooks can set it later.
    rule: another way to combine the branches than `guide` (see Guidance.rule).
    sampler: a key of SAMPLERS, "ddim" or "dpm++2m" (deterministic: eta must be 0).
    The initial latents and the DDIM noise come from one CPU generator seeded with `seed`, drawn
    as diffusers draws them, so a seed gives the same image as diffusers' StableDiffusionPipeline."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    B = len(prompts) * batch

    def per_image(v):  # one value for all, or one per prompt, repeated for the prompt's batch images
        if v is None or isinstance(v, str):
            return [v] * B
        if len(v) != len(prompts):
            raise ValueError(f"got {len(v)} negative prompts for {len(prompts)} prompts")
        return [p for p in v for _ in range(batch)]

    g = Guidance(prompt=per_image(prompts), uncond=per_image(negative_prompt or ""), negative=per_image(negative),
                 scale=guidance, negative_scale=negative_scale, rule=rule)
    height, width = height or pipe.default_size, width or pipe.default_size
    if height % pipe.vae_scale or width % pipe.vae_scale:
        raise ValueError(f"size {height}x{width}: height and width must be multiples of {pipe.vae_scale}, "
                         "the VAE's scale")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
    solver = SAMPLERS[sampler](pipe.scheduler, steps)
    text = TextCache(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)

    shape = (B, pipe.unet.config.in_channels, height // pipe.vae_scale, width // pipe.vae_scale)
    x = randn(shape, generator, pipe.device, pipe.dtype)  # x_T ~ N(0, I), drawn in the model's dtype
    bad_step = torch.tensor(-1, device=pipe.device)  # first step with NaN/inf, found without a sync per step
    for i, t in enumerate(tqdm(solver.timesteps.tolist(), disable=not progress, desc="sampling", leave=False)):
        outputs = run_unet(pipe, x, t, g.rows(), text)
        eps_pos, eps = combine(outputs, g, i)
        x0, eps_pos = solver.predict(eps_pos, i, x)
        if hooks:
            before = g.snapshot()
            state = StepState(i, t, steps, x, eps_pos, x0, g, pipe)
            for hook in hooks:
                hook(state)
            if g.snapshot() != before:  # a text, a scale or the rule changed, or a negative went
                outputs.update(run_unet(pipe, x, t, [r for r in g.rows() if r not in outputs], text))
                _, eps = combine(outputs, g, i)
        x, _ = solver.step(eps, i, x, eta=eta, generator=generator)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(x).all(), i, bad_step)

    dtype = str(pipe.dtype).removeprefix("torch.")
    hint = "try --dtype fp32" if pipe.dtype != torch.float32 else "the weights may be broken"
    if bad_step >= 0:
        i = int(bad_step)
        raise NonFiniteError(f"NaN/inf in the latents at step {i} (t={solver.timesteps[i].item()}) in {dtype}; {hint}")
    images = pipe.vae.decode(x)  # [B, 3, H, W]
    if not torch.isfinite(images).all():
        raise NonFiniteError(f"NaN/inf in the VAE's decoded images, from finite latents, in {dtype}; {hint}")
    return to_uint8(images)


def run_unet(pipe, x, t, rows, text) -> dict:
    """One batched UNet call over `rows` of (branch, image, text); returns {row: model output}."""
    if not rows:
        return {}
    latents = x[[b for _, b, _ in rows]]  # [R, 4, h, w]
    out = pipe.unet(latents, t, text([txt for _, _, txt in rows]))  # [R, 4, h, w]
    return dict(zip(rows, out))


def combine(outputs: dict, g: Guidance, step: int):
    """Stacks the branch outputs per image and applies `guide` (or `g.rule`). Returns (positive,
    full) guidance."""
    rows = g.rows()
    pick = lambda branch, texts: torch.stack([outputs[(branch, b, text)] for b, text in enumerate(texts)])
    eps_c = pick("c", g.prompt)
    eps_u = pick("u", g.uncond) if rows[0][0] == "u" else eps_c  # no uncond branch: ε = ε_c
    positive = guide(eps_u, eps_c, None, g.scale, None)
    if g.rule is None and all(n is None for n in g.negative):
        return positive, positive
    eps_n = torch.stack([outputs[("n", b, n)] if n is not None else eps_u[b] for b, n in enumerate(g.negative)])
    if g.rule is not None:
        return positive, g.rule(eps_u, eps_c, eps_n, g, step)
    w = torch.tensor([0.0 if n is None else g.negative_scale for n in g.negative], dtype=eps_c.dtype,
                     device=eps_c.device)
    return positive, guide(eps_u, eps_c, eps_n, g.scale, w[:, None, None, None])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounded as diffusers rounds."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)
