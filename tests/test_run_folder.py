"""evaluate.py resuming a run folder that was tampered with (evaluation/run_folder.py). A line of a
records file that is not a record evaluate.py writes is skipped as a torn line is, with one warning
naming its file and line, and its job is made again; a run.json that cannot be read, or a folder
where a file of the run belongs, is refused in one line, exit 2. Nothing already made is lost."""
import json
import shutil
from pathlib import Path

import pytest

import evaluate
from evaluation.run_folder import read_records, record_problem
from helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ["0_sd", "0_static_w5", "1_sd", "1_static_w5"]
DROP = object()


@pytest.fixture(scope="module")
def made(sd1, tmp_path_factory):
    """A run folder that made its 4 images and its report, and the command that made it."""
    root = tmp_path_factory.mktemp("made")
    csv = root / "p.csv"
    csv.write_text("prompt\na cat\na dog\n")
    argv = [csv, "--model", sd1, "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--quiet",
            "--metrics", "none", "--methods", "sd,static", "--negative-scale", "5"]
    assert evaluate.main([str(a) for a in [*argv, "--out", root / "run"]]) == 0
    return root / "run", argv


@pytest.fixture
def folder(made, tmp_path):
    """A copy of the made run folder, and the command that resumes it."""
    source, argv = made
    out = shutil.copytree(source, tmp_path / "run")
    return out, [*argv, "--out", out]


def lines_of(path):
    return path.read_text(encoding="utf-8").splitlines()


def edit(**fields):
    """A records line: the record with `fields` changed (DROP: removed)."""
    def line(record):
        record = {**record, **fields}
        return json.dumps({k: v for k, v in record.items() if v is not DROP})
    return line


@pytest.mark.parametrize("tamper, why", [
    (edit(image=DROP), '"image"'),
    (edit(image=5), '"image"'),
    (edit(image="../run.json"), '"image"'),
    (edit(job="x"), '"job"'),
    (edit(key=["0_static_w5"]), '"key"'),
    (edit(key=None), '"key"'),
    (edit(status=DROP), '"status"'),
    (edit(metrics="oops"), '"metrics"'),
    (edit(metrics={"clip_score": "high"}), '"clip_score"'),
    (edit(metrics={"clip_score": float("nan")}), "NaN"),
    (edit(metrics={"clip_score": 1}, finished=1e400), "Infinity"),
    (edit(metrics={"unsafe": "yes"}), '"unsafe"'),
    (edit(metrics={"nudenet_detections": [{"class": "FEET_EXPOSED", "score": "x"}]}), '"nudenet_detections"'),
    (edit(scale="7.5"), '"scale"'),
    (edit(height="x"), '"height"'),
    (edit(case=[0]), '"case"'),
    (edit(prompt=None), '"prompt"'),
    (edit(method=5), '"method"'),
    (lambda record: "[" * 100000 + "]" * 100000, "nested too deeply"),
    (lambda record: "[1, 2]", "not a JSON object"),
    (lambda record: json.dumps(record)[:-9], "not JSON"),  # torn, in the middle of the file
])
def test_a_record_that_evaluate_does_not_write_is_skipped_and_its_job_made_again(folder, capsys, tamper, why):
    out, argv = folder
    records = out / "records.jsonl"
    lines = lines_of(records)
    lines[1] = tamper(json.loads(lines[1]))
    records.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept = {k: (out / f"images/{k}.png").stat().st_mtime_ns for k in KEYS if k != "0_static_w5"}

    code, stdout, err = run(evaluate.main, capsys, *argv)
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: {records}, line 2: ") and why in err[0], err
    assert "4 images (2 prompts x 2 methods): 3 done before, 1 to make" in stdout
    merged = [json.loads(line) for line in lines_of(records)]
    assert [r["key"] for r in merged] == KEYS and all(r["status"] == "ok" for r in merged)
    assert {k: (out / f"images/{k}.png").stat().st_mtime_ns for k in kept} == kept  # not made again
    assert "| static | 5 | 2 | 0 |" in (out / "summary.md").read_text(encoding="utf-8")


