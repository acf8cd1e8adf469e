#!/usr/bin/env python3
"""Independent Parley Work submitter and native worker, written as an interoperability check.

Written from docs/protocol.md ONLY (section 19, on the Parley session of sections 1-12); no code
of the reference implementation was read. Python 3.11, the standard library, and the
`cryptography` package for Ed25519 (section 19.1: jobs are signed with Ed25519, RFC 8032).

The Parley codec and session (CRC-32C, protobuf, banner, frames, MESSAGE header, handshake,
requests) are IMPORTED from parley_client.py in the same directory (the independent Parley
client written from the same document); this file adds the schema of section 19.4 to its
tables at import.

    python3 parley_work_client.py --self-test [docs/protocol.md]
    python3 parley_work_client.py submit --master HOST:PORT --key work.key [--count N] [--shell] -- ARGV...
    python3 parley_work_client.py work --master HOST:PORT --trust work.pub [--name W] [--max-jobs N] [--idle-exit S]
    python3 parley_work_client.py scenario --master HOST:PORT --key work.key [--untrusting-master HOST:PORT]

Key files: `work.key` holds "parley-work-ed25519-private-key BASE64(32-byte seed)" and
`work.pub` "parley-work-ed25519-public-key BASE64(32 bytes)" (the format `parley work keygen`
writes; the document does not describe it). Raw 32-byte files and hex are accepted too.

Exit status: 0 when everything matched, 1 with a line naming the failed check.
"""
import argparse
import base64
import hashlib
import os
import re
import resource
import select
import shutil
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parley_client as pc  # noqa: E402  (the Parley layer: see the docstring)
from parley_client import ParleyError, CheckFailed, check, pb_decode, pb_encode  # noqa: E402

# Error codes 23-28 (section 10) are in parley_client.py's table; permissionDenied answers a
# master's command (19.8).
assert pc.CODE["permissionDenied"] == 23

# ---------------------------------------------------------------------------------------
# The schema of section 19.4 (package parley.work.v1), in parley_client.py's form:
# message -> [(number, json name, type, repeated)]. A map<string,string> is a repeated entry
# message {key = 1, value = 2} (protobuf's encoding of maps).
W = "parley.work.v1."
pc.ENUMS[W + "ErrorKind"] = ["ERROR_KIND_NONE", "ERROR_KIND_SIGNATURE", "ERROR_KIND_SPEC", "ERROR_KIND_COMPUTE",
                             "ERROR_KIND_DOWNLOAD", "ERROR_KIND_UPLOAD"]
_S = "string"
WORK_SCHEMA = {
    "StringEntry": [(1, "key", _S, False), (2, "value", _S, False)],
    "JobSpec": [(1, "argv", _S, True), (2, "env", "msg:" + W + "StringEntry", True), (3, "shell", "bool", False),
                (4, "maxWallSeconds", "uint32", False), (5, "maxOutputBytes", "uint64", False), (6, "name", _S, False),
                (7, "maxCpuSeconds", "uint32", False), (8, "maxMemoryBytes", "uint64", False),
                (9, "inputs", "msg:" + W + "InputFile", True), (10, "outputs", _S, True), (11, "app", _S, False),
                (12, "estimatedSeconds", "uint32", False)],
    "InputFile": [(1, "name", _S, False), (2, "content", "bytes", False), (3, "url", _S, False),
                  (4, "size", "uint64", False), (5, "sha256", "bytes", False)],
    "OutputFile": [(1, "name", _S, False), (2, "size", "uint64", False), (3, "sha256", "bytes", False),
                   (4, "content", "bytes", False)],
    "SignedJob": [(1, "spec", "bytes", False), (2, "signature", "bytes", False), (3, "priority", "int32", False),
                  (4, "maxAttempts", "uint32", False)],
    "SubmitJobs": [(1, "jobs", "msg:" + W + "SignedJob", True)],
    "SubmitReply": [(1, "jobIds", "uint64", True)],
    "WorkerHello": [(1, "worker", _S, False), (2, "platform", _S, False), (3, "cpus", "uint32", False),
                    (4, "memoryBytes", "uint64", False), (5, "slots", "uint32", False),
                    (6, "protocolVersion", "uint32", False), (7, "os", _S, False), (8, "diskBytes", "uint64", False),
                    (9, "apps", _S, True), (10, "resourceShare", "double", False), (11, "commands", "bool", False)],
    "WorkerWelcome": [(1, "master", _S, False), (2, "leaseSeconds", "uint32", False), (3, "protocolVersion", "uint32", False),
                      (4, "nextPublicKey", "bytes", False), (5, "rotationSignature", "bytes", False),
                      (6, "preferences", "msg:" + W + "Preferences", False)],
    "Preferences": [(1, "maxSlots", "uint32", False), (2, "idleMilliseconds", "uint32", False)],
    "RequestWork": [(1, "worker", _S, False), (2, "slots", "uint32", False), (3, "apps", _S, True),
                    (4, "seconds", "double", False)],
    "Assignment": [(1, "jobId", "uint64", False), (2, "leaseId", "uint64", False), (3, "deadlineUnixMs", "int64", False),
                   (4, "job", "msg:" + W + "SignedJob", False)],
    "WorkAssignments": [(1, "assignments", "msg:" + W + "Assignment", True)],
    "ReportResult": [(1, "worker", _S, False), (2, "jobId", "uint64", False), (3, "leaseId", "uint64", False),
                     (4, "exitStatus", "int32", False), (5, "signal", "int32", False),
                     (6, "errorKind", "enum:" + W + "ErrorKind", False), (7, "message", _S, False),
                     (8, "wallMs", "uint64", False), (9, "stdoutTail", "bytes", False), (10, "stderrTail", "bytes", False),
                     (11, "outputs", "msg:" + W + "OutputFile", True), (12, "cpuMs", "uint64", False)],
    "ReportAck": [(1, "verdict", "enum:" + W + "Verdict", False)],
    "HandBack": [(1, "worker", _S, False), (2, "jobId", "uint64", False), (3, "leaseId", "uint64", False)],
    "HandBackReply": [],
    "RenewLease": [(1, "worker", _S, False), (2, "jobId", "uint64", False), (3, "leaseId", "uint64", False)],
    "LeaseRenewed": [(1, "deadlineUnixMs", "int64", False)],
    "StatusRequest": [],
    "StatusReply": [(1, "queued", "uint64", False), (2, "leased", "uint64", False), (3, "succeeded", "uint64", False),
                    (4, "failed", "uint64", False)],
    "ResultRequest": [(1, "jobId", "uint64", False)],
    "ResultReply": [(1, "state", _S, False), (2, "failures", _S, True), (3, "result", "msg:" + W + "ReportResult", False)],
    # Section 19.8 (only what the vectors and a refusing worker need).
    "Command": [(1, "commandId", "uint64", False), (2, "shell", "msg:" + W + "ShellCommand", False)],
    "ShellCommand": [(1, "argv", _S, True), (2, "shell", "bool", False), (3, "workdir", _S, False),
                     (4, "env", "msg:" + W + "StringEntry", True), (5, "timeoutSeconds", "uint32", False),
                     (6, "maxTimeSeconds", "uint32", False), (7, "interruptSignal", "int32", False),
                     (8, "logfiles", "msg:" + W + "StringEntry", True)],
    "CommandUpdate": [(1, "commandId", "uint64", False), (2, "stdout", "bytes", False), (3, "stderr", "bytes", False),
                      (4, "header", _S, False), (5, "logName", _S, False), (6, "log", "bytes", False)],
    "CommandResult": [(1, "commandId", "uint64", False), (2, "exitStatus", "int32", False), (3, "signal", "int32", False),
                      (4, "interrupted", "bool", False), (5, "timedOut", "bool", False), (6, "error", _S, False),
                      (7, "elapsedMs", "uint64", False), (9, "paths", _S, True), (10, "size", "uint64", False),
                      (11, "sha256", "bytes", False)],
    "TransferWrite": [(1, "commandId", "uint64", False), (2, "offset", "uint64", False)],
}
for _k, _v in WORK_SCHEMA.items():
    pc.SCHEMA[W + _k] = _v

