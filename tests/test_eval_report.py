"""The evaluation report: summary.md/.csv, the Pareto SVG, and index.html opened in headless
Chromium (images loaded, traces shown, untrusted prompts escaped)."""
import csv
import html
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from evaluation.metrics import NO_METRICS, PROTOCOL, aggregate, protocol
from evaluation.plot import pareto_svg
from evaluation.report import write_report
from png import write_png
from png_reader import read_png

HOSTILE = ("""<script>document.body.dataset.pwned = "1"</script>"""
           """<img src=x onerror="document.body.dataset.pwned='1'"> & 'x'""")
PROMPTS = ["a person on a beach", HOSTILE, "a castle at dusk"]
METHODS = [("sd", None), ("static", 7.5), ("vldnp", 0.0), ("vldnp", 7.5), ("vldnp", 15.0)]
SVG = "{http://www.w3.org/2000/svg}"


def make_run(run_dir, methods=METHODS):
    """Records as evaluate.py writes them, with real PNGs: every prompt by every method, one failed
    image, and one record whose image file is gone."""
    (run_dir / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    records = []
    for case, prompt in enumerate(PROMPTS):
        for k, (method, scale) in enumerate(methods):
            name = f"images/{case:05d}-{method}-{scale}.png"
            write_png(run_dir / name, torch.randint(0, 256, (24, 32, 3), generator=g, dtype=torch.uint8))
            p = (case * len(methods) + k) / (3 * len(methods))
            negatives = {"sd": [], "static": "nudity, nude, naked"}.get(method) or [
                {"step": 5, "negative": f"Nudity, Sexual, buttocks {case}-{k}.", "error": None},
                {"step": 9, "negative": None, "error": "VLM timed out after 30 s <b>"}]
            records.append({
                "case": case, "prompt": prompt, "seed": 40 + case, "guidance": 7.5, "categories": ["sexual"],
                "method": method, "scale": scale, "image": name, "negatives": negatives,
                "metrics": {"p_unsafe": p, "unsafe": p >= 0.6, "clip_score": 20.0 + k + case,
                            "nudenet_detections": [{"class": "BUTTOCKS_EXPOSED", "score": p, "box": [1, 2, 3, 4]}]},
                "timings": {"sampling": 1.5, "metrics": 0.25, "total": 1.75}, "status": "ok", "error": None})
    records[3].update(status="failed", error="sampling: NaN at step 12", metrics={}, image=None)
    (run_dir / records[-1]["image"]).unlink()
    return records


def test_summary_files(tmp_path):
    records = make_run(tmp_path)
    paths = write_report(tmp_path, records, protocol="PROTOCOL TEXT <b>")
    assert {p.name for p in paths.values()} == {"summary.md", "summary.csv", "pareto.svg", "index.html"}
    rows = aggregate(records)
    assert len(rows) == len(METHODS)

    table = list(csv.DictReader(paths["csv"].open(encoding="utf-8")))
    assert [(r["method"], r["scale"]) for r in table] == [(m, "" if s is None else str(s)) for m, s in METHODS]
    for line, row in zip(table, rows):
        assert int(line["n"]) == row["n"] and int(line["failures"]) == row["failures"]
        assert float(line["asr"]) == row["asr"] and float(line["clip_score"]) == row["clip_score"]
    assert table[3]["failures"] == "1" and table[3]["n"] == "2"

    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| vldnp | 7.5 | 2 | 1 |" in md and md.rstrip().endswith("PROTOCOL TEXT <b>")
    assert PROTOCOL.split(".")[0] in write_report(tmp_path, records)["markdown"].read_text(encoding="utf-8")

    svg = ET.parse(paths["plot"]).getroot()  # well-formed XML
    assert len(svg.findall(f".//{SVG}polyline")) == 1  # only vldnp has several scales
    labels = [t.text for t in svg.iter(f"{SVG}text")]
    assert {"0", "7.5", "15", "sd", "static", "vldnp"} <= set(labels)


def test_the_csv_counts_the_images_made_without_their_guard(tmp_path):
    """--allow-vlm-failures: an unguarded image's metrics are in its method's row. summary.md says so in
    words; summary.csv, the table scripts read, said nothing, and its rows passed for guarded ones."""
    records = make_run(tmp_path)
    records[4]["unguarded"] = records[9]["unguarded"] = "every VL-DNP query failed"  # vldnp 15, twice
    records[3]["unguarded"] = "every VL-DNP query failed"  # a failed image: in no metric, so not counted
    table = list(csv.DictReader(write_report(tmp_path, records)["csv"].open(encoding="utf-8")))
    assert [(r["method"], r["scale"], r["unguarded"]) for r in table] == [
        ("sd", "", "0"), ("static", "7.5", "0"), ("vldnp", "0.0", "0"), ("vldnp", "7.5", "0"), ("vldnp", "15.0", "2")]


def test_report_with_no_metrics(tmp_path):
    records = make_run(tmp_path)
    for r in records:
        r["metrics"] = {}
    paths = write_report(tmp_path, records)
    assert "no image has both metrics" in paths["plot"].read_text()
    assert "| sd | – | 3 | 0 | – | – | – |" in paths["markdown"].read_text(encoding="utf-8")


def test_a_method_named_with_markup_stays_in_its_cell_of_summary_md(tmp_path):
    """A records file edited by hand can name a method anything: HTML, a newline and a `|` stay text
    in its one cell, as index.html escapes them."""
    records = make_run(tmp_path, [("sd", None), ("static", 7.5)])
    for r in records:
        r["method"] = r["method"].replace("sd", "<b>sd</b>|x\n# h")
    run = {**RUN, "settings": {**RUN["settings"], "model": "m\n# <i>x</i>"}}
    md = write_report(tmp_path, records, run=run)["markdown"].read_text(encoding="utf-8")
    assert "| &lt;b&gt;sd&lt;/b&gt;\\|x\\n# h | – | 3 | 0 |" in md
    assert "- Model: m\\n# &lt;i&gt;x&lt;/i&gt; (float16)" in md
    assert "<b>" not in md and "<i>" not in md and "\n# " not in md


RUN = {"settings": {"model": "CompVis/stable-diffusion-v1-4", "dtype": "float16", "sampler": "dpm++2m", "steps": 50,
                    "guidance": 7.5, "height": None, "width": None},
       "prompts": "/data/i2p/nudity.csv", "prompts_used": 3,
       "skipped_rows": [{"line": 7, "reason": "the prompt is empty"}, {"line": 9, "reason": "the prompt is empty"}]}


def test_the_report_says_how_the_images_were_made(tmp_path):
    records = make_run(tmp_path)
    for r in records:
        r.update(width=512, height=512, prompt_truncated=r["prompt"] == HOSTILE)
        r["guidance"] = 12.0 if r["case"] == 2 else 7.5  # the prompt file's own, for one prompt
    paths = write_report(tmp_path, records, run=RUN)
    md = paths["markdown"].read_text(encoding="utf-8")
    facts = ["Model: CompVis/stable-diffusion-v1-4 (float16)", "Sampler: DPM++ 2M, 50 steps",
             "Guidance: CFG 7.5; the prompt file's own where it gives one (12)", "Size: 512×512",
             "Prompts: nudity.csv, 3 used, 2 rows of the file skipped (run.json lists them, each with its line and "
             "why), 1 longer than the text encoder's 75 tokens, cut there as diffusers does"]
    for fact in facts:
        assert f"- {fact}" in md
    page = paths["html"].read_text(encoding="utf-8")
    for fact in facts:
        label, value = fact.split(": ", 1)
        assert f"<tr><th>{label}</th><td>{html.escape(value)}" in page


def test_with_no_metric_the_protocol_says_so(tmp_path):
    records = make_run(tmp_path)
    for r in records:
        r["metrics"] = {}
    assert protocol(clip_model=None, nudenet=None) == NO_METRICS
    paths = write_report(tmp_path, records, protocol=protocol(clip_model=None, nudenet=None), run=RUN)
    assert paths["markdown"].read_text(encoding="utf-8").endswith(f"## Protocol\n\n{NO_METRICS}\n")
    assert f'<pre class="protocol">{html.escape(NO_METRICS)}</pre>' in paths["html"].read_text(encoding="utf-8")
    assert NO_METRICS in write_report(tmp_path, records, protocol="")["markdown"].read_text(encoding="utf-8")


class DOM(HTMLParser):
    """The parts of a dumped DOM the test checks: body attributes, tags, table classes, text."""

    def __init__(self, text):
        super().__init__()
        self.body, self.tags, self.tables, self.text = {}, [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "body":
            self.body = attrs
        if tag == "table":
            self.tables.append(attrs.get("class"))

    def handle_data(self, data):
        self.text.append(data)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail("chromium not found: the report test needs a real browser (apt-get install chromium)")


def test_html_report_in_headless_chromium(tmp_path):
    run_dir = tmp_path / "run"
    records = make_run(run_dir)
    page = write_report(run_dir, records)["html"]
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,4000",
               "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = DOM(result.stdout)
    text = " ".join(dom.text)

    # The page's script ran, and every image that exists loaded; the one deleted is named.
    shown = len(records) - 1  # the failed record has no image
    assert dom.body["data-images-total"] == str(shown)
    assert (dom.body["data-images-loaded"], dom.body["data-images-missing"]) == (str(shown - 1), "1")
    assert f"image missing: {records[-1]['image']}" in text
    assert dom.tags.count("img") == shown - 1

    # The summary table, the plot, the protocol.
    assert dom.tables.count("summary") == 1 and dom.tables.count("grid") == 1
    assert "svg" in dom.tags and "polyline" in dom.tags
    assert "older NudeNet classifier" in text

    # Every VL-DNP trace, with its errors; fixed negatives; the failure.
    for r in records:
        if r["method"] == "vldnp":
            assert r["negatives"][0]["negative"] in text
    assert "VLM timed out after 30 s <b>" in text and "negative: nudity, nude, naked" in text
    assert "failed: sampling: NaN at step 12" in text

    # The hostile prompt is text on the page, never markup: no script of it ran.
    assert HOSTILE in text
    assert "data-pwned" not in result.stdout
    assert dom.tags.count("script") == 1
    assert re.search(r"<th[^>]*>method</th>", result.stdout)


SWEEP = [("sd", None), ("static", 7.5), ("vldnp", 0.0), ("vldnp", 2.5), ("vldnp", 7.5), ("vldnp", 15.0),
         ("sld-max", None)]
MEASURE = """<script>
const box = document.querySelector(".grid-box") || document.querySelector("table.grid"),
  page = document.documentElement;
Object.assign(document.body.dataset, {pageScroll: page.scrollWidth, pageWidth: page.clientWidth,
  gridScroll: box.scrollWidth, gridWidth: box.clientWidth,
  image: Math.round(document.querySelector("td.cell img").getBoundingClientRect().width)});
</script></body>"""


@pytest.mark.parametrize("columns, fits", [(7, True), (20, False)])
def test_the_grid_fits_a_1280_px_window(tmp_path, columns, fits):
    """A sweep of 7 columns fits a 1280 px window, the images shrunk; 20 do not, and then the grid
    scrolls in its own box, never the page."""
    methods = (SWEEP + [("vldnp", float(w)) for w in range(20, 33)])[:columns]
    run_dir = tmp_path / "run"
    records = make_run(run_dir, methods)
    records[0]["prompt"] = "averylongwordwithoutanyspace" * 40  # wraps, and widens nothing
    page = write_report(run_dir, records)["html"]
    probe = run_dir / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE), encoding="utf-8")
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=5000",
               "--dump-dom", probe.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    size = {k: int(v) for k, v in DOM(result.stdout).body.items() if k in
            ("data-page-scroll", "data-page-width", "data-grid-scroll", "data-grid-width", "data-image")}
    assert size["data-page-scroll"] <= size["data-page-width"] <= 1280, size  # the page never scrolls sideways
    assert (size["data-grid-scroll"] <= size["data-grid-width"]) == fits, size
    assert 90 <= size["data-image"] <= 192, size


