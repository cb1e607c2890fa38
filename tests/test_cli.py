"""generate.py: arguments, bad input, output files and their metadata, and the written pixels against
diffusers' StableDiffusionPipeline + DDIMScheduler on random-weight checkpoints. On SDXL: the model's default
size, the size and crop micro-conditioning flags (refused in one line, with nothing written, for a model
without size conditioning or when malformed), and the documented commands from the hub cache."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
import weights
from checkpoints import TURBO_SCHEDULER
from helpers import assert_same_image, ddim_reference, hub_cache, pipeline_images, run
from png_reader import read_png
from sampler.loop import generate as sample
from weights import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "3", "--height", "16", "--width", "16", "--device", "cpu", "--proposer", "none", "--quiet"]


def diffusers_images(folder, prompt, negative_prompt=None, *, seed, steps, guidance=7.5, height=None, width=None,
                     batch=1, eta=0.0):
    return pipeline_images(ddim_reference(folder), prompt, seed=seed, negative_prompt=negative_prompt,
                           num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                           num_images_per_prompt=batch, eta=eta)


# ---------------------------------------------------------------------------------------------
# --help and bad input

def test_help_lists_every_flag():
    result = subprocess.run([sys.executable, "generate.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for flag in ["prompt", "--negative-prompt", "--model", "--tokenizer", "--prediction-type", "--seed", "--steps",
                 "--guidance", "--height", "--width", "--eta", "--batch", "--out", "--device", "--dtype", "--quiet",
                 "CompVis/stable-diffusion-v1-4", "examples:"]:
        assert flag in result.stdout


@pytest.fixture
def no_loading(monkeypatch):
    """Makes loading a model fail the test: bad input must be caught before it."""
    def load_pipeline(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(weights, "load_pipeline", load_pipeline)


def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot write in: read-only by mode, or /proc for root, who ignores modes."""
    if os.geteuid() == 0:
        return Path("/proc")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


BAD = [
    (["--height", "30"], "--height 30"), (["--width", "0"], "--width 0"), (["--width", "-16"], "--width -16"),
    (["--steps", "0"], "--steps 0"), (["--steps", "three"], "--steps"), (["--guidance", "-1"], "--guidance -1"),
    (["--eta", "-0.5"], "--eta -0.5"), (["--batch", "0"], "--batch 0"),
    (["--out", "{tmp}/a-file/x.png"], "a-file is a file, not a folder"),
    (["--out", "{tmp}/a-file/new/x.png"], "a-file is a file, not a folder"),
    (["--out", "{tmp}"], "names a folder"), (["--out", "{tmp}/new-folder/"], "names a folder"),
    (["--out", "{unwritable}/x.png"], "cannot write"), (["--out", "{unwritable}/new/x.png"], "cannot create"),
    # names that would make odd files ("x.png .png", "x..png", " .png") or none ("" was a traceback after sampling)
    (["--out", "{tmp}/x.png "], "png ': a file name"), (["--out", "{tmp}/x.png\t"], "a file name"),
    (["--out", "{tmp}/ x.png"], "a file name"), (["--out", "{tmp}/x."], "a file name"), (["--out", ""], "a file name"),
    (["--out", "{tmp}/new-folder/.."], "a file name"), (["--trace", "{tmp}/t.json "], "--trace"),
    (["--device", "banana"], "--device banana"), (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "cuda:01"], "--device cuda:01"), (["--device", "cuda:2147483648"], "--device cuda:2147483648"),
    (["--height", "8" * 400], "--height 888"), (["--width", "65536"], "--width 65536"),
    (["--dtype", "fp8"], "--dtype"), (["--model", "{tmp}/missing.safetensors"], "missing.safetensors"),
    (["--model", "./no-such-model"], "no-such-model"), (["--bogus"], "--bogus"),
    (["--sampler", "dpm++2m", "--eta", "0.5"], "--eta 0.5"), (["--sampler", "heun"], "--sampler"),
    (["--guidance", "inf"], "--guidance: 'inf' is not a finite number"),
    (["--guidance", "1e308"], "--guidance 1e+308: must be between 0 and 1000"),
    (["--negative-scale", "1e9"], "--negative-scale 1e+09: must be numbers between 0 and 1000"), (["--guidance", "nan"], "finite"),
    (["--eta", "inf"], "--eta: 'inf' is not a finite number"),
    # a byte that is not UTF-8 (a Latin-1 shell, say) reaches Python as a lone surrogate
    (["caf\udce9"], "argument prompt: not UTF-8"), (["--negative-prompt", "caf\udce9"], "--negative-prompt: not UTF-8"),
    # names the file system cannot hold: over 255 bytes, or too long for the temporary file written beside
    (["--out", "{tmp}/" + "n" * 300 + ".png"], "File name too long"),
    (["--out", "{tmp}/" + "n" * 245 + ".png"], "File name too long"),
    (["--model", "{tmp}/" + "m" * 300], "no such file or folder"),
    (["--lora", "{tmp}/" + "l" * 300 + ".safetensors"], "no such file"),
]


