"""The benchmark scripts, run end to end on a small random-weight folder."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from benchmarks.random_weights import write_byte_tokenizer
from checkpoints import make_sd_folder
from model.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402
import load  # noqa: E402
import precision  # noqa: E402
import sdxl  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("sd1") / "sd1", "sd1", seed=5)


def test_bench_times_ours_against_diffusers_on_the_same_image(folder, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--model", str(folder), "--device", "cpu", "--size", "64", "--steps", "3", "--repeats", "1",
                "--warmup", "0", "--modes", "cfg,negative", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["cfg", "negative"]
    for row in report["results"]:
        assert row["max_pixel_diff"] <= 1  # the same seed, the same weights: the same image
        for impl in ("ours", "diffusers"):
            assert row[impl]["step_ms"] > 0 and row[impl]["peak_gib"] > 0
    assert "| cfg | 64x64 | 1 | 0 |" in capsys.readouterr().out


def test_precision_measures_each_model_and_the_image(folder, tmp_path, capsys):
    out = tmp_path / "precision.json"
    code = precision.main(["--model", str(folder), "--device", "cpu", "--dtypes", "bf16,fp16", "--size", "64",
                           "--steps", "3", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["dtype"] for r in results] == ["bf16", "fp16"]
    bf16, fp16 = results
    for key in ("text", "unet", "vae"):
        assert 0 < fp16[key] < bf16[key] < 0.1, key  # bf16 keeps 8 bits of mantissa, fp16 11
    assert code == (1 if any(r["past_tolerance"] for r in results) else 0)
    assert "| bf16 |" in capsys.readouterr().out


def test_precision_fails_past_its_tolerance(folder, monkeypatch, capsys):
    monkeypatch.setitem(precision.TOLERANCES, "bf16", dict(text=0.0, unet=1.0, vae=1.0, mean_pixel=255.0))
    code = precision.main(["--model", str(folder), "--device", "cpu", "--dtypes", "bf16", "--size", "64",
                           "--steps", "2"])
    assert code == 1
    assert "no: text" in capsys.readouterr().out


def test_precision_rejects_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as e:
        precision.main(["--dtypes", "fp8"])
    assert e.value.code == 2 and "unknown 'fp8'" in capsys.readouterr().err


def test_byte_tokenizer_reads_alike_in_ours_and_transformers(tmp_path):
    folder = write_byte_tokenizer(tmp_path / "tokenizer")
    ours, ref = Tokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(folder)
    prompts = [bench.PROMPT, "Café  naïve 😀, don't!", ""]
    expected = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    assert ref.model_max_length == 77 and torch.equal(ours(prompts), expected)
    assert all(ref.unk_token_id not in ours.encode(p) for p in prompts)  # every byte is a token


def test_sdxl_times_our_unet_against_diffusers_on_the_same_weights(tmp_path, capsys):
    out = tmp_path / "sdxl.json"
    sdxl.main(["--folder", str(tmp_path / "unet"), "--config", "small", "--latent", "8", "--steps", "1",
               "--rounds", "1", "--impls", "ours,plain,diffusers", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["settings"]["config"]["addition_embed_type"] == "text_time"
    assert sorted(report["ratios_to_reference"]) == ["ours", "plain"]
    for impl in ("ours", "plain", "diffusers"):
        m = report["medians"][impl]
        assert m["step_s"] > 0 and m["peak_rss_gib"] > 0
        assert m["rel_diff_to_diffusers"] < 1e-5  # the same weights and inputs: the same prediction
    assert "| ours |" in capsys.readouterr().out


def test_load_times_loading_and_a_first_pass_side_by_side(folder, tmp_path, capsys):
    out = tmp_path / "load.json"
    root = Path(__file__).resolve().parents[1]  # as the baseline too: a checkout of this project
    load.main(["--folder", str(folder), "--repeats", "1", "--steps", "1", "--threads", "1", "--json", str(out),
               "--baseline", str(root)])
    report = json.loads(out.read_text())
    assert sorted(report["ratios_to_diffusers"]) == ["baseline", "ours", "plain"]
    for impl in ("ours", "plain", "diffusers", "baseline"):
        (run,) = report["runs"][impl]
        assert run["total_s"] >= run["load_s"] > 0 and run["total_cpu_s"] > 0 and run["warmup_cpu_s"] > 0
        assert run["peak_rss_gib"] > 0 and run["load_average"] >= 0
    assert "| ours |" in capsys.readouterr().out
