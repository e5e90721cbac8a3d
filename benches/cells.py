"""What the bench scripts read out of one load-generator report (its --json
file): shared by report.py and compare.sh.

`python3 benches/cells.py line REPORT.json LABEL` prints compare.sh's line."""
import json
import sys


def cpu_over_loadgen(c):
    """The server's CPU per stream over the load generator's in the same run:
    it drifts much less than streams/s on a shared machine."""
    per = (c.get("server") or {}).get("cpu_ms_per_stream")
    if not per or not c.get("streams") or not c.get("loadgen_cpu_ms"):
        return None
    return per / (c["loadgen_cpu_ms"] / c["streams"])


def line(c, label):
    """One run on one line: throughput, latency, memory, CPU and errors."""
    srv = c.get("server") or {}
    norm = cpu_over_loadgen(c)
    lg = c["loadgen_cpu_ms"] / c["streams"] if c.get("streams") and c.get("loadgen_cpu_ms") else None
    return (
        f"{label:>8}  {c['streams_per_s']:>9,.1f} streams/s"
        f"  ttft p50/p99 {c['ttft_ms']['p50']}/{c['ttft_ms']['p99']} ms"
        f"  rss {srv.get('peak_rss_mb')} MB  cpu/stream {srv.get('cpu_ms_per_stream')} ms"
        f"  loadgen {lg and round(lg, 3)} ms  norm {f'{norm:.3f}' if norm else '-'}"
        f"  errors {c['error_total']}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "line":
        sys.exit(__doc__)
    with open(sys.argv[2]) as f:
        print(line(json.load(f), sys.argv[3]))
