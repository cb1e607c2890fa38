"""The GPU figures of docs/performance.md, as markdown, from the JSON that benchmarks/gpu.sh writes.

    python benchmarks/gpu_table.py benchmarks/results

Reads gpu-runs.jsonl (each part's command, exit code and time) and each part's gpu-*.json; prints one
table per part, and for a part without its JSON, the failure and where its log is. Exits with 1 if
any part failed.
"""
import json
import sys
from pathlib import Path

PARTS = {  # part -> its JSON, as gpu.sh names them
    "sd15-fp16": "gpu-sd15-fp16.json",
    "sd15-compile": "gpu-sd15-compile.json",
    "sdxl-fp16": "gpu-sdxl-fp16.json",
    "precision": "gpu-precision.json",
    "vae-decode": "gpu-vae-decode.json",
    "vldnp-cost": "gpu-vldnp-cost.json",
}
CASES = {  # vldnp_cost.py's cases, as the docs name them
    "cfg": "plain CFG",
    "three-branches": "three branches alone",
    "clip-nothing-taesd": "CLIP finds nothing, TAESD previews",
    "clip-nothing-vae": "CLIP finds nothing, VAE previews",
    "clip-found-taesd": "CLIP finds every concept, TAESD previews",
    "clip-found-vae": "CLIP finds every concept, VAE previews",
    "stub-taesd": "stub VLM, sync, TAESD previews",
    "stub-vae": "stub VLM, sync, VAE previews",
    "stub-async-taesd": "stub VLM, async, TAESD previews",
    "stub-async-vae": "stub VLM, async, VAE previews",
    "latent-nothing": "latent proposer finds nothing",
    "latent-found": "latent proposer finds every concept",
}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def command(run: dict, folder: Path) -> str:
    """The part's command as gpu.sh runs it by default: the results folder as benchmarks/results, an
    indented code line, wrapped as docs/performance.md wraps its commands."""
    words = [("benchmarks/results/" + w[len(str(folder)) + 1:] if w.startswith(f"{folder}/") else w)
             for w in run["command"]]
    lines = ["   "]
    for word in words:
        if len(lines[-1]) + len(word) > 100:
            lines[-1] += " \\"
            lines.append("       ")
        lines[-1] += " " + word
    return "\n".join(lines)


def sd15(report: dict) -> str:
    """bench.py: ours against diffusers per mode."""
    s = report["settings"]
    rows = []
    for r in report["results"]:
        ours, theirs = r.get("ours"), r.get("diffusers")
        rows.append([r["mode"], f"{r['width']}²" if r["width"] == r["height"] else f"{r['width']}x{r['height']}",
                     f"{ours['step_ms']:.1f}", f"{theirs['step_ms']:.1f}" if theirs else "–",
                     f"**{theirs['step_ms'] / ours['step_ms']:.2f}**" if theirs else "–",
                     f"{ours['total_s']:.2f}", f"{theirs['total_s']:.2f}" if theirs else "–",
                     f"{ours['peak_gib']:.2f}", f"{theirs['peak_gib']:.2f}" if theirs else "–",
                     r.get("max_pixel_diff", "–")])
    load = ", ".join(f"{impl} {v['load_s']:.1f} s" for impl, v in report["load"].items())
    compiled = f"torch.compile, mode {s['compile']}" if s["compile"] else "eager"
    return (f"{s['dtype']}, {compiled}, {s['steps']} DDIM steps, median of {s['repeats']} after {s['warmup']} "
            f"warm-up; load: {load}.\n\n"
            + table(["mode", "size", "ours ms/step", "diffusers ms/step", "diffusers / ours", "ours s total",
                     "diffusers s total", "ours peak GiB", "diffusers peak GiB", "max pixel diff"], rows))


def sdxl(report: dict) -> str:
    """sdxl.py: the UNet alone, ours against diffusers."""
    s, ref, m = report["settings"], report["reference"], report["medians"]
    gpu = all("peak_gpu_gib" in v for v in m.values())
    rows = [[impl, f"{v['load_s']:.1f}", f"{v['first_call_s']:.2f}", f"{1e3 * v['step_s']:.1f}",
             f"{v['peak_gpu_gib' if gpu else 'peak_rss_gib']:.2f}", f"{v['rel_diff_to_' + ref]:.1e}"]
            for impl, v in m.items()]
    for impl, r in report["ratios_to_reference"].items():
        rows.append([f"**{impl} / {ref}**", f"{r['load_s']:.2f}×", f"{r['first_call_s']:.2f}×",
                     f"**{r['step_s']:.2f}×**", f"**{r['peak_gpu_gib' if gpu else 'peak_rss_gib']:.2f}×**", ""])
    return (f"Batch {s['batch']} on {s['latent']}² latents ({8 * s['latent']}² images), step: median of {s['steps']} "
            f"calls, {s['rounds']} round(s).\n\n"
            + table(["UNet", "load s", "first call s", "step ms", "peak GPU GiB" if gpu else "peak RSS GiB",
                     f"max diff / {ref}'s largest value"], rows))


