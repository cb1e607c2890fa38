"""docs/loading.md's "Try it with no weights": `python tests/checkpoints.py OUT_DIR` run from
anywhere writes the random-weight models, and the generate.py commands it prints run on them."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from png_reader import read_png

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # tiny sizes: one thread is faster


def test_the_script_writes_models_and_the_commands_it_prints_run(tmp_path):
    out = tmp_path / "random-models"
    # from a folder other than the repository's, as a user anywhere would run it
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "checkpoints.py"), str(out)], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # the writers' progress bars and notes are silenced
    assert {p.name for p in out.iterdir()} == {"sd1", "sdxl", "clip", "prompts.csv"}
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("  python ")]
    assert [c[1] for c in commands] == ["generate.py", "generate.py", "generate.py", "evaluate.py"]

    for k in (0, 2):  # SD1 and SDXL, no proposer
        command = commands[k][1:]
        assert command[command.index("--proposer") + 1] == "none" and command[command.index("--steps") + 1] == "2"
        png = tmp_path / f"{k}.png"
        run = subprocess.run([sys.executable, *command, "--out", str(png)], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        image, text = read_png(png)
        assert image.shape[2] == 3 and f"Model: {('sd1', 'sd1', 'sdxl')[k]}" in text["parameters"]


def test_a_folder_in_use_is_refused(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "checkpoints.py"), str(tmp_path)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
