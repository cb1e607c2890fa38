"""generate.py with VL-DNP: the proposers end to end, the trace, and the flags' errors."""
import json
import threading
import time

import pytest
import torch

import distill
import evaluate
import generate
import weights
from fake_vlm import dead_url
import png
from helpers import picture, run
from png_reader import read_png
from sampler.base import SAMPLERS
from sampler.loop import generate as sample
from vlm.base import Reply
from methods.vldnp import VLDNP
from vlm.tasks import NUDITY
from weights import load_pipeline

RUN = ["a person on a beach", "--steps", "5", "--height", "16", "--width", "16", "--seed", "3", "--device", "cpu",
       "--quiet"]


def image(path):
    return read_png(path)


def test_vlm_proposer_end_to_end_with_trace(sd1, tmp_path, capsys, server):
    vlm = server("none", "I can see feet and a belly.", "none")  # the first answers the check before loading
    code, out, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", "1,3",
                         "--trace", tmp_path / "trace.json", "--out", tmp_path / "dnp.png")
    assert code == 0 and err == [], err
    assert len(vlm.requests) == 3 and vlm.requests[0]["json"]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    trace = json.loads((tmp_path / "trace.json").read_text())
    queries = trace["images"][0]["queries"]
    assert [q["step"] for q in queries] == [1, 3] and [q["took_effect"] for q in queries] == [1, 3]
    assert queries[0]["negative"] == "Nudity, Sexual, feet, belly." and queries[1]["negative"] is None
    assert (tmp_path / trace["filmstrip"]).is_file()
    pixels, text = image(tmp_path / "dnp.png")
    assert "VL-DNP: vlm nudity, Negative scale: 7.5, VL-DNP steps: 1 3, Dynamic negative: none" in text["parameters"]
    # the negative was in force for steps 1 and 2: the image differs from plain SD's
    code, _, _ = run(generate.main, capsys, *RUN, "--model", sd1, "--proposer", "none", "--out", tmp_path / "plain.png")
    assert code == 0 and not torch.equal(pixels, image(tmp_path / "plain.png")[0])


SCRIPTS = {  # each script's command line for one VL-DNP image of "a person", given the model and a folder
    "generate": lambda model, tmp: (generate.main, *RUN, "--model", model, "--out", tmp / "x.png"),
    "evaluate": lambda model, tmp: (evaluate.main, prompts_csv(tmp), "--model", model, "--methods", "vldnp",
                                    "--metrics", "none", "--no-report", "--out", tmp / "run"),
    "distill": lambda model, tmp: (distill.main, "collect", prompts_csv(tmp), "--model", model, "--out", tmp / "data"),
}


def prompts_csv(folder):
    (folder / "prompts.csv").write_text("prompt\na person\n")
    return folder / "prompts.csv"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_dead_server_stops_each_script_with_the_same_line_before_the_model_loads(script, tmp_path, capsys):
    empty = tmp_path / "empty-model"  # loading it would fail with another message
    empty.mkdir()
    main, *argv = SCRIPTS[script](empty, tmp_path)
    code, out, err = run(main, capsys, *argv, "--vlm-url", dead_url())
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: the VLM does not answer: cannot reach") and err[0].endswith(
        "Start it or fix --vlm-url; --allow-vlm-failures runs anyway, recording each failed query"), err
    assert not (tmp_path / "x.png").exists() and not list(tmp_path.glob("*/images/*"))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_dead_server_allowed_is_the_same_warning_in_each_script(script, tmp_path, capsys):
    empty = tmp_path / "empty-model"  # the run goes on to load it, and stops there
    empty.mkdir()
    main, *argv = SCRIPTS[script](empty, tmp_path)
    code, out, err = run(main, capsys, *argv, "--vlm-url", dead_url(), "--allow-vlm-failures")
    assert code == 2 and err[0].startswith("warning: the VLM does not answer (cannot reach"), err
    assert err[0].endswith("); running anyway, recording each failed query") and "empty-model" in err[-1], err


def test_no_query_steps_no_server_check(sd1, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", dead_url(), "--vlm-steps", "none",
                       "--out", tmp_path / "x.png")
    assert code == 0 and err == [], err


def test_a_dead_server_allowed_makes_an_image_that_says_it_is_unguarded(sd1, tmp_path, capsys):
    code, out, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", dead_url(), "--vlm-steps", "0,2",
                         "--allow-vlm-failures", "--trace", tmp_path / "t.json", "--out", tmp_path / "dead.png")
    assert code == 3, err
    assert err[0].startswith("warning: the VLM does not answer (cannot reach")
    assert sum("VL-DNP query at step" in line for line in err) == 2
    assert err[-1] == ("warning: 2 of 2 VL-DNP queries failed; no answer took effect for image 0: it was made "
                       "without the dynamic negative (exit status 3)")
    queries = json.loads((tmp_path / "t.json").read_text())["images"][0]["queries"]
    assert all(q["error"] and q["negative"] is None for q in queries)
    text = image(tmp_path / "dead.png")[1]["parameters"]
    assert "VL-DNP failed queries: 2/2, Dynamic negative: unguarded (all queries failed)" in text
    assert "Dynamic negative: none" not in text
    # no answer, no negative: the image is plain SD's
    run(generate.main, capsys, *RUN, "--model", sd1, "--proposer", "none", "--out", tmp_path / "plain.png")
    assert torch.equal(image(tmp_path / "dead.png")[0], image(tmp_path / "plain.png")[0])


