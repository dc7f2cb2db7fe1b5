#!/usr/bin/env python3
"""An overbooked pickup time, tried as a new user would against `make run`.

Books N Small deliveries (default 2,100) for one pickup time with the demo account (honouring
429 + Retry-After), then one booking for another day, and reports: how long that booking took to
be `scheduled`, whether the Scheduler's leases keep being renewed, and how the overbooked ones end
(`scheduled`, or `failed` with `no-drone-available` once the capacity wait is over).

Usage: make run (in another terminal), then
    python3 scripts/overbooked-slot.py [--count 2100] [--wait-minutes 12]
"""

import argparse
import concurrent.futures
import datetime as dt
import json
import time
import urllib.error
import urllib.request


def creds(path="data/credentials.env"):
    out = {}
    with open(path) as f:
        for line in f:
            if "=" in line:
                k, v = line.strip().split("=", 1)
                out[k] = v.strip("'\"")
    return out


def call(method, url, token, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode(errors="replace")
        return e.code, dict(e.headers), body


def book(c, pickup):
    body = {
        "ownerId": c["CLIENT_ACCOUNT_ID"],
        "pickupLocation": "1 Main St",
        "dropOffLocation": "2 Side St",
        "pickupTime": pickup,
        "deadline": "",
        "expedited": False,
        "confirmationRequired": "None",
        "packageInfo": {"packageId": "p", "size": "Small", "weight": 1.0},
    }
    while True:
        status, headers, answer = call("POST", "http://127.0.0.1:8080/api/deliveryrequests", c["CLIENT_TOKEN"], body)
        if status == 202:
            return answer["deliveryId"]
        if status in (429, 503):
            time.sleep(float(headers.get("Retry-After", "1")))
            continue
        raise SystemExit(f"booking refused: {status} {answer}")


def state(c, delivery_id):
    # The client's view, paced by the per-account rate limit (429 + Retry-After) like any client.
    while True:
        status, headers, body = call("GET", f"http://127.0.0.1:8080/api/deliveryrequests/{delivery_id}", c["CLIENT_TOKEN"])
        if status == 429:
            time.sleep(float(headers.get("Retry-After", "1")))
            continue
        return body if status == 200 else {"state": f"http {status}"}


def leases(c):
    _, _, body = call("GET", "http://127.0.0.1:8085/api/partitions", c["SERVICE_TOKEN"])
    return {p["partition"]: (p["token"], p["expiresAt"]) for p in body}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2100)
    ap.add_argument("--wait-minutes", type=float, default=12.0)
    args = ap.parse_args()
    c = creds()
    day = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=2)
    busy = day.replace(hour=10, minute=0, second=0).isoformat().replace("+00:00", "Z")
    other = (day + dt.timedelta(days=1)).replace(hour=15, minute=0, second=0).isoformat().replace("+00:00", "Z")

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: book(c, busy), range(args.count)))
    with open("data/overbooked-ids.txt", "w") as f:
        f.write("\n".join(ids))
    print(f"{len(ids)} bookings for {busy} accepted in {time.time() - started:.1f} s")

    before = leases(c)
    t0 = time.time()
    lone = book(c, other)
    while state(c, lone).get("state") != "scheduled":
        if time.time() - t0 > 120:
            raise SystemExit(f"the booking for {other} is still {state(c, lone)} after 120 s")
        time.sleep(0.2)
    print(f"booking for another day ({other}) scheduled {time.time() - t0:.2f} s after its 202")
    time.sleep(5)
    after = leases(c)
    renewed = all(after[p][1] > before[p][1] and after[p][0] == before[p][0] for p in before)
    print(f"leases renewed while {args.count} sagas wait: {renewed} (same epochs: {[after[p][0] for p in sorted(after)]})")

    deadline = time.time() + args.wait_minutes * 60
    while True:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            states = list(pool.map(lambda i: state(c, i), ids))
        counts = {}
        for s in states:
            key = s.get("state")
            if key == "failed":
                key += " (no-drone-available)" if "no-drone-available" in json.dumps(s) else " (other)"
            counts[key] = counts.get(key, 0) + 1
        print(f"after {time.time() - started:.0f} s: {counts}", flush=True)
        if all(s.get("state") in ("scheduled", "failed", "compensated", "compensating") for s in states):
            break
        if time.time() > deadline:
            raise SystemExit("not every overbooked booking has an answer within the wait")
        time.sleep(10)
    print("every overbooked booking has an answer; stop make run with Ctrl-C and time it")


if __name__ == "__main__":
    main()
