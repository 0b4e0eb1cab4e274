"""report.html of an audit: one self-contained page (plots inline as base64 PNG, no external resource).

Sections: the counts and the cut-off; the score distribution with the cut-off line; the most flagged
examples with their scores and text; the composition of flagged versus kept (formats from
safedata.analysis, answer length, assistant turns); examples that could not be scored; the settings and
the data's sha256.
"""
from __future__ import annotations

import html
import json
import math

import numpy as np

from .analysis import CATEGORIES, composition
from .plots import plt, png_data_uri
from .store import atomic_write_text

TEXT_LIMIT = 600  # characters of each turn shown for a flagged example


def _figure(width=7.0, height=3.2):
    return plt.subplots(figsize=(width, height))


def distribution_plot(totals: np.ndarray, flagged: np.ndarray, cutoff: float) -> str:
    finite = totals[np.isfinite(totals)]
    figure, axes = _figure()
    bins = np.histogram_bin_edges(finite, bins=min(60, max(10, int(math.sqrt(len(finite))) + 1)))
    mask = np.zeros(len(totals), dtype=bool)
    mask[flagged] = True
    kept_scores = totals[~mask & np.isfinite(totals)]
    axes.hist([kept_scores, totals[mask]], bins=bins, stacked=True, color=["#4c78a8", "#e45756"],
              label=[f"kept ({len(kept_scores)})", f"flagged ({int(mask.sum())})"])
    if math.isfinite(cutoff):
        axes.axvline(cutoff, color="black", linestyle="--", linewidth=1, label=f"cut-off {cutoff:.4g}")
    axes.set_xlabel("score (weighted sum over anchor sets)")
    axes.set_ylabel("examples")
    axes.legend(loc="upper left", fontsize=8)
    axes.set_title("Score distribution")
    return png_data_uri(figure)


