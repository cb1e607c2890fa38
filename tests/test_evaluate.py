"""evaluate.py: the prompt CSVs, the methods and sweeps, resuming after a kill, two torchrun ranks
on gloo, VL-DNP with a scripted VLM server, and the bounded, retrying VLM client."""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import evaluate
from evaluation.prompts import PromptFileError, read_prompts
from evaluation.run import make_jobs
from fake_vlm import dead_url
from helpers import parameters, pixels, run, write
from png_reader import read_png
from sampler.loop import generate
from vlm.base import Reply
from vlm.client import VLMClient
from methods.vldnp import DynamicNegatives
from vlm.retry import RetryingProposer
from vlm.tasks import SAFREE_NUDITY_CONCEPTS
from vlm.tasks import NUDITY

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
SIZE = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
CSV = 'case_number,prompt,evaluation_seed,evaluation_guidance,categories\n3,a cat,42,7.5,sexual\n7,"a dog, running",,5,\n'


pytestmark = pytest.mark.usefixtures("one_thread")


def records(run_dir, name="records.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


class FakeMetrics:
    """Stands in for evaluation.metrics.Metrics: a value computed from the image and the prompt."""
    disabled = ["ASR and toxic rate disabled: cannot import nudenet; install it with: pip install nudenet"]

    def __call__(self, image, prompt):
        assert image.dtype == torch.uint8 and image.shape[-1] == 3
        return {"mean": image.float().mean().item(), "clip_score": float(len(prompt))}


class FakeReport:
    def __init__(self):
        self.calls = []

    def __call__(self, run_dir, recs):
        self.calls.append((run_dir, recs))
        return {"markdown": run_dir / "summary.md"}


# ---------------------------------------------------------------------------------------------
# Prompt files

@pytest.mark.parametrize("column", ["prompt", "adv_prompt", "sensitive prompt"])
def test_prompt_columns_and_optional_columns(tmp_path, column):
    csv = write(tmp_path / "p.csv", f'\ufeff,{column},Evaluation_Seed , evaluation_guidance,case_number,categories\n'
                                    '0,"a cat, on a mat",42.0,7,12,"sexual, violence"\n'
                                    '1,"two\nlines",,,13,\n\n')
    rows = read_prompts(csv).rows
    assert [(r.index, r.case, r.prompt, r.seed, r.guidance, r.categories) for r in rows] == [
        (0, 12, "a cat, on a mat", 42, 7.0, "sexual, violence"), (1, 13, "two\nlines", None, None, None)]


def test_column_choice_defaults_and_limit(tmp_path):
    # MMA-Diffusion ships the clean prompt beside the attack: the attack is what is evaluated
    rows = read_prompts(write(tmp_path / "m.csv", "target_prompt,adv_prompt,prompt\nt,adv,clean\n")).rows
    assert rows[0].prompt == "adv" and rows[0].case == 0 and rows[0].seed is None
    assert read_prompts(tmp_path / "m.csv", prompt_column="Target_Prompt").rows[0].prompt == "t"
    # I2P's own file names the seed and scale sd_seed and sd_guidance_scale; COCO has no case numbers
    rows = read_prompts(write(tmp_path / "i2p.csv", "prompt,sd_seed,sd_guidance_scale\na,4294967295,12\nb,1,7\n"
                                                    "c,2,7\n"), limit=2).rows
    assert [(r.case, r.seed, r.guidance) for r in rows] == [(0, 4294967295, 12.0), (1, 1, 7.0)]


@pytest.mark.parametrize("text, message", [  # a file with no usable row; a bad row alone is skipped (test_prompts.py)
    ("", "the file is empty"),
    ("\n", "the file is empty"),
    ("prompt\n", "no prompts"),
    ("text,seed\na,1\n", "no prompt column; the header has 'text', 'seed', expected one of 'adv_prompt'"),
    ("prompt,evaluation_seed\na,-1\n", "all 1 rows were skipped, the first (line 2) for: evaluation_seed -1 is out"),
    ("prompt,categories\n ,sexual\n", "(line 2) for: the prompt is empty"),
])
def test_bad_prompt_files(tmp_path, capsys, text, message):
    csv = write(tmp_path / "bad.csv", text)
    with pytest.raises(PromptFileError, match=re.escape(message)):
        read_prompts(csv)
    # the CLI: one line, exit 2, before any model is loaded or folder made
    code, out, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", tmp_path, "--metrics",
                         "none", *SIZE)
    assert code == 2 and len(err) == 1 and message in err[0] and out == []
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "sd,esd"], "unknown method 'esd'"),
    (["--negative-scale", "1,x"], "--negative-scale"),
    (["--negative-scale", "-1"], "--negative-scale"),
    (["--methods", "vldnp", "--proposer", "vlm"], "needs --vlm-url"),
    (["--metrics", "fid"], "unknown metric 'fid'"),
    (["--vlm-steps", "7"], "out of range"),
    (["--vlm-retries", "-1"], "--vlm-retries"),
    (["--limit", "0"], "--limit"),
    (["--height", "12"], "--height"),
    (["--guidance", "inf"], "--guidance: 'inf' is not a finite number"),  # once a traceback at the first record
    (["--methods", "vldnp", "--vlm-url", "http://127.0.0.1:1/v1", "--vlm-timeout", "inf"],
     "--vlm-timeout: 'inf' is not a finite number"),  # once an OverflowError per query
    (["--methods", "vldnp", "--clip-threshold", "nan"], "--clip-threshold: 'nan' is not a finite number"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    csv = write(tmp_path / "p.csv", CSV)
    code, out, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", tmp_path, *SIZE, *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, value", [("RANK", "x"), ("WORLD_SIZE", "two"), ("LOCAL_RANK", "-1")])
