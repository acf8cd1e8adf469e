#!/usr/bin/env python3
"""Load driver for Parley Work's BOINC front end: simulated BOINC clients posting scheduler
requests shaped like a real boinc 7.20.5 client's (the research's sched_request_example.xml:
~6 KB, host info, preferences, time and network statistics), each on a new connection as
libcurl does, from several threads. Prints one JSON line per run.

  bench-boinc.py --url http://127.0.0.1:PORT/ --mode poll  --clients 32 --seconds 10
  bench-boinc.py --url http://127.0.0.1:PORT/ --mode cycle --clients 32 --jobs 2000

poll:  requests for work from an empty queue (the common RPC of a project with many clients);
       RPCs per second over --seconds.
cycle: every client asks for work, gets a job, and reports it (exit status 0) in its next RPC,
       until --jobs jobs were reported and acknowledged; RPCs and jobs per second.
"""
import argparse
import http.client
import json
import os
import re
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "Tests", "ParleyBOINCTests", "Fixtures", "sched_request_example.xml")


def request_body(template, cpid, seconds, results):
    body = template.replace("93f16688a48d53cd65d23a42ff9efb8b", cpid)
    body = re.sub(r"<work_req_seconds>[^<]*</work_req_seconds>", f"<work_req_seconds>{seconds:f}</work_req_seconds>", body)
    body = re.sub(r"<cpu_req_secs>[^<]*</cpu_req_secs>", f"<cpu_req_secs>{seconds:f}</cpu_req_secs>", body)
    body = body.replace("<cpu_req_instances>2.000000</cpu_req_instances>", "<cpu_req_instances>1.000000</cpu_req_instances>")
    # A client that holds the key (as every client does after its first RPC).
    body = body.replace("<app_versions>", "<code_sign_key>\n1024\n00\n.\n</code_sign_key>\n<app_versions>")
    reports = "".join(
        f"<result>\n    <name>{name}</name>\n    <final_cpu_time>0.010000</final_cpu_time>\n"
        f"    <final_elapsed_time>0.020000</final_elapsed_time>\n    <exit_status>0</exit_status>\n    <state>5</state>\n"
        f"<stderr_out>\n<core_client_version>7.20.5</core_client_version>\n<![CDATA[\n<stderr_txt>\n\n</stderr_txt>\n]]>\n</stderr_out>\n</result>\n"
        for name in results)
    return body.replace("</scheduler_request>", reports + "</scheduler_request>").encode()


def post(host, port, path, body):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return data.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the scheduler URL")
    ap.add_argument("--mode", choices=["poll", "cycle"], default="poll")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--jobs", type=int, default=1000)
    args = ap.parse_args()
    u = urllib.parse.urlparse(args.url)
    template = open(EXAMPLE).read()
    lock = threading.Lock()
    counts = {"rpcs": 0, "jobs": 0, "acks": 0, "errors": 0}
    stop = threading.Event()
    deadline = time.monotonic() + args.seconds

    def client(i):
        cpid = f"bench{i:027d}"
        pending = []
        while not stop.is_set():
            if args.mode == "poll" and time.monotonic() >= deadline:
                break
            seconds = 3456.0
            try:
                reply = post(u.hostname, u.port, u.path, request_body(template, cpid, seconds, pending))
            except Exception:
                with lock:
                    counts["errors"] += 1
                continue
            acks = re.findall(r"<result_ack>\s*<name>([^<]+)</name>", reply)
            got = [n for n in re.findall(r"<name>([^<]+_r)</name>", reply) if n not in acks]
            with lock:
                counts["rpcs"] += 1
                counts["acks"] += len(acks)
                counts["jobs"] += len(got)
                if args.mode == "cycle" and counts["acks"] >= args.jobs:
                    stop.set()
            pending = [n for n in pending if n not in acks] + got
            if args.mode == "cycle" and not got and not pending and counts["jobs"] >= args.jobs:
                break

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    print(json.dumps({
        "mode": args.mode, "clients": args.clients, "seconds": round(elapsed, 2), "rpcs": counts["rpcs"],
        "rpcs_per_second": round(counts["rpcs"] / elapsed, 1), "jobs_handed_out": counts["jobs"], "reports_acked": counts["acks"],
        "jobs_per_second": round(counts["acks"] / elapsed, 1), "errors": counts["errors"],
    }))


if __name__ == "__main__":
    main()
