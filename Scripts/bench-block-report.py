#!/usr/bin/env python3
"""Result handling for Scripts/bench-block.sh (Python standard library only).

  record  -- reads one fio JSON result (--output-format=json) or one summary of
             `parley block bench --json` (the parley-api systems), appends one line of
             JSON to a results file and prints a one-line summary for the progress log.
  report  -- reads all recorded lines, takes the median over repetitions for every
             (workload, system), prints a markdown table and optionally writes JSON.

Latency figures are fio's *total* latency (submission + completion, `lat_ns`), which
fio only turns into percentiles when the job ran with --lat_percentiles=1; for
`parley block bench`, the time from sending an IO to its answer.
"""

import argparse
import json
import statistics
import sys

MIB = 1024 * 1024


def load_fio_json(path):
    """fio's JSON, tolerating log lines before it (the nbd engine logs
    "fio: connected to NBD server" with log_info, which lands on stdout when
    --output is not used)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON object in fio output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def percentile(lat, key):
    pct = (lat or {}).get("percentile") or {}
    for k, v in pct.items():
        if abs(float(k) - key) < 1e-6:
            return v / 1000.0  # ns -> µs
    return None


def record_bench(a, rec):
    """One `parley block bench --json` summary (no client CPU figure)."""
    with open(a.bench, encoding="utf-8") as f:
        data = json.loads(f.read().strip().splitlines()[-1])
    if not isinstance(data, dict):
        raise ValueError("parley block bench printed no JSON object")
    if not data.get("ios"):
        raise ValueError("parley block bench completed no I/O")
    rec.update(
        iops=data["iops"], mibs=data["mib_s"], p50_us=data["p50_us"], p99_us=data["p99_us"],
        mean_us=None, ios=data["ios"], runtime_s=data["seconds"], client_cpu_us_per_io=None,
    )


def record_fio(a, rec):
    """One fio JSON result."""
    data = load_fio_json(a.fio)
    jobs = data.get("jobs") or []
    if len(jobs) != 1:  # the harness runs one job section with group_reporting
        raise ValueError(f"expected 1 job in fio output, got {len(jobs)}")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    dirs = [job[d] for d in ("read", "write", "trim") if job.get(d, {}).get("total_ios")]
    if not dirs:
        raise ValueError("fio completed no I/O")
    ios = sum(d["total_ios"] for d in dirs)
    main = max(dirs, key=lambda d: d["total_ios"])  # workloads are pure read or write
    runtime_s = max(d["runtime"] for d in dirs) / 1000.0
    rec.update(
        iops=sum(d["iops"] for d in dirs),
        mibs=sum(d["bw_bytes"] for d in dirs) / MIB,
        p50_us=percentile(main.get("lat_ns"), 50.0),
        p99_us=percentile(main.get("lat_ns"), 99.0),
        mean_us=(main.get("lat_ns") or {}).get("mean", 0) / 1000.0,
        ios=ios,
        runtime_s=runtime_s,
        # fio's own CPU (client side), for reference: µs of fio CPU per IO.
        client_cpu_us_per_io=(
            (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100.0
            * job.get("job_runtime", 0) * 1000.0 / ios
        ),
    )


def cmd_record(a):
    rec = {"rep": a.rep, "workload": a.workload, "system": a.system}
    try:
        if a.bench:
            record_bench(a, rec)
        else:
            record_fio(a, rec)
        # Server CPU was measured around the whole client process (connect + run +
        # disconnect, no ramp time), so dividing by every completed IO is consistent.
        if a.cpu_ns not in (None, ""):
            rec["server_cpu_us_per_io"] = float(a.cpu_ns) / 1000.0 / rec["ios"]
        else:
            rec["server_cpu_us_per_io"] = None
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, IndexError) as e:
        rec["error"] = str(e)
    with open(a.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    if "error" in rec:
        print(f"FAILED ({rec['error']})")
        return 1
    line = f"{rec['iops']:.0f} IOPS, {rec['mibs']:.1f} MiB/s"
    if rec["p50_us"] is not None:
        line += f", p50 {rec['p50_us']:.0f} µs, p99 {rec['p99_us']:.0f} µs"
    if rec["server_cpu_us_per_io"] is not None:
        line += f", server CPU {rec['server_cpu_us_per_io']:.2f} µs/IO"
    print(line)
    return 0


METRICS = ("iops", "mibs", "p50_us", "p99_us", "server_cpu_us_per_io", "client_cpu_us_per_io")


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def cmd_report(a):
    records = []
    with open(a.results, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    workloads = a.workloads.split(",")
    systems = a.systems.split(",")

    results = []
    by_key = {}
    for w in workloads:
        for s in systems:
            runs = [r for r in records if r["workload"] == w and r["system"] == s]
            ok = [r for r in runs if "error" not in r]
            if not runs:
                continue
            entry = {"workload": w, "system": s, "runs": len(ok), "failed_runs": len(runs) - len(ok)}
            for m in METRICS:
                entry[m] = median_or_none([r.get(m) for r in ok])
            iops = [r["iops"] for r in ok]
            # Spread of IOPS over repetitions, relative to the median: (max-min)/median.
            entry["iops_spread"] = (max(iops) - min(iops)) / entry["iops"] if len(iops) > 1 and entry["iops"] else None
            entry["samples"] = [{m: r.get(m) for m in ("rep",) + METRICS} for r in ok]
            results.append(entry)
            by_key[(w, s)] = entry

    def ratio(num, den):
        return num / den if num is not None and den else None

    for e in results:
        base = by_key.get((e["workload"], a.baseline))
        e["vs_baseline"] = {m: ratio(e[m], base[m]) if base else None for m in METRICS}

    meta = {}
    for kv in a.meta or []:
        k, _, v = kv.partition("=")
        meta[k] = int(v) if v.isdigit() else v
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "baseline": a.baseline, "results": results}, f, indent=2)
            f.write("\n")

    out = sys.stdout
    out.write(
        "Medians over repetitions. Latency is fio total latency (submit→complete) in µs "
        "(for parley-api systems, parley block bench's time from sending an IO to its answer). "
        f"'± IOPS' is (max−min)/median over repetitions. '× {a.baseline}' is IOPS relative to {a.baseline}. "
        "CPU µs/IO is server process CPU time (user+sys, all threads) per completed IO.\n\n"
    )
    header = ["workload", "system", "IOPS", "MiB/s", "p50 µs", "p99 µs", "CPU µs/IO", "± IOPS", f"× {a.baseline}"]
    out.write("| " + " | ".join(header) + " |\n")
    out.write("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|\n")
    for e in results:
        spread = f"{e['iops_spread'] * 100:.0f}%" if e["iops_spread"] is not None else "–"
        rel = e["vs_baseline"]["iops"]
        row = [
            e["workload"],
            e["system"] + (f" ({e['failed_runs']} failed)" if e["failed_runs"] else ""),
            fmt(e["iops"]),
            fmt(e["mibs"], 1),
            fmt(e["p50_us"]),
            fmt(e["p99_us"]),
            fmt(e["server_cpu_us_per_io"], 2),
            spread,
            f"{rel:.2f}" if rel is not None else "–",
        ]
        out.write("| " + " | ".join(row) + " |\n")
    return 0 if results else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--fio", help="fio's JSON output")
    src.add_argument("--bench", help="`parley block bench --json` output")
    r.add_argument("--out", required=True)
    r.add_argument("--rep", type=int, required=True)
    r.add_argument("--workload", required=True)
    r.add_argument("--system", required=True)
    r.add_argument("--cpu-ns", default="")
    q = sub.add_parser("report")
    q.add_argument("--results", required=True)
    q.add_argument("--workloads", required=True)
    q.add_argument("--systems", required=True)
    q.add_argument("--baseline", default="nbdkit-tcp")
    q.add_argument("--json")
    q.add_argument("--meta", action="append", help="key=value added to the JSON's meta object")
    a = p.parse_args()
    return cmd_record(a) if a.cmd == "record" else cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
