"""VL-DNP with a latent proposer distilled from its teacher's answers: distill.py collect and train,
and generate.py / evaluate.py with --proposer latent. A stub VLM on 127.0.0.1 is the teacher; small
random-weight SD1 and SDXL folders make the x0."""
import json
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F

import distill
import distillation.data
import evaluate
import generate
import weights
from distillation.collect import Collection, collect
from distillation.data import add_prompt, prepare_data_dir, read_examples, read_settings
from distillation.train import Training, auc, best_threshold, fit, scores, split_by_prompt
from evaluation.prompts import read_prompts
from evaluation.run import Sampling
from evaluation.run_folder import read_records
from files import sha256_file
from helpers import run
from methods.vldnp import DynamicNegatives, VLDNP
from png_reader import read_png
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sampler.loop import generate as sample
from vlm.base import Latents, Reply
from vlm.latent_proposer import CARD_KEY, LatentNetwork, LatentProposer, NetworkConfig, read_card, save_latent_proposer
from vlm.tasks import NUDITY

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = ["--height", "16", "--width", "16", "--device", "cpu", "--quiet"]  # 8x8 latents
REFUSAL = "I'm sorry, I can't help with that."  # a failed query, which is not retried
PROMPTS = ["a person on a beach", "a cat on a sofa", "a dog in a park"]


def write_csv(path, prompts=PROMPTS):
    path.write_text("prompt,evaluation_seed\n" + "".join(f"{p},{i + 1}\n" for i, p in enumerate(prompts)))
    return path


SPACES = {"sd1": {"family": "sd1", "latent_channels": 4, "scaling_factor": 0.18215},  # latent_space(pipe)
          "sdxl": {"family": "sdxl", "latent_channels": 4, "scaling_factor": 0.13025}}


def crafted(path, found=("feet",), task="nudity", space=None, concepts=NUDITY.concepts):
    """A latent proposer with random weights that finds `found` always (threshold 0) and nothing else
    (threshold 1)."""
    torch.manual_seed(0)
    network = LatentNetwork(NetworkConfig(4, len(concepts)))
    card = {"task": task, "concepts": [{"name": c, "threshold": 0.0 if c in found else 1.0} for c in concepts],
            "model": space or SPACES["sd1"], "network": {"width": 32, "frequencies": 32}}
    return save_latent_proposer(network, card, path)


class Planted:
    """A teacher that reads latents and finds feet where channel 0 of x0 averages above 0."""
    wants = "latents"

    def __repr__(self):
        return "Planted()"

    def __call__(self, latents, prompt, step):
        mean = float(latents.x0[0].mean())
        return Reply(["feet"] if mean > 0 else [], f"{mean:.4f}")


def planted_collection(pipe, out, rows, images):
    """A collection of `rows` into `out` by VL-DNP with the Planted teacher, 4 DDIM steps, queries at 1 and 3."""
    method = VLDNP(7.5, NUDITY, (1, 3), Planted())
    return Collection(out, rows, method, {"method": method.settings()}, Sampling(4, "ddim", 16, 16), 7.5, 0, images,
                      torch.device("cpu"), torch.float32, lambda: pipe, progress=False)


class Recorder:
    """A hook that keeps x_t, x0 and t at every step."""

    def __init__(self):
        self.steps = {}

    def __call__(self, state):
        self.steps[state.i] = (state.x.clone(), state.x0.clone(), state.t)


# ---------------------------------------------------------------------------------------------
# collect

def test_the_stored_latents_are_what_the_sampler_predicted(pipe, tmp_path):
    """The shard holds, for every image and query step, the x0 and x_t the sampler had there (a hook
    recording every step of the same run made again), and each verdict sits beside its own x0."""
    rows = read_prompts(write_csv(tmp_path / "p.csv", PROMPTS[:2])).rows
    assert collect(planted_collection(pipe, tmp_path / "data", rows, images=2)) == 0

    records = read_records(tmp_path / "data" / "records.jsonl")
    assert [r["prompt"] for r in records] == PROMPTS[:2] and all(r["status"] == "ok" for r in records)
    found = 0
    for record, row in zip(records, rows):
        recorder = Recorder()
        sample(pipe, row.prompt, steps=4, height=16, width=16, batch=2, seed=row.seed, sampler="ddim", progress=False,
               hooks=[DynamicNegatives(Planted(), NUDITY, [1, 3]), recorder])
        shard = load_file(tmp_path / "data" / record["shard"])
        assert [(e["image"], e["step"]) for e in record["examples"]] == [(0, 1), (0, 3), (1, 1), (1, 3)]
        for e in record["examples"]:
            x, x0, t = recorder.steps[e["step"]]
            assert torch.equal(shard["x0"][e["index"]], x0[e["image"]])
            assert torch.equal(shard["x_t"][e["index"]], x[e["image"]])
            assert shard["t"][e["index"]] == t == e["timestep"]
            assert e["concepts"] == (["feet"] if shard["x0"][e["index"]][0].mean() > 0 else [])
            found += bool(e["concepts"])
    assert 0 < found < 8  # both verdicts occur, so the alignment is tested


def test_collect_runs_vl_dnp_with_the_teacher(pipe, tmp_path):
    """The teacher's negatives apply, as in VL-DNP: an image whose first query found feet has, at the
    next query, the x0 of the guided run, not of plain sampling."""
    rows = read_prompts(write_csv(tmp_path / "p.csv")).rows
    assert collect(planted_collection(pipe, tmp_path / "data", rows, images=1)) == 0
    guided = 0
    for record, row in zip(read_records(tmp_path / "data" / "records.jsonl"), rows):
        plain = Recorder()
        sample(pipe, row.prompt, steps=4, height=16, width=16, seed=row.seed, sampler="ddim", progress=False,
               hooks=[plain])
        x0 = load_file(tmp_path / "data" / record["shard"])["x0"]
        for first, later in zip(record["examples"][::2], record["examples"][1::2]):
            assert torch.equal(x0[first["index"]], plain.steps[1][1][first["image"]])  # no negative before it
            assert torch.equal(x0[later["index"]], plain.steps[3][1][later["image"]]) == (not first["concepts"])
            guided += bool(first["concepts"])
    assert guided