def composition_plot(flagged: dict, kept: dict) -> str:
    figure, axes = _figure()
    x = np.arange(len(CATEGORIES))
    axes.bar(x - 0.2, [kept["shares"][c] * 100 for c in CATEGORIES], 0.4, label=f"kept ({kept['n']})",
             color="#4c78a8")
    axes.bar(x + 0.2, [flagged["shares"][c] * 100 for c in CATEGORIES], 0.4, label=f"flagged ({flagged['n']})",
             color="#e45756")
    axes.set_xticks(x, list(CATEGORIES), rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("% of examples")
    axes.legend(fontsize=8)
    axes.set_title("Composition: flagged vs kept")
    return png_data_uri(figure)


def _turns(example) -> int:
    if example.messages is not None:
        return sum(m["role"] == "assistant" for m in example.messages)
    return 1 if example.response is not None else 0


def _group_stats(examples) -> dict:
    result = composition(examples)
    turns = [_turns(e) for e in examples]
    result["turns"] = {"mean": round(float(np.mean(turns)), 2) if turns else 0.0,
                       "max": max(turns) if turns else 0}
    return result


def _conversation_html(example) -> str:
    messages = example.messages or ([{"role": "user", "content": example.instruction
                                      + ("\n\n" + example.input if example.input else "")}]
                                    + ([{"role": "assistant", "content": example.response}]
                                       if example.response is not None else []))
    parts = []
    for message in messages:
        text = message["content"]
        shown = text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + f" … [{len(text) - TEXT_LIMIT} more characters]"
        parts.append(f'<div class="turn {message["role"]}"><b>{html.escape(message["role"])}</b>: '
                     f'{html.escape(shown)}</div>')
    return "".join(parts)


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:0.9em;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.turn{white-space:pre-wrap;margin:2px 0}
.turn.assistant{color:#7a1f1f}.turn.system{color:#555}.num{font-family:monospace}img{max-width:100%}
.summary{font-size:1.05em;background:#f7f7f7;padding:0.8em;border-left:4px solid #e45756}
"""


def write_report(path, cfg, meta, summary, scored, totals, flagged_positions, examples) -> None:
    by_index = {e.index: e for e in examples}
    flagged_index_set = {int(scored.indices[p]) for p in flagged_positions}
    flagged_examples = [e for e in examples if e.index in flagged_index_set]
    kept_examples = [e for e in examples if e.index not in flagged_index_set]
    flagged_stats, kept_stats = _group_stats(flagged_examples), _group_stats(kept_examples)
    names = list(scored.columns)
    cut = summary["cutoff"]
    rule = (f"top {cfg.drop_fraction:.1%} of scored examples" if cfg.drop_fraction is not None else
            f"top {cfg.drop_k} examples" if cfg.drop_k is not None else f"score ≥ {cfg.threshold}")

    top_rows = []
    for rank, position in enumerate(flagged_positions[: cfg.report_top]):
        example = by_index[int(scored.indices[position])]
        per_anchor = "<br>".join(f"{html.escape(n)}: <span class=num>{scored.columns[n][position]:.4f}</span>"
                                 for n in names)
        top_rows.append([rank + 1, example.index, f"<span class=num>{html.escape(example.id)}</span>",
                         f"<span class=num>{totals[position]:.4f}</span>", per_anchor, _conversation_html(example)])

    def row(label, key):
        return [label, key(flagged_stats), key(kept_stats)]
    comp_rows = [row(f"{c}", lambda s, c=c: f"{s['shares'][c]:.1%} ({s['counts'][c]})") for c in CATEGORIES]
    comp_rows += [row("answer words, mean / median",
                      lambda s: f"{s['response_words']['mean']} / {s['response_words']['median']}"),
                  row("assistant turns, mean / max", lambda s: f"{s['turns']['mean']} / {s['turns']['max']}"),
                  row("examples", lambda s: s["n"])]

    unscored = summary["unscored_kept"]
    unscored_html = ("<p>Every record was scored.</p>" if not unscored else
                     "<p>Not scored, therefore kept (check them by hand):</p>" + _table(
                         ["index", "id", "reason"],
                         [[u.get("index", ""), html.escape(str(u.get("id", ""))),
                           html.escape(u.get("reason", "") + (": " + u["error"] if "error" in u else ""))]
                          for u in unscored]))
    settings = meta["settings"]
    settings_rows = [[html.escape(k), f"<span class=num>{html.escape(json.dumps(v, ensure_ascii=False))}</span>"]
                     for k, v in settings.items()]
    settings_rows.append(["scores from", f"<span class=num>{html.escape(json.dumps(meta['method']))}</span>"])
    settings_rows.append(["data sha256", f"<span class=num>{meta['data_sha256']}</span>"])

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>safedata audit: {html.escape(str(cfg.data_path))}</title>
<style>{STYLE}</style></head><body>
<h1>Audit of <code>{html.escape(str(cfg.data_path))}</code></h1>
<p class="summary">Flagged <b>{summary['n_flagged']}</b> of {summary['n_records']} records ({rule}; cut-off score
<span class=num>{cut:.4g}</span>); kept {summary['n_kept']}. Scored {summary['n_scored']}; {len(unscored)} not scored
(kept). Method: <b>{html.escape(str(meta['method'].get('method')))}</b>; anchor sets and weights:
{html.escape(', '.join(f'{n} ({w:+g})' for n, w in zip(names, settings['weights'])))}.
Kept file: <code>{html.escape(summary['kept'])}</code>.</p>
<h2>Score distribution</h2>
<p>Score = Σ weight × similarity to each anchor set (harmful +, safe −): higher means closer to harmful
compliance and further from refusal.</p>
<img id="distribution" alt="score distribution with the cut-off" src="{distribution_plot(totals, flagged_positions, cut)}">
<h2>Most flagged examples (top {min(cfg.report_top, len(flagged_positions))} of {len(flagged_positions)})</h2>
{_table(["rank", "index", "id", "score", "per anchor set", "conversation"], top_rows)
 if top_rows else "<p>No example was flagged.</p>"}
<h2>Composition: flagged vs kept</h2>
<img id="composition" alt="composition of flagged vs kept" src="{composition_plot(flagged_stats, kept_stats)}">
{_table(["", "flagged", "kept"], comp_rows)}
<h2>Not scored</h2>
{unscored_html}
<h2>Settings</h2>
{_table(["setting", "value"], settings_rows)}
</body></html>
"""
    atomic_write_text(path, page)
