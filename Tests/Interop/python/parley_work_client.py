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
    # Section 19.8: master-initiated commands.
    "Command": [(1, "commandId", "uint64", False), (2, "shell", "msg:" + W + "ShellCommand", False),
                (3, "upload", "msg:" + W + "UploadCommand", False), (4, "download", "msg:" + W + "DownloadCommand", False),
                (5, "mkdir", "msg:" + W + "PathsCommand", False), (6, "rmdir", "msg:" + W + "PathsCommand", False),
                (7, "rmfile", "msg:" + W + "PathsCommand", False), (8, "stat", "msg:" + W + "PathCommand", False),
                (9, "glob", "msg:" + W + "PathCommand", False), (10, "listdir", "msg:" + W + "PathCommand", False),
                (11, "cpdir", "msg:" + W + "CopyCommand", False),
                (12, "uploadDirectory", "msg:" + W + "UploadDirectoryCommand", False)],
    "ShellCommand": [(1, "argv", _S, True), (2, "shell", "bool", False), (3, "workdir", _S, False),
                     (4, "env", "msg:" + W + "StringEntry", True), (5, "timeoutSeconds", "uint32", False),
                     (6, "maxTimeSeconds", "uint32", False), (7, "interruptSignal", "int32", False),
                     (8, "logfiles", "msg:" + W + "StringEntry", True)],
    "UploadCommand": [(1, "path", _S, False), (2, "maxSize", "uint64", False), (3, "chunkSize", "uint32", False)],
    "DownloadCommand": [(1, "path", _S, False), (2, "maxSize", "uint64", False), (3, "chunkSize", "uint32", False),
                        (4, "mode", "uint32", False), (5, "size", "uint64", False), (6, "sha256", "bytes", False)],
    "PathsCommand": [(1, "paths", _S, True)],
    "PathCommand": [(1, "path", _S, False)],
    "UploadDirectoryCommand": [(1, "path", _S, False), (2, "maxSize", "uint64", False), (3, "chunkSize", "uint32", False)],
    "CopyCommand": [(1, "from", _S, False), (2, "to", _S, False)],
    "CommandUpdate": [(1, "commandId", "uint64", False), (2, "stdout", "bytes", False), (3, "stderr", "bytes", False),
                      (4, "header", _S, False), (5, "logName", _S, False), (6, "log", "bytes", False)],
    "FileStat": [(1, "exists", "bool", False), (2, "kind", _S, False), (3, "size", "uint64", False),
                 (4, "mode", "uint32", False), (5, "mtimeUnixMs", "int64", False)],
    "CommandResult": [(1, "commandId", "uint64", False), (2, "exitStatus", "int32", False), (3, "signal", "int32", False),
                      (4, "interrupted", "bool", False), (5, "timedOut", "bool", False), (6, "error", _S, False),
                      (7, "elapsedMs", "uint64", False), (8, "stat", "msg:" + W + "FileStat", False),
                      (9, "paths", _S, True), (10, "size", "uint64", False), (11, "sha256", "bytes", False)],
    "InterruptCommand": [(1, "commandId", "uint64", False), (2, "signal", "int32", False), (3, "reason", _S, False)],
    "InterruptReply": [(1, "found", "bool", False)],
    "TransferWrite": [(1, "commandId", "uint64", False), (2, "offset", "uint64", False)],
    "TransferWritten": [],
    "TransferRead": [(1, "commandId", "uint64", False), (2, "offset", "uint64", False), (3, "length", "uint32", False)],
    "TransferData": [(1, "eof", "bool", False)],
    "RunWorkerCommand": [(1, "worker", _S, False), (2, "command", "msg:" + W + "Command", False)],
    "InterruptWorkerCommand": [(1, "worker", _S, False), (2, "interrupt", "msg:" + W + "InterruptCommand", False)],
    "ListWorkers": [],
    "WorkerList": [(1, "workers", "msg:" + W + "WorkerHello", True)],
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



