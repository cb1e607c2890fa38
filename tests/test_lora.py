"""LoRA files (checkpoint/lora.py) against diffusers' load_lora_weights + fuse_lora at the same scale,
on random-weight SD1, SD2-v and SDXL folders: kohya/A1111 files written by hand in their key layout
(diffusers' UNet names for SD1/SD2, the original ones for SDXL, conv layers included), diffusers/PEFT
files written by diffusers and peft (lora_A/lora_B with their alpha metadata, and the older
lora.down/lora.up). Then the strictness, removal, the PNG's record, and generate.py --lora."""
import hashlib
import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import evaluate
import generate
import png_reader
from checkpoint.lora import LoraError
from checkpoint.original import unet_table
from helpers import assert_same_image, pipeline_images, reference_pipeline, run
from sampler.loop import generate as sample
from weights import load_lora, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# the layers the files below adapt: attention, feed-forward, projections and (LoCon) resnet convolutions
UNET_LAYERS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
               "proj_out", "resnets.0.conv1", "resnets.1.conv2", "time_emb_proj")
TEXT_LAYERS = ("mlp.fc1", "mlp.fc2")  # text attention: test_per_layer_alphas_merge_by_the_formula


def reference(folder):
    return reference_pipeline(StableDiffusionXLPipeline if (folder / "text_encoder_2").is_dir() else
                              StableDiffusionPipeline, folder, "ddim")


def kohya_file(folder, path, unet_names="diffusers", text=TEXT_LAYERS, rank=4, alpha=2.0, seed=0):
    """A kohya/A1111 LoRA of random matrices for `folder`'s model, in kohya's key layout: lora_unet_ +
    the layer's name with "_" (diffusers' names, or with unet_names="original" the original ones, as
    kohya writes SDXL's), lora_te_ (SDXL: lora_te1_, lora_te2_) + text_model_ + transformers' name."""
    ref, g, state = reference(folder), torch.Generator().manual_seed(seed), {}
    original = unet_table(load_pipeline(folder, pack=False).unet.config)

    def add(name, weight):
        out, inp, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inp, *kernel, generator=g) / inp**0.5
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank, *(1,) * len(kernel), generator=g) * 0.5
        state[f"{name}.alpha"] = torch.tensor(alpha)

    for layer, module in ref.unet.named_modules():
        if layer.endswith(UNET_LAYERS):
            spelled = original[f"{layer}.weight"].key.removesuffix(".weight") if unet_names == "original" else layer
            add("lora_unet_" + spelled.replace(".", "_"), module.weight)
    encoders = [("lora_te_", ref.text_encoder)] if getattr(ref, "text_encoder_2", None) is None else \
        [("lora_te1_", ref.text_encoder), ("lora_te2_", ref.text_encoder_2)]
    for prefix, encoder in encoders:
        for layer, module in encoder.named_modules():
            if layer.endswith(text):
                add(prefix + ("text_model." + layer.removeprefix("text_model.")).replace(".", "_"), module.weight)
    save_file(state, path)
    return path


def peft_file(folder, path, old_names=False, seed=0):
    """A diffusers/PEFT LoRA as diffusers' training scripts write it: peft adapters on the UNet and the
    text encoders, saved by save_lora_weights with their LoraConfig as metadata (lora_alpha != r, one
    rank_pattern and alpha_pattern entry); or with old_names, attention only, in diffusers' older
    lora.down/lora.up (lora_linear_layer for the text encoder) names and no metadata."""
    torch.manual_seed(seed)
    ref = reference(folder)
    targets = ["to_q", "to_k", "to_v", "to_out.0"] if old_names else ["to_q", "to_k", "to_out.0", "proj_in", "conv1",
                                                                       "ff.net.2"]
    unet = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                      rank_pattern={} if old_names else {"conv1": 2}, alpha_pattern={} if old_names else {"proj_in": 3})
    text = LoraConfig(r=2, lora_alpha=2 if old_names else 5, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj"] if old_names else ["q_proj", "fc2"])
    ref.unet.add_adapter(unet)
    encoders = {"text_encoder": ref.text_encoder, "text_encoder_2": getattr(ref, "text_encoder_2", None)}
    layers, metadata = {"unet_lora_layers": get_peft_model_state_dict(ref.unet)}, {}
    for name, encoder in encoders.items():
        if encoder is not None:
            encoder.add_adapter(text)
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
            metadata[f"{name}_lora_adapter_metadata"] = text.to_dict()
    metadata["unet_lora_adapter_metadata"] = unet.to_dict()
    if old_names:
        from diffusers.utils import convert_state_dict_to_diffusers
        layers, metadata = {k: convert_state_dict_to_diffusers(v) for k, v in layers.items()}, {}
    type(ref).save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)
    return path