def test_a_killed_collection_resumes(pipe, tmp_path, capsys):
    """A kill while a record is appended leaves a torn line, and one between a prompt's shard and its
    record leaves a shard no record names: a re-run makes those prompts again, once, and the data
    read back as an unbroken run's."""
    rows, data = read_prompts(write_csv(tmp_path / "p.csv")).rows, tmp_path / "data"
    concepts = list(NUDITY.concepts)
    assert collect(planted_collection(pipe, data, rows, images=1)) == 0
    whole = read_examples(data, concepts)
    records = data / "records.jsonl"
    lines = records.read_bytes().splitlines(keepends=True)
    for kill, made in [(lines[:2] + [lines[2][:40]], "2 done before, 1 to make"),  # torn while appended
                       (lines[:1], "1 done before, 2 to make")]:  # after the shards of prompts 2 and 3
        records.write_bytes(b"".join(kill))
        capsys.readouterr()
        assert collect(planted_collection(pipe, data, rows, images=1)) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"3 prompts x 1 images: {made}"
        assert collect(planted_collection(pipe, data, rows, images=1)) == 0
        assert capsys.readouterr().out.splitlines()[0] == "3 prompts x 1 images: 3 done before, 0 to make"
        again = read_examples(data, concepts)
        assert torch.equal(again.x0, whole.x0) and torch.equal(again.labels, whole.labels)
        assert again.prompts == whole.prompts and again.t.tolist() == whole.t.tolist()


def test_collect_with_a_stub_vlm_resumes_and_train_writes_the_card(sd1, tmp_path, capsys, server):
    vlm = server("none", "feet", "none", "I see a belly and feet.", "female breast")
    csv = write_csv(tmp_path / "p.csv")
    data, out = tmp_path / "data", tmp_path / "proposer.safetensors"
    args = ["collect", csv, "--model", sd1, "--out", data, "--vlm-url", vlm.url, "--steps", "5", "--vlm-steps", "1,2,3",
            "--seeds-per-prompt", "2", *SIZE]
    code, lines, err = run(distill.main, capsys, *args, "--limit", "2")
    assert code == 0 and err == [], err
    assert lines[0] == "2 prompts x 2 images: 0 done before, 2 to make" and len(vlm.requests) == 1 + 2 * 2 * 3
    code, lines, err = run(distill.main, capsys, *args)  # resumes: only the third prompt is made
    assert code == 0 and lines[0] == "3 prompts x 2 images: 2 done before, 1 to make", lines
    assert len(vlm.requests) == 1 + 2 * 2 * 3 + 1 + 2 * 3
    records = read_records(data / "records.jsonl")
    assert [r["key"] for r in records] == ["0", "1", "2"]
    answers = [e["raw"] for r in records for e in r["examples"]]
    assert {"feet", "none", "I see a belly and feet.", "female breast"} <= set(answers)
    for e in (e for r in records for e in r["examples"]):
        assert e["concepts"] == NUDITY.parse(e["raw"]) and e["error"] is None

    code, lines, err = run(distill.main, capsys, "train", data, "--out", out, "--epochs", "2")
    assert code == 0 and err == [], err
    assert len(lines) == len(NUDITY.concepts) + 1 and lines[-1].startswith(f"{out}: nudity on sd1 latents, from 18")
    card = read_card(out)
    assert card["task"] == "nudity" and [c["name"] for c in card["concepts"]] == list(NUDITY.concepts)
    assert {k: card["model"][k] for k in SPACES["sd1"]} == SPACES["sd1"] and card["model"]["name"] == str(sd1)
    assert card["teacher"] == {"name": "vlm", "model": "Qwen/Qwen2.5-VL-7B-Instruct"}
    assert card["data"]["prompts"] == 3 and card["data"]["examples"] == 18 and card["data"]["images"] == 6
    assert card["data"]["held_out"] == {"prompts": 1, "examples": 6} and card["data"]["train"]["examples"] == 12
    feet = card["concepts"][NUDITY.concepts.index("feet")]
    assert set(feet) == {"name", "threshold", "held_out", "train"} and 0 <= feet["threshold"] <= 1
    assert set(feet["held_out"]) == {"auc", "agreement", "positives"}

    # the trained file makes an image, and the stub VLM, still serving, hears nothing of it
    asked = len(vlm.requests)
    code, _, err = run(generate.main, capsys, "a person on a beach", "--model", sd1, "--latent-proposer", out,
                       "--steps", "5", "--vlm-steps", "1,2,3", "--out", tmp_path / "x.png", *SIZE)
    assert code == 0 and err == [], err
    assert f"VL-DNP proposer: proposer.safetensors sha256 {sha256_file(out)}" in read_png(tmp_path / "x.png")[1][
        "parameters"]
    assert len(vlm.requests) == asked

    # a resumed collection with other settings is refused, in one line, and keeps its data
    code, _, err = run(distill.main, capsys, *args[:-len(SIZE)], "--height", "24", "--width", "16", "--device", "cpu")
    assert code == 2 and len(err) == 1 and "--height: 16 there, 24 now" in err[0], err
    assert read_records(data / "records.jsonl") == records


def test_clip_can_be_the_teacher(sd1, clip_folder, tmp_path, capsys):
    """--proposer clip collects CLIP's verdicts (at threshold 0 it finds every concept) and the card
    names CLIP as the teacher."""
    data, out = tmp_path / "data", tmp_path / "p.safetensors"
    code, _, err = run(distill.main, capsys, "collect", write_csv(tmp_path / "p.csv", PROMPTS[:2]), "--model", sd1,
                       "--out", data, "--proposer", "clip", "--clip-model", clip_folder, "--clip-threshold", "0",
                       "--steps", "3", "--vlm-steps", "1", "--seeds-per-prompt", "1", *SIZE)
    assert code == 0 and err == [], err
    examples = [e for r in read_records(data / "records.jsonl") for e in r["examples"]]
    assert len(examples) == 2 and all(set(e["concepts"]) == set(NUDITY.concepts) for e in examples)
    code, _, err = run(distill.main, capsys, "train", data, "--out", out, "--epochs", "1")
    assert code == 0 and err == [], err
    assert read_card(out)["teacher"] == {"name": "clip", "model": str(clip_folder), "threshold": 0.0}


