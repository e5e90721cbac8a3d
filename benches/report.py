#!/usr/bin/env python3
"""Turns the per-cell JSON reports of run-matrix.sh into results.md and results.json,
with each server cell as a ratio of the ceiling cell measured in the same run,
and the issue's targets checked.

With repeats (REPEAT=N: each cell's targets run N times, interleaved), a
ratio is taken per repeat, against the ceiling run just before it, and the
median of those is reported and checked; the table shows the median run."""
import json
import pathlib
import statistics
import sys

from cells import cpu_over_loadgen  # benches/cells.py, shared with compare.sh

NODE_BEST_D0_C50 = 376.0  # streams/s of the Node 24 reference server, best run (issue 10)

out = pathlib.Path(sys.argv[1])
runs = {}
for p in sorted(out.glob("d*-c*-*.json")):
    r = json.loads(p.read_text())
    r["target"] = r["tags"]["target"]
    r["delay_ms"] = int(r["tags"]["delay_ms"])
    r["repeat"] = int(r["tags"].get("repeat", 1))
    runs.setdefault((r["delay_ms"], r["concurrency"], r["target"]), []).append(r)


def per_repeat_ratios(key, value):
    """value(run) / value(ceiling run of the same repeat), for every repeat that has both."""
    ce = {r["repeat"]: r for r in runs.get((key[0], key[1], "ceiling"), [])}
    out = []
    for r in runs[key]:
        c = ce.get(r["repeat"])
        if c and value(r) and value(c):
            out.append(value(r) / value(c))
    return out


