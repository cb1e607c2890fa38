"""load_clip against transformers' CLIPModel on random weights, its errors, and the CLIP proposer's
scores, threshold, ordering and caching."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import assert_close_rel, clip_features
from safetensors.torch import load_file, save_file

from model.clip_vision import preprocess
from checkpoint.clip import load_clip
from vlm.clip_proposer import TEMPLATES, CLIPProposer
from weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
CONCEPTS = ["cat", "dog", "horse", "castle", "robot", "tiger", "flowers", "lighthouse"]
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", ""]


@pytest.fixture(scope="module")
def loaded(clip_reference):
    return load_clip(clip_reference[0])


def image(seed, H=40, W=48):
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- load_clip

@torch.no_grad()
def check_parity(model, tokenizer, ref):
    ids = tokenizer(PROMPTS)
    assert_close_rel(model.encode_text(ids), clip_features(ref.get_text_features(input_ids=ids)))
    pixels = preprocess(torch.stack([image(0), image(1)]), IMAGE_SIZE)
    assert_close_rel(model.encode_image(pixels), clip_features(ref.get_image_features(pixel_values=pixels)))
    assert torch.equal(model.logit_scale, ref.logit_scale)


def test_load_clip_matches_transformers(clip_reference, loaded):
    check_parity(*loaded, clip_reference[1])


def test_load_clip_reads_hub_style_files(clip_reference, tmp_path):
    """Hub files saved by older transformers also carry both towers' position_ids buffers."""
    folder, ref = clip_reference
    hub = Path(shutil.copytree(folder, tmp_path / "hub"))
    state = load_file(hub / "model.safetensors")
    assert "vision_model.pre_layrnorm.weight" in state
    state["text_model.embeddings.position_ids"] = torch.arange(77).view(1, -1)
    state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE_SIZE // 8) ** 2 + 1).view(1, -1)
    save_file(state, hub / "model.safetensors")
    check_parity(*load_clip(hub), ref)