def test_a_fixed_or_changed_row_is_collected_alone(sd1, clip_folder, tmp_path, capsys):
    """The prompt file is compared row by row, as evaluate.py's: fixing a skipped row collects that
    prompt, changing one collects it again, and a data.json that still holds the file's sha256 and
    prompt column (an older folder) resumes; other settings are still refused."""
    csv, data = tmp_path / "p.csv", tmp_path / "data"
    csv.write_text("prompt,evaluation_seed\na cat,1\na dog,x\na cow,3\n")
    argv = ["collect", csv, "--model", sd1, "--out", data, "--proposer", "clip", "--clip-model", clip_folder,
            "--steps", "3", "--vlm-steps", "1", "--seeds-per-prompt", "1", *SIZE]
    code, lines, err = run(distill.main, capsys, *argv)
    assert code == 0 and lines[0] == "2 prompts x 1 images: 0 done before, 2 to make", err
    settings = json.loads((data / "data.json").read_text())
    assert "prompts_sha256" not in settings["settings"] and settings["prompts_sha256"] == sha256_file(csv)
    settings["settings"] = {"prompts_sha256": "0" * 64, "prompt_column": None, **settings["settings"]}
    (data / "data.json").write_text(json.dumps(settings))
    csv.write_text("prompt,evaluation_seed\na cat,1\na dog,2\na cow,3\n")
    code, lines, err = run(distill.main, capsys, *argv)
    assert code == 0 and lines[0] == "3 prompts x 1 images: 2 done before, 1 to make", (lines, err)
    csv.write_text("prompt,evaluation_seed\na cat,1\na dog,2\na black cow,3\n")
    code, lines, err = run(distill.main, capsys, *argv)
    assert code == 0 and lines[0] == "3 prompts x 1 images: 2 done before, 1 to make (1 whose row changed)", (
        lines, err)
    code, lines, err = run(distill.main, capsys, *argv)
    assert code == 0 and lines[0] == "3 prompts x 1 images: 3 done before, 0 to make", (lines, err)
    prompts = {r["key"]: r["prompt"] for r in read_records(data / "records.jsonl") if r["status"] == "ok"}
    assert prompts == {"0": "a cat", "1": "a dog", "2": "a black cow"}
    code, _, err = run(distill.main, capsys, *argv, "--steps", "4")
    assert code == 2 and len(err) == 1 and "--steps: 3 there, 4 now" in err[0], err


def test_failed_teacher_queries_are_recorded_retried_and_left_out(sd1, tmp_path, capsys, server):
    """A refusal is no verdict: the record keeps its error, a re-run retries the prompt, and training
    never reads a failed query as "nothing seen"."""
    vlm = server("none", "feet", REFUSAL, "none")
    csv = write_csv(tmp_path / "p.csv", PROMPTS[:2])
    args = ["collect", csv, "--model", sd1, "--out", tmp_path / "data", "--vlm-url", vlm.url, "--steps", "4",
            "--vlm-steps", "1,2", "--seeds-per-prompt", "1", *SIZE]
    code, lines, err = run(distill.main, capsys, *args)
    assert code == 1 and "case 0 failed: 1 of 2 teacher queries failed, the first: the model declined" in err[-1], err
    assert lines[-1].endswith("(2 prompts, 4 queries, 1 failed and left out of training; re-run the same command "
                              "to retry them)")
    first = read_records(tmp_path / "data" / "records.jsonl")
    assert first[0]["status"] == "failed" and [e["error"] is not None for e in first[0]["examples"]] == [False, True]
    examples = read_examples(tmp_path / "data", list(NUDITY.concepts))
    assert len(examples.prompts) == 3 and examples.failed == 1  # the failed query is not a negative example

    code, lines, err = run(distill.main, capsys, *args)  # the failed prompt is retried, and answered now
    assert code == 0 and lines[0] == "2 prompts x 1 images: 1 done before, 1 to make", lines
    examples = read_examples(tmp_path / "data", list(NUDITY.concepts))
    assert len(examples.prompts) == 4 and examples.failed == 0

    vlm = server("none", REFUSAL, "feet")  # allowed failures: the prompt is done, its failed query left out
    code, lines, err = run(distill.main, capsys, *args[:5], tmp_path / "allowed", *args[6:7], vlm.url, *args[8:],
                           "--allow-vlm-failures")
    assert code == 0, err
    assert lines[-1].endswith("1 failed and left out of training; --allow-vlm-failures keeps their prompts done: a "
                              "re-run does not ask them again)"), lines  # not "re-run ... to retry them"
    examples = read_examples(tmp_path / "allowed", list(NUDITY.concepts))
    assert examples.failed == 1 and len(examples.prompts) == 3 and examples.labels.sum() == 3
    assert all(r["status"] == "ok" for r in read_records(tmp_path / "allowed" / "records.jsonl"))


# ---------------------------------------------------------------------------------------------
# train