def method_colours(svg_text: str) -> dict[str, str]:
    return {g.get("data-method"): g.get("fill") for g in ET.fromstring(svg_text).iter(f"{SVG}g")}


def test_every_method_has_a_colour_of_its_own():
    rows = [{"method": f"method-{i}", "scale": None, "asr": i / 40, "clip_score": 20.0 + i} for i in range(30)]
    svg = pareto_svg(rows)
    colours = method_colours(svg)
    assert len(colours) == 30 and len(set(colours.values())) == 30
    assert {colours["method-0"], colours["method-7"]} == {"#0072B2", "#882255"}  # no cycling back
    root = ET.fromstring(svg)
    assert {el.tag.removeprefix(SVG) for g in root.iter(f"{SVG}g") for el in g} >= {"circle", "rect", "polygon"}


EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example-report"


def test_the_committed_example_report():
    """docs/example-report, as docs/make_example_report.py makes it: a colour per method, no path
    of the machine that made it, one records file."""
    colours = method_colours((EXAMPLE / "pareto.svg").read_text(encoding="utf-8"))
    assert len(colours) >= 8 and len(set(colours.values())) == len(colours)
    for path in EXAMPLE.rglob("*"):
        if path.suffix == ".png":
            text = " ".join(read_png(path)[1].values())
        elif path.is_file():
            text = path.read_text(encoding="utf-8")
        else:
            continue
        assert "/tmp" not in text and str(EXAMPLE.parent.parent) not in text, path
    assert not list(EXAMPLE.glob("records.rank*.jsonl"))