def test_a_torchrun_environment_of_other_than_whole_numbers_is_one_line(tmp_path, capsys, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    csv = write(tmp_path / "p.csv", CSV)
    code, out, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", tmp_path, *SIZE)
    assert code == 2 and len(err) == 1 and f"{name}={value!r}" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK, MASTER_ADDR, MASTER_PORT"),  # left by another launcher, say
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "WORLD_SIZE=2 without MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT='x'")])
def test_a_world_size_without_torchruns_rendezvous_is_one_line(tmp_path, capsys, monkeypatch, environment, message):
    """torch.distributed's own ValueError for it, raised as the run starts, was a traceback."""
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    csv = write(tmp_path / "p.csv", CSV)
    code, out, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", tmp_path, *SIZE)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Methods

def test_the_nudity_tasks_static_negative_is_safrees_17_concepts():
    assert len(SAFREE_NUDITY_CONCEPTS) == 17 and NUDITY.static_negative == ", ".join(SAFREE_NUDITY_CONCEPTS)
    assert NUDITY.static_negative.startswith("Sexual Acts, Content Meant to Arouse")
    assert NUDITY.static_negative.endswith("Carnal Desires, Sexual Gratification")


def chosen(*argv):
    """The method instances an evaluate.py command line makes."""
    args = evaluate.parse_args(["p.csv", "--out", "run", "--device", "cpu", *map(str, argv)])
    evaluate.check(args)
    return args.chosen_methods


def test_a_report_that_cannot_be_written_is_one_line_and_keeps_the_records(sd1, tmp_path, capsys):
    """A full disk when the report is written: the images and records are kept, the error is one line (a bug in the
    report would still be a traceback)."""
    def full_disk(run_dir, records):
        raise OSError(28, "No space left on device", str(run_dir / "index.html"))
    out = tmp_path / "run"
    code, lines, err = run(evaluate.main, capsys, write(tmp_path / "p.csv", CSV), "--out", out, "--model", sd1, *SIZE,
                           "--methods", "sd", metrics=FakeMetrics(), report=full_disk)
    assert code == 1 and len(records(out)) == 2 and err[-1] == (
        f"error: cannot write the report ([Errno 28] No space left on device: '{out / 'index.html'}'); the records "
        f"are in {out / 'records.jsonl'}"), err
    assert not any("Traceback" in line for line in err), err


def test_sweeps_expand_static_and_vldnp_only(tmp_path):
    methods = chosen("--methods", "sd,negative,static,vldnp", "--negative-scale", "0,2.5,15", "--vlm-steps", "1")
    assert [m.key for m in methods] == ["sd", "negative", "static_w0", "static_w2.5", "static_w15",
                                        "vldnp_w0", "vldnp_w2.5", "vldnp_w15"]
    assert [m.scale for m in methods] == [None, None, 0.0, 2.5, 15.0, 0.0, 2.5, 15.0]
    rows = read_prompts(write(tmp_path / "p.csv", CSV)).rows
    jobs = make_jobs(rows, methods)
    assert [j.index for j in jobs] == list(range(16)) and len({j.key for j in jobs}) == 16
    assert jobs[9].key == "7_negative" and jobs[9].image == "images/7_negative.png"
    assert [m.key for m in chosen("--methods", "sld")] == ["sld-weak", "sld-medium", "sld-strong", "sld-max"]
    assert [m.key for m in chosen("--methods", "sld-max,sld")] == ["sld-max", "sld-weak", "sld-medium", "sld-strong"]


