"""generate.py on SDXL: the PNG names the model and takes the model's default size; SDXL's size and crop
micro-conditioning flags reach the image and the PNG, and are refused in one line, with nothing written,
for a model without size conditioning or when malformed."""
import pytest
import torch

import generate
from helpers import run
from png import read_png
from sampler.loop import generate as sample
from weights import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["a lighthouse at dawn", "--steps", "3", "--seed", "5", "--device", "cpu", "--quiet", "--proposer", "none"]
SMALL = ["--height", "32", "--width", "32"]
SIZES = ["--original-size", "64x48", "--crop-top-left", "4,8", "--target-size", "24x40"]


def test_png_names_the_model_and_the_default_size_is_the_models(sdxl, tmp_path, capsys):
    """No --height/--width: the model's default size (diffusers' default_sample_size x the VAE's scale),
    1024 for SDXL base (tests/test_sdxl_generate.py checks it is diffusers')."""
    size = load_pipeline(sdxl).default_size
    code, out, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--out", tmp_path / "a.png")
    assert code == 0 and out[-1] == str(tmp_path / "a.png"), err
    pixels, text = read_png(tmp_path / "a.png")
    assert pixels.shape == (size, size, 3)
    settings = text["parameters"].splitlines()[-1]
    assert f"Size: {size}x{size}" in settings and "Model: sdxl" in settings and "Original size" not in settings


def test_micro_conditioning_flags_reach_the_image_and_the_png(sdxl, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, *SMALL, "--model", sdxl, *SIZES, "--out", tmp_path / "sized.png")
    assert code == 0, err
    pixels, text = read_png(tmp_path / "sized.png")
    expected = sample(load_pipeline(sdxl), "a lighthouse at dawn", steps=3, seed=5, height=32, width=32,
                      original_size=(64, 48), crop_top_left=(4, 8), target_size=(24, 40), progress=False)[0]
    assert torch.equal(pixels, expected)
    assert 'Original size: 64x48, Crop top-left: "4,8", Target size: 24x40' in text["parameters"]
    run(generate.main, capsys, *RUN, *SMALL, "--model", sdxl, "--out", tmp_path / "plain.png")
    assert (pixels.int() - read_png(tmp_path / "plain.png")[0].int()).abs().max() > 2
    # the defaults given explicitly are the default image, and the PNG does not list them
    code, _, err = run(generate.main, capsys, *RUN, *SMALL, "--model", sdxl, "--original-size", "32x32",
                       "--crop-top-left", "0,0", "--out", tmp_path / "same.png")
    assert code == 0, err
    same, text = read_png(tmp_path / "same.png")
    assert torch.equal(same, read_png(tmp_path / "plain.png")[0]) and "Original size" not in text["parameters"]


def test_micro_conditioning_is_refused_for_sd1_in_one_line(sd1, tmp_path, capsys):
    code, out, err = run(generate.main, capsys, *RUN, *SMALL, "--model", sd1, "--original-size", "64x64",
                         "--target-size", "32x32", "--out", tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert err == ["error: --original-size, --target-size: SDXL's size and crop conditioning; the model sd1 (sd1) "
                   "takes none"]


@pytest.mark.parametrize("flag, value", [("--original-size", "64"), ("--original-size", "0x64"),
                                         ("--target-size", "axb"), ("--crop-top-left", "-1,0"),
                                         ("--crop-top-left", "4x8")])
def test_malformed_micro_conditioning_is_one_line(flag, value, tmp_path, capsys):
    code, out, err = run(generate.main, capsys, *RUN, "--model", tmp_path, flag, value, "--out", tmp_path / "x.png")
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith(f"error: argument {flag}: "), err
    assert not (tmp_path / "x.png").exists()


def test_the_documented_sdxl_commands_run_from_the_hub_cache(sdxl, tmp_path):
    """README's and the --help examples' SDXL base and SDXL-Turbo commands, offline, with the small folder laid
    out in the hub cache under those repo ids (and SDXL-Turbo's scheduler): the PNG names the repo."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from checkpoints import TURBO_SCHEDULER
    from helpers import hub_cache

    turbo = tmp_path / "turbo-folder"
    shutil.copytree(sdxl, turbo)
    (turbo / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    hub_cache(tmp_path / "home", "stabilityai/stable-diffusion-xl-base-1.0", sdxl)
    hub_cache(tmp_path / "home", "stabilityai/sdxl-turbo", turbo)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    commands = {"base": ["--model", "stabilityai/stable-diffusion-xl-base-1.0", "--sampler", "euler", "--steps", "2"],
                "turbo": ["--model", "stabilityai/sdxl-turbo", "--sampler", "euler-a", "--steps", "1",
                          "--guidance", "0"]}
    for name, argv in commands.items():
        result = subprocess.run([sys.executable, str(root / "generate.py"), "a castle on a hill", *argv, "--proposer",
                                 "none", "--quiet", "--device", "cpu", "--out", str(tmp_path / name)],
                                capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        pixels, text = read_png(tmp_path / f"{name}.png")
        assert f"Model: {argv[1]}" in text["parameters"] and pixels.shape[0] == load_pipeline(sdxl).default_size