cells = []
for key, rs in runs.items():
    rs.sort(key=lambda r: r["streams_per_s"])
    c = dict(rs[(len(rs) - 1) // 2])  # the median run by streams/s (the lower one of two)
    c["repeats"] = len(rs)
    c["error_total"] = sum(r["error_total"] for r in rs)
    rss = [r["server"]["peak_rss_mb"] for r in rs if r.get("server") and r["server"].get("peak_rss_mb")]
    if rss:
        c["server"] = dict(c["server"], peak_rss_mb=max(rss))
    ratios = per_repeat_ratios(key, lambda r: r["streams_per_s"])
    c["ratios_to_ceiling"] = [round(x, 3) for x in ratios]
    c["ratio_to_ceiling"] = round(statistics.median(ratios), 3) if ratios else None
    ttft = per_repeat_ratios(key, lambda r: r["ttft_ms"]["p99"])
    c["ttft_p99_ratios"] = [round(x, 3) for x in ttft]
    c["ttft_p99_ratio"] = round(statistics.median(ttft), 3) if ttft else None
    c["runs"] = [{k: r.get(k) for k in ("repeat", "streams_per_s", "ttft_ms", "full_ms", "error_total")} for r in rs]
    cells.append(c)

by = {(c["delay_ms"], c["concurrency"], c["target"]): c for c in cells}
repeats = max((c["repeats"] for c in cells), default=1)
order = {"ceiling": 0, "sqlite": 1, "postgres": 2}
cells.sort(key=lambda c: (c["delay_ms"], c["concurrency"], order.get(c["target"], 9)))


def ceiling(c):
    return by.get((c["delay_ms"], c["concurrency"], "ceiling"))


def fmt(x, nd=0):
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


rows = []
for c in cells:
    ratio = c["ratio_to_ceiling"]
    spread = ""
    if len(c["ratios_to_ceiling"]) > 1 and c["target"] != "ceiling":
        spread = f" ({min(c['ratios_to_ceiling']):.2f}-{max(c['ratios_to_ceiling']):.2f})"
    # All users start together: while the median stream outlasts the warmup, the
    # window still sees the first wave of completions, not a steady state.
    c["steady"] = c["full_ms"]["p50"] is not None and c["full_ms"]["p50"] <= 1000 * c["warmup_s"]
    srv = c.get("server") or {}
    errs = ", ".join(f"{k}: {v}" for k, v in c["errors"].items()) or "0"
    rows.append(
        f"| {c['delay_ms']} | {c['concurrency']:,} | {c['target']} | {fmt(c['streams_per_s'])}{'' if c['steady'] else ' †'} "
        f"| {(fmt(ratio, 2) + spread) if c['target'] != 'ceiling' else '1'} "
        f"| {fmt(c['ttft_ms']['p50'], 1)} / {fmt(c['ttft_ms']['p99'], 1)} "
        f"| {fmt(c['full_ms']['p50'], 0)} / {fmt(c['full_ms']['p99'], 0)} "
        f"| {errs} | {fmt(srv.get('peak_rss_mb'), 0)} | {fmt(srv.get('cpu_ms_per_stream'), 2)} "
        f"| {fmt(cpu_over_loadgen(c), 2)} |"
    )

checks = []


def over_repeats(median, ratios, unit=""):
    """A median ratio with the per-repeat ones it came from."""
    return f"median {median:.2f}{unit} over {len(ratios)} repeats ({', '.join(f'{x:.2f}' for x in ratios)})"


def ratio_detail(c):
    rs = c["ratios_to_ceiling"]
    if len(rs) > 1:
        return over_repeats(c["ratio_to_ceiling"], rs)
    return f"{c['ratio_to_ceiling']:.2f}"


def check(name, ok, detail):
    checks.append({"target": name, "holds": ok, "measured": detail})


for t in ("sqlite", "postgres"):
    c = by.get((0, 50, t))
    if c:
        ce = ceiling(c)
        s = c["streams_per_s"]
        check(f"{t}: 0 ms / 50 clients >= 10x Node ({10 * NODE_BEST_D0_C50:.0f} streams/s)",
              s >= 10 * NODE_BEST_D0_C50, f"{s:,.0f} streams/s ({s / NODE_BEST_D0_C50:.1f}x Node's best)")
        if ce:
            check(f"{t}: 0 ms / 50 clients >= 0.3 of ceiling", c["ratio_to_ceiling"] >= 0.3,
                  ratio_detail(c))
    c = by.get((20, 500, t))
    if c and ceiling(c) and c["ttft_p99_ratio"]:
        r = c["ttft_p99_ratio"]
        if c["repeats"] > 1:
            detail = over_repeats(r, c["ttft_p99_ratios"], "x")
        else:
            detail = f"{c['ttft_ms']['p99']} ms vs {ceiling(c)['ttft_ms']['p99']} ms ({r:.2f}x)"
        check(f"{t}: 20 ms / 500 clients TTFT p99 <= 1.2x ceiling's", r <= 1.2, detail)
    for n in (5000, 10000):
        c = by.get((20, n, t))
        if not c:
            continue
        check(f"{t}: 20 ms / {n:,} clients zero errors", c["error_total"] == 0, str(c["error_total"]))
        if ceiling(c):
            check(f"{t}: 20 ms / {n:,} clients >= 0.8 of ceiling", c["ratio_to_ceiling"] >= 0.8,
                  ratio_detail(c) + ("" if c["steady"] else " (not a steady state, see †)"))
        if n == 10000 and c.get("server"):
            rss = c["server"]["peak_rss_mb"]
            check(f"{t}: 20 ms / 10,000 clients RSS < 400 MB", rss is not None and rss < 400, f"{rss} MB")
for (d, n, t), c in sorted(by.items()):
    if t != "sqlite":
        continue
    pg = by.get((d, n, "postgres"))
    if pg and c["streams_per_s"] and pg["streams_per_s"]:
        r = max(c["streams_per_s"], pg["streams_per_s"]) / min(c["streams_per_s"], pg["streams_per_s"])
        check(f"SQLite vs Postgres within 2x at {d} ms / {n:,} clients", r <= 2.0, f"{r:.2f}x")

machine = (out / "machine.txt").read_text() if (out / "machine.txt").exists() else ""
md = [
    f"# Load bench results ({out.name})",
    "",
    "```",
    machine.strip(),
    "```",
    "",
    "64-token answers; each virtual user has one keep-alive connection and its own chat, "
    "and posts a message and reads the stream to `[DONE]` in a loop. "
    "Ratio = streams/s over the ceiling's in the same run"
    + (f" (median of {repeats} repeats, each against the ceiling run just before it; range in brackets; "
       "the row shows the median run, errors summed, RSS the highest)" if repeats > 1 else "")
    + ". RSS = the server's peak (VmHWM); "
    "CPU = server user+system CPU ms per completed stream in the measured window; "
    "CPU / load gen's = that over the load generator's own CPU per stream in the same run.",
    "",
    "| delay ms | clients | target | streams/s | ratio | TTFT p50 / p99 ms | full p50 / p99 ms | errors | peak RSS MB | CPU ms/stream | CPU / load gen's |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
    *rows,
    "",
    "† not a steady state: the median stream took longer than the warmup, so the "
    "measured window still counts the first wave of streams that all users started together.",
    "",
    "## Targets (issue 10)",
    "",
    "| target | holds | measured |",
    "|---|---|---|",
    *[f"| {k['target']} | {'yes' if k['holds'] else '**no**'} | {k['measured']} |" for k in checks],
    "",
]
(out / "results.md").write_text("\n".join(md))
(out / "results.json").write_text(json.dumps({"cells": cells, "checks": checks}, indent=2))
