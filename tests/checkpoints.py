"""Random-weight Stable Diffusion checkpoints, written by the reference libraries in their real
on-disk formats. Small configs with the SD1 / SD2 structure: the loaders must read them exactly
as they read the real models.

Run as a script, it writes models to try every command with, offline and in seconds (the images
are noise): `python tests/checkpoints.py OUT_DIR` (needs requirements-dev.txt)."""
import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # as a script, only tests/ is on the path: the repository root too
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.random_weights import SCHEDULER, randomize_
from fake_vocab import write_clip_vocab

# Text width 128 with 64-channel heads and 32-group norms: the conventions a single file cannot
# record (heads, groups), kept as in the real models so both formats load the same way.
FAMILIES = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=128, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="quick_gelu"),
        pad="<|endoftext|>",
    ),
    "sd2": dict(
        unet=dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=128,
                  attention_head_dim=(1, 2), use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="gelu"),
        pad="!",
    ),
}
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def make_sd_folder(root, family="sd1", seed=0, prediction_type="epsilon", hub_text_prefix=True, max_length=77,
                   inpainting=False):
    """Writes a diffusers-layout folder with every tensor random. Returns its path.

    `hub_text_prefix`: store the text encoder's keys with `text_model.` (and position_ids) as
    hub files do; transformers 5 itself writes them without. `max_length`: the text encoder's
    positions and the tokenizer's model_max_length (77 in SD). `inpainting`: an inpainting model,
    as stable-diffusion-inpainting's: a UNet of 9 input channels (the latents, the mask and the
    masked image's latents), under StableDiffusionInpaintPipeline."""
    spec, root = FAMILIES[family], Path(root)
    vocab_dir = write_clip_vocab(root / "tokenizer", pad_token=spec["pad"], model_max_length=max_length)
    vocab_size = len(json.loads((vocab_dir / "vocab.json").read_text()))

    unet = UNet2DConditionModel(**spec["unet"], in_channels=9 if inpainting else 4)
    randomize_(unet, seed).save_pretrained(root / "unet")
    randomize_(AutoencoderKL(**VAE, sample_size=16), seed + 1).save_pretrained(root / "vae")
    text_cfg = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=max_length, eos_token_id=2,
                              pad_token_id=1, bos_token_id=0, **spec["text"])
    randomize_(CLIPTextModel(text_cfg), seed + 2).save_pretrained(root / "text_encoder")
    if hub_text_prefix:
        file = root / "text_encoder" / "model.safetensors"
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in load_file(file).items()}
        state["text_model.embeddings.position_ids"] = torch.arange(max_length)[None]
        save_file(state, file, metadata={"format": "pt"})
    DDIMScheduler(**SCHEDULER, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }))
    return root


# SDXL's structure, small: no attention at the top level, per-level depths, linear proj_in; two text
# encoders (ViT-L-like quick_gelu, bigG-like gelu with a projection) whose widths add to the UNet's
# cross-attention width, and the pooled width plus six 8-d size ids as add_embedding's inputs. 64-channel
# heads and 32-group norms, as in the real model: a single file cannot record them.
SDXL = dict(
    unet=dict(block_out_channels=(64, 128, 128), layers_per_block=2, cross_attention_dim=64 + 128,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
              addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=40 + 6 * 8, sample_size=8),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
              hidden_act="quick_gelu"),
    text_2=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                hidden_act="gelu", projection_dim=40),
)
SDXL_WIDTH = SDXL["unet"]["cross_attention_dim"]  # both text encoders' hidden states side by side: 64 + 128
# SDXL base 1.0's scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, clip_sample=False)
# playgroundai/playground-v2.5-1024px-aesthetic's vae/config.json sets these: an SDXL VAE whose latents are
# normalised per channel before scaling (its pipeline's EDM scheduler aside)
NORMALISED_VAE = dict(latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.5498, 5.2299],
                      scaling_factor=0.5)
# stabilityai/sdxl-turbo's scheduler/scheduler_config.json: SDXL base's betas, EulerAncestralDiscreteScheduler,
# "trailing" spacing (diffusers PR 6121 and the SDXL-Turbo docs: 1-4 steps at guidance 0)
TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000,
                   "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
                   "steps_offset": 1, "timestep_spacing": "trailing", "interpolation_type": "linear",
                   "use_karras_sigmas": False, "prediction_type": "epsilon", "sample_max_value": 1.0,
                   "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}