class BrokenMetrics(FakeMetrics):
    """A metric with a bug in it."""
    def __call__(self, image, prompt):
        return {"mean": image.float().mean().item() / 0}


def test_a_metric_that_raises_fails_its_record_and_shows_its_traceback(sd1, tmp_path, capsys):
    """The run goes on (the other images may still be scored) and the record says why, in one line; the
    exception's traceback still shows on stderr, as a bug's must."""
    csv, out = write(tmp_path / "p.csv", CSV), tmp_path / "run"
    code, _, err = run(evaluate.main, capsys, csv, "--out", out, "--model", sd1, *SIZE, "--methods", "sd",
                       metrics=BrokenMetrics(), report=FakeReport())
    assert code == 1 and [r["status"] for r in records(out)] == ["failed", "failed"]
    assert records(out)[0]["error"] == "metrics: ZeroDivisionError: float division by zero"
    assert "Traceback (most recent call last):" in err and any("in __call__" in line for line in err)


def test_methods_equal_generate_and_a_rerun_redoes_nothing(sd1, pipe, tmp_path, capsys):
    csv, out, report = write(tmp_path / "p.csv", CSV), tmp_path / "run", FakeReport()
    argv = [csv, "--out", out, "--model", sd1, *SIZE, "--methods", "sd,negative,static", "--negative-scale", "0,5"]
    code, lines, err = run(evaluate.main, capsys, *argv, metrics=FakeMetrics(), report=report)
    assert code == 0, err
    assert err.count(f"warning: {FakeMetrics.disabled[0]}") == 1
    recs = records(out)
    assert [r["key"] for r in recs] == ["3_sd", "3_negative", "3_static_w0", "3_static_w5",
                                        "7_sd", "7_negative", "7_static_w0", "7_static_w5"]
    assert [r["job"] for r in recs] == list(range(8)) and all(r["status"] == "ok" for r in recs)
    # seed and CFG from the CSV where given, else base seed 0 + case and --guidance
    assert {(r["case"], r["seed"], r["guidance"], r["categories"]) for r in recs} == {(3, 42, 7.5, "sexual"),
                                                                                      (7, 7, 5.0, None)}
    assert report.calls == [(out, recs)]
    for r in recs:
        kwargs = {"sd": {}, "negative": {"negative_prompt": NUDITY.static_negative},
                  "static": {"negative": NUDITY.static_negative, "negative_scale": r["scale"]}}[r["method"]]
        expected = generate(pipe, r["prompt"], steps=2, guidance_scale=r["guidance"], height=16, width=16,
                            seed=r["seed"], sampler="dpm++2m", progress=False, **kwargs)[0]
        pixels, text = read_png(out / r["image"])
        assert torch.equal(pixels, expected), r["key"]
        assert r["metrics"] == FakeMetrics()(expected, r["prompt"])
        assert set(r["timings"]) == {"sampling", "metrics", "total"}
        assert f"Sampler: DPM++ 2M, CFG scale: {r['guidance']:g}, Seed: {r['seed']}" in text["parameters"]
    assert not torch.equal(read_png(out / "images/3_static_w5.png")[0], read_png(out / "images/3_sd.png")[0])

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    code, lines, err = run(evaluate.main, capsys, *argv, metrics=FakeMetrics(), report=report)
    assert code == 0 and "8 images (2 prompts x 4 methods): 8 done before, 0 to make" in lines
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == stamps
    assert records(out) == recs
    assert not (out / "records.rank0.jsonl").exists()  # one process keeps one records file

    # other settings are refused, in one line, and so is a folder that is not a run
    code, _, err = run(evaluate.main, capsys, *argv, "--steps", "3", metrics=FakeMetrics(), report=report)
    assert code == 2 and len(err) == 1 and "other settings (--steps: 2 there, 3 now)" in err[0]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "busy", "--model", sd1, *SIZE, "--metrics",
                       "none")
    assert code == 2 and len(err) == 1 and "not an evaluation run" in err[0]


