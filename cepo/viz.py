"""``cepo viz``: the token-credit map of a run's logged samples.

Reads ``RUN_DIR/samples/step-XXXXXX.jsonl`` (see :mod:`cepo.samples`) and writes a self-contained
HTML page (inline CSS and a few lines of JavaScript, nothing fetched): per group the question,
``r+`` and ``r-``, then the correct and the wrong responses with each token shaded by the credit it
received relative to its sequence, ``A_t / A`` (switchable to ``delta_t``), and every number in the
token's tooltip. ``--png`` draws the same map with matplotlib.

Reading the map: ``A_t / A`` is ``1 + lam * (c_t - 1)`` in ``[1 - lam*eps_w, 1 + lam*eps_w]``.
Green (> 1) tokens get more than their sequence's share (reinforced more in a correct response,
penalised more in a wrong one); purple (< 1) tokens get less. ``delta_t`` is the log-probability
gain of the token when the context holds ``r+`` rather than ``r-``: green where ``r+`` makes the
token likelier.
"""

from __future__ import annotations

import glob
import html
import math
import os
import re

from cepo.samples import read_samples

_STEP = re.compile(r"step-(\d+)\.jsonl$")


class VizError(ValueError):
    """A user error: no such run directory, no samples, no samples for the asked step."""


def logged_steps(run_dir: str) -> dict[int, str]:
    """``{step: path}`` of the samples files under ``run_dir``."""
    if not os.path.exists(run_dir):
        raise VizError(f"run directory not found: {run_dir}")
    if not os.path.isdir(run_dir):
        raise VizError(f"not a run directory: {run_dir}")
    out = {}
    for path in glob.glob(os.path.join(run_dir, "samples", "step-*.jsonl")):
        m = _STEP.search(path)
        if m:
            out[int(m.group(1))] = path
    if not out:
        raise VizError(
            f"{run_dir} has no samples (samples/step-XXXXXX.jsonl); train with log_samples_every=K "
            "(e.g. log_samples_every=5) to log them"
        )
    return dict(sorted(out.items()))


def load_step(run_dir: str, step: int | None = None) -> tuple[int, list[dict]]:
    steps = logged_steps(run_dir)
    if step is None:
        step = max(steps)
    if step not in steps:
        raise VizError(f"no samples for step {step} in {run_dir}; logged steps: {sorted(steps)}")
    records = read_samples(steps[step])
    if not records:
        raise VizError(f"{steps[step]} holds no groups")
    return step, records


def ratio(a_t: float | None, a: float) -> float | None:
    """``A_t / A``; 1 where ``A == 0`` (every token then has ``A_t = 0`` and weight 1)."""
    if a_t is None:
        return None
    return a_t / a if a != 0 else 1.0


def fmt(v: float | None) -> str:
    """How a number is written in the page (and read back by the tests)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}"


def _mix(rgb: tuple[int, int, int], t: float) -> str:
    """White blended towards ``rgb`` by ``t`` in [0, 1]."""
    t = max(0.0, min(1.0, t))
    r, g, b = (round(255 + (c - 255) * t) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


GREEN, PURPLE = (26, 152, 80), (118, 42, 131)


def shade(value: float | None, scale: float) -> str:
    """Background colour of a token: ``value`` is centred (ratio - 1, or delta), ``scale`` its full range."""
    if value is None or scale <= 0:
        return "#ffffff"
    return _mix(GREEN if value > 0 else PURPLE, abs(value) / scale * 0.6)  # light enough to read the text


def _scales(records: list[dict]) -> tuple[float, float]:
    """Colour ranges: ``lam * eps_w`` for the ratio (its exact range), max ``|delta|`` (capped at 3) for delta."""
    r_scale = max((rec["lam"] * rec["eps_w"] for rec in records), default=0.0)
    deltas = [abs(d) for rec in records for resp in rec["responses"] for d in (resp["delta"] or []) if d is not None]
    return (r_scale or 1.0), (min(3.0, max(deltas)) if deltas else 1.0)


def _token_html(tok: str) -> str:
    """A token's visible text: spaces kept, a newline drawn as a return arrow (and a line break)."""
    if tok == "\n":
        return "\u21b5"
    return html.escape(tok).replace(" ", "\u00a0") or "\u2205"


