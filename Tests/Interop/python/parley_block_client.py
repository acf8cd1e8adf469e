#!/usr/bin/env python3
"""Independent Parley Block client (docs/protocol.md section 17, with 17.9 DIRECT IO).

Written from docs/protocol.md ONLY; no code of the reference implementation was read.
Python 3.11, standard library only. The Parley layer (CRC-32C, protobuf helpers, banner,
frames, MESSAGE header, handshake, session) is IMPORTED from parley_client.py in the same
directory (itself written from the same document); this file adds the block protocol:
the two SessionInfo/SessionInfoReply fields parley_client.py lacks (direct_io), the DIRECT
frame layout of 17.9, and the checks.

    python3 parley_block_client.py HOST:PORT --export disk [--ro-export ro] [--file PATH]
    python3 parley_block_client.py unix:PATH --export disk --expect-direct yes
    python3 parley_block_client.py --self-test [docs/protocol.md]

The live run does, over Io messages and then over DIRECT frames (if granted): list exports,
Open before SessionInfo, SessionInfo (and its repetition), an unknown path, opens, writes of
several offsets and sizes read back, unaligned IO, many IOs in flight at once, flush, FUA,
write-zeroes and discard read back, IO past the end, over max_io_size, bad flags and
operations, wrong data segments, an unknown device, a read-only open, a read-only export,
a second writer of another session (BUSY) and of the same session (shared), a Close with IO
in flight, a double Close. Then (unless --no-multipath; the export needs 64 MiB) 17.8 and the
Fence exchange of 17.1, over Io messages and over DIRECT frames: paths of one client_instance,
repeated SessionInfo with another instance, every Fence refusal (another session or instance,
its own id, ids never given out, instance 0, before SessionInfo, a list with one bad id), an
ended connection fenced already, a Fence of a path with FUA writes and reads in flight (answers
OK, FENCED or dropped; the device right after FenceReply holds exactly the writes answered OK,
and nothing changes later), new IO and Open on the fenced path, and a client's failover (write A
on path 1; writes B on path 1 taken for dead before their answers, closed or left open; Fence
from path 2; B again on path 2; later overlapping writes C; B under C everywhere, stale copies
on the fenced path FENCED). Exit 0 when everything matched, 1 naming the failed check.
"""
import argparse
import os
import random
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parley_client as pc  # noqa: E402  (the Parley layer: see the docstring)
from parley_client import ParleyError, CheckFailed  # noqa: E402

# ---------------------------------------------------------------------------------------
# Schema additions (section 17.6): direct_io in SessionInfo (4) and SessionInfoReply (5).
def _add_field(type_name, field):
    if all(f[0] != field[0] for f in pc.SCHEMA[type_name]):
        pc.SCHEMA[type_name] = list(pc.SCHEMA[type_name]) + [field]


_add_field("parley.block.v1.SessionInfo", (4, "directIo", "bool", False))
_add_field("parley.block.v1.SessionInfoReply", (5, "directIo", "bool", False))

P = "parley.block.v1."
STATUSES = pc.ENUMS[P + "BlockStatus"]
ST = {name[len("BLOCK_STATUS_"):]: i for i, name in enumerate(STATUSES)}
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = 0, 1, 2, 3, 4
OPS = {READ: "read", WRITE: "write", FLUSH: "flush", DISCARD: "discard", WRITE_ZEROES: "write-zeroes"}
FUA = 1
RO, RW, MIGRATION = 0, 1, 2
F_DIRECT = 0x10
OUR_SUPPORTED = 0x1F  # streams, keepalive, notice, dataSegment, direct (section 3)
TAG_DIRECT = 0x16


def status_name(s):
    return STATUSES[s][len("BLOCK_STATUS_"):] if s is not None and 0 <= s < len(STATUSES) else "status %r" % (s,)


# ---------------------------------------------------------------------------------------
# DIRECT layout (section 17.9): request segment 0 is 32 bytes, answer segment 0 16 bytes.
def encode_direct_request(direct_id, op, flags, device_id, offset, length, reserved10=0, reserved28=0):
    return struct.pack("<QBBHIQII", direct_id, op, flags, reserved10, device_id, offset, length, reserved28)


def decode_direct_request(seg):
    if len(seg) != 32:
        raise ParleyError("malformedPayload", "DIRECT block request of %d bytes, not 32" % len(seg))
    i, op, flags, r10, dev, off, length, r28 = struct.unpack("<QBBHIQII", seg)
    return {"id": i, "op": op, "flags": flags, "reserved10": r10, "device": dev, "offset": off,
            "length": length, "reserved28": r28}


def encode_direct_answer(direct_id, status):
    return struct.pack("<QII", direct_id, status, 0)


def decode_direct_answer(segments, request=None):
    """segments of a received DIRECT frame; request: (op, length) of the request it answers, or
    None (id only). Returns (id, status, data or None); malformedPayload per R-17.9-2."""
    seg0 = segments[0]
    if len(seg0) != 16:
        raise ParleyError("malformedPayload", "DIRECT block answer of %d bytes, not 16" % len(seg0))
    direct_id, status, reserved = struct.unpack("<QII", seg0)
    if reserved:
        raise ParleyError("malformedPayload", "DIRECT block answer with reserved bytes 12-15 = %#x" % reserved)
    if len(segments) > 2:
        raise ParleyError("malformedPayload", "DIRECT block answer with %d segments" % len(segments))
    data = bytes(segments[1]) if len(segments) == 2 else None
    if request is not None and status == ST["OK"]:
        op, length = request
        if op == READ and (data is None or len(data) != length):
            raise ParleyError("malformedPayload", "OK answer of a %d-byte read with %s" % (
                length, "no segment 1" if data is None else "%d bytes" % len(data)))
        if op != READ and data is not None:
            raise ParleyError("malformedPayload", "OK answer of a %s with a segment 1" % OPS.get(op, op))
    # A refusal carrying a segment 1: the answer layout says "absent otherwise", R-17.9-2 does
    # not list it as malformed. Choice: ignore the bytes (see the report).
    if status != ST["OK"]:
        data = None
    return direct_id, status, data


