"""evaluate.py resuming a run folder: refused with other settings (evaluation/run_folder.py
settings_difference), in a message that names the first flag that changed, with its value there and
now, as the command line gives it; resumed row by row when only the prompt file changed, so that
fixing one bad row makes only that row's images."""
import json
import shutil

import pytest

import evaluate
from helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held(sd1, clip_folder, tmp_path_factory):
    """A run folder that made its images, and the arguments that made it."""
    root = tmp_path_factory.mktemp("resume")
    csv = root / "p.csv"
    csv.write_text("prompt\na cat\n")
    base = [str(csv), "--out", str(root / "run"), "--model", str(sd1), "--height", "16", "--width", "16",
            "--device", "cpu", "--quiet", "--metrics", "none", "--no-report", "--proposer", "clip",
            "--clip-model", str(clip_folder)]
    argv = {"--steps": "2", "--methods": "sd,static,vldnp", "--negative-scale": "5", "--vlm-steps": "0,1",
            "--seed": "4"}
    assert evaluate.main(base + [a for pair in argv.items() for a in pair]) == 0
    return base, argv, csv


@pytest.mark.parametrize("change, message", [
    # --steps comes before the methods, whose query steps follow it
    ({"--steps": "3"}, "--steps: 2 there, 3 now"),
    ({"--seed": "5"}, "--seed: 4 there, 5 now"),
    ({"--guidance": "5"}, "--guidance: 7.5 there, 5 now"),
    ({"--negative-scale": "5,7.5"}, "the methods (--methods, --negative-scale, --sld-presets): "
                                    "sd, static (w_neg 5), vldnp (w_neg 5) there, sd, static (w_neg 5), "
                                    "static (w_neg 7.5), vldnp (w_neg 5), vldnp (w_neg 7.5) now"),
    ({"--vlm-steps": "1"}, "--vlm-steps (method vldnp (w_neg 5)): 0,1 there, 1 now"),
    ({"--static-negative": "nudity"}, "--static-negative (method static (w_neg 5)): "),
    ({"--metrics": "nudenet-detector"}, "--metrics: none there, nudenet-detector now"),
])
def test_a_changed_flag_is_named_with_both_values(held, capsys, change, message):
    base, argv, _ = held
    code = evaluate.main(base + [a for pair in {**argv, **change}.items() for a in pair])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"holds a run with other settings ({message}" in err


# A prompt file with a bad row (its seed), and one whose guidance and seed come from the run's options.
ROWS = "prompt,evaluation_seed,evaluation_guidance,categories\na cat,1,7.5,animal\na dog,x,7.5,animal\na cow,,,farm\n"


@pytest.fixture(scope="module")
def rows_made(sd1, tmp_path_factory):
    """A folder with the prompt file ROWS and the run folder that made its images (its bad row skipped)."""
    root = tmp_path_factory.mktemp("rows")
    (root / "p.csv").write_text(ROWS)
    assert evaluate.main([str(a) for a in rows_argv(root, sd1)]) == 0
    return root


def rows_argv(root, sd1):
    return [root / "p.csv", "--out", root / "run", "--model", sd1, "--steps", "2", "--height", "16", "--width", "16",
            "--device", "cpu", "--quiet", "--metrics", "none", "--methods", "sd,static", "--negative-scale", "5"]


@pytest.fixture
def rows(rows_made, sd1, tmp_path):
    """A copy of rows_made's folder, and the command that resumes its run."""
    root = shutil.copytree(rows_made, tmp_path / "copy")
    return root, rows_argv(root, sd1)


def stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}


def records(out):
    return {r["key"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}


def test_fixing_a_bad_row_makes_only_its_images(rows, capsys):
    root, argv = rows
    before = stamps(root / "run")
    assert sorted(before) == ["0_sd.png", "0_static_w5.png", "2_sd.png", "2_static_w5.png"]
    (root / "p.csv").write_text(ROWS.replace("a dog,x", "a dog,2"))
    code, out, err = run(evaluate.main, capsys, *argv)
    assert code == 0, err
    assert "6 images (3 prompts x 2 methods): 4 done before, 2 to make" in out
    after = stamps(root / "run")
    assert {k: v for k, v in after.items() if k in before} == before and set(after) - set(before) == {
        "1_sd.png", "1_static_w5.png"}
    recs = records(root / "run")
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs.values())
    assert (recs["1_sd"]["prompt"], recs["1_sd"]["seed"]) == ("a dog", 2)