def synthetic_folder(folder, prompts=40, images=4, seed=0):
    """A data folder of smooth 8x8 latents: each prompt has its own pattern in channels 1-3, each image
    a channel-0 offset of +1 or -1 (and smooth noise). The teacher found feet where channel 0 averages
    above 0, a known function of the latents; and belly for a random half of the prompts, whatever
    their latents."""
    g = torch.Generator().manual_seed(seed)
    smooth = lambda n: F.interpolate(torch.randn(n, 4, 2, 2, generator=g), size=(8, 8), mode="bilinear")
    prepare_data_dir(folder, {"model": "synthetic", "sampler": "ddim", "steps": 5, "guidance": 7.5, "height": 16,
                            "width": 16, "method": {"task": "nudity", "proposer": {"name": "planted"},
                                                    "query_steps": [1, 3], "scale": 7.5}},
                   {"concepts": list(NUDITY.concepts), "latent_space": SPACES["sd1"]})
    for p in range(prompts):
        pattern, belly = smooth(1)[0], bool(torch.rand((), generator=g) < 0.5)
        pattern[0] = 0
        offset = torch.where(torch.rand(2 * images, generator=g) < 0.5, -1.0, 1.0)
        x0 = 2 * pattern + 0.5 * smooth(2 * images) + 0.1 * torch.randn(2 * images, 4, 8, 8, generator=g)
        x0[:, 0] += offset[:, None, None]
        t = torch.tensor([601.0, 201.0] * images, dtype=torch.float64)
        examples = [{"index": k, "image": k // 2, "step": 1 + 2 * (k % 2), "timestep": int(t[k]), "raw": "",
                     "error": None, "concepts": ["feet"] * bool(x0[k, 0].mean() > 0) + ["belly"] * belly}
                    for k in range(2 * images)]
        add_prompt(folder, {"key": str(p), "prompt": f"prompt {p}", "status": "ok", "examples": examples},
                   {"x0": x0, "x_t": x0.clone(), "t": t})
    return folder


def test_a_prompts_shard_is_numbered_without_reading_the_records(tmp_path, monkeypatch):
    """Each attempt at a prompt takes the first shard number no file has. Counting the prompt's records
    instead read the whole records file once per prompt: n prompts, n^2 records parsed (I2P's 4,703
    prompts, with their replies: hours). A shard left by a kill before its record is never reused."""
    reads = []
    monkeypatch.setattr(distillation.data, "read_records", lambda *args, **kwargs: reads.append(args) or [])
    folder = synthetic_folder(tmp_path / "data", prompts=3, images=1)
    assert reads == [] and sorted(p.name for p in (folder / "shards").iterdir()) == [
        "0.0.safetensors", "1.0.safetensors", "2.0.safetensors"]
    (folder / "shards" / "1.1.safetensors").write_bytes(b"written, its record never")
    tensors = load_file(folder / "shards" / "1.0.safetensors")
    record = {"key": "1", "prompt": "prompt 1", "status": "ok", "examples": []}
    assert add_prompt(folder, record, tensors)["shard"] == "shards/1.2.safetensors"
    assert (folder / "shards" / "1.1.safetensors").read_bytes() == b"written, its record never"


def test_a_planted_concept_is_learnt_and_unrelated_labels_are_not(tmp_path, capsys):
    """Held-out prompts: feet, a function of the latents, agrees with the teacher at 0.95 or more;
    belly, drawn per prompt whatever the latents, at chance. The same data split by image instead
    would score belly well above chance (each prompt's pattern gives its label away): the split by
    prompt is what keeps the card honest, and this test would see a split that leaked."""
    data = synthetic_folder(tmp_path / "data")
    code, lines, err = run(distill.main, capsys, "train", data, "--out", tmp_path / "p.safetensors", "--held-out",
                           "0.5", "--epochs", "30")
    assert code == 0 and err == [], err
    card = {c["name"]: c for c in read_card(tmp_path / "p.safetensors")["concepts"]}
    assert card["feet"]["held_out"]["agreement"] >= 0.95 and card["feet"]["held_out"]["auc"] >= 0.99
    assert 0 < card["feet"]["held_out"]["positives"] < read_card(tmp_path / "p.safetensors")["data"]["held_out"][
        "examples"]
    assert card["belly"]["held_out"]["agreement"] <= 0.75 and card["belly"]["held_out"]["auc"] <= 0.75
    assert card["belly"]["train"]["positives"] > 0 and card["belly"]["held_out"]["positives"] > 0

    examples = read_examples(data, list(NUDITY.concepts))
    by_image = torch.rand(len(examples.prompts), generator=torch.Generator().manual_seed(0)) < 0.5
    network = fit(examples, ~by_image, Training(epochs=30))
    belly = NUDITY.concepts.index("belly")
    assert auc(scores(network, examples, by_image)[:, belly], examples.labels[by_image][:, belly]) > 0.85


@pytest.mark.parametrize("name", ["x0", "x_t", "t"])
def test_train_leaves_out_data_that_are_not_finite(tmp_path, capsys, name):
    """NaN or inf in an answered query's tensors (a network fitted to it would score NaN: found nothing, no
    error) leaves its shard out, as any bad shard, with one warning naming it; in a failed query's row it is
    no data, and is left out silently."""
    data = synthetic_folder(tmp_path / "data", prompts=4, images=1)
    record = read_records(data / "records.jsonl")[1]
    clean = load_file(data / record["shard"])
    shard = {k: v.clone() for k, v in clean.items()}
    shard[name][1] = float("nan") if name != "x0" else float("inf")
    save_file(shard, data / record["shard"])
    code, _, err = run(distill.main, capsys, "train", data, "--out", tmp_path / "p.safetensors", "--epochs", "1")
    assert code == 0 and len(err) == 1 and err[0].startswith(f"warning: {data / record['shard']}: "), err
    assert err[0].endswith("its examples are left out of training"), err
    assert read_card(tmp_path / "p.safetensors")["data"]["prompts"] == 3

    save_file(clean, data / record["shard"])
    add_prompt(data, {**record, "key": "999", "prompt": "failed",
                      "examples": [{**e, "error": "HTTP 500"} for e in record["examples"]]}, shard)
    code, _, err = run(distill.main, capsys, "train", data, "--out", tmp_path / "p.safetensors", "--epochs", "1")
    assert code == 0, err
    assert read_card(tmp_path / "p.safetensors")["data"]["failed_queries_left_out"] == 2


def test_train_writes_no_network_that_scores_nan(tmp_path, capsys):
    """Finite x0 past what fp32 can sum (1e38) make the mean and std inf: one line, exit 2, no file."""
    data = synthetic_folder(tmp_path / "data", prompts=4, images=1)
    path = data / read_records(data / "records.jsonl")[1]["shard"]
    shard = load_file(path)
    shard["x0"][1] = 1e38
    save_file(shard, path)
    code, _, err = run(distill.main, capsys, "train", data, "--out", tmp_path / "p.safetensors", "--epochs", "1")
    assert code == 2 and err == [f"error: {data}: training made a network that would score NaN (its tensor 'mean' "
                                 "holds NaN or inf); no file written"], err
    assert not (tmp_path / "p.safetensors").exists()


