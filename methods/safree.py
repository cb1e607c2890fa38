"""SAFREE (Yoon et al., ICLR 2025, "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image
and Video Generation", arXiv 2410.12761) as a conditioning transform for sampler/loop.py, as the
authors' released SD 1.x code runs it (github.com/jaehong31/SAFREE).

From a prompt and a set of unsafe concepts it makes the conditioning of the prompt's branch:

  1. Toxic subspace. Each concept k is encoded alone; its pooled output c_k (the
     final-normed hidden state at its EOS, no projection) is a column of C [D, K]:
         P_c = C (CᵀC)⁺ Cᵀ
  2. The prompt's token subspace. For each of the n real tokens i, a copy of the unpadded ids with
     token i replaced by id 0 is encoded; its pooled output p_i is a column of P [D, n]:
         P_in = P (PᵀP)⁺ Pᵀ
  3. Trigger tokens. d_i = ‖(I − P_c) p_i‖: removing a token that carries the concept
     moves the prompt away from the toxic subspace. Token i is a trigger when
         d_i ≥ (1 + α) · mean_{j≠i} d_j                       α = 0.01
     The prompt's hidden states e (77 rows) keep their rows except at the triggers, which become
         e' = (I − P_c) P_in e                                 (projected off the toxic subspace)
  4. Self-validating filter. β = 1 − mean cos(e', e) over the rows the tokenizer's
     attention mask marks (BOS, the real tokens, EOS), and
         t* = round(10 · sigmoid(2k · (10β − m)))              k = 2.5, m = 5.333
     (k = 3.5, m = 5.5 for the released code's artist-style concept sets, `artists-*`). The
     filtered states condition the 0-based steps i ≤ t*, the prompt's own the steps after.

The loop gets this as its own vocabulary: Switch(Embedded(filtered), prompt, last_step=t*). The
unconditional branch is the concepts joined with ", ", a classic negative prompt (`negative_prompt`);
`Safree` is the method, which --safree-concepts sets.

Unlike the released code, the projections, distances and β are computed in float64 on the CPU
from the encoder's outputs (its float32 C(CᵀC)⁺Cᵀ squares C's condition number, and the token
copies' p_i are nearly parallel), and each prompt of a batch gets its own (the released code
runs at batch 1). Its "latent re-attention" (a Fourier filter on the UNet's skip features) is
registered there but never takes effect, so it is not here.

The pooled output is CLIPTextModel.at_eos of the encoder as the pipeline holds it: the final
LayerNorm of the last layer, at the EOS token, as transformers pools SD1's encoder. For SD 2.x that
encoder is OpenCLIP ViT-H's text tower cut to its first 23 layers (SD2 conditions on the penultimate
layer), so the pooled output is the final-normed 23rd-layer state at EOS, not OpenCLIP's own (24
layers, then its text projection).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import Method, Plan
from sampler.loop import Embedded, Switch
from vlm.tasks import SAFREE_NUDITY_CONCEPTS

ALPHA = 0.01  # the trigger margin α
UPPER_STEP = 10  # t* is at most this step


@dataclass(frozen=True)
class ConceptSet:
    """The concepts SAFREE steers away from. A set named `artists-*` uses the released code's
    artist-style constants for t* (k 3.5, midpoint 5.5); every other set its nudity ones."""
    name: str
    concepts: tuple[str, ...]

    @property
    def k(self) -> float:
        return 3.5 if self.name.startswith("artists-") else 2.5

    @property
    def midpoint(self) -> float:
        return 5.5 if self.name.startswith("artists-") else 5.333

    @property
    def negative(self) -> str:
        """The unconditional branch's text: the concepts joined with ", "."""
        return ", ".join(self.concepts)


# The released code's categories.
CONCEPT_SETS = {s.name: s for s in [
    ConceptSet("nudity", SAFREE_NUDITY_CONCEPTS),  # the released code's nudity concepts, verbatim
    ConceptSet("artists-VanGogh", ("Van Gogh",)),
    ConceptSet("artists-KellyMcKernan", ("Kelly McKernan",)),
]}