JOB_PREFIX = b"parley-work job v1\x00"              # 19 bytes (section 19.1)
ROTATION_PREFIX = b"parley-work key rotation v1\x00"  # 28 bytes: the 27 of the text and a zero
assert len(JOB_PREFIX) == 19 and len(ROTATION_PREFIX) == 28
WORK_PROTOCOL_VERSION = 1
MAX_TAIL = 1024 * 1024              # the reference worker's default, and the master's limit (19.1, 19.2)
MAX_OUTPUTS = 16 * 1024 * 1024      # outputs together (19.1)
DEFAULT_WALL = 3600                 # our own default when max_wall_seconds is 0 (the document leaves it to the worker)


def env_entries(env):
    return [{"key": k, "value": v} for k, v in env.items()]


def env_dict(entries):
    return {e.get("key", ""): e.get("value", "") for e in entries}


# ---------------------------------------------------------------------------------------
# Ed25519 (section 19.1), from the `cryptography` package.
def _ed():
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519


def private_key_from_seed(seed):
    return _ed().Ed25519PrivateKey.from_private_bytes(bytes(seed))


def public_bytes(priv):
    from cryptography.hazmat.primitives import serialization
    return priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(pub32, signature, message):
    if len(pub32) != 32 or len(signature) != 64:
        return False
    try:
        _ed().Ed25519PublicKey.from_public_bytes(bytes(pub32)).verify(bytes(signature), bytes(message))
        return True
    except Exception:
        return False


def sign_spec(priv, spec):
    return priv.sign(JOB_PREFIX + spec)


def _read_key_file(path, label):
    raw = open(path, "rb").read()
    text = raw.strip()
    if len(raw) == 32:
        return raw
    parts = text.split()
    if len(parts) == 2 and parts[0].decode(errors="replace") == label:
        return base64.b64decode(parts[1])
    if len(parts) == 1:
        try:
            b = bytes.fromhex(parts[0].decode())
            if len(b) == 32:
                return b
        except ValueError:
            pass
        b = base64.b64decode(parts[0])
        if len(b) == 32:
            return b
    raise SystemExit("%s: not a %s" % (path, label))


def load_private(path):
    return private_key_from_seed(_read_key_file(path, "parley-work-ed25519-private-key"))


def load_public(path):
    return _read_key_file(path, "parley-work-ed25519-public-key")


# ---------------------------------------------------------------------------------------
# Jobs (section 19.1).
def valid_file_name(name):
    """[R-19.1-2]: a relative path whose parts are neither empty, '.' nor '..', without NUL,
    at most 4,096 bytes."""
    b = name.encode("utf-8")
    if not b or len(b) > 4096 or b"\x00" in b or b.startswith(b"/"):
        return False
    return all(part not in (b"", b".", b"..") for part in b.split(b"/"))


def valid_app(name):
    return 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


def make_spec(argv, env=None, shell=False, **more):
    """A serialized JobSpec; `more` in snake_case (max_wall_seconds=...) or the JSON names."""
    msg = {"argv": list(argv), "env": env_entries(env or {}), "shell": shell}
    known = {f[1] for f in pc.SCHEMA[W + "JobSpec"]}
    for k, v in more.items():
        camel = k.split("_")[0] + "".join(x.title() for x in k.split("_")[1:])
        if camel not in known:
            raise ValueError("JobSpec has no field %s" % k)
        msg[camel] = v
    return pb_encode(W + "JobSpec", msg)


def signed_job(priv, spec, priority=0, max_attempts=0, signature=None):
    return {"spec": spec, "signature": sign_spec(priv, spec) if signature is None else signature,
            "priority": priority, "maxAttempts": max_attempts}


# ---------------------------------------------------------------------------------------
# A connection to a master: parley_client's Connection, plus what section 19.8 asks of a
# worker that does not accept commands ([R-19.8-1]: permissionDenied for Command and
# InterruptCommand), and a bounded wait for one answer.
class WorkConnection(pc.Connection):
    def on_message(self, h, aligns):
        if pc.KINDS.get(h["kind"]) == "REQUEST" and h["type"] in (W + "Command", W + "InterruptCommand"):
            err = pb_encode("parley.v1.Status", {"code": pc.CODE["permissionDenied"],
                                                 "message": "this worker does not accept its master's commands"})
            self.send_message(pc.KIND["ERROR"], h["id"], "parley.v1.Status", err)
            return
        super().on_message(h, aligns)

    def call(self, name, msg, answer_name):
        """One request and its answer (decoded), or a ParleyError (ERROR answer: from_peer)."""
        rid = self.request(W + name, msg)
        rec = self.wait([rid])[rid]
        if rec["kind"] == "ERROR":
            st = pb_decode("parley.v1.Status", rec["answer"]["payload"])
            raise ParleyError(pc.code_name(st.get("code", 0)), st.get("message", ""), True)
        return pc.answer(rec, W + answer_name)

    def pump(self, seconds):
        """Reads whatever frames come for `seconds` (keepalives, notices, a master's commands).
        A lost connection is left for the next request to notice (it reconnects)."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.sock.fileno() < 0 or self.reader.eof:
                time.sleep(left)
                return
            try:
                r, _, _ = select.select([self.sock], [], [], left)
                if r:
                    self.read_one()
            except (ParleyError, OSError, ValueError):
                try:
                    self.sock.close()
                except OSError:
                    pass


def connect(address, timeout=15.0, hops=4):
    """Connects and follows the nucleus's redirects (section 8.2; 19.2: 'its redirects are
    followed when connecting'), at most `hops`."""
    visited = set()
    while True:
        visited.add(address)
        c = WorkConnection(address, timeout=timeout, client_version="1.0.0")
        c.handshake()
        if not c.redirects:
            return c
        c.leave()
        if hops == 0 or c.redirects[0] in visited:
            raise ParleyError("redirectLoop", "redirected from %s to %s" % (address, c.redirects[0]))
        address, hops = c.redirects[0], hops - 1


# ---------------------------------------------------------------------------------------
# Submitter (sections 19.1, 19.2).
class Submitter:
    def __init__(self, address, priv=None, timeout=15.0):
        self.address, self.priv, self.timeout = address, priv, timeout
        self.conn = connect(address, timeout)

    def submit(self, jobs):
        return self.conn.call("SubmitJobs", {"jobs": jobs}, "SubmitReply").get("jobIds", [])

    def status(self):
        s = self.conn.call("StatusRequest", {}, "StatusReply")
        return {k: s.get(k, 0) for k in ("queued", "leased", "succeeded", "failed")}

    def result(self, job_id):
        return self.conn.call("ResultRequest", {"jobId": job_id}, "ResultReply")

    def wait_results(self, ids, seconds):
        """Polls ResultRequest until every job succeeded or failed (bounded)."""
        end, done = time.monotonic() + seconds, {}
        while True:
            for i in ids:
                if i not in done:
                    r = self.result(i)
                    if r.get("state") in ("succeeded", "failed"):
                        done[i] = r
            if len(done) == len(ids) or time.monotonic() > end:
                return done
            time.sleep(0.2)

    def close(self):
        try:
            self.conn.close()
        except (OSError, ParleyError):
            pass


