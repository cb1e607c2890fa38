"""The CLIP tokenizer gives the same ids as transformers' CLIPTokenizer on the same files: SD1's and SD2's,
and both of an SDXL folder's."""
import json
import shutil
import time

import pytest
import torch
from fake_vocab import BOS, EOS, bytes_to_unicode, write_clip_vocab
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as reference_bytes_to_unicode

from checkpoint.folder import load_tokenizer
from helpers import SDXL_PROMPTS
from model.tokenizer import Tokenizer
from weights import CheckpointError

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, HIGHLY detailed",
    "don't", "it's", "Don'T", "DON'T stop", "we're they've I'm you'll he'd 'quoted'",
    "what's this?! (masterpiece), [best quality]; 50mm f/1.8 -- #1 @home",
    "café naïve crème brûlée", "cafe\u0301 nai\u0308ve",  # combining accents: NFC composes them
    "Ünïcödé ÀÉÎ straße", "🔥🐱 emoji 👩‍👩‍👧", "東京の猫 고양이 кошка",
    "a   lot    of     spaces", "\ttabs\tand\nnew\r\nlines\n", "   leading and trailing   ",
    "a\u00a0no-break\u3000ideographic\u200bzero-width",
    "1234 3.14 2nd 10x 1,000,000", "",
    "a <|endoftext|> b", "<|StartOfText|>x<|endoftext|>y",
    # special tokens in other cases: SD1's EOS (its pad) matches only as typed, SD2's in any case
    "<|ENDOFTEXT|>", "<|EndOfText|>", "<|endoftext|>", "<|STARTOFTEXT|>", "x<|ENDOFTEXT|>y <|endoftext|>",
    "wow! so cool!!", "!",
    "a photo of a cat " * 30,  # longer than 77 tokens
    "a " * 75, "a " * 76,  # exactly fills the 77 slots / one token too many
]


def write_as_transformers5(folder, out, string_merges=False):
    """The folder as transformers 5 saves it (diffusers' pipe.save_pretrained too): tokenizer.json
    and tokenizer_config.json, no vocab.json or merges.txt. `string_merges`: merges as "a b" strings,
    as older tokenizers wrote them, instead of [a, b] pairs."""
    CLIPTokenizer.from_pretrained(folder).save_pretrained(out)
    assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()
    if string_merges:
        fast = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        fast["model"]["merges"] = [" ".join(pair) for pair in fast["model"]["merges"]]
        (out / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False), encoding="utf-8")
    return out


# SD1 pads with EOS, SD2 with "!"; each as vocab.json + merges.txt and as tokenizer.json.
@pytest.fixture(scope="module", params=["sd1", "sd2", "sd1-tokenizer.json", "sd2-tokenizer.json-string-merges"])
def folder(request, tmp_path_factory):
    pad = "!" if request.param.startswith("sd2") else None
    files = write_clip_vocab(tmp_path_factory.mktemp(request.param), pad_token=pad)
    if "tokenizer.json" not in request.param:
        return files
    return write_as_transformers5(files, tmp_path_factory.mktemp("saved"), "string-merges" in request.param)


@pytest.fixture(scope="module")
def pair(folder):
    return Tokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(folder)


def reference_ids(ref, prompts, max_length=77):
    return ref(prompts, padding="max_length", max_length=max_length, truncation=True,
               return_tensors="pt").input_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(pair, prompt):
    ours, ref = pair
    ids = ours(prompt)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids.tolist() == reference_ids(ref, prompt).tolist()
    assert ours.encode(prompt) == ref(prompt, add_special_tokens=False).input_ids


def test_batch_matches_transformers(pair):
    ours, ref = pair
    ids = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert ids.tolist() == reference_ids(ref, PROMPTS).tolist()
    assert ids.tolist() == torch.cat([ours(p) for p in PROMPTS]).tolist()


def test_other_max_length(folder):
    ours, ref = Tokenizer.from_folder(folder, max_length=16), CLIPTokenizer.from_pretrained(folder)
    assert ours(PROMPTS).tolist() == reference_ids(ref, PROMPTS, max_length=16).tolist()


def test_special_ids(pair):
    ours, ref = pair
    vocab = ref.get_vocab()
    assert (ours.bos_id, ours.eos_id) == (vocab[BOS], vocab[EOS]) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.pad_id == ref.pad_token_id
    assert ours.vocab_size == len(vocab) == len(ref)


def test_sd1_pads_with_eos(tmp_path):
    tok = Tokenizer.from_folder(write_clip_vocab(tmp_path))
    assert tok.pad_id == tok.eos_id
    row = tok("a photo of a cat")[0].tolist()
    n = len(tok.encode("a photo of a cat"))
    assert row[: n + 2] == [tok.bos_id] + tok.encode("a photo of a cat") + [tok.eos_id]
    assert row[n + 2:] == [tok.eos_id] * (77 - n - 2)


