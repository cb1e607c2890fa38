"""The README and docs/*.md against the code: every file they point at exists, the README's Python
example runs as written, and every command uses flags its script's parser has."""
import ast
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A backticked name is a path in this repository when it ends in .py or starts with one of these.
REPO_FOLDERS = ("benchmarks", "checkpoint", "cli", "distillation", "docs", "evaluation", "model", "sampler", "tests",
                "vlm")
# The argv after the script that prints each documented script's options.
HELP = {
    "generate.py": [["--help"]],
    "evaluate.py": [["--help"]],
    "distill.py": [["collect", "--help"], ["train", "--help"]],
    "weights.py": [["--help"], ["export", "--help"]],
    "benchmarks/bench.py": [["--help"]],
    "benchmarks/load.py": [["--help"]],
    "benchmarks/precision.py": [["--help"]],
    "benchmarks/vae_decode.py": [["--help"]],
    "benchmarks/memory_peaks.py": [["--help"]],
    "benchmarks/vldnp_cost.py": [["--help"]],
    "benchmarks/sdxl.py": [["--help"]],
}


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", without_code_blocks(text), flags=re.M)}


def broken_links(text: str, doc: Path) -> list[str]:
    """Relative links and backticked repository paths in `text` (the contents of `doc`) that do
    not exist, and links to headings that the linked file lacks."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(text)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"{doc.name}: link to {target}: no such file or folder")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text() if path else text):
            problems.append(f"{doc.name}: link to {target}: no such heading")
    for code in re.findall(r"`([^`\n]+)`", without_code_blocks(text)):
        if " " in code or code.startswith("-") or NAME.fullmatch(code):  # names: missing_names
            continue
        if (code.endswith(".py") or code.split("/")[0] in REPO_FOLDERS) and not (ROOT / code).exists():
            problems.append(f"{doc.name}: `{code}`: no such file or folder in the repository")
    return problems


# `file.py:function` or `file.py:Class.method`, as the tour names the code
NAME = re.compile(r"([\w/]+\.py):([\w.]+)")


def defined_names(path: Path) -> set[str]:
    """The dotted names of the functions, classes and methods, and module-level assignments, in `path`."""
    names = set()

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + child.name)
                visit(child, prefix + child.name + ".")
            elif isinstance(child, (ast.Assign, ast.AnnAssign)) and not prefix:
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))

    visit(ast.parse(path.read_text()), "")
    return names


def missing_names(text: str, doc: Path) -> list[str]:
    """Every backticked `file.py:name` in `text` names a file of the repository that defines it."""
    problems = []
    for code in re.findall(r"`([^`\n]+)`", text):
        m = NAME.fullmatch(code)
        if not m:
            continue
        file = ROOT / m[1]
        if not file.is_file():
            problems.append(f"{doc.name}: `{code}`: no such file {m[1]}")
        elif m[2] not in defined_names(file):
            problems.append(f"{doc.name}: `{code}`: {m[1]} defines no {m[2]}")
    return problems


def commands(text: str):
    """(script, words after it) for every `python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...`."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        for m in re.finditer(r"(?<![\w/.-])(python3?|torchrun) +([^`\n]*)", line):
            words = shlex.split(m.group(2), comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if not scripts or (m.group(1) != "torchrun" and scripts[0] != 0):
                continue  # python -m pytest, python -c ...
            yield words[scripts[0]], words[scripts[0] + 1:]


@functools.cache
def all_options() -> dict[str, dict[str, set[str] | None]]:
    """Each documented script's flags, each with its choices (None when it takes any value), read
    from --help; the scripts start all at once, since each spends its time importing torch."""
    runs = [(script, argv, subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            for script, argvs in HELP.items() for argv in argvs]
    found = {script: {} for script in HELP}
    for script, argv, run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{script} {' '.join(argv)}: {err}"
        for flag, choices in re.findall(r"(--[\w-]+)(?: \{([^}]*)\})?", out):
            found[script][flag] = set(choices.split(",")) if choices else found[script].get(flag)
    return found


def bad_flags(text: str, doc: Path) -> list[str]:
    """Commands whose script is missing, or whose flags (or their fixed choices) its parser lacks,
    and backticked `--flags` that no documented script has."""
    problems = []
    for script, words in commands(text):
        if not (ROOT / script).exists():
            problems.append(f"{doc.name}: {script}: no such script")
            continue
        flags = [(w.split("=")[0], words[i + 1] if i + 1 < len(words) else None)
                 for i, w in enumerate(words) if w.startswith("--")]
        if flags and script not in HELP:
            problems.append(f"{doc.name}: {script} {words}: a script with flags this test does not know; add it to HELP")
            continue
        for flag, value in flags:
            known = all_options()[script]
            if flag not in known:
                problems.append(f"{doc.name}: {script} has no {flag}")
            elif known[flag] and value is not None and not value.startswith("-") and value not in known[flag]:
                problems.append(f"{doc.name}: {script} {flag} {value}: not one of {sorted(known[flag])}")
    every_flag = set().union(*all_options().values())
    for code in re.findall(r"`(--[\w-]+)[^`]*`", without_code_blocks(text)):
        if code not in every_flag:
            problems.append(f"{doc.name}: `{code}` is no flag of {', '.join(HELP)}")
    return problems


def python_example(readme: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)
    assert len(blocks) == 1, f"the README should have one Python example, it has {len(blocks)}"
    return blocks[0]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_and_paths_exist(doc):
    assert broken_links(doc.read_text(), doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_named_code_exists(doc):
    assert missing_names(doc.read_text(), doc) == []


def test_the_tour_stops_at_every_station():
    """tokenizer -> text encoder -> initial noise (or an image's, img2img) -> UNet step -> guidance -> DDIM update
    -> hooks -> VAE -> PNG"""
    named = {m[0] for m in re.findall(r"`(([\w/]+\.py):[\w.]+)`", (ROOT / "docs" / "tour.md").read_text())}
    for station in ["model/tokenizer.py:Tokenizer.__call__", "model/clip.py:CLIPTextModel.forward",
                    "sampler/schedule.py:randn", "sampler/edit.py:start", "model/unet.py:UNet.forward", "sampler/loop.py:guide",
                    "sampler/ddim.py:DDIM.step", "sampler/loop.py:StepState", "model/vae.py:AutoencoderKL.decode",
                    "png.py:write_png"]:
        assert station in named


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_command_flags_exist(doc):
    assert bad_flags(doc.read_text(), doc) == []


def test_readme_python_example_runs(sd1, tmp_path):
    """The example as written, with only the model source swapped for a small random-weight folder."""
    code, n = re.subn(r"load_pipeline\((['\"]).*?\1", lambda _: f"load_pipeline({str(sd1)!r}",
                      python_example((ROOT / "README.md").read_text()), count=1)
    assert n == 1, "the README's example should load a model with load_pipeline(\"...\")"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # tiny sizes: one thread is faster
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_checks_catch_mutated_docs():
    doc = ROOT / "README.md"
    readme = doc.read_text()

    def new_problems(check, added):
        return [p for p in check(readme + added, doc) if p not in check(readme, doc)]

    assert new_problems(broken_links, "\nSee `sampler/nowhere.py`, [x](docs/nowhere.md), [y](docs/loading.md#nowhere).\n") == [
        "README.md: link to docs/nowhere.md: no such file or folder",
        "README.md: link to docs/loading.md#nowhere: no such heading",
        "README.md: `sampler/nowhere.py`: no such file or folder in the repository"]
    assert new_problems(missing_names, "\nSee `sampler/loop.py:no_such_function`, `sampler/nowhere.py:generate`, "
                                       "`sampler/loop.py:Guidance.rows`.\n") == [
        "README.md: `sampler/loop.py:no_such_function`: sampler/loop.py defines no no_such_function",
        "README.md: `sampler/nowhere.py:generate`: no such file sampler/nowhere.py"]
    assert new_problems(bad_flags, "\n    python generate.py \"a cat\" --no-such-flag 3 --sampler heun\n"
                                   "    python nowhere.py --seed 1\n"
                                   "Use `--no-such-option`.\n") == [
        "README.md: generate.py has no --no-such-flag",
        "README.md: generate.py --sampler heun: not one of ['ddim', 'dpm++2m', 'euler', 'euler-a']",
        "README.md: nowhere.py: no such script",
        "README.md: `--no-such-option` is no flag of " + ", ".join(HELP)]