def assert_matches_diffusers(folder, lora, scale, prompt="a cat in a hat"):
    ref = reference(folder)
    ref.load_lora_weights(lora)
    ref.fuse_lora(lora_scale=scale)
    expected = pipeline_images(ref, prompt, num_inference_steps=4, height=32, width=32, guidance_scale=7.5)
    pipe = load_pipeline(folder)
    plain = sample(pipe, prompt, steps=4, height=32, width=32, progress=False)
    load_lora(pipe, lora, scale)
    ours = sample(pipe, prompt, steps=4, height=32, width=32, progress=False)
    assert_same_image(ours, expected)
    assert (ours.int() - plain.int()).abs().max() > 10, "the LoRA changed nothing"


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_sd1_kohya_matches_diffusers(sd1, tmp_path, scale):
    assert_matches_diffusers(sd1, kohya_file(sd1, tmp_path / "style.safetensors"), scale)


def test_sd1_peft_matches_diffusers(sd1, tmp_path):
    assert_matches_diffusers(sd1, peft_file(sd1, tmp_path / "pytorch_lora_weights.safetensors"), 0.8)


def test_sd1_older_diffusers_names_match_diffusers(sd1, tmp_path):
    file = peft_file(sd1, tmp_path / "old.safetensors", old_names=True)
    assert any(".lora.down." in k for k in load_file(file)) and any("lora_linear_layer" in k for k in load_file(file))
    assert_matches_diffusers(sd1, file, 1.0)


def test_sd2_v_kohya_and_peft_match_diffusers(sd2v, tmp_path):
    assert_matches_diffusers(sd2v, kohya_file(sd2v, tmp_path / "k.safetensors", seed=1), 0.9)
    assert_matches_diffusers(sd2v, peft_file(sd2v, tmp_path / "p.safetensors", seed=1), 1.0)


def test_sdxl_kohya_with_original_names_matches_diffusers(sdxl, tmp_path):
    file = kohya_file(sdxl, tmp_path / "xl.safetensors", unet_names="original", seed=2)
    keys = load_file(file)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert_matches_diffusers(sdxl, file, 0.7)


def test_sdxl_peft_matches_diffusers(sdxl, tmp_path):
    assert_matches_diffusers(sdxl, peft_file(sdxl, tmp_path / "xl.safetensors", seed=3), 1.0)


def test_peft_text_encoder_mlp_only_merges_as_peft_does(sd1, tmp_path):
    """A diffusers file whose text-encoder adapter holds only MLP layers (fc1, fc2): diffusers 0.42
    cannot tell its format ("Could not automatically infer state dict type"); its update is peft's."""
    from peft.tuners.lora import LoraLayer
    torch.manual_seed(0)
    ref = reference(sd1)
    config = LoraConfig(r=2, lora_alpha=5, target_modules=["fc1", "fc2"], init_lora_weights=False)
    ref.text_encoder.add_adapter(config)
    file = tmp_path / "mlp.safetensors"
    layers = get_peft_model_state_dict(ref.text_encoder)
    StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name=file.name, text_encoder_lora_layers=layers,
                                              text_encoder_lora_adapter_metadata=config.to_dict())
    pipe = load_pipeline(sd1, pack=False)
    load_lora(pipe, file, 1.0)
    merged = 0
    for name, module in ref.text_encoder.named_modules():
        if isinstance(module, LoraLayer):
            module.merge()
            ours = pipe.text_encoder.get_submodule(name.removeprefix("text_model.")).weight
            assert torch.allclose(ours, module.base_layer.weight, atol=1e-6)
            merged += 1
    assert merged == 4  # fc1 and fc2 of both layers