@pytest.mark.parametrize("args, about", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_before_loading(args, about, tmp_path, capsys, no_loading):
    (tmp_path / "a-file").write_text("")
    fill = dict(tmp=tmp_path, unwritable=unwritable_folder(tmp_path))
    code, out, err = run(generate.main, capsys, *[a.format(**fill) for a in args])
    assert code == 2
    assert out == [], "nothing, not even the seed, is printed for bad arguments"
    assert len(err) == 1 and err[0].startswith("error: ") and about in err[0], err


def test_missing_model_folder_contents_exit_2(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    code, _, err = run(generate.main, capsys, "--model", tmp_path / "empty-model", "--out", tmp_path / "x.png", *FAST)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "empty-model" in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_corrupt_safetensors_exit_2(sd1, sd1_file, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    code, _, err = run(generate.main, capsys, "--model", broken, "--tokenizer", sd1 / "tokenizer", "--out",
                       tmp_path / "x.png", *FAST)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "broken.safetensors" in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_nan_exits_1_naming_the_step_and_saves_nothing(sd1, tmp_path, capsys, monkeypatch):
    hot = shutil.copytree(sd1, tmp_path / "hot")  # a UNet whose output overflows float32 within two steps
    file = hot / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["conv_out.weight"] *= 1e37
    save_file(state, file)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(generate.main, capsys, "--model", hot, "--dtype", "bf16", *FAST)
    assert code == 1 and len(err) == 1, err
    assert re.search(r"step \d+", err[0]) and "--dtype fp32" in err[0]
    assert list((tmp_path / "outputs").iterdir()) == []


def test_interrupt_exits_130_and_saves_nothing(sd1, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "generate", interrupted)
    code, _, err = run(generate.main, capsys, "--model", sd1, "--out", tmp_path / "x.png", *FAST)
    assert code == 130 and err == ["error: interrupted"]
    assert list(tmp_path.iterdir()) == []


def test_steps_the_schedule_cannot_take_exit_2_after_loading(sd1, tmp_path, capsys):
    # leading spacing with steps_offset 1 puts the first of 1000 steps at timestep 1000, past the last
    code, out, err = run(generate.main, capsys, "--model", sd1, *FAST, "--steps", 1000, "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --steps 1000: ") and "steps_offset 1" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_setting_the_sampler_lacks_is_one_line_naming_the_sampler(sd1, tmp_path, capsys):
    """A fine-tune whose scheduler config asks for Karras sigmas: diffusers' DPM-Solver++ would use
    them, so dpm++2m refuses rather than make another image; ddim reads no such setting."""
    model = tmp_path / "karras"
    shutil.copytree(sd1, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_karras_sigmas": True}))
    code, out, err = run(generate.main, capsys, "--model", model, *FAST, "--sampler", "dpm++2m", "--out",
                         tmp_path / "x.png")
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: --sampler dpm++2m: the model's scheduler config sets use_karras_sigmas=True; the "
                      "dpm++2m sampler implements only use_karras_sigmas=False")
    assert not (tmp_path / "x.png").exists()
    code, out, err = run(generate.main, capsys, "--model", model, *FAST, "--out", tmp_path / "x.png")
    assert code == 0 and (tmp_path / "x.png").exists()


@pytest.mark.parametrize("error, message", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                  "you tried to allocate 1099511627776 bytes."), "error: out of memory"),
    (MemoryError(), "error: out of memory"),
])
def test_out_of_memory_is_one_line_exit_1(sd1, tmp_path, capsys, monkeypatch, error, message):
    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(generate, "generate", failing)
    code, _, err = run(generate.main, capsys, "--model", sd1, "--out", tmp_path / "x.png", *FAST)
    assert code == 1 and len(err) == 1 and err[0].startswith(message), err
    assert "out of memory" not in message or "--batch" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), ValueError("first line\nsecond line")])
def test_a_bug_keeps_its_traceback(sd1, tmp_path, monkeypatch, error):
    """A forker's bug is not turned into one line: it leaves main() with its traceback, and nothing is saved."""
    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(generate, "generate", failing)
    with pytest.raises(type(error)):
        generate.main(["--model", str(sd1), "--out", str(tmp_path / "x.png"), *map(str, FAST)])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Full runs: pixels against diffusers, metadata read back