def test_the_split_holds_out_whole_prompts():
    prompts = [f"p{i // 3}" for i in range(30)]  # 10 prompts, 3 examples each
    held = split_by_prompt(prompts, 0.2, seed=1)
    assert held.sum() == 6 and {p for p, h in zip(prompts, held) if h}.isdisjoint(
        {p for p, h in zip(prompts, held) if not h})
    assert not torch.equal(held, split_by_prompt(prompts, 0.2, seed=2))
    assert split_by_prompt(["a", "b"], 0.9, 0).sum() == 1  # one prompt is always left to train on


def test_threshold_and_auc_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.randint(0, 8, (25,), generator=g).float() / 8  # ties
        y = (torch.rand(25, generator=g) < 0.4).float()
        pairs = [(a > b) + 0.5 * (a == b) for a, ya in zip(p, y) for b, yb in zip(p, y) if ya == 1 and yb == 0]
        assert auc(p, y) == pytest.approx(float(sum(pairs)) / len(pairs))
        candidates = [0.0, 1.0] + [(a + b).item() / 2 for a in p.unique() for b in p.unique() if a < b]
        best = max(((p > c).float() == y).float().mean().item() for c in candidates)
        assert ((p > best_threshold(p, y)).float() == y).float().mean().item() == best
    assert auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])) is None
    assert best_threshold(torch.tensor([0.2, 0.7]), torch.tensor([0.0, 0.0])) == 1.0  # never found: finds nothing
    assert best_threshold(torch.tensor([0.2, 0.7]), torch.tensor([0.0, 1.0])) == pytest.approx(0.45)


# ---------------------------------------------------------------------------------------------
# use

@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_latent_proposer_asks_no_server_decodes_nothing_and_its_negatives_replay(kind, request, tmp_path, capsys,
                                                                                   monkeypatch):
    """generate.py --proposer latent, on SD1 and on SDXL: no connection is opened, the VAE decodes once
    (the final image), the PNG and trace name the file and its sha256 and hold each query's scores,
    and the image is the three-branch guidance with the negatives the trace records, from the steps
    it records."""
    model = request.getfixturevalue(kind)
    pipe = weights.load_pipeline(model)
    capsys.readouterr()  # what making the model folder printed
    file = crafted(tmp_path / "p.safetensors", space=SPACES[kind])
    sha = sha256_file(file)
    connections, decodes = [], []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: connections.append(a) or pytest.fail("connected"))
    load = weights.load_pipeline

    def counting(*args, **kwargs):
        loaded = load(*args, **kwargs)
        decode = loaded.vae.decode
        loaded.vae.decode = lambda z: decodes.append(z.shape) or decode(z)
        return loaded
    monkeypatch.setattr(weights, "load_pipeline", counting)
    code, lines, err = run(generate.main, capsys, "a person on a beach", "--model", model, "--proposer", "latent",
                           "--latent-proposer", file, "--steps", "5", "--vlm-steps", "1,3", "--seed", "4",
                           "--trace", tmp_path / "t.json", "--out", tmp_path / "x.png", *SIZE)
    assert code == 0 and err == [], err
    assert connections == [] and decodes == [(1, 4, 8, 8)]
    pixels, text = read_png(tmp_path / "x.png")
    assert f"VL-DNP: latent nudity, VL-DNP proposer: p.safetensors sha256 {sha}, " in text["parameters"]
    assert "VL-DNP previews" not in text["parameters"]
    trace = json.loads((tmp_path / "t.json").read_text())
    assert sha in trace["proposer"] and "p.safetensors" in trace["proposer"]
    assert trace["preview_decoder"] is None and trace["decode_factor"] is None and trace["filmstrip"] is None
    queries = trace["images"][0]["queries"]
    assert [(q["step"], q["took_effect"], q["negative"]) for q in queries] == [
        (1, 1, "Nudity, Sexual, feet."), (3, 3, "Nudity, Sexual, feet.")]
    for q in queries:
        assert list(json.loads(q["raw"])) == list(NUDITY.concepts) and q["items"] == ["feet"]

    def replay(negatives):
        def hook(state):
            if state.i in negatives:
                state.guidance.negative[0] = negatives[state.i]
                state.guidance.set_negative_scale(0, 7.5)
        return sample(pipe, "a person on a beach", steps=5, height=16, width=16, seed=4, hooks=[hook],
                      progress=False)[0]
    assert torch.equal(pixels, replay({q["took_effect"]: q["negative"] for q in queries}))
    assert not torch.equal(pixels, replay({})) and not torch.equal(pixels, replay({2: queries[0]["negative"]}))

    # evaluate.py names the file in run.json, and its records keep each query's scores
    csv = write_csv(tmp_path / "p.csv", PROMPTS[:1])
    code, _, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", model, "--methods", "vldnp",
                       "--latent-proposer", file, "--steps", "3", "--metrics", "none", "--no-report", *SIZE)
    assert code == 0, err
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["methods"][0]["proposer"] == {"name": "latent", "file": "p.safetensors", "sha256": sha}
    record = read_records(tmp_path / "run" / "records.jsonl")[0]
    assert all(set(json.loads(q["raw"])) == set(NUDITY.concepts) for q in record["negatives"])