def precision(report: dict) -> str:
    """precision.py: each dtype against fp32."""
    s, rows = report["settings"], []
    for r in report["results"]:
        fig = lambda k, fmt: format(r[k], fmt) if k in r else "–"
        rows.append([r["dtype"], fig("text", ".1e"), fig("unet", ".1e"), fig("vae", ".1e"), fig("mean_pixel", ".2f"),
                     fig("max_pixel", "d"), f"{r['seconds']:.2f}",
                     "no: " + ", ".join(r["past_tolerance"]) if r["past_tolerance"] else "yes"])
    fp32 = report["results"][0]["seconds_fp32"] if report["results"] else float("nan")
    return (f"{s['size']}², {s['steps']} steps, seed {s['seed']}; fp32 took {fp32:.2f} s.\n\n"
            + table(["dtype", "text encoder", "UNet", "VAE decode", "mean pixel diff", "max pixel diff", "s",
                     "within tolerance"], rows))


def vae_decode(report: dict) -> str:
    """vae_decode.py: decode against decode_tiled."""
    s, rows = report["settings"], []
    for r in report["results"]:
        cell = lambda m, k, f: f(r[m][k]) if m in r else "failed"
        rows.append([f"{r['size']}²", cell("decode", "seconds", lambda v: f"{1e3 * v:.0f}"),
                     cell("decode", "peak_gib", lambda v: f"{v:.2f}"),
                     cell("decode_tiled", "seconds", lambda v: f"{1e3 * v:.0f}"),
                     cell("decode_tiled", "peak_gib", lambda v: f"{v:.2f}"),
                     f"{r['max_diff']:.1e}" if "max_diff" in r else "–"])
    return (f"{s['dtype']}, tiles of {s['tile']} latent pixels, overlap {s['overlap']}.\n\n"
            + table(["size", "decode ms", "decode peak GiB", "tiled ms", "tiled peak GiB", "max diff / max"], rows))


def vldnp(report: dict) -> str:
    """vldnp_cost.py: each case against plain CFG and the three branches alone, then the components."""
    s, results = report["settings"], report["results"]
    ratio = lambda res, base: f"{res['total_s'] / results[base]['total_s']:.3f}" if base in results else "–"
    rows = [[CASES.get(case, case), f"{res['total_s']:.2f}", f"**{ratio(res, 'cfg')}**", ratio(res, "three-branches"),
             f"{res['peak_gib']:.2f}"] for case, res in results.items()]
    text = (f"{s['dtype']}, {s['size']}², {s['steps']} steps, queries at {s['query_steps']}, median of "
            f"{s['rounds']} round(s).\n\n"
            + table(["case", "s", "× plain CFG", "× three branches", "peak GiB"], rows))
    if report.get("components"):
        comp = [[name.removesuffix("_s"), f"{1e3 * v['wall_s']:.1f}"] for name, v in report["components"].items()]
        text += "\n\nPer call, median of the components:\n\n" + table(["component", "ms"], comp)
    return text


SECTIONS = {  # part -> (heading, the function that tables its JSON, which gives the dtype and sizes)
    "sd15-fp16": ("Against diffusers, eager (the SD1.5 layout, random weights)", sd15),
    "sd15-compile": ("Against diffusers, torch.compile", sd15),
    "sdxl-fp16": ("SDXL base's UNet against diffusers'", sdxl),
    "precision": ("Low precision against fp32", precision),
    "vae-decode": ("VAE decode and its peak memory", vae_decode),
    "vldnp-cost": ("VL-DNP's cost", vldnp),
}


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:] or ["benchmarks/results"])[0]).resolve()
    runs = {}
    if (folder / "gpu-runs.jsonl").is_file():
        for line in (folder / "gpu-runs.jsonl").read_text().splitlines():
            run = json.loads(line)
            runs[run["part"]] = run
    reports = {part: json.loads((folder / name).read_text()) for part, name in PARTS.items()
               if (folder / name).is_file()}
    m = next((r["machine"] for r in reports.values() if "machine" in r), {})
    dry = m.get("gpu") is None
    out = [("**DRY RUN on the CPU with tiny random models: these are not figures.**\n\n" if dry else "")
           + f"Machine: {m['gpu'] + '; ' if 'gpu' in m else ''}{m.get('cpu', '?')}, {m.get('cores', '?')} cores; "
             f"torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}; commit {m.get('commit', '?')}. "
             "Made by `bash benchmarks/gpu.sh`; the JSON of each part is in benchmarks/results/gpu-*.json."]
    failed = []
    for part, (heading, render) in SECTIONS.items():
        run = runs.get(part)
        body = f"**{heading}**"
        if run:
            body += " (`" + PARTS[part] + "`):\n\n" + command(run, folder) + "\n\n"
        else:
            body += ":\n\n"
        if part in reports:
            body += render(reports[part])
            if run and run["rc"] not in (0, 1 if part == "precision" else 0):
                body += f"\n\n(It exited with {run['rc']}; see {run['log']}.)"
        else:
            failed.append(part)
            why = ("not run" if not run else "skipped: the budget was spent" if run["rc"] == -1
                   else f"out of time after {run['seconds']} s" if run["rc"] in (124, 137)
                   else f"failed with exit code {run['rc']}")
            body += f"Not measured: {why}" + (f"; see {run['log']}." if run and run["rc"] != -1 else ".")
        out.append(body)
    if runs:
        out.append("Parts: " + ", ".join(f"{r['part']} {r['seconds']} s" + ("" if r["rc"] == 0 else f" (exit {r['rc']})")
                                         for r in runs.values()) + ".")
    print("\n\n".join(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
