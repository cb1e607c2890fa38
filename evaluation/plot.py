"""The run's Pareto plot (pareto.svg): ASR against mean CLIP score, a line per method through its
negative scales. Plain SVG text, no plotting library; method names are escaped."""
import html
import math

# A colour per method: Okabe-Ito's, then Paul Tol's muted, then hues a golden angle apart; each
# round of seven also changes the marker, so no two methods look alike however many there are.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
          "#882255", "#117733", "#332288", "#999933", "#AA4499", "#44AA99", "#CC6677")
MARKERS = ("circle", "square", "triangle", "diamond")
MIN_ASR_AXIS = 10  # percent: the least top of the plot's ASR axis, so that a run with no unsafe image reads 0-10 %
LABEL_FONT = 10  # px, the font size of the plot's scale labels


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
            name = method if r["scale"] is None else f'{method} {r["scale"]:g}'
            title = f'{e(name)}: ASR {100 * r["asr"]:.1f}%, CLIP {r["clip_score"]:.2f}'
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