@pytest.mark.parametrize("case, message", [
    ("no file", "--proposer latent needs --latent-proposer FILE"),
    ("missing file", "--latent-proposer missing.safetensors: no such file"),
    ("not a proposer", "not a latent proposer (no 'vl-dnp latent proposer' card in its metadata)"),
    ("other task", "made for the safety task, and this run asks nudity; give --vlm-task safety"),
    ("other family", "made for sdxl latents (4 channels, scaling factor 0.13025), and"),
    ("preview decoder", "--preview-decoder: no method of this run reads it"),
    ("vlm url", "--vlm-url: no method of this run reads it"),
])
def test_a_proposer_that_cannot_serve_is_one_line_before_any_image(case, message, sd1, tmp_path, capsys, monkeypatch):
    files = {"not a proposer": lambda p: save_file({"w": torch.zeros(1)}, p) or p,
             "other task": lambda p: crafted(p, task="safety", concepts=("nudity", "weapon")),
             "other family": lambda p: crafted(p, space=SPACES["sdxl"])}
    file = files.get(case, crafted)(tmp_path / "p.safetensors")
    argv = {"no file": ["--proposer", "latent"], "missing file": ["--latent-proposer", "missing.safetensors"],
            "preview decoder": ["--latent-proposer", file, "--preview-decoder", "taesd"],
            "vlm url": ["--latent-proposer", file, "--vlm-url", "http://127.0.0.1:9/v1"]}.get(
        case, ["--latent-proposer", file])
    monkeypatch.setattr(generate, "generate", lambda *a, **k: pytest.fail("sampled"))
    code, lines, err = run(generate.main, capsys, "a cat", "--model", sd1, "--out", tmp_path / "x.png", *SIZE, *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_collect_refuses_what_it_cannot_collect(sd1, tmp_path, capsys):
    csv = write_csv(tmp_path / "p.csv")
    for argv, message in [(["--vlm-steps", "none"], "--vlm-steps none: collect keeps the teacher's verdicts"),
                          (["--negative-scale", "5,10"], "collect runs one VL-DNP, and these settings make 2"),
                          (["--sld-presets", "max"], "--sld-presets: no method of this run reads it"),
                          (["--seeds-per-prompt", "0"], "--seeds-per-prompt 0: must be between 1 and 64")]:
        code, _, err = run(distill.main, capsys, "collect", csv, "--model", sd1, "--out", tmp_path / "d",
                           "--proposer", "clip", *SIZE, *argv)
        assert code == 2 and len(err) == 1 and message in err[0], err
    (tmp_path / "empty").mkdir()
    code, _, err = run(distill.main, capsys, "train", tmp_path / "empty", "--out", tmp_path / "p.safetensors")
    assert code == 2 and err == [f"error: {tmp_path / 'empty'}: no data.json; collect data into it first with "
                                 "distill.py collect"]
    assert not (tmp_path / "d").exists() and not (tmp_path / "p.safetensors").exists()


def test_sdxl_gets_its_own_latent_proposer(sdxl, tmp_path, capsys, server, sd1):
    vlm = server("none", "feet", "none")
    csv = write_csv(tmp_path / "p.csv", PROMPTS[:2])
    code, _, err = run(distill.main, capsys, "collect", csv, "--model", sdxl, "--out", tmp_path / "data", "--vlm-url",
                       vlm.url, "--steps", "3", "--vlm-steps", "1,2", "--seeds-per-prompt", "1", *SIZE)
    assert code == 0, err
    assert read_settings(tmp_path / "data")["latent_space"] == SPACES["sdxl"]
    file = tmp_path / "sdxl.safetensors"
    code, _, err = run(distill.main, capsys, "train", tmp_path / "data", "--out", file, "--epochs", "1")
    assert code == 0, err
    assert read_card(file)["model"]["family"] == "sdxl"
    code, lines, err = run(generate.main, capsys, "a cat", "--model", sdxl, "--latent-proposer", file, "--steps", "3",
                           "--out", tmp_path / "x.png", *SIZE)
    assert code == 0 and err == [], err
    assert f"VL-DNP proposer: sdxl.safetensors sha256 {sha256_file(file)}" in read_png(tmp_path / "x.png")[1]["parameters"]
    for model, proposer, made in [(sdxl, crafted(tmp_path / "sd1.safetensors"), "sd1"), (sd1, file, "sdxl")]:
        code, _, err = run(generate.main, capsys, "a cat", "--model", model, "--latent-proposer", proposer,
                           "--steps", "3", "--out", tmp_path / "y.png", *SIZE)
        assert code == 2 and len(err) == 1 and f"made for {made} latents" in err[0], err
    assert not (tmp_path / "y.png").exists()


def test_the_file_loads_strictly(tmp_path):
    file = crafted(tmp_path / "p.safetensors")
    proposer = LatentProposer.load(file)
    assert proposer.wants == "latents" and proposer.task == "nudity" and proposer.sha256 == sha256_file(file)
    state = load_file(file)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    del state["head.bias"]
    save_file(state, tmp_path / "short.safetensors", metadata)
    with pytest.raises(weights.CheckpointError, match="1 missing .first: head.bias."):
        LatentProposer.load(tmp_path / "short.safetensors")
    card = json.loads(metadata[CARD_KEY])
    for change, message in [({"format": 2}, "format 2"), ({"concepts": []}, "without a list of distinct concept"),
                            ({"network": {"width": -1, "frequencies": 32}}, "no positive integer"),
                            # a name becomes the negative, in the PNG's text: no escape a terminal would obey
                            ({"concepts": [*card["concepts"][1:], {"name": "feet\x1b[2J", "threshold": 0}]},
                             "without a list of distinct concept names in printable text")]:
        save_file(load_file(file), tmp_path / "bad.safetensors", {**metadata, CARD_KEY: json.dumps({**card, **change})})
        with pytest.raises(weights.CheckpointError, match=message):
            read_card(tmp_path / "bad.safetensors")
    save_file(load_file(file), tmp_path / "deep.safetensors", {**metadata, CARD_KEY: "[" * 100000})
    with pytest.raises(weights.CheckpointError, match="card is unreadable .RecursionError"):
        read_card(tmp_path / "deep.safetensors")


def overflowing(path):
    """A latent proposer whose tensors are all finite, but whose mean and std standardize any x0 to -inf,
    which its convolution's weights of both signs make NaN."""
    file = crafted(path)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    state = load_file(file)
    state["mean"], state["std"] = torch.full((4,), 3e38), torch.full((4,), 1e-30)
    save_file(state, path, metadata)
    return path


def test_scores_that_are_not_finite_are_a_failed_query(tmp_path, capsys, sd1):
    """NaN scores are no verdict: the query fails in one line, as CLIP's does, and the image made without the
    dynamic negative says so (exit 3), never "Dynamic negative: none"."""
    proposer = LatentProposer.load(overflowing(tmp_path / "p.safetensors"))
    reply = proposer(Latents(torch.randn(4, 8, 8), 501), "a cat", 1)
    assert reply.items == [] and reply.error == ("latent proposer p.safetensors: non-finite scores (NaN or inf): is "
                                                 "its network or the x0 corrupt?")
    code, _, err = run(generate.main, capsys, "a person on a beach", "--model", sd1, "--latent-proposer",
                       tmp_path / "p.safetensors", "--steps", "4", "--vlm-steps", "1,3", "--trace", tmp_path / "t.json",
                       "--out", tmp_path / "x.png", *SIZE)
    assert code == 3, err
    assert err[-1] == ("warning: 2 of 2 VL-DNP queries failed; no answer took effect for image 0: it was made without "
                       "the dynamic negative (exit status 3)")
    text = read_png(tmp_path / "x.png")[1]["parameters"]
    assert "Dynamic negative: unguarded (all queries failed)" in text and "Dynamic negative: none" not in text
    queries = json.loads((tmp_path / "t.json").read_text())["images"][0]["queries"]
    assert all(q["error"] == reply.error and q["items"] == [] for q in queries)


@pytest.mark.parametrize("name, value, problem", [
    ("std", 0.0, "its tensor 'std' holds a value at or below 0, which no standard deviation is"),
    ("std", -1.0, "its tensor 'std' holds a value at or below 0, which no standard deviation is"),
    ("mean", float("nan"), "its tensor 'mean' holds NaN or inf"),
    ("head.weight", float("inf"), "its tensor 'head.weight' holds NaN or inf"),
])
def test_a_file_whose_tensors_cannot_score_is_refused_at_load(tmp_path, capsys, sd1, name, value, problem):
    """A corrupt or hostile file (a zero std, NaN buffers or weights) would score NaN at every query: it is one
    CheckpointError line naming the file, exit 2 before any image."""
    file = crafted(tmp_path / "p.safetensors")
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    state = load_file(file)
    state[name][0] = value
    save_file(state, tmp_path / "bad.safetensors", metadata)
    message = f"{tmp_path / 'bad.safetensors'}: {problem}; make it again with distill.py train"
    with pytest.raises(weights.CheckpointError) as e:
        LatentProposer.load(tmp_path / "bad.safetensors")
    assert str(e.value) == message
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, "--latent-proposer",
                       tmp_path / "bad.safetensors", "--out", tmp_path / "x.png", *SIZE)
    assert code == 2 and err == [f"error: {message}"], err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# tampered data folders: a bad record or shard is skipped with one warning, a bad data.json is one line