@pytest.mark.parametrize("old, new, field, value", [
    ("a cat,1,7.5", "a black cat,1,7.5", "prompt", "a black cat"),
    ("a cat,1,7.5", "a cat,11,7.5", "seed", 11),
    ("a cat,1,7.5", "a cat,1,3", "guidance", 3.0),
])
def test_a_changed_row_is_made_again_and_the_others_are_kept(rows, capsys, old, new, field, value):
    root, argv = rows
    before, made = stamps(root / "run"), records(root / "run")
    (root / "p.csv").write_text(ROWS.replace(old, new))
    code, out, err = run(evaluate.main, capsys, *argv)
    assert code == 0, err
    assert "4 images (2 prompts x 2 methods): 2 done before, 2 to make (2 whose row changed)" in out
    after, recs = stamps(root / "run"), records(root / "run")
    assert [after[k] == before[k] for k in ("0_sd.png", "0_static_w5.png", "2_sd.png", "2_static_w5.png")] == [
        False, False, True, True]
    assert len(recs) == 4  # the new record replaces the old one in records.jsonl
    assert [recs[k][field] for k in ("0_sd", "0_static_w5")] == [value, value]
    assert recs["0_sd"]["finished"] > made["0_sd"]["finished"] and recs["2_sd"] == made["2_sd"]
    code, out, err = run(evaluate.main, capsys, *argv)  # and the run after it has nothing left to do
    assert code == 0 and "4 images (2 prompts x 2 methods): 4 done before, 0 to make" in out, (out, err)


@pytest.mark.parametrize("old, new", [
    # what decides an image is compared, not how the row says it: case 2 was made with --seed 0 plus
    # its case and --guidance 7.5
    ("a cow,,,", "a cow,2,7.5,"),
    ("farm", "cattle"),  # categories label a row in the report; they decide neither its image nor its metrics
])
def test_a_row_that_decides_the_same_image_is_done(rows, capsys, old, new):
    root, argv = rows
    before = stamps(root / "run")
    (root / "p.csv").write_text(ROWS.replace(old, new))
    code, out, err = run(evaluate.main, capsys, *argv)
    assert code == 0 and "4 images (2 prompts x 2 methods): 4 done before, 0 to make" in out, (out, err)
    assert stamps(root / "run") == before


def test_the_report_covers_the_rows_of_the_file_as_it_is_now(rows, capsys):
    """A row taken out of the file keeps its records in records.jsonl, and leaves the report."""
    root, argv = rows
    (root / "p.csv").write_text(ROWS.replace("a cow,,,farm\n", ""))
    reported = []
    code, out, err = run(evaluate.main, capsys, *argv, report=lambda out, recs: reported.append(recs) or {})
    assert code == 0 and "2 images (1 prompts x 2 methods): 2 done before, 0 to make" in out, (out, err)
    assert [[r["key"] for r in recs] for recs in reported] == [["0_sd", "0_static_w5"]]
    assert sorted(records(root / "run")) == ["0_sd", "0_static_w5", "2_sd", "2_static_w5"]


def test_a_run_json_that_names_the_prompt_file_still_resumes(rows, capsys):
    """Folders made before rows were compared one by one hold the file's sha256 and the prompt column
    among the settings; they resume, and a changed row in them is made again as in any other."""
    root, argv = rows
    path = root / "run" / "run.json"
    data = json.loads(path.read_text())
    data["settings"] = {"prompts_sha256": "0" * 64, "prompt_column": None, **data["settings"]}
    path.write_text(json.dumps(data))
    (root / "p.csv").write_text(ROWS.replace("a cow", "a goat"))
    code, out, err = run(evaluate.main, capsys, *argv)
    assert code == 0, err
    assert "4 images (2 prompts x 2 methods): 2 done before, 2 to make (2 whose row changed)" in out


def test_the_prompt_file_is_named_in_run_json_not_compared(rows, capsys):
    root, argv = rows
    data = json.loads((root / "run" / "run.json").read_text())
    assert "prompts_sha256" not in data["settings"] and "prompt_column" not in data["settings"]
    assert len(data["prompts_sha256"]) == 64