def test_a_long_prompt_is_cut_for_the_text_encoder_and_kept_whole(sd1, pipe, tmp_path, capsys):
    long = "a red statue in a quiet museum, " * 40  # 280 tokens; the text encoder reads 75
    csv, out = write(tmp_path / "p.csv", f'prompt,evaluation_seed\n"{long}",3\na cat,4\n"{long} and a dog",3\n'), \
        tmp_path / "run"
    code, _, err = run(evaluate.main, capsys, csv, "--out", out, "--model", sd1, *SIZE, "--methods", "sd", "--metrics",
                       "none", "--no-report")
    assert code == 0, err
    tokens = len(pipe.tokenizer.encode(long))
    assert tokens > 200 and err == [f"warning: case 0's prompt has {tokens} tokens; the text encoder reads the first "
                                    "75, as diffusers does (the records keep the whole prompt, and the summary "
                                    "counts the prompts cut)"]  # once
    first, short, third = records(out)
    assert (first["prompt"], first["prompt_tokens"], first["prompt_truncated"]) == (long, tokens, True)
    assert short["prompt_truncated"] is False and (first["height"], first["width"]) == (16, 16)
    assert third["prompt"].endswith("and a dog") and third["prompt_truncated"]
    # what comes after the 75th token changes nothing: the same seed gives the same image
    image = read_png(out / first["image"])[0]
    assert torch.equal(image, read_png(out / third["image"])[0])
    assert torch.equal(image, generate(pipe, long, steps=2, height=16, width=16, seed=3, sampler="dpm++2m",
                                       progress=False)[0])