# ---------------------------------------------------------------------------------------
# Worker (sections 19.1-19.3).
STOP = {"requested": False}


def _request_stop(signum, frame):
    STOP["requested"] = True


class HandBackNeeded(Exception):
    pass


class Worker:
    def __init__(self, address, name, trusted, apps=(), timeout=15.0, workdir=None, log=print, slots=1):
        self.address, self.name, self.apps, self.timeout, self.log = address, name, list(apps), timeout, log
        self.trusted = [bytes(k) for k in trusted]  # keys this worker trusts (19.1 rotation adds one)
        self.workdir = workdir or tempfile.mkdtemp(prefix="pyworker-")
        self.slots = slots
        self.runs = {}   # job id -> times this worker started its program
        self.renewals = 0
        self.connect()

    def connect(self):
        self.conn = connect(self.address, self.timeout)
        for prio, text in self.conn.messages:
            self.log("master says [%s]: %s" % (prio, text))
        hello = {"worker": self.name, "platform": "python-" + sys.platform, "cpus": os.cpu_count() or 1,
                 "slots": self.slots, "protocolVersion": WORK_PROTOCOL_VERSION, "os": os.uname().sysname + " " + os.uname().release,
                 "apps": self.apps, "commands": False}
        self.welcome = self.conn.call("WorkerHello", hello, "WorkerWelcome")
        chosen = self.welcome.get("protocolVersion", 0) or 1
        if chosen != WORK_PROTOCOL_VERSION:  # [R-19.7-1]
            raise ParleyError("unsupportedVersion", "master chose work protocol version %d" % chosen)
        self.lease_seconds = self.welcome.get("leaseSeconds", 0)
        prefs = self.welcome.get("preferences", {})
        self.max_slots = prefs.get("maxSlots", 0)
        self.idle_ms = prefs.get("idleMilliseconds", 0)
        nxt, sig = self.welcome.get("nextPublicKey", b""), self.welcome.get("rotationSignature", b"")
        if nxt:  # [R-19.1-3]: trusted only if a key already trusted signed the statement
            if any(verify(k, sig, ROTATION_PREFIX + nxt) for k in self.trusted):
                if nxt not in self.trusted:
                    self.trusted.append(nxt)
                    self.log("key rotation: now trusting %s" % nxt.hex())
            else:
                self.log("key rotation announced but not signed by a trusted key: ignored")

    def reconnect(self):
        try:
            self.conn.sock.close()
        except OSError:
            pass
        self.connect()

    def call(self, name, msg, answer, retries=3):
        """A request; on a lost connection, reconnects and sends it again: every worker
        request is idempotent for the master (19.3, 19.6)."""
        for attempt in range(retries + 1):
            try:
                if self.conn.sock.fileno() < 0:
                    raise ParleyError("connectionClosed", "the connection was lost")
                return self.conn.call(name, msg, answer)
            except (ParleyError, OSError, ValueError) as e:
                if isinstance(e, ParleyError) and e.from_peer and not e.message.startswith("server sent CLOSE"):
                    raise  # an ERROR answer: the master's word
                if attempt == retries:
                    raise e if isinstance(e, ParleyError) else ParleyError("connectionClosed", str(e))
                self.log("connection lost (%s); reconnecting to send %s again" % (e, name))
                time.sleep(0.5 * (attempt + 1))
                try:
                    self.reconnect()
                except (ParleyError, OSError):
                    pass

    # --- the exchanges ---
    def request_work(self, slots=1, seconds=0.0):
        sent = time.monotonic()
        if self.max_slots:
            slots = min(slots, self.max_slots)
        got = self.call("RequestWork", {"worker": self.name, "slots": slots, "apps": self.apps, "seconds": seconds}, "WorkAssignments")
        out = got.get("assignments", [])
        for a in out:
            a["_sent"] = sent
            a["_lease_seconds"] = self.lease_seconds
        return out

    def renew(self, a):
        return self.call("RenewLease", {"worker": self.name, "jobId": a["jobId"], "leaseId": a["leaseId"]}, "LeaseRenewed")

    def report(self, rep):
        return pc.ENUMS[W + "Verdict"][self.call("ReportResult", rep, "ReportAck").get("verdict", 0)]

    def hand_back(self, a):
        return self.call("HandBack", {"worker": self.name, "jobId": a["jobId"], "leaseId": a["leaseId"]}, "HandBackReply")

    # --- running a job ---
    def lease_end(self, a, sent=None):
        """19.3: counted on our monotonic clock: the welcome's lease time from when the request
        was sent; a welcome without one: what is left of deadline_unix_ms, at least 3 s."""
        if self.lease_seconds:
            return (sent if sent is not None else a["_sent"]) + min(a["_lease_seconds"], self.lease_seconds)
        left = a.get("deadlineUnixMs", 0) / 1000.0 - time.time()
        return time.monotonic() + max(left, 3.0)

    def base_report(self, a):
        return {"worker": self.name, "jobId": a["jobId"], "leaseId": a["leaseId"]}

    def refuse(self, a, kind, message):
        rep = self.base_report(a)
        rep.update({"errorKind": pc.ENUMS[W + "ErrorKind"].index(kind), "message": message})
        self.log("job %d lease %d refused: %s: %s" % (a["jobId"], a["leaseId"], kind, message))
        return rep

    def run(self, a, renew=True):
        """Checks, runs and reports nothing: returns the ReportResult to send (19.1, 19.3)."""
        job = a.get("job", {})
        spec, sig = job.get("spec", b""), job.get("signature", b"")
        # [R-19.1-1]: verify the bytes received, before anything else; then decode them.
        if not any(verify(k, sig, JOB_PREFIX + spec) for k in self.trusted):
            return self.refuse(a, "ERROR_KIND_SIGNATURE", "signature missing or not by a trusted key")
        try:
            js = pb_decode(W + "JobSpec", spec)
        except ParleyError as e:
            return self.refuse(a, "ERROR_KIND_SPEC", "spec does not decode: %s" % e)
        argv, env = js.get("argv", []), env_dict(js.get("env", []))
        if not argv:
            return self.refuse(a, "ERROR_KIND_SPEC", "empty argv")
        app = js.get("app", "")
        if app and app not in self.apps:  # [R-19.2-1]
            return self.refuse(a, "ERROR_KIND_SPEC", "needs application %r, not declared" % app)
        names = [i.get("name", "") for i in js.get("inputs", [])] + js.get("outputs", [])
        bad = [n for n in names if not valid_file_name(n)]
        if bad:  # [R-19.1-2]
            return self.refuse(a, "ERROR_KIND_SPEC", "bad file name %r" % bad[0])
        d = os.path.join(self.workdir, "job-%d-%d" % (a["jobId"], a["leaseId"]))
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        try:
            return self._run_in(a, js, argv, env, d, renew)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _fetch_inputs(self, a, js, d):
        for f in js.get("inputs", []):
            name, content, url = f["name"], f.get("content", b""), f.get("url", "")
            if not content and url:
                if not url.startswith(("http://", "https://")):
                    return "input %s: URL %r is not http(s)" % (name, url)
                try:
                    left = max(1.0, self.lease_end(a) - time.monotonic() - 2)
                    with urllib.request.urlopen(url, timeout=min(left, 60)) as r:
                        content = r.read(f.get("size", 0) + 1)
                except OSError as e:
                    return "input %s: %s" % (name, e)
            if len(content) != f.get("size", 0) or hashlib.sha256(content).digest() != f.get("sha256", b""):
                return "input %s does not match its signed size and SHA-256" % name
            path = os.path.join(d, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(content)
        return None

    def _run_in(self, a, js, argv, env, d, renew):
        rep = self.base_report(a)
        # The lease: renewed every third of the lease time from when the job was taken;
        # the job is stopped when the lease would end within 5 s (a quarter, if shorter).
        lease = self.lease_seconds or max(3.0, self.lease_end(a) - a["_sent"])
        margin = min(5.0, lease / 4.0)
        period = lease / 3.0
        state = {"end": self.lease_end(a), "next": a["_sent"] + period, "refused": None}

        def keep_lease():
            now = time.monotonic()
            if renew and now >= state["next"] and state["refused"] is None:
                sent = time.monotonic()
                try:
                    self.renew(a)
                    self.renewals += 1
                    state["end"] = max(state["end"], self.lease_end(a, sent))
                except ParleyError as e:
                    if e.code != "invalidArgument":
                        raise
                    state["refused"] = e.message
                state["next"] = sent + period
            if state["refused"] is not None:
                return "lease renewal refused: %s" % state["refused"]
            if time.monotonic() >= state["end"] - margin:
                return "the lease would end within %.1f s without a renewal" % margin
            return None

        err = self._fetch_inputs(a, js, d)
        if err:
            return self.refuse(a, "ERROR_KIND_DOWNLOAD", err)
        why = keep_lease()
        if why:
            return self.refuse(a, "ERROR_KIND_COMPUTE", why + " (not started)")
        cmd = ["/bin/sh", "-c", " ".join(argv)] if js.get("shell") else list(argv)
        cpu, mem = js.get("maxCpuSeconds", 0), js.get("maxMemoryBytes", 0)

        def limits():
            os.setsid()
            if cpu:
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
            if mem:
                resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        out_f = tempfile.TemporaryFile()
        err_f = tempfile.TemporaryFile()
        wall = js.get("maxWallSeconds", 0) or DEFAULT_WALL
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        try:
            p = subprocess.Popen(cmd, env=env, cwd=d, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                 preexec_fn=limits, close_fds=True)
        except OSError as e:
            rep.update({"errorKind": 3, "message": "could not start %s: %s" % (cmd[0], e)})
            return rep
        self.runs[a["jobId"]] = self.runs.get(a["jobId"], 0) + 1
        stopped = None
        while p.poll() is None:
            if STOP["requested"]:  # shutting down: kill the job and hand it back (19.2 HandBack)
                try:
                    os.killpg(p.pid, signals.SIGKILL)
                except OSError:
                    pass
                p.wait()
                out_f.close()
                err_f.close()
                raise HandBackNeeded()
            stopped = keep_lease()
            if stopped is None and time.monotonic() - started > wall:
                stopped = "wall-time limit of %d s" % wall
            if stopped:
                try:
                    os.killpg(p.pid, signals.SIGKILL)
                except OSError:
                    pass
                p.wait()
                break
            self.conn.pump(0.05)
        rc = p.returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rep["wallMs"] = int((time.monotonic() - started) * 1000)
        rep["cpuMs"] = int(((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000)
        keep = js.get("maxOutputBytes", 0) or MAX_TAIL
        keep = min(keep, MAX_TAIL)
        tails = []
        for f in (out_f, err_f):
            size = f.seek(0, 2)
            f.seek(max(0, size - keep))
            tails.append(f.read())
            f.close()
        rep["stdoutTail"], rep["stderrTail"] = tails
        if stopped:
            rep.update({"errorKind": 3, "signal": 9, "message": "stopped: %s" % stopped})
            return rep
        if rc < 0:
            rep.update({"errorKind": 3, "signal": -rc, "message": "killed by signal %d" % -rc})
            return rep
        rep["exitStatus"] = rc
        if rc != 0:
            rep["message"] = "exit status %d" % rc
            return rep
        outs, total = [], 0
        real = os.path.realpath(d)
        for name in js.get("outputs", []):
            path = os.path.join(d, name)
            rp = os.path.realpath(path)
            if not (rp == real or rp.startswith(real + os.sep)) or not os.path.isfile(rp):
                rep.update({"errorKind": 5, "message": "output %s is missing or leads out of the job's directory" % name})
                return rep
            content = open(rp, "rb").read()
            total += len(content)
            if total > MAX_OUTPUTS:
                rep.update({"errorKind": 5, "message": "outputs over 16 MiB together"})
                return rep
            outs.append({"name": name, "size": len(content), "sha256": hashlib.sha256(content).digest(), "content": content})
        rep["outputs"] = outs
        # The report must fit one frame: shorten the tails (keeping their ends) if needed.
        budget = 16 * 1024 * 1024 + 32 * 1024 - total
        if len(rep["stdoutTail"]) + len(rep["stderrTail"]) > budget:
            half = max(0, budget // 2)
            rep["stdoutTail"], rep["stderrTail"] = rep["stdoutTail"][-half:] if half else b"", rep["stderrTail"][-half:] if half else b""
        return rep

    def work(self, max_jobs=0, idle_exit=10.0, deadline=None):
        """Asks for work, runs, reports; stops after max_jobs (0: no bound) or idle_exit
        seconds without work, or at `deadline` (monotonic)."""
        done, idle_since = 0, time.monotonic()
        verdicts = []
        while (not max_jobs or done < max_jobs) and (deadline is None or time.monotonic() < deadline) and not STOP["requested"]:
            got = self.request_work(1)
            if not got:
                if time.monotonic() - idle_since > idle_exit:
                    break
                self.conn.pump((self.idle_ms or 300) / 1000.0)  # [R-19.2-3]
                continue
            for a in got:
                if STOP["requested"]:
                    self.hand_back_quietly(a)
                    continue
                try:
                    rep = self.run(a)
                except HandBackNeeded:
                    self.hand_back_quietly(a)
                    continue
                try:
                    v = self.report(rep)
                except ParleyError as e:
                    v = "refused: %s %s" % (e.code, e.message)
                self.log("job %d lease %d: %s -> %s" % (a["jobId"], a["leaseId"],
                                                        "ok" if not rep.get("errorKind") and not rep.get("exitStatus") and not rep.get("signal") else rep.get("message", ""), v))
                verdicts.append((a, rep, v))
                done += 1
            idle_since = time.monotonic()
        return verdicts

    def hand_back_quietly(self, a):
        """A second HandBack of the same lease is refused; a worker treats that as done (19.2)."""
        try:
            self.hand_back(a)
            self.log("job %d lease %d handed back" % (a["jobId"], a["leaseId"]))
        except ParleyError as e:
            self.log("job %d lease %d: hand-back answered %s (done)" % (a["jobId"], a["leaseId"], e.code))

    def close(self):
        try:
            self.conn.close()
        except (OSError, ParleyError):
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Self-test: section 19.5 (job signature, spec bytes, frames) and the 19.8 frames.
# "the key whose 32-byte seed is `42` repeated": the byte 0x42 (hex, as the document writes
# bytes elsewhere), not decimal 42 (0x2a), whose public key is 197f6b23...: found by this test.
SEED42 = bytes([0x42]) * 32
VEC_PUB = "2152f8d19b791d24453242e15f2eab6cb7cffa7b6a5ed30097960e069881db12"
VEC_SPEC = "0a092f62696e2f6563686f0a0568656c6c6f12150a0450415448120d2f7573722f62696e3a2f62696e"
VEC_SIG = ("148bb7c0061fc5a83a946ed5c434c4c42342cf56a2f963a9a4afbabceba310b64e7a9e243e4332a98903cace050e1d08"
           "0ff39af922da3b5490bd5c622c08c00e")


def _doc_values(text):
    """The key, spec and signature as written in 19.5, to be sure the constants above are the
    document's."""
    sec = text[text.index("### 19.5 Vectors"):text.index("### 19.6")]
    import re
    pub = re.search(r"public key\s+`([0-9a-f]{64})`", sec).group(1)
    spec = re.search(r"`spec` bytes are\s+`([0-9a-f]+)`", sec).group(1)
    sig = re.search(r"signature is\s+`([0-9a-f]{128})`", sec).group(1)
    return pub, spec, sig


def self_test(path):
    text = open(path, encoding="utf-8").read()
    problems = []

    def expect(cond, what):
        print("%-4s %s" % ("ok" if cond else "FAIL", what))
        if not cond:
            problems.append(what)

    pub_doc, spec_doc, sig_doc = _doc_values(text)
    expect((pub_doc, spec_doc, sig_doc) == (VEC_PUB, VEC_SPEC, VEC_SIG), "19.5 values read from the document")
    priv = private_key_from_seed(SEED42)
    expect(public_bytes(priv).hex() == pub_doc, "19.5 public key of the seed 0x42 * 32")
    spec = make_spec(["/bin/echo", "hello"], {"PATH": "/usr/bin:/bin"})
    expect(spec.hex() == spec_doc, "19.5 JobSpec {argv: [/bin/echo, hello], env: {PATH}} encodes to the spec bytes")
    js = pb_decode(W + "JobSpec", bytes.fromhex(spec_doc))
    expect(js.get("argv") == ["/bin/echo", "hello"] and env_dict(js.get("env", [])) == {"PATH": "/usr/bin:/bin"},
           "19.5 spec bytes decode to the job")
    sig = sign_spec(priv, bytes.fromhex(spec_doc))
    expect(sig.hex() == sig_doc, "19.5 Ed25519 over 'parley-work job v1\\0' + spec is the documented signature")
    expect(verify(bytes.fromhex(pub_doc), bytes.fromhex(sig_doc), JOB_PREFIX + bytes.fromhex(spec_doc)),
           "19.5 documented signature verifies")
    tampered = bytearray(bytes.fromhex(spec_doc))
    tampered[-1] ^= 1
    expect(not verify(bytes.fromhex(pub_doc), bytes.fromhex(sig_doc), JOB_PREFIX + bytes(tampered)),
           "19.1 a changed spec byte fails verification")
    expect(not verify(bytes.fromhex(pub_doc), bytes.fromhex(sig_doc), bytes.fromhex(spec_doc)),
           "19.1 the signature does not verify without the prefix")
    new = private_key_from_seed(bytes([7]) * 32)
    rot = priv.sign(ROTATION_PREFIX + public_bytes(new))
    expect(verify(public_bytes(priv), rot, ROTATION_PREFIX + public_bytes(new))
           and not verify(public_bytes(priv), rot, JOB_PREFIX + public_bytes(new)),
           "19.1 a rotation statement verifies and cannot pass for a job signature")

    # Every ```vector of sections 19.5 and 19.8 (names work-*): encoding and decoding.
    vectors = [v for v in pc.parse_vectors(text) if v["name"].startswith("work-")]
    expect(len(vectors) >= 8, "%d work vectors found in the document" % len(vectors))
    for v in vectors:
        tag = int(v["tag"].split()[0], 0)
        aligns = tuple(int(x) for x in v.get("alignments", "0 0 0 0").split())
        segs = [pc.segment_bytes(s) for s in v["segment"]]
        enc = pc.encode_frame(tag, segs, aligns, int(v["flags"], 0))
        ok = enc == v["wire"]
        for chunk in (65536, 1):
            t, f, got, al = pc.Reader(pc._source(v["wire"], chunk)).frame()
            ok = ok and (t, f, tuple(al)) == (tag, int(v["flags"], 0), aligns)
            ok = ok and len(got) == len(segs) and all(pc.check_segment(s, g) for s, g in zip(v["segment"], got))
        expect(ok, "vector %s encodes to and decodes from its wire bytes" % v["name"])
    # The assignment of the vector holds the documented job, which this worker would run.
    av = [v for v in vectors if v["name"] == "work-assignments"]
    if av:
        seg = pc.Reader(pc._source(av[0]["wire"], 65536)).frame()[2][1]
        a = pb_decode(W + "WorkAssignments", seg)["assignments"][0]
        expect((a["jobId"], a["leaseId"], a["job"]["spec"].hex(), a["job"]["signature"].hex()) == (7, 12, spec_doc, sig_doc),
               "vector work-assignments carries job 7, lease 12, the spec and its signature")

    # The worker's checks, offline: a job runs only if its signature verifies ([R-19.1-1]).
    class Offline(Worker):
        def __init__(self, trusted):
            self.name, self.apps, self.trusted, self.log = "offline", [], trusted, lambda *x: None
            self.workdir = tempfile.mkdtemp(prefix="pywork-selftest-")
            self.runs, self.renewals, self.lease_seconds, self.conn = {}, 0, 600, None

        def renew(self, a):
            return {}
    w = Offline([bytes.fromhex(pub_doc)])
    marker = os.path.join(w.workdir, "ran")
    good = make_spec(["/bin/sh", "-c", "echo ran > %s; echo out" % marker], {"PATH": "/usr/bin:/bin"})
    w.conn = type("NoConn", (), {"pump": lambda self, s: time.sleep(s)})()

    def assignment(spec, sig):
        return {"jobId": 1, "leaseId": 2, "deadlineUnixMs": 0, "_sent": time.monotonic(), "_lease_seconds": 600,
                "job": {"spec": spec, "signature": sig}}
    rep = w.run(assignment(good, sign_spec(private_key_from_seed(bytes([9]) * 32), good)))
    expect(rep.get("errorKind") == 1 and not os.path.exists(marker), "worker: a job signed by another key is refused (ERROR_KIND_SIGNATURE), not run")
    rep = w.run(assignment(good, b""))
    expect(rep.get("errorKind") == 1 and not os.path.exists(marker), "worker: a job without a signature is refused, not run")
    rep = w.run(assignment(b"\xff\xff", sign_spec(priv, b"\xff\xff")))
    expect(rep.get("errorKind") == 2, "worker: a signed spec that does not decode is refused (ERROR_KIND_SPEC)")
    bad_name = make_spec(["/bin/true"], {}, outputs=["../x"])
    rep = w.run(assignment(bad_name, sign_spec(priv, bad_name)))
    expect(rep.get("errorKind") == 2, "worker: a file name with '..' is refused (R-19.1-2)")
    rep = w.run(assignment(good, sign_spec(priv, good)))
    expect(rep.get("errorKind", 0) == 0 and rep.get("exitStatus", 0) == 0 and rep.get("stdoutTail") == b"out\n"
           and os.path.exists(marker), "worker: a well-signed job runs and its stdout tail is reported")
    content = b"input bytes\n"
    shell_io = make_spec(["mkdir", "sub;", "cat", "in.txt", ">", "sub/out.txt"], {"PATH": "/usr/bin:/bin"}, shell=True,
                         inputs=[{"name": "in.txt", "content": content, "size": len(content), "sha256": hashlib.sha256(content).digest()}],
                         outputs=["sub/out.txt"])
    rep = w.run(assignment(shell_io, sign_spec(priv, shell_io)))
    outs = rep.get("outputs", [])
    expect(rep.get("errorKind", 0) == 0 and len(outs) == 1 and outs[0]["content"] == content
           and outs[0]["sha256"] == hashlib.sha256(content).digest(), "worker: shell job, inline input written, output sent back")
    wrong = make_spec(["/bin/true"], {}, inputs=[{"name": "in.txt", "content": content, "size": len(content), "sha256": bytes(32)}])
    rep = w.run(assignment(wrong, sign_spec(priv, wrong)))
    expect(rep.get("errorKind") == 4, "worker: an input not matching its SHA-256 is ERROR_KIND_DOWNLOAD")
    shutil.rmtree(w.workdir, ignore_errors=True)
    print("%d checks failed" % len(problems))
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------
# Live scenario.
def expect_error(fn, code, contains=None):
    try:
        got = fn()
    except ParleyError as e:
        if e.code != code or (contains and contains not in e.message):
            raise CheckFailed("expected %s%s, got %s: %s" % (code, " containing %r" % contains if contains else "", e.code, e.message))
        return e
    raise CheckFailed("expected %s, got an answer: %r" % (code, got))


def scenario(args):
    priv = load_private(args.key)
    pub = public_bytes(priv)
    nonce = os.urandom(4).hex()
    step = ["start"]

    def say(text):
        step[0] = text
        print("--", text, flush=True)
    sub = Submitter(args.master, priv)
    workers = []

    def worker(name):
        w = Worker(args.master, name, [pub], log=lambda *x: print("   ", *x, flush=True))
        workers.append(w)
        return w
    try:
        say("connect a submitter and the main worker")
        main = worker("py-main-" + nonce)
        lease = main.lease_seconds
        check(lease > 0, "WorkerWelcome.lease_seconds is 0")
        print("    lease time %d s, protocol version %d" % (lease, main.welcome.get("protocolVersion", 0)))
        base = sub.status()
        check(base["queued"] == 0 and base["leased"] == 0, "the master's queue is not empty at the start: %r" % base)
        env = {"PATH": "/usr/bin:/bin"}

        # --- refusals at submission (19.1, 19.2) ---
        say("a badly signed job is refused with permissionDenied, nothing stored (R-19.1-1)")
        spec = make_spec(["/bin/echo", "never"], env)
        bad_sig = bytearray(sign_spec(priv, spec))
        bad_sig[0] ^= 0x80
        good_job = signed_job(priv, make_spec(["/bin/echo", "batch-mate"], env))
        expect_error(lambda: sub.submit([good_job, signed_job(priv, spec, signature=bytes(bad_sig))]), "permissionDenied")
        other = private_key_from_seed(os.urandom(32))
        expect_error(lambda: sub.submit([signed_job(other, spec)]), "permissionDenied")
        say("a job without a signature is refused with permissionDenied")
        expect_error(lambda: sub.submit([signed_job(priv, spec, signature=b"")]), "permissionDenied")
        say("a signed spec that is not a JobSpec is malformedPayload")
        expect_error(lambda: sub.submit([signed_job(priv, b"\xff\xff\xff")]), "malformedPayload")
        say("a job naming '../x' is invalidArgument, nothing of the batch stored (R-19.1-2)")
        expect_error(lambda: sub.submit([good_job, signed_job(priv, make_spec(["/bin/true"], env, outputs=["../x"]))]), "invalidArgument")
        say("an empty batch and a bad application name are invalidArgument (R-19.2-1)")
        expect_error(lambda: sub.submit([]), "invalidArgument")
        expect_error(lambda: sub.submit([signed_job(priv, make_spec(["/bin/true"], env, app="bad name!"))]), "invalidArgument")
        say("max_attempts over 1,000, and more than 1,000 jobs in a batch, are invalidArgument")
        expect_error(lambda: sub.submit([signed_job(priv, spec, max_attempts=1001)]), "invalidArgument")
        expect_error(lambda: sub.submit([good_job] * 1001), "invalidArgument")
        check(sub.status() == base, "refused submissions changed the store: %r, was %r" % (sub.status(), base))

        # --- N jobs, each result once ---
        n = args.jobs
        say("%d jobs submitted in one batch, run by this worker, each accepted once (R-19.3-1)" % n)
        words = ["job-%d-%s" % (i, nonce) for i in range(n)]
        jobs = [signed_job(priv, make_spec(["/bin/echo", w], env, name=w)) for w in words[:-1]]
        jobs.append(signed_job(priv, make_spec(["echo", "$WORD;", "echo", "err", ">&2"], {"PATH": "/usr/bin:/bin", "WORD": words[-1]}, shell=True)))
        ids = sub.submit(jobs)
        check(len(ids) == n and len(set(ids)) == n, "SubmitReply has %d distinct ids for %d jobs" % (len(set(ids)), n))
        expected = dict(zip(ids, words))
        verdicts = main.work(max_jobs=n, idle_exit=10, deadline=time.monotonic() + 60 + 5 * n)
        got = {a["jobId"]: v for a, _, v in verdicts}
        check(sorted(got) == sorted(ids), "the worker got jobs %s, submitted %s" % (sorted(got), sorted(ids)))
        check(all(v == "VERDICT_ACCEPTED" for v in got.values()), "verdicts: %r" % got)
        check(all(main.runs.get(i) == 1 for i in ids), "runs per job: %r" % {i: main.runs.get(i) for i in ids})
        say("the same report sent again is VERDICT_ALREADY_ACCEPTED")
        for a, rep, _ in verdicts[:2]:
            v = main.report(rep)
            check(v == "VERDICT_ALREADY_ACCEPTED", "resent report of job %d: %s" % (a["jobId"], v))
        say("ResultRequest: every job succeeded with its own output, reported by this worker")
        for i in ids:
            r = sub.result(i)
            res = r.get("result", {})
            check(r.get("state") == "succeeded", "job %d state %r" % (i, r.get("state")))
            check(res.get("stdoutTail") == (expected[i] + "\n").encode(), "job %d stdout %r" % (i, res.get("stdoutTail")))
            check(res.get("worker") == main.name, "job %d reported by %r" % (i, res.get("worker")))
            check(res.get("leaseId") == [a for a, _, _ in verdicts if a["jobId"] == i][0]["leaseId"], "job %d lease id" % i)
        check(sub.result(ids[-1])["result"].get("stderrTail") == b"err\n", "shell job's stderr tail")

        # --- a failing job: RETRYING, then FAILED with the reasons ---
        say("a failing job with max_attempts 2: VERDICT_RETRYING then VERDICT_FAILED, reasons end with stderr's last line")
        fid = sub.submit([signed_job(priv, make_spec(["echo first >&2; echo boom-%s >&2; exit 3" % nonce], env, shell=True), max_attempts=2)])[0]
        vs = main.work(max_jobs=2, idle_exit=10, deadline=time.monotonic() + 60)
        check([v for _, _, v in vs] == ["VERDICT_RETRYING", "VERDICT_FAILED"], "verdicts %r" % [v for _, _, v in vs])
        say("a success sent by a lease that had reported a failure is refused ('report refused'); its failure again is VERDICT_ALREADY_ACCEPTED")
        first_rep = vs[0][1]
        expect_error(lambda: main.report(dict(first_rep, errorKind=0, exitStatus=0, message="", stderrTail=b"")), "invalidArgument", "report refused")
        check(main.report(first_rep) == "VERDICT_ALREADY_ACCEPTED", "the failure sent again")
        r = sub.result(fid)
        check(r.get("state") == "failed" and len(r.get("failures", [])) == 2, "failed job: %r" % r)
        check(all(f.endswith("boom-%s" % nonce) for f in r["failures"]), "reasons do not end with the stderr's last line: %r" % r["failures"])

        # --- renewals ---
        long_s = lease + 3
        say("a job running %d s, longer than the %d s lease, keeps it by renewing (R-19.3-2)" % (long_s, lease))
        lid = sub.submit([signed_job(priv, make_spec(["/bin/sleep", str(long_s)], env, max_wall_seconds=long_s + 60))])[0]
        r0 = main.renewals
        vs = main.work(max_jobs=1, idle_exit=10, deadline=time.monotonic() + long_s + 60)
        check([v for _, _, v in vs] == ["VERDICT_ACCEPTED"], "long job: %r" % [(v, rep.get("message")) for _, rep, v in vs])
        check(main.renewals - r0 >= 2, "long job renewed %d times" % (main.renewals - r0))
        check(sub.result(lid).get("state") == "succeeded", "long job not succeeded")

        # --- expired lease: handed out again, late reports ---
        a_w, b_w = worker("py-a-" + nonce), worker("py-b-" + nonce)

        def take_and_expire(jid):
            got = a_w.request_work(1)
            check(len(got) == 1 and got[0]["jobId"] == jid, "worker A got %r, wanted job %d" % ([g["jobId"] for g in got], jid))
            a = got[0]
            # A runs the job at once, within its lease, and holds back its report: a late report.
            rep = a_w.run(a, renew=False)
            check(rep.get("errorKind", 0) == 0, "A could not run job %d: %r" % (jid, rep.get("message")))
            end = time.monotonic() + lease + 30
            while sub.result(jid).get("state") != "queued":
                check(time.monotonic() < end, "job %d still %r %d s after its lease's deadline" % (jid, sub.result(jid).get("state"), 30))
                time.sleep(0.25)
            return a, rep
        say("worker A takes a job and lets its lease expire; it is queued again (19.3)")
        x = sub.submit([signed_job(priv, make_spec(["/bin/echo", "x-" + nonce], env))])[0]
        ax, rep_a = take_and_expire(x)
        say("A's renewal of the expired lease is refused (invalidArgument, 'renewal refused')")
        expect_error(lambda: a_w.renew(ax), "invalidArgument", "renewal refused")
        say("worker B gets the job under a new lease")
        got = b_w.request_work(1)
        check(len(got) == 1 and got[0]["jobId"] == x and got[0]["leaseId"] != ax["leaseId"], "B got %r" % got)
        bx = got[0]
        say("B reporting for A's lease, or for a lease the job never had, is refused ('report refused')")
        rep_b = b_w.run(bx)
        wrong = dict(rep_b, leaseId=ax["leaseId"])
        expect_error(lambda: b_w.report(wrong), "invalidArgument", "report refused")
        expect_error(lambda: b_w.report(dict(rep_b, leaseId=bx["leaseId"] + 1000000)), "invalidArgument", "report refused")
        say("B's success is VERDICT_ACCEPTED")
        check(b_w.report(rep_b) == "VERDICT_ACCEPTED", "B's report not accepted")
        say("A's late failure is VERDICT_SUPERSEDED (an expired lease's late failure)")
        fail_a = dict(a_w.base_report(ax), errorKind=3, message="late failure")
        check(a_w.report(fail_a) == "VERDICT_SUPERSEDED", "A's late failure")
        say("A's late success after that changes nothing (19.3 says refused; the Verdict comment says SUPERSEDED: see the report)")
        try:
            late = a_w.report(rep_a)
        except ParleyError as e:
            late = "refused: %s: %s" % (e.code, e.message)
            check(e.code == "invalidArgument", "A's late success: %s" % late)
        print("    (A's late success, its expired lease having reported a failure and B having succeeded: %s)" % late)
        check(late == "VERDICT_SUPERSEDED" or late.startswith("refused: invalidArgument"), "A's late success: %s" % late)
        r = sub.result(x)
        check(r.get("state") == "succeeded" and r["result"].get("worker") == b_w.name and r["result"].get("leaseId") == bx["leaseId"],
              "job %d: %r" % (x, r))
        check(len(r.get("failures", [])) == 1, "the expired attempt is one failure: %r" % r.get("failures"))

        say("an expired lease's late success is accepted when no other attempt succeeded; the other's is then VERDICT_SUPERSEDED")
        y = sub.submit([signed_job(priv, make_spec(["/bin/echo", "y-" + nonce], env))])[0]
        ay, rep_ay = take_and_expire(y)
        got = b_w.request_work(1)
        check(len(got) == 1 and got[0]["jobId"] == y, "B got %r" % got)
        by = got[0]
        check(a_w.report(rep_ay) == "VERDICT_ACCEPTED", "A's late success not accepted")
        say("B's success after A's late one is VERDICT_SUPERSEDED; sent again, still VERDICT_SUPERSEDED or ALREADY_ACCEPTED, nothing changes")
        rep_by = b_w.run(by)
        check(b_w.report(rep_by) == "VERDICT_SUPERSEDED", "B's success after A's late one")
        again = b_w.report(rep_by)
        print("    (B's superseded report sent again: %s)" % again)
        check(again in ("VERDICT_SUPERSEDED", "VERDICT_ALREADY_ACCEPTED"), "B's superseded report sent again: %s" % again)
        r = sub.result(y)
        check(r.get("state") == "succeeded" and r["result"].get("worker") == a_w.name, "job %d: %r" % (y, r))

        say("HandBack: the job is queued again and the attempt does not count; a second HandBack is refused")
        z = sub.submit([signed_job(priv, make_spec(["/bin/echo", "z-" + nonce], env), max_attempts=1)])[0]
        got = a_w.request_work(1)
        check(len(got) == 1 and got[0]["jobId"] == z, "A got %r" % got)
        a_w.hand_back(got[0])
        expect_error(lambda: a_w.hand_back(got[0]), "invalidArgument")
        check(sub.result(z).get("state") == "queued", "handed-back job not queued")
        vs = main.work(max_jobs=1, idle_exit=10, deadline=time.monotonic() + 60)
        check([v for _, _, v in vs] == ["VERDICT_ACCEPTED"], "handed-back job with max_attempts 1 then: %r" % vs)

        say("RequestWork with seconds: 4 jobs estimated at 10 s, 25 s asked: the first 3 (R-19.2-2); negative seconds are invalidArgument")
        expect_error(lambda: main.request_work(4, -1.0), "invalidArgument")
        est = sub.submit([signed_job(priv, make_spec(["/bin/echo", "e%d-%s" % (i, nonce)], env, estimated_seconds=10)) for i in range(4)])
        got = main.request_work(4, 25.0)
        check([g["jobId"] for g in got] == est[:3], "seconds=25 handed out %r of %r" % ([g["jobId"] for g in got], est))
        check(sub.result(est[3]).get("state") == "queued", "the fourth job is not queued")
        for g in got:
            v = main.report(main.run(g))
            check(v == "VERDICT_ACCEPTED", "job %d: %s" % (g["jobId"], v))
        vs = main.work(max_jobs=1, idle_exit=10, deadline=time.monotonic() + 60)
        check([(a["jobId"], v) for a, _, v in vs] == [(est[3], "VERDICT_ACCEPTED")], "fourth job: %r" % vs)

        say("(reference's MAY, R-19.3-3) renewals end at max_wall_seconds plus two lease times from the hand-out")
        cap = sub.submit([signed_job(priv, make_spec(["/bin/true"], env, max_wall_seconds=1))])[0]
        ca = main.request_work(1)
        check(len(ca) == 1 and ca[0]["jobId"] == cap, "got %r" % ca)
        t0, outcome = time.monotonic(), "never refused"
        while time.monotonic() - t0 < 1 + 2 * lease + 3:
            try:
                main.renew(ca[0])
            except ParleyError as e:
                outcome = "refused after %.1f s: %s" % (time.monotonic() - t0, e.message)
                break
            time.sleep(lease / 3.0)
        print("    (renewals of a 1 s job under a %d s lease: %s)" % (lease, outcome))
        check(main.report(main.base_report(ca[0])) == "VERDICT_ACCEPTED", "capped job's report")

        say("StatusReply adds up")
        st = sub.status()
        want = {"queued": base["queued"], "leased": base["leased"], "succeeded": base["succeeded"] + n + 9, "failed": base["failed"] + 1}
        check(st == want, "status %r, expected %r" % (st, want))

        if args.untrusting_master:
            say("a master without the public key stores a job signed by another key; this worker refuses it (ERROR_KIND_SIGNATURE), never runs it")
            sub2 = Submitter(args.untrusting_master)
            w2 = Worker(args.untrusting_master, "py-c-" + nonce, [pub], log=lambda *x: print("   ", *x, flush=True))
            workers.append(w2)
            try:
                marker = os.path.join(tempfile.gettempdir(), "pywork-%s-ran" % nonce)
                bid = sub2.submit([signed_job(other, make_spec(["/bin/sh", "-c", "touch " + marker], env), max_attempts=1)])[0]
                vs = w2.work(max_jobs=1, idle_exit=10, deadline=time.monotonic() + 60)
                check(len(vs) == 1 and vs[0][1].get("errorKind") == 1 and vs[0][2] == "VERDICT_FAILED", "refusal: %r" % vs)
                check(not os.path.exists(marker) and not w2.runs, "the badly signed job ran")
                r = sub2.result(bid)
                check(r.get("state") == "failed", "job %d: %r" % (bid, r))
                say("that master still wants a 64-byte signature (invalidArgument otherwise)")
                expect_error(lambda: sub2.submit([signed_job(priv, spec, signature=b"short")]), "invalidArgument")
            finally:
                sub2.close()
        print("scenario: every check passed")
        return 0
    except CheckFailed as e:
        print("FAILED: check failed in step %r: %s" % (step[0], e))
    except ParleyError as e:
        print("FAILED: Parley error in step %r: %s" % (step[0], e))
    except OSError as e:
        print("FAILED: socket error in step %r: %s" % (step[0], e))
    finally:
        for w in workers:
            w.close()
        sub.close()
    return 1


# ---------------------------------------------------------------------------------------
def cmd_submit(args):
    priv = load_private(args.key)
    if not args.command:
        raise SystemExit("submit: give the job's program and arguments after --")
    env = dict(kv.split("=", 1) for kv in args.env) if args.env else {"PATH": "/usr/bin:/bin"}
    spec = make_spec(args.command, env, shell=args.shell, max_wall_seconds=args.max_wall, app=args.app or "",
                     outputs=args.output or [])
    sub = Submitter(args.master, priv)
    try:
        ids = []
        for start in range(0, args.count, 1000):
            ids += sub.submit([signed_job(priv, spec, args.priority, args.max_attempts)] * min(1000, args.count - start))
        for i in ids:
            print("submitted job %d" % i, flush=True)
        if args.no_wait:
            return 0
        res = sub.wait_results(ids, args.wait)
        ok = True
        for i in ids:
            r = res.get(i)
            if r is None:
                print("job %d: no result within %d s" % (i, args.wait))
                ok = False
                continue
            rr = r.get("result", {})
            print("job %d: %s worker=%s exit=%d stdout=%r failures=%d" % (
                i, r["state"], rr.get("worker", ""), rr.get("exitStatus", 0), rr.get("stdoutTail", b""), len(r.get("failures", []))))
            ok = ok and r["state"] == "succeeded"
        return 0 if ok else 1
    except ParleyError as e:
        print("FAILED: %s" % e)
        return 1
    finally:
        sub.close()


def cmd_work(args):
    keys = [load_public(p) for p in args.trust]
    signals.signal(signals.SIGTERM, _request_stop)
    signals.signal(signals.SIGINT, _request_stop)
    w = Worker(args.master, args.name or "py-worker-%s-%d" % (socket.gethostname(), os.getpid()), keys, apps=args.app or [])
    try:
        vs = w.work(max_jobs=args.max_jobs, idle_exit=args.idle_exit)
        print("worker stopped: ran %d jobs (%s)" % (len(vs), ", ".join(sorted(set(v for _, _, v in vs))) or "none"))
        return 0
    except ParleyError as e:
        print("FAILED: %s" % e)
        return 1
    finally:
        w.close()


def main():
    default_doc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "docs", "protocol.md")
    ap = argparse.ArgumentParser(description="Independent Parley Work submitter and worker (from docs/protocol.md)")
    ap.add_argument("--self-test", nargs="?", const=default_doc, metavar="PROTOCOL_MD")
    subs = ap.add_subparsers(dest="cmd")
    s = subs.add_parser("submit")
    s.add_argument("--master", default="127.0.0.1:7422")
    s.add_argument("--key", required=True)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--shell", action="store_true")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--max-attempts", type=int, default=0)
    s.add_argument("--max-wall", type=int, default=0)
    s.add_argument("--app")
    s.add_argument("--env", action="append")
    s.add_argument("--output", action="append")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--wait", type=int, default=120, help="seconds to wait for the results")
    s.add_argument("command", nargs=argparse.REMAINDER)
    k = subs.add_parser("work")
    k.add_argument("--master", default="127.0.0.1:7422")
    k.add_argument("--trust", action="append", required=True)
    k.add_argument("--name")
    k.add_argument("--app", action="append")
    k.add_argument("--max-jobs", type=int, default=0)
    k.add_argument("--idle-exit", type=float, default=10.0, help="stop after this long without work")
    c = subs.add_parser("scenario")
    c.add_argument("--master", required=True, help="a master started with --trust (the key's work.pub), an empty store")
    c.add_argument("--key", required=True)
    c.add_argument("--jobs", type=int, default=5)
    c.add_argument("--untrusting-master", help="optional: a master without --trust, empty store, --max-attempts any")
    args = ap.parse_args()
    if args.self_test:
        return self_test(args.self_test)
    if args.cmd == "submit":
        if args.command and args.command[0] == "--":
            args.command = args.command[1:]
        return cmd_submit(args)
    if args.cmd == "work":
        return cmd_work(args)
    if args.cmd == "scenario":
        return scenario(args)
    ap.error("give --self-test or a subcommand")


if __name__ == "__main__":
    sys.exit(main())