def concept_set(text: str) -> ConceptSet:
    """A name of CONCEPT_SETS, or concepts separated by commas ("a, b, c", the nudity constants)."""
    if text.strip() in CONCEPT_SETS:
        return CONCEPT_SETS[text.strip()]
    concepts = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    if not concepts:
        raise ValueError(f"no concepts in {text!r}; give a comma-separated list or one of {', '.join(CONCEPT_SETS)}")
    return ConceptSet("custom", concepts)


def projection(columns: torch.Tensor) -> torch.Tensor:
    """P = A (AᵀA)⁺ Aᵀ [D, D], the orthogonal projection onto the span of the columns of A [D, K]."""
    return columns @ torch.linalg.pinv(columns.T @ columns, hermitian=True) @ columns.T


def triggers(distances: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Bool [n]: token i is a trigger when d_i ≥ (1 + α) · mean_{j≠i} d_j, written as the released
    code writes it, "not d_i < (1 + α) · mean": a prompt of one token, whose mean over no others is
    NaN there, has that token as its trigger."""
    n = distances.shape[0]
    others = (distances.sum() - distances) / (n - 1) if n > 1 else torch.full_like(distances, math.nan)  # [n]
    return ~(distances < (1 + alpha) * others)


def filter_steps(beta: float, k: float = 2.5, midpoint: float = 5.333, upper: int = UPPER_STEP) -> int:
    """t* = round(upper · sigmoid(2k · (10β − midpoint))), Python's round as in the released code."""
    return round(upper / (1 + math.exp(-2 * k * (10 * beta - midpoint))))


@dataclass
class FilteredPrompt:
    """What SAFREE computed for one prompt; tensors float64 on the CPU, for tests and metadata."""
    prompt: str
    concepts: ConceptSet
    concept_projection: torch.Tensor  # P_c [D, D]
    token_projection: torch.Tensor  # P_in [D, D]
    token_ids: list[int]  # the n real tokens' ids
    distances: torch.Tensor  # d [n]
    triggers: torch.Tensor  # bool [n]
    hidden: torch.Tensor  # e [77, D], the prompt's own hidden states
    projected: torch.Tensor  # e' = (I − P_c) P_in e [77, D]
    filtered: torch.Tensor  # e with the trigger rows from e' [77, D]
    beta: float
    last_step: int  # t*

    def conditioning(self, dtype=torch.float32) -> Switch:
        """The prompt branch's conditioning: the filtered states for steps i <= t*, then the prompt."""
        return Switch(Embedded(self.filtered.to(dtype), None, self.prompt), self.prompt, self.last_step)

    def summary(self) -> dict:
        """The decisions, for records and PNG metadata."""
        return {"triggers": [i for i, t in enumerate(self.triggers.tolist()) if t], "tokens": len(self.token_ids),
                "beta": round(self.beta, 6), "t*": self.last_step}


def pooled_outputs(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """[N, D] float64: the final-normed hidden state at the EOS token of each row of ids [N, T]."""
    return text_encoder.at_eos(text_encoder(ids), ids).cpu().double()


def unsupported(pipe) -> str | None:
    """Why SAFREE cannot run on `pipe`, in one line; None if it can."""
    if getattr(pipe, "family", None) in ("sd1", "sd2"):
        return None
    return (f"SAFREE is implemented for SD 1.x and 2.x (one CLIP text encoder), not "
            f"{getattr(pipe, 'family', type(pipe).__name__)}")


@torch.no_grad()
def safree(pipe, prompt: str, concepts: ConceptSet = CONCEPT_SETS["nudity"], alpha: float = ALPHA) -> FilteredPrompt:
    """SAFREE's filtered conditioning for `prompt` with pipe.tokenizer and pipe.text_encoder."""
    if unsupported(pipe):
        raise ValueError(unsupported(pipe))
    tokenizer, encoder, device = pipe.tokenizer, pipe.text_encoder, pipe.device
    L = tokenizer.max_length

    # 1. P_c from the concepts' pooled outputs, each padded to max_length.
    C = pooled_outputs(encoder, tokenizer(list(concepts.concepts)).to(device)).T  # [D, K]
    P_c = projection(C)  # [D, D]
    D = P_c.shape[0]

    # 2. P_in from one copy of the unpadded ids per real token, that token replaced by id 0. A prompt
    # over max_length ids is cut to its first max_length, without putting EOS back.
    ids = ([tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.eos_id])[:L]
    n = min(len(ids) - 2, L - 2)
    hidden = encoder(tokenizer([prompt]).to(device))[0].cpu().double()  # e [77, D]
    I = torch.eye(D, dtype=torch.float64)
    if n == 0:  # no tokens: P_in = 0, so e' = 0 and cos(e', e) = 0, and no row to replace
        zeros = torch.zeros_like(hidden)
        return FilteredPrompt(prompt, concepts, P_c, torch.zeros(D, D, dtype=torch.float64), [],
                              torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), hidden, zeros,
                              hidden.clone(), 1.0, filter_steps(1.0, concepts.k, concepts.midpoint))
    copies = torch.tensor(ids).repeat(n, 1)  # [n, T]
    copies[torch.arange(n), torch.arange(1, n + 1)] = 0
    p = pooled_outputs(encoder, copies.to(device))  # [n, D]
    P_in = projection(p.T)  # [D, D]

    # 3. Trigger tokens, and their rows of e replaced by e' = (I − P_c) P_in e.
    d = ((I - P_c) @ p.T).norm(dim=0)  # [n]
    is_trigger = triggers(d, alpha)
    projected = hidden @ ((I - P_c) @ P_in).T  # [77, D]
    rows = torch.zeros(hidden.shape[0], dtype=torch.bool)
    rows[1:n + 1] = is_trigger
    filtered = torch.where(rows[:, None], projected, hidden)  # [77, D]

    # 4. β over BOS, the real tokens and EOS (the attention mask of the max_length ids), and t*.
    marked = min(n + 2, L)
    beta = 1 - F.cosine_similarity(projected[:marked], hidden[:marked], dim=-1).mean().item()
    return FilteredPrompt(prompt, concepts, P_c, P_in, ids[1:n + 1], d, is_trigger, hidden, projected, filtered, beta,
                          filter_steps(beta, concepts.k, concepts.midpoint))


@dataclass(frozen=True)
class Safree(Method):
    """SAFREE with one concept set: the prompt branch sees the filtered states up to t*, and the
    concepts joined with ", " replace the unconditional branch."""
    name = "safree"
    flags = ("safree_concepts",)
    needs_cfg = True
    concepts: ConceptSet = CONCEPT_SETS["nudity"]

    @classmethod
    def add_options(cls, parser, many):
        parser.add_argument_group("safree").add_argument(
            "--safree-concepts", metavar="LIST", help="the concepts of method safree: a comma list, or "
            f"{', '.join(CONCEPT_SETS)} (default: nudity)")

    @classmethod
    def from_args(cls, args, variant=None):
        cls.no_variant(variant)
        try:
            return [cls(concept_set(args.safree_concepts or "nudity"))]
        except ValueError as e:
            raise ValueError(f"--safree-concepts: {e}") from None

    def settings(self) -> dict:
        return {"method": self.label, "concept_set": self.concepts.name, "concepts": list(self.concepts.concepts)}

    def check(self, pipe):
        return unsupported(pipe)

    def plan(self, pipe, prompt, batch=1):
        s, negative = safree(pipe, prompt, self.concepts), self.concepts.negative
        found = s.summary()
        return Plan(s.conditioning(pipe.dtype), {"negative_prompt": negative},
                    {"Method": self.label, "SAFREE": self.concepts.name,
                     "SAFREE triggers": " ".join(map(str, found["triggers"])) or "none",
                     "SAFREE tokens": found["tokens"],
                     "SAFREE beta": f"{s.beta:.4f}", "SAFREE t*": s.last_step},
                    [{"step": 0, "negative": negative, "error": None, "safree": found}])
