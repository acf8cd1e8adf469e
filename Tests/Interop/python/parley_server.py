#!/usr/bin/env python3
"""Independent Parley version 1 server, written as an interoperability check.

Written from docs/protocol.md ONLY (sections 1-4, 6-12 and 16; the schemas are the ones
reproduced verbatim in section 12); no code of the reference implementation was read. Python
3.11, standard library only. The codec (CRC-32C, protobuf, banner, frame and MESSAGE header
encoding) is the one of parley_client.py, in the same directory.

    python3 parley_server.py ADDRESS [ADDRESS...]      # HOST:PORT, [V6]:PORT or unix:PATH

It prints `listening on ADDRESS` (the real port when 0 was asked) once per address, flushed,
and serves until SIGTERM or SIGINT, then drains (section 7.14) and exits 0. What it speaks:

- banner and negotiation (section 3): supported = streams, keepalive, notice, dataSegment,
  direct (0x1f); not secure mode (bit 8) nor lossless sessions (bit 9); nothing required;
- every receiver rule of section 4 (CRCs, shape, frame-size limit before the body is read,
  unknown ignorable tags skipped, unknown critical tags refused, phase and direction checked
  before the payload is decoded, flags);
- the server handshake of section 6.3 with method `none` in crc mode only (any other method
  is answered AUTH_BAD_METHOD, the third refusal is CLOSE authenticationFailed), SERVER_IDENT
  with a nucleus (--message, --high-message, --request-delay, --redirect, --min-client-version);
- the session of section 7: seq/ack, requests answered concurrently in any order, streams,
  CANCEL, one-way messages, ERRORs with the codes of section 10, the data segment, NOTICE
  (--notice), KEEPALIVE/KEEPALIVE_ACK (and its own KEEPALIVE after 15 s of silence, CLOSE
  timeout after 60 s), CLOSE, draining, bounded handlers (reading stops when 1024 run);
- the echo service of section 12 (parley.echo.v1): Ping, Echo (data segment echoed), Count
  (a stream), Sleep, Work; a one-way Ping is answered by a one-way Pong, a one-way Echo is
  dropped; EnableDirect grants DIRECT frames (section 7.16: ids, echoes after the grant's
  delay, reading stops at 1024 unanswered, a drain waits for them).

Every receiver error closes the connection: CLOSE with the code of the document (none for a
version 0 banner or missing features, section 3), then a half-close, reading and discarding
until the peer closes or 2 s have passed (section 7.13).
"""
import argparse
import asyncio
import os
import platform
import random
import re
import signal
import socket
import stat
import struct
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parley_client as pc  # noqa: E402  (the codec: same directory)
from parley_client import (CODE, KIND, KINDS, MAGIC, TAG, TAGS, ParleyError, decode_header,  # noqa: E402
                           encode_banner, encode_header, pb_decode, pb_encode)

# The AuthRequest and AuthDone of section 12 have fields the client's schema leaves out
# (secure mode's); a server reads and checks all of them (a string must be UTF-8, section 2).
# Adding them to the imported schema only widens what this process decodes.
pc.SCHEMA["parley.v1.AuthRequest"] = pc.SCHEMA["parley.v1.AuthRequest"][:3] + [
    (4, "offeredModes", "string", True), (5, "offeredCiphers", "string", True)]
pc.SCHEMA["parley.v1.AuthDone"] = pc.SCHEMA["parley.v1.AuthDone"][:4] + [
    (5, "cipher", "string", False), (6, "entity", "string", False)]

# Section 12's DIRECT grant of the echo service.
pc.SCHEMA["parley.echo.v1.EnableDirect"] = [(1, "delayMs", "uint32", False)]  # at most 10000
pc.SCHEMA["parley.echo.v1.DirectGranted"] = [(1, "delayMs", "uint32", False)]

F_STREAMS, F_KEEPALIVE, F_NOTICE, F_DATA = pc.F_STREAMS, pc.F_KEEPALIVE, pc.F_NOTICE, pc.F_DATA
F_DIRECT = 0x10                       # section 3: bit 4, DIRECT frames (section 7.16)
SUPPORTED, REQUIRED = F_STREAMS | F_KEEPALIVE | F_NOTICE | F_DATA | F_DIRECT, 0
MAX_FRAME = pc.DEFAULT_MAX_FRAME      # our limit, announced in HELLO (section 4.5)
MIN_FRAME = pc.MIN_MAX_FRAME
MAX_AUTH_ATTEMPTS = 3                 # section 6.1 (the number is the server's choice)
HANDLER_LIMIT = 1024                  # section 7.15
DIRECT_LIMIT = 1024                   # section 7.16 (R-7.16-8): unanswered DIRECT requests read
KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT = 15.0, 60.0   # section 7.12 (the sender's choice)
WRITE_HIGH = 4 * 1024 * 1024         # section 7.15: unsent bytes above which reading waits
LINGER = 2.0                          # section 7.13: how long to read after sending CLOSE
U64 = (1 << 64) - 1

HANDSHAKE_TAGS = {TAG[n] for n in ("HELLO", "AUTH_REQUEST", "AUTH_BAD_METHOD", "AUTH_REPLY_MORE",
                                    "AUTH_REQUEST_MORE", "AUTH_DONE", "CLIENT_IDENT", "SERVER_IDENT",
                                    "SESSION_RECONNECT", "SESSION_RESUMED", "SESSION_RESET")}