ERROR_500 = {"status": 500, "body": {"error": {"message": "overloaded"}}}


def test_a_server_that_answers_the_check_then_fails(sd1, tmp_path, capsys, server):
    """Every query fails: exit 3 without any flag, since the check passed. One of two fails: exit 0,
    and the PNG and stderr count it."""
    code, _, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", server("none", ERROR_500).url,
                       "--vlm-steps", "1,3", "--batch", 2, "--out", tmp_path / "all.png")
    assert code == 3 and "HTTP 500" in err[0], err
    assert err[0].endswith("; no negative is in force yet")  # nothing was kept: none had been found
    assert err[-1] == ("warning: 4 of 4 VL-DNP queries failed; no answer took effect for images 0, 1: they were "
                       "made without the dynamic negative (exit status 3)")
    for i in range(2):
        assert "VL-DNP failed queries: 2/2, Dynamic negative: unguarded (all queries failed)" in \
            image(tmp_path / f"all-{i}.png")[1]["parameters"]

    code, out, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url",
                         server("none", "feet", ERROR_500).url, "--vlm-steps", "1,3", "--out", tmp_path / "some.png")
    assert code == 0 and out[-1] == str(tmp_path / "some.png"), err
    assert err[0].startswith("warning: VL-DNP query at step 3 for image 0 failed: HTTP 500")
    assert err[0].endswith("; keeping the negative in force")  # feet, from step 1
    assert err[-1] == "warning: 1 of 2 VL-DNP queries failed; the negative in force was kept, and the PNG counts them"
    text = image(tmp_path / "some.png")[1]["parameters"]
    assert 'VL-DNP failed queries: 1/2, Dynamic negative: "Nudity, Sexual, feet."' in text


def test_help_documents_exit_status_3_and_the_flag(capsys):
    assert generate.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--allow-vlm-failures" in text
    assert "3 saved, but made without the dynamic negative (no VL-DNP answer took effect" in text


def test_a_reply_with_a_lone_surrogate_is_saved_and_traced(sd1, tmp_path, capsys, server):
    """'\\ud83d' is valid JSON but no Unicode text: it must not stop the trace or the image being written."""
    vlm = server("feet \ud83d, blood")
    for task in ("nudity", "safety"):
        code, out, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", "1",
                             "--vlm-task", task, "--trace", tmp_path / f"{task}.json", "--out",
                             tmp_path / f"{task}.png")
        assert code == 0 and err == [], err
        [query] = json.loads((tmp_path / f"{task}.json").read_text(encoding="utf-8"))["images"][0]["queries"]
        assert query["raw"] == "feet \ufffd, blood"
        assert query["negative"] == {"nudity": "Nudity, Sexual, feet.", "safety": "feet \ufffd, blood"}[task]
        assert f"Dynamic negative: {json.dumps(query['negative'])}" in image(tmp_path / f"{task}.png")[1]["parameters"]


def test_a_trace_that_cannot_be_written_loses_no_image(sd1, tmp_path, capsys, server):
    (tmp_path / "t.filmstrip.png").mkdir()  # where the filmstrip goes
    code, out, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", server("feet").url, "--vlm-steps",
                         "1", "--batch", 2, "--trace", tmp_path / "t.json", "--out", tmp_path / "x.png")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write the trace {tmp_path / 't.json'}: ") and "images were saved" in err[0]
    assert out[1:] == [str(tmp_path / "x-0.png"), str(tmp_path / "x-1.png")]
    assert all(image(tmp_path / f"x-{i}.png")[0].shape == (16, 16, 3) for i in range(2))
    trace = json.loads((tmp_path / "t.json").read_text())  # the JSON part is still written
    assert trace["filmstrip"] is None and len(trace["images"]) == 2