def test_sd1_kohya_with_original_names_merges_as_with_diffusers_names(sd1, tmp_path):
    """kohya's original (input_blocks_1_1_...) names name the same layers in SD1 as in SDXL; diffusers
    0.42 maps them for SDXL only (its SD1 loader finds no such module) and refuses the file."""
    merged = []
    for names in ("diffusers", "original"):
        file = kohya_file(sd1, tmp_path / f"{names}.safetensors", unet_names=names, text=())
        assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(file)) == (names == "original")
        pipe = load_pipeline(sd1, pack=False)
        load_lora(pipe, file, 0.8)
        merged.append(pipe.unet.state_dict())
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def test_per_layer_alphas_merge_by_the_formula(sd1, tmp_path):
    """W' = W + s·(α/r)·up·down with each layer's own α (kohya's and A1111's rule), text attention
    included. diffusers 0.42 gives some layers, the UNet's attention and the text encoder's among them,
    the file's most common α instead (its alpha_pattern keys miss them), so on this file it differs."""
    file = kohya_file(sd1, tmp_path / "te.safetensors", text=("q_proj", "out_proj"), rank=3)
    state = load_file(file)
    for i, key in enumerate(k for k in state if k.endswith(".alpha")):
        state[key] = torch.tensor(0.5 + i % 4)  # α of 0.5, 1.5, 2.5, 3.5 by turns
    save_file(state, file)
    pipe = load_pipeline(sd1, pack=False)
    before = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()}
              for part in ("unet", "text_encoder")}
    load_lora(pipe, file, 0.5)
    layers = [("text_encoder", "lora_te_text_model_", "encoder.layers.0.self_attn.q_proj"),
              ("text_encoder", "lora_te_text_model_", "encoder.layers.1.self_attn.out_proj"),
              ("unet", "lora_unet_", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
              ("unet", "lora_unet_", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")]
    alphas = set()
    for part, prefix, layer in layers:
        name = prefix + layer.replace(".", "_")
        alphas.add(state[f"{name}.alpha"].item())
        delta = state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"] * 0.5 * state[f"{name}.alpha"] / 3
        after = getattr(pipe, part).state_dict()[f"{layer}.weight"]
        assert torch.allclose(after, before[part][f"{layer}.weight"] + delta, atol=1e-6)
    assert len(alphas) > 1


def test_one_by_one_convolutions_take_linear_matrices_and_back(sd1, sd2v, tmp_path):
    """SD1's proj_in/proj_out are 1x1 convolutions, SD2's linear layers: a file that spells their
    matrices the other way ([r, in] for the conv, [r, in, 1, 1] for the linear layer) merges exactly
    as the file in the layer's own shape. diffusers 0.42 refuses such a file; the update is the same."""
    for folder, reshape in [(sd1, lambda v: v.flatten(1)), (sd2v, lambda v: v[..., None, None])]:
        native = kohya_file(folder, tmp_path / "native.safetensors", text=())
        state = {k: reshape(v) if k.endswith(".weight") and "_proj_" in k and v.ndim in (2, 4) else v
                 for k, v in load_file(native).items()}
        assert any(v.ndim != load_file(native)[k].ndim for k, v in state.items())
        save_file(state, tmp_path / "other.safetensors")
        merged = []
        for file in (native, tmp_path / "other.safetensors"):
            pipe = load_pipeline(folder, pack=False)
            load_lora(pipe, file, 0.8)
            merged.append(pipe.unet.state_dict())
        assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def test_remove_restores_the_weights_exactly(sd1, tmp_path):
    pipe = load_pipeline(sd1)
    before = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()}
              for part in ("unet", "text_encoder")}
    first = load_lora(pipe, kohya_file(sd1, tmp_path / "a.safetensors"), 1.0)
    second = load_lora(pipe, peft_file(sd1, tmp_path / "b.safetensors"), 0.5)
    assert [lora.name for lora in pipe.loras] == ["a", "b"]
    with pytest.raises(ValueError, match="LoRA a is not the last one merged"):
        first.remove()
    second.remove()
    first.remove()
    assert pipe.loras == []
    for part, state in before.items():
        after = getattr(pipe, part).state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())


