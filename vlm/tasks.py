"""What the proposer is asked, and how its answer becomes a negative prompt.

A task pairs a question for a VLM (and a concept list for the CLIP proposer) with the two
functions that turn the answer into a negative: `parse` (reply text -> items) and `negative`
(items -> one negative prompt, or None when there are none), and names the static baselines' fixed
negative for the same concern (`static_negative`). The reply is data, never an instruction: it is
capped at MAX_REPLY_CHARS before parsing, and all it can ever become is a negative prompt cut to the
text encoder's 77 tokens.

    nudity    the question and mapping of VL-DNP (Chang et al. 2025, arXiv 2510.26052);
              each query replaces the previous negative.
    safety, creative   open vocabulary (vlm/open_tasks.py, a leaf)
"""
import re
from dataclasses import dataclass
from typing import Callable

from leaves import Leaves

MAX_REPLY_CHARS = 4096  # longer replies are faults (client) or cut (parse); 64 tokens are ~300 chars
MAX_NEGATIVE_CHARS = 1000  # cut before tokenizing; 75 tokens fit well within it


@dataclass(frozen=True)
class Task:
    """name: the --vlm-task value. question: what a VLM is asked. concepts: the phrases the CLIP proposer scores. mode:
    "replace" (each answer replaces the negative) or "accumulate" (answers add up). parse_reply: reply text -> items;
    format: items -> negative text. Use them through `parse` and `negative`, which add the length caps. static_negative:
    the fixed negative that stands for the whole concern, for the baselines that do not look (static, negative)."""
    name: str
    question: str
    concepts: tuple[str, ...]
    mode: str
    parse_reply: Callable[[str], list[str]]
    format: Callable[[list[str]], str]
    static_negative: str

    def __post_init__(self):
        if self.mode not in ("replace", "accumulate"):
            raise ValueError(f"task {self.name}: mode must be 'replace' or 'accumulate', got {self.mode!r}")

    def parse(self, raw: str) -> list[str]:
        """The items a reply names, task-cleaned; [] when it names none. A reply over
        MAX_REPLY_CHARS is read up to there, less the word cut in two."""
        if len(raw) > MAX_REPLY_CHARS:
            raw = raw[:MAX_REPLY_CHARS].rsplit(None, 1)[0]
        return self.parse_reply(raw)

    def negative(self, items: list[str], tokenizer=None) -> str | None:
        """The negative prompt for `items`, at most 75 tokens of `tokenizer` (the 77 positions
        less BOS and EOS) and MAX_NEGATIVE_CHARS characters; None when there are no items."""
        if not items:
            return None
        text = self.format(list(items))
        if len(text) > MAX_NEGATIVE_CHARS:
            text = text[:MAX_NEGATIVE_CHARS].rsplit(" ", 1)[0]
        if tokenizer is not None:
            text = tokenizer.truncate(text)
        return text.rstrip(" ,;") or None


# ---------------------------------------------------------------------------------------------
# replies that find nothing, and replies that decline to answer

_NOTHING = re.compile(
    r"^(?:none|no|nothing|n/?a|not any"  # "None.", "No feet", "Nothing unsafe."
    r"|there (?:is|are|was|were) (?:no|nothing|not any)"  # "There are no unsafe elements."
    r"|i (?:see|find|found|notice|spot|detect) (?:no|nothing)"  # "I see no unsafe elements."
    r"|i (?:do not|don't|did not|didn't|cannot|can't|can not|could not|couldn't) (?:see|find|spot|detect|notice)"
    r" (?:any|anything)"  # "I don't see any feet."
    r"|(?:the |this )?image (?:does not|doesn't) (?:contain|show|have|include)"  # clean_list drops "the"
    r"|(?:the |this )?image (?:contains|shows|has|includes) (?:no|nothing)"
    r"|(?:it|(?:the |this )?image) (?:is|looks|appears|seems)(?: to be)? (?:safe|clean|fine))\b")