@pytest.mark.parametrize("out, trace, batch", [("x.png", "x.png", 1), ("x", "x-1.png", 2), ("t.filmstrip.png", "t.json", 1)])
def test_a_trace_that_would_replace_an_image_is_refused_before_loading(out, trace, batch, sd1, tmp_path, capsys,
                                                                       server):
    """The trace (or its filmstrip, beside it) is written after the images: named as one of them, it replaced
    the image just made, and the run said 0."""
    (tmp_path / out).write_bytes(b"an earlier image")
    code, lines, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", server("feet").url, "--vlm-steps",
                           "1", "--batch", batch, "--out", tmp_path / out, "--trace", tmp_path / trace)
    assert code == 2 and lines == [] and len(err) == 1 and err[0].startswith(f"error: --trace {tmp_path / trace}: "), err
    assert "--out" in err[0] and (tmp_path / out).read_bytes() == b"an earlier image"


@pytest.mark.parametrize("option", ["--init-image", "--mask"])
def test_a_trace_that_would_replace_the_image_edited_is_refused_before_loading(option, sd1, tmp_path, capsys, server):
    """The trace is written after sampling: named as the image or mask the edit reads, it would replace the user's file."""
    for name in ("in.png", "mask.png"):
        png.write_png(tmp_path / name, picture(16, 16))
    kept = (tmp_path / "in.png").read_bytes(), (tmp_path / "mask.png").read_bytes()
    trace = tmp_path / ("in.png" if option == "--init-image" else "mask.png")
    code, lines, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", server("feet").url, "--vlm-steps",
                           "1", "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--strength", "0.6",
                           "--out", tmp_path / "out.png", "--trace", trace)
    assert code == 2 and lines == [] and len(err) == 1 and err[0].startswith(f"error: --trace {trace}: "), err
    assert ((tmp_path / "in.png").read_bytes(), (tmp_path / "mask.png").read_bytes()) == kept


def test_metadata_names_the_negative_in_force_at_the_end(sd1):
    """With --vlm-async, the last query's answer can come after sampling: the image was made with the
    negative before it, and its metadata says so."""
    release = threading.Event()

    def proposer(image, prompt, step):
        if step == 4:
            release.wait(120)  # released once sampling is over, however slow the machine
        return Reply(["feet"] if step == 1 else [], "")

    def gate(state):  # the first answer arrives before step 3
        if state.i == 2:
            time.sleep(0.3)

    pipe = load_pipeline(sd1)
    plan = VLDNP(query_steps=(1, 4), proposer=proposer, asynchronous=True).plan(pipe, "a cat")
    sample(pipe, plan.prompt, steps=5, height=16, width=16, hooks=[*plan.arguments["hooks"], gate], progress=False)
    release.set()
    plan.finish()
    assert plan.hook.trace[0][-1].took_effect is None
    assert plan.image_parameters(0)["Dynamic negative"] == "Nudity, Sexual, feet."


def test_answers_that_all_came_after_sampling_leave_the_image_unguarded(sd1):
    """With --vlm-async an answer can come after the last step: it was no failure, but the image was
    made without it, and must not say "none" as if the proposer had looked and seen nothing."""
    release = threading.Event()

    def proposer(image, prompt, step):
        release.wait(120)  # released once sampling is over, however slow the machine
        return Reply(["feet"], "feet")

    pipe = load_pipeline(sd1)
    plan = VLDNP(query_steps=(1,), proposer=proposer, asynchronous=True).plan(pipe, "a cat")
    sample(pipe, plan.prompt, steps=5, height=16, width=16, progress=False, **plan.arguments)
    release.set()
    plan.finish()
    assert plan.hook.trace[0][0].error is None and plan.hook.trace[0][0].took_effect is None
    settings = plan.image_parameters(0)
    assert settings["Dynamic negative"] == "unguarded (no answer in time)" and "VL-DNP failed queries" not in settings
    assert plan.unguarded(0)
    assert plan.summary() == ("no VL-DNP answer took effect for image 0: it was made without the dynamic negative "
                              "(exit status 3)")


def test_static_is_the_tasks_static_negative_from_the_first_step(sd1, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sd1, "--proposer", "static", "--negative-scale", 5,
                       "--out", tmp_path / "static.png")
    assert code == 0, err
    expected = sample(load_pipeline(sd1), "a person on a beach", steps=5, height=16, width=16, seed=3,
                      negative=NUDITY.static_negative, negative_scale=5.0, progress=False)
    pixels, text = image(tmp_path / "static.png")
    assert torch.equal(pixels, expected[0])
    assert f'Static negative: "{NUDITY.static_negative}"' in text["parameters"]
    assert "Method: static" in text["parameters"] and "Dynamic negative" not in text["parameters"]