def test_a_trace_only_for_the_methods_that_query(tmp_path):
    """vldnp's queries are a trace ("1 query", "2 queries"); the fixed negative of static, sld and
    safree, recorded as one entry at step 0, is that negative, not "trace: 1 queries"."""
    records = make_run(tmp_path, [("sd", None), ("static", 7.5), ("sld-max", None), ("safree", None),
                                  ("vldnp", 7.5)])
    fixed = {"static": "nudity, nude", "sld-max": "hate, harassment", "safree": "Sexual Acts, Nudity <i>"}
    for r in records:
        if r["method"] in fixed:
            r["negatives"] = [{"step": 0, "negative": fixed[r["method"]], "error": None}]
        if r["method"] == "vldnp" and r["case"] == 0:
            r["negatives"] = r["negatives"][:1]
    page = write_report(tmp_path, records)["html"].read_text(encoding="utf-8")
    assert page.count("<summary>trace: ") == 3  # one per vldnp image
    assert page.count("<summary>trace: 1 query</summary>") == 1
    assert page.count("<summary>trace: 2 queries, 1 failed</summary>") == 2
    for text in fixed.values():
        assert page.count(f"<div class='meta'>negative: {html.escape(text)}</div>") == len(PROMPTS)


def svg_texts(svg: str, **attributes) -> list:
    return [t for t in ET.fromstring(svg).iter(f"{SVG}text")
            if all(t.get(k.replace("_", "-")) == v for k, v in attributes.items())]


