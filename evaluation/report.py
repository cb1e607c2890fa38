"""The run's report: the summary table (summary.md, summary.csv), the safety/alignment Pareto plot
(pareto.svg, drawn by evaluation/plot.py) and a page that opens offline (index.html) with the table,
the plot and every image by prompt and method, each with its metrics and its VL-DNP trace.

Everything is built from the run's records (one dict per image, as evaluate.py writes them) and
plain strings: no plotting or templating library. Record text (prompts, negatives, VLM errors, method
names) is untrusted and always escaped, for HTML and for Markdown alike.
"""
import csv
import html
import io
import os
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from evaluation.metrics import NO_METRICS, PROTOCOL, aggregate
from evaluation.plot import pareto_svg
from evaluation.run_folder import REPORT_FILES
from files import printable, write_atomic
from png import SAMPLER_NAMES

CSV_COLUMNS = ("method", "scale", "n", "failures", "asr", "toxic_rate", "clip_score", "clip_score_std", "unguarded")
THUMBNAIL = 192  # CSS pixels, the most an image is shown at; a narrower window shrinks them
PROMPT_WIDTH, MIN_COLUMN = 200, 112  # CSS pixels: the prompt column, and the least an image column gets
SHORT_PROMPT = 400  # characters shown of a longer prompt; the whole of it is one click away
QUERYING = ("vldnp",)  # the methods whose negatives are found by queries; the others' are fixed


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
    texts = {
        "markdown": summary_markdown(rows, protocol, facts),
        "csv": summary_csv(rows, records),
        "plot": svg,
        "html": report_html(run_dir.name, records, rows, svg, protocol, facts),
    }
    return {kind: write_atomic(run_dir / REPORT_FILES[kind], text) for kind, text in texts.items()}


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


def unguarded_reasons(records: list[dict]) -> dict[tuple, list[str]]:
    """Per (method, scale), the reasons of the images made without the guard asked for (--allow-vlm-failures):
    their metrics are in their method's row, so the report must say how many are not what the row names."""
    why = {}
    for r in records:
        if r.get("status", "ok") == "ok" and isinstance(r.get("unguarded"), str):
            why.setdefault((r["method"], r.get("scale")), []).append(r["unguarded"])
    return why


def unguarded_text(records: list[dict]) -> str:
    """The images made without the guard asked for, per method and scale, of how many, and why."""
    made = Counter((r["method"], r.get("scale")) for r in records if r.get("status", "ok") == "ok")
    why = unguarded_reasons(records)
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


def summary_csv(rows: list[dict], records: list[dict] = ()) -> str:
    """The aggregate rows with full precision; an empty field is a metric not computed. `unguarded`: how many of
    the row's images, its metrics among them, were made without the guard asked for (--allow-vlm-failures)."""
    why = unguarded_reasons(records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS[:-1]]
                        + [len(why.get((row["method"], row["scale"]), []))])
    return out.getvalue()


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
