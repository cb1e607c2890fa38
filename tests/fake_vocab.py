"""A small CLIP vocabulary with the real file layout, so tests never need the network.

`write_clip_vocab(folder)` writes vocab.json, merges.txt, special_tokens_map.json and
tokenizer_config.json. The layout is exactly that of OpenAI CLIP's vocabulary (ids 0-255: the
byte-level characters in GPT-2's bytes_to_unicode order; 256-511: the same with "</w>"; then
one token per merge; then <|startoftext|> and <|endoftext|> last), only with 800 merges
instead of 48894. The merges are learned by a tiny BPE learner from the built-in corpus below,
so the output is deterministic and takes well under a second.
"""
import json
import re
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CORPUS = """
a photo of a cat sitting on a wooden table, highly detailed, 4k, trending on artstation.
a painting of a beautiful woman in a red dress standing in the rain, oil on canvas.
an astronaut riding a horse on the moon, digital art, cinematic lighting, 8k uhd.
portrait of an old man with a long white beard, dramatic light, by rembrandt.
a cozy little house in the forest at night, warm glowing windows, snow falling.
a futuristic city skyline at sunset with flying cars and neon signs, cyberpunk style.
don't draw text! it's a watercolor of mountains and a lake; we're happy, they've gone.
i'm sure she'll say he'd like the colorful flowers in the garden near the river.
close-up photograph of a dog's face, shallow depth of field, 50mm lens, f/1.8, bokeh.
a bowl of fruit: apples, oranges, bananas and grapes (still life) [masterpiece].
a dragon flying over a medieval castle, fantasy concept art, matte painting, epic.
a small robot reading a book in a library, soft light, pixar style, 3d render.
blurry, low quality, bad anatomy, extra fingers, deformed hands, watermark, signature.
ugly, disfigured, cropped, out of frame, worst quality, jpeg artifacts, duplicate.
a bustling market street in tokyo with lanterns, people walking, rainy evening.
an underwater scene with colorful coral reef, tropical fish and sunbeams, realistic.
a vintage car parked in front of a diner, 1950s, kodachrome, film grain.
the quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9 100% #1 @home.
a café in paris with a naïve painter, crème brûlée on the menu, über cool señor.
sketch of a bird on a branch, pencil drawing, black and white, minimalist.
a cute kitten playing with a ball of yarn, studio lighting, sharp focus, 85mm.
ancient ruins in the desert under a starry sky, milky way, long exposure photo.
a knight in shining armor holding a sword, heroic pose, highly intricate details.
a steaming cup of coffee next to a laptop on a desk by the window, morning light.
an abstract composition of geometric shapes and vibrant colors, bauhaus poster.
a field of sunflowers under a blue sky with fluffy white clouds, impressionism.
a spaceship landing on an alien planet with purple plants and two suns, sci-fi.
a lighthouse on a rocky cliff during a storm, crashing waves, moody atmosphere.
children playing in a park in autumn, falling leaves, golden hour, smiling faces.
a wizard casting a spell with glowing runes, magical particles, unreal engine.
nsfw, nude, naked, violence, gore, blood, weapon, scary, creepy, horror -- avoid!
what's this? you'll see... 'quoted' "double" <angle> {curly} $20 & 30/40 = 3:4 ~ ok.
a majestic waterfall surrounded by lush tropical jungle, mist, volumetric rays, national geographic.
an elegant ballerina dancing on stage, spotlight, motion blur, professional photography.
a steampunk airship with brass gears and copper pipes floating above victorian london.
a serene japanese zen garden with raked gravel, bonsai trees and a stone lantern.
a hyperrealistic portrait of a tiger with piercing green eyes, intricate fur texture.
a whimsical illustration of a fox wearing a scarf, children's book, gouache, pastel palette.
a snowy mountain village with wooden chalets, chimney smoke, northern lights overhead.
an isometric voxel diorama of a farm with cows, barn, tractor and windmill, octane render.
a gothic cathedral interior with stained glass windows, candles, incense, symmetrical.
a surreal melting clock landscape inspired by dali, dreamlike, vivid saturated hues.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.
    Printable latin-1 bytes map to themselves, the other 68 to chr(256), chr(257), ...,
    and the dict is ordered with the printable ones first (CLIP's vocab keeps this order)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, code_points = printable[:], printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _corpus_words(byte_chars: dict[int, str]) -> Counter:
    """Word frequencies of the corpus, each word a tuple of byte-level symbols with "</w>" on
    the last one. A simplified CLIP pre-tokenizer suffices here: the vocabulary only has to be
    a valid BPE vocabulary, not the one CLIP would learn."""
    pieces = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", CORPUS.lower())
    words = Counter()
    for piece in pieces:
        symbols = [byte_chars[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    return words


def _merge_word(word: tuple, pair: tuple) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(num_merges: int, base_vocab: set[str]) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair.
    Ties go to the lexicographically smallest pair; a pair whose merged string is already a
    token is skipped so that every merge adds exactly one new vocabulary entry."""
    words = _corpus_words(bytes_to_unicode())
    counts = Counter()  # pair -> frequency, updated only for the words a merge changes
    for word, freq in words.items():
        for pair in zip(word, word[1:]):
            counts[pair] += freq
    known = set(base_vocab)
    merges = []
    while len(merges) < num_merges:
        candidates = [(-c, p) for p, c in counts.items() if c > 0 and p[0] + p[1] not in known]
        if not candidates:
            raise ValueError(f"the built-in corpus supports only {len(merges)} merges")
        _, best = min(candidates)
        merges.append(best)
        known.add(best[0] + best[1])
        for word in [w for w in words if best[0] in w]:
            merged = _merge_word(word, best)
            if merged == word:
                continue
            freq = words.pop(word)
            words[merged] = words.get(merged, 0) + freq
            for pair in zip(word, word[1:]):
                counts[pair] -= freq
            for pair in zip(merged, merged[1:]):
                counts[pair] += freq
    return merges


def write_clip_vocab(folder, num_merges: int = 800, pad_token: str | None = None, model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) and return its path. pad_token None gives SD1's "<|endoftext|>";
    SD2 uses "!". transformers' CLIPTokenizer.from_pretrained(folder) loads the result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pad_token = EOS if pad_token is None else pad_token

    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    merges = learn_merges(num_merges, set(tokens))
    tokens += [a + b for a, b in merges] + [BOS, EOS]
    assert len(set(tokens)) == len(tokens)

    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def special(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    special_map = {"bos_token": special(BOS), "eos_token": special(EOS),
                   "unk_token": special(EOS), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    config = {**special_map, "add_prefix_space": False, "do_lower_case": True,
              "errors": "replace", "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