def _response_html(resp: dict, r_scale: float, d_scale: float, color: str) -> str:
    a = resp["A"]
    parts = []
    for j, tok in enumerate(resp["tokens"]):
        a_t = resp["A_t"][j]
        rt = ratio(a_t, a)
        d = resp["delta"][j] if resp["delta"] else None
        w = resp["weight"][j] if resp["weight"] else None
        lp = resp["logp_pos"][j] if resp["logp_pos"] else None
        ln = resp["logp_neg"][j] if resp["logp_neg"] else None
        tip = (
            f"token {j}: {tok!r}\nA_t/A = {fmt(rt)}\ndelta_t = {fmt(d)}\nweight = {fmt(w)}\nA_t = {fmt(a_t)}\n"
            f"A = {fmt(a)}\nlog P(y_t | r+) = {fmt(lp)}\nlog P(y_t | negative) = {fmt(ln)}"
        )
        bg_r = shade(None if rt is None else rt - 1.0, r_scale)
        bg_d = shade(d, d_scale)
        bg = bg_r if color == "ratio" else bg_d
        br = "<br>" if tok == "\n" else ""
        parts.append(
            f"<span class='tok' data-j='{j}' data-tok='{html.escape(tok)}' data-ratio='{fmt(rt)}' "
            f"data-delta='{fmt(d)}' data-weight='{fmt(w)}' data-at='{fmt(a_t)}' data-bgr='{bg_r}' "
            f"data-bgd='{bg_d}' style='background:{bg}' title='{html.escape(tip)}'>{_token_html(tok)}</span>{br}"
        )
    status = "correct" if resp["correct"] else "wrong"
    return (
        f"<div class='resp {status}'><div class='meta'>reward {fmt(resp['reward'])} &middot; A = {fmt(a)}</div>"
        f"<div class='toks'>{''.join(parts)}</div></div>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 4px} .sub{color:#555;font-size:13px;margin-bottom:12px}
.controls{margin:10px 0 16px;font-size:14px} .controls label{margin-right:14px}
.legend{display:inline-flex;align-items:center;gap:6px;font-size:12px;color:#444}
.legend .bar{width:160px;height:12px;border:1px solid #ccc}
.group{border:1px solid #ddd;border-radius:6px;padding:12px 14px;margin:14px 0;background:#fcfcfc}
.ghead{font-size:14px;margin-bottom:8px} .ghead code{background:#eef;padding:1px 4px;border-radius:3px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.col h3{font-size:13px;margin:0 0 6px;color:#333}
.resp{border-left:3px solid #bbb;padding:4px 8px;margin-bottom:8px;background:#fff}
.resp.correct{border-left-color:#1a9850} .resp.wrong{border-left-color:#d73027}
.meta{font-size:11px;color:#666;margin-bottom:2px}
.toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:15px;line-height:2}
.tok{padding:1px 1px;margin:0 1px 0 0;border-radius:2px;cursor:default}
.tok:hover{outline:1px solid #333}
.none{color:#888;font-size:12px}
"""

_JS = """
function shadeBy(kind){
  document.querySelectorAll('.tok').forEach(function(s){
    s.style.background = kind === 'ratio' ? s.dataset.bgr : s.dataset.bgd;
  });
  document.getElementById('legend-ratio').style.display = kind === 'ratio' ? '' : 'none';
  document.getElementById('legend-delta').style.display = kind === 'delta' ? '' : 'none';
}
"""


def render_html(run_dir: str, step: int, records: list[dict], *, color: str = "ratio") -> str:
    """The page for one step's records."""
    r_scale, d_scale = _scales(records)
    rec0 = records[0]
    has_teacher = any(resp["delta"] for rec in records for resp in rec["responses"])
    groups = []
    for rec in records:
        correct = [r for r in rec["responses"] if r["correct"]]
        wrong = [r for r in rec["responses"] if not r["correct"]]
        cols = []
        for title, resps in (("correct responses", correct), ("wrong responses", wrong)):
            body = "".join(_response_html(r, r_scale, d_scale, color) for r in resps) or "<div class='none'>none</div>"
            cols.append(f"<div class='col'><h3>{title} ({len(resps)})</h3>{body}</div>")
        r_plus = "n/a" if rec["r_plus"] is None else html.escape(str(rec["r_plus"]))
        r_minus = "n/a" if rec["r_minus"] is None else html.escape(str(rec["r_minus"]))
        negative = {"r-": "r-", "policy": "the policy itself (RLSD)", "r+": "r+ (delta 0)", None: "none"}.get(
            rec["negative"], html.escape(str(rec["negative"]))
        )
        image = "".join(  # VL runs: the group's image(s), inline
            f"<img alt='image' src='data:image/png;base64,{b64}' style='height:64px;vertical-align:middle'> "
            for b64 in rec.get("images_png_b64") or []
        )
        groups.append(
            f"<div class='group' data-group='{rec['group']}'><div class='ghead'>{image}<b>group {rec['group']}</b>: "
            f"{html.escape(rec['question'])} &nbsp; answer <code>{html.escape(str(rec['answer']))}</code> &nbsp; "
            f"<b>r+</b> = <code class='rplus'>{r_plus}</code> &nbsp; <b>r-</b> = <code class='rminus'>{r_minus}</code>"
            f" &nbsp; <span class='sub'>negative context: {negative}</span></div>"
            f"<div class='cols'>{''.join(cols)}</div></div>"
        )
    checked_r = "checked" if color == "ratio" else ""
    checked_d = "checked" if color == "delta" else ""
    show_r = "" if color == "ratio" else "display:none"
    show_d = "" if color == "delta" else "display:none"
    note = "" if has_teacher else " (no teacher pass at this step: every token has A_t = A)"
    bar = f"background:linear-gradient(90deg,{shade(-1.0, 1.0)},#ffffff,{shade(1.0, 1.0)})"
    title = f"CEPO token-credit map: {os.path.basename(os.path.abspath(run_dir))}, step {step}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="sub">algorithm <b>{html.escape(rec0["algorithm"])}</b> &middot; lam = {fmt(rec0["lam"])} &middot;
eps_w = {fmt(rec0["eps_w"])} &middot; {len(records)} group(s){note}. Hover a token for its numbers.
A_t/A &gt; 1 (green): the token gets more than its sequence's advantage (more reinforcement in a correct
response, more penalty in a wrong one); &lt; 1 (purple): less.
<code>A_t/A = 1 + lam (c_t - 1)</code>;
<code>delta_t = log P(y_t | prompt, r+, y&lt;t) - log P(y_t | negative, y&lt;t)</code>.</div>
<div class="controls">shade tokens by:
<label><input type="radio" name="shade" value="ratio" {checked_r} onchange="shadeBy('ratio')"> A_t / A</label>
<label><input type="radio" name="shade" value="delta" {checked_d} onchange="shadeBy('delta')"> delta_t</label>
<span class="legend" id="legend-ratio" style="{show_r}">{fmt(1 - r_scale)} (less credit)
<span class="bar" style="{bar}"></span> {fmt(1 + r_scale)} (more credit)</span>
<span class="legend" id="legend-delta" style="{show_d}">{fmt(-d_scale)} (r- likelier)
<span class="bar" style="{bar}"></span> {fmt(d_scale)} (r+ likelier)</span></div>
{"".join(groups)}
<script>{_JS}</script>
</body></html>
"""


def render_png(
    records: list[dict], path: str, *, color: str = "ratio", max_responses: int = 3, title: str = ""
) -> None:
    """The map as an image: per group up to ``max_responses`` correct and wrong responses, token boxes shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    r_scale, d_scale = _scales(records)
    char_w, line_h, width_chars = 0.0105, 1.0, 80
    lines = []  # (kind, payload)
    for rec in records:
        head = (
            f"group {rec['group']}: {rec['question']}   r+ = {rec['r_plus']}   r- = {rec['r_minus']}   "
            f"(lam {fmt(rec['lam'])})"
        )
        lines.append(("head", head))
        for label, want in (("correct", True), ("wrong", False)):
            resps = [r for r in rec["responses"] if r["correct"] == want][:max_responses]
            for resp in resps:
                lines.append(("label", f"{label}  reward {fmt(resp['reward'])}  A = {fmt(resp['A'])}", want))
                row, n = [], 0
                for j, tok in enumerate(resp["tokens"]):
                    rt = ratio(resp["A_t"][j], resp["A"])
                    d = resp["delta"][j] if resp["delta"] else None
                    v, sc = ((None if rt is None else rt - 1.0), r_scale) if color == "ratio" else (d, d_scale)
                    shown = "\u21b5" if tok == "\n" else tok
                    if n + len(shown) > width_chars and row:
                        lines.append(("toks", row))
                        row, n = [], 0
                    row.append((shown, shade(v, sc)))
                    n += max(1, len(shown))
                if row:
                    lines.append(("toks", row))
        lines.append(("gap", ""))
    fig_h = 0.6 + 0.22 * len(lines)
    fig = plt.figure(figsize=(10, fig_h), dpi=150)
    ax = fig.add_axes([0.01, 0.01, 0.98, 1 - 0.5 / fig_h])
    ax.set_xlim(0, 1)
    ax.set_ylim(len(lines) * line_h, 0)
    ax.axis("off")
    for y, item in enumerate(lines):
        kind = item[0]
        if kind == "head":
            ax.text(0, y + 0.7, item[1], fontsize=8.5, fontweight="bold", family="monospace")
        elif kind == "label":
            ax.text(0.01, y + 0.7, item[1], fontsize=7, color="#1a9850" if item[2] else "#d73027")
        elif kind == "toks":
            x = 0.02
            for shown, bg in item[1]:
                w = char_w * max(1, len(shown))
                ax.add_patch(Rectangle((x, y + 0.1), w, 0.8, facecolor=bg, edgecolor="none"))
                ax.text(x + w / 2, y + 0.72, shown.replace("$", r"\$"), fontsize=8, family="monospace", ha="center")
                x += w
    legend = (
        f"shade: A_t/A from {fmt(1 - r_scale)} (purple, less credit) to {fmt(1 + r_scale)} (green, more credit)"
        if color == "ratio"
        else f"shade: delta_t from {fmt(-d_scale)} (purple) to {fmt(d_scale)} (green, r+ makes the token likelier)"
    )
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=8, y=1 - 0.05 / fig_h, va="top")
    fig.savefig(path)
    plt.close(fig)


def visualize(
    run_dir: str,
    *,
    step: int | None = None,
    out: str = "credit.html",
    png: str | None = None,
    max_groups: int | None = None,
    color: str = "ratio",
) -> list[str]:
    """``cepo viz``: write the HTML map (and the PNG if asked); returns the paths written."""
    if color not in ("ratio", "delta"):
        raise VizError(f"--color: expected 'ratio' or 'delta', got {color!r}")
    step, records = load_step(run_dir, step)
    if max_groups is not None:
        records = records[: max(1, max_groups)]
    written = []
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(render_html(run_dir, step, records, color=color))
    written.append(out)
    if png:
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        title = f"token credit, {os.path.basename(os.path.abspath(run_dir))} step {step}"
        render_png(records, png, color=color, title=title)
        written.append(png)
    return written