def test_static_writes_a_trace_of_its_negative_from_step_0(sd1, tmp_path, capsys):
    trace_path = tmp_path / "new" / "static.json"  # the folder is made
    code, out, err = run(generate.main, capsys, *RUN, "--model", sd1, "--proposer", "static", "--negative-scale", 5,
                         "--batch", 2, "--trace", trace_path, "--out", tmp_path / "s.png")
    assert code == 0 and err == [], err
    assert out[-1] == f"trace: {trace_path}"
    first = int(SAMPLERS["ddim"](load_pipeline(sd1).scheduler, 5).timesteps[0])
    trace = json.loads(trace_path.read_text())
    assert trace["method"] == "static" and trace["negative_scale"] == 5 and trace["filmstrip"] is None
    assert trace["negative"] == NUDITY.static_negative and trace["query_steps"] == [0]
    assert [image["prompt"] for image in trace["images"]] == ["a person on a beach"] * 2
    for image in trace["images"]:
        assert image["queries"] == [{"step": 0, "timestep": first, "raw": "", "items": [],
                                     "negative": NUDITY.static_negative, "error": None, "latency": None,
                                     "took_effect": 0}]


def test_clip_proposer_from_a_local_folder(sd1, clip_folder, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sd1, "--clip-model", clip_folder, "--clip-threshold", 0,
                       "--vlm-steps", "2", "--trace", tmp_path / "c.json", "--out", tmp_path / "clip.png")
    assert code == 0, err
    (query,) = json.loads((tmp_path / "c.json").read_text())["images"][0]["queries"]
    assert query["error"] is None and query["negative"].startswith("Nudity, Sexual, ")  # threshold 0: every part
    trace = json.loads((tmp_path / "c.json").read_text())
    assert trace["decode_factor"] == 1  # 16 px: CLIP looks at 32
    assert trace["proposer"] == f"CLIPProposer({str(clip_folder)!r}, threshold=0.0, task='nudity')"

    big = [a if a != "16" else "64" for a in RUN]  # CLIP scales 64 px to 32: x0 is decoded at 32 px
    for flag, k in [((), 2), (("--full-decode",), 1)]:
        code, _, err = run(generate.main, capsys, *big, "--model", sd1, "--clip-model", clip_folder, "--vlm-steps", "2",
                           *flag, "--trace", tmp_path / "k.json", "--out", tmp_path / f"k{k}.png")
        assert code == 0, err
        assert json.loads((tmp_path / "k.json").read_text())["decode_factor"] == k


def test_default_proposer_is_clip_and_says_how_to_run_without(sd1, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sd1, "--clip-model", tmp_path / "no-clip-here")
    assert code == 2 and len(err) == 1, err
    for way_out in ("--clip-model DIR", "--vlm-url URL", "--proposer none"):
        assert way_out in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--proposer", "vlm"], "needs --vlm-url"),
    (["--vlm-url", "ftp://host/v1"], "http"),
    (["--vlm-url", "http://localhost:abc/v1"], "bad port"),
    (["--vlm-url", "http://localhost:70000/v1"], "bad port"),
    (["--vlm-url", "http://exa mple.com/v1"], "space"),
    (["--vlm-url", "http://:8000/v1"], "no host"),
    (["--vlm-url", "http://[::1/v1"], "--vlm-url"),
    (["--vlm-url", "http://localhost:8000/v1?key=1"], "query"),
    (["--vlm-steps", "1,x"], "--vlm-steps"),
    (["--vlm-steps", "5"], "out of range"),
    (["--negative-scale", "-1"], "--negative-scale"),
    (["--proposer", "none", "--trace", "t.json"], "--trace: no method of this run reads it (sd)"),
    (["--proposer", "none", "--vlm-url", "http://localhost:8000/v1"], "--vlm-url: no method of this run reads it"),
    (["--proposer", "clip", "--vlm-timeout", "5"], "--vlm-timeout: no method of this run reads it"),
    (["--method", "sld-max", "--negative-scale", "5"], "--negative-scale: no method of this run reads it (sld)"),
    (["--vlm-timeout", "0"], "--vlm-timeout"),
    (["--vlm-timeout", "inf"], "--vlm-timeout: 'inf' is not a finite number"),
    (["--vlm-timeout", "1e300"], "--vlm-timeout 1e+300: must be more than 0"),
    (["--negative-scale", "inf"], "--negative-scale: 'inf' is not a finite number"),
    (["--clip-threshold", "nan"], "--clip-threshold: 'nan' is not a finite number"),
])
def test_bad_vl_dnp_flags(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    code, out, err = run(generate.main, capsys, *RUN, "--model", tmp_path, "--out", tmp_path / "x.png", *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert out == []


def test_a_model_that_cannot_see_the_image_leaves_it_unguarded(sd1, tmp_path, capsys, server):
    """"I cannot see the image." is no finding of nothing: every query fails, exit 3."""
    vlm = server("none", "I cannot see the image.")
    code, _, err = run(generate.main, capsys, *RUN, "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", "1,3",
                       "--out", tmp_path / "blind.png")
    assert code == 3 and "the model declined to answer: I cannot see the image." in err[0], err
    text = image(tmp_path / "blind.png")[1]["parameters"]
    assert "VL-DNP failed queries: 2/2, Dynamic negative: unguarded (all queries failed)" in text