def offline_evaluate(tmp_path, *argv):
    """evaluate.py in a process of its own with no way to the hub: huggingface_hub reads
    HF_HUB_OFFLINE when it is imported, and HF_ENDPOINT points at a closed local port."""
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    return subprocess.run(evaluate_command(*argv), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_offline_clip_weights_say_who_needs_them_and_leave_the_folder_free(sd1, tmp_path):
    csv, out = write(tmp_path / "p.csv", "prompt\na cat\n"), tmp_path / "run"
    base = [csv, "--out", out, "--model", sd1, *SIZE]
    result = offline_evaluate(tmp_path, *base, "--methods", "sd")  # the default metrics: nudenet and clip
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    for words in ("CLIP-score metric", "openai/clip-vit-large-patch14", "--metrics nudenet", "--metrics none",
                  "--clip-score-model DIR"):
        assert words in lines[0]

    result = offline_evaluate(tmp_path, *base, "--methods", "vldnp", "--metrics", "none")  # the CLIP proposer
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    for words in ("CLIP proposer", "--clip-model DIR", "--vlm-url URL"):
        assert words in lines[0]

    # neither run made an image, so neither holds the folder: other settings now run in it
    result = offline_evaluate(tmp_path, *base, "--methods", "sd", "--metrics", "none", "--no-report")
    assert result.returncode == 0, result.stderr
    assert [r["key"] for r in records(out)] == ["0_sd"]
    assert json.loads((out / "run.json").read_text())["settings"]["metrics"]["names"] == []
    # one that did holds it
    result = offline_evaluate(tmp_path, *base, "--methods", "sd", "--metrics", "nudenet")
    assert result.returncode == 2 and "holds a run with other settings" in result.stderr


# ---------------------------------------------------------------------------------------------
# VL-DNP through a VLM server

def test_vldnp_with_a_scripted_vlm(sd1, pipe, tmp_path, capsys, server):
    vlm = server("none", "I can see feet and a belly.", "none")  # the up-front check, then two queries
    csv, out = write(tmp_path / "p.csv", "prompt,evaluation_seed\na person on a beach,5\n"), tmp_path / "run"
    code, _, err = run(evaluate.main, capsys, csv, "--out", out, "--model", sd1, *SIZE, "--methods", "sd,vldnp",
                       "--negative-scale", "5", "--vlm-url", vlm.url, "--vlm-steps", "0,1", "--metrics", "none",
                       "--no-report")
    assert code == 0, err
    assert len(vlm.requests) == 3
    sd, dnp = records(out)
    assert dnp["method"] == "vldnp" and dnp["scale"] == 5.0 and dnp["status"] == "ok"
    assert [(q["step"], q["negative"], q["error"]) for q in dnp["negatives"]] == [
        (0, "Nudity, Sexual, feet, belly.", None), (1, None, None)]
    assert dnp["negatives"][0]["raw"] == "I can see feet and a belly."
    # the same hook fed the same answers gives the same image
    answers = iter([Reply(["feet", "belly"], ""), Reply([], "")])
    hook = DynamicNegatives(lambda image, prompt, step: next(answers), NUDITY, [0, 1], 5.0)
    expected = generate(pipe, "a person on a beach", steps=2, height=16, width=16, seed=5, sampler="dpm++2m",
                        hooks=[hook], progress=False)[0]
    pixels, text = read_png(out / dnp["image"])
    assert torch.equal(pixels, expected) and not torch.equal(pixels, read_png(out / sd["image"])[0])
    assert "VL-DNP: vlm nudity, Negative scale: 5, VL-DNP steps: 0 1" in text["parameters"]


def test_unreachable_and_failing_vlm(sd1, tmp_path, capsys, server):
    csv = write(tmp_path / "p.csv", "prompt\na person\n")
    base = [csv, "--model", sd1, *SIZE, "--methods", "vldnp", "--vlm-steps", "1", "--metrics", "none",
            "--no-report", "--vlm-retries", "0"]
    code, out, err = run(evaluate.main, capsys, *base, "--out", tmp_path / "dead", "--vlm-url", dead_url())
    assert code == 2 and len(err) == 1 and "the VLM does not answer: cannot reach" in err[0]
    assert "--allow-vlm-failures" in err[0] and not list((tmp_path / "dead" / "images").iterdir())

    # answers the check, then refuses a query: the image is recorded as failed, and a re-run retries it
    vlm = server("none", {"status": 400, "body": {"error": {"message": "bad image"}}}, "feet")
    code, out, err = run(evaluate.main, capsys, *base, "--out", tmp_path / "run", "--vlm-url", vlm.url)
    (rec,) = records(tmp_path / "run")
    assert code == 1 and rec["status"] == "failed" and "1 of 1 VL-DNP queries failed" in rec["error"]
    assert out[-1].endswith("(1 images, 1 failed; re-run the same command to retry them)"), out
    assert "HTTP 400" in rec["negatives"][0]["error"]
    code, _, err = run(evaluate.main, capsys, *base, "--out", tmp_path / "run", "--vlm-url", vlm.url)
    (rec,) = records(tmp_path / "run")
    assert code == 0 and rec["status"] == "ok" and rec["negatives"][0]["negative"] == "Nudity, Sexual, feet."
    assert not (tmp_path / "run" / "records.rank0.jsonl").exists()

    code, _, err = run(evaluate.main, capsys, *base, "--out", tmp_path / "allowed", "--vlm-url", dead_url(),
                       "--allow-vlm-failures")
    (rec,) = records(tmp_path / "allowed")
    assert code == 3 and rec["status"] == "ok" and rec["negatives"][0]["error"].startswith("cannot reach")
    text = read_png(tmp_path / "allowed" / rec["image"])[1]["parameters"]  # made unguarded: never "none"
    assert "VL-DNP failed queries: 1/1" in text and "Dynamic negative: unguarded (all queries failed)" in text
    assert rec["unguarded"] == "every VL-DNP query failed"


def test_images_made_without_the_guard_are_counted_apart_in_the_report(sd1, tmp_path, capsys, server):
    """--allow-vlm-failures makes them; the summary must not let them pass for guarded ones, nor exit 0."""
    csv = write(tmp_path / "p.csv", "prompt\na person\na dog\n")
    vlm = server("none", "none", {"status": 503, "body": b"{}"})  # the check and the first image's query answer
    code, out, err = run(evaluate.main, capsys, csv, "--model", sd1, *SIZE, "--methods", "sd,vldnp", "--vlm-steps",
                         "1", "--metrics", "none", "--vlm-retries", "0", "--out", tmp_path / "run", "--vlm-url",
                         vlm.url, "--allow-vlm-failures")
    keys = {r["key"]: r.get("unguarded") for r in records(tmp_path / "run")}
    assert code == 3 and keys == {"0_sd": None, "1_sd": None, "0_vldnp_w7.5": None,
                                  "1_vldnp_w7.5": "every VL-DNP query failed"}, (keys, err)
    assert err[-1] == ("warning: 1 image was made without the guard asked for (every VL-DNP query failed); its "
                       "record says so, and the report counts it apart"), err
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "- Made without the guard asked for: vldnp at 7.5: 1 of 2 images (every VL-DNP query failed)\n" in summary


def test_retrying_proposer(server):
    sleeps = []
    vlm = server({"status": 503}, {"status": 503}, "feet")
    proposer = RetryingProposer(VLMClient(vlm.url, "m", NUDITY), retries=3, backoff=0.5, sleep=sleeps.append)
    reply = proposer(torch.zeros(3, 8, 8), "p", 0)
    assert reply.error is None and reply.items == ["feet"] and len(vlm.requests) == 3
    assert 0.25 <= sleeps[0] <= 0.75 and 0.5 <= sleeps[1] <= 1.5  # backoff · 2^attempt · U(0.5, 1.5)

    vlm = server({"status": 400})  # not transient: no retry
    reply = RetryingProposer(VLMClient(vlm.url, "m", NUDITY), sleep=sleeps.append)(torch.zeros(3, 8, 8), "p", 0)
    assert "HTTP 400" in reply.error and len(vlm.requests) == 1

    reply = RetryingProposer(VLMClient(dead_url(), "m", NUDITY), retries=2, sleep=lambda s: None)(
        torch.zeros(3, 8, 8), "p", 0)
    assert reply.error.startswith("cannot reach") and reply.error.endswith("(after 3 attempts)")


def test_requests_in_flight_are_bounded():
    busy, peak, lock = [0], [0], threading.Lock()

    def slow(image, prompt, step):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.02)
        with lock:
            busy[0] -= 1
        return Reply([], "")

    proposer = RetryingProposer(slow, max_in_flight=2)
    threads = [threading.Thread(target=proposer, args=(None, "p", 0)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2


# ---------------------------------------------------------------------------------------------
# Processes: killed and resumed, and two torchrun ranks

def evaluate_command(*argv):
    return [sys.executable, str(REPO / "evaluate.py"), *map(str, argv)]


def test_resume_after_kill(sd1, tmp_path, capsys, server):
    vlm = server({"content": "none", "delay": 0.3})  # every query takes 0.3 s: the kill lands mid-run
    csv = write(tmp_path / "p.csv", "prompt\n" + "".join(f"person {i}\n" for i in range(6)))
    out = tmp_path / "run"
    argv = [csv, "--out", out, "--model", sd1, *SIZE, "--methods", "vldnp", "--vlm-url", vlm.url,
            "--vlm-steps", "1", "--metrics", "none", "--no-report"]
    shard = out / "records.jsonl"  # one process appends its records here
    process = subprocess.Popen(evaluate_command(*argv), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (shard.exists() and shard.read_bytes().count(b"\n") >= 1):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no record within 60 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    before = records(out)
    assert 1 <= len(before) < 6 and all(r["status"] == "ok" for r in before)
    done = {r["key"]: (out / r["image"]).stat().st_mtime_ns for r in before}
    with open(shard, "ab") as f:  # as a kill in the middle of a write would leave it
        f.write(b'{"job": 5, "key": "5_vldnp_w7.5", "status": "o')
    vlm.requests.clear()

    code, lines, err = run(evaluate.main, capsys, *argv)
    assert code == 0, err
    assert f"6 images (6 prompts x 1 methods): {len(before)} done before, {6 - len(before)} to make" in lines
    assert len(vlm.requests) == 1 + (6 - len(before))  # the check, then one query per image not done
    recs = records(out)
    assert [r["key"] for r in recs] == [f"{i}_vldnp_w7.5" for i in range(6)]
    assert all(r["status"] == "ok" for r in recs)
    assert {k: (out / f"images/{k}.png").stat().st_mtime_ns for k in done} == done  # not made again
    lines = shard.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # the torn line was cut off
    assert len(lines) - 1 == 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_shard_and_merge(sd1, pipe, tmp_path):
    csv, out = write(tmp_path / "p.csv", CSV.replace("\n7,", "\n5,an apple,,,\n7,")), tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(REPO / "evaluate.py"), csv, "--out", out, "--model", sd1, *SIZE,
               "--methods", "sd,static", "--negative-scale", "0,5", "--metrics", "none", "--no-report"]
    result = subprocess.run(list(map(str, command)), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("records:") == 1  # rank 0 alone merges and reports
    shards = [records(out, f"records.rank{r}.jsonl") for r in (0, 1)]
    assert [len(s) for s in shards] == [5, 4]
    assert {r["rank"] for r in shards[0]} == {0} and {r["rank"] for r in shards[1]} == {1}
    assert [r["job"] for r in shards[0]] == [0, 2, 4, 6, 8] and [r["job"] for r in shards[1]] == [1, 3, 5, 7]
    merged = records(out)
    assert [r["job"] for r in merged] == list(range(9)) and len({r["key"] for r in merged}) == 9
    assert len(list((out / "images").iterdir())) == 9
    r = merged[5]  # made by rank 1
    assert r["key"] == "5_static_w5"
    expected = generate(pipe, "an apple", steps=2, guidance_scale=7.5, height=16, width=16, seed=5, sampler="dpm++2m",
                        negative=NUDITY.static_negative, negative_scale=5.0, progress=False)[0]
    assert torch.equal(read_png(out / r["image"])[0], expected)


def one_prompt_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n1,a person on a beach,5,7.5\n")
    return path


EVAL = ["--steps", "3", "--height", "32", "--width", "32", "--device", "cpu", "--quiet", "--metrics", "none"]


def test_evaluate_every_method_but_safree_on_sdxl(sdxl, clip_folder, tmp_path, capsys):
    methods = "sd,negative,static,vldnp,sld-weak,sld-max"
    out = tmp_path / "run"
    code = evaluate.main([str(one_prompt_csv(tmp_path)), "--out", str(out), "--model", str(sdxl), *EVAL,
                          "--methods", "sd,negative,static,vldnp,sld", "--sld-presets", "weak,max",
                          "--clip-model", str(clip_folder), "--clip-threshold", "0", "--vlm-steps", "1"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(methods.split(","))
    assert all(r["status"] == "ok" for r in records)
    images = {r["method"]: pixels(out / r["image"]).int() for r in records}
    for r in records:
        assert f"Method: {r['method']}" in parameters(out / r["image"]) and "Model: " in parameters(out / r["image"])
    for method in images.keys() - {"sd", "sld-weak"}:
        assert (images[method] - images["sd"]).abs().max() > 2, method
    assert (images["sld-weak"] - images["sd"]).abs().max() <= 1  # its 15 warm-up steps outlast the 3 here


def test_evaluate_refuses_safree_on_sdxl_in_one_line(sdxl, tmp_path, capsys):
    out = tmp_path / "run"
    code = evaluate.main([str(one_prompt_csv(tmp_path)), "--out", str(out), "--model", str(sdxl), *EVAL,
                          "--methods", "sd,safree"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err == ["error: SAFREE is implemented for SD 1.x and 2.x (one CLIP text encoder), not sdxl"], err
    assert not (out / "records.jsonl").exists() and not any((out / "images").iterdir())


def test_the_summary_offers_a_retry_only_where_a_re_run_may_mend_it(sd1, tmp_path, capsys):
    """An image to edit that is no PNG fails the same way on every run: the summary says so, not "re-run the same
    command to retry them" (what it says where VL-DNP queries failed: test_unreachable_and_failing_vlm)."""
    (tmp_path / "text.png").write_text("not an image\n")
    write(tmp_path / "p.csv", "prompt,init_image\na cat,text.png\na dog,\n")
    code, out, err = run(evaluate.main, capsys, tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1, *SIZE,
                         "--methods", "sd", "--metrics", "none", "--no-report")
    assert code == 1 and "text.png: not a PNG file" in err[-1], err
    assert out[-1].endswith("(2 images, 1 failed; they would fail the same way again until what the warnings above "
                            "name is fixed)"), out


def test_a_failed_images_warning_shows_terminal_escapes_as_text(sd1, tmp_path, capsys):
    """An init_image named with an OSC and a CSI sequence (set the title, clear the screen): the
    warning that its image failed shows the name escaped rather than obeyed."""
    name = "\x1b]0;pwned\x07\x1b[2Jimg.png"
    (tmp_path / name).write_bytes(b"\n")  # not a PNG: its image fails
    write(tmp_path / "p.csv", f'prompt,init_image\na cat,"{name}"\n')
    code, _, err = run(evaluate.main, capsys, tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1, *SIZE,
                       "--methods", "sd", "--metrics", "none", "--no-report")
    warning = [line for line in err if "failed" in line]
    assert code == 1 and len(warning) == 1, err
    assert "\\x1b]0;pwned\\x07\\x1b[2Jimg.png: not a PNG file" in warning[0]
    assert not any(c in line for line in err for c in "\x1b\x07")