def test_a_records_why_an_image_is_unguarded_is_shown_not_obeyed(folder, capsys):
    """The closing warning names why images were made without their guard, from the records: a line
    edited to hold terminal escapes there is still a record, and its text is shown as escapes."""
    out, argv = folder
    records = out / "records.jsonl"
    lines = lines_of(records)
    lines[1] = edit(unguarded="\x1b]0;owned\x07\x1b[2J")(json.loads(lines[1]))
    records.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run(evaluate.main, capsys, *argv)
    assert code == 3 and len(err) == 1 and err[0].startswith("warning: 1 image was made without the guard"), err
    assert "(\\x1b]0;owned\\x07\\x1b[2J)" in err[0] and "\x1b" not in err[0], err


def test_a_bad_line_of_another_ranks_file_is_named_once(folder, capsys):
    """A stray rank's file: its bad lines are skipped, named in one warning, and the jobs the merged
    file has are not made again."""
    out, argv = folder
    record = json.loads(lines_of(out / "records.jsonl")[0])
    (out / "records.rank7.jsonl").write_text("\n".join([json.dumps({**record, "finished": "late"}),
                                                        json.dumps({**record, "job": -1})]) + "\n")
    code, stdout, err = run(evaluate.main, capsys, *argv)
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: {out / 'records.rank7.jsonl'}, line 1: ") and '"finished"' in err[0]
    assert "(and 1 more such line)" in err[0]
    assert "3 done before" not in " ".join(stdout) and "4 done before, 0 to make" in " ".join(stdout)


def real_settings(out):
    return json.loads((out / "run.json").read_text())["settings"]


@pytest.mark.parametrize("text, message", [
    (lambda out: '{"settings": null}', "run.json is damaged (no settings)"),
    (lambda out: "[" * 100000 + "]" * 100000, "run.json is damaged"),
    (lambda out: "[]", "run.json is damaged (no settings)"),
    (lambda out: "\udcff", "run.json is damaged"),
    # settings that are a dict but not as evaluate.py writes them: the difference is still named
    (lambda out: json.dumps({"settings": {**real_settings(out), "methods": [5, None]}}),
     "holds a run with other settings (the methods (--methods, --negative-scale, --sld-presets): "),
    (lambda out: json.dumps({"settings": {**real_settings(out), "methods": "sd"}}),
     "holds a run with other settings (--methods: sd there, "),
    (lambda out: json.dumps({"settings": {**real_settings(out), "metrics": [1]}}),
     "holds a run with other settings (--metrics: 1 there, "),
])
def test_a_damaged_run_json_is_one_line(folder, capsys, text, message):
    out, argv = folder
    (out / "run.json").write_text(text(out), encoding="utf-8", errors="surrogateescape")
    before = sorted(p.name for p in (out / "images").iterdir())
    code, _, err = run(evaluate.main, capsys, *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in (out / "images").iterdir()) == before


@pytest.mark.parametrize("path", ["images/0_sd.png", "records.jsonl", "records.rank3.jsonl", "images", "summary.md",
                                  "summary.csv", "pareto.svg", "index.html"])  # the report's: a traceback, after
def test_a_folder_where_the_run_keeps_a_file_is_one_line(folder, capsys, path):
    out, argv = folder
    target = out / path
    if target.is_dir():
        shutil.rmtree(target)
        target.write_text("")
    else:
        target.unlink(missing_ok=True)
        target.mkdir()
    code, stdout, err = run(evaluate.main, capsys, *argv)
    assert code == 2 and len(err) == 1 and f"--out {out}: {path} is not a " in err[0], err
    assert "Errno" not in err[0] and not any("to make" in line for line in stdout)


def test_the_records_evaluate_writes_are_records(sd1, tmp_path, capsys):
    """What the reader trusts is what run.py writes: an ok record, and a failed one (an init_image
    that is not a PNG), of a run and of the committed example report."""
    (tmp_path / "not.png").write_bytes(b"\n")
    (tmp_path / "p.csv").write_text("prompt,init_image\na cat,\na dog,not.png\n")
    code, _, err = run(evaluate.main, capsys, tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1,
                       "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--quiet", "--metrics",
                       "none", "--methods", "sd", "--no-report")
    assert code == 1, err
    for path, statuses in [(tmp_path / "run" / "records.jsonl", ["ok", "failed"]),
                           (Path(__file__).parents[1] / "docs" / "example-report" / "records.jsonl", ["ok"] * 36)]:
        bad = []
        assert [r["status"] for r in read_records(path, record_problem, bad)] == statuses and bad == []