def test_two_loras_add_up(sd1, tmp_path):
    a, b = kohya_file(sd1, tmp_path / "a.safetensors"), kohya_file(sd1, tmp_path / "b.safetensors", seed=1)
    weights = []
    for files in ([], [a], [b], [a, b]):
        pipe = load_pipeline(sd1, pack=False)
        for f in files:
            load_lora(pipe, f, 0.7)
        weights.append(pipe.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    plain, only_a, only_b, both = weights
    assert torch.allclose(both, plain + (only_a - plain) + (only_b - plain), atol=1e-6)
    assert not torch.equal(only_a, plain)


def a1111_hash(path) -> str:
    """kohya's addnet hash, which A1111 records: SHA-256 of the bytes after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Strictness: one line naming the key, and nothing merged

def first_layer(state) -> str:
    return next(k for k in state if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")


def edited(file, path, change):
    state = load_file(file)
    change(state)
    save_file(state, path)
    return path


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"lora_unet_mid_block_foo.lora_down.weight": torch.zeros(4, 8)}),
     "lora_unet_mid_block_foo.lora_down.weight names no layer of the sd1 model's unet"),
    (lambda s: s.pop(next(k for k in list(s) if k.endswith("lora_up.weight"))), "has no up matrix beside it"),
    (lambda s: s.update({next(k for k in s if "attn2_to_k" in k and k.endswith("down.weight")): torch.zeros(4, 1024)}),
     "a LoRA for another model family"),
    (lambda s: s.update({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}),
     "is for SDXL's second text encoder, which the sd1 model has not"),
    (lambda s: s.update({"lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.zeros(1)}),
     "is not a LoRA matrix or alpha"),
    (lambda s: s.update({"model.diffusion_model.out.2.weight": torch.zeros(1)}), "a full model, not a LoRA"),
    (lambda s: s.update({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}),
     "is diffusers' format beside kohya's lora_"),
    (lambda s: s.update({f"{first_layer(s)}.lora_down.weight": s[f"{first_layer(s)}.lora_down.weight"][:0],
                         f"{first_layer(s)}.lora_up.weight": s[f"{first_layer(s)}.lora_up.weight"][:, :0]}),
     ".lora_down.weight has rank 0"),
    (lambda s: s.update({f"{first_layer(s)}.alpha": torch.tensor([1.0, 2.0])}), ".alpha holds 2 values"),
    (lambda s: s.update({f"{first_layer(s)}.alpha": torch.zeros(0)}), ".alpha holds 0 values"),
    (lambda s: s.update({f"{first_layer(s)}.alpha": torch.tensor(float("nan"))}), ".alpha holds NaN or infinite"),
    (lambda s: s[f"{first_layer(s)}.lora_up.weight"].view(-1)[3:5].fill_(float("inf")),
     ".lora_up.weight holds NaN or infinite"),
])
def test_bad_files_are_one_line_and_merge_nothing(sd1, tmp_path, change, message):
    file = edited(kohya_file(sd1, tmp_path / "good.safetensors"), tmp_path / "bad.safetensors", change)
    pipe = load_pipeline(sd1, pack=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(LoraError) as e:
        load_lora(pipe, file)
    assert message in str(e.value) and str(file) in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items()) and pipe.loras == []


@pytest.mark.parametrize("metadata,message", [
    ("[1, 2]", "its lora_adapter_metadata is not a JSON object"),
    ('{"unet.lora_alpha": 4, "unet.alpha_pattern": [1]}', "its unet.alpha_pattern is not a JSON object"),
    ('{"unet.lora_alpha": 4, "unet.rank_pattern": "attn1"}', "its unet.rank_pattern is not a JSON object"),
    ('{"unet.lora_alpha": 4, "unet.alpha_pattern": {"(": 2}}', "its unet.alpha_pattern key '(' is not a regular"),
    ('{"unet.lora_alpha": 4, "unet.alpha_pattern": {"(.*)*!": 2}}', "its unet.alpha_pattern key '(.*)*!' repeats"),
    ('{"unet.lora_alpha": 4, "unet.rank_pattern": {".*.*.*.*.*.*!": 2}}', "its unet.rank_pattern key '.*.*"),
    ('{"unet.lora_alpha": "8", "unet.r": 2}', "its unet.lora_alpha '8' is not a finite number"),
    ('{"unet.lora_alpha": NaN}', "its unet.lora_alpha nan is not a finite number"),
    ('{"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": Infinity}}', "its unet.alpha_pattern value inf is not"),
])
def test_bad_peft_metadata_is_one_line(sd1, tmp_path, metadata, message):
    pipe = load_pipeline(sd1, pack=False)
    layer, module = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    file = tmp_path / "bad.safetensors"
    save_file({f"unet.{layer}.lora_A.weight": torch.randn(2, module.weight.shape[1]),
               f"unet.{layer}.lora_B.weight": torch.randn(module.weight.shape[0], 2)}, file,
              metadata={"lora_adapter_metadata": metadata})
    before = module.weight.detach().clone()
    with pytest.raises(LoraError) as e:
        load_lora(pipe, file)
    assert message in str(e.value) and str(file) in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(module.weight, before) and pipe.loras == []


def test_an_sdxl_lora_is_refused_by_sd1(sd1, sdxl, tmp_path):
    with pytest.raises(LoraError, match="another model family"):
        load_lora(load_pipeline(sd1), kohya_file(sdxl, tmp_path / "xl.safetensors", unet_names="original", text=()))


# ---------------------------------------------------------------------------------------------
# generate.py --lora

FAST = ["--steps", "3", "--height", "16", "--width", "16", "--device", "cpu", "--proposer", "none", "--quiet",
        "--seed", "4"]


def test_generate_py_merges_loras_and_records_them(sd1, tmp_path, capsys):
    a, b = kohya_file(sd1, tmp_path / "ink.safetensors"), peft_file(sd1, tmp_path / "paper.safetensors")
    capsys.readouterr()
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, "--lora", f"{a}:0.6", "--lora", b,
                         "--out", tmp_path / "cat")
    assert code == 0, err
    written, text = png_reader.read_png(tmp_path / "cat.png")
    pipe = load_pipeline(sd1)
    load_lora(pipe, a, 0.6)
    load_lora(pipe, b, 1.0)
    assert torch.equal(written, sample(pipe, "a cat", steps=3, height=16, width=16, seed=4, progress=False)[0])
    prompt, settings = text["parameters"].split("\n")
    assert prompt == "a cat <lora:ink:0.6> <lora:paper:1>"
    assert f'Lora hashes: "ink: {a1111_hash(a)}, paper: {a1111_hash(b)}"' in settings
    assert re.fullmatch(r"[0-9a-f]{12}", a1111_hash(a))


def test_generate_py_refuses_bad_loras(sd1, sdxl, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, "--lora", tmp_path / "none.safetensors")
    assert code == 2 and err == [f"error: --lora {tmp_path / 'none.safetensors'}: no such file"]
    xl = kohya_file(sdxl, tmp_path / "xl.safetensors", unet_names="original")
    capsys.readouterr()  # diffusers' loading bars
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, "--lora", f"{xl}:0.5")
    assert code == 2 and len(err) == 1 and "xl.safetensors" in err[0] and "another model family" in err[0]
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, "--lora", f"{xl}:nan")
    assert code == 2 and err == ["error: argument --lora: 'nan' is not a finite number"]


def test_evaluate_merges_loras_and_resumes_only_with_the_same(sd1, tmp_path, capsys):
    lora = kohya_file(sd1, tmp_path / "ink.safetensors")
    (tmp_path / "p.csv").write_text("prompt,evaluation_seed\na cat,3\n")
    argv = [tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1, "--steps", "3", "--height", "16", "--width",
            "16", "--device", "cpu", "--quiet", "--methods", "sd,static", "--metrics", "none", "--no-report"]
    capsys.readouterr()
    code, _, err = run(evaluate.main, capsys, *argv, "--lora", f"{lora}:0.6")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == ["0_sd", "0_static_w7.5"]
    written, text = png_reader.read_png(tmp_path / "run" / records[0]["image"])
    pipe = load_pipeline(sd1)
    load_lora(pipe, lora, 0.6)
    expected = sample(pipe, "a cat", steps=3, height=16, width=16, seed=3, sampler="dpm++2m", progress=False)[0]
    assert torch.equal(written, expected) and text["parameters"].startswith("a cat <lora:ink:0.6>\n")
    stored = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["lora"]
    assert stored == [{"file": str(lora), "scale": 0.6, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]
    # the same run at another scale, or without the LoRA, is another run: refused, not mixed in
    for lora_argv in (["--lora", f"{lora}:0.5"], []):
        code, _, err = run(evaluate.main, capsys, *argv, *lora_argv)
        assert code == 2 and len(err) == 1 and "lora" in err[0], err


def test_distill_collect_merges_loras_records_them_and_refuses_strength(sd1, clip_folder, tmp_path, capsys):
    """distill.py collect loads the model as generate.py does, LoRAs merged; its data.json names them,
    so a collection resumed without them is refused; it edits no image, so --strength is refused."""
    import distill
    lora = kohya_file(sd1, tmp_path / "ink.safetensors")
    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    argv = ["collect", tmp_path / "p.csv", "--model", sd1, "--out", tmp_path / "data", "--proposer", "clip",
            "--clip-model", clip_folder, "--steps", "3", "--vlm-steps", "1", "--seeds-per-prompt", "1",
            "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
    capsys.readouterr()
    code, _, err = run(distill.main, capsys, *argv, "--strength", "0.5")
    assert code == 2 and err == ["error: --strength 0.5: must be left out: collect draws images from text and "
                                 "edits none"], err
    code, _, err = run(distill.main, capsys, *argv, "--lora", f"{lora}:0.6")
    assert code == 0 and err == [], err
    stored = json.loads((tmp_path / "data" / "data.json").read_text())["settings"]["lora"]
    assert stored == [{"file": str(lora), "scale": 0.6, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]
    code, _, err = run(distill.main, capsys, *argv)
    assert code == 2 and len(err) == 1 and "lora" in err[0], err