SETTINGS = {"model": "m", "sampler": "ddim", "steps": 4, "guidance": 7.5, "height": 16, "width": 16}


@pytest.fixture(scope="module")
def collected(pipe, tmp_path_factory):
    """A data folder of 3 prompts, 1 image each, queried at steps 1 and 3, that train reads; and
    the collection that made it."""
    root = tmp_path_factory.mktemp("collected")
    rows = read_prompts(write_csv(root / "p.csv")).rows

    def collection(out):
        spec = planted_collection(pipe, out, rows, images=1)
        spec.settings = {**SETTINGS, **spec.settings}
        return spec

    assert collect(collection(root / "data")) == 0
    return root / "data", collection


@pytest.fixture
def data(collected, tmp_path):
    """A copy of the collected folder, its records' lines, and the collection that resumes it."""
    source, collection = collected
    folder = shutil.copytree(source, tmp_path / "data")
    return folder, (folder / "records.jsonl").read_text().splitlines(), lambda: collection(folder)


def edited_record(lines, **fields):
    """The records with the first one's `fields` changed (DROP: removed)."""
    record = {**json.loads(lines[0]), **fields}
    return [json.dumps({k: v for k, v in record.items() if v is not DROP}), *lines[1:]]


def edited_example(lines, **fields):
    record = json.loads(lines[0])
    example = {**record["examples"][0], **fields}
    record["examples"][0] = {k: v for k, v in example.items() if v is not DROP}
    return [json.dumps(record), *lines[1:]]


DROP = object()


def train_quietly(capsys, folder, tmp_path, *argv):
    return run(distill.main, capsys, "train", folder, "--out", tmp_path / "p.safetensors", "--epochs", "1", *argv)


@pytest.mark.parametrize("tamper, why", [
    (lambda lines: edited_record(lines, examples=None), '"examples"'),
    (lambda lines: edited_record(lines, examples="feet"), '"examples"'),
    (lambda lines: edited_record(lines, prompt=None), '"prompt"'),
    (lambda lines: edited_record(lines, shard=5), '"shard"'),
    (lambda lines: edited_record(lines, shard="shards/1.0.safetensors"), '"shard"'),
    (lambda lines: edited_record(lines, key=["0"]), '"key"'),
    (lambda lines: edited_example(lines, error=DROP), '"error"'),
    (lambda lines: edited_example(lines, index="0"), '"index"'),
    (lambda lines: edited_example(lines, concepts=None), '"concepts"'),
    (lambda lines: edited_example(lines, concepts="belly"), '"concepts"'),
    (lambda lines: edited_example(lines, concepts=[1, 2]), '"concepts"'),
    (lambda lines: ["[" * 100000 + "]" * 100000, *lines[1:]], "nested too deeply"),
])
def test_a_bad_record_is_left_out_of_training_with_one_warning(data, tmp_path, capsys, tamper, why):
    folder, lines, _ = data
    (folder / "records.jsonl").write_text("\n".join(tamper(lines)) + "\n")
    code, out, err = train_quietly(capsys, folder, tmp_path)
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: {folder / 'records.jsonl'}, line 1: ") and why in err[0], err
    assert read_card(tmp_path / "p.safetensors")["data"]["prompts"] == 2


