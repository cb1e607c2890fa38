"""The run's report: the summary table (summary.md, summary.csv), the safety/alignment Pareto plot
(pareto.svg) and a page that opens offline (index.html) with the table, the plot and every image
by prompt and method, each with its metrics and its VL-DNP trace.

Everything is built from the run's records (one dict per image, as evaluate.py writes them) and
plain strings: no plotting or templating library. Record text (prompts, negatives, VLM errors, method
names) is untrusted and always escaped, for HTML and for Markdown alike.
"""
import csv
import html
import io
import math
import os
from pathlib import Path
from urllib.parse import quote

from evaluation.metrics import NO_METRICS, PROTOCOL, aggregate
from files import printable, write_atomic
from png import SAMPLER_NAMES

# A colour per method: Okabe-Ito's, then Paul Tol's muted, then hues a golden angle apart; each
# round of seven also changes the marker, so no two methods look alike however many there are.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
          "#882255", "#117733", "#332288", "#999933", "#AA4499", "#44AA99", "#CC6677")
MARKERS = ("circle", "square", "triangle", "diamond")
CSV_COLUMNS = ("method", "scale", "n", "failures", "asr", "toxic_rate", "clip_score", "clip_score_std")
THUMBNAIL = 192  # CSS pixels, the most an image is shown at; a narrower window shrinks them
PROMPT_WIDTH, MIN_COLUMN = 200, 112  # CSS pixels: the prompt column, and the least an image column gets
SHORT_PROMPT = 400  # characters shown of a longer prompt; the whole of it is one click away
QUERYING = ("vldnp",)  # the methods whose negatives are found by queries; the others' are fixed
MIN_ASR_AXIS = 10  # percent: the least top of the plot's ASR axis, so that a run with no unsafe image reads 0-10 %
LABEL_FONT = 10  # px, the font size of the plot's scale labels


def write_report(run_dir: Path, records: list[dict], protocol: str = PROTOCOL, run: dict | None = None
                 ) -> dict[str, Path]:
    """Writes summary.md, summary.csv, pareto.svg and index.html into `run_dir` (each atomically)
    and returns their paths by kind. `protocol` is the metrics' protocol text (Metrics.protocol);
    `run` what run.json holds (its settings, the prompt file, the rows skipped), which the summary
    states beside what the records say."""
    run_dir = Path(run_dir)
    rows = aggregate(records)
    svg = pareto_svg(rows)
    facts = run_facts(run or {}, records)
    protocol = protocol.strip() or NO_METRICS
    files = {
        "markdown": ("summary.md", summary_markdown(rows, protocol, facts)),
        "csv": ("summary.csv", summary_csv(rows)),
        "plot": ("pareto.svg", svg),
        "html": ("index.html", report_html(run_dir.name, records, rows, svg, protocol, facts)),
    }
    return {kind: write_atomic(run_dir / name, text) for kind, (name, text) in files.items()}


# ---------------------------------------------------------------- formatting

def scale_label(scale) -> str:
    return "–" if scale is None else f"{scale:g}"


def column_label(method: str, scale) -> str:
    return method if scale is None else f"{method} {scale:g}"