# ---------------------------------------------------------------------------------------
# CRC-32C, sliced by 8 (the same function as pc.crc32c, about 1.5 times faster), and a cache
# for large segments sent back unchanged (the echo service returns what it received).
_T = [pc._CRC_TABLE]
for _k in range(1, 8):
    _T.append([(_T[-1][n] >> 8) ^ _T[0][_T[-1][n] & 0xFF] for n in range(256)])
_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _T


def crc32c(data):
    c = 0xFFFFFFFF
    n8 = len(data) - (len(data) & 7)
    if n8:
        words = (memoryview(data)[:n8].cast("Q") if sys.byteorder == "little"
                 else struct.unpack("<%dQ" % (n8 // 8), bytes(data[:n8])))
        for w in words:
            x = c ^ (w & 0xFFFFFFFF)
            h = w >> 32
            c = (_T7[x & 0xFF] ^ _T6[(x >> 8) & 0xFF] ^ _T5[(x >> 16) & 0xFF] ^ _T4[x >> 24]
                 ^ _T3[h & 0xFF] ^ _T2[(h >> 8) & 0xFF] ^ _T1[(h >> 16) & 0xFF] ^ _T0[h >> 24])
    for b in data[n8:]:
        c = _T0[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_CRC_CACHE, _CRC_CACHE_BYTES, CACHE_MIN, CACHE_MAX = {}, [0], 16 * 1024, 64 * 1024 * 1024


def remember_crc(data, crc):
    if len(data) >= CACHE_MIN:
        while _CRC_CACHE and _CRC_CACHE_BYTES[0] + len(data) > CACHE_MAX:
            old = next(iter(_CRC_CACHE))
            _CRC_CACHE_BYTES[0] -= len(old)
            del _CRC_CACHE[old]
        if data not in _CRC_CACHE:
            _CRC_CACHE[data] = crc
            _CRC_CACHE_BYTES[0] += len(data)


def segment_crc(data):
    if len(data) >= CACHE_MIN:
        crc = _CRC_CACHE.get(data)
        if crc is not None:
            return crc
    return crc32c(data)


def encode_frame(tag, segments, alignments=(0, 0, 0, 0)):
    """Section 4: preamble, segments, epilogue; flags 0 (section 4.9), byte 3 and unused
    descriptors 0 (section 4.1)."""
    pre = struct.pack("<BBBB", tag, 0, len(segments), 0)
    for i in range(4):
        pre += struct.pack("<IH", len(segments[i]), alignments[i]) if i < len(segments) else bytes(6)
    pre += struct.pack("<I", crc32c(pre))
    return b"".join([pre] + list(segments) + [struct.pack("<I", segment_crc(s)) for s in segments])


def status(code, message):
    return pb_encode("parley.v1.Status", {"code": CODE[code] if isinstance(code, str) else code, "message": message})


# ---------------------------------------------------------------------------------------
# Addresses (section 1).
def parse_listen(text):
    if text.startswith("unix:"):
        path = text[5:]
        if not path or len(path.encode()) > 107:
            raise SystemExit("unix socket path empty or longer than 107 bytes: %r" % text)
        return ("unix", path)
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:\[\]]+):(\d+)", text)
    if not m or not 0 <= int(m.group(2)) < 65536:
        raise SystemExit("address %r does not parse (HOST:PORT, [V6]:PORT or unix:PATH)" % text)
    return ("tcp", m.group(1), int(m.group(2)))


def format_address(sockaddr, family):
    if family == socket.AF_UNIX:
        return "unix:" + (sockaddr if isinstance(sockaddr, str) else (sockaddr or b"").decode(errors="replace"))
    host, port = sockaddr[0], sockaddr[1]
    return "[%s]:%d" % (host, port) if family == socket.AF_INET6 else "%s:%d" % (host, port)


def version_tuple(text):
    """Section 8.4: dotted numbers, leading digits of each part, missing parts count as 0."""
    parts = []
    for part in text.split("."):
        m = re.match(r"\d*", part)
        parts.append(int(m.group(0)) if m.group(0) else 0)
    return parts


def version_below(version, minimum):
    a, b = version_tuple(version), version_tuple(minimum)
    n = max(len(a), len(b))
    return a + [0] * (n - len(a)) < b + [0] * (n - len(b))


# ---------------------------------------------------------------------------------------
class Fatal(Exception):
    """A receiver error (sections 4.4, 6, 7): CLOSE with `code` unless send_close is False."""

    def __init__(self, code, message, send_close=True):
        super().__init__("%s: %s" % (code, message))
        self.code, self.message, self.send_close = code, message, send_close


class PeerClosed(Exception):
    """The peer sent CLOSE, or the stream ended: close, send nothing (sections 4.4, 7.13)."""


class Answer(Exception):
    """A handler's failure, answered ERROR with this code (section 7.5)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class Server:
    def __init__(self, args):
        self.args = args
        self.connections = set()
        self.servers = []
        self.draining = False
        self.nonce = random.getrandbits(64) or 1
        self.unix_paths = []
        self.stopped = asyncio.Event()

    def log(self, *parts):
        if self.args.verbose:
            print("[parley_server]", *parts, file=sys.stderr, flush=True)

    def nucleus(self):
        messages = [{"priority": 0, "text": t} for t in self.args.message] + \
                   [{"priority": 1, "text": t} for t in self.args.high_message]
        n = {}
        if messages:
            n["messages"] = messages
        if self.args.request_delay > 0:
            n["requestDelaySeconds"] = self.args.request_delay
        if self.args.redirect:
            n["redirects"] = list(self.args.redirect)
        return n

    async def start(self, addresses):
        for text in addresses:
            addr = parse_listen(text)
            if addr[0] == "unix":
                path = addr[1]
                if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
                    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        probe.connect(path)
                        raise OSError("a server already listens on unix:%s" % path)
                    except (ConnectionRefusedError, FileNotFoundError):
                        os.unlink(path)  # a stale socket of an earlier run (never another file)
                    finally:
                        probe.close()
                srv = await asyncio.start_unix_server(self.accept, path=path, limit=1 << 20)
                self.unix_paths.append(path)
                shown = ["unix:" + path]
            else:
                srv = await asyncio.start_server(self.accept, host=addr[1], port=addr[2], limit=1 << 20,
                                                 reuse_address=True)
                shown = [format_address(s.getsockname(), s.family) for s in srv.sockets]
            self.servers.append(srv)
            for a in shown:
                print("listening on %s" % a, flush=True)

    async def accept(self, reader, writer):
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            if self.draining and not self.connections:
                self.stopped.set()

    async def drain(self):
        """Section 7.14: stop accepting, refuse new requests, let running ones finish, CLOSE."""
        if self.draining:
            return
        self.draining = True
        self.log("draining %d connection(s)" % len(self.connections))
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            conn.start_drain()
        if not self.connections:
            self.stopped.set()
        try:
            await asyncio.wait_for(self.stopped.wait(), self.args.drain_timeout)
        except asyncio.TimeoutError:
            for conn in list(self.connections):
                conn.finish_drain(force=True)
            await asyncio.sleep(0.1)
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass


class Connection:
    def __init__(self, server, reader, writer):
        self.server, self.reader, self.writer = server, reader, writer
        sock = writer.get_extra_info("socket")
        try:
            self.family = sock.family if sock is not None else socket.AF_INET
            peer = writer.get_extra_info("peername")
            self.peer_label = "unix:" if self.family == socket.AF_UNIX else format_address(peer, self.family)
        except (OSError, TypeError, IndexError):
            self.peer_label = "unknown"
        self.buf = bytearray()
        self.eof = False
        self.closing = False
        self.features = 0
        self.peer_limit = MAX_FRAME
        self.send_seq = 0
        self.recv_seq = 0
        self.serving = {}      # request id -> its Task (running) or None (waiting for a slot)
        self.queue = []        # requests waiting for a handler slot: (header, payload, data)
        self.running = 0
        self.slot_free = asyncio.Event()
        self.direct_delay = None   # the grant's delay in ms once DIRECT is enabled (section 7.16)
        self.direct_ids = set()    # DIRECT requests read and not answered
        self.draining = False
        self.established = False
        self.last_rx = time.monotonic()
        self.last_keepalive = 0.0
        self.tasks = set()
        self.main = None
        self.external = None

    def log(self, *parts):
        self.server.log(self.peer_label, *parts)

    # --- writing ---------------------------------------------------------------------------
    def write(self, data):
        if not self.closing:
            self.writer.write(data)

    def send_frame(self, tag, segments, alignments=(0, 0, 0, 0)):
        self.write(encode_frame(tag, segments, alignments))

    def send_message(self, kind, id_, type_name, payload, data=None):
        """A MESSAGE numbered when it is written (section 7.3): seq, and ack = the last seq
        received. Raises Answer for what the requester cannot take (sections 4.5, 7.5, 16):
        a refused message uses no seq."""
        if self.closing:
            return
        name = type_name.encode("utf-8")
        if kind == KIND["STREAM_ITEM"] and not self.features & F_STREAMS:
            raise Answer("invalidArgument", "cannot send STREAM_ITEM: the streams feature was not negotiated")
        if data is not None and not self.features & F_DATA:
            raise Answer("invalidArgument", "cannot send a data segment: the dataSegment feature was not negotiated")
        size = 32 + len(name) + len(payload) + (len(data) if data is not None else 0)
        if size > self.peer_limit:
            raise Answer("frameTooLarge", "the answer %s of %d bytes exceeds the requester's max_frame_size %d"
                         % (type_name, size, self.peer_limit))
        self.send_seq += 1
        segs = [encode_header(self.send_seq, self.recv_seq, id_, kind, type_name), payload]
        if data is not None:
            segs.append(data)
        self.send_frame(TAG["MESSAGE"], segs, (0, 0, 4096 if data is not None else 0, 0))

    def send_answer(self, kind, id_, type_name, payload, data=None):
        """A final answer or a stream item; one the requester cannot take becomes ERROR."""
        try:
            self.send_message(kind, id_, type_name, payload, data)
        except Answer as e:
            if kind == KIND["STREAM_ITEM"]:
                raise
            self.send_error(id_, e.code, e.message)

    def send_error(self, id_, code, message):
        self.send_message(KIND["ERROR"], id_, "parley.v1.Status", status(code, message))

    async def flush(self):
        if not self.closing:
            try:
                await self.writer.drain()
            except (ConnectionError, OSError):
                self.closing = True

    # --- reading ---------------------------------------------------------------------------
    async def fill(self):
        """Reads more bytes; stops first while the handlers are all busy, or while the peer
        does not read what was written to it (section 7.15)."""
        while self.queue or self.running >= HANDLER_LIMIT or len(self.direct_ids) >= DIRECT_LIMIT:
            self.slot_free.clear()
            await self.slot_free.wait()
            self.last_rx = time.monotonic()  # the silence does not count while not reading
        if not self.closing and self.writer.transport.get_write_buffer_size() > WRITE_HIGH:
            # Answers written at once (ERRORs, KEEPALIVE_ACKs, one-way Pongs) are not handlers:
            # a peer that sends without reading is not read further until it reads (7.15).
            await self.flush()
            self.last_rx = time.monotonic()
        if self.eof:
            return False
        try:
            chunk = await self.reader.read(256 * 1024)
        except (ConnectionError, OSError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.last_rx = time.monotonic()
        self.buf += chunk
        return True

    async def exact(self, n, what, started):
        while len(self.buf) < n:
            if not await self.fill():
                if started or self.buf:
                    raise PeerClosed("truncated: the stream ended inside a %s" % what)
                raise PeerClosed("connectionClosed")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_banner(self):
        """Section 3, in order: magic (as soon as bytes arrive), CRC, version, features."""
        while True:
            k = min(len(self.buf), 8)
            if bytes(self.buf[:k]) != MAGIC[:k]:
                raise Fatal("badMagic", "the peer's first bytes are not PARLEY\\r\\n")
            if len(self.buf) >= 32:
                break
            if not await self.fill():
                raise PeerClosed("the stream ended inside the banner" if self.buf else "connectionClosed")
        b = await self.exact(32, "banner", True)
        if crc32c(b[:28]) != struct.unpack_from("<I", b, 28)[0]:
            raise Fatal("badPreambleCRC", "the banner's CRC is wrong")
        version, _reserved, supported, required = struct.unpack_from("<HHQQ", b, 8)
        if version == 0:
            raise Fatal("unsupportedVersion", "peer speaks protocol version 0; this side speaks version 1 "
                        "and accepts 1 or later", send_close=False)
        they_need = required & ~SUPPORTED
        if they_need:
            raise Fatal("missingFeatures", "peer (protocol version %d) requires features %#x that this side "
                        "(protocol version 1, supported %#x) does not support" % (version, they_need, SUPPORTED),
                        send_close=False)
        we_need = REQUIRED & ~supported
        if we_need:
            raise Fatal("missingFeatures", "this side requires features %#x that the peer does not support"
                        % we_need, send_close=False)
        self.features = SUPPORTED & supported
        self.log("banner version %d supported %#x required %#x: features %#x" % (version, supported, required,
                                                                                 self.features))

    async def read_frame(self):
        """Section 4.4: returns (tag, flags, segments)."""
        p = await self.exact(32, "preamble", False)
        if crc32c(p[:28]) != struct.unpack_from("<I", p, 28)[0]:
            raise Fatal("badPreambleCRC", "the CRC of a frame preamble is wrong")
        tag, flags, count, byte3 = p[0], p[1], p[2], p[3]
        desc = [struct.unpack_from("<IH", p, 4 + 6 * i) for i in range(4)]
        if not 1 <= count <= 4:
            raise Fatal("protocolViolation", "a frame of %d segments (1 to 4)" % count)
        if byte3 != 0:
            raise Fatal("protocolViolation", "preamble byte 3 is %#x, not 0" % byte3)
        if any(d != (0, 0) for d in desc[count:]):
            raise Fatal("protocolViolation", "an unused segment descriptor is not zero")
        total = sum(length for length, _ in desc[:count])
        if total > MAX_FRAME:
            raise Fatal("frameTooLarge", "a frame of %d bytes; this side's limit is %d" % (total, MAX_FRAME))
        body = await self.exact(total + 4 * count, "frame", True)
        segments, off = [], 0
        for length, _ in desc[:count]:
            segments.append(body[off:off + length])
            off += length
        for i, s in enumerate(segments):
            crc = struct.unpack_from("<I", body, off + 4 * i)[0]
            if crc32c(s) != crc:
                raise Fatal("badSegmentCRC", "the CRC of segment %d of a %s frame is wrong"
                            % (i, TAGS.get(tag, "%#04x" % tag)))
            remember_crc(s, crc)
        return tag, flags, segments

    def decode(self, type_name, segment):
        try:
            return pb_decode(type_name, segment)
        except ParleyError as e:
            raise Fatal("malformedPayload", "%s payload does not decode: %s" % (type_name, e.message))

    # --- the connection --------------------------------------------------------------------
    async def run(self):
        hello = pb_encode("parley.v1.Hello", {"entityType": 2, "peerAddress": self.peer_label,
                                               "maxFrameSize": MAX_FRAME})
        # Section 3 and 6.1: banner and HELLO at once, without waiting for the client's.
        self.write(encode_banner(1, SUPPORTED, REQUIRED) + encode_frame(TAG["HELLO"], [hello]))
        keepalive = asyncio.ensure_future(self.keepalive_loop())
        self.main = asyncio.ensure_future(self.receive())
        try:
            await self.main
        except Fatal as e:
            self.log("refused: %s" % e)
            await self.fail(e)
        except PeerClosed as e:
            self.log("closed: %s" % e)
        except (ConnectionError, OSError) as e:
            self.log("socket error: %s" % e)
        except asyncio.CancelledError:
            if self.external is None or asyncio.current_task().cancelling():
                raise
            await self.fail(self.external)
        finally:
            keepalive.cancel()
            self.abort_handlers()
            self.close_now()

    async def receive(self):
        await self.read_banner()
        await self.handshake()
        await self.session()

    def close_from_outside(self, err):
        """Drain and keepalive timeout: stop reading and fail with `err` (CLOSE, close)."""
        if self.external is None and not self.closing and self.main is not None and not self.main.done():
            self.external = err
            self.main.cancel()

    def abort_handlers(self):
        self.closing = True
        for t in list(self.tasks):
            t.cancel()
        self.queue.clear()

    def close_now(self):
        self.closing = True
        try:
            self.writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass

    async def fail(self, err):
        """Section 4.4: CLOSE with the error (unless section 3 says no CLOSE), then close;
        section 7.13: half-close and read until the peer closes or LINGER has passed."""
        self.abort_handlers()
        try:
            if err.send_close:
                self.writer.write(encode_frame(TAG["CLOSE"], [status(err.code, err.message)]))
            if self.writer.can_write_eof():
                self.writer.write_eof()
            await asyncio.wait_for(self.writer.drain(), LINGER)
            deadline = time.monotonic() + LINGER
            while time.monotonic() < deadline:
                chunk = await asyncio.wait_for(self.reader.read(256 * 1024), deadline - time.monotonic())
                if not chunk:
                    break
        except (asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
            pass
        self.close_now()

    async def next_frame(self, allowed):
        """The next frame allowed in this phase. CLOSE ends the connection quietly; unknown
        ignorable tags are skipped; unknown critical tags and known tags out of phase or
        direction are refused before the payload is decoded (section 4.8)."""
        while True:
            tag, flags, segs = await self.read_frame()
            if tag == TAG["CLOSE"]:
                try:
                    st = pb_decode("parley.v1.Status", segs[0])
                except ParleyError:
                    st = {"code": CODE["connectionClosed"], "message": "an unreadable CLOSE"}
                raise PeerClosed("the peer sent CLOSE %s %r" % (pc.code_name(st.get("code", 0)), st.get("message", "")))
            if tag in allowed:
                return tag, flags, segs
            if tag not in TAGS:
                if tag >= 0x80:
                    self.log("skipped an ignorable frame of tag %#04x" % tag)
                    continue
                raise Fatal("unknownFrameTag", "unknown critical frame tag %#04x" % tag)
            raise Fatal("unexpectedFrame", "%s is not allowed %s" % (TAGS[tag], self.phase))

    async def handshake(self):
        """Section 6.3."""
        self.phase = "while waiting for HELLO"
        _, _, segs = await self.next_frame({TAG["HELLO"]})
        hello = self.decode("parley.v1.Hello", segs[0])
        if hello.get("entityType", 0) != 1:
            raise Fatal("protocolViolation", "the client's HELLO has entity type %d, not ENTITY_TYPE_CLIENT"
                        % hello.get("entityType", 0))
        announced = hello.get("maxFrameSize", 0)
        self.peer_limit = MAX_FRAME if announced == 0 else max(announced, MIN_FRAME)
        self.log("HELLO from the client: sees us as %r, limit %d" % (hello.get("peerAddress", ""), self.peer_limit))

        self.phase = "while waiting for AUTH_REQUEST"
        attempts = 0
        while True:
            _, _, segs = await self.next_frame({TAG["AUTH_REQUEST"]})
            auth = self.decode("parley.v1.AuthRequest", segs[0])
            attempts += 1
            method = auth.get("method", "")
            if method == "none":
                modes = auth.get("offeredModes") or ["crc"]
                if "crc" not in modes:
                    # Section 5.1: the first offered mode the policy allows; none in common.
                    raise Fatal("authenticationFailed", "no common connection mode: the client offers %s, "
                                "this server allows crc only" % modes)
                break
            reason = ("method %r is not allowed: this server allows only method none (no secure mode, "
                      "and the connection is not TLS)" % method)
            if attempts >= MAX_AUTH_ATTEMPTS:
                raise Fatal("authenticationFailed", "%d authentication attempts; the last: %s" % (attempts, reason))
            self.send_frame(TAG["AUTH_BAD_METHOD"], [pb_encode("parley.v1.AuthBadMethod", {
                "method": method, "allowedMethods": ["none"], "reason": reason})])
        self.send_frame(TAG["AUTH_DONE"], [pb_encode("parley.v1.AuthDone", {"method": "none", "connectionMode": "crc"})])

        self.phase = "while waiting for CLIENT_IDENT"
        _, _, segs = await self.next_frame({TAG["CLIENT_IDENT"]})
        ident = self.decode("parley.v1.ClientIdent", segs[0])
        self.log("CLIENT_IDENT %r" % ident)
        nucleus = self.server.nucleus()
        minimum = self.server.args.min_client_version
        if minimum and version_below(ident.get("version", ""), minimum):
            text = "%s %s is out of date: this server needs version %s or later; please upgrade" % (
                ident.get("implementation") or "client", ident.get("version", ""), minimum)
            nucleus.setdefault("messages", []).append({"priority": 1, "text": text})
            refusal = {"code": CODE["clientOutOfDate"], "message": text}
            self.send_frame(TAG["SERVER_IDENT"], [self.server_ident(nucleus, refusal)])
            raise Fatal("clientOutOfDate", text)
        self.send_frame(TAG["SERVER_IDENT"], [self.server_ident(nucleus)])
        self.established = True
        if self.server.args.notice and self.features & F_NOTICE:
            self.send_frame(TAG["NOTICE"], [pb_encode("parley.v1.Notice", {
                "nucleus": {"messages": [{"priority": 0, "text": t} for t in self.server.args.notice]}})])
        if self.server.draining:
            self.start_drain()  # section 6.3: established, then drained at once

    def server_ident(self, nucleus, refusal=None):
        ident = {"nucleus": nucleus,
                 "platform": "%s-unknown-%s" % (platform.machine() or "unknown", sys.platform),
                 "implementation": "parley-python-interop", "version": "0.1.0",
                 "name": self.server.args.name, "serverNonce": self.server.nonce}
        if refusal:
            ident["refusal"] = refusal
        return pb_encode("parley.v1.ServerIdent", ident)

    # --- the session (section 7) -------------------------------------------------------------
    async def session(self):
        self.phase = "in the session"
        allowed = {TAG["MESSAGE"], TAG["KEEPALIVE"], TAG["KEEPALIVE_ACK"], TAG["DIRECT"]}
        while True:
            tag, flags, segs = await self.next_frame(allowed)
            if tag == TAG["MESSAGE"]:
                self.on_message(flags, segs)
            elif tag == TAG["DIRECT"]:
                self.on_direct(flags, segs)
            elif not self.features & F_KEEPALIVE:
                raise Fatal("unexpectedFrame", "%s without the keepalive feature" % TAGS[tag])
            elif len(segs[0]) != 8:
                raise Fatal("malformedPayload", "a %s of %d bytes (8 expected)" % (TAGS[tag], len(segs[0])))
            elif tag == TAG["KEEPALIVE"]:
                self.send_frame(TAG["KEEPALIVE_ACK"], [segs[0]])  # at once, the same 8 bytes
            # A KEEPALIVE_ACK is matched by nothing here but the silence it ends.

    def on_message(self, flags, segs):
        """Section 7.2, the checks in order, then section 7.4-7.8."""
        if len(segs) < 2:
            raise Fatal("malformedPayload", "a MESSAGE of %d segment(s)" % len(segs))
        try:
            h = decode_header(segs[0])
        except ParleyError as e:
            raise Fatal("malformedPayload", e.message)
        if h["seq"] != self.recv_seq + 1:
            raise Fatal("protocolViolation", "MESSAGE seq %d, expected %d" % (h["seq"], self.recv_seq + 1))
        self.recv_seq = h["seq"]
        kind = h["kind"]
        if kind not in KINDS:
            raise Fatal("protocolViolation", "unknown MESSAGE kind %d" % kind)
        if kind in (KIND["STREAM_ITEM"], KIND["CANCEL"]) and not self.features & F_STREAMS:
            raise Fatal("protocolViolation", "%s without the streams feature" % KINDS[kind])
        if len(segs) >= 3 and not self.features & F_DATA:
            raise Fatal("protocolViolation", "a data segment without the dataSegment feature")
        if flags or h["flags"]:
            raise Fatal("protocolViolation", "MESSAGE flags %#x, header flags %#x (0 in version 1)" % (flags, h["flags"]))
        payload, data = segs[1], (segs[2] if len(segs) >= 3 else None)
        id_ = h["id"]
        if kind == KIND["REQUEST"]:
            if id_ in self.serving:
                raise Fatal("protocolViolation", "request id %d is already in use by a request still being served" % id_)
            if self.draining:
                self.send_error(id_, "shuttingDown", "server is shutting down; request %s not started" % h["type"])
                return
            handler = HANDLERS.get(h["type"])
            if handler is None:
                self.send_error(id_, "unknownMessageType", 'no handler for request type "%s"' % h["type"])
                return
            self.serving[id_] = None
            if self.running >= HANDLER_LIMIT:
                self.queue.append((h, payload, data))
            else:
                self.start_handler(h, payload, data)
        elif kind == KIND["CANCEL"]:
            if id_ in self.serving:  # section 7.7; an id not being served is ignored
                task = self.serving[id_]
                if task is None:
                    self.queue = [q for q in self.queue if q[0]["id"] != id_]
                    del self.serving[id_]
                    self.maybe_finish_drain()
                else:
                    task.cancel()
        elif kind == KIND["ONE_WAY"]:
            if self.draining:
                return  # section 7.14: dropped
            if h["type"] == "parley.echo.v1.Ping":
                try:
                    ping = pb_decode("parley.echo.v1.Ping", payload)
                except ParleyError:
                    self.log("dropped a one-way Ping that does not decode")
                    return
                self.send_message(KIND["ONE_WAY"], 0, "parley.echo.v1.Pong", pb_encode("parley.echo.v1.Pong", {
                    "sequence": ping.get("sequence", 0) & U64, "serverName": self.server.args.name}))
            else:
                self.log("dropped a one-way %s" % h["type"])
        else:
            # RESPONSE, STREAM_ITEM, ERROR: this server sends no requests, so no answer has an
            # outstanding request; it is discarded (section 7.5, point 6).
            self.log("discarded a %s for id %d" % (KINDS[kind], id_))

    def on_direct(self, flags, segs):
        """Section 7.16: phase and enabling first (R-7.16-2), then flags and the id (R-7.16-4),
        then the id not in use (R-7.16-5); the echo service answers each with its own
        segments after the grant's delay (section 12)."""
        if not self.features & F_DIRECT:
            raise Fatal("unexpectedFrame", "DIRECT without the direct feature (bit 4)")
        if self.direct_delay is None:
            raise Fatal("unexpectedFrame", "DIRECT before a service enabled it on this connection")
        if flags:
            raise Fatal("protocolViolation", "DIRECT frame flags %#x (0 in version 1)" % flags)
        if len(segs[0]) < 8:
            raise Fatal("malformedPayload", "a DIRECT segment 0 of %d bytes, shorter than its id" % len(segs[0]))
        id_ = struct.unpack_from("<Q", segs[0])[0]
        if id_ in self.direct_ids:
            raise Fatal("protocolViolation", "DIRECT id %d is already in use by a request not yet answered" % id_)
        self.direct_ids.add(id_)
        answer = segs[:2]
        if self.direct_delay == 0:
            if sum(len(x) for x in answer) > self.peer_limit:
                raise Fatal("frameTooLarge", "the echo of DIRECT request %d exceeds the client's frame-size limit" % id_)
            self.answer_direct(id_, answer)
        else:
            task = asyncio.ensure_future(self.answer_direct_later(id_, answer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def answer_direct(self, id_, segments):
        """Section 12: when the answer is due; one over the client's limit cannot be sent."""
        if sum(len(x) for x in segments) > self.peer_limit:
            self.close_from_outside(Fatal("frameTooLarge", "the echo of DIRECT request %d exceeds the client's "
                                          "frame-size limit" % id_))
            return
        self.send_frame(TAG["DIRECT"], segments, (0, 4096 if len(segments) > 1 else 0, 0, 0))
        self.direct_ids.discard(id_)
        self.slot_free.set()
        self.maybe_finish_drain()

    async def answer_direct_later(self, id_, segments):
        try:
            await asyncio.sleep(self.direct_delay / 1000)
        except asyncio.CancelledError:
            return
        self.answer_direct(id_, segments)
        await self.flush()

    def start_handler(self, h, payload, data):
        self.running += 1
        answered = [False]
        task = asyncio.ensure_future(self.run_handler(h, payload, data, answered))
        self.serving[h["id"]] = task
        self.tasks.add(task)
        task.add_done_callback(lambda t: self.handler_done(t, h, answered))

    async def run_handler(self, h, payload, data, answered):
        id_, type_name = h["id"], h["type"]
        handler = HANDLERS[type_name]
        try:
            try:
                request = pb_decode(type_name, payload)
            except ParleyError as e:
                raise Answer("malformedPayload", "the %s payload does not decode: %s" % (type_name, e.message))
            reply_type, reply, reply_data = await handler(self, id_, request, data)
            answered[0] = True
            self.send_answer(KIND["RESPONSE"], id_, reply_type, pb_encode(reply_type, reply), reply_data)
        except asyncio.CancelledError:
            if not answered[0] and not self.closing:
                answered[0] = True
                self.send_error(id_, "cancelled", "request %d (%s) was cancelled" % (id_, type_name))
            return
        except Answer as e:
            answered[0] = True
            self.send_error(id_, e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a handler's own failure (section 7.5)
            answered[0] = True
            self.send_error(id_, "handlerFailed", "%s: %s" % (type(e).__name__, e))
        await self.flush()

    def handler_done(self, task, h, answered):
        """The request is no longer served (its id free again); a task cancelled before it
        started (a CANCEL read together with its REQUEST) is answered here."""
        id_ = h["id"]
        if not answered[0] and not self.closing:
            answered[0] = True
            self.send_error(id_, "cancelled", "request %d (%s) was cancelled" % (id_, h["type"]))
        self.tasks.discard(task)
        self.serving.pop(id_, None)
        self.running -= 1
        if self.queue and not self.closing and self.running < HANDLER_LIMIT:
            h2, p2, d2 = self.queue.pop(0)
            self.start_handler(h2, p2, d2)
        self.slot_free.set()
        self.maybe_finish_drain()

    # --- draining (section 7.14) --------------------------------------------------------------
    def start_drain(self):
        if not self.established:
            self.draining = True  # the handshake goes on; drained once established
            return
        self.draining = True
        self.maybe_finish_drain()

    def maybe_finish_drain(self):
        if self.draining and self.established and not self.serving and not self.direct_ids and not self.closing:
            self.finish_drain()

    def finish_drain(self, force=False):
        if self.closing:
            return
        if not self.established and not force:
            return
        self.log("drained: CLOSE shuttingDown")
        self.close_from_outside(Fatal("shuttingDown", "server is shutting down"))

    # --- keepalive (section 7.12: the sender's policy) ----------------------------------------
    async def keepalive_loop(self):
        interval, limit = self.server.args.keepalive_interval, self.server.args.keepalive_timeout
        try:
            while not self.closing:
                await asyncio.sleep(interval / 4)
                if not self.established or not self.features & F_KEEPALIVE or self.closing:
                    continue
                if self.queue or self.running >= HANDLER_LIMIT or len(self.direct_ids) >= DIRECT_LIMIT:
                    continue  # not reading: the silence does not count
                silence = time.monotonic() - self.last_rx
                if silence >= limit:
                    self.close_from_outside(Fatal("timeout", "nothing received from the peer for %.2f s (keepalive "
                                                  "timeout %.2f s)" % (silence, limit)))
                    return
                if silence >= interval and time.monotonic() - self.last_keepalive >= interval:
                    self.last_keepalive = time.monotonic()
                    self.send_frame(TAG["KEEPALIVE"], [struct.pack("<Q", time.monotonic_ns() & U64)])
        except asyncio.CancelledError:
            pass


# ---------------------------------------------------------------------------------------
# The echo service (section 12). A handler returns (reply type, reply dict, data or None).
async def handle_ping(conn, id_, req, data):
    return "parley.echo.v1.Pong", {"sequence": req.get("sequence", 0) & U64, "serverName": conn.server.args.name}, None


async def handle_echo(conn, id_, req, data):
    # The request's data segment, if any, comes back in the reply's (an empty one as empty).
    return "parley.echo.v1.EchoReply", {k: v for k, v in req.items() if k in ("payload", "text")}, data


async def handle_count(conn, id_, req, data):
    count, interval = req.get("count", 0), req.get("intervalMs", 0)
    sent = 0
    try:
        for i in range(count):
            if interval:
                await asyncio.sleep(interval / 1000)
            conn.send_message(KIND["STREAM_ITEM"], id_, "parley.echo.v1.CountItem", pb_encode(
                "parley.echo.v1.CountItem", {"index": i, "line": "line %d of %d" % (i + 1, count)}))
            sent = i + 1
            await conn.flush()
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        # Section 7.7: a cancelled Count still answers CountDone with cancelled: true.
        return "parley.echo.v1.CountDone", {"sent": sent, "cancelled": True}, None
    return "parley.echo.v1.CountDone", {"sent": sent}, None


async def handle_sleep(conn, id_, req, data):
    await asyncio.sleep(req.get("delayMs", 0) / 1000)
    return "parley.echo.v1.Slept", {"delayMs": req.get("delayMs", 0)}, None


async def handle_work(conn, id_, req, data):
    conn.log("work %d started" % req.get("key", 0))
    if req.get("delayMs", 0):
        await asyncio.sleep(req["delayMs"] / 1000)
    return "parley.echo.v1.WorkDone", {"key": req.get("key", 0) & U64}, None


async def handle_enable_direct(conn, id_, req, data):
    # Section 12: enabled before the grant is answered (R-7.16-1); one grant per connection.
    if not conn.features & F_DIRECT:
        raise Answer("invalidArgument", "cannot use DIRECT frames: the direct feature was not negotiated")
    if conn.direct_delay is not None:
        raise Answer("invalidArgument", "DIRECT is already enabled on this connection")
    if req.get("delayMs", 0) > 10000:
        raise Answer("invalidArgument", "delay_ms %d is over the echo service's limit of 10000" % req["delayMs"])
    conn.direct_delay = req.get("delayMs", 0)
    return "parley.echo.v1.DirectGranted", {"delayMs": conn.direct_delay}, None


HANDLERS = {
    "parley.echo.v1.EnableDirect": handle_enable_direct,
    "parley.echo.v1.Ping": handle_ping,
    "parley.echo.v1.Echo": handle_echo,
    "parley.echo.v1.Count": handle_count,
    "parley.echo.v1.Sleep": handle_sleep,
    "parley.echo.v1.Work": handle_work,
}


# ---------------------------------------------------------------------------------------
async def serve(args):
    server = Server(args)
    try:
        await server.start(args.address)
    except OSError as e:
        print("cannot listen: %s" % e, file=sys.stderr, flush=True)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = [0]

    def on_signal():
        signals[0] += 1
        if signals[0] > 1:
            os._exit(1)  # a second signal: stop at once
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # A parent may have started this process with these signals blocked (the mask is
    # inherited through exec: Foundation's Process does this); a blocked SIGTERM would never
    # reach the handler, and the server would not stop.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    await stop.wait()
    await server.drain()
    return 0


def main():
    ap = argparse.ArgumentParser(description="Independent Parley v1 server (from docs/protocol.md)")
    ap.add_argument("address", nargs="+", help="HOST:PORT, [V6]:PORT or unix:PATH (port 0: any free port)")
    ap.add_argument("--name", default="parley-python", help="server name (SERVER_IDENT, Pong)")
    ap.add_argument("--message", action="append", default=[], help="a low-priority nucleus message")
    ap.add_argument("--high-message", action="append", default=[], help="a high-priority nucleus message")
    ap.add_argument("--request-delay", type=float, default=0.0, help="nucleus request delay, seconds")
    ap.add_argument("--redirect", action="append", default=[], help="a nucleus redirect address")
    ap.add_argument("--notice", action="append", default=[], help="a message sent in a NOTICE after SERVER_IDENT")
    ap.add_argument("--min-client-version", default="", help="refuse clients below this version (section 8.4)")
    ap.add_argument("--keepalive-interval", type=float, default=KEEPALIVE_INTERVAL,
                    help="seconds of silence before a KEEPALIVE (section 7.12)")
    ap.add_argument("--keepalive-timeout", type=float, default=KEEPALIVE_TIMEOUT,
                    help="seconds of silence before CLOSE timeout")
    ap.add_argument("--drain-timeout", type=float, default=10.0, help="seconds a drain waits for running requests")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
