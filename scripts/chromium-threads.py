#!/usr/bin/env python3
"""Where headless Chromium's CPU goes, by process type and thread name.

    scripts/chromium-threads.py sample OUT.jsonl       # every 2 s until killed
    scripts/chromium-threads.py report OUT.jsonl FROM TO BROWSERS

`sample` records utime + stime (clock ticks) of every thread of every Chromium
process from /proc/<pid>/task/<tid>/stat. `report` takes the samples nearest to
the Unix times FROM and TO (say, inside a `bench_e2e` window) and prints each
(process type, thread name)'s share of one core, per browser. Threads that
started or ended between the two samples are left out, so run it inside a
window, not across a start.
"""
import collections
import json
import os
import re
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def process_type(pid):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return None
    if "chrom" not in cmd.split(" ")[0]:
        return None
    m = re.search(r"--type=(\S+)", cmd)
    kind = m.group(1) if m else "browser"
    sub = re.search(r"--utility-sub-type=(\S+)", cmd)
    return f"{kind}:{sub.group(1)}" if sub else kind


def sample(path):
    with open(path, "w") as out:
        while True:
            rows = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                kind = process_type(pid)
                if kind is None:
                    continue
                try:
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        st = open(f"/proc/{pid}/task/{tid}/stat").read()
                        name = st[st.index("(") + 1 : st.rindex(")")]
                        f = st[st.rindex(")") + 2 :].split()
                        rows.append([kind, name, int(pid), int(tid), int(f[11]) + int(f[12])])
                except OSError:
                    pass  # the process or thread ended while it was read
            out.write(json.dumps({"t": time.time(), "rows": rows}) + "\n")
            out.flush()
            time.sleep(2)


def report(path, start, end, browsers):
    samples = [json.loads(line) for line in open(path)]
    s0 = min(samples, key=lambda s: abs(s["t"] - start))
    s1 = min(samples, key=lambda s: abs(s["t"] - end))
    secs = s1["t"] - s0["t"]
    if secs <= 0:
        sys.exit("no two samples inside that window")
    before = {(r[2], r[3]): r[4] for r in s0["rows"]}
    share = collections.Counter()
    for kind, name, pid, tid, ticks in s1["rows"]:
        if (pid, tid) in before:
            share[(kind, name)] += (ticks - before[(pid, tid)]) / TICKS / secs * 100 / browsers
    print(f"{secs:.1f} s; % of one core per browser")
    print(f"{'total':<50} {sum(share.values()):6.2f}")
    for (kind, name), pct in share.most_common():
        if pct >= 0.05:
            print(f"{kind[:30] + ' ' + name:<50} {pct:6.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sample":
        sample(sys.argv[2])
    elif len(sys.argv) == 6 and sys.argv[1] == "report":
        report(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)