def broken(folder: Path, tmp_path: Path, what: str) -> Path:
    out = Path(shutil.copytree(folder, tmp_path / what))
    config = json.loads((out / "config.json").read_text())
    if what == "no-config":
        (out / "config.json").unlink()
    elif what == "pickle-only":
        (out / "model.safetensors").rename(out / "pytorch_model.bin")
    elif what == "no-vocab":
        (out / "vocab.json").unlink()
    elif what == "text-only":
        (out / "config.json").write_text(json.dumps(config["text_config"]))
    elif what == "wrong-shape":
        config["vision_config"]["hidden_size"] = 64
        (out / "config.json").write_text(json.dumps(config))
    elif what == "bad-act":
        config["text_config"]["hidden_act"] = "relu"
        (out / "config.json").write_text(json.dumps(config))
    elif what == "small-vocab":
        config["text_config"]["vocab_size"] = 1000
        (out / "config.json").write_text(json.dumps(config))
    elif what == "corrupt":
        data = (out / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("what, says", [
    ("no-config", "config.json: missing"),
    ("pickle-only", "pytorch_model.bin"),
    ("no-vocab", "vocab.json"),
    ("text-only", "holds a 'clip_text_model' model"),
    ("wrong-shape", "of the wrong shape"),
    ("bad-act", "hidden_act 'relu'"),
    ("small-vocab", "past the text encoder's vocab_size=1000; the tokenizer is another model's"),
    ("corrupt", "truncated or corrupt"),
])
def test_load_clip_errors(clip_reference, tmp_path, what, says):
    with pytest.raises(CheckpointError) as e:
        load_clip(broken(clip_reference[0], tmp_path, what))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_load_clip_rejects_files_and_nonsense(clip_reference, tmp_path):
    for source in [clip_reference[0] / "model.safetensors", tmp_path / "does-not-exist" / "x"]:
        with pytest.raises(CheckpointError) as e:
            load_clip(source)
        assert str(source) in str(e.value) and "\n" not in str(e.value)


def test_offline_repo_id_not_cached(tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when it is imported, so the call runs
    in a fresh interpreter with the environment set."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("import sys\n"
            "from checkpoint.clip import load_clip\n"
            "from weights import CheckpointError\n"
            "try:\n"
            "    load_clip('openai/clip-vit-large-patch14')\n"
            "except CheckpointError as e:\n"
            "    print(e)\n"
            "    sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 3, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "openai/clip-vit-large-patch14" in lines[0]
    assert not (tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots").exists()


# ---------------------------------------------------------------- the proposer

@torch.no_grad()
def expected_scores(clip_reference, img, template="a photo of {}", anchor="a photo"):
    """p(concept) computed from transformers' model and tokenizer, independently of vlm/."""
    folder, ref = clip_reference
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    ids = tok([anchor] + [template.format(c) for c in CONCEPTS], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    text = F.normalize(clip_features(ref.get_text_features(input_ids=ids)), dim=-1)
    pixels = preprocess(img[None], IMAGE_SIZE)
    img_emb = F.normalize(clip_features(ref.get_image_features(pixel_values=pixels)), dim=-1)
    cos = (img_emb @ text.T)[0]
    return torch.sigmoid(ref.logit_scale.exp() * (cos[1:] - cos[0]))


def test_items_above_threshold_in_score_order(clip_reference, loaded):
    img = image(5)
    p = expected_scores(clip_reference, img)
    order = p.argsort(descending=True).tolist()
    ranked = p[order]
    assert (ranked[:-1] - ranked[1:]).min() > 1e-4  # distinct enough for fp32 to keep the order
    model, tok = loaded

    cut = ((ranked[2] + ranked[3]) / 2).item()  # between the 3rd and 4th score
    reply = CLIPProposer(model, tok, CONCEPTS, threshold=cut)(img, "a prompt", 5)
    assert reply.error is None and reply.latency > 0
    assert reply.items == [CONCEPTS[i] for i in order[:3]]
    assert reply.raw.startswith("p vs 'a photo': ") and f"{CONCEPTS[order[0]]} {ranked[0]:.3f}" in reply.raw

    above_all = CLIPProposer(model, tok, CONCEPTS, threshold=ranked[0].item() + 1e-3)(img, "", 5)
    assert above_all.items == [] and above_all.error is None and above_all.raw == reply.raw
    below_all = CLIPProposer(model, tok, CONCEPTS, threshold=ranked[-1].item() - 1e-3)(img, "", 5)
    assert below_all.items == [CONCEPTS[i] for i in order]


def test_input_scale(loaded):
    """CLIP scales the shorter side to its image size, so that is all of x0 it needs decoded."""
    proposer = CLIPProposer(*loaded, CONCEPTS)
    assert proposer.input_scale(64, 96) == IMAGE_SIZE / 64 and proposer.input_scale(128, 16) == IMAGE_SIZE / 16


def test_template_and_anchor(clip_reference, loaded):
    model, tok = loaded
    img = image(6)
    proposer = CLIPProposer(model, tok, CONCEPTS, template="a drawing of a {}", anchor="a drawing")
    assert proposer.captions[0] == "a drawing of a cat"
    expected = expected_scores(clip_reference, img, "a drawing of a {}", "a drawing")
    assert_close_rel(proposer.score(img[None])[0], expected)
    assert CLIPProposer(model, tok, ["feet"], task="nudity").captions == [TEMPLATES["nudity"].format("feet")]
    assert CLIPProposer(model, tok, ["feet"], task="safety").captions == ["a photo of feet"]


def test_describes_itself_by_model_and_threshold(clip_reference, loaded):
    """The trace records repr(proposer): the CLIP it loaded and its settings, as VLMClient's does."""
    proposer = CLIPProposer(*loaded, ["feet"], threshold=0.7, task="nudity", name=str(clip_reference[0]))
    assert repr(proposer) == f"CLIPProposer({str(clip_reference[0])!r}, threshold=0.7, task='nudity')"
    assert repr(CLIPProposer(*loaded, ["feet"])) == "CLIPProposer(threshold=0.5, task=None)"


def test_concepts_encoded_once(loaded):
    model, tok = loaded
    calls = {"text": 0, "vision": 0}
    hooks = [model.text_model.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1)),
             model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))]
    try:
        proposer = CLIPProposer(model, tok, CONCEPTS)
        for step in range(3):
            assert proposer(image(step), "a prompt", step).error is None
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"text": 1, "vision": 3}


def test_batch_scores_equal_single_images(loaded):
    model, tok = loaded
    proposer = CLIPProposer(model, tok, CONCEPTS)
    images = torch.stack([image(7), image(8)])
    batch = proposer.score(images)
    assert batch.shape == (2, len(CONCEPTS))
    for b in range(2):
        torch.testing.assert_close(batch[b], proposer.score(images[b:b + 1])[0], rtol=0, atol=1e-5)


def test_failures_are_error_replies(loaded):
    model, tok = loaded
    proposer = CLIPProposer(model, tok, CONCEPTS, threshold=0.0)
    for bad in [torch.zeros(3, 8), torch.zeros(2, 3, 32, 32), torch.full((3, 32, 32), float("nan"))]:
        reply = proposer(bad, "a prompt", 0)
        assert reply.items == [] and reply.error.startswith("CLIP proposer: ") and "\n" not in reply.error
    with pytest.raises(ValueError):
        CLIPProposer(model, tok, [])


def test_clip_in_bf16_scores_within_3e_2_of_fp32(clip_reference, loaded):
    model, tok = load_clip(clip_reference[0], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    img = image(9)
    reply = CLIPProposer(model, tok, CONCEPTS, threshold=0.0)(img, "", 0)
    assert reply.error is None and len(reply.items) == len(CONCEPTS)
    low = CLIPProposer(model, tok, CONCEPTS).score(img[None])
    full = CLIPProposer(*loaded, CONCEPTS).score(img[None])
    assert (low - full).abs().max() < 3e-2