# ---------------------------------------------------------------------------------------
class BlockConnection(pc.Connection):
    """A Parley connection speaking the block protocol, with Io messages and DIRECT frames."""

    def __init__(self, address, timeout=20.0, verbose=False, supported=OUR_SUPPORTED):
        super().__init__(address, timeout, "0.1.0", verbose, supported, 0, ("none",))
        self.direct_granted = False
        self.direct_next = 0
        self.direct_pending = {}  # direct id -> (op, length)
        self.direct_done = {}  # direct id -> (status, data)
        self.direct_discarded = 0

    # --- receiving: parley_client's read_one calls on_direct for DIRECT answers (7.16, 17.9)
    def on_direct(self, segs):
        direct_id = struct.unpack_from("<Q", segs[0])[0]
        req = self.direct_pending.get(direct_id)
        if req is None:  # R-7.16-6: an answer to nothing we wait for is discarded
            self.direct_discarded += 1
            return
        _, status, data = decode_direct_answer(segs, req)
        del self.direct_pending[direct_id]
        self.direct_done[direct_id] = (status, data)

    # --- block exchanges (17.1) -------------------------------------------------------------
    def call(self, short_type, msg, answer_type):
        i = self.request(P + short_type, msg)
        return pc.answer(self.wait([i])[i], P + answer_type)

    def session_info(self, name, version=1, instance=0, direct=False):
        msg = {"protocolVersion": version, "sessionName": name}
        if instance:
            msg["clientInstance"] = instance
        if direct:
            msg["directIo"] = True
        reply = self.call("SessionInfo", msg, "SessionInfoReply")
        if reply.get("status", 0) == ST["OK"] and reply.get("directIo"):
            # A repeated SessionInfo "gets the same answer" (17.1, 17.9): a grant repeated to
            # one that did not ask again is that same answer, not a new grant.
            if not self.state["features"] & F_DIRECT or not (direct or self.direct_granted):
                raise CheckFailed("R-17.9-1: DIRECT granted though %s" % (
                    "not asked for" if not direct else "bit 4 was not negotiated"))
            self.direct_granted = True
        return reply

    def open(self, path, mode):
        return self.call("Open", {"path": path, "accessMode": mode}, "OpenReply")

    def close_device(self, device_id):
        return self.call("Close", {"deviceId": device_id}, "CloseReply")

    # --- IO: Io messages ("m") or DIRECT frames ("d") ---------------------------------------
    def submit(self, mode, device_id, offset, length, op, flags=0, data=None, reserved=(0, 0)):
        """Sends one IO without waiting; returns a token for collect()."""
        if mode == "d":
            if not self.direct_granted:  # 17.9: never before a grant has been read
                raise CheckFailed("internal: DIRECT IO without a grant")
            self.direct_next += 1
            i = self.direct_next
            segs = [encode_direct_request(i, op, flags, device_id, offset, length, *reserved)]
            if data is not None:
                segs.append(data)
            size = sum(len(s) for s in segs)
            if size > self.peer_max_frame:  # 4.5, 7.16: never over the peer's limit
                raise ParleyError("frameTooLarge", "DIRECT frame of %d bytes, server accepts %d" % (size, self.peer_max_frame))
            self.state["direct"] = True  # R-7.16-1: enabled on our side with the first DIRECT frame
            self.direct_pending[i] = (op, length)
            self.send(pc.encode_frame(TAG_DIRECT, segs, (0, 4096 if data is not None else 0, 0, 0)))
            return ("d", i, op, length)
        msg = {"deviceId": device_id, "offset": offset, "length": length, "operation": op, "flags": flags}
        i = self.request(P + "Io", msg, data)
        return ("m", i, op, length)

    def _done(self, token):
        return token[1] in (self.direct_done if token[0] == "d" else self.pending_done)

    def _take(self, token):
        kind, i, op, length = token
        if kind == "d":
            status, data = self.direct_done.pop(i)
            return status, "", data
        rec = self.pending_done.pop(i)
        if rec["kind"] == "ERROR":  # 17.1: block errors are statuses, never ERROR
            st = pc.pb_decode("parley.v1.Status", rec["answer"]["payload"])
            raise CheckFailed("Io %s answered with a Parley ERROR %s: %s" % (
                OPS.get(op, op), pc.code_name(st.get("code", 0)), st.get("message", "")))
        reply = pc.answer(rec, P + "IoReply")
        status, data = reply.get("status", 0), rec["answer"]["data"]
        if status == ST["OK"]:
            if op == READ:
                # 17.2: "exactly `length` bytes in a successful answer". For length 0 the
                # document does not say whether an empty data segment or none: both accepted.
                if data is None and length == 0:
                    data = b""
                if data is None or len(data) != length:
                    raise CheckFailed("Io read of %d bytes answered OK with %s" % (
                        length, "no data segment" if data is None else "%d bytes" % len(data)))
            elif data:
                raise CheckFailed("Io %s answered OK with a %d-byte data segment" % (OPS.get(op, op), len(data)))
        return status, reply.get("message", ""), data

    def collect(self, tokens):
        """Reads until every token is answered; returns [(status, message, data)] in order."""
        while not all(self._done(t) for t in tokens):
            self.read_one()
        return [self._take(t) for t in tokens]

    def io(self, mode, *args, **kw):
        return self.collect([self.submit(mode, *args, **kw)])[0]

    def run_batch(self, mode, ios, depth=128):
        """ios: [(device, offset, length, op, flags, data)], at most `depth` in flight at once
        (section 7.15: a client bounds its own requests). mode "mix" alternates DIRECT and Io.
        Returns the results in order and the highest number in flight seen."""
        results, inflight, nxt, peak = [None] * len(ios), {}, 0, 0
        while nxt < len(ios) or inflight:
            while nxt < len(ios) and len(inflight) < depth:
                m = ("d" if nxt % 2 else "m") if mode == "mix" else mode
                inflight[nxt] = self.submit(m, *ios[nxt])
                nxt += 1
            peak = max(peak, len(inflight))
            self.read_one()
            for k in [k for k, t in inflight.items() if self._done(t)]:
                results[k] = self._take(inflight.pop(k))
        return results, peak


