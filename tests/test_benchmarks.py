"""The benchmark scripts, run end to end on a small random-weight folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from benchmarks.random_weights import write_byte_tokenizer
from model.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402
import gpu_table  # noqa: E402
import load  # noqa: E402
import precision  # noqa: E402
import sdxl  # noqa: E402


def test_bench_times_ours_against_diffusers_on_the_same_image(sd1, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--model", str(sd1), "--device", "cpu", "--size", "64", "--steps", "3", "--repeats", "1",
                "--warmup", "0", "--modes", "cfg,negative", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["cfg", "negative"]
    for row in report["results"]:
        assert row["max_pixel_diff"] <= 1  # the same seed, the same weights: the same image
        for impl in ("ours", "diffusers"):
            assert row[impl]["step_ms"] > 0 and row[impl]["peak_gib"] > 0
    assert "| cfg | 64x64 | 1 | 0 |" in capsys.readouterr().out


def test_precision_measures_each_model_and_the_image(sd1, tmp_path, capsys):
    out = tmp_path / "precision.json"
    code = precision.main(["--model", str(sd1), "--device", "cpu", "--dtypes", "bf16,fp16", "--size", "64",
                           "--steps", "3", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["dtype"] for r in results] == ["bf16", "fp16"]
    bf16, fp16 = results
    for key in ("text", "unet", "vae"):
        assert 0 < fp16[key] < bf16[key] < 0.1, key  # bf16 keeps 8 bits of mantissa, fp16 11
    assert code == (1 if any(r["past_tolerance"] for r in results) else 0)
    assert "| bf16 |" in capsys.readouterr().out


def test_precision_fails_past_its_tolerance(sd1, monkeypatch, capsys):
    monkeypatch.setitem(precision.TOLERANCES, "bf16", dict(text=0.0, unet=1.0, vae=1.0, mean_pixel=255.0))
    code = precision.main(["--model", str(sd1), "--device", "cpu", "--dtypes", "bf16", "--size", "64",
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


GPU_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def run_gpu_sh(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_SH), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=1800)


def test_gpu_script_dry_run_writes_every_part_and_the_table(tmp_path):
    """benchmarks/gpu.sh's commands, on the CPU with tiny models: each part's JSON, at its settings,
    and the table made from them."""
    result = run_gpu_sh(tmp_path)
    assert result.returncode == 0, result.stdout[-5000:]
    runs = {r["part"]: r for r in map(json.loads, (tmp_path / "gpu-runs.jsonl").read_text().splitlines())}
    assert sorted(runs) == sorted(["sd15-setup", "sdxl-setup", *gpu_table.PARTS])
    assert all(r["rc"] == 0 for r in runs.values()), runs
    report = {part: json.loads((tmp_path / name).read_text()) for part, name in gpu_table.PARTS.items()}
    assert [r["mode"] for r in report["sd15-fp16"]["results"]] == ["cfg", "negative"]
    assert report["sd15-compile"]["settings"]["compile"] == "default"
    assert all("diffusers" in r for part in ("sd15-fp16", "sd15-compile") for r in report[part]["results"])
    assert sorted(report["sdxl-fp16"]["medians"]) == ["diffusers-fp16", "fp16"]
    assert [r["dtype"] for r in report["precision"]["results"]] == ["fp16", "bf16"]
    assert "decode_tiled" in report["vae-decode"]["results"][0]
    assert {"cfg", "three-branches", "clip-nothing-taesd", "stub-async-taesd"} <= set(report["vldnp-cost"]["results"])
    table = (tmp_path / "gpu-table.md").read_text()
    assert table.startswith("**DRY RUN") and "Not measured" not in table
    assert table.count("| mode | size | ours ms/step |") == 2 and "| **fp16 / diffusers-fp16** |" in table
    assert "    python benchmarks/bench.py --model " in table and f"{tmp_path}/" not in table
    assert "[" in result.stdout.splitlines()[0] and "sd15-compile: done" in result.stdout  # progress, timestamped


def test_gpu_script_records_the_parts_it_has_no_time_for(tmp_path):
    """With its budget spent, every part is recorded as skipped, the table says so, and it exits 1."""
    result = run_gpu_sh(tmp_path, BUDGET_S="0")
    assert result.returncode == 1
    runs = [json.loads(line) for line in (tmp_path / "gpu-runs.jsonl").read_text().splitlines()]
    assert {r["part"] for r in runs} >= set(gpu_table.PARTS) and all(r["rc"] == -1 for r in runs)
    table = (tmp_path / "gpu-table.md").read_text()
    assert table.count("Not measured: skipped: the budget was spent.") == len(gpu_table.PARTS)


def test_gpu_table_says_which_part_failed_and_where_its_log_is(tmp_path, capsys):
    runs = [dict(part="precision", rc=1, seconds=3, limit_s=90, command=["python", "benchmarks/precision.py"],
                 log="gpu-precision.log"),
            dict(part="sdxl-fp16", rc=124, seconds=120, limit_s=120, command=["python", "benchmarks/sdxl.py"],
                 log="gpu-sdxl-fp16.log")]
    (tmp_path / "gpu-runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert gpu_table.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Not measured: failed with exit code 1; see gpu-precision.log." in out
    assert "Not measured: out of time after 120 s; see gpu-sdxl-fp16.log." in out
    assert "Not measured: not run." in out  # a part with no record at all


def test_load_times_loading_and_a_first_pass_side_by_side(sd1, tmp_path, capsys):
    out = tmp_path / "load.json"
    root = Path(__file__).resolve().parents[1]  # as the baseline too: a checkout of this project
    load.main(["--folder", str(sd1), "--repeats", "1", "--steps", "1", "--threads", "1", "--json", str(out),
               "--baseline", str(root)])
    report = json.loads(out.read_text())
    assert sorted(report["ratios_to_diffusers"]) == ["baseline", "ours", "plain"]
    for impl in ("ours", "plain", "diffusers", "baseline"):
        (run,) = report["runs"][impl]
        assert run["total_s"] >= run["load_s"] > 0 and run["total_cpu_s"] > 0 and run["warmup_cpu_s"] > 0
        assert run["peak_rss_gib"] > 0 and run["load_average"] >= 0
    assert "| ours |" in capsys.readouterr().out