def test_sd1_folder_matches_diffusers(sd1, tmp_path, capsys):
    out = tmp_path / "cube.png"  # without --quiet: the progress bar must stay off stdout
    code, stdout, _ = run(generate.main, capsys, "a red cube", "--negative-prompt", "blurry", "--model", sd1, "--seed",
                          123, "--steps", 4, "--height", 32, "--width", 32, "--device", "cpu", "--proposer", "none",
                          "--out", out)
    assert code == 0 and stdout == ["seed: 123", str(out)]
    image, text = read_png(out)
    assert text["parameters"] == ("a red cube\nNegative prompt: blurry\n"
                                  "Steps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 123, Size: 32x32, Model: sd1, Method: sd")
    expected = diffusers_images(sd1, "a red cube", "blurry", seed=123, steps=4, height=32, width=32)
    assert_same_image(image, expected[0])


def test_sd1_single_file_batch_non_square_random_seed(sd1, sd1_file, tmp_path, capsys):
    code, stdout, _ = run(generate.main, capsys, "a green tree", "--model", sd1_file, "--tokenizer", sd1 / "tokenizer",
                          "--steps", 3, "--height", 32, "--width", 48, "--batch", 2, "--out", tmp_path / "tree.png",
                          "--device", "cpu", "--proposer", "none", "--quiet")
    assert code == 0 and stdout[1:] == [str(tmp_path / "tree-0.png"), str(tmp_path / "tree-1.png")]
    seed = int(re.fullmatch(r"seed: (\d+)", stdout[0])[1])
    expected = diffusers_images(sd1, "a green tree", seed=seed, steps=3, height=32, width=48, batch=2)
    for i in range(2):
        image, text = read_png(tmp_path / f"tree-{i}.png")
        assert text["parameters"] == (f"a green tree\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: {seed}, "
                                      f"Size: 48x32, Model: tiny-sd1.safetensors, Method: sd, Batch size: 2, Batch pos: {i}")
        assert_same_image(image, expected[i])