def percent(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def number(x, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def clip_text(row: dict) -> str:
    if row["clip_score"] is None:
        return "–"
    return f"{row['clip_score']:.2f} ± {row['clip_score_std']:.2f}"


SUMMARY_HEADER = ("method", "scale", "images", "failed", "ASR", "toxic rate", "CLIP score")


def summary_cells(row: dict) -> tuple[str, ...]:
    return (row["method"], scale_label(row["scale"]), str(row["n"]), str(row["failures"]), percent(row["asr"]),
            number(row["toxic_rate"], 3), clip_text(row))


# ---------------------------------------------------------------- what was run

def run_facts(run: dict, records: list[dict]) -> list[tuple[str, str]]:
    """(label, text) pairs saying how the images were made: the model, sampler, steps, guidance and
    size from run.json's settings, checked against the records (a CSV can set each prompt's
    guidance), and what became of the prompt file's rows."""
    settings = run.get("settings") or {}
    facts = []
    if isinstance(run.get("protocol"), dict):
        departures = run["protocol"].get("departures") or []
        facts.append(("Protocol", f"{run['protocol'].get('name')}, "
                                  + (f"with {len(departures)} {'departure' if len(departures) == 1 else 'departures'}"
                                     if departures else "followed") + " (see Protocol below)"))
    if settings.get("model"):
        dtype = f" ({settings['dtype']})" if settings.get("dtype") else ""
        facts.append(("Model", f"{settings['model']}{dtype}"))
    if settings.get("sampler"):
        facts.append(("Sampler", f"{SAMPLER_NAMES.get(settings['sampler'], settings['sampler'])}, "
                                 f"{settings.get('steps')} steps"))
    facts.append(("Guidance", guidance_text(settings.get("guidance"), records)))
    facts.append(("Size", size_text(settings, records)))
    facts.append(("Prompts", prompts_text(run, records)))
    facts.append(("Made without the guard asked for", unguarded_text(records)))
    return [(label, text) for label, text in facts if text]


def unguarded_text(records: list[dict]) -> str:
    """The images made without the guard asked for (--allow-vlm-failures), per method and scale, and why:
    their metrics are in their method's row, so the summary must say how many are not what it names."""
    made, why = {}, {}
    for r in (r for r in records if r.get("status", "ok") == "ok"):
        made[r["method"], r.get("scale")] = made.get((r["method"], r.get("scale")), 0) + 1
        if isinstance(r.get("unguarded"), str):
            why.setdefault((r["method"], r.get("scale")), []).append(r["unguarded"])
    return "; ".join(f"{method}{'' if scale is None else f' at {scale:g}'}: {len(w)} of {made[method, scale]} images "
                     f"({', '.join(dict.fromkeys(w))})" for (method, scale), w in why.items())


def guidance_text(default, records: list[dict]) -> str:
    """The CFG scale: --guidance, and the prompt file's own values where they differ."""
    values = sorted({r["guidance"] for r in records if isinstance(r.get("guidance"), (int, float))})
    if default is None:
        return ", ".join(f"{v:g}" for v in values)
    others = [v for v in values if v != default]
    text = f"CFG {default:g}"
    return text + (f"; the prompt file's own where it gives one ({', '.join(f'{v:g}' for v in others)})"
                   if others else "")


def size_text(settings: dict, records: list[dict]) -> str:
    sizes = sorted({(r["width"], r["height"]) for r in records if r.get("width") and r.get("height")})
    if sizes:
        return ", ".join(f"{w}×{h}" for w, h in sizes)
    if settings.get("width") and settings.get("height"):
        return f"{settings['width']}×{settings['height']}"
    return "the model's default" if settings else ""


def prompts_text(run: dict, records: list[dict]) -> str:
    """How many prompts were used, how many rows of the file were skipped and why it says where,
    and how many prompts the text encoder read only in part."""
    cases = {r.get("case"): r for r in records}
    parts = [f"{Path(run['prompts']).name}" if run.get("prompts") else "",
             f"{run.get('prompts_used', len(cases))} used"]
    skipped = run.get("skipped_rows")
    if skipped is not None:
        parts.append(f"{len(skipped)} {'row' if len(skipped) == 1 else 'rows'} of the file skipped"
                     + (" (run.json lists them, each with its line and why)" if skipped else ""))
    cut = sum(1 for r in cases.values() if r.get("prompt_truncated"))
    if cut:
        parts.append(f"{cut} longer than the text encoder's 75 tokens, cut there as diffusers does (the records "
                     "keep them whole)")
    return ", ".join(p for p in parts if p)


# ---------------------------------------------------------------- summary table

def markdown_text(text: str) -> str:
    """Record text as Markdown shows it, on one line of a list or a table's cell: control
    characters (a newline) as escapes, HTML as text, `|` not a cell's end."""
    return html.escape(printable(text), quote=False).replace("|", "\\|")


def summary_markdown(rows: list[dict], protocol: str, facts: list[tuple[str, str]] = ()) -> str:
    def line(cells):
        return "| " + " | ".join(map(markdown_text, cells)) + " |\n"

    text = "# Evaluation summary\n\n" + "".join(f"- {label}: {markdown_text(value)}\n" for label, value in facts)
    text += ("\n" if facts else "") + line(SUMMARY_HEADER) + line(["---"] * len(SUMMARY_HEADER))
    text += "".join(line(summary_cells(row)) for row in rows)
    text += ("\nASR: share of images judged unsafe. Toxic rate: mean p_unsafe. CLIP score: mean ± standard "
             "deviation over images. Failed images are left out of every column but `failed`.\n")
    return text + "\n## Protocol\n\n" + protocol.strip() + "\n"


def summary_csv(rows: list[dict]) -> str:
    """The aggregate rows with full precision; an empty field is a metric not computed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    return out.getvalue()


# ---------------------------------------------------------------- Pareto plot

def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def pareto_svg(rows: list[dict], width: int = 640, height: int = 400) -> str:
    """ASR (y, %) against mean CLIP score (x): a line per method through its scales in order, each
    point labelled with its scale where the label has room. Lower right is better: safer at the same
    alignment."""
    left, right, top, bottom = 56, 150, 34, 48
    points = [r for r in rows if r["asr"] is not None and r["clip_score"] is not None]
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="13" font-weight="bold">ASR against CLIP score, per negative scale'
           '</text>']
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no image has both metrics</text>')
        return "\n".join(out + ["</svg>"]) + "\n"

    xs = nice_ticks(min(r["clip_score"] for r in points), max(r["clip_score"] for r in points))
    ys = nice_ticks(0, max(max(100 * r["asr"] for r in points), MIN_ASR_AXIS))
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def px(v):
        return x0 + (v - xs[0]) / (xs[-1] - xs[0]) * (x1 - x0)

    def py(v):
        return y0 + (v - ys[0]) / (ys[-1] - ys[0]) * (y1 - y0)

    for v in xs:
        out.append(f'<line x1="{px(v):.1f}" y1="{y1}" x2="{px(v):.1f}" y2="{y0}" stroke="#e4e4e4"/>'
                   f'<text x="{px(v):.1f}" y="{y0 + 15}" text-anchor="middle">{v:g}</text>')
    for v in ys:
        out.append(f'<line x1="{x0}" y1="{py(v):.1f}" x2="{x1}" y2="{py(v):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{x0 - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}%</text>')
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{(x0 + x1) / 2}" y="{height - 10}" text-anchor="middle">CLIP score (higher: closer '
               'to the prompt)</text>')
    out.append(f'<text transform="translate(14 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">ASR (%)</text>')

    # Every marker's box, so that a scale label covers neither a marker nor another label.
    taken = [(px(r["clip_score"]) - 5, py(100 * r["asr"]) - 5, px(r["clip_score"]) + 5, py(100 * r["asr"]) + 5)
             for r in points]
    methods = list(dict.fromkeys(r["method"] for r in points))
    for i, method in enumerate(methods):
        color, marker = series_style(i)
        line = [r for r in points if r["method"] == method]  # aggregate() sorts scales ascending
        coords = " ".join(f"{px(r['clip_score']):.1f},{py(100 * r['asr']):.1f}" for r in line)
        out.append(f'<g data-method="{e(method)}" fill="{color}"><title>{e(method)}</title>')
        if len(line) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for r in line:
            x, y = px(r["clip_score"]), py(100 * r["asr"])
            title = f'{e(column_label(method, r["scale"]))}: ASR {percent(r["asr"])}, CLIP {r["clip_score"]:.2f}'
            out.append(marker_svg(marker, x, y, f"<title>{title}</title>"))
            label = None if r["scale"] is None else f'{r["scale"]:g}'
            place = label and free_place(x, y, label, taken)
            if place:
                out.append(f'<text x="{place[0]:.1f}" y="{place[1]:.1f}" font-size="{LABEL_FONT}">{label}</text>')
        ly = top + 8 + 18 * i
        out.append(f'<line x1="{x1 + 14}" y1="{ly}" x2="{x1 + 34}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
                   + marker_svg(marker, x1 + 24, ly) + f'<text x="{x1 + 40}" y="{ly + 4}" fill="black">{e(method)}</text>')
        out.append("</g>")
    return "\n".join(out + ["</svg>"]) + "\n"


def free_place(x: float, y: float, text: str, taken: list[tuple]) -> tuple[float, float] | None:
    """Where the label `text` of the point (x, y) goes: the first spot around it (right above, right
    below, left above, left below, then farther out) whose box overlaps no box in `taken`, which it
    then joins; None when every spot is taken (the point's tooltip still says its scale)."""
    w, h = 0.62 * LABEL_FONT * len(text), LABEL_FONT  # a generous box for sans-serif digits
    for dx, dy in ((5, -5), (5, 5 + h), (-5 - w, -5), (-5 - w, 5 + h), (5, -5 - h), (5, 5 + 2 * h),
                   (-5 - w, -5 - h), (-5 - w, 5 + 2 * h)):
        box = (x + dx, y + dy - 0.8 * h, x + dx + w, y + dy + 0.2 * h)  # text baseline at y + dy
        if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
            taken.append(box)
            return x + dx, y + dy
    return None


def series_style(i: int) -> tuple[str, str]:
    """The colour and marker of the i-th method: a colour of its own for every method."""
    color = COLORS[i] if i < len(COLORS) else f"hsl({(i * 137.508) % 360:.1f}, 70%, 38%)"
    return color, MARKERS[i // 7 % len(MARKERS)]


def marker_svg(shape: str, x: float, y: float, inner: str = "") -> str:
    """A marker about 7 px across at (x, y), filled with its group's colour."""
    r = 3.5
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}">{inner}</circle>'
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r}" height="{2 * r}">{inner}</rect>'
    corners = ([(x, y - 4.5), (x + 4.5, y + 3.5), (x - 4.5, y + 3.5)] if shape == "triangle"
               else [(x, y - 4.5), (x + 4.5, y), (x, y + 4.5), (x - 4.5, y)])
    return f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in corners)}">{inner}</polygon>'


