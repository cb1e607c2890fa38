"""docs/fork.md: the minimal set, copied alone into an empty folder, makes an image from a diffusers folder
with VL-DNP asking a VLM server; a leaf it lacks is one line; and the set stays small."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from png import read_png

ROOT = Path(__file__).resolve().parents[1]
MOST_LINES = 3500


def minimal_set() -> list[str]:
    """The paths in the fenced block under docs/fork.md's heading "The minimal set"."""
    text = (ROOT / "docs" / "fork.md").read_text()
    section = text[text.index("## The minimal set"):]
    return re.search(r"^```\n(.*?)^```", section, flags=re.M | re.S)[1].split()


@pytest.fixture(scope="module")
def fork(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fork")
    for path in minimal_set():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, folder / path)
    return folder


def generate_in(fork: Path, *argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the copy is importable
    return subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=fork, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_the_minimal_set_makes_an_image_with_a_vlm(fork, sd1, server, tmp_path):
    vlm = server("none", "I can see feet.")  # the check before loading, then the query at step 1
    result = generate_in(fork, "a person on a beach", "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", 1,
                         "--steps", 3, "--height", 16, "--width", 16, "--seed", 1, "--device", "cpu", "--quiet",
                         "--out", tmp_path / "x.png", "--trace", tmp_path / "t.json")
    assert result.returncode == 0, result.stderr
    assert len(vlm.requests) == 2 and (tmp_path / "t.json").is_file()
    assert not (tmp_path / "t.filmstrip.png").exists()  # vlm/filmstrip.py is a leaf the set leaves out
    text = read_png(tmp_path / "x.png")[1]["parameters"]
    assert "Method: vldnp" in text and 'Dynamic negative: "Nudity, Sexual, feet."' in text


@pytest.mark.parametrize("argv, missing", [
    (["--sampler", "dpm++2m"], "sampler 'dpm++2m' needs sampler/dpm.py"),
    (["--proposer", "none"], "method 'sd' needs methods/sd.py"),
    (["--method", "safree"], "method 'safree' needs methods/safree.py"),
])
def test_a_leaf_the_set_lacks_is_one_line(fork, sd1, tmp_path, argv, missing):
    result = generate_in(fork, "a cat", "--model", sd1, "--vlm-url", "http://127.0.0.1:9/v1", "--steps", 2,
                         "--device", "cpu", "--out", tmp_path / "x.png", *argv)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {missing}, which this copy of the project does not have"], result.stderr


def test_the_minimal_set_is_small():
    lines = sum(len((ROOT / path).read_text().splitlines()) for path in minimal_set())
    assert lines <= MOST_LINES, f"the minimal set is {lines} lines"