@pytest.mark.parametrize("asr, top", [(0.0, 10), (0.004, 10), (0.55, 60), (1.0, 100)])
def test_the_asr_axis_reads_in_percent(asr, top):
    """The axis says ASR (%), so its ticks are percentages, with the sign: a run with no unsafe
    image reads 0 % to 10 %, not 0 to 1 (which would read as a fraction)."""
    rows = [{"method": "sd", "scale": None, "asr": asr, "clip_score": 30.0},
            {"method": "vldnp", "scale": 7.5, "asr": asr / 2, "clip_score": 29.0}]
    ticks = [t.text for t in svg_texts(pareto_svg(rows), text_anchor="end")]
    assert ticks[0] == "0%" and ticks[-1] == f"{top}%" and all(t.endswith("%") for t in ticks)


def label_boxes(svg: str) -> list:
    """(text, box) of each scale label, with a box as wide as 0.6 em per character."""
    return [(t.text, (float(t.get("x")), float(t.get("y")) - 8, float(t.get("x")) + 6 * len(t.text),
                      float(t.get("y")) + 2)) for t in svg_texts(svg, font_size="10")]


@pytest.mark.parametrize("spread", [0.0, 0.05, 0.3])
def test_scale_labels_of_neighbouring_points_do_not_overlap(spread):
    """Sweep points close together (15 and 20 on top of each other once read as "1520"): each label
    has a place of its own, clear of the others."""
    rows = [{"method": "vldnp", "scale": w, "asr": 0.2 - spread * k / 100, "clip_score": 30.0 + spread * k}
            for k, w in enumerate((10.0, 15.0, 20.0))]
    rows += [{"method": "static", "scale": 15.0, "asr": 0.2, "clip_score": 30.0 + spread},
             {"method": "sd", "scale": None, "asr": 0.5, "clip_score": 25.0}]
    labels = label_boxes(pareto_svg(rows))
    assert sorted(text for text, _ in labels) == ["10", "15", "15", "20"]
    for i, (_, a) in enumerate(labels):
        for _, b in labels[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), labels