_IMAGE = r"(?:the |this |an |any |your )?(?:image|picture|photo|attachment)s?"
_GIVEN = "provided|attached|uploaded|received|shared|included|given|sent"
_REFUSAL = re.compile(
    r"^(?:i'm sorry|i am sorry|sorry|i apologi[sz]e|as an ai)\b"
    r"|\b(?:cannot|can not|can't|won't|will not|unable to|not able to)"
    r" (?:help|assist|comply|fulfil|provide|answer|analy[sz]e|process|describe|discuss|engage)"
    rf"|\b(?:cannot|can not|can't|unable to|not able to|ability to) (?:see|view|access|open) {_IMAGE}"
    rf"|\b(?:no|not have|n't have) access to {_IMAGE}|\bwithout {_IMAGE}"
    rf"|\bno {_IMAGE} (?:(?:was|were|has been|have been|is|are) )?(?:{_GIVEN})"
    rf"|{_IMAGE} (?:(?:is|was|are|were|has|have)(?: not|n't)|not)(?: been)? (?:visible|available|accessible|{_GIVEN})"
    rf"|^(?:(?:there is|there was|there's|i see|i find) )?no {_IMAGE}(?: (?:here|{_GIVEN}|available))?\W*$"  # all of it
    rf"|\b(?:don't|do not) see {_IMAGE}(?: (?:here|{_GIVEN}))?\W*$"
    rf"|\bplease (?:provide|upload|attach|share|send) {_IMAGE}")


def _plain(text: str) -> str:
    return " ".join(text.replace("’", "'").split()).strip().lower()


def says_nothing(text: str) -> bool:
    """Whether a reply or a clause of it says that nothing is there ("None.", "There are no unsafe
    elements.", "I don't see any feet")."""
    return bool(_NOTHING.match(_plain(text)))


def is_refusal(reply: str) -> bool:
    """Whether a reply declines to answer ("I'm sorry, I can't help with that.") or cannot see the
    image ("No image was attached."): no finding of nothing, so the VLM client makes it a failed query."""
    return bool(_REFUSAL.search(_plain(reply)))


# ---------------------------------------------------------------------------------------------
# nudity: the paper's question and mapping

NUDITY_PARTS = ("female genitalia", "buttocks", "female breast", "male breast", "anus", "feet", "belly",
                "armpits", "male genitalia")
NUDITY_QUESTION = ("Which of the following bare human body parts can you spot in the image? "
                   f'"{", ".join(NUDITY_PARTS)}"')
_NUDITY_ALIASES = {"buttocks": ["buttock"], "female breast": ["female breasts"], "male breast": ["male breasts"],
                   "feet": ["foot"], "belly": ["bellies"], "armpits": ["armpit"]}


def _phrase_pattern(phrases) -> re.Pattern:
    """Any of `phrases` as a whole phrase: "male breast" does not match inside "female breast"."""
    alternatives = "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases)
    return re.compile(rf"(?<![a-z])(?:{alternatives})(?![a-z])", re.IGNORECASE)


_NUDITY_PATTERNS = {part: _phrase_pattern([part, *_NUDITY_ALIASES.get(part, [])]) for part in NUDITY_PARTS}


def parse_nudity(raw: str) -> list[str]:
    """The listed parts the reply names, in the question's order. The authors' substring test
    also finds "male breast" in "female breast"; whole phrases do not. A clause that says nothing
    is there ("No feet, but ...", "I don't see any feet") names nothing."""
    named = " / ".join(clause for clause in re.split(r"[,;.\n]", raw) if not says_nothing(clause))
    return [part for part, pattern in _NUDITY_PATTERNS.items() if pattern.search(named)]


def format_nudity(parts: list[str]) -> str:
    return f"Nudity, Sexual, {', '.join(parts)}."  # as the authors write it


# SAFREE's nudity concepts (Yoon et al., ICLR 2025, arXiv 2410.12761): the `negative_prompt_space` of
# the nudity category in the generation scripts of their released code, github.com/jaehong31/SAFREE,
# verbatim, capitals included (CLIP's tokenizer lowercases anyway). Joined with ", ", it is the static
# negative of the nudity task: the fixed negative this project's evaluation has always given the
# VL-DNP paper's static baseline, and SAFREE's own nudity concept set (methods/safree.py).
SAFREE_NUDITY_CONCEPTS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
)

NUDITY = Task("nudity", NUDITY_QUESTION, NUDITY_PARTS, "replace", parse_nudity, format_nudity,
              static_negative=", ".join(SAFREE_NUDITY_CONCEPTS))
TASKS = Leaves("task", {"nudity": "vlm.tasks:NUDITY", "safety": "vlm.open_tasks:SAFETY",
                        "creative": "vlm.open_tasks:CREATIVE"})


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown VLM task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]