# ---------------------------------------------------------------- HTML page

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
table.summary td { text-align: right; } table.summary td:first-child { text-align: left; }
table.summary th, table.grid thead th { background: #f4f4f4; }
table.run th { text-align: left; font-weight: normal; color: #666; }
.grid-box { overflow-x: auto; }
table.grid { table-layout: fixed; width: 100%; }
table.grid th.prompt { position: sticky; left: 0; background: #fafafa; width: PROMPTpx;
  text-align: left; font-weight: normal; z-index: 1; }
.prompt-text { white-space: pre-wrap; overflow-wrap: anywhere; }
.meta, .m { color: #666; font-size: 12px; }
td.cell { font-size: 12px; overflow-wrap: anywhere; }
td.cell img { width: 100%; max-width: THUMBpx; height: auto; display: block; background: #eee; }
.unsafe { color: #b00020; font-weight: bold; } .safe { color: #1b7a1b; }
.failed, .missing, .error { color: #b00020; }
.missing { display: block; padding: 8px; border: 1px dashed #b00020; overflow-wrap: anywhere; }
details { margin-top: 4px; } summary { cursor: pointer; color: #345; }
details table { font-size: 11px; } details th, details td { padding: 2px 4px; overflow-wrap: break-word; }
pre.protocol { white-space: pre-wrap; max-width: 960px; background: #f8f8f8; padding: 12px; }
""".replace("THUMB", str(THUMBNAIL)).replace("PROMPT", str(PROMPT_WIDTH))

# Counts the images that loaded into <body data-images-*>, and replaces a broken one with the
# path it was looking for (a report moved without its images shows what is missing).
SCRIPT = """
(function () {
  const body = document.body, images = Array.from(document.querySelectorAll("img[data-report]"));
  let loaded = 0, missing = 0;
  function count() {
    body.dataset.imagesLoaded = loaded;
    body.dataset.imagesMissing = missing;
  }
  function ok() { loaded += 1; count(); }
  function broken(img) {
    missing += 1;
    const note = document.createElement("span");
    note.className = "missing";
    note.textContent = "image missing: " + img.getAttribute("src");
    img.replaceWith(note);
    count();
  }
  for (const img of images) {
    if (img.complete) { img.naturalWidth > 0 ? ok() : broken(img); continue; }
    img.addEventListener("load", ok, { once: true });
    img.addEventListener("error", () => broken(img), { once: true });
  }
  count();
})();
"""


def report_html(title: str, records: list[dict], rows: list[dict], svg: str, protocol: str,
                facts: list[tuple[str, str]] = ()) -> str:
    e = html.escape
    grid = image_grid(records, rows)
    run = "".join(f"<tr><th>{e(label)}</th><td>{e(value)}</td></tr>" for label, value in facts)
    summary = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in summary_cells(row)) + "</tr>\n" for row in rows)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation: {e(title)}</title>
<style>{STYLE}</style>
</head>
<body data-images-total="{grid.count('<img data-report')}" data-images-loaded="0" data-images-missing="0">
<h1>Evaluation: {e(title)}</h1>
<p class="meta">{len(records)} images ({sum(r['failures'] for r in rows)} failed), {len(rows)} method and scale
combinations. ASR: share of images judged unsafe; toxic rate: mean p_unsafe; CLIP score: mean ± std.</p>
<table class="run">{run}</table>
<h2>Summary</h2>
<table class="summary">
<thead><tr>{"".join(f"<th>{e(h)}</th>" for h in SUMMARY_HEADER)}</tr></thead>
<tbody>
{summary}</tbody>
</table>
<figure>
{svg}</figure>
<details open><summary>Protocol</summary><pre class="protocol">{e(protocol.strip())}</pre></details>
<h2>Images</h2>
{grid}
<script>{SCRIPT}</script>
</body>
</html>
"""


def image_grid(records: list[dict], rows: list[dict]) -> str:
    """A row per prompt (case and seed), a column per method and scale, in the summary's order. It
    fills the window's width, the images shrinking from THUMBNAIL px to fit, so that a sweep of 7
    columns fits a 1280 px window; with more columns than fit at MIN_COLUMN px, the grid scrolls
    sideways in its own box and the page does not."""
    e = html.escape
    columns = [(row["method"], row["scale"]) for row in rows]
    by_prompt: dict[tuple, dict[tuple, dict]] = {}
    for r in records:
        key = (r.get("case"), r.get("prompt"), r.get("seed"))
        by_prompt.setdefault(key, {})[(r["method"], r.get("scale"))] = r
    head = "".join(f"<th>{e(r['method'])}<br><span class='meta'>scale {e(scale_label(r['scale']))}</span></th>"
                   for r in rows)
    body = []
    for (case, prompt, seed), cells in by_prompt.items():
        first = next(iter(cells.values()))
        categories = first.get("categories")
        if isinstance(categories, (list, tuple)):
            categories = ", ".join(map(str, categories))
        meta = [f"case {case}", f"seed {seed}", f"guidance {first.get('guidance')}"]
        if categories:
            meta.append(str(categories))
        if first.get("prompt_truncated"):
            meta.append(f"{first.get('prompt_tokens')} tokens, cut at 75")
        body.append(f"<tr><th class='prompt'>{prompt_html(str(prompt))}"
                    f"<div class='meta'>{e(' · '.join(meta))}</div></th>"
                    + "".join(image_cell(cells.get(column)) for column in columns) + "</tr>")
    cell = 2 * 8 + 1  # padding and border, CSS px
    least = PROMPT_WIDTH + cell + len(columns) * MIN_COLUMN
    most = PROMPT_WIDTH + cell + len(columns) * (THUMBNAIL + cell)
    return (f"<div class='grid-box'><table class='grid' style='min-width: {least}px; max-width: {most}px'>\n"
            f"<thead><tr><th class='prompt'>prompt</th>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + "\n</tbody>\n</table></div>")


def prompt_html(prompt: str) -> str:
    """The prompt as text; of a long one (adversarial prompts run to thousands of characters) its
    start, with the whole behind a click."""
    e = html.escape
    if len(prompt) <= SHORT_PROMPT:
        return f"<div class='prompt-text'>{e(prompt)}</div>"
    return (f"<div class='prompt-text'>{e(prompt[:SHORT_PROMPT])}…</div><details><summary>whole prompt "
            f"({len(prompt):,} characters)</summary><div class='prompt-text'>{e(prompt)}</div></details>")


def image_cell(record: dict | None) -> str:
    """The image (when there is one), its metrics, its trace; a failed record says why."""
    e = html.escape
    if record is None:
        return "<td class='cell'></td>"
    parts = []
    ok = record.get("status", "ok") == "ok"
    if not ok:
        parts.append(f"<div class='failed'>failed: {e(str(record.get('error')))}</div>")
    if record.get("image"):
        src = quote(str(record["image"]).replace(os.sep, "/"))  # a relative URL, whatever the file name holds
        alt = column_label(record["method"], record.get("scale"))
        parts.append(f"<a href='{e(src)}'><img data-report src='{e(src)}' alt='{e(alt)}' loading='lazy'></a>")
    if ok:
        parts.append(f"<div class='m'>{metrics_line(record.get('metrics') or {})}</div>")
    parts.append(trace_details(record.get("negatives"), record.get("method")))
    parts.append(detections_details(record.get("metrics") or {}, record.get("timings") or {}))
    return "<td class='cell'>" + "".join(parts) + "</td>"


def metrics_line(metrics: dict) -> str:
    e = html.escape
    out = []
    if "p_unsafe" in metrics:
        verdict = ("<span class='unsafe'>unsafe</span>" if metrics.get("unsafe")
                   else "<span class='safe'>safe</span>")
        out.append(f"{verdict} p {e(number(metrics['p_unsafe'], 2))}")
    if "clip_score" in metrics:
        out.append(f"CLIP {e(number(metrics['clip_score'], 1))}")
    return " · ".join(out) or "no metrics"


def trace_details(negatives, method: str | None = None) -> str:
    """A querying method's trace, a list of queries ({step, negative, error, ...}); another method's
    fixed negative (a list of one such entry, or the text)."""
    e = html.escape
    if not negatives:
        return "<div class='meta'>no negative</div>"
    if not isinstance(negatives, list):
        return f"<div class='meta'>negative: {e(str(negatives))}</div>"
    if method not in QUERYING:
        texts = dict.fromkeys(str(q.get("negative") if isinstance(q, dict) else q) for q in negatives)
        return "".join(f"<div class='meta'>negative: {e(text)}</div>" for text in texts)
    rows = []
    for q in negatives:
        q = q if isinstance(q, dict) else {"negative": q}
        error = q.get("error")
        rows.append(f"<tr><td>{e(str(q.get('step', '')))}</td><td>{e(str(q.get('negative') or '–'))}</td>"
                    f"<td class='error'>{e(str(error)) if error else ''}</td></tr>")
    failed = sum(1 for q in negatives if isinstance(q, dict) and q.get("error"))
    note = f", {failed} failed" if failed else ""
    count = f"{len(negatives)} {'query' if len(negatives) == 1 else 'queries'}"
    return (f"<details class='trace'><summary>trace: {count}{note}</summary>"
            "<table><thead><tr><th>step</th><th>negative</th><th>error</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></details>")


def detections_details(metrics: dict, timings: dict) -> str:
    e = html.escape
    lines = [f"{d['class']} {d['score']:.2f} at {d['box']}" for d in metrics.get("nudenet_detections", [])]
    if isinstance(metrics.get("nudenet_classifier"), dict):
        lines.append("NudeNet classifier: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["nudenet_classifier"].items()))
    lines += [f"{k}: {v:.2f} s" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in timings.items()]
    if not lines:
        return ""
    return ("<details><summary>detections and timings</summary><div class='meta'>"
            + "<br>".join(e(line) for line in lines) + "</div></details>")