def fresh_signals():
    """In a job's or a command's child, before exec: every signal at its default disposition
    and none blocked (section 19.1), whatever this worker inherited (a test runner may start
    it with signals ignored or blocked, and both pass through exec)."""
    signals.pthread_sigmask(signals.SIG_SETMASK, [])
    for number in range(1, signals.NSIG):
        if number in (signals.SIGKILL, signals.SIGSTOP):
            continue
        try:
            signals.signal(number, signals.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass

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
    commands = None  # a CommandServer when the worker takes its master's commands (19.8, --commands)

    def on_message(self, h, aligns):
        if self.commands is not None:
            kind = pc.KINDS.get(h["kind"])
            if kind == "REQUEST" and h["type"] in (W + "Command", W + "InterruptCommand"):
                self.commands.on_request(h)
                return
            if kind == "CANCEL" and self.commands.on_cancel(h["id"]):
                return
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

    def wait(self, ids):
        if self.commands is None:
            return super().wait(ids)
        # With commands: read frames while the running commands go on (their output, their
        # transfers), bounded by the timeout without a frame.
        last = time.monotonic()
        while any(i not in self.pending_done for i in ids):
            if self.poll_once(0.02):
                last = time.monotonic()
            elif time.monotonic() - last > self.timeout:
                raise ParleyError("timeout", "nothing received for %.1f s" % self.timeout)
        return {i: self.pending_done.pop(i) for i in ids}

    def poll_once(self, seconds):
        """Commands: one step of every running command, then at most one frame read (waiting
        up to `seconds`). True when a frame was read."""
        self.commands.tick()
        if self.reader.buf:
            self.read_one()
            return True
        if self.sock.fileno() < 0 or self.reader.eof:
            raise ParleyError("connectionClosed", "the connection was lost")
        r, _, _ = select.select([self.sock], [], [], seconds if not self.commands.running else min(seconds, 0.02))
        if r:
            self.read_one()
            return True
        return False

    def pump(self, seconds):
        """Reads whatever frames come for `seconds` (keepalives, notices, a master's commands).
        A lost connection is left for the next request to notice (it reconnects)."""
        end = time.monotonic() + seconds
        if self.commands is not None:
            while time.monotonic() < end:
                try:
                    self.poll_once(max(0.0, end - time.monotonic()))
                except (ParleyError, OSError, ValueError):
                    try:
                        self.sock.close()
                    except OSError:
                        pass
                    time.sleep(max(0.0, end - time.monotonic()))
                    return
            return
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


# ---------------------------------------------------------------------------------------
# Master-initiated commands (section 19.8), served by a worker started with --commands.
# Single-threaded: every running command is a small state machine that the connection's
# reading loop steps (CommandServer.tick) between frames; several run at once.
import errno  # noqa: E402
import fnmatch  # noqa: E402,F401
import glob as globs  # noqa: E402
import stat as stats  # noqa: E402
import tarfile  # noqa: E402

COMMAND_KINDS = ["shell", "upload", "download", "mkdir", "rmdir", "rmfile", "stat", "glob", "listdir", "cpdir",
                 "uploadDirectory"]
DEFAULT_CHUNK = 64 * 1024            # 19.8: chunk_size 0
MAX_CHUNK = 1024 * 1024              # 19.8: at most 1 MiB
TRANSFER_LIMIT = 1 << 30             # our limit for max_size 0 (the reference worker's download limit: 1 GiB)
DEFAULT_COMMAND_TIME = 3600          # our default when max_time_seconds is 0 (the document leaves it to the worker)
KILL_AFTER = 5.0                     # 19.8: SIGKILL 5 s after an interrupt's signal
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class CommandRefused(Exception):
    """[R-19.8-2]/[R-19.8-3]: the whole command is refused (invalidArgument), nothing done."""


class CommandFailed(Exception):
    """A command that failed while it ran: its CommandResult says so (status 1, error)."""


class _Command:
    def __init__(self, server, rid, cid):
        self.server, self.rid, self.cid = server, rid, cid
        self.started = time.monotonic()
        self.interrupted, self.reason = False, ""
        self.done = False

    def update(self, **fields):
        fields["commandId"] = self.cid
        self.server.conn.send_message(pc.KIND["STREAM_ITEM"], self.rid, W + "CommandUpdate", pb_encode(W + "CommandUpdate", fields))

    def finish(self, **fields):
        if self.done:
            return
        self.done = True
        fields["commandId"] = self.cid
        fields["elapsedMs"] = int((time.monotonic() - self.started) * 1000)
        if self.interrupted:
            fields["interrupted"] = True
            fields.setdefault("error", self.reason or "interrupted")
        self.server.conn.send_message(pc.KIND["RESPONSE"], self.rid, W + "CommandResult", pb_encode(W + "CommandResult", fields))
        self.cleanup()

    def fail(self, message):
        self.finish(exitStatus=1, error=message)

    def interrupt(self, sig, reason):
        self.interrupted, self.reason = True, reason or "interrupted"

    def cancel(self):
        """CANCEL (R-19.8-3): stop, send nothing."""
        self.done = True
        self.cleanup()

    def cleanup(self):
        pass

    def tick(self):
        pass


class _Shell(_Command):
    def __init__(self, server, rid, cid, spec, workdir, logfiles):
        super().__init__(server, rid, cid)
        self.spec, self.workdir, self.logfiles = spec, workdir, logfiles  # logfiles: [(name, absolute path)]
        self.log_offsets = {name: 0 for name, _ in logfiles}
        self.proc, self.pipes, self.timed_out, self.kill_at = None, {}, False, None
        self.max_time = spec.get("maxTimeSeconds", 0) or DEFAULT_COMMAND_TIME
        self.quiet = spec.get("timeoutSeconds", 0)
        self.last_output = time.monotonic()
        self.exited_at, self.next_log = None, 0.0

    def start(self):
        argv, env = self.spec.get("argv", []), env_dict(self.spec.get("env", []))
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            return self.fail("workdir: %s" % e)
        if not argv:
            return self.finish(exitStatus=127, error="cannot start: empty argv")
        if self.spec.get("shell"):
            cmd = ["/bin/sh", "-c", " ".join(argv)]
        else:
            cmd = list(argv)
            prog = argv[0]
            if "/" not in prog:  # looked up in the command's env PATH, as a job's program (19.1)
                found = None
                for d in (env.get("PATH") or DEFAULT_PATH).split(":"):
                    cand = os.path.join(d or ".", prog)
                    if os.path.isfile(cand) and os.access(cand, os.X_OK):
                        found = cand
                        break
                if found is None:
                    return self.finish(exitStatus=127, error="cannot start %s: not found in PATH %s" % (prog, env.get("PATH") or DEFAULT_PATH))
                cmd[0] = found
        self.update(header="running %s in %s" % (" ".join(argv) if self.spec.get("shell") else repr(argv),
                                                  os.path.relpath(self.workdir, self.server.dir)))
        try:
            self.proc = subprocess.Popen(cmd, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                         preexec_fn=fresh_signals)
        except OSError as e:
            return self.finish(exitStatus=127, error="cannot start %s: %s" % (cmd[0], e.strerror or e))
        for name, f in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            os.set_blocking(f.fileno(), False)
            self.pipes[f.fileno()] = (name, f)

    def signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:
            pass

    def interrupt(self, sig, reason):
        if self.proc is None or self.interrupted:
            super().interrupt(sig, reason)
            return
        super().interrupt(sig, reason)
        sig = sig or self.spec.get("interruptSignal", 0) or signals.SIGKILL
        self.update(header="interrupted (signal %d): %s" % (sig, self.reason))
        self.signal_group(sig)
        self.kill_at = time.monotonic() + KILL_AFTER

    def cancel(self):
        if self.proc is not None:
            self.signal_group(signals.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        super().cancel()

    def cleanup(self):
        for _, f in self.pipes.values():
            try:
                f.close()
            except OSError:
                pass
        self.pipes = {}

    def read_logs(self):
        for name, path in self.logfiles:
            try:
                with open(path, "rb") as f:
                    f.seek(self.log_offsets[name])
                    data = f.read(MAX_CHUNK)
            except OSError:
                continue
            if data:
                self.log_offsets[name] += len(data)
                self.update(logName=name, log=data)

    def tick(self):
        if self.done or self.proc is None:
            return
        now = time.monotonic()
        if self.pipes:
            r, _, _ = select.select(list(self.pipes), [], [], 0)
            for fd in r:
                name, f = self.pipes[fd]
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    self.last_output = now
                    self.update(**{name: data})
                else:
                    f.close()
                    del self.pipes[fd]
        if self.logfiles and now >= self.next_log:
            self.next_log = now + 0.2
            self.read_logs()
        rc = self.proc.poll()
        if rc is None:
            if self.kill_at is not None and now >= self.kill_at:
                self.signal_group(signals.SIGKILL)
                self.kill_at = None
            if not self.timed_out and not self.interrupted:
                why = None
                if self.quiet and now - self.last_output > self.quiet:
                    why = "no output for %d s (timeout_seconds)" % self.quiet
                elif now - self.started > self.max_time:
                    why = "running for %d s (max_time_seconds)" % self.max_time
                if why:
                    self.timed_out = True
                    self.update(header="killed (SIGKILL): %s" % why)
                    self.signal_group(signals.SIGKILL)
            return
        if self.exited_at is None:
            self.exited_at = now
        if self.pipes and now - self.exited_at < 2.0:
            return  # what is left in the pipes (a grandchild holding them: 2 s at most)
        self.read_logs()
        res = {"exitStatus": rc} if rc >= 0 else {"signal": -rc}
        if self.timed_out:
            res["timedOut"] = True
            res["error"] = "timed out"
        self.update(header="exited with status %d" % rc if rc >= 0 else "killed by signal %d" % -rc)
        self.finish(**res)


class _Transfer(_Command):
    """Upload (file or tar stream) and download: one chunk request outstanding at a time."""

    def __init__(self, server, rid, cid):
        super().__init__(server, rid, cid)
        self.req, self.offset, self.sha = None, 0, hashlib.sha256()
        self.f, self.temp = None, None

    def cleanup(self):
        """Closes the transfer's file and removes its temporary file, if any."""
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
        if self.temp:
            try:
                os.unlink(self.temp)
            except OSError:
                pass

    def answer(self):
        """The answer to the outstanding request, or None while it has not come."""
        if self.req is None or self.req not in self.server.conn.pending_done:
            return None
        rec = self.server.conn.pending_done.pop(self.req)
        self.req = None
        if rec["kind"] == "ERROR":
            st = pb_decode("parley.v1.Status", rec["answer"]["payload"])
            raise CommandFailed("the master refused the chunk at offset %d: %s: %s" % (self.offset, pc.code_name(st.get("code", 0)), st.get("message", "")))
        return rec

    def cancel(self):
        if self.req is not None:
            self.server.conn.pending.pop(self.req, None)
        super().cancel()

    # What the transfer does to its file, for an OSError's message.
    io_verb = "transferring"

    def tick(self):
        """Takes the outstanding chunk request's answer once it has come, then `step`s."""
        if self.done:
            return
        try:
            rec = None
            if self.req is not None:
                rec = self.answer()
                if rec is None:
                    return
            self.step(rec)
        except CommandFailed as e:
            self.fail(str(e))
        except OSError as e:
            self.fail("%s: %s" % (self.io_verb, e))

    def step(self, rec):
        """The next chunk, after `rec` (the last request's answer; None if there was none)."""
        raise NotImplementedError


class _Upload(_Transfer):
    def __init__(self, server, rid, cid, f, size, chunk, stat_msg=None, temp=None):
        super().__init__(server, rid, cid)
        self.f, self.size, self.chunk, self.stat_msg, self.temp = f, size, chunk, stat_msg, temp

    io_verb = "reading"

    def step(self, rec):
        if self.interrupted:
            return self.fail("interrupted: %s" % self.reason)
        data = self.f.read(self.chunk)
        if not data:
            res = {"size": self.offset, "sha256": self.sha.digest()}
            if self.stat_msg is not None:
                res["stat"] = self.stat_msg
            return self.finish(**res)
        self.req = self.server.conn.request(W + "TransferWrite", {"commandId": self.cid, "offset": self.offset}, data=data)
        self.offset += len(data)
        self.sha.update(data)


class _Download(_Transfer):
    def __init__(self, server, rid, cid, spec, path):
        super().__init__(server, rid, cid)
        self.spec, self.path = spec, path
        self.chunk = min(spec.get("chunkSize", 0) or DEFAULT_CHUNK, MAX_CHUNK)
        self.max = spec.get("maxSize", 0) or TRANSFER_LIMIT

    def start(self):
        try:
            parent = os.path.dirname(self.path)
            os.makedirs(parent, exist_ok=True)
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                return self.fail("%s is a directory" % os.path.relpath(self.path, self.server.dir))
            fd, self.temp = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(self.path) + ".part-")
            self.f = os.fdopen(fd, "wb")
        except OSError as e:
            return self.fail("cannot write %s: %s" % (os.path.relpath(self.path, self.server.dir), e))

    io_verb = "writing"

    def step(self, rec):
        if rec is not None:
            data = bytes(rec["answer"].get("data") or b"")
            eof = pb_decode(W + "TransferData", rec["answer"]["payload"]).get("eof", False) if rec["answer"]["type"] == W + "TransferData" else None
            if eof is None:
                raise CommandFailed("the master answered %s, not TransferData" % rec["answer"]["type"])
            if len(data) > self.asked:
                raise CommandFailed("a chunk of %d bytes, %d asked for" % (len(data), self.asked))
            if self.offset + len(data) > self.max:
                raise CommandFailed("more than max_size (%d bytes)" % self.max)
            if not data and not eof:
                raise CommandFailed("an empty chunk that is not the last, at offset %d" % self.offset)
            self.f.write(data)
            self.sha.update(data)
            self.offset += len(data)
            if eof:
                return self.complete()
        if self.interrupted:
            return self.fail("interrupted: %s" % self.reason)
        self.asked = self.chunk
        self.req = self.server.conn.request(W + "TransferRead", {"commandId": self.cid, "offset": self.offset, "length": self.asked})

    def complete(self):
        size, digest = self.spec.get("size", 0), self.spec.get("sha256", b"")
        if size and size != self.offset:
            raise CommandFailed("received %d bytes, size says %d" % (self.offset, size))
        if digest and digest != self.sha.digest():
            raise CommandFailed("the SHA-256 of the bytes received does not match sha256")
        self.f.flush()
        os.fsync(self.f.fileno())
        os.fchmod(self.f.fileno(), (self.spec.get("mode", 0) or 0o644) & 0o7777)
        self.f.close()
        self.f = None
        os.replace(self.temp, self.path)
        self.temp = None
        self.finish(size=self.offset, sha256=self.sha.digest())


def file_stat(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"exists": False}
    kind = ("symlink" if stats.S_ISLNK(st.st_mode) else "directory" if stats.S_ISDIR(st.st_mode)
            else "file" if stats.S_ISREG(st.st_mode) else "other")
    return {"exists": True, "kind": kind, "size": st.st_size, "mode": stats.S_IMODE(st.st_mode),
            "mtimeUnixMs": st.st_mtime_ns // 1000000}


class CommandServer:
    def __init__(self, conn, directory, log=print):
        os.makedirs(directory, exist_ok=True)
        self.conn, self.dir, self.log = conn, os.path.realpath(directory), log
        self.running = {}   # command id -> _Command
        self.by_request = {}  # the master's request id -> command id

    # --- paths (R-19.8-2) ---
    def inside(self, real):
        return real == self.dir or real.startswith(self.dir + os.sep)

    def resolve(self, rel, what, allow_self=False, follow=True, base=None):
        """The absolute path of `rel` (relative to `base`, by default the command directory), or
        CommandRefused. `follow`: the last part is followed if it is a link (else only its parent)."""
        base = base or self.dir
        if allow_self and rel in ("", "."):
            full = base
        else:
            if not valid_file_name(rel):
                raise CommandRefused("%s: path %r breaks the rule of file names (R-19.8-2)" % (what, rel))
            full = os.path.join(base, rel)
        real = os.path.realpath(full) if follow or full == base else os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        if not self.inside(real):
            raise CommandRefused("%s: path %r leads out of the command directory (R-19.8-2)" % (what, rel))
        return full

    # --- the exchanges ---
    def error(self, rid, code, message):
        self.conn.send_message(pc.KIND["ERROR"], rid, "parley.v1.Status",
                               pb_encode("parley.v1.Status", {"code": pc.CODE[code], "message": message}))

    def on_request(self, h):
        rid = h["id"]
        try:
            if h["type"] == W + "InterruptCommand":
                ic = pb_decode(W + "InterruptCommand", h["payload"])
                c = self.running.get(ic.get("commandId", 0))
                if c is not None and not c.done:
                    self.log("command %d interrupted: %s" % (c.cid, ic.get("reason", "")))
                    c.interrupt(ic.get("signal", 0), ic.get("reason", ""))
                found = c is not None and not c.done
                self.conn.send_message(pc.KIND["RESPONSE"], rid, W + "InterruptReply",
                                       pb_encode(W + "InterruptReply", {"found": found}))
                return
            cmd = pb_decode(W + "Command", h["payload"])
        except ParleyError as e:
            return self.error(rid, "malformedPayload", str(e.message))
        cid = cmd.get("commandId", 0)
        kinds = [k for k in COMMAND_KINDS if k in cmd]
        try:
            if cid == 0:
                raise CommandRefused("command id 0")
            if cid in self.running:
                raise CommandRefused("command %d is running already" % cid)
            if len(kinds) != 1:
                raise CommandRefused("command %d has no kind this worker knows" % cid)
            c = self.start(rid, cid, kinds[0], cmd[kinds[0]])
        except CommandRefused as e:
            self.log("command %d refused: %s" % (cid, e))
            return self.error(rid, "invalidArgument", str(e))
        if c is not None and not c.done:
            self.running[cid] = c
            self.by_request[rid] = cid

    def on_cancel(self, rid):
        cid = self.by_request.pop(rid, None)
        if cid is None:
            return False
        c = self.running.pop(cid, None)
        if c is not None:
            self.log("command %d cancelled by the master" % cid)
            c.cancel()
        return True

    def tick(self):
        for cid, c in list(self.running.items()):
            if not c.done:
                try:
                    c.tick()
                except (OSError, ParleyError) as e:
                    if not c.done:
                        c.fail("%s" % e)
            if c.done:
                self.running.pop(cid, None)
                self.by_request.pop(c.rid, None)

    def close(self):
        for c in list(self.running.values()):
            c.cancel()
        self.running.clear()

    # --- the kinds ---
    def start(self, rid, cid, kind, spec):
        """Checks every path first (a refusal is whole, nothing done), then starts or does the
        command; returns the running command (None when done at once)."""
        if kind == "shell":
            workdir = self.resolve(spec.get("workdir", ""), "workdir", allow_self=True)
            logs = []
            for e in spec.get("logfiles", []):
                logs.append((e.get("key", ""), self.resolve(e.get("value", ""), "logfile %s" % e.get("key", ""), base=workdir)))
            c = _Shell(self, rid, cid, spec, workdir, logs)
            self.log("command %d: run %r" % (cid, spec.get("argv", [])))
            c.start()
            return c
        if kind in ("upload", "uploadDirectory"):
            path = self.resolve(spec.get("path", ""), kind, allow_self=(kind == "uploadDirectory"), follow=(kind == "uploadDirectory"))
            chunk = min(spec.get("chunkSize", 0) or DEFAULT_CHUNK, MAX_CHUNK)
            limit = spec.get("maxSize", 0) or TRANSFER_LIMIT
            c = _Command(self, rid, cid)
            try:
                if kind == "upload":
                    st = file_stat(path)
                    if not st["exists"]:
                        raise CommandFailed("%s does not exist" % spec.get("path", ""))
                    if st["kind"] != "file":
                        raise CommandFailed("%s is a %s, not a regular file" % (spec.get("path", ""), st["kind"]))
                    f = open(path, "rb", buffering=0)
                    fst = os.fstat(f.fileno())
                    if not stats.S_ISREG(fst.st_mode):
                        f.close()
                        raise CommandFailed("%s is not a regular file" % spec.get("path", ""))
                    if fst.st_size > limit:
                        f.close()
                        raise CommandFailed("%s is %d bytes, more than max_size %d" % (spec.get("path", ""), fst.st_size, limit))
                    u = _Upload(self, rid, cid, f, fst.st_size, chunk, stat_msg=st)
                else:
                    temp = self.tar(path, spec.get("path", ""), limit)
                    u = _Upload(self, rid, cid, open(temp, "rb", buffering=0), os.path.getsize(temp), chunk, temp=temp)
            except CommandFailed as e:
                c.fail(str(e))
                return None
            except OSError as e:
                c.fail("%s: %s" % (spec.get("path", ""), e))
                return None
            self.log("command %d: %s %s" % (cid, kind, spec.get("path", "")))
            u.tick()
            return u
        if kind == "download":
            path = self.resolve(spec.get("path", ""), "download", follow=False)
            d = _Download(self, rid, cid, spec, path)
            self.log("command %d: download to %s" % (cid, spec.get("path", "")))
            d.start()
            if not d.done:
                d.tick()
            return d
        c = _Command(self, rid, cid)
        try:
            if kind in ("mkdir", "rmdir", "rmfile"):
                paths = [self.resolve(p, kind, follow=(kind == "mkdir")) for p in spec.get("paths", [])]
                for rel, p in zip(spec.get("paths", []), paths):
                    self.file_op(kind, rel, p)
                c.finish()
            elif kind == "stat":
                p = self.resolve(spec.get("path", ""), "stat", allow_self=True, follow=False)
                st = file_stat(p)
                c.finish(stat=st, **({} if st["exists"] else {"exitStatus": 1, "error": "%s does not exist" % spec.get("path", "")}))
            elif kind == "listdir":
                p = self.resolve(spec.get("path", ""), "listdir", allow_self=True)
                try:
                    names = sorted(os.listdir(p))
                except OSError as e:
                    raise CommandFailed("%s: %s" % (spec.get("path", ""), e.strerror or e))
                c.finish(paths=names)
            elif kind == "glob":
                pattern = spec.get("path", "")
                if not valid_file_name(pattern):
                    raise CommandRefused("glob: pattern %r breaks the rule of file names (R-19.8-2)" % pattern)
                self.resolve(pattern, "glob", follow=False)  # its literal existing part must stay inside
                found = []
                for m in globs.glob(pattern, root_dir=self.dir):
                    parent = os.path.realpath(os.path.dirname(os.path.join(self.dir, m)))
                    if self.inside(parent):  # never what a link out leads to
                        found.append(m)
                c.finish(paths=sorted(found))
            elif kind == "cpdir":
                src = self.resolve(spec.get("from", ""), "cpdir from")
                dst = self.resolve(spec.get("to", ""), "cpdir to", follow=False)
                if not os.path.isdir(src):
                    raise CommandFailed("%s is not a directory" % spec.get("from", ""))
                if os.path.lexists(dst):
                    raise CommandFailed("%s exists" % spec.get("to", ""))
                try:
                    shutil.copytree(src, dst, symlinks=True)
                except (OSError, shutil.Error) as e:
                    raise CommandFailed("copying %s to %s: %s" % (spec.get("from", ""), spec.get("to", ""), e))
                c.finish()
        except CommandFailed as e:
            c.fail(str(e))
        self.log("command %d: %s done" % (cid, kind))
        return None

    def file_op(self, kind, rel, p):
        try:
            if kind == "mkdir":
                os.makedirs(p, exist_ok=True)
            elif kind == "rmdir":
                if not os.path.lexists(p):
                    return
                if os.path.islink(p) or not os.path.isdir(p):
                    raise CommandFailed("rmdir %s: not a directory" % rel)
                shutil.rmtree(p)
            else:
                if not os.path.lexists(p):
                    return
                if os.path.isdir(p) and not os.path.islink(p):
                    raise CommandFailed("rmfile %s: a directory" % rel)
                os.unlink(p)
        except OSError as e:
            raise CommandFailed("%s %s: %s" % (kind, rel, e.strerror or e))

    def tar(self, root, rel, limit):
        """19.8 upload_directory: POSIX ustar, sorted by name, directories, regular files and
        symbolic links (not followed), names relative to the directory; into a temporary file
        (so that a name too long, or a stream past max_size, fails before anything is sent)."""
        if not os.path.isdir(root):
            raise CommandFailed("%s is not a directory" % (rel or "the command directory"))
        entries = []
        for d, dirs, files in os.walk(root, followlinks=False):
            for n in dirs + files:
                full = os.path.join(d, n)
                entries.append((os.path.relpath(full, root), full))
        entries.sort(key=lambda e: e[0].encode("utf-8", "surrogateescape"))
        fd, temp = tempfile.mkstemp(prefix="pywork-tar-")
        try:
            with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, full in entries:
                    st = os.lstat(full)
                    if not (stats.S_ISDIR(st.st_mode) or stats.S_ISREG(st.st_mode) or stats.S_ISLNK(st.st_mode)):
                        continue
                    b = name.encode("utf-8", "surrogateescape")
                    if len(b) > 255 or len(b.rsplit(b"/", 1)[-1]) > 100:
                        raise CommandFailed("%s: a name too long for ustar" % name)
                    ti = tf.gettarinfo(full, arcname=name)
                    if ti.isreg():
                        with open(full, "rb") as f:
                            tf.addfile(ti, f)
                    else:
                        tf.addfile(ti)
                    if out.tell() > limit:
                        raise CommandFailed("the tar stream passes max_size %d" % limit)
            if os.path.getsize(temp) > limit:
                raise CommandFailed("the tar stream of %d bytes passes max_size %d" % (os.path.getsize(temp), limit))
            return temp
        except ValueError as e:  # tarfile: a name or link target too long for ustar
            os.unlink(temp)
            raise CommandFailed("%s: %s" % (rel, e))
        except BaseException:
            os.unlink(temp)
            raise


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
    def __init__(self, address, name, trusted, apps=(), timeout=15.0, workdir=None, log=print, slots=1, command_dir=None):
        self.address, self.name, self.apps, self.timeout, self.log = address, name, list(apps), timeout, log
        self.command_dir = command_dir  # 19.8: takes its master's commands, inside this directory (--commands)
        self.trusted = [bytes(k) for k in trusted]  # keys this worker trusts (19.1 rotation adds one)
        self.workdir = workdir or tempfile.mkdtemp(prefix="pyworker-")
        self.slots = slots
        self.runs = {}   # job id -> times this worker started its program
        self.renewals = 0
        self.connect()

    def connect(self):
        self.conn = connect(self.address, self.timeout)
        if self.command_dir:
            self.conn.commands = CommandServer(self.conn, self.command_dir, self.log)
        for prio, text in self.conn.messages:
            self.log("master says [%s]: %s" % (prio, text))
        hello = {"worker": self.name, "platform": "python-" + sys.platform, "cpus": os.cpu_count() or 1,
                 "slots": self.slots, "protocolVersion": WORK_PROTOCOL_VERSION, "os": os.uname().sysname + " " + os.uname().release,
                 "apps": self.apps, "commands": bool(self.command_dir)}
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
        if self.conn.commands is not None:
            self.conn.commands.close()  # the commands of a lost connection end with it
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
            fresh_signals()
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
        if self.conn.commands is not None:
            self.conn.commands.close()
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
# Commands scenario (19.8): this script's worker, started with --commands, driven by the
# reference `parley work command ...` through a master started with --allow-commands.
def commands_scenario(args):
    parley, master = args.parley, args.master
    nonce = os.urandom(4).hex()
    tmp = tempfile.mkdtemp(prefix="pywork-cmds-")
    step = ["start"]
    procs = []

    def say(text):
        step[0] = text
        print("--", text, flush=True)

    def ref(*argv, timeout=30.0):
        """The reference client: parley work command ARGV...; (status, stdout, stderr)."""
        r = subprocess.run([parley, "work", "command"] + list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")

    def ref_json(*argv, timeout=30.0):
        rc, out, err = ref(*argv, timeout=timeout)
        lines = [x for x in out.splitlines() if x.startswith("{")]
        check(lines, "no JSON result from %r (status %d): %s %s" % (argv, rc, out, err))
        import json
        return rc, json.loads(lines[-1]), err

    def start_worker(name, commands, directory=None):
        cmd = [sys.executable, "-B", os.path.abspath(__file__), "work", "--master", master, "--trust", pub_file,
               "--name", name, "--idle-exit", "600"]
        if commands:
            cmd += ["--commands", "--command-dir", directory]
        log = open(os.path.join(tmp, name + ".log"), "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        procs.append(p)
        return p

    priv = private_key_from_seed(os.urandom(32))
    pub_file = os.path.join(tmp, "work.pub")
    with open(pub_file, "w") as f:
        f.write("parley-work-ed25519-public-key %s\n" % base64.b64encode(public_bytes(priv)).decode())
    wa, wb = "py-cmd-" + nonce, "py-nocmd-" + nonce
    d = os.path.join(tmp, "commands")
    os.makedirs(d)
    A = ["--master", master, "--worker", wa]
    findings = []
    try:
        say("a worker with --commands and one without connect; ListWorkers (parley work workers) shows their hellos")
        start_worker(wa, True, d)
        start_worker(wb, False)
        import json
        end, seen = time.monotonic() + 30, {}
        while time.monotonic() < end:
            r = subprocess.run([parley, "work", "workers", "--master", master, "--json"], capture_output=True, timeout=30)
            if r.returncode == 0:
                seen = {w.get("worker"): w for w in json.loads(r.stdout.decode()).get("workers", [])}
                if wa in seen and wb in seen:
                    break
            check(all(p.poll() is None for p in procs), "a worker exited: see %s" % tmp)
            time.sleep(0.3)
        check(wa in seen and wb in seen, "workers listed: %r" % sorted(seen))
        check(seen[wa].get("commands") is True and not seen[wb].get("commands"), "WorkerHello.commands: %r" % seen)

        say("run: stdout and stderr streamed back, the exit status (3) is the command's")
        rc, out, err = ref("run", *A, "--", "/bin/sh", "-c", "echo out-%s; echo err-%s >&2; exit 3" % (nonce, nonce))
        check(rc == 3 and "out-%s\n" % nonce in out and "err-%s" % nonce in err, "status %d, out %r, err %r" % (rc, out, err))
        rc, res, err = ref_json("run", *A, "--json", "--", "/bin/sh", "-c", "exit 4")
        check(rc == 4 and res.get("exitStatus") == 4 and not res.get("signal"), "JSON result %r" % res)

        say("run: exactly the env given (nothing inherited), in workdir (created), program looked up in its PATH")
        rc, out, err = ref("run", *A, "--workdir", "w/sub", "--env", "X=%s" % nonce, "--env", "PATH=/usr/bin:/bin", "--", "env")
        check(rc == 0 and sorted(out.split()) == sorted(["X=%s" % nonce, "PATH=/usr/bin:/bin"]), "env printed %r (status %d, %s)" % (out, rc, err))
        check(os.path.isdir(os.path.join(d, "w", "sub")), "workdir not created")
        rc, out, err = ref("run", *A, "--workdir", "w/sub", "--shell", "--", "pwd;", "echo", "$0")
        check(rc == 0 and out.splitlines()[0] == os.path.realpath(os.path.join(d, "w", "sub")) and out.splitlines()[1] == "/bin/sh",
              "shell in workdir: %r" % out)

        say("run: a program that cannot be started ends with status 127")
        rc, out, err = ref("run", *A, "--", "no-such-program-%s" % nonce)
        check(rc == 127, "status %d: %s" % (rc, err))
        rc, res, err = ref_json("run", *A, "--json", "--", "/nonexistent/prog")
        check(res.get("exitStatus") == 127 and res.get("error"), "JSON %r" % res)

        say("run: killed by a signal (SIGTERM): signal 15, the client exits 143")
        rc, res, err = ref_json("run", *A, "--json", "--shell", "--", "kill -TERM $$")
        check(res.get("signal") == 15, "JSON %r" % res)
        rc, out, err = ref("run", *A, "--shell", "--", "kill -TERM $$")
        check(rc == 143, "status %d" % rc)

        say("run: timeout_seconds without output and max_time_seconds: killed (SIGKILL), timed_out")
        t0 = time.monotonic()
        rc, res, err = ref_json("run", *A, "--json", "--timeout", "1", "--", "/bin/sleep", "20")
        check(res.get("timedOut") is True and res.get("signal") == 9 and time.monotonic() - t0 < 15, "timeout: %r" % res)
        rc, res, err = ref_json("run", *A, "--json", "--max-time", "2", "--shell", "--", "while true; do echo x; sleep 0.2; done")
        check(res.get("timedOut") is True and res.get("signal") == 9 and 1500 <= int(res.get("elapsedMs", 0)) < 9000, "max time: %r" % res)

        say("run: logfiles come back while it runs, as [NAME] lines")
        rc, out, err = ref("run", *A, "--logfile", "build=log.txt", "--shell", "--",
                           "for i in 1 2 3; do echo line$i >> log.txt; sleep 0.3; done; echo end")
        check(rc == 0 and all("[build] line%d" % i in out + err for i in (1, 2, 3)) and "end" in out, "logfile: %r %r" % (out, err))

        say("run: several commands at once on one worker")
        # Each notes when it starts and when it ends: they overlap when every start comes before the first end.
        ps = [subprocess.Popen([parley, "work", "command", "run"] + A + ["--", "/bin/sh", "-c",
                               "date +%%s%%N > par%d.start; sleep 4; date +%%s%%N > par%d.end; echo par%d" % (i, i, i)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i in range(3)]
        try:
            outs = [p.communicate(timeout=60)[0].decode() for p in ps]
        finally:
            for p in ps:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        check(all(p.returncode == 0 for p in ps) and [o.strip() for o in outs] == ["par0", "par1", "par2"], "parallel: %r" % outs)
        starts = [int(open(os.path.join(d, "par%d.start" % i)).read()) for i in range(3)]
        ends = [int(open(os.path.join(d, "par%d.end" % i)).read()) for i in range(3)]
        check(max(starts) < min(ends), "the 3 commands did not run at once: starts %r, ends %r" % (starts, ends))

        say("interrupt (the client's SIGINT: InterruptWorkerCommand): the command's interrupt_signal, then its status")
        def interrupted(script, sig):
            marker = os.path.join(d, "running-%d" % sig)
            p = subprocess.Popen([parley, "work", "command", "run"] + A + ["--interrupt-signal", str(sig), "--", "/bin/sh", "-c",
                                  "touch running-%d; " % sig + script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                end = time.monotonic() + 20
                while not os.path.exists(marker) and time.monotonic() < end:
                    time.sleep(0.1)
                check(os.path.exists(marker), "the command to interrupt did not start within 20 s")
                os.unlink(marker)
                time.sleep(0.3)
                t = time.monotonic()
                p.send_signal(signals.SIGINT)
                o, e = p.communicate(timeout=30)
                return p.returncode, o.decode(errors="replace"), e.decode(errors="replace"), time.monotonic() - t
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        rc, out, err, took = interrupted("echo started; trap 'echo got-term; exit 7' TERM; sleep 20 & wait", 15)
        check(rc == 7 and "got-term" in out and "interrupt" in err, "interrupted: status %d out %r err %r" % (rc, out, err))
        say("interrupt: a command ignoring the signal is killed (SIGKILL) 5 s later")
        rc, out, err, took = interrupted("trap '' INT; sleep 30", 2)
        check(rc == 137 and 4.0 <= took < 15, "status %d after %.1f s: %s" % (rc, took, err))
        say("InterruptWorkerCommand of a command that does not run: found false")
        sub = Submitter(master)
        try:
            r = sub.conn.call("InterruptWorkerCommand", {"worker": wa, "interrupt": {"commandId": 987654321, "reason": "none"}}, "InterruptReply")
            check(not r.get("found"), "found: %r" % r)
        finally:
            sub.close()

        say("download: the master's bytes to the worker's file (parents made), mode 0644 by default or as given")
        big = os.urandom(300000 + 17)
        local = os.path.join(tmp, "big.bin")
        with open(local, "wb") as f:
            f.write(big)
        rc, out, err = ref("download", *A, local, "files/deep/big.bin")
        target = os.path.join(d, "files", "deep", "big.bin")
        check(rc == 0 and open(target, "rb").read() == big, "download: %d %s" % (rc, err))
        check(stats.S_IMODE(os.stat(target).st_mode) == 0o644, "mode %o" % stats.S_IMODE(os.stat(target).st_mode))
        check(hashlib.sha256(big).hexdigest() in out, "download output: %r" % out)
        rc, out, err = ref("download", *A, "--file-mode", "600", local, "files/private.bin")
        check(rc == 0 and stats.S_IMODE(os.stat(os.path.join(d, "files", "private.bin")).st_mode) == 0o600, "mode 600: %s" % err)
        empty = os.path.join(tmp, "empty.bin")
        open(empty, "wb").close()
        rc, out, err = ref("download", *A, empty, "files/empty.bin")
        check(rc == 0 and os.path.getsize(os.path.join(d, "files", "empty.bin")) == 0, "empty download: %s" % err)
        check(not [n for n in os.listdir(os.path.join(d, "files")) if ".part-" in n], "a partial file was left")

        say("upload: the worker's file here, whole, with its modification time")
        back = os.path.join(tmp, "back.bin")
        rc, out, err = ref("upload", *A, "files/deep/big.bin", back)
        check(rc == 0 and open(back, "rb").read() == big, "upload: %d %s" % (rc, err))
        check(int(os.stat(back).st_mtime) == int(os.stat(target).st_mtime), "keepstamp: %s vs %s" % (os.stat(back).st_mtime, os.stat(target).st_mtime))
        say("upload: a symbolic link is refused (status 1); a file over --max-size is refused before anything is sent, nothing written")
        os.symlink("big.bin", os.path.join(d, "files", "deep", "link"))
        rc, out, err = ref("upload", *A, "files/deep/link", os.path.join(tmp, "l.bin"))
        check(rc == 1 and not os.path.exists(os.path.join(tmp, "l.bin")), "symlink upload: %d %s" % (rc, err))
        rc, out, err = ref("upload", *A, "--max-size", "1000", "files/deep/big.bin", os.path.join(tmp, "s.bin"))
        check(rc == 1 and not os.path.exists(os.path.join(tmp, "s.bin")), "max-size upload: %d %s" % (rc, err))
        rc, out, err = ref("upload", *A, "files/missing.bin", os.path.join(tmp, "m.bin"))
        check(rc == 1, "missing file upload: %d %s" % (rc, err))

        say("upload of an empty file (no chunk at all: nothing to send)")
        for flags in ([], ["--json"]):
            e_local = os.path.join(tmp, "e%d.bin" % len(flags))
            rc, out, err = ref("upload", *A, *flags, "files/empty.bin", e_local)
            if rc == 0 and os.path.exists(e_local) and os.path.getsize(e_local) == 0:
                print("    (empty upload with no TransferWrite, client options %r: accepted)" % flags)
            else:
                findings.append("the reference client, options %r, refuses an empty file uploaded without any TransferWrite: %s"
                                % (flags, ([x for x in (out + err).splitlines() if x.startswith("parley work command")] or ["?"])[0]))
                print("    FINDING: %s" % findings[-1])

        say("upload --directory: a ustar stream, sorted by name, directories, files and links (not followed)")
        tarpath = os.path.join(tmp, "files.tar")
        rc, out, err = ref("upload", *A, "--directory", "files", tarpath)
        check(rc == 0, "directory upload: %d %s" % (rc, err))
        with tarfile.open(tarpath) as tf:
            members = tf.getmembers()
            names = [m.name.rstrip("/") for m in members]
            check(names == sorted(names) and set(names) == {"deep", "deep/big.bin", "deep/link", "empty.bin", "private.bin"}, "tar names %r" % names)
            link = [m for m in members if m.name == "deep/link"][0]
            check(link.issym() and link.linkname == "big.bin", "link member %r" % link)
            check(tf.extractfile("deep/big.bin").read() == big, "tar content")

        say("mkdir, stat, ls, glob, cp, rmfile, rmdir")
        check(ref("mkdir", *A, "m/a/b", "m/c")[0] == 0 and os.path.isdir(os.path.join(d, "m", "a", "b")), "mkdir")
        rc, res, err = ref_json("stat", *A, "--json", "files/deep/big.bin")
        st = res.get("stat", {})
        check(rc == 0 and st.get("exists") and st.get("kind") == "file" and int(st.get("size", 0)) == len(big) and st.get("mode") == 0o644, "stat %r" % res)
        rc, res, err = ref_json("stat", *A, "--json", "files/deep/link")
        check(rc == 0 and res.get("stat", {}).get("kind") == "symlink", "stat of a link: %r" % res)
        rc, res, err = ref_json("stat", *A, "--json", "nothing-here")
        check(rc == 1 and not res.get("stat", {}).get("exists"), "stat of nothing: %r" % res)
        rc, out, err = ref("ls", *A, "files")
        check(rc == 0 and out.split() == ["deep", "empty.bin", "private.bin"], "ls %r" % out)
        rc, out, err = ref("ls", *A)
        check(rc == 0 and out.split() == sorted(os.listdir(d)), "ls of the command directory %r" % out)
        rc, out, err = ref("glob", *A, "files/*/*.bin")
        check(rc == 0 and out.split() == ["files/deep/big.bin"], "glob %r" % out)
        rc, out, err = ref("glob", *A, "nomatch*")
        check(rc == 0 and out.split() == [], "glob without a match %r %s" % (out, err))
        check(ref("cp", *A, "files", "copy")[0] == 0 and open(os.path.join(d, "copy", "deep", "big.bin"), "rb").read() == big
              and os.path.islink(os.path.join(d, "copy", "deep", "link")), "cp")
        check(ref("cp", *A, "files", "copy")[0] == 1, "cp onto an existing directory is not status 1")
        check(ref("rmfile", *A, "copy/deep/link", "copy/not-there")[0] == 0 and not os.path.lexists(os.path.join(d, "copy", "deep", "link")), "rmfile")
        check(ref("rmfile", *A, "copy/deep")[0] == 1, "rmfile of a directory is not status 1")
        check(ref("rmdir", *A, "copy/deep/big.bin")[0] == 1, "rmdir of a file is not status 1")
        check(ref("rmdir", *A, "copy", "not-there")[0] == 0 and not os.path.exists(os.path.join(d, "copy")), "rmdir")

        say("refusals (R-19.8-2): '..', an absolute path, a link out of the directory: invalidArgument, nothing done")
        os.symlink(tmp, os.path.join(d, "out"))
        for sub_argv in (["stat", "../x"], ["mkdir", "ok-dir", "/abs"], ["ls", "out"], ["stat", "out/work.pub"],
                         ["upload", "out/work.pub", os.path.join(tmp, "o.bin")], ["download", local, "out/x.bin"],
                         ["run", "--workdir", "../w", "--", "/bin/true"], ["rmdir", "a//b"], ["cp", "files", "out/copy"]):
            rc, out, err = ref(sub_argv[0], *A, *sub_argv[1:])
            check(rc != 0 and "invalidArgument" in out + err, "%r: status %d, %s %s" % (sub_argv, rc, out.strip(), err.strip()))
        check(not os.path.exists(os.path.join(d, "ok-dir")) and not os.path.exists(os.path.join(tmp, "copy")), "a refused command did something")

        say("a worker whose hello says no commands: the master refuses (permissionDenied); an unknown worker: invalidArgument")
        rc, out, err = ref("run", "--master", master, "--worker", wb, "--", "/bin/true")
        check(rc != 0 and "permissionDenied" in out + err, "worker without --commands: %d %s %s" % (rc, out, err))
        rc, out, err = ref("run", "--master", master, "--worker", "nobody-" + nonce, "--", "/bin/true")
        check(rc != 0 and "invalidArgument" in out + err, "unknown worker: %d %s %s" % (rc, out, err))

        say("CANCEL: the client killed, the master cancels; the worker kills what it runs")
        pidfile = os.path.join(d, "cancel.pid")
        p = subprocess.Popen([parley, "work", "command", "run"] + A + ["--", "/bin/sh", "-c", "echo $$ > cancel.pid; exec sleep 30"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while not os.path.exists(pidfile) and time.monotonic() < end:
            time.sleep(0.1)
        p.kill()
        p.wait()
        gone = False
        try:
            child = int(open(pidfile).read().strip())
            end = time.monotonic() + 10
            while time.monotonic() < end:
                try:
                    os.kill(child, 0)
                except ProcessLookupError:
                    gone = True
                    break
                time.sleep(0.2)
        except (OSError, ValueError):
            pass
        print("    (the command of a client killed with SIGKILL %s)" % ("was stopped" if gone else "still runs after 10 s"))
        if not gone:
            findings.append("a command whose client died was not stopped within 10 s")

        say("the workers are still connected and serving")
        rc, out, err = ref("run", *A, "--", "/bin/echo", "still-" + nonce)
        check(rc == 0 and out.strip() == "still-" + nonce, "after it all: %d %r %s" % (rc, out, err))
        check(all(p.poll() is None for p in procs), "a worker exited")
        for f in findings:
            print("finding: %s" % f)
        print("commands scenario: every check passed")
        return 0
    except CheckFailed as e:
        print("FAILED: check failed in step %r: %s" % (step[0], e))
    except ParleyError as e:
        print("FAILED: Parley error in step %r: %s" % (step[0], e))
    except (OSError, subprocess.TimeoutExpired) as e:
        print("FAILED: %s in step %r: %s" % (type(e).__name__, step[0], e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signals.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for name in (wa, wb):
            try:
                log = open(os.path.join(tmp, name + ".log"), errors="replace").read()
                if "Traceback" in log:
                    print("worker %s log:\n%s" % (name, log[-3000:]))
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
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
    command_dir = None
    if args.commands:
        command_dir = args.command_dir or tempfile.mkdtemp(prefix="pywork-commands-")
    w = Worker(args.master, args.name or "py-worker-%s-%d" % (socket.gethostname(), os.getpid()), keys, apps=args.app or [],
               command_dir=command_dir)
    if command_dir:
        print("taking the master's commands in %s" % os.path.realpath(command_dir), flush=True)
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
    k.add_argument("--commands", action="store_true", help="take the master's commands (19.8); without it they are refused")
    k.add_argument("--command-dir", help="with --commands: the directory every command stays in (default: a new temporary one)")
    c = subs.add_parser("scenario")
    c.add_argument("--master", required=True, help="a master started with --trust (the key's work.pub), an empty store")
    c.add_argument("--key", required=True)
    c.add_argument("--jobs", type=int, default=5)
    c.add_argument("--untrusting-master", help="optional: a master without --trust, empty store, --max-attempts any")
    cs = subs.add_parser("commands-scenario")
    cs.add_argument("--master", required=True, help="a master started with --allow-commands")
    cs.add_argument("--parley", required=True, help="the reference parley binary (its `work command` client)")
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
    if args.cmd == "commands-scenario":
        return commands_scenario(args)
    ap.error("give --self-test or a subcommand")


if __name__ == "__main__":
    sys.exit(main())