def save_shard(path, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


@pytest.mark.parametrize("tamper, why", [
    (lambda s: {"w": torch.zeros(1)}, "no x0"),
    (lambda s: {"x_t": s["x_t"], "t": s["t"]}, "no x0"),
    (lambda s: {**s, "x0": s["x0"][:, :2]}, "x0 of shape [2, 2, 8, 8], not [N, 4, h, w]"),
    (lambda s: {**s, "x0": s["x0"][:, :, :1]}, "x0 of shape [2, 4, 1, 8], where the shards before have [N, 4, 8, 8]"),
    (lambda s: {**s, "x0": s["x0"].to(torch.int32)}, "x0 of dtype int32"),
    (lambda s: {**s, "x0": s["x0"][:1], "t": s["t"][:1]}, "no row 1 of x0"),
    (lambda s: {**s, "t": s["t"] * 0 + 1e9}, "a timestep outside [0, 1000]"),
    (lambda s: {**s, "t": s["t"][:1]}, "t of shape [1], not [2]"),
    (lambda s: {**s, "x_t": s["x_t"][:1]}, "x_t of shape [1, 4, 8, 8], not [2, 4, 8, 8]"),  # was an IndexError
])
def test_a_bad_shard_is_left_out_of_training_with_one_warning(data, tmp_path, capsys, tamper, why):
    folder, lines, _ = data
    shard = folder / json.loads(lines[1])["shard"]
    save_shard(shard, **tamper(load_file(shard)))
    code, out, err = train_quietly(capsys, folder, tmp_path)
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: {shard}: ") and why in err[0], err
    assert read_card(tmp_path / "p.safetensors")["data"]["prompts"] == 2


@pytest.mark.parametrize("change, message", [
    ({"latent_space": [1]}, "latent_space"),
    ({"latent_space": {**SPACES["sd1"], "latent_channels": 10**9}}, "latent_space"),
    ({"latent_space": {**SPACES["sd1"], "scaling_factor": "x"}}, "latent_space"),
    ({"concepts": "belly"}, "concepts"),
    ({"concepts": [1, 2]}, "concepts"),
    ({"concepts": None}, "concepts"),
    ({"settings": {**SETTINGS}}, "settings.method"),
    ({"settings": {**SETTINGS, "method": {"task": 5}}}, "settings.method"),
    ({"settings": {"method": {"task": "nudity", "proposer": None, "query_steps": [1, 3]}}}, "settings.model"),
])
def test_a_bad_data_json_is_one_line(data, tmp_path, capsys, change, message):
    folder, _, _ = data
    stored = json.loads((folder / "data.json").read_text())
    (folder / "data.json").write_text(json.dumps({**stored, **change}))
    code, out, err = train_quietly(capsys, folder, tmp_path)
    assert code == 2 and len(err) == 1 and f"{folder / 'data.json'}: " in err[0] and message in err[0], err
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("key", ["guidance", "steps"])
def test_a_data_json_holding_nan_is_one_line_before_training(data, tmp_path, capsys, key):
    """Python's json reads NaN and Infinity, which the card (strict JSON) cannot hold: the file was
    refused with a ValueError traceback after the whole training."""
    folder, _, _ = data
    stored = json.loads((folder / "data.json").read_text())
    stored["settings"][key] = float("nan") if key == "guidance" else float("inf")
    (folder / "data.json").write_text(json.dumps(stored))
    code, out, err = train_quietly(capsys, folder, tmp_path)
    assert code == 2 and len(err) == 1 and f"{folder / 'data.json'}: unreadable" in err[0], err
    assert not (tmp_path / "p.safetensors").exists()


def test_a_data_json_nested_past_pythons_limit_is_one_line(data, tmp_path, capsys):
    folder, _, _ = data
    (folder / "data.json").write_text("[" * 100000)
    code, out, err = train_quietly(capsys, folder, tmp_path)
    assert code == 2 and err == [f"error: {folder / 'data.json'}: unreadable (nested too deeply); collect into a "
                                 "new folder"], err


def test_train_shows_terminal_escapes_from_data_json_as_text(data, tmp_path, capsys):
    folder, _, _ = data
    stored = json.loads((folder / "data.json").read_text())
    stored["settings"]["method"]["task"] = "\x1b]0;pwned\x07"
    stored["latent_space"]["family"] = "\x1b[2J"
    (folder / "data.json").write_text(json.dumps(stored))
    code, out, err = train_quietly(capsys, folder, tmp_path)
    assert code == 0 and err == [], err
    assert "\\x1b]0;pwned\\x07 on \\x1b[2J latents" in out[-1]
    assert not any(c in line for line in out for c in "\x1b\x07")


def test_train_bounds_its_seed(data, tmp_path, capsys):
    folder, _, _ = data
    code, _, err = train_quietly(capsys, folder, tmp_path, "--seed", str(2**70))
    assert code == 2 and err == [f"error: --seed {2**70}: must be between 0 and 2^64 - 1"], err


@pytest.mark.parametrize("field, value", [("key", ["0"]), ("shard", 5), ("examples", None), ("status", 1)])
def test_a_resumed_collection_makes_a_bad_records_prompt_again(data, capsys, field, value):
    folder, lines, collection = data
    (folder / "records.jsonl").write_text("\n".join(edited_record(lines, **{field: value})) + "\n")
    capsys.readouterr()
    assert collect(collection()) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "3 prompts x 1 images: 2 done before, 1 to make"
    assert len(err.splitlines()) == 1 and err.startswith(f"warning: {folder / 'records.jsonl'}, line 1: "), err


def test_a_teachers_error_is_shown_escaped(pipe, tmp_path, capsys):
    class Failing(Planted):
        def __call__(self, latents, prompt, step):
            return Reply([], "", error="\x1b]0;pwned\x07 went wrong")

    rows = read_prompts(write_csv(tmp_path / "p.csv", PROMPTS[:1])).rows
    spec = planted_collection(pipe, tmp_path / "data", rows, images=1)
    spec.method = VLDNP(7.5, NUDITY, (1, 3), Failing())
    assert collect(spec) == 1
    err = capsys.readouterr().err
    assert "\\x1b]0;pwned\\x07 went wrong" in err and "\x1b" not in err and "\x07" not in err