# ---------------------------------------------------------------------------------------
# The live checks.
class Run:
    def __init__(self, args):
        self.args = args
        self.passed = 0
        self.rng = random.Random(args.seed)
        self.tag = "%06x" % self.rng.getrandbits(24)
        self.seen_ids = set()

    def ok(self, cond, name, detail=""):
        if not cond:
            raise CheckFailed("%s%s" % (name, ": " + detail if detail else ""))
        self.passed += 1
        if self.args.verbose:
            print("  ok %s" % name)

    def expect(self, result, want, name):
        status, message, _ = result
        self.ok(status == ST[want], name, "got %s (%r), want %s" % (status_name(status), message, want))

    def connect(self, supported=OUR_SUPPORTED):
        c = BlockConnection(self.args.address, self.args.timeout, self.args.verbose, supported)
        c.handshake()
        return c

    def pattern(self, n):
        return self.rng.randbytes(n)

    def main(self):
        a = self.args
        print("step 1: connect to %s, ListExports and Open before SessionInfo" % a.address)
        c = self.connect()
        print("  features %#x (server supported %#x)" % (c.state["features"], c.peer_supported))
        exports = c.call("ListExports", {}, "ExportList").get("exports", [])
        names = {e.get("name"): e for e in exports}
        print("  exports: %s" % ", ".join("%s (%d bytes%s%s)" % (n, e.get("geometry", {}).get("sizeBytes", 0),
                                                                 ", read-only" if e.get("readOnly") else "",
                                                                 ", shared" if e.get("shared") else "")
                                          for n, e in names.items()))
        self.ok(a.export in names, "ListExports names the export %r" % a.export, "got %s" % sorted(names))
        listed = names[a.export].get("geometry", {})
        if a.ro_export:
            self.ok(a.ro_export in names and names[a.ro_export].get("readOnly"), "ListExports marks %r read_only" % a.ro_export)
        r = c.open(a.export, RW)
        self.ok(r.get("status", 0) == ST["NO_SESSION"], "Open before SessionInfo is NO_SESSION",
                "got %s" % status_name(r.get("status", 0)))

        print("step 2: SessionInfo and its refusals")
        name = "pyblock-%s.m" % self.tag
        rep = c.session_info(name)
        self.ok(rep.get("status", 0) == ST["OK"], "SessionInfo OK", repr(rep))
        self.ok(rep.get("protocolVersion") == 1, "SessionInfo protocol_version 1", repr(rep))
        self.ok(rep.get("connectionId", 0) != 0, "SessionInfo connection_id not 0", repr(rep))
        self.ok(not rep.get("directIo"), "no DIRECT granted when not asked", repr(rep))
        again = c.session_info(name)
        self.ok(again == rep, "a repeated SessionInfo gets the same answer", "%r then %r" % (rep, again))
        other = c.session_info(name + "x")
        self.ok(other.get("status", 0) == ST["INVALID"], "SessionInfo with another name on the same connection is INVALID", repr(other))
        for bad_name, version, label in [(".dot", 1, "a name starting with '.'"), ("a b", 1, "a name with a space"),
                                         ("", 1, "an empty name"), ("x" * 65, 1, "a 65-byte name"),
                                         ("ok-name", 0, "protocol_version 0")]:
            t = self.connect()
            r = t.session_info(bad_name, version)
            t.close()
            self.ok(r.get("status", 0) == ST["INVALID"], "SessionInfo with %s is INVALID" % label, repr(r))
        t = self.connect()
        r = t.session_info("A-z_0.9" + "x" * 57)  # 64 bytes of every allowed class
        self.ok(r.get("status", 0) == ST["OK"], "SessionInfo with a 64-byte name of [A-Za-z0-9._-] is OK", repr(r))
        r2 = t.session_info("pyblock-%s.v" % self.tag, 7)
        t.close()
        print("  (observed: a repeated SessionInfo with another name and version 7: %s)" % status_name(r2.get("status", 0)))
        self.ok(r.get("connectionId") != rep.get("connectionId"), "connection ids differ between connections")

        print("step 3: pass over Io messages")
        self.io_pass(c, "m", name, listed)
        c.close()

        print("step 4: SessionInfo asking for DIRECT IO")
        d = self.connect()
        dname = "pyblock-%s.d" % self.tag
        rep = d.session_info(dname, direct=True)
        self.ok(rep.get("status", 0) == ST["OK"], "SessionInfo with direct_io OK", repr(rep))
        granted = bool(rep.get("directIo"))
        print("  feature bit 4 negotiated: %s; DIRECT granted: %s" % (bool(d.state["features"] & F_DIRECT), granted))
        if a.expect_direct == "yes":
            self.ok(granted, "the server grants DIRECT IO")
        elif a.expect_direct == "no":
            self.ok(not granted, "the server refuses DIRECT IO")
        again = d.session_info(dname, direct=True)
        self.ok(again == rep, "a repeated SessionInfo with direct_io gets the same answer", "%r then %r" % (rep, again))
        if granted:
            print("step 5: pass over DIRECT frames")
            self.io_pass(d, "d", dname, listed)
        else:
            print("step 5: DIRECT not granted: the same pass over Io messages")
            self.io_pass(d, "m", dname, listed)
        d.close()

        if a.expect_direct != "no":
            print("step 6: a client without feature bit 4 asking for DIRECT is not granted it")
            e = self.connect(supported=0xF)
            rep = e.session_info("pyblock-%s.n" % self.tag, direct=True)
            e.close()
            self.ok(rep.get("status", 0) == ST["OK"] and not rep.get("directIo"),
                    "R-17.9-1: no DIRECT without bit 4", repr(rep))
        if a.multipath:
            if listed.get("sizeBytes", 0) < 64 << 20:
                raise CheckFailed("the multipath checks need an export of at least 64 MiB")
            for mode in ("m", "d") if granted else ("m",):
                print("step 7%s: multipath and Fence (17.8, 17.1) over %s" % (
                    "a" if mode == "m" else "b", "DIRECT frames" if mode == "d" else "Io messages"))
                self.multipath_pass(mode)
                print("  pass of 17.8 over %s done" % ("DIRECT frames" if mode == "d" else "Io messages"))
        print("OK: every check passed (%d checks)" % self.passed)
        return 0

    def io_pass(self, c, mode, session, listed):
        a = self.args
        label = "[%s] " % ("DIRECT" if mode == "d" else "Io")
        chk = lambda name: label + name  # noqa: E731
        r = c.open("no-such-export-%s" % self.tag, RW)
        self.ok(r.get("status", 0) == ST["NOT_FOUND"], chk("Open of an unknown path is NOT_FOUND"),
                "got %s %r" % (status_name(r.get("status", 0)), r.get("message", "")))
        r = c.open(a.export, RW)
        self.ok(r.get("status", 0) == ST["OK"], chk("Open read-write"), repr(r))
        dev, g = r.get("deviceId", 0), r.get("geometry", {})
        self.ok(dev != 0, chk("device_id is not 0"))
        self.ok(r.get("accessMode", 0) == RW, chk("OpenReply access_mode is the requested one"), repr(r))
        size, lbs, max_io = g.get("sizeBytes", 0), g.get("logicalBlockSize", 0), g.get("maxIoSize", 0)
        print("  %sdevice %d: size %d, logical block %d, physical %d, max_io %d, discard %d/%d, write_cache %s, fua %s" % (
            label, dev, size, lbs, g.get("physicalBlockSize", 0), max_io, g.get("discardGranularity", 0),
            g.get("maxDiscardSize", 0), g.get("writeCache", False), g.get("fua", False)))
        self.ok(g.get("sizeSectors", 0) == size // 512, chk("size_sectors is size_bytes / 512"))
        self.ok(lbs > 0 and lbs & (lbs - 1) == 0 and g.get("physicalBlockSize", 0) >= lbs, chk("block sizes sane"), repr(g))
        self.ok(max_io >= 65536 and max_io % lbs == 0, chk("max_io_size sane"), repr(g))
        self.ok(listed.get("sizeBytes") == size and listed.get("logicalBlockSize") == lbs,
                chk("ListExports geometry matches the OpenReply's"), "%r vs %r" % (listed, g))
        self.ok(size >= 32 << 20, chk("the device has at least 32 MiB (this workload's layout)"), "size %d" % size)
        MiB = 1 << 20

        # Writes of several offsets and sizes, one at a time, then read back all at once.
        ranges = [(0, lbs), (3 * lbs, 2 * lbs), (8192, 4096), (196608, 65536), (MiB + lbs, 128 * 1024 - lbs),
                  (2 * MiB, MiB), (4 * MiB, min(max_io, 8 * MiB)), (size - lbs, lbs)]
        content = {}
        for k, (off, n) in enumerate(ranges):
            data = self.pattern(n)
            flags = FUA if k % 3 == 1 else 0
            self.expect(c.io(mode, dev, off, n, WRITE, flags, data), "OK",
                        chk("write of %d bytes at %d%s" % (n, off, " with FUA" if flags else "")))
            content[off] = data
        res, _ = c.run_batch(mode, [(dev, off, n, READ, 0, None) for off, n in ranges])
        for (off, n), (st, msg, data) in zip(ranges, res):
            self.ok(st == ST["OK"] and data == content[off], chk("read back %d bytes at %d" % (n, off)),
                    "%s %r, %s" % (status_name(st), msg, "data differ" if data is not None else "no data"))

        # Refusals of 17.2, each checked to leave the data as it was.
        if lbs > 1:
            self.expect(c.io(mode, dev, 100, lbs, WRITE, 0, b"\xee" * lbs), "INVALID", chk("write at an unaligned offset"))
            self.expect(c.io(mode, dev, lbs, 100, WRITE, 0, b"\xee" * 100), "INVALID", chk("write of an unaligned length"))
            self.expect(c.io(mode, dev, 100, lbs, READ), "INVALID", chk("read at an unaligned offset"))
            self.expect(c.io(mode, dev, 8192 + 7, 4096, WRITE_ZEROES), "INVALID", chk("write-zeroes at an unaligned offset"))
        self.expect(c.io(mode, dev, size, lbs, READ), "OUT_OF_RANGE", chk("read at the device's end"))
        self.expect(c.io(mode, dev, size - lbs, 2 * lbs, WRITE, 0, b"\xee" * (2 * lbs)), "OUT_OF_RANGE", chk("write across the device's end"))
        self.expect(c.io(mode, dev, (1 << 64) - lbs, 2 * lbs, READ), "OUT_OF_RANGE", chk("read whose end overflows 64 bits"))
        self.expect(c.io(mode, dev, size - lbs, 2 * lbs, DISCARD), "OUT_OF_RANGE", chk("discard across the device's end"))
        if max_io + lbs <= size:
            self.expect(c.io(mode, dev, 0, max_io + lbs, READ), "TOO_LARGE", chk("read over max_io_size"))
        st, msg, data = c.io(mode, dev, 0, 0, READ)
        self.ok(st == ST["OK"] and data == b"", chk("read of 0 bytes"), "%s %r %r" % (status_name(st), msg, data))
        self.expect(c.io(mode, dev, size, 0, READ), "OK", chk("read of 0 bytes at the device's end"))
        self.expect(c.io(mode, dev, 8192, 4096, WRITE, 2, b"\xee" * 4096), "INVALID", chk("write with an unknown flag bit"))
        self.expect(c.io(mode, dev, 8192, 4096, 9), "INVALID", chk("unknown operation 9"))
        self.expect(c.io(mode, dev, 8192, 4096, WRITE, 0, b"\xee" * 512), "INVALID", chk("write with a short data segment"))
        self.expect(c.io(mode, dev, 8192, 4096, WRITE, 0, None), "INVALID", chk("write without a data segment"))
        self.expect(c.io(mode, dev, 0, 0, FLUSH, 0, b"\xee" * 512), "INVALID", chk("flush with a data segment"))
        self.expect(c.io(mode, dev, 8192, 4096, WRITE_ZEROES, 0, b"\xee" * 4096), "INVALID", chk("write-zeroes with a data segment"))
        if mode == "m":
            st, msg, data = c.io(mode, dev, 8192, 4096, READ, 0, b"")
            self.ok(st == ST["OK"] and data == content[8192], chk("read with an empty data segment is tolerated"),
                    "%s %r" % (status_name(st), msg))
        else:
            self.expect(c.io(mode, dev, 8192, 4096, READ, 0, None, (1, 0)), "INVALID", chk("request with reserved bytes 10-11 set"))
            self.expect(c.io(mode, dev, 8192, 4096, READ, 0, None, (0, 1)), "INVALID", chk("request with reserved bytes 28-31 set"))
        self.expect(c.io(mode, 0xBEEF, 0, lbs, READ), "UNKNOWN_DEVICE", chk("IO on a device id not open"))
        res, _ = c.run_batch(mode, [(dev, off, n, READ, 0, None) for off, n in ranges])
        self.ok(all(st == ST["OK"] and data == content[off] for (off, n), (st, _, data) in zip(ranges, res)),
                chk("the refused IO changed nothing"))

        # Many IOs in flight at once (out of order answers matched by id), mixed sizes.
        base, items, off = 16 * MiB, [], 16 * MiB
        for k in range(256):
            n = lbs * (1 + k % 16) if k % 5 else 4096 * (1 + k % 8)
            items.append((off, n, self.pattern(n)))
            off += n + lbs * (k % 3)
        span = off - base
        batch_mode = "mix" if mode == "d" else mode  # Io messages stay valid beside DIRECT (17.9)
        res, peak = c.run_batch(batch_mode, [(dev, o, n, WRITE, 0, d) for o, n, d in items], depth=256)
        self.ok(all(st == ST["OK"] for st, _, _ in res), chk("256 writes in flight"),
                ", ".join(status_name(st) for st, _, _ in res if st != ST["OK"])[:300])
        res, peak2 = c.run_batch(batch_mode, [(dev, o, n, READ, 0, None) for o, n, _ in items], depth=256)
        bad = [o for (o, n, d), (st, _, data) in zip(items, res) if st != ST["OK"] or data != d]
        self.ok(not bad, chk("256 reads in flight match"), "%d differ, first at %s" % (len(bad), bad[:3]))
        print("  %s%d writes then %d reads over %d bytes, up to %d and %d in flight%s" % (
            label, len(items), len(items), span, peak, peak2, " (DIRECT and Io alternating)" if batch_mode == "mix" else ""))
        for o, n, d in items[:3]:
            content[o] = d
        self.expect(c.io(mode, dev, 12345, 7, FLUSH), "OK", chk("flush (offset and length ignored)"))

        # Write-zeroes and discard, read back.
        zbase, dbase, chunk = 20 * MiB, 21 * MiB, 256 * 1024
        old_z, old_d = self.pattern(chunk), self.pattern(chunk)
        self.expect(c.io(mode, dev, zbase, chunk, WRITE, 0, old_z), "OK", chk("write before write-zeroes"))
        self.expect(c.io(mode, dev, dbase, chunk, WRITE, 0, old_d), "OK", chk("write before discard"))
        self.expect(c.io(mode, dev, zbase + 65536, 131072, WRITE_ZEROES, FUA), "OK", chk("write-zeroes with FUA"))
        self.expect(c.io(mode, dev, zbase + 196608 + lbs, lbs, WRITE_ZEROES), "OK", chk("write-zeroes of one block"))
        self.expect(c.io(mode, dev, dbase + 65536, 131072, DISCARD), "OK", chk("discard"))
        st, _, got = c.io(mode, dev, zbase, chunk, READ)
        want = bytearray(old_z)
        want[65536:196608] = bytes(131072)
        want[196608 + lbs:196608 + 2 * lbs] = bytes(lbs)
        self.ok(st == ST["OK"] and got == bytes(want), chk("write-zeroes reads back as zeroes, the rest unchanged"))
        st, _, got = c.io(mode, dev, dbase, chunk, READ)
        self.ok(st == ST["OK"] and got[:65536] == old_d[:65536] and got[196608:] == old_d[196608:],
                chk("discard leaves the bytes around it"))
        # 17.2: "the range may be deallocated and then reads as zeroes": not a promise of zeroes;
        # each block reads as zeroes or as its old data.
        blocks = [got[k:k + lbs] for k in range(65536, 196608, lbs)]
        olds = [old_d[k:k + lbs] for k in range(65536, 196608, lbs)]
        zero = bytes(lbs)
        self.ok(all(b == zero or b == o for b, o in zip(blocks, olds)), chk("discarded blocks read as zeroes or old data"))
        print("  %sdiscarded range: %d of %d blocks read as zeroes" % (label, sum(b == zero for b in blocks), len(blocks)))
        self.expect(c.io(mode, dev, 0, 0, FLUSH, FUA), "OK", chk("flush with FUA"))

        # Cross-check with the exported file itself (the server runs on this machine).
        if a.file:
            with open(a.file, "rb") as f:
                for off, data in list(content.items()) + [(zbase, bytes(want))]:
                    f.seek(off)
                    self.ok(f.read(len(data)) == data, chk("the exported file holds what was written at %d" % off))
                for o, n, d in items[::37]:
                    f.seek(o)
                    self.ok(f.read(n) == d, chk("the exported file holds the in-flight write at %d" % o))

        # Read-only open of the same device, and a read-only export.
        r = c.open(a.export, RO)
        self.ok(r.get("status", 0) == ST["OK"] and r.get("deviceId", 0) not in (0, dev), chk("second Open, read-only"), repr(r))
        rdev = r["deviceId"]
        self.ok(r.get("accessMode", 0) == RO, chk("read-only OpenReply access_mode"))
        print("  %sread-only open: discard_granularity %d, max_discard_size %d" % (
            label, r.get("geometry", {}).get("discardGranularity", 0), r.get("geometry", {}).get("maxDiscardSize", 0)))
        self.expect(c.io(mode, rdev, 0, lbs, WRITE, 0, b"\xee" * lbs), "READ_ONLY", chk("write on a read-only open"))
        self.expect(c.io(mode, rdev, 0, lbs, WRITE_ZEROES), "READ_ONLY", chk("write-zeroes on a read-only open"))
        self.expect(c.io(mode, rdev, 0, lbs, DISCARD), "READ_ONLY", chk("discard on a read-only open"))
        st, _, data = c.io(mode, rdev, 0, lbs, READ)
        self.ok(st == ST["OK"] and data == content[0], chk("read on the read-only open"))
        self.expect(c.io(mode, rdev, 0, 0, FLUSH), "OK", chk("flush on the read-only open"))
        if a.ro_export:
            r = c.open(a.ro_export, RW)
            self.ok(r.get("status", 0) == ST["READ_ONLY"], chk("read-write Open of a read-only export is READ_ONLY"), repr(r))
            r = c.open(a.ro_export, RO)
            self.ok(r.get("status", 0) == ST["OK"], chk("read-only Open of a read-only export"), repr(r))
            self.ok(c.close_device(r["deviceId"]).get("status", 0) == ST["OK"], chk("Close of the read-only export"))

        # 17.4: another session's writer is refused (BUSY, naming the holder); the same
        # session on another connection shares the read-write open.
        if mode == "m":
            o = self.connect()
            o.session_info(session + "-other")
            r = o.open(a.export, RW)
            self.ok(r.get("status", 0) == ST["BUSY"] and session in r.get("message", ""),
                    chk("a second session's read-write Open is BUSY naming the holder"), repr(r))
            r = o.open(a.export, RO)
            self.ok(r.get("status", 0) == ST["OK"], chk("a second session's read-only Open"), repr(r))
            o.close()
            s = self.connect()
            s.session_info(session)
            r = s.open(a.export, RW)
            self.ok(r.get("status", 0) == ST["OK"], chk("the same session on another connection shares the read-write open"), repr(r))
            st, _, data = s.io("m", r["deviceId"], 0, lbs, READ)
            self.ok(st == ST["OK"] and data == content[0], chk("it reads what the first connection wrote"))
            self.ok(s.close_device(r["deviceId"]).get("status", 0) == ST["OK"], chk("its Close"))
            s.close()

        # Close: once the IO in flight has completed; then the id is unknown.
        self.ok(c.close_device(rdev).get("status", 0) == ST["OK"], chk("Close of the read-only open"))
        last = [(o, n, self.pattern(n)) for o, n in ((24 * MiB + k * 65536, 65536) for k in range(32))]
        tokens = [c.submit(mode, dev, o, n, WRITE, 0, d) for o, n, d in last]
        close_id = c.request(P + "Close", {"deviceId": dev})
        res = c.collect(tokens)
        closed = pc.answer(c.wait([close_id])[close_id], P + "CloseReply")
        self.ok(all(st == ST["OK"] for st, _, _ in res), chk("32 writes sent before Close all complete"),
                ", ".join(status_name(st) for st, _, _ in res))
        self.ok(closed.get("status", 0) == ST["OK"], chk("Close with IO in flight"), repr(closed))
        self.ok(c.close_device(dev).get("status", 0) == ST["UNKNOWN_DEVICE"], chk("a second Close is UNKNOWN_DEVICE"))
        self.expect(c.io(mode, dev, 0, lbs, READ), "UNKNOWN_DEVICE", chk("IO on a closed device"))
        if a.file:
            with open(a.file, "rb") as f:
                for o, n, d in last:
                    f.seek(o)
                    self.ok(f.read(n) == d, chk("the writes before Close are in the file (at %d)" % o))
        if mode == "d":
            self.ok(not c.direct_pending, chk("every DIRECT request was answered"))
            print("  %sDIRECT answers to unknown ids discarded: %d" % (label, c.direct_discarded))

    # -----------------------------------------------------------------------------------
    # 17.8 multipath and the Fence exchange of 17.1, live.
    def path(self, session, instance, mode, direct_ok=True):
        """One path of a multipath device: a connection with SessionInfo(session, instance)."""
        p = self.connect()
        rep = p.session_info(session, instance=instance, direct=(mode == "d"))
        self.ok(rep.get("status", 0) == ST["OK"] and rep.get("connectionId", 0) != 0,
                "SessionInfo of a path (instance %#x)" % instance, repr(rep))
        if mode == "d":
            self.ok(p.direct_granted, "DIRECT granted on a path")
        p.cid = rep["connectionId"]
        self.seen_ids.add(p.cid)
        return p

    def open_rw(self, p):
        """Open read-write; a BUSY right after an earlier session's connection closed may be the
        server not having seen that close yet: retried, bounded (2 s)."""
        for _ in range(40):
            r = p.open(self.args.export, RW)
            if r.get("status", 0) != ST["BUSY"]:
                break
            time.sleep(0.05)
        self.ok(r.get("status", 0) == ST["OK"], "a path opens the device read-write", repr(r))
        p.dev, p.geometry = r["deviceId"], r.get("geometry", {})
        return p.dev

    def fence(self, p, ids):
        r = p.call("Fence", {"connectionIds": list(ids)}, "FenceReply")
        return r.get("status", 0), r.get("message", "")

    def raw_result(self, c, token):
        """(status name or 'ERROR <code>', data) of an answered IO, ERROR answers included
        (17.2: the one place a block IO gets ERROR is a dropped modification, 'cancelled')."""
        kind, i, op, length = token
        if kind == "m":
            rec = c.pending_done[i]
            if rec["kind"] == "ERROR":
                c.pending_done.pop(i)
                st = pc.pb_decode("parley.v1.Status", rec["answer"]["payload"])
                return "ERROR " + pc.code_name(st.get("code", 0)), None
        status, _, data = c._take(token)
        return status_name(status), data

    def read_region(self, p, mode, chunks):
        """Reads [(offset, length)] on p; every read must succeed."""
        res, _ = p.run_batch(mode, [(p.dev, o, n, READ, 0, None) for o, n in chunks], depth=64)
        for (o, n), (st, msg, _) in zip(chunks, res):
            self.ok(st == ST["OK"], "read of %d bytes at %d on a live path" % (n, o), "%s %r" % (status_name(st), msg))
        return [d for _, _, d in res]

    def fence_refusals(self, mode):
        """17.1 Fence: every refusal is INVALID (or NO_SESSION before SessionInfo), and fences nothing."""
        label = "[%s] " % ("DIRECT" if mode == "d" else "Io")
        chk = lambda name: label + name  # noqa: E731
        session = "pyfence-%s-%s-r" % (self.tag, mode)
        inst = self.rng.getrandbits(64) or 1
        other_inst = (inst ^ 0x5A5A) or 2
        p1, p2 = self.path(session, inst, mode), self.path(session, inst, mode)
        self.ok(p1.cid != p2.cid, chk("two paths get different connection ids"))
        # 17.1: a repeated SessionInfo with the same name and instance gets the same answer
        # (connection_id included); with another instance (0 included) it is INVALID.
        rep = p1.session_info(session, instance=inst, direct=(mode == "d"))
        self.ok(rep.get("status", 0) == ST["OK"] and rep.get("connectionId") == p1.cid,
                chk("a repeated SessionInfo keeps the connection_id"), repr(rep))
        for other, what in [(other_inst, "another client_instance"), (0, "no client_instance")]:
            rep = p1.session_info(session, instance=other, direct=(mode == "d"))
            self.ok(rep.get("status", 0) == ST["INVALID"], chk("a repeated SessionInfo with %s is INVALID" % what), repr(rep))
        self.open_rw(p1)
        self.open_rw(p2)  # 17.4: the same session_name shares the read-write open
        lbs = p1.geometry.get("logicalBlockSize", 512)
        # Before SessionInfo: NO_SESSION.
        n = self.connect()
        st, msg = self.fence(n, [p1.cid])
        self.ok(st == ST["NO_SESSION"], chk("Fence before SessionInfo is NO_SESSION"), "%s %r" % (status_name(st), msg))
        # client_instance 0 (absent): INVALID, even naming a connection of the same session.
        z = self.path(session, 0, mode)
        st, msg = self.fence(z, [p1.cid])
        self.ok(st == ST["INVALID"], chk("Fence from a connection without client_instance is INVALID"), "%s %r" % (status_name(st), msg))
        st, msg = self.fence(p2, [z.cid])
        self.ok(st == ST["INVALID"], chk("Fence naming a connection without client_instance is INVALID"), "%s %r" % (status_name(st), msg))
        # Another instance of the same session, another session of the same instance.
        q = self.path(session, other_inst, mode)
        st, msg = self.fence(p2, [q.cid])
        self.ok(st == ST["INVALID"], chk("Fence of a connection of another client_instance is INVALID"), "%s %r" % (status_name(st), msg))
        r = self.path(session + "-o", inst, mode)
        st, msg = self.fence(p2, [r.cid])
        self.ok(st == ST["INVALID"], chk("Fence of a connection of another session_name is INVALID"), "%s %r" % (status_name(st), msg))
        st, msg = self.fence(p2, [p2.cid])
        self.ok(st == ST["INVALID"], chk("Fence of its own connection id is INVALID"), "%s %r" % (status_name(st), msg))
        never = max(self.seen_ids) + (1 << 24)
        for bad, what in [(never, "an id far above every id given out"), (0, "id 0 (never given out)")]:
            st, msg = self.fence(p2, [bad])
            self.ok(st == ST["INVALID"], chk("Fence of %s is INVALID" % what), "%s %r" % (status_name(st), msg))
        # A list with one valid and one invalid id: INVALID and nothing fenced.
        st, msg = self.fence(p2, [p1.cid, q.cid])
        self.ok(st == ST["INVALID"], chk("Fence of [a valid id, an invalid one] is INVALID"), "%s %r" % (status_name(st), msg))
        st, msg = self.fence(p2, [p1.cid, never])
        self.ok(st == ST["INVALID"], chk("Fence of [a valid id, one never given out] is INVALID"), "%s %r" % (status_name(st), msg))
        data = self.pattern(lbs)
        self.expect(p1.io(mode, p1.dev, 40 << 20, lbs, WRITE, 0, data), "OK", chk("a refused Fence fenced nothing (write on the named path)"))
        for c in (q, r, z):
            self.expect(c.io(mode, 0xBEEF, 0, lbs, READ), "UNKNOWN_DEVICE", chk("the other connections are not fenced either"))
        # Observations where the document says nothing (reported, not checked).
        st, msg = self.fence(p2, [])
        print("  %s(observed: Fence with an empty list: %s %r)" % (label, status_name(st), msg))
        # A connection that has ended counts as fenced already (17.1), once its IO is done.
        e = self.path(session, inst, mode)
        ecid = e.cid
        e.close()
        st, msg = self.fence(p2, [ecid])
        self.ok(st == ST["OK"], chk("Fence of an ended connection (no IO left) is OK: fenced already"), "%s %r" % (status_name(st), msg))
        eq = self.path(session, other_inst, mode)
        eqcid = eq.cid
        eq.close()
        time.sleep(0.2)
        st, msg = self.fence(p2, [eqcid])
        print("  %s(observed: Fence of an ended connection of another client_instance: %s %r)" % (label, status_name(st), msg))
        es = self.path(session + "-e", inst, mode)
        escid = es.cid
        es.close()
        time.sleep(0.2)
        st, msg = self.fence(p2, [escid])
        print("  %s(observed: Fence of an ended connection of another session_name: %s %r)" % (label, status_name(st), msg))
        for c in (p1, p2, n, z, q, r):
            c.close()

    def fence_in_flight(self, mode):
        """17.1/R-17.8-7: Fence of a live path with IO in flight. From the Fence's arrival new IO
        of the fenced path is FENCED; modifications not yet started are dropped (ERROR cancelled
        for Io, FENCED for DIRECT: 17.2, R-17.9-3); the answer comes once IO already running has
        finished: so right after FenceReply the device holds every write of the fenced path
        that will ever be carried out, and nothing changes later. Up to 3 rounds, until one
        shows a write dropped (whether one is, is timing: not required)."""
        label = "[%s] " % ("DIRECT" if mode == "d" else "Io")
        for rnd in range(3):
            dropped = self.fence_round(mode, label, rnd, last=(rnd == 2))
            if dropped:
                break
        print("  %s%s" % (label, "round %d: some writes of path 1 were refused or dropped (not answered OK)" % (rnd + 1) if dropped
                          else "every write of path 1 in flight at the Fence was carried out, in 3 rounds"))

    @staticmethod
    def which(got, new, old):
        if got == new:
            return "the new data"
        if got == old:
            return "the old data"
        blocks = [("new" if got[i:i + 4096] == new[i:i + 4096] else "old" if got[i:i + 4096] == old[i:i + 4096] else "other")
                  for i in range(0, len(got), 4096)]
        return "a mix of 4 KiB blocks: " + " ".join(blocks)

    def fence_round(self, mode, label, rnd, last):
        chk = lambda name: label + name  # noqa: E731
        session = "pyfence-%s-%s-f%d" % (self.tag, mode, rnd)
        inst = self.rng.getrandbits(64) or 1
        p1, p2 = self.path(session, inst, mode), self.path(session, inst, mode)
        self.open_rw(p1)
        self.open_rw(p2)
        base, size, count = 32 << 20, 16 << 10, 256
        chunks = [(base + k * size, size) for k in range(count)]
        old = [self.pattern(size) for _ in chunks]
        res, _ = p2.run_batch(mode, [(p2.dev, o, n, WRITE, 0, d) for (o, n), d in zip(chunks, old)], depth=64)
        self.ok(all(st == ST["OK"] for st, _, _ in res), chk("the region's old content is written on path 2"))
        # Path 1: writes with FUA (durable: on the IO threads) and some reads, all in flight.
        new = [self.pattern(size) for _ in chunks]
        tokens = []
        for k, ((o, n), d) in enumerate(zip(chunks, new)):
            tokens.append(p1.submit(mode, p1.dev, o, n, WRITE, FUA, d))
            if k % 8 == 7:
                tokens.append(p1.submit(mode, p1.dev, base + (k - 7) * size, 4096, READ))
        fence_id = p2.request(P + "Fence", {"connectionIds": [p1.cid]})
        # Sent after the Fence, on another socket: no order between the two connections, so it
        # may arrive before the Fence (OK) or after it (FENCED). Outside the chunks.
        late = p1.submit(mode, p1.dev, base + count * size, 4096, WRITE, 0, b"\x77" * 4096)
        rec = p2.wait([fence_id])[fence_id]
        fr = pc.answer(rec, P + "FenceReply")
        self.ok(fr.get("status", 0) == ST["OK"], chk("Fence of a live path with IO in flight is OK"), repr(fr))
        snap = self.read_region(p2, mode, chunks)  # what the device holds right after FenceReply
        deadline = time.monotonic() + self.args.timeout  # then every answer of path 1, bounded
        while not all(p1._done(t) for t in tokens + [late]):
            if time.monotonic() > deadline:
                raise CheckFailed(chk("path 1's IO was not all answered"))
            p1.read_one()
        seen, wi, dropped = {}, 0, 0
        for t in tokens:
            what, data = self.raw_result(p1, t)
            seen[(OPS[t[2]], what)] = seen.get((OPS[t[2]], what), 0) + 1
            if t[2] == WRITE:
                k, wi = wi, wi + 1
                allowed = ("OK", "FENCED", "ERROR cancelled") if mode == "m" else ("OK", "FENCED")
                self.ok(what in allowed, chk("a write in flight at the Fence is OK or dropped (%s)" % "/".join(allowed)), what)
                dropped += what != "OK"
                want = new[k] if what == "OK" else old[k]
                self.ok(snap[k] == want, chk("right after FenceReply, chunk %d holds %s" % (
                    k, "the fenced path's write (answered OK)" if what == "OK" else "the old data (the write was refused)")),
                    ("a write answered OK finished after the FenceReply" if what == "OK" else "a refused write was carried out")
                    + " (the chunk read after FenceReply holds %s)" % self.which(snap[k], new[k], old[k]))
            else:
                # 17.1 says "their IO waiting for storage is dropped"; 17.2/R-17.8-7 speak of
                # modifications only: a read is accepted OK, FENCED or ERROR cancelled.
                self.ok(what in ("OK", "FENCED", "ERROR cancelled"), chk("a read in flight at the Fence"), what)
        late_what, _ = self.raw_result(p1, late)
        self.ok(late_what in ("OK", "FENCED", "ERROR cancelled"), chk("a write sent just after the Fence"), late_what)
        seen[("write sent after the Fence", late_what)] = 1
        print("  %sround %d, IO of path 1 in flight at the Fence: %s" % (label, rnd + 1, ", ".join(
            "%s %s x%d" % (op, w, n) for (op, w), n in sorted(seen.items()))))
        time.sleep(0.3)
        later = self.read_region(p2, mode, chunks)
        self.ok(later == snap, chk("nothing of the fenced path lands after FenceReply"))
        if self.args.file:
            with open(self.args.file, "rb") as f:
                f.seek(base)
                self.ok(f.read(count * size) == b"".join(snap), chk("the exported file matches what was read after the Fence"))
        if dropped or last:
            # New IO on the fenced path: FENCED, every operation; an Open there: NO_SESSION (17.2).
            for op, n, d in [(READ, 4096, None), (WRITE, 4096, b"\x66" * 4096), (FLUSH, 0, None),
                             (WRITE_ZEROES, 4096, None), (DISCARD, 4096, None)]:
                self.expect(p1.io(mode, p1.dev, base, n, op, 0, d), "FENCED", chk("new %s on the fenced path is FENCED" % OPS[op]))
            if mode == "d":  # and the other way of sending IO on the same connection
                self.expect(p1.io("m", p1.dev, base, 4096, READ), "FENCED", chk("an Io message on the fenced DIRECT path is FENCED"))
            r = p1.open(self.args.export, RO)
            self.ok(r.get("status", 0) == ST["NO_SESSION"], chk("an Open on the fenced path is NO_SESSION (17.2, the reference)"), repr(r))
            st, msg = self.fence(p2, [p1.cid])
            self.ok(st == ST["OK"], chk("fencing an already fenced path again is OK"), "%s %r" % (status_name(st), msg))
            self.expect(p2.io(mode, p2.dev, base, size, WRITE, 0, old[0]), "OK", chk("the fencing path still writes"))
            # A Close on the fenced path is answered as anywhere (17.1).
            cr = p1.close_device(p1.dev)
            self.ok(cr.get("status", 0) == ST["OK"], chk("a Close on the fenced path is OK (17.1)"), repr(cr))
            # 17.2's order of the checks (the reference's): operation and flags (INVALID) before
            # the fence (FENCED), the fence before the device id (UNKNOWN_DEVICE).
            self.expect(p1.io(mode, p1.dev, base, 4096, 9), "INVALID", chk("an unknown operation on the fenced path is INVALID (17.2 order)"))
            self.expect(p1.io(mode, p1.dev, base, 4096, READ, 2), "INVALID", chk("an unknown flag on the fenced path is INVALID (17.2 order)"))
            self.expect(p1.io(mode, 0xBEEF, base, 4096, READ), "FENCED", chk("an unknown device on the fenced path is FENCED (17.2 order)"))
            self.expect(p1.io(mode, p1.dev, base + 7, 4096, READ), "FENCED", chk("an unaligned read on the fenced path is FENCED (17.2 order)"))
            # A fenced connection fences nothing (17.1): its Fence of its fencer is FENCED,
            # and the fencer goes on.
            st, msg = self.fence(p1, [p2.cid])
            self.ok(st == ST["FENCED"], chk("a Fence sent by the fenced path is FENCED (17.1)"), "%s %r" % (status_name(st), msg))
            st2, _, _ = p2.io(mode, p2.dev, base, 4096, READ)
            self.ok(st2 == ST["OK"], chk("the fencer still reads after the fenced path's Fence"), status_name(st2))
        p1.close()
        p2.close()
        return dropped

    def failover(self, mode, keep_dead_up):
        """17.8 rules 1, 2 and 4 as a client applies them: write A on path 1; write B on path 1
        and take path 1 for dead before its answer (its connection closed, or, keep_dead_up,
        left open as after a partition); Fence it from path 2 and send no modification until
        the FenceReply; send B again on path 2 (same data and flags); only then a later
        overlapping write C (rule 1). The device must hold B, then C, and nothing stale after."""
        label = "[%s%s] " % ("DIRECT" if mode == "d" else "Io", ", dead path left open" if keep_dead_up else "")
        chk = lambda name: label + name  # noqa: E731
        session = "pyfence-%s-%s-%s" % (self.tag, mode, "p" if keep_dead_up else "c")
        inst = self.rng.getrandbits(64) or 1
        p1, p2 = self.path(session, inst, mode), self.path(session, inst, mode)
        self.open_rw(p1)
        self.open_rw(p2)
        for g in ("sizeBytes", "logicalBlockSize", "maxIoSize"):  # R-17.8-5
            self.ok(p1.geometry.get(g) == p2.geometry.get(g), chk("both paths see the same %s" % g))
        MiB = 1 << 20
        base = (50 << 20) if not keep_dead_up else (54 << 20)
        base += (0 if mode == "m" else 2 * MiB)
        L, nB = 65536, 24
        # Write A (one range) and wait for its answer.
        A = self.pattern(L)
        self.expect(p1.io(mode, p1.dev, base, L, WRITE, 0, A), "OK", chk("write A on path 1"))
        # Writes B: the one of the brief over A's range, and more over a wider range, sent on
        # path 1 with no answer read (in doubt once the path is taken for dead).
        Bs = [(base, L, FUA, self.pattern(L))] + [(base + L * (k + 1), L, k % 2, self.pattern(L)) for k in range(nB)]
        for o, n, fl, d in Bs:
            p1.submit(mode, p1.dev, o, n, WRITE, fl, d)
        if not keep_dead_up:
            try:
                p1.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            p1.sock.close()  # the path is dead: no CLOSE, answers never read (rule 2: in doubt)
        # Rule 4: Fence on a live path, no modification before its answer.
        st, msg = self.fence(p2, [p1.cid])
        self.ok(st == ST["OK"], chk("Fence of the dead path, sent on the surviving one, is OK"), "%s %r" % (status_name(st), msg))
        # Rule 2: every IO in doubt again, same data and flags, in its original order.
        res, _ = p2.run_batch(mode, [(p2.dev, o, n, WRITE, fl, d) for o, n, fl, d in Bs], depth=1)
        self.ok(all(st == ST["OK"] for st, _, _ in res), chk("the writes in doubt sent again on path 2"))
        got = self.read_region(p2, mode, [(base, L)])[0]
        self.ok(got == Bs[0][3], chk("the device holds B (not A) after the failover"))
        # Rule 1: a later overlapping write only after B's answer; it must not be overwritten.
        Cs = [(o + n // 2 - 4096, 8192, self.pattern(8192)) for o, n, _, _ in Bs]
        res, _ = p2.run_batch(mode, [(p2.dev, o, n, WRITE, 0, d) for o, n, d in Cs], depth=64)
        self.ok(all(st == ST["OK"] for st, _, _ in res), chk("later overlapping writes C on path 2"))
        if keep_dead_up:
            # A stale copy of B reaching the old, fenced connection late (R-17.8-7).
            for o, n, fl, d in Bs[:4]:
                self.expect(p1.io(mode, p1.dev, o, n, WRITE, fl, d), "FENCED", chk("a stale copy of B on the fenced path is FENCED"))
        time.sleep(0.3)
        want = []
        for (o, n, fl, d), (co, cn, cd) in zip(Bs, Cs):
            w = bytearray(d)
            w[co - o:co - o + cn] = cd
            want.append(bytes(w))
        got = self.read_region(p2, mode, [(o, n) for o, n, _, _ in Bs])
        bad = [k for k, (g, w) in enumerate(zip(got, want)) if g != w]
        self.ok(not bad, chk("each range holds B under C: no stale A or B landed over a later write"), "ranges %s differ" % bad[:5])
        self.expect(p2.io(mode, p2.dev, 0, 0, FLUSH), "OK", chk("flush on the surviving path"))
        if self.args.file:
            with open(self.args.file, "rb") as f:
                for (o, n, _, _), w in zip(Bs, want):
                    f.seek(o)
                    self.ok(f.read(n) == w, chk("the exported file holds B under C at %d" % o))
        if keep_dead_up:
            p1.close()
        p2.close()

    def multipath_pass(self, mode):
        self.fence_refusals(mode)
        self.fence_in_flight(mode)
        self.failover(mode, keep_dead_up=False)
        self.failover(mode, keep_dead_up=True)


# ---------------------------------------------------------------------------------------
# Self-test: every vector of 17.7 and 17.9.
def self_test(path):
    text = open(path, encoding="utf-8").read()
    vectors = [v for v in pc.parse_vectors(text) if v["name"].startswith(("block-", "direct-block-"))]
    failures = 0
    for v in vectors:
        problems = []
        tag = int(v["tag"].split()[0], 0)
        aligns = tuple(int(x) for x in v.get("alignments", "0 0 0 0").split())
        segs = [pc.segment_bytes(s) for s in v["segment"]]
        # 1. Our block encoder builds the vector's segments from their meaning.
        try:
            mine = build_from_meaning(v, tag, segs)
            if mine != v["wire"]:
                problems.append("block encoder differs:\n    got  %s\n    want %s" % (mine.hex(" "), v["wire"].hex(" ")))
        except Exception as e:  # noqa: BLE001  (reported as a failure)
            problems.append("block encoder: %r" % e)
        # 2. The frame decodes (all at once and byte by byte) to the same thing.
        for chunk in (65536, 1):
            try:
                t, f, got, al = pc.Reader(pc._source(v["wire"], chunk)).frame()
            except ParleyError as e:
                problems.append("frame decoding fails: %s" % e)
                break
            if (t, f, tuple(al)) != (tag, int(v["flags"], 0), aligns) or len(got) != len(segs):
                problems.append("decoded tag/flags/alignments/segments differ")
                break
            if not all(pc.check_segment(s, g) for s, g in zip(v["segment"], got)):
                problems.append("decoded segments differ")
            try:
                problems += check_meaning(v, t, f, got)
            except (ParleyError, CheckFailed) as e:
                problems.append("decoding the block content: %s" % e)
        failures += bool(problems)
        print("%-4s %-34s %s" % ("FAIL" if problems else "ok", v["name"], "; ".join(problems)))
    # 3. What a client must refuse in a DIRECT answer (R-17.9-2), and what it accepts.
    neg = [("answer of 15 bytes", [bytes(15)], (READ, 0)),
           ("answer with reserved bytes set", [struct.pack("<QII", 1, 0, 1)], (FLUSH, 0)),
           ("OK read answer without data", [encode_direct_answer(1, 0)], (READ, 512)),
           ("OK read answer with 511 bytes", [encode_direct_answer(1, 0), bytes(511)], (READ, 512)),
           ("OK write answer with data", [encode_direct_answer(1, 0), bytes(512)], (WRITE, 512)),
           ("OK 0-byte read answer without segment 1", [encode_direct_answer(1, 0)], (READ, 0))]
    for what, s, req in neg:
        try:
            decode_direct_answer(s, req)
            ok = False
        except ParleyError as e:
            ok = e.code == "malformedPayload"
        failures += not ok
        print("%-4s %-34s %s" % ("ok" if ok else "FAIL", "direct-refuse", what))
    for what, s, req, want in [("OK 0-byte read with an empty segment 1", [encode_direct_answer(2, 0), b""], (READ, 0), (2, 0, b"")),
                               ("TOO_LARGE read answer", [encode_direct_answer(3, ST["TOO_LARGE"])], (READ, 1 << 30), (3, 3, None))]:
        try:
            got = decode_direct_answer(s, req)
        except ParleyError as e:
            got = e
        failures += got != want
        print("%-4s %-34s %s" % ("ok" if got == want else "FAIL", "direct-accept", what))
    n = len(vectors)
    print("%d block vectors (%d of 17.7, %d of 17.9), %d failed" % (
        n, sum(v["name"].startswith("block-") for v in vectors), sum(v["name"].startswith("direct-") for v in vectors), failures))
    return 1 if failures or n < 19 else 0


def _hdr(spec):
    import re
    m = re.fullmatch(r"header seq=(\d+) ack=(\d+) id=(\d+) kind=(\w+) flags=(\d+) type=(.*)", spec)
    return int(m[1]), int(m[2]), int(m[3]), m[4], m[6]


def build_from_meaning(v, tag, segs):
    """Re-encodes a vector with this file's block encoder, from the decoded values, not from
    the vector's bytes: MESSAGE vectors as Io/Open/... messages, DIRECT ones from fields."""
    if tag == TAG_DIRECT:
        s0 = segs[0]
        if len(s0) == 32:
            q = decode_direct_request(s0)
            seg0 = encode_direct_request(q["id"], q["op"], q["flags"], q["device"], q["offset"], q["length"])
        else:
            i, status, _ = struct.unpack("<QII", s0)
            seg0 = encode_direct_answer(i, status)
        rest = segs[1:]
        return pc.encode_frame(TAG_DIRECT, [seg0] + rest, (0, 4096 if rest else 0, 0, 0))
    seq, ack, id_, kind, type_name = _hdr(v["segment"][0])
    msg = pc.pb_decode(type_name, segs[1])  # the decoded values ...
    payload = pc.pb_encode(type_name, msg)  # ... encoded again by pb_encode
    data = segs[2] if len(segs) > 2 else None
    out = [pc.encode_header(seq, ack, id_, pc.KIND[kind], type_name), payload] + ([data] if data is not None else [])
    return pc.encode_frame(tag, out, (0, 0, 4096 if data is not None else 0, 0))


def check_meaning(v, tag, flags, segs):
    """Checks what a block client reads from the vector: the session layer accepts it and the
    block values are those the vector's description states."""
    problems = []
    if tag == TAG_DIRECT:
        ev, value = pc.check_session_frame({"features": 0x1F, "recv_seq": 0, "direct": True}, tag, flags, segs)
        if ev != "direct":
            return ["session layer: %s" % ev]
        if len(segs[0]) == 32:  # a request (client to server)
            q = decode_direct_request(segs[0])
            want = {"direct-block-read": (5, READ, 0, 1, 4096, 512, None),
                    "direct-block-write-fua": (6, WRITE, FUA, 1, 8192, 512, bytes([0xAB]) * 512)}[v["name"]]
            got = (q["id"], q["op"], q["flags"], q["device"], q["offset"], q["length"], segs[1] if len(segs) > 1 else None)
            if got != want or q["reserved10"] or q["reserved28"]:
                problems.append("DIRECT request fields %r" % (q,))
        else:
            req = {"direct-block-read-answer": (READ, 512), "direct-block-write-answer": (WRITE, 512),
                   "direct-block-out-of-range-answer": (READ, 512)}[v["name"]]
            i, status, data = decode_direct_answer(segs, req)
            want = {"direct-block-read-answer": (5, 0, bytes((7 * k + 3) % 256 for k in range(512))),
                    "direct-block-write-answer": (6, 0, None),
                    "direct-block-out-of-range-answer": (7, ST["OUT_OF_RANGE"], None)}[v["name"]]
            if (i, status, data) != want:
                problems.append("DIRECT answer (%d, %s, %s)" % (i, status_name(status), None if data is None else len(data)))
        return problems
    state = {"features": 0x1F, "recv_seq": _hdr(v["segment"][0])[0] - 1}
    ev, h = pc.check_session_frame(state, tag, flags, segs)
    if ev != "message":
        return ["session layer: %s" % ev]
    msg = pc.pb_decode(h["type"], h["payload"])
    data = bytes((7 * k + 1) % 256 for k in range(512))
    expect = {
        "block-session-info": {"protocolVersion": 1, "sessionName": "alice"},
        "block-session-info-reply": {"protocolVersion": 1},
        "block-open": {"path": "disk", "accessMode": RW},
        "block-io-write": {"deviceId": 1, "offset": 4096, "length": 512, "operation": WRITE, "flags": FUA},
        "block-io-read": {"deviceId": 1, "offset": 4096, "length": 512},
        "block-io-out-of-range": {"deviceId": 1, "offset": 64 << 20, "length": 512},
        "block-close": {"deviceId": 1},
        "block-fence": {"connectionIds": [3]},
    }
    if v["name"] in expect and msg != expect[v["name"]]:
        problems.append("payload %r" % msg)
    if v["name"] == "block-open-reply":
        g = msg.get("geometry", {})
        if (msg.get("status", 0), msg.get("deviceId"), msg.get("accessMode"), g.get("sizeBytes"), g.get("sizeSectors"),
                g.get("logicalBlockSize"), g.get("maxIoSize")) != (0, 1, RW, 64 << 20, 131072, 512, 8 << 20):
            problems.append("OpenReply %r" % msg)
    if v["name"] == "block-io-out-of-range-reply" and msg.get("status") != ST["OUT_OF_RANGE"]:
        problems.append("IoReply %r" % msg)
    if v["name"] in ("block-io-write", "block-io-read-reply") and h["data"] != data:
        problems.append("data segment differs from (7i + 1) mod 256")
    if v["name"] in ("block-io-read", "block-io-write-reply", "block-close-reply", "block-fence-reply") and h["data"] is not None:
        problems.append("unexpected data segment")
    return problems


def main():
    ap = argparse.ArgumentParser(description="Independent Parley Block client (docs/protocol.md section 17)")
    ap.add_argument("address", nargs="?", help="HOST:PORT, [V6]:PORT or unix:PATH")
    ap.add_argument("--self-test", nargs="?", const=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                 "..", "..", "..", "docs", "protocol.md"),
                    metavar="PROTOCOL_MD", help="check the codec against the vectors of 17.7 and 17.9")
    ap.add_argument("--export", default="disk", help="a read-write export of at least 32 MiB (default disk)")
    ap.add_argument("--ro-export", help="a read-only export, to check READ_ONLY on a read-write Open")
    ap.add_argument("--file", help="the exported file, to check the writes in it directly")
    ap.add_argument("--expect-direct", choices=("yes", "no", "any"), default="any",
                    help="whether the server must grant DIRECT IO (default: either)")
    ap.add_argument("--no-multipath", dest="multipath", action="store_false",
                    help="skip the live checks of 17.8 and Fence (several paths of one client_instance, Fence "
                         "and its refusals, IO in flight at a Fence, a failover; they need 64 MiB)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for any answer")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test(args.self_test)
    if not args.address:
        ap.error("an address (or --self-test) is required")
    try:
        return Run(args).main()
    except ParleyError as e:
        print("FAILED: Parley error %s" % e)
    except CheckFailed as e:
        print("FAILED: check failed: %s" % e)
    except OSError as e:
        print("FAILED: socket error: %s" % e)
    return 1


if __name__ == "__main__":
    sys.exit(main())
