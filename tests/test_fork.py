"""docs/fork.md: the minimal set, copied alone into an empty folder, makes an image from a diffusers folder
with VL-DNP asking a VLM server, by the code the page shows; with the command line's files added,
generate.py does; a leaf the copy lacks is one line; and the sets stay small."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from png_reader import read_png

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "fork.md").read_text()
# The library set's ceiling, issue 20's: the guards against hostile input (checkpoint/bounds.py,
# sampler/memory.py), SDXL's loading, the preview decoders and the --trace file are leaves it leaves out.
MOST_LINES = 3500


def section(heading: str) -> str:
    return PAGE[PAGE.index(heading):]


def blocks(text: str, language: str = "") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


LIBRARY = blocks(section("## The minimal set"))[0].split()
COMMAND_LINE = blocks(section("The command line (`python generate.py`"))[0].split()
EXAMPLE = blocks(section("## The minimal set"), "python")[0]


def copy(files, folder: Path) -> Path:
    for path in files:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, folder / path)
    return folder


def python_in(folder: Path, *argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the copy is importable
    return subprocess.run([sys.executable, *map(str, argv)], cwd=folder, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    return copy(LIBRARY, tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def with_command_line(tmp_path_factory) -> Path:
    return copy(LIBRARY + COMMAND_LINE, tmp_path_factory.mktemp("fork"))


def test_the_library_set_makes_an_image_with_a_vlm_as_the_page_shows(library, sd1, server):
    vlm = server("I can see feet.")
    code = f"MODEL, URL = {str(sd1)!r}, {vlm.url!r}\n" + EXAMPLE.replace("steps=30", "steps=3, height=16, width=16")
    result = python_in(library, "-c", code)
    assert result.returncode == 0, result.stderr
    assert len(vlm.requests) == 3  # the paper's query steps, rescaled to 3 steps: 0, 1 and 2
    assert "Nudity, Sexual, feet." in read_png(library / "beach.png")[1]["parameters"]


def test_the_command_line_set_makes_an_image_with_a_vlm(with_command_line, sd1, server, tmp_path):
    vlm = server("none", "I can see feet.")  # the check before loading, then the query at step 1
    result = python_in(with_command_line, "generate.py", "a person on a beach", "--model", sd1, "--vlm-url", vlm.url,
                       "--vlm-steps", 1, "--steps", 3, "--height", 16, "--width", 16, "--seed", 1, "--device", "cpu",
                       "--quiet", "--out", tmp_path / "x.png", "--trace", tmp_path / "t.json")
    assert result.returncode == 0, result.stderr
    assert len(vlm.requests) == 2 and (tmp_path / "t.json").is_file()
    assert not (tmp_path / "t.filmstrip.png").exists()  # vlm/filmstrip.py is a leaf the set leaves out
    text = read_png(tmp_path / "x.png")[1]["parameters"]
    assert "Method: vldnp" in text and 'Dynamic negative: "Nudity, Sexual, feet."' in text


def test_the_library_set_says_in_one_line_that_it_has_no_edits_loras_sdxl_or_traces(library, sd1, sdxl):
    code = (f"import torch\nfrom methods.vldnp import VLDNP\nfrom sampler.loop import generate\n"
            f"from weights import load_lora, load_pipeline\npipe = load_pipeline({str(sd1)!r})\n"
            "image = torch.zeros(16, 16, 3, dtype=torch.uint8)\n"
            "for call in (lambda: generate(pipe, 'a cat', steps=2, init_image=image), lambda: load_lora(pipe, 'x'),\n"
            f"             lambda: load_pipeline({str(sdxl)!r}),\n"
            "             lambda: VLDNP(proposer=lambda *a: None).plan(pipe, 'a cat').write_trace('t.json')):\n"
            "    try:\n        call()\n    except ValueError as e:\n        print(e)\n")
    result = python_in(library, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{leaf}, which this copy of the project does not have"
        for leaf in ("edit 'img2img' needs sampler/edit.py", "loader 'lora' needs checkpoint/lora.py",
                     "model family 'sdxl' needs checkpoint/sdxl.py", "output 'trace' needs vlm/trace.py")]


VLM = ["--vlm-url", "http://127.0.0.1:9/v1"]


@pytest.mark.parametrize("argv, missing", [
    (["--sampler", "dpm++2m", *VLM], "sampler 'dpm++2m' needs sampler/dpm.py"),
    (["--proposer", "none"], "method 'sd' needs methods/sd.py"),
    (["--method", "safree"], "method 'safree' needs methods/safree.py"),
    (["--proposer", "clip"], "proposer 'clip' needs vlm/clip_proposer.py"),
    (["--preview-decoder", "taesd", *VLM], "preview decoder 'taesd' needs checkpoint/taesd.py"),
    (["--init-image", "in.png", *VLM], "option '--init-image' needs cli/edit.py"),
])
def test_a_leaf_the_copy_lacks_is_one_line(with_command_line, sd1, tmp_path, argv, missing):
    result = python_in(with_command_line, "generate.py", "a cat", "--model", sd1, "--steps", 2, "--device", "cpu",
                       "--out", tmp_path / "x.png", *argv)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {missing}, which this copy of the project does not have"], result.stderr


def test_a_copy_without_the_vlm_client_says_so_for_vlm_url(sd1, tmp_path):
    fork = copy([f for f in LIBRARY + COMMAND_LINE if f != "vlm/client.py"], tmp_path)
    result = python_in(fork, "generate.py", "a cat", "--model", sd1, "--device", "cpu", "--out", tmp_path / "x.png", *VLM)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: proposer 'vlm' needs vlm/client.py, which this copy of the project does not have"], result.stderr


def test_the_sets_are_small():
    lines = lambda files: sum(len((ROOT / path).read_text().splitlines()) for path in files)
    assert lines(LIBRARY) <= MOST_LINES, f"the minimal set is {lines(LIBRARY)} lines"
    assert lines(COMMAND_LINE) <= 975, f"the command line adds {lines(COMMAND_LINE)} lines"


def leaf_tables() -> dict[str, dict[str, str]]:
    """Every table of leaves in the code, "file.py:NAME" -> {leaf: its module's file}, read without importing."""
    tables = {}
    for path in sorted(ROOT.rglob("*.py")):
        if {"tests", "benchmarks"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.parse(path.read_text()).body:
            call = getattr(node, "value", None)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(call, ast.Call) \
                    and getattr(call.func, "id", None) == "Leaves":
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                entries = ast.literal_eval(call.args[1])
                tables[f"{path.relative_to(ROOT)}:{target.id}"] = {
                    leaf: entry.partition(":")[0].replace(".", "/") + ".py" for leaf, entry in entries.items()}
    return tables


def documented_leaves() -> list[tuple[str, list[str], str]]:
    """(table, leaves, file cell) per row of the page's table of leaves; a blank table cell is the row above's."""
    rows, table = [], None
    for line in section("## The leaves").split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] == "table" or set(cells[0]) <= {"-"} and cells[0]:
            continue
        table = cells[0].strip("`") or table
        rows.append((table, re.findall(r"`([^`]+)`", cells[1]), cells[2]))
    return rows


def test_the_table_of_leaves_names_each_leaf_under_its_table():
    """Each leaf the page lists is in the table it is listed under, with its file; each leaf in the code is listed."""
    tables, rows = leaf_tables(), documented_leaves()
    for table, leaves, files in rows:
        if table == "—":
            continue
        assert table in tables, f"docs/fork.md names {table}, which is no table of leaves"
        for leaf in leaves:
            assert leaf in tables[table], f"docs/fork.md lists {leaf!r} under {table}, which has no such leaf"
            assert "…" in files or f"`{tables[table][leaf]}`" in files, f"{leaf!r}: {tables[table][leaf]} not in its row"
    for table, entries in tables.items():
        listed = [(leaves, files) for t, leaves, files in rows if t == table]
        for leaf, file in entries.items():
            assert file in LIBRARY or any(leaf in leaves or f"`{file}`" in files for leaves, files in listed), \
                f"{table}'s leaf {leaf!r} ({file}) is missing from docs/fork.md's table of leaves"


def test_the_recipe_for_a_sampler_names_all_that_the_protocol_asks():
    from sampler.base import Sampler
    asked = set(Sampler.__annotations__) | {name for name, v in vars(Sampler).items()
                                            if callable(v) and not name.startswith("_")}
    recipe = re.search(r"^- \*\*A sampler\*\*:(.*?)^- ", PAGE, flags=re.M | re.S)[1]
    assert asked - set(re.findall(r"`(\w+)`", recipe)) == set()
