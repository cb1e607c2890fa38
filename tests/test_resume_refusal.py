"""evaluate.py refusing to resume a run folder with other settings (evaluation/run_folder.py
settings_difference): the message names the first flag that changed, with its value there and now,
as the command line gives it."""
import pytest

import evaluate

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


def test_other_prompts_are_named_as_the_prompt_file(held, capsys):
    base, argv, csv = held
    text = csv.read_text()
    csv.write_text("prompt\na dog\n")
    try:
        code = evaluate.main(base + [a for pair in argv.items() for a in pair])
    finally:
        csv.write_text(text)
    err = capsys.readouterr().err
    assert code == 2 and "holds a run with other settings (the prompt file: other contents (sha256 " in err