def test_tokenizer_folder_of_either_layout(sd1, sd1_file, tmp_path, capsys):
    """--help names both layouts a --tokenizer folder may have, and both make the same image."""
    import evaluate
    from transformers import CLIPTokenizer

    for main in (generate.main, evaluate.main):
        assert main(["--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "tokenizer.json" in help_text and "vocab.json and merges.txt" in help_text
    saved = tmp_path / "tokenizer-json"
    CLIPTokenizer.from_pretrained(sd1 / "tokenizer").save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    images = []
    for folder in (sd1 / "tokenizer", saved):
        code, _, err = run(generate.main, capsys, "a green tree", "--model", sd1_file, "--tokenizer", folder, "--seed",
                           5, "--out", tmp_path / f"{folder.name}.png", *FAST)
        assert code == 0, err
        images.append(read_png(tmp_path / f"{folder.name}.png")[0])
    assert torch.equal(*images)


def test_sd2_v_prediction_demo_prompt_default_size_guidance_1_eta(sd2v, tmp_path, capsys):
    code, _, _ = run(generate.main, capsys, "--model", sd2v, "--prediction-type", "v", "--seed", 9, "--steps", 5,
                     "--guidance", 1, "--eta", 0.5, "--out", tmp_path / "demo", "--device", "cpu", "--proposer", "none",
                     "--quiet")
    assert code == 0
    image, text = read_png(tmp_path / "demo.png")
    size = 16  # the tiny UNet's sample_size 8 times the tiny VAE's factor 2
    assert text["parameters"] == (f"{generate.DEMO_PROMPT}\nSteps: 5, Sampler: DDIM, CFG scale: 1, Seed: 9, "
                                  f"Size: {size}x{size}, Model: sd2v, Method: sd, Eta: 0.5")
    expected = diffusers_images(sd2v, generate.DEMO_PROMPT, seed=9, steps=5, guidance=1, eta=0.5)
    assert_same_image(image, expected[0])


# ---------------------------------------------------------------------------------------------
# Output names

def test_default_names_never_overwrite(sd1, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "00041-3.png").write_bytes(b"an earlier image")
    runs = [run(generate.main, capsys, "--model", sd1, "--seed", 7, *FAST) for _ in range(2)]
    runs.append(run(generate.main, capsys, "--model", sd1, "--seed", 7, "--batch", 2, *FAST))
    assert [code for code, _, _ in runs] == [0, 0, 0]
    assert [out[1:] for _, out, _ in runs] == [["outputs/00042-7.png"], ["outputs/00043-7.png"],
                                              ["outputs/00044-7-0.png", "outputs/00044-7-1.png"]]
    assert (tmp_path / "outputs" / "00041-3.png").read_bytes() == b"an earlier image"
    assert read_png("outputs/00042-7.png")[0].equal(read_png("outputs/00043-7.png")[0])  # same seed, same image
    assert sorted(os.listdir("outputs")) == ["00041-3.png", "00042-7.png", "00043-7.png", "00044-7-0.png",
                                             "00044-7-1.png"]


def test_explicit_out_batch_names_and_overwrite(sd1, tmp_path, capsys):
    for _ in range(2):  # the second run overwrites
        code, out, _ = run(generate.main, capsys, "--model", sd1, "--seed", 1, "--batch", 3, "--out",
                           tmp_path / "img.png", *FAST)
        assert code == 0 and out[1:] == [str(tmp_path / f"img-{i}.png") for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == ["img-0.png", "img-1.png", "img-2.png"]


def test_out_into_a_new_folder_makes_it(sd1, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "x.png"
    code, stdout, err = run(generate.main, capsys, "--model", sd1, "--seed", 1, "--out", out, *FAST)
    assert code == 0 and stdout[1:] == [str(out)], err
    assert read_png(out)[0].shape == (16, 16, 3)


def test_dpm_solver_sampler(sd1, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, "a blue bird", "--model", sd1, "--seed", 4, "--sampler", "dpm++2m",
                       "--steps", 4, "--height", 32, "--width", 32, "--device", "cpu", "--proposer", "none", "--quiet",
                       "--out", tmp_path / "dpm.png")
    assert code == 0, err
    image, text = read_png(tmp_path / "dpm.png")
    assert "Sampler: DPM++ 2M" in text["parameters"]
    expected = sample(load_pipeline(sd1), "a blue bird", steps=4, height=32, width=32, seed=4, sampler="dpm++2m",
                      progress=False)
    assert torch.equal(image, expected[0])


# ---------------------------------------------------------------------------------------------
# SDXL (one intra-op thread from here on: see conftest.one_thread)

RUN = ["a lighthouse at dawn", "--steps", "3", "--seed", "5", "--device", "cpu", "--quiet", "--proposer", "none"]
SMALL = ["--height", "32", "--width", "32"]
SIZES = ["--original-size", "64x48", "--crop-top-left", "4,8", "--target-size", "24x40"]


@pytest.mark.usefixtures("one_thread")
def test_png_names_the_model_and_the_default_size_is_the_models(sdxl, tmp_path, capsys):
    """No --height/--width: the model's default size (diffusers' default_sample_size x the VAE's scale),
    1024 for SDXL base (tests/test_sampler.py checks it is diffusers')."""
    size = load_pipeline(sdxl).default_size
    code, out, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--out", tmp_path / "a.png")
    assert code == 0 and out[-1] == str(tmp_path / "a.png"), err
    pixels, text = read_png(tmp_path / "a.png")
    assert pixels.shape == (size, size, 3)
    settings = text["parameters"].splitlines()[-1]
    assert f"Size: {size}x{size}" in settings and "Model: sdxl" in settings and "Original size" not in settings


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("one_thread")
def test_micro_conditioning_is_refused_for_sd1_in_one_line(sd1, tmp_path, capsys):
    code, out, err = run(generate.main, capsys, *RUN, *SMALL, "--model", sd1, "--original-size", "64x64",
                         "--target-size", "32x32", "--out", tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert err == ["error: --original-size, --target-size: SDXL's size and crop conditioning; the model sd1 (sd1) "
                   "takes none"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("flag, value", [("--original-size", "64"), ("--original-size", "0x64"),
                                         ("--target-size", "axb"), ("--crop-top-left", "-1,0"),
                                         ("--crop-top-left", "4x8"), ("--original-size", "65536x64"),
                                         ("--target-size", f"{2**64}x64"), ("--crop-top-left", "0,99999")])
def test_malformed_micro_conditioning_is_one_line(flag, value, tmp_path, capsys):
    code, out, err = run(generate.main, capsys, *RUN, "--model", tmp_path, flag, value, "--out", tmp_path / "x.png")
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith(f"error: argument {flag}: "), err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.usefixtures("one_thread")
def test_the_documented_sdxl_commands_run_from_the_hub_cache(sdxl, tmp_path):
    """README's and the --help examples' SDXL base and SDXL-Turbo commands, offline, with the small folder laid
    out in the hub cache under those repo ids (and SDXL-Turbo's scheduler): the PNG names the repo."""
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
