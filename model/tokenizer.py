"""CLIP's byte-level BPE tokenizer, as Stable Diffusion uses it (Radford et al. 2021, sec. 2.4).

Text becomes token ids in four steps, each a stage of a `tokenizers` pipeline:
  1. normalize:     NFC, every whitespace run becomes one space, lowercase;
  2. pre-tokenize:  split into words (letter runs, single digits, punctuation runs, and the
                    English clitics 's 't 're 've 'm 'll 'd), dropping the spaces, then map
                    each UTF-8 byte to a printable character (GPT-2's byte-level trick), so
                    any text, emoji included, is spelled with the 256 base tokens;
  3. BPE:           apply the learned merges inside each word; a word's last symbol carries the suffix "</w>",
                    so "cat" at the end of a word and inside "category" are different tokens;
  4. frame:         <|startoftext|> + at most max_length-2 tokens + <|endoftext|>, padded to
                    max_length (77 in SD), the fixed length the text encoder's positions expect.
The result is the same as transformers' CLIPTokenizer built from the same files.
"""
import json
import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_WORD_REGEX = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokenizer:
    """CLIP BPE tokenizer from a vocabulary (token -> id) and merges (token pairs, by rank).
    `pad_token` defaults to the end-of-text token (SD1); SD2's OpenCLIP pads with "!" instead.

    Special tokens typed in a prompt map to their ids, as in CLIP and transformers (with SD2's pad
    "!", every "!" becomes the pad id). `normalized[token]` says whether they are also matched in
    other letter cases. The default is what transformers makes of the hub's SD tokenizer folders:
    BOS and EOS are, the pad token is not, and so with SD1's pad, EOS is not."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str | None = None,
                 max_length: int = 77, normalized: dict[str, bool] | None = None):
        pad_token = EOS if pad_token is None else pad_token
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the vocabulary")
        self.max_length, self.vocab = max_length, vocab  # vocab: token -> id, every id it makes
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        normalized = {BOS: True, EOS: True, pad_token: False} if normalized is None else normalized

        tok = BackendTokenizer(BPE(vocab, merges, unk_token=EOS, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORD_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = ByteLevelDecoder()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=normalized.get(t, False))
                                for t in dict.fromkeys([BOS, EOS, pad_token])])
        self._tok = tok

    @classmethod
    def from_files(cls, vocab_file, merges_file, *args, **kwargs) -> "Tokenizer":
        """From a vocab.json and a merges.txt (a "#version" line, then one "a b" pair per line);
        the other arguments as for Tokenizer()."""
        try:
            lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges_file}: not UTF-8 text ({e})") from None
        merges = [tuple(line.split(" ")) for line in lines if not line.startswith("#version")]
        return cls._checked(_read_json(vocab_file), merges, vocab_file, merges_file, *args, **kwargs)

    @classmethod
    def from_folder(cls, path, max_length: int | None = None, pad_token: str | None = None) -> "Tokenizer":
        """A tokenizer folder as transformers writes it: tokenizer.json (transformers 5), else vocab.json
        and merges.txt (the hub's SD repos). The special tokens come from special_tokens_map.json, else
        tokenizer_config.json, else `pad_token`; max_length from model_max_length (77 if absent)."""
        path = Path(path)
        special = _read_json(path / "special_tokens_map.json", missing_ok=True)
        config, tokens = {**_read_json(path / "tokenizer_config.json", missing_ok=True), **special}, {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):  # each entry as a dict
            tokens[key] = entry = config[key] if isinstance(config.get(key), dict) else {"content": config.get(key)}
            if not isinstance(entry.get("content"), (str, type(None))):
                file = path / ("special_tokens_map.json" if key in special else "tokenizer_config.json")
                raise ValueError(f"{file}: {key} is {entry.get('content')!r}, not a token")
        # transformers matches a special token given as a plain string only as typed, and of a token's
        # entries the last one counts; tokenizer.json holds what it registered.
        normalized = {e.get("content"): e.get("normalized", False) for e in tokens.values()}
        pad = tokens["pad_token"].get("content") or pad_token
        length = config.get("model_max_length")  # 1e30, transformers' "no limit", is no length either
        args = (pad, max_length or (length if isinstance(length, int) and length < 10**30 else 77), normalized)
        file = path / "tokenizer.json"
        if not file.is_file():
            for name in ("vocab.json", "merges.txt"):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{path / name} not found: a CLIP tokenizer folder needs tokenizer.json, "
                                            "or vocab.json and merges.txt")
            return cls.from_files(path / "vocab.json", path / "merges.txt", *args)
        fast = _read_json(file)
        model = fast.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{file}: holds no BPE model; not a CLIP tokenizer")
        added, merges = fast.get("added_tokens", []), model.get("merges", [])
        if not isinstance(merges, list) or not isinstance(added, list) or any(
                not isinstance(t, dict) or not isinstance(t.get("content"), str) for t in added):
            raise ValueError(f"{file}: model.merges is not a list, or added_tokens not a list of {{\"content\": ...}}")
        normalized.update({t["content"]: t.get("normalized") for t in added})
        merges = [tuple(m.split(" ") if isinstance(m, str) else m if isinstance(m, list) else [m]) for m in merges]
        return cls._checked(model["vocab"], merges, file, file, *args)

    @classmethod
    def _checked(cls, vocab, merges, vocab_file, merges_file, *args, **kwargs) -> "Tokenizer":
        """cls(vocab, merges, ...), with a damaged vocabulary or merge a ValueError naming the file."""
        try:
            return cls(vocab, merges, *args, **kwargs)
        except ValueError as e:  # a special token is not in the vocabulary
            raise ValueError(f"{vocab_file}: {e}") from None
        except Exception as e:  # tokenizers raises a bare Exception or a TypeError, naming no file
            if type(e) not in (Exception, TypeError):  # a bug, not the files: its own traceback
                raise
            bad = next((m for m in merges if len(m) != 2 or not all(isinstance(t, str) and t in vocab for t in m)
                        or "".join(m) not in vocab), None)
            if bad is None:
                raise ValueError(f"{vocab_file}: not a BPE vocabulary ({e})".replace("\n", " ")) from None
            raise ValueError(f"{merges_file}: the merge {' '.join(map(str, bad))!r} is not two tokens of the "
                             "vocabulary that join into a third") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Content token ids of `text`: no BOS/EOS, no truncation."""
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        """Text of token ids, words separated by single spaces (as transformers decodes)."""
        return self._tok.decode(list(ids), skip_special_tokens=False).replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """Ids [B, max_length]: BOS, content (truncated so that EOS always fits), EOS, pads."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for encoding in self._tok.encode_batch(prompts):
            ids = [self.bos_id] + encoding.ids[: self.max_length - 2] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)

    def truncate(self, text: str, max_tokens: int | None = None) -> str:
        """The longest prefix of `text` made of whole whitespace-separated words whose encoding
        has at most `max_tokens` (default max_length-2) tokens; "" if the first word is too long."""
        max_tokens = self.max_length - 2 if max_tokens is None else max_tokens
        end = 0
        for word in re.finditer(r"\S+", text):
            if len(self.encode(text[: word.end()])) > max_tokens:
                break
            end = word.end()
        return text[:end]


def _read_json(file, missing_ok=False) -> dict:
    """The JSON object in `file`; {} if it does not exist and `missing_ok`."""
    if missing_ok and not Path(file).is_file():
        return {}
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past Python's recursion limit
        raise ValueError(f"{file}: not a JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: holds no JSON object")
    return value
