"""Compile-time benchmark: ``treesched.compile`` at large lengths.

Target (issue: schedule compiler): length 1_048_576 compiles in under 10 s
and under 1 GB on a 2-core machine.  Each configuration runs in a fresh
subprocess so that the peak resident memory (``ru_maxrss``) it reports is
its own; the baseline (interpreter + numpy + treesched imported) is measured
the same way and subtracted.

Prints one JSON object per measurement (JSON lines); progress on stderr.

    python benchmarks/bench_compile.py            # 2^14 .. 2^20, all patterns
    python benchmarks/bench_compile.py --quick    # small lengths, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import treesched
length, pattern, outputs = int(sys.argv[1]), sys.argv[2], sys.argv[3]
outputs = int(outputs) if outputs.isdigit() else outputs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
schedule = treesched.compile(length, pattern, outputs) if length else None
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_kib": peak, "rss_before_kib": before,
                  "merges": schedule.num_merges if schedule else 0,
                  "depth": schedule.depth if schedule else 0}))
"""


def measure(length, pattern, outputs):
    result = subprocess.run([sys.executable, "-c", CHILD, str(length), pattern, str(outputs)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small lengths only")
    parser.add_argument("--out", help="also write all results to this JSON file")
    args = parser.parse_args(argv)
    lengths = [1 << 10, 1 << 12] if args.quick else [1 << 14, 1 << 17, 1 << 20]
    configs = [(n, "odd-even", "all") for n in lengths] + [(lengths[-1], "odd-even", "last")]
    configs += [(lengths[-1], p, "all") for p in ("sklansky", "kogge-stone", "sequential")]
    configs += [(lengths[-1], "reduce", "last")]
    baseline = measure(0, "odd-even", "all")["peak_rss_kib"]
    results = []
    for index, (length, pattern, outputs) in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] compile length={length} pattern={pattern} outputs={outputs}",
              file=sys.stderr, flush=True)
        row = measure(length, pattern, outputs)
        record = {"benchmark": "compile", "length": length, "pattern": pattern, "outputs": outputs,
                  "seconds": round(row["seconds"], 4), "merges": row["merges"], "depth": row["depth"],
                  "peak_rss_mib": round(row["peak_rss_kib"] / 1024, 1),
                  "compile_rss_mib": round((row["peak_rss_kib"] - baseline) / 1024, 1)}
        if length == 1 << 20 and pattern == "odd-even":
            record["target"] = "< 10 s and < 1024 MiB"
            record["meets_target"] = record["seconds"] < 10 and record["compile_rss_mib"] < 1024
        print(json.dumps(record), flush=True)
        results.append(record)
    if args.out:
        from treesched.fileio import write_text
        write_text(args.out, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