def test_sd2_pads_with_exclamation_mark(tmp_path):
    tok = Tokenizer.from_folder(write_clip_vocab(tmp_path, pad_token="!"))
    assert tok.pad_id == 0 != tok.eos_id
    row = tok("a photo of a cat")[0].tolist()
    n = len(tok.encode("a photo of a cat"))
    assert row[n + 1] == tok.eos_id
    assert row[n + 2:] == [0] * (77 - n - 2)


@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_2"])
def test_sdxl_tokenizers_match_transformers(sdxl_pair, sdxl, tokenizer):
    ours = getattr(sdxl_pair[0], tokenizer)
    ref = CLIPTokenizer.from_pretrained(sdxl / tokenizer)
    expected = ref(SDXL_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours(SDXL_PROMPTS).tolist() == expected.tolist()


def test_long_prompt_keeps_eos(pair):
    ours, _ = pair
    prompt = "a photo of a cat " * 30
    content = ours.encode(prompt)
    assert len(content) > 75
    row = ours(prompt)[0].tolist()
    assert row == [ours.bos_id] + content[:75] + [ours.eos_id]


def test_decode_matches_transformers_and_round_trips(pair):
    ours, ref = pair
    for prompt in PROMPTS:
        ids = ours.encode(prompt)
        assert ours.decode(ids) == ref.decode(ids)
        row = ours(prompt)[0].tolist()
        assert ours.decode(row) == ref.decode(row)
    for text in ["a photo of a cat", "café, naïve 🔥 東京", "don't stop", "x 2.5"]:
        expected = text.replace(",", " ,").replace("'", " '").replace(".", " . ")
        assert ours.decode(ours.encode(text)) == " ".join(expected.split())


def test_truncate_keeps_the_longest_prefix_of_whole_words(pair):
    ours, _ = pair
    text = "  a majestic   waterfall surrounded by lush tropical jungle, café 🔥 mist " * 12
    words = text.split()
    for max_tokens in [None, 1, 7, 20, 75]:
        limit = 75 if max_tokens is None else max_tokens
        cut = ours.truncate(text, max_tokens)
        assert text.startswith(cut)
        kept = cut.split()
        assert kept == words[: len(kept)]  # whole words only
        assert len(ours.encode(cut)) <= limit
        assert len(ours.encode(" ".join(words[: len(kept) + 1]))) > limit  # longest such prefix
    assert ours.truncate("a short prompt") == "a short prompt"
    assert ours.truncate("") == ""
    assert ours.truncate("东京东京东京东京", max_tokens=2) == ""  # the first word alone is too long


def test_from_folder_reads_pad_token(tmp_path):
    folder = write_clip_vocab(tmp_path, pad_token="!")
    (folder / "special_tokens_map.json").unlink()
    assert Tokenizer.from_folder(folder).pad_id == 0  # from tokenizer_config.json
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = {"content": "!", "lstrip": False, "normalized": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).pad_id == 0
    (folder / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_folder(folder)
    assert tok.pad_id == tok.eos_id  # nothing says otherwise: SD1's default


@pytest.mark.parametrize("in_map, in_config", [("!", EOS), (EOS, "!")])
def test_special_tokens_map_wins_over_tokenizer_config(tmp_path, in_map, in_config):
    folder = write_clip_vocab(tmp_path, pad_token=in_map)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": in_config}))
    assert Tokenizer.from_folder(folder).pad_id == CLIPTokenizer.from_pretrained(folder).pad_token_id


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_from_folder_missing_file(tmp_path, missing):
    folder = write_clip_vocab(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        Tokenizer.from_folder(folder)


def test_unknown_pad_token(tmp_path):
    folder = write_clip_vocab(tmp_path)
    with pytest.raises(ValueError, match="not in"):
        Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token="<pad>")


def test_max_length_is_the_folders_model_max_length(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "short")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 16}))
    ours, ref = Tokenizer.from_folder(copy), CLIPTokenizer.from_pretrained(copy)
    assert ours.max_length == ref.model_max_length == 16
    # what diffusers does: pad to the tokenizer's model_max_length
    expected = ref(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ours(PROMPTS).tolist() == expected.tolist()
    assert Tokenizer.from_folder(copy, max_length=20).max_length == 20  # an explicit length wins


def special(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


SPECIAL_PROMPTS = ["<|ENDOFTEXT|>", "<|EndOfText|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|startoftext|>",
                   "a<|EndOfText|>!b <|StartOfText|>", "!", "WOW!"]


# transformers matches a special token in the lowercased text ("normalized") only when the folder
# says so: a token given as a plain string is matched as typed, and of a token's entries (bos, eos,
# unk, pad, in that order) the last one counts. tokenizer.json records the result.
@pytest.mark.parametrize("tokens", [
    {},  # the hub's SD1 folders: EOS normalized, then the pad "<|endoftext|>" as a plain string
    {"pad_token": special(EOS, True)},
    {"bos_token": BOS},
    {"eos_token": special(EOS, False), "unk_token": special(EOS, True), "pad_token": "!"},
    {"eos_token": special(EOS, True), "unk_token": EOS, "pad_token": special("!", True)},
    None,  # no special_tokens_map.json or tokenizer_config.json: CLIPTokenizer's defaults, plain strings
], ids=["sd1-hub", "pad-dict", "bos-string", "unk-last", "pad-dict-sd2", "no-configs"])
def test_special_tokens_are_matched_as_in_transformers(tmp_path, tokens):
    folder = write_clip_vocab(tmp_path / "files")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if tokens is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(json.dumps({**json.loads((folder / name).read_text()), **tokens}))
    for f in (folder, write_as_transformers5(folder, tmp_path / "saved")):
        ref = CLIPTokenizer.from_pretrained(f)
        assert Tokenizer.from_folder(f)(SPECIAL_PROMPTS).tolist() == reference_ids(ref, SPECIAL_PROMPTS).tolist()


DAMAGED = [
    ("vocab.json", b"{not json"), ("vocab.json", b"\xff\xfe{}"), ("vocab.json", b"[1, 2]"),
    ("vocab.json", b'{"a": 0}'),  # no <|startoftext|>
    ("merges.txt", b"#version: 0.2\nonlyoneword\n"), ("merges.txt", b"#version: 0.2\na b c\n"),
    ("merges.txt", b"#version: 0.2\nzzzq qqqz\n"), ("merges.txt", b"#version: 0.2\n{ }\n"),
    ("merges.txt", b"#version: 0.2\n\xff\xfe x\n"),
    ("tokenizer.json", b"{not json"), ("tokenizer.json", b'{"model": {"type": "WordPiece", "vocab": {}}}'),
    ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b"]]}}'),
    ("tokenizer_config.json", b"{not json"), ("special_tokens_map.json", b"\xff"),
    # JSON of the wrong shapes, and nested past Python's recursion limit
    ("special_tokens_map.json", b'{"bos_token": ["<|startoftext|>"]}'),
    ("special_tokens_map.json", b'{"pad_token": {"content": ["!"]}}'),
    *[("tokenizer.json", b'{"model": {"type": "BPE", "vocab": {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2}, '
       b'"merges": [["a", "a"]]}, "added_tokens": ' + added + b"}")
      for added in [b"[1, 2]", b'{"a": 1}', b"null", b'[{"content": ["a"]}]']],
    *[("tokenizer.json", b'{"model": {"type": "BPE", "vocab": {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2}, '
       b'"merges": ' + merges + b"}}") for merges in [b"[1, 2]", b"null", b'{"a": "b"}']],
    *[(name, b"[" * 100_000 + b"]" * 100_000)
      for name in ["vocab.json", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"]],
]


@pytest.mark.parametrize("name, data", DAMAGED, ids=lambda v: v if isinstance(v, str) else ascii(v[:60])[2:-1])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, name, data):
    folder = write_clip_vocab(tmp_path / "files")
    if name == "tokenizer.json":
        folder = write_as_transformers5(folder, tmp_path / "saved")
    (folder / name).write_bytes(data)
    with pytest.raises(ValueError) as info:
        Tokenizer.from_folder(folder)
    assert str(folder / name) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=name):  # what load_pipeline and generate.py report
        load_tokenizer(folder)


def test_a_bug_building_the_tokenizer_keeps_its_own_traceback(tmp_path):
    """Only what the tokenizers library raises about the files becomes a ValueError naming them; a bug
    (here an AttributeError in a fork's __init__) is not passed off as a damaged file."""
    class Forked(Tokenizer):
        def __init__(self, *args, **kwargs):
            raise AttributeError("a bug in the fork")

    with pytest.raises(AttributeError, match="a bug in the fork"):
        Forked.from_folder(write_clip_vocab(tmp_path / "files"))


def test_fake_vocab_has_clip_layout(tmp_path):
    start = time.perf_counter()
    folder = write_clip_vocab(tmp_path / "a", num_merges=800)
    assert time.perf_counter() - start < 1.0
    tokens = list(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    byte_chars = list(reference_bytes_to_unicode().values())
    assert list(bytes_to_unicode().values()) == byte_chars
    assert tokens[:256] == byte_chars
    assert tokens[256:512] == [c + "</w>" for c in byte_chars]
    assert merges[0] == "#version: 0.2" and len(merges) == 801
    assert tokens[512:-2] == [m.replace(" ", "") for m in merges[1:]]
    assert tokens[-2:] == [BOS, EOS]
    assert len(set(tokens)) == len(tokens) == 256 * 2 + 800 + 2
    again = write_clip_vocab(tmp_path / "b", num_merges=800)
    for name in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]:
        assert (folder / name).read_bytes() == (again / name).read_bytes()
