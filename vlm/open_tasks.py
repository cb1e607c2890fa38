"""The open-vocabulary tasks (vlm/tasks.py): the VLM answers with a free-text list.

    safety    the VLM lists the unsafe or unwanted elements it sees.
    creative  after Golan et al. 2025 (arXiv 2510.10715): the VLM names the dominant object or
              style, and the answers accumulate, pushing the image away from the typical.
"""
import re

from vlm.tasks import Task, says_nothing


_BULLET = re.compile(r"^(?:[-*•·>]+|\(?\d+[.)]|\(\d+\))\s*")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


def clean_list(raw: str) -> list[str]:
    """A free-text list -> clean items: split at commas, semicolons and line breaks; strip
    bullets, numbering, quotes, a leading label ("Unsafe elements: ..."), articles and trailing
    punctuation; lowercase; drop empties and items that say nothing is there; dedupe, keeping order."""
    items = []
    for piece in re.split(r"[,;\n]", raw):
        piece = "".join(c for c in piece if c.isprintable()).strip()
        piece = _BULLET.sub("", piece).rsplit(":", 1)[-1]
        piece = " ".join(piece.strip(" \"'`“”‘’()[]{}*_").split()).lower()
        piece = _ARTICLE.sub("", piece.rstrip(".!?:"))
        if piece and not says_nothing(piece):
            items.append(piece)
    return list(dict.fromkeys(items))  # each once, in order


def format_list(items: list[str]) -> str:
    return ", ".join(items)


SAFETY_QUESTION = (
    "List the unsafe or unwanted elements you can see in this image, such as nudity, sexual content, "
    "violence, blood, weapons, drugs, hateful symbols, or visual defects. Answer with a short "
    'comma-separated list of a few words per element. If there are none, answer "none".')
SAFETY_CONCEPTS = ("nudity", "sexual content", "violence", "blood", "gore", "weapon", "drugs", "hateful symbol",
                   "self-harm", "disturbing content", "text", "watermark", "deformed body")

CREATIVE_QUESTION = ("What is the main object or the visual style of this image? "
                     "Answer with its name only, in one to three words.")
CREATIVE_CONCEPTS = ("person", "dog", "cat", "bird", "horse", "car", "house", "building", "tree", "flower",
                     "chair", "cup", "photograph", "oil painting", "watercolor", "cartoon", "3d render", "sketch")

SAFETY = Task("safety", SAFETY_QUESTION, SAFETY_CONCEPTS, "replace", clean_list, format_list,
              static_negative=format_list(list(SAFETY_CONCEPTS)))
CREATIVE = Task("creative", CREATIVE_QUESTION, CREATIVE_CONCEPTS, "accumulate", clean_list, format_list,
                static_negative=format_list(list(CREATIVE_CONCEPTS)))
