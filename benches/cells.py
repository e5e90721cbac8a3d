"""What the bench scripts read out of one load-generator report (its --json
file): shared by report.py and compare.sh.

`python3 benches/cells.py line REPORT.json LABEL` prints compare.sh's line."""
import json
import sys


def loadgen_ms_per_stream(c):
    """The load generator's own CPU ms per completed stream, if measured."""
    if not c.get("streams") or not c.get("loadgen_cpu_ms"):
        return None
    return c["loadgen_cpu_ms"] / c["streams"]


def cpu_over_loadgen(c):
    """The server's CPU per stream over the load generator's in the same run:
    it drifts much less than streams/s on a shared machine."""
    per = (c.get("server") or {}).get("cpu_ms_per_stream")
    lg = loadgen_ms_per_stream(c)
    return per / lg if per and lg else None


def line(c, label):
    """One run on one line: throughput, latency, memory, CPU and errors."""
    srv = c.get("server") or {}
    norm = cpu_over_loadgen(c)
    lg = loadgen_ms_per_stream(c)
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
