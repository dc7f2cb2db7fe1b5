#!/usr/bin/env python3
"""Summary of one `make bench` run (scripts/bench.sh): reads the outputs the benchmarks left in
target/bench/summary/ and writes a table with the date, the machine and the goals of DESIGN §9
into docs/BENCHMARKS.md, between the `bench-summary` markers (replacing the previous summary)."""

import argparse
import datetime
import pathlib
import re

START = "<!-- bench-summary:start (written by make bench; edit scripts/bench_summary.py) -->"
END = "<!-- bench-summary:end -->"


def num(cell):
    """The first number in a table cell ('≈ 8,600' → 8600.0), or None."""
    m = re.search(r"-?[\d,]*\.?\d+", cell.replace("\u2009", ""))
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def rows(text):
    """Markdown table rows as lists of stripped cells (separator rows skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            line = line[len("RESULT "):]
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def read(d, name):
    out = d / f"{name}.out"
    status = d / f"{name}.status"
    st = status.read_text().split() if status.exists() else ["not-run"]
    return (out.read_text(errors="replace") if out.exists() else ""), st


def state(st):
    if st[0] == "ok":
        return f"ran in {st[1]} s" if len(st) > 1 else "ran"
    if st[0] == "failed":
        return "**failed** (see its output)"
    return "not run"


def higher(kept, row, col):
    """`row` if its number in column `col` beats `kept`'s (or nothing is kept yet)."""
    return row if kept is None or num(row[col]) > num(kept[col]) else kept


def messaging(d):
    text, st = read(d, "messaging")
    best, queue = None, None
    for r in rows(text):
        if len(r) == 11 and r[0].startswith("rabbitmq") and num(r[3]) is not None:
            best = higher(best, r, 3)
        if len(r) == 6 and r[0].startswith("rabbitmq") and num(r[2]) is not None:
            queue = r
    figure = "no result"
    if best:
        figure = (f"{num(best[3]):,.0f} confirmed appends/s (batch {best[1]}), "
                  f"p99 {best[6]} ms")
        if queue:
            figure += f"; quorum queue {num(queue[2]):,.0f} confirmed publishes/s"
    return figure, state(st)


def ingest(d):
    text, st = read(d, "ingest")
    # The highest offered rate without errors, and the highest that also met the latency goal
    # (p99 < 50 ms).
    sustained, in_goal, spike = None, None, None
    for r in rows(text):
        if len(r) < 13 or num(r[1]) is None or r[0] == "run":
            continue
        if "spike" in r[0]:
            spike = r
        elif r[11] == "none":
            sustained = higher(sustained, r, 1)
            if (num(r[8]) or 1e9) < 50:
                in_goal = higher(in_goal, r, 1)
    figure = "no run without errors"
    if sustained:
        figure = (f"{num(sustained[4]):,.0f} accepted/s at {num(sustained[1]):,.0f} offered/s "
                  f"without errors, p99 {sustained[8]} ms")
        if in_goal and in_goal is not sustained:
            figure += (f"; p99 under 50 ms up to {num(in_goal[1]):,.0f}/s "
                       f"(p99 {in_goal[8]} ms)")
    if spike:
        figure += (f"; spike {num(spike[1]):,.0f}/s: {num(spike[3]):,.0f} of "
                   f"{num(spike[2]):,.0f} in time, errors: {spike[11]}")
    return figure, state(st)


def e2e(d):
    text, st = read(d, "e2e")
    # The best scheduled/s, and the highest offered rate it kept up with (≥ 95 % scheduled).
    best, kept = None, None
    lost = 0
    for r in rows(text):
        if len(r) < 9 or "×" not in r[0] or num(r[3]) is None:
            continue
        lost += int((num(r[1]) or 0) - (num(r[2]) or 0))
        best = higher(best, r, 3)
        if num(r[3]) >= 0.95 * (num(r[0]) or 0):
            kept = higher(kept, r, 0)
    figure = "no result"
    if best:
        figure = (f"{num(best[3]):,.0f} scheduled/s overall, {num(best[4]):,.0f}/s peak 5 s "
                  f"(offered {best[0]}), p99 booking→scheduled {num(best[7]):,.0f} ms; "
                  f"accepted but not scheduled in all runs: {lost}")
        if kept:
            figure += (f"; kept up with {kept[0]} offered: p99 booking→scheduled "
                       f"{num(kept[7]):,.0f} ms")
    return figure, state(st)


def recovery(d):
    text, st = read(d, "recovery")
    m = re.search(r"RECOVERY scheduler kill: scheduler ready (\d+) ms after its restart, "
                  r"first saga completed after (\d+) ms", text)
    inv = re.search(r"scheduler kill: invariants hold — (.*)", text)
    if not m:
        return "no result", state(st)
    figure = (f"first saga completed {int(m.group(2)):,} ms after the restart "
              f"(ready after {int(m.group(1)):,} ms)")
    figure += f"; invariants hold: {inv.group(1).strip()}" if inv else "; **invariants not confirmed**"
    return figure, state(st)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--doc", required=True)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--postgres", default="?")
    ap.add_argument("--rabbitmq", default="?")
    ap.add_argument("--quick", default="0")
    ap.add_argument("--load", default="?")
    ap.add_argument("--when", help="time of the run (default: now), when re-summarising old outputs")
    a = ap.parse_args()
    d = pathlib.Path(a.dir)
    now = a.when or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = [
        ("Messaging: RabbitMQ stream appends, micro-batched", "ceiling ≈ 20,000 msg/s unbatched "
         "in flight; batching must beat it", *messaging(d), "`make bench-messaging`"),
        ("Ingestion: broker-confirmed bookings/s", "≥ 20,000/s with p99 < 50 ms; a 50,000/s spike "
         "without dropping or timing out", *ingest(d), "`make bench-ingest`"),
        ("End to end: completed sagas/s", "≥ 2,000/s", *e2e(d), "`make bench-e2e`"),
        ("Scheduler `kill -9` under load → first saga completed", "≤ 5 s, zero lost and zero "
         "duplicate bookings", *recovery(d),
         "`cargo nextest run --workspace -E 'binary_id(integration-tests::chaos) and "
         "test(=scheduler_kill_under_load)'`"),
    ]
    mode = ("**shortened settings (`BENCH_QUICK=1`): these figures only prove the benchmarks "
            "run; they are not measurements**" if a.quick == "1" else "full default settings")
    lines = [
        START,
        f"## Summary of the last `make bench` ({now})",
        "",
        f"Machine: {a.machine}; PostgreSQL {a.postgres}, RabbitMQ {a.rabbitmq}, both local; "
        f"load average at the start {a.load} (other work on the machine counts). Mode: {mode}. "
        "Full outputs: `target/bench/summary/<name>.out`; the sections below explain each "
        "benchmark.",
        "",
        "| what | goal (DESIGN §9) | measured | run | command |",
        "|---|---|---|---|---|",
    ]
    for what, goal, figure, st, cmd in table:
        lines.append(f"| {what} | {goal} | {figure} | {st} | {cmd} |")
    lines.append(END)
    block = "\n".join(lines) + "\n"

    doc = pathlib.Path(a.doc)
    text = doc.read_text()
    if START.split(" (")[0] in text and END in text:
        before = text[: text.index(START.split(" (")[0])]
        after = text[text.index(END) + len(END):].lstrip("\n")
        text = before + block + "\n" + after
    else:
        # After the introduction (the first paragraph under the title).
        parts = text.split("\n\n", 2)
        text = parts[0] + "\n\n" + parts[1] + "\n\n" + block + "\n" + (parts[2] if len(parts) > 2 else "")
    doc.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
