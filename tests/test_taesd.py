"""TAESD (model/taesd.py) against diffusers' AutoencoderTiny on random weights, and its strict loading
(checkpoint/taesd.py) from a diffusers folder, madebyollin's single files and the hub cache."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file, save_file

from helpers import assert_close_rel, error_of, hub_cache, randomize_, tiny_reference_decode
from checkpoint.taesd import load_taesd
from model.taesd import SD, TAESD, TAESDConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# A smaller TAESD than madebyollin's, with a scaling factor, so that a config ignored anywhere shows.
SMALL = dict(encoder_block_out_channels=(16,) * 3, decoder_block_out_channels=(24,) * 3,
             num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1), scaling_factor=0.5)
SMALL_CONFIG = TAESDConfig(encoder_width=16, decoder_width=24, encoder_blocks=(1, 2, 1), decoder_blocks=(2, 1, 1),
                           scaling_factor=0.5)


@pytest.fixture(scope="module")
def ref():
    return randomize_(AutoencoderTiny(), 3).eval()


@pytest.fixture(scope="module")
def ours(ref):
    model = TAESD(SD).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def reference_encode(ref, images):
    with torch.no_grad():
        return ref.encode(images).latents * ref.config.scaling_factor


def test_state_dict_is_autoencoder_tiny_s(ref, ours):
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.decoder.parameters()) == 1_222_531


# Latents of std 2, so that the tanh clamp at the decoder's input matters (3 tanh(z/3) moves 2 to 1.75).
@pytest.mark.parametrize("size", [(8, 8), (9, 13), (16, 6), (1, 1)])
def test_decode_matches_diffusers(ref, ours, size):
    z = 2 * torch.randn(2, 4, *size)
    with torch.no_grad():
        out = ours.decode(z)
    assert out.shape == (2, 3, 8 * size[0], 8 * size[1])
    assert_close_rel(out, tiny_reference_decode(ref, z))


@pytest.mark.parametrize("size", [(64, 64), (72, 40), (33, 17)])
def test_encode_matches_diffusers(ref, ours, size):
    images = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        latents = ours.encode(images)
    assert latents.shape == (2, 4, -(-size[0] // 8), -(-size[1] // 8))
    assert_close_rel(latents, reference_encode(ref, images))


def test_scaling_factor_is_applied_as_diffusers_pipelines_apply_it():
    ref = randomize_(AutoencoderTiny(**SMALL), 1).eval()
    ours = TAESD(SMALL_CONFIG).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    z, images = torch.randn(1, 4, 5, 7), torch.rand(1, 3, 20, 28) * 2 - 1
    with torch.no_grad():
        assert_close_rel(ours.decode(z), tiny_reference_decode(ref, z))
        assert_close_rel(ours.encode(images), reference_encode(ref, images))


# Loading


def assert_same_model(loaded, ref, encoder=True):
    z = 2 * torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        assert_close_rel(loaded.decode(z), tiny_reference_decode(ref, z))
        if encoder:
            images = torch.rand(1, 3, 40, 24) * 2 - 1
            assert_close_rel(loaded.encode(images), reference_encode(ref, images))


@pytest.mark.parametrize("config", [{}, SMALL], ids=["taesd", "small"])
def test_loads_a_diffusers_folder(tmp_path, config):
    ref = randomize_(AutoencoderTiny(**config), 4).eval()
    ref.save_pretrained(tmp_path)
    loaded = load_taesd(tmp_path)
    assert_same_model(loaded, ref)
    assert loaded.config == (SMALL_CONFIG if config else SD)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert next(load_taesd(tmp_path, dtype="fp16").parameters()).dtype == torch.float16


def madebyollin_files(ref, folder: Path, prefix="taesd") -> tuple[Path, Path]:
    """ref's weights in madebyollin's layout: his Encoder and Decoder are bare nn.Sequentials, and his
    Decoder's index 0 is a Clamp module, so each decoder index is diffusers' plus one."""
    encoder, decoder = {}, {}
    for key, value in ref.state_dict().items():
        part, _, index, rest = key.split(".", 3)
        if part == "encoder":
            encoder[f"{index}.{rest}"] = value.contiguous()
        else:
            decoder[f"{int(index) + 1}.{rest}"] = value.contiguous()
    # spot checks against madebyollin's taesd.py: Clamp(), conv(4, 64), ReLU, Block x3, Upsample,
    # conv(64, 64, bias=False), ..., Block, conv(64, 3); Encoder: conv(3, 64), Block, conv(stride 2, no bias), ...
    assert decoder["1.weight"].shape == (64, 4, 3, 3) and "3.conv.0.weight" in decoder
    assert "7.weight" in decoder and "7.bias" not in decoder and decoder["19.weight"].shape == (3, 64, 3, 3)
    assert encoder["0.weight"].shape == (64, 3, 3, 3) and "2.bias" not in encoder and encoder["14.weight"].shape[0] == 4
    paths = folder / f"{prefix}_encoder.safetensors", folder / f"{prefix}_decoder.safetensors"
    save_file(encoder, paths[0])
    save_file(decoder, paths[1])
    return paths


def test_loads_madebyollins_files(ref, tmp_path):
    encoder_file, decoder_file = madebyollin_files(ref, tmp_path)
    both = load_taesd(decoder_file)
    assert both.encoder is not None
    assert_same_model(both, ref)

    encoder_file.unlink()  # a decoder alone is enough for previews
    alone = load_taesd(decoder_file)
    assert alone.encoder is None and "encoder" not in "".join(alone.state_dict())
    assert_same_model(alone, ref, encoder=False)
    with pytest.raises(RuntimeError, match="no encoder"):
        alone.encode(torch.zeros(1, 3, 8, 8))


def _run(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


LOAD_FROM_HUB = ("import torch\nfrom checkpoint.taesd import load_taesd, CheckpointError\n"
                 "try:\n    m = load_taesd('madebyollin/taesd')\n"
                 "    print(m.decode(torch.ones(1, 4, 2, 2)).sum().item())\n"
                 "except CheckpointError as e:\n    print(e)")


def test_hub_id_offline_is_one_line(tmp_path):
    result = _run(LOAD_FROM_HUB, tmp_path)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    assert "madebyollin/taesd" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_hub_id_loads_from_the_cache_offline(ref, tmp_path):
    ref.save_pretrained(tmp_path / "repo")
    hub_cache(tmp_path / "home", "madebyollin/taesd", tmp_path / "repo")
    result = _run(LOAD_FROM_HUB, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    expected = tiny_reference_decode(ref, torch.ones(1, 4, 2, 2)).sum().item()
    assert float(result.stdout) == pytest.approx(expected, rel=1e-5)


# Strictness: every failure is one CheckpointError line that says what is wrong.


@pytest.fixture(scope="module")
def saved(ref, tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd")
    ref.save_pretrained(folder)
    return folder


def copy_with_config(saved: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "changed"
    shutil.copytree(saved, folder)
    config = json.loads((saved / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, expected", [
    (dict(act_fn="silu"), "act_fn='silu' is not supported (TAESD's is 'relu')"),
    (dict(upsample_fn="bilinear"), "upsample_fn='bilinear' is not supported"),
    (dict(shift_factor=0.1), "shift_factor=0.1 is not supported"),
    (dict(decoder_block_out_channels=[64, 64, 32, 32]), "one width per stage"),
    (dict(num_encoder_blocks=[1, 3, 3]), "one width per stage"),
    (dict(latent_channels=16), "3 of the wrong shape (first: encoder.layers.14.weight (4, 64, 3, 3) (model: (16, 64"),
    (dict(num_decoder_blocks=[3, 3, 3, 2]), "8 missing (first: decoder.layers.18.conv.0.weight), 2 unexpected"),
    (dict(_class_name="AutoencoderKL"), "AutoencoderKL (the full VAE), not TAESD's AutoencoderTiny"),
])
def test_folder_config_errors(saved, tmp_path, changes, expected):
    assert expected in error_of(copy_with_config(saved, tmp_path, **changes), load_taesd)


def test_folder_errors(saved, tmp_path):
    vae = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(vae)
    assert "holds a AutoencoderKL (the full VAE)" in error_of(vae, load_taesd)
    (vae / "config.json").write_text((saved / "config.json").read_text())  # TAESD's config, a VAE's tensors
    assert "unexpected (first: decoder.conv_in" in error_of(vae, load_taesd)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(saved / "config.json", no_weights)
    assert "diffusion_pytorch_model.safetensors: missing" in error_of(no_weights, load_taesd)
    (tmp_path / "empty").mkdir()
    assert "config.json: missing (a TAESD folder holds config.json" in error_of(tmp_path / "empty", load_taesd)

    pipeline = tmp_path / "pipeline"
    shutil.copytree(saved, pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    assert "a whole pipeline folder" in error_of(pipeline, load_taesd)
    assert "no such file or folder" in error_of(tmp_path / "nowhere", load_taesd)


def test_single_file_errors(ref, tmp_path):
    encoder_file, decoder_file = madebyollin_files(ref, tmp_path)
    assert "TAESD's encoder alone; pass its decoder file" in error_of(encoder_file, load_taesd)
    ref.save_pretrained(tmp_path / "folder")
    weights = tmp_path / "folder" / "diffusion_pytorch_model.safetensors"
    assert "a diffusers AutoencoderTiny weights file; pass the folder" in error_of(weights, load_taesd)

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, tmp_path / "vae.safetensors")
    message = error_of(tmp_path / "vae.safetensors", load_taesd)
    assert "a Stable Diffusion checkpoint or its full VAE, not TAESD" in message
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    assert "not a TAESD file" in error_of(tmp_path / "other.safetensors", load_taesd)
    torch.save({"1.weight": torch.zeros(2)}, tmp_path / "taesd_decoder.pth")
    assert "not a readable safetensors file" in error_of(tmp_path / "taesd_decoder.pth", load_taesd)

    # a decoder file with one tensor short, one too many, or for 16-channel latents (taef1, taesd3)
    good = load_file(decoder_file)
    broken = tmp_path / "broken" / "taesd_decoder.safetensors"
    broken.parent.mkdir()
    cases = [({"19.bias"}, {}, "1 missing (first: taesd_decoder.safetensors:19.bias)"),
             (set(), {"20.weight": torch.zeros(3)}, "1 unexpected (first: taesd_decoder.safetensors:20.weight)"),
             ({"1.weight"}, {"1.weight": torch.zeros(64, 16, 3, 3)},
              "(first: taesd_decoder.safetensors:1.weight (64, 16, 3, 3) (model: (64, 4, 3, 3))); madebyollin")]
    for drop, add, expected in cases:
        save_file({**{k: v for k, v in good.items() if k not in drop}, **add}, broken)
        assert expected in error_of(broken, load_taesd)

    shutil.copy(decoder_file, encoder_file)  # a decoder where the encoder should be
    assert "next to the decoder file, but not TAESD's encoder" in error_of(decoder_file, load_taesd)