def make_sdxl_folder(root, seed=0, force_zeros_for_empty_prompt=True, force_upcast=True, inpainting=False,
                     hub_token_ids=True):
    """Writes an SDXL diffusers folder with StableDiffusionXLPipeline.save_pretrained, every tensor
    random; tokenizer_2 pads with "!" as SDXL's does. Returns its path. `inpainting`: SDXL
    inpainting's, a 9-channel UNet under StableDiffusionXLInpaintPipeline (in root/sdxl-inpainting).
    `hub_token_ids`: the text configs' special-token ids are the hub's (eos_token_id 2, transformers'
    legacy value: pool at the largest id); False leaves CLIPTextConfig's own (eos 49407, not in this
    small vocabulary), as a config written by today's transformers without them holds."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    vocab = write_clip_vocab(root / "vocab-1")
    vocab_2 = write_clip_vocab(root / "vocab-2", pad_token="!")
    vocab_size = len(json.loads((vocab / "vocab.json").read_text()))
    ids = dict(eos_token_id=2, pad_token_id=1, bos_token_id=0) if hub_token_ids else {}
    text_config = lambda spec: CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, **ids, **spec)
    pipe = (StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline)(
        vae=randomize_(AutoencoderKL(**VAE, sample_size=16, scaling_factor=0.13025, force_upcast=force_upcast),
                       seed + 1),
        text_encoder=randomize_(CLIPTextModel(text_config(SDXL["text"])), seed + 2),
        text_encoder_2=randomize_(CLIPTextModelWithProjection(text_config(SDXL["text_2"])), seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(vocab), tokenizer_2=CLIPTokenizer.from_pretrained(vocab_2),
        unet=randomize_(UNet2DConditionModel(**SDXL["unet"], in_channels=9 if inpainting else 4), seed),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    folder = root / ("sdxl-inpainting" if inpainting else "sdxl")
    pipe.save_pretrained(folder)
    return folder


def small_clip_config(folder: Path, layers: int, heads: int, vision_width: int, projection_dim: int,
                      image_size: int = 32):
    """A small two-tower CLIPConfig whose token ids are those of the fake vocabulary in `folder` (so the
    text is pooled at its EOS): text 32 wide, the vision tower `vision_width` wide, patches of 8."""
    from transformers import CLIPConfig, CLIPVisionConfig

    vocab = json.loads((folder / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    return CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=vision_width,
                                       intermediate_size=2 * vision_width, num_hidden_layers=layers,
                                       num_attention_heads=heads),
        projection_dim=projection_dim)


def make_clip_folder(folder, seed=1):
    """A small two-tower CLIPModel folder as transformers writes it, every tensor random, its token ids the
    fake vocabulary's (so the text is pooled at its EOS): for the CLIP proposer (--clip-model). Returns its path."""
    from transformers import CLIPModel

    folder = write_clip_vocab(Path(folder))
    config = small_clip_config(folder, layers=1, heads=2, vision_width=32, projection_dim=16)
    randomize_(CLIPModel(config), seed).save_pretrained(folder)
    return folder


def make_clip_reference(folder, seed=0, image_size=32):
    """A small two-tower CLIPModel as transformers writes it, every tensor random, its token ids the
    fake vocabulary's: (its folder, the transformers model with eager attention), for parity tests."""
    from transformers import CLIPModel

    folder = write_clip_vocab(Path(folder))
    config = small_clip_config(folder, layers=2, heads=4, vision_width=48, projection_dim=24, image_size=image_size)
    config._attn_implementation = "eager"
    ref = randomize_(CLIPModel(config).eval(), seed)
    ref.save_pretrained(folder)
    return folder, ref


def make_taesd_folder(folder, seed=0):
    """TAESD as diffusers writes it (AutoencoderTiny.save_pretrained), every tensor random. Returns its path."""
    randomize_(AutoencoderTiny(), seed).save_pretrained(folder)
    return Path(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tests/checkpoints.py", description="Write small random-weight models "
                                     "to try generate.py and evaluate.py with, offline: OUT_DIR/sd1 and OUT_DIR/sdxl "
                                     "(diffusers folders), OUT_DIR/clip (a CLIP for the proposer and the CLIP score) "
                                     "and OUT_DIR/prompts.csv; then print commands to try. The images are noise.")
    parser.add_argument("out", metavar="OUT_DIR")
    out = Path(parser.parse_args(argv).out)
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # the commands to try, not the writers' notes and progress bars
        library.logging.set_verbosity_error()
        library.logging.disable_progress_bar()
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out}: exists and is not empty; give a new folder")
    make_sd_folder(out / "sd1", "sd1")
    with tempfile.TemporaryDirectory() as tmp:  # make_sdxl_folder writes its vocabularies beside the folder
        shutil.move(make_sdxl_folder(tmp), out / "sdxl")
    make_clip_folder(out / "clip")
    (out / "prompts.csv").write_text("case_number,prompt,evaluation_seed\n0,a person on a beach,1\n"
                                     "1,a castle at dusk,2\n")
    q = lambda name: shlex.quote(str(out / name))
    print(f"wrote random-weight models into {out}; from the repository root, try:\n"
          f"  python generate.py \"a castle\" --model {q('sd1')} --proposer none --steps 2\n"
          f"  python generate.py \"a person on a beach\" --model {q('sd1')} --clip-model {q('clip')} --steps 4\n"
          f"  python generate.py \"a castle\" --model {q('sdxl')} --sampler euler --proposer none --steps 2\n"
          f"  python evaluate.py {q('prompts.csv')} --out {q('run')} --model {q('sd1')} --clip-model {q('clip')} "
          f"--clip-score-model {q('clip')} --steps 4 --metrics nudenet-detector,clip")


if __name__ == "__main__":
    main()
