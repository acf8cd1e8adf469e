#!/usr/bin/env python3
"""Independent Parley version 1 server, written as an interoperability check.

Written from docs/protocol.md ONLY (sections 1-12 and 16; the schemas are the ones reproduced
verbatim in section 12; secure mode and lossless sessions from sections 5.1 and 5.2, the
keyring's file from docs/security.md and what `parley keyring add` writes); no code of the
reference implementation was read. Python 3.11, standard library, plus the `cryptography`
package (X25519, AES-256-GCM, ChaCha20-Poly1305) when --keyring is given. The codec (CRC-32C,
protobuf, banner, frame and MESSAGE header encoding) is the one of parley_client.py, in the
same directory.

    python3 parley_server.py ADDRESS [ADDRESS...]      # HOST:PORT, [V6]:PORT or unix:PATH
        [--keyring FILE] [--auth none,secret] [--mode crc,secure]
        [--cipher aes-256-gcm,chacha20-poly1305] [--session-retention SECONDS]

It prints `listening on ADDRESS` (the real port when 0 was asked) once per address, flushed,
and serves until SIGTERM or SIGINT, then drains (section 7.14) and exits 0. What it speaks:

- banner and negotiation (section 3): supported = streams, keepalive, notice, dataSegment,
  direct (0x1f), plus secureMode (bit 8) when its policy allows mode secure and reconnect
  (bit 9) when it keeps sessions; bit 8 required when secure is its only mode;
- every receiver rule of section 4 (CRCs, shape, frame-size limit before the body is read,
  unknown ignorable tags skipped, unknown critical tags refused, phase and direction checked
  before the payload is decoded, flags);
- the server handshake of section 6.3, SERVER_IDENT with a nucleus (--message,
  --high-message, --request-delay, --redirect, --min-client-version); methods and modes by
  policy (section 5.1): method `none` (crc mode) and, with --keyring, method `secret`
  (X25519, HKDF, proofs, sealed entity, transcript MACs, checks 1-7 of R-5.1-4) in crc or
  secure mode; a method outside the policy is answered AUTH_BAD_METHOD, the third refusal is
  CLOSE authenticationFailed;
- secure mode (section 5.1): every frame after AUTH_DONE sealed (preamble alone, then the
  segments) with aes-256-gcm or chacha20-poly1305 (the first of --cipher the client offers),
  every frame after AUTH_REQUEST_MORE opened, a clear CLOSE accepted as the first frame after
  the switch (R-5.1-6), key update every 2^32 AEAD messages, the counter's end (R-5.1-10);
- the keyring (docs/security.md): JSON {"entities": [{"name", "key" (base64 or hex),
  "caps", "created", "expires", "revoked"}]}, refused when others may read or write it, read
  again when it changes; revoked and expired entities refused;
- lossless sessions (section 5.2), when --session-retention > 0: a 16-byte token from a
  CSPRNG, MESSAGEs numbered per session and kept until acknowledged, ACK frames (2 ms, or at
  once at 256), the seq/ack checks of R-5.2-6, a broken connection detaches the session (kept
  --session-retention seconds, at most --max-detached), SESSION_RECONNECT checked in the
  document's order (version, token and nonce, entity, connect_seq, last_received_seq),
  SESSION_RESUMED and the resend, SESSION_RESET then CLIENT_IDENT, the race rule (the older
  connection gets CLOSE sessionSuperseded and delivers nothing more); no DIRECT in a lossless
  session;
- the session of section 7: seq/ack, requests answered concurrently in any order, streams,
  CANCEL, one-way messages, ERRORs with the codes of section 10, the data segment, NOTICE
  (--notice), KEEPALIVE/KEEPALIVE_ACK (and its own KEEPALIVE after 15 s of silence, CLOSE
  timeout after 60 s; in a lossless session it closes without CLOSE), CLOSE, draining,
  bounded handlers (reading stops when 1024 run);
- the echo service of section 12 (parley.echo.v1): Ping, Echo (data segment echoed), Count
  (a stream), Sleep, Work; a one-way Ping is answered by a one-way Pong, a one-way Echo is
  dropped; EnableDirect grants DIRECT frames (section 7.16: ids, echoes after the grant's
  delay, reading stops at 1024 unanswered, a drain waits for them).

Without --keyring it allows method none in crc mode only and keeps no sessions (neither bit 8
nor bit 9), as a version 1 server without them. With --keyring the defaults become --auth
none,secret, --mode crc,secure and --session-retention 30.

Every receiver error closes the connection: CLOSE with the code of the document (none for a
version 0 banner or missing features, section 3), sealed once this side seals, then a
half-close, reading and discarding until the peer closes or 2 s have passed (section 7.13).
"""
import argparse
import asyncio
import base64
import collections
import datetime
import hashlib
import hmac
import json
import os
import platform
import random
import re
import secrets
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
                           encode_banner, encode_header, pb_decode, pb_encode,
                           hkdf_extract, hkdf_expand, aead)  # HKDF (RFC 5869, SHA-256), the AEADs of 5.1

try:  # secure mode (section 5.1): X25519 and the two AEADs; HKDF and HMAC are hashlib/hmac
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    HAVE_CRYPTOGRAPHY = True
except ImportError:  # only --keyring needs it
    HAVE_CRYPTOGRAPHY = False

# The schema of section 12 is parley_client.py's (with secure mode's AuthRequest and AuthDone
# fields and method secret's payloads); a server reads and checks all of them (a string must
# be UTF-8, section 2). Section 12's DIRECT grant of the echo service.
pc.SCHEMA["parley.echo.v1.EnableDirect"] = [(1, "delayMs", "uint32", False)]  # at most 10000
pc.SCHEMA["parley.echo.v1.DirectGranted"] = [(1, "delayMs", "uint32", False)]

F_STREAMS, F_KEEPALIVE, F_NOTICE, F_DATA = pc.F_STREAMS, pc.F_KEEPALIVE, pc.F_NOTICE, pc.F_DATA
F_DIRECT = 0x10                       # section 3: bit 4, DIRECT frames (section 7.16)
F_SECURE, F_RECONNECT = 0x100, 0x200  # section 3: bit 8 secure mode (5.1), bit 9 lossless sessions (5.2)
# Always supported; bit 8 is added when the policy allows secure mode, bit 9 when sessions are
# kept (--session-retention > 0), and bit 8 is required when secure is the only mode.
BASE_SUPPORTED = F_STREAMS | F_KEEPALIVE | F_NOTICE | F_DATA | F_DIRECT
MAX_FRAME = pc.DEFAULT_MAX_FRAME      # our limit, announced in HELLO (section 4.5)
MIN_FRAME = pc.MIN_MAX_FRAME
MAX_AUTH_ATTEMPTS = 3                 # section 6.1 (the number is the server's choice)
HANDLER_LIMIT = 1024                  # section 7.15
DIRECT_LIMIT = 1024                   # section 7.16 (R-7.16-8): unanswered DIRECT requests read
KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT = 15.0, 60.0   # section 7.12 (the sender's choice)
WRITE_HIGH = 4 * 1024 * 1024         # section 7.15: unsent bytes above which reading waits
MAX_KEPT_ANSWERS = 16384              # R-5.2-13: answers kept for a peer that does not acknowledge
SESSION_RETENTION = 30.0              # section 5.2: a detached session is kept this long (with --keyring)
MAX_DETACHED = 1024                   # R-5.2-4: detached sessions kept at most
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


def encode_preamble(tag, segments, alignments=(0, 0, 0, 0)):
    """Section 4.1: flags 0 (section 4.9), byte 3 and unused descriptors 0, the CRC. In
    secure mode the same 32 bytes are sealed (section 5.1)."""
    pre = struct.pack("<BBBB", tag, 0, len(segments), 0)
    for i in range(4):
        pre += struct.pack("<IH", len(segments[i]), alignments[i]) if i < len(segments) else bytes(6)
    return pre + struct.pack("<I", crc32c(pre))


def encode_frame(tag, segments, alignments=(0, 0, 0, 0)):
    """Section 4: preamble, segments, epilogue."""
    pre = encode_preamble(tag, segments, alignments)
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
# Secure mode (section 5.1): one direction of a sealed connection, and the keyring
# (docs/security.md); HKDF and the two AEADs are parley_client.py's.
CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
LAST_COUNTER = (1 << 64) - 2          # section 5.1: the counter never wraps
KEY_UPDATE_EVERY = 1 << 32            # R-5.1-9: AEAD messages per key


class Direction:
    """One direction of a secure connection (section 5.1, "Secure frames"): its cipher, key,
    iv and AEAD message counter. Message n uses nonce iv XOR n (u64 little-endian in nonce
    bytes 0-7) under the traffic key updated floor(n / 2^32) times (R-5.1-9)."""

    def __init__(self, cipher, key, iv):
        self.cipher, self.key, self.iv = cipher, key, iv
        self.n, self.updates, self.aead = 0, 0, aead(cipher, key)

    def _nonce(self):
        n = self.n
        while self.updates < n // KEY_UPDATE_EVERY:
            self.key = hkdf_expand(self.key, b"parley v1 key update", 32)
            self.updates += 1
            self.aead = aead(self.cipher, self.key)
        self.n += 1
        return bytes(a ^ b for a, b in zip(self.iv, struct.pack("<Q", n) + b"\0\0\0\0"))

    def remaining(self):
        return LAST_COUNTER + 1 - self.n

    def seal(self, plain):
        return self.aead.encrypt(self._nonce(), bytes(plain), None)

    def open(self, sealed):
        """The plaintext, or None when the message does not open (badAuthTag)."""
        if self.n > LAST_COUNTER:
            return None
        try:
            return self.aead.decrypt(self._nonce(), bytes(sealed), None)
        except InvalidTag:
            return None


def parse_key(text):
    """A keyring key: 32 bytes written in base64 (what `parley keyring` writes) or in hex."""
    if isinstance(text, str) and re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ValueError("a key is neither base64 nor hex")
    if len(key) != 32:
        raise ValueError("a key of %d bytes (32 expected)" % len(key))
    return key


def parse_time(value):
    """An expiry: an RFC 3339 / ISO 8601 date-time (`2027-06-30T00:00:00Z`) or a date, or a
    number of seconds since 1970; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).replace("Z", "+00:00")
    t = datetime.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


class Keyring:
    """docs/security.md, "Keyrings": a JSON file of entities (name, key, caps, created,
    expires, revoked). Refused when others may read or write it (mode bits 077) or it
    belongs to another user; read again when it changes (size, time or inode), keeping the
    previous one when the new one cannot be read."""

    def __init__(self, path, log):
        self.path, self.log = path, log
        self.stamp, self.entities = None, {}
        self.load()

    def load(self):
        st = os.stat(self.path)
        if st.st_mode & 0o077:
            raise ValueError("keyring %s may be read or written by others (mode %03o): chmod 600 %s"
                             % (self.path, st.st_mode & 0o777, self.path))
        if st.st_uid != os.getuid():
            raise ValueError("keyring %s belongs to another user (uid %d)" % (self.path, st.st_uid))
        with open(self.path, encoding="utf-8") as f:
            doc = json.load(f)
        entities = {}
        for e in doc.get("entities", []):
            name = e["name"]
            if not re.fullmatch(r"[A-Za-z0-9._@-]{1,255}", name):
                raise ValueError("entity name %r is not 1 to 255 letters, digits or ._-@" % name)
            entities[name] = {"key": parse_key(e["key"]), "revoked": bool(e.get("revoked", False)),
                              "expires": parse_time(e.get("expires")), "caps": list(e.get("caps", []))}
        self.entities, self.stamp = entities, (st.st_size, st.st_mtime_ns, st.st_ino)

    def refresh(self):
        try:
            st = os.stat(self.path)
            if (st.st_size, st.st_mtime_ns, st.st_ino) != self.stamp:
                self.load()
                self.log("keyring %s read again: %d entities" % (self.path, len(self.entities)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log("keyring %s cannot be read (%s); the previous one stays in force" % (self.path, e))


# ---------------------------------------------------------------------------------------
class Fatal(Exception):
    """A receiver error (sections 4.4, 5, 6, 7): CLOSE with `code` unless send_close is False.
    `breaks`: it ends only this connection, not its lossless session (section 5.2: CLOSE
    sessionSuperseded, a keepalive timeout)."""

    def __init__(self, code, message, send_close=True, breaks=False):
        super().__init__("%s: %s" % (code, message))
        self.code, self.message, self.send_close, self.breaks = code, message, send_close, breaks


class PeerClosed(Exception):
    """The peer sent CLOSE (close_code), or the stream ended (close_code None): close, send
    nothing (sections 4.4, 7.13)."""

    def __init__(self, message, close_code=None):
        super().__init__(message)
        self.close_code = close_code


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
        self.nonce = secrets.randbits(64) or 1
        self.unix_paths = []
        self.stopped = asyncio.Event()
        # Policy (section 5.1): the methods and modes this server allows, its ciphers in its
        # own order of preference; bit 8 supported when it allows secure, required when secure
        # is its only mode; bit 9 when it keeps sessions (section 5.2).
        self.methods, self.modes, self.ciphers = args.auth, args.mode, args.cipher
        self.keyring = Keyring(args.keyring, self.log) if args.keyring else None
        self.supported = BASE_SUPPORTED | (F_SECURE if "secure" in self.modes else 0) | \
            (F_RECONNECT if args.session_retention > 0 else 0)
        self.required = F_SECURE if self.modes == ["secure"] else 0
        self.sessions = {}                       # session token -> Session (lossless, not ended)
        self.detached = collections.OrderedDict()  # token -> Session, the longest detached first
        self.global_ids = 0

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
        """Section 7.14: stop accepting, refuse new requests, let running ones finish, CLOSE.
        Detached lossless sessions end at once (nobody is connected to be told)."""
        if self.draining:
            return
        self.draining = True
        self.log("draining %d connection(s)" % len(self.connections))
        for srv in self.servers:
            srv.close()
        for sess in list(self.detached.values()):
            sess.end()
        for conn in list(self.connections):
            if conn.sess is not None and conn.sess.link is conn:
                conn.sess.start_drain()  # (a connection still in its handshake drains once established)
        if not self.connections:
            self.stopped.set()
        try:
            await asyncio.wait_for(self.stopped.wait(), self.args.drain_timeout)
        except asyncio.TimeoutError:
            for conn in list(self.connections):
                conn.close_from_outside(Fatal("shuttingDown", "server is shutting down"))
            await asyncio.sleep(0.1)
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass


class Session:
    """What the application sees (section 7): MESSAGE numbering (seq/ack), the requests being
    served, DIRECT, draining. A lossy session lives and dies with its one connection; a
    lossless one (section 5.2) keeps every MESSAGE it sent until acknowledged, outlives broken
    connections (detached for the retention time) and continues on the connection of an
    accepted SESSION_RECONNECT."""

    def __init__(self, server, link, lossless, token=b"", entity=None):
        self.server, self.link, self.lossless, self.token, self.entity = server, link, lossless, token, entity
        self.label = link.peer_label
        self.features, self.peer_limit = link.features, link.peer_limit
        self.send_seq = 0
        self.recv_seq = 0
        self.kept = collections.deque()   # lossless: (seq, kind, id, type, payload, data) not yet acknowledged
        self.kept_answers = 0             # of them RESPONSE and ERROR (R-5.2-13)
        self.peer_ack = 0                 # the highest ack received
        self.ack_sent = 0                 # the last ack written to the peer
        self.ack_timer = None
        self.connect_seq = 0              # the highest connect_seq accepted
        self.expiry = None
        self.serving = {}      # request id -> its Task (running) or None (waiting for a slot)
        self.queue = []        # requests waiting for a handler slot: (header, payload, data)
        self.running = 0
        self.slot_free = asyncio.Event()
        self.direct_delay = None   # the grant's delay in ms once DIRECT is enabled (section 7.16)
        self.direct_ids = set()    # DIRECT requests read and not answered
        self.draining = False
        self.closing = False       # the session has ended
        self.tasks = set()

    def log(self, *parts):
        self.server.log(self.label, *parts)

    def blocked(self):
        """Section 7.15: reading stops while the handlers are all busy."""
        return bool(self.queue) or self.running >= HANDLER_LIMIT or len(self.direct_ids) >= DIRECT_LIMIT

    # --- links (section 5.2) ----------------------------------------------------------------
    def attach(self, link):
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.server.detached.pop(self.token, None)
        self.link, self.label = link, link.peer_label
        self.features, self.peer_limit = link.features, link.peer_limit

    def detach(self):
        """The connection broke (no CLOSE): keep the session for the retention time, and at
        most MAX_DETACHED detached sessions, forgetting the one detached the longest (R-5.2-4)."""
        self.link = None
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.closing:
            return
        if self.server.draining:
            self.end()
            return
        self.log("session %s detached: kept %.1f s" % (self.token.hex(), self.server.args.session_retention))
        self.expiry = asyncio.get_running_loop().call_later(self.server.args.session_retention, self.expire)
        self.server.detached[self.token] = self
        while len(self.server.detached) > self.server.args.max_detached:
            _, oldest = self.server.detached.popitem(last=False)
            oldest.log("session %s forgotten: too many detached sessions" % oldest.token.hex())
            oldest.end()

    def expire(self):
        self.expiry = None
        self.log("session %s forgotten after its retention time" % self.token.hex())
        self.end()

    def end(self):
        """The session ends: its pending work is cancelled, a reconnect gets SESSION_RESET."""
        if self.closing:
            return
        self.closing = True
        for timer in (self.expiry, self.ack_timer):
            if timer is not None:
                timer.cancel()
        self.expiry = self.ack_timer = None
        if self.lossless:
            self.server.sessions.pop(self.token, None)
            self.server.detached.pop(self.token, None)
        for t in list(self.tasks):
            t.cancel()
        self.queue.clear()

    # --- writing ---------------------------------------------------------------------------
    def send_frame(self, tag, segments, alignments=(0, 0, 0, 0)):
        if self.link is not None and not self.closing:
            self.link.send_frame(tag, segments, alignments)

    def send_message(self, kind, id_, type_name, payload, data=None):
        """A MESSAGE numbered when it is written (section 7.3): seq, and ack = the last seq
        received. Raises Answer for what the requester cannot take (sections 4.5, 7.5, 16):
        a refused message uses no seq. In a lossless session it is kept until acknowledged,
        and numbered even while detached (section 5.2)."""
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
        if self.lossless:
            self.kept.append((self.send_seq, kind, id_, type_name, payload, data))
            if kind in (KIND["RESPONSE"], KIND["ERROR"]):
                self.kept_answers += 1
        self.write_message(self.send_seq, kind, id_, type_name, payload, data)

    def write_message(self, seq, kind, id_, type_name, payload, data):
        if self.link is None or self.link.closing:
            return
        segs = [encode_header(seq, self.recv_seq, id_, kind, type_name), payload]
        if data is not None:
            segs.append(data)
        self.link.send_frame(TAG["MESSAGE"], segs, (0, 0, 4096 if data is not None else 0, 0))
        self.ack_sent = self.recv_seq

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
        if self.link is not None and not self.closing:
            await self.link.flush()

    # --- acknowledging (section 5.2) --------------------------------------------------------
    def check_ack(self, ack):
        """R-5.2-6: an ack never goes below an earlier one nor above the last seq sent; it
        frees the messages kept up to it."""
        if ack < self.peer_ack:
            raise Fatal("protocolViolation", "ack %d is below an earlier ack %d" % (ack, self.peer_ack))
        if ack > self.send_seq:
            raise Fatal("protocolViolation", "ack %d acknowledges a seq this side has not sent (last sent: %d)"
                        % (ack, self.send_seq))
        self.acknowledged(ack)

    def acknowledged(self, ack):
        self.peer_ack = max(self.peer_ack, ack)
        while self.kept and self.kept[0][0] <= self.peer_ack:
            if self.kept.popleft()[1] in (KIND["RESPONSE"], KIND["ERROR"]):
                self.kept_answers -= 1

    def schedule_ack(self):
        """R-5.2-3: ACK within a bounded time when no MESSAGE carries the ack back: at once at
        256 unacknowledged, otherwise after 2 ms (the reference's numbers)."""
        if self.recv_seq - self.ack_sent >= 256:
            self.send_ack()
        elif self.ack_timer is None and self.link is not None:
            self.ack_timer = asyncio.get_running_loop().call_later(0.002, self.send_ack)

    def send_ack(self):
        self.ack_timer = None
        if self.link is not None and not self.closing and self.recv_seq > self.ack_sent:
            self.link.send_frame(TAG["ACK"], [struct.pack("<Q", self.recv_seq)])
            self.ack_sent = self.recv_seq

    def resend(self, last_received):
        """Section 5.2: after SESSION_RESUMED, every kept MESSAGE above the peer's
        last_received_seq again, in seq order, with its ack the current one."""
        n = 0
        for seq, kind, id_, type_name, payload, data in self.kept:
            if seq > last_received:
                self.write_message(seq, kind, id_, type_name, payload, data)
                n += 1
        self.log("resumed session %s: sent %d kept message(s) again" % (self.token.hex(), n))

    # --- reading ---------------------------------------------------------------------------
    def on_message(self, link, flags, segs):
        """Section 7.2, the checks in order (with section 5.2's for a lossless session), then
        section 7.4-7.8."""
        if len(segs) < 2:
            raise Fatal("malformedPayload", "a MESSAGE of %d segment(s)" % len(segs))
        try:
            h = decode_header(segs[0])
        except ParleyError as e:
            raise Fatal("malformedPayload", e.message)
        if self.lossless:
            if h["seq"] <= self.recv_seq:
                self.log("dropped MESSAGE seq %d: at or below the last received, %d" % (h["seq"], self.recv_seq))
                return
            if h["seq"] != self.recv_seq + 1:
                raise Fatal("protocolViolation", "MESSAGE seq %d, expected %d: a message was lost"
                            % (h["seq"], self.recv_seq + 1))
            self.check_ack(h["ack"])
            if self.kept_answers > MAX_KEPT_ANSWERS:
                raise Fatal("protocolViolation", "%d answers kept for a peer that does not acknowledge them "
                            "(at most %d)" % (self.kept_answers, MAX_KEPT_ANSWERS))
        elif h["seq"] != self.recv_seq + 1:
            raise Fatal("protocolViolation", "MESSAGE seq %d, expected %d" % (h["seq"], self.recv_seq + 1))
        self.recv_seq = h["seq"]
        if self.lossless:
            self.schedule_ack()
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
            if self.link is not None:
                self.link.close_from_outside(Fatal("frameTooLarge", "the echo of DIRECT request %d exceeds the "
                                                   "client's frame-size limit" % id_))
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
        self.draining = True
        if self.link is None:
            self.end()
            return
        self.maybe_finish_drain()

    def maybe_finish_drain(self):
        if self.draining and not self.serving and not self.direct_ids and not self.closing:
            if self.link is None:
                self.end()
            else:
                self.link.log("drained: CLOSE shuttingDown")
                self.link.close_from_outside(Fatal("shuttingDown", "server is shutting down"))


class Connection:
    """One connection (a *link*): banner, handshake, frames in crc or secure mode, keepalive.
    Once established it carries a Session (its own, or a lossless one it resumed)."""

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
        self.peer_banner = None     # (version, supported, required) as received
        self.hello = b""            # our HELLO's segment 0, the client's
        self.client_hello = b""
        self.auth_records = []      # section 5.1 "Transcript": (direction, tag, segment 0) of each AUTH frame
        self.sealer = None          # secure mode: Direction we seal with (key_s2c)
        self.opener = None          # secure mode: Direction we open with (key_c2s)
        self.first_opened = False   # R-5.1-6: the next frame is the first after the switch to opening
        self.entity = ("none", "")  # who authenticated (section 5.2, check 3)
        self.sess = None
        self.established = False
        self.phase = "while waiting for the banner"
        self.last_rx = time.monotonic()
        self.last_keepalive = 0.0
        self.main = None
        self.external = None

    def log(self, *parts):
        self.server.log(self.peer_label, *parts)

    # --- writing ---------------------------------------------------------------------------
    def write(self, data):
        if not self.closing:
            self.writer.write(data)

    def frame_bytes(self, tag, segments, alignments=(0, 0, 0, 0)):
        """A frame in crc mode (section 4), or sealed (section 5.1: the preamble alone, then
        the segments together). None when the counter cannot take it (R-5.1-10)."""
        if self.sealer is None:
            return encode_frame(tag, segments, alignments)
        if self.sealer.remaining() < (2 if tag == TAG["CLOSE"] else 4):
            return None
        return self.sealer.seal(encode_preamble(tag, segments, alignments)) + self.sealer.seal(b"".join(segments))

    def send_frame(self, tag, segments, alignments=(0, 0, 0, 0)):
        if self.closing:
            return
        data = self.frame_bytes(tag, segments, alignments)
        if data is None:
            self.close_from_outside(Fatal("keyExhausted", "the message counter of this direction is at its end"))
            return
        self.write(data)

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
        while self.sess is not None and self.sess.link is self and self.sess.blocked():
            self.sess.slot_free.clear()
            await self.sess.slot_free.wait()
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

    async def wait_bytes(self, n, what, started):
        while len(self.buf) < n:
            if not await self.fill():
                if started or self.buf:
                    raise PeerClosed("truncated: the stream ended inside a %s" % what)
                raise PeerClosed("connectionClosed")

    async def exact(self, n, what, started):
        await self.wait_bytes(n, what, started)
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
        ours, ours_required = self.server.supported, self.server.required
        they_need = required & ~ours
        if they_need:
            raise Fatal("missingFeatures", "peer (protocol version %d) requires features %#x that this side "
                        "(protocol version 1, supported %#x) does not support" % (version, they_need, ours),
                        send_close=False)
        we_need = ours_required & ~supported
        if we_need:
            raise Fatal("missingFeatures", "this side (protocol version 1) requires features %#x that the peer "
                        "(protocol version %d, supported %#x) does not support" % (we_need, version, supported),
                        send_close=False)
        self.peer_banner = (version, supported, required)
        self.features = ours & supported
        self.log("banner version %d supported %#x required %#x: features %#x" % (version, supported, required,
                                                                                 self.features))

    def check_shape(self, p):
        """Section 4.4 steps 3 and 4 on a preamble (clear, or opened): (tag, flags, lengths)."""
        tag, flags, count, byte3 = p[0], p[1], p[2], p[3]
        desc = [struct.unpack_from("<IH", p, 4 + 6 * i) for i in range(4)]
        if not 1 <= count <= 4:
            raise Fatal("protocolViolation", "a frame of %d segments (1 to 4)" % count)
        if byte3 != 0:
            raise Fatal("protocolViolation", "preamble byte 3 is %#x, not 0" % byte3)
        if any(d != (0, 0) for d in desc[count:]):
            raise Fatal("protocolViolation", "an unused segment descriptor is not zero")
        lengths = [length for length, _ in desc[:count]]
        if sum(lengths) > MAX_FRAME:
            raise Fatal("frameTooLarge", "a frame of %d bytes; this side's limit is %d" % (sum(lengths), MAX_FRAME))
        return tag, flags, lengths

    async def read_frame(self):
        """Section 4.4 (crc mode) or section 5.1 (secure mode): returns (tag, flags, segments)."""
        if self.opener is None:
            return await self.read_clear_frame()
        if self.first_opened:
            # R-5.1-6: the first frame after the switch may be a clear CLOSE (a valid crc-mode
            # preamble, tag CLOSE, one segment). Such a frame can be shorter than the 48 bytes of
            # a sealed preamble, so its first 32 bytes are looked at before 48 are awaited.
            self.first_opened = False
            await self.wait_bytes(32, "preamble", False)
            p = bytes(self.buf[:32])
            if p[0] == TAG["CLOSE"] and p[2] == 1 and crc32c(p[:28]) == struct.unpack_from("<I", p, 28)[0]:
                return await self.read_clear_frame()
        sealed = await self.exact(48, "sealed preamble", False)
        p = self.opener.open(sealed)
        if p is None:
            raise Fatal("badAuthTag", "a sealed preamble does not open: altered, replayed, reordered, dropped, "
                        "or sealed under other keys")
        tag, flags, lengths = self.check_shape(p)   # R-5.1-7: only an authentic preamble is acted upon
        body = await self.exact(sum(lengths) + 16, "sealed frame", True)
        plain = self.opener.open(body)
        if plain is None:
            raise Fatal("badAuthTag", "the body of a sealed %s frame does not open" % TAGS.get(tag, "%#04x" % tag))
        segments, off = [], 0
        for length in lengths:
            segments.append(plain[off:off + length])
            off += length
        return tag, flags, segments

    async def read_clear_frame(self):
        p = await self.exact(32, "preamble", False)
        if crc32c(p[:28]) != struct.unpack_from("<I", p, 28)[0]:
            raise Fatal("badPreambleCRC", "the CRC of a frame preamble is wrong")
        tag, flags, lengths = self.check_shape(p)
        count = len(lengths)
        body = await self.exact(sum(lengths) + 4 * count, "frame", True)
        segments, off = [], 0
        for length in lengths:
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
        self.hello = pb_encode("parley.v1.Hello", {"entityType": 2, "peerAddress": self.peer_label,
                                                    "maxFrameSize": MAX_FRAME})
        # Section 3 and 6.1: banner and HELLO at once, without waiting for the client's.
        self.write(encode_banner(1, self.server.supported, self.server.required)
                   + encode_frame(TAG["HELLO"], [self.hello]))
        keepalive = asyncio.ensure_future(self.keepalive_loop())
        self.main = asyncio.ensure_future(self.receive())
        ends_session = True
        try:
            await self.main
        except Fatal as e:
            self.log("refused: %s" % e)
            ends_session = not e.breaks
            await self.fail(e)
        except PeerClosed as e:
            self.log("closed: %s" % e)
            # Section 5.2: a CLOSE ends the session (but sessionSuperseded); an end of stream
            # or a truncated frame breaks the connection only.
            ends_session = e.close_code is not None and e.close_code != CODE["sessionSuperseded"]
        except (ConnectionError, OSError) as e:
            self.log("socket error: %s" % e)
            ends_session = False
        except asyncio.CancelledError:
            if self.external is None or asyncio.current_task().cancelling():
                raise
            ends_session = not self.external.breaks
            await self.fail(self.external)
        finally:
            keepalive.cancel()
            self.release(ends_session)
            self.close_now()

    async def receive(self):
        await self.read_banner()
        await self.handshake()
        await self.session_loop()

    def release(self, ends_session):
        """The session this connection carries: ended with it, or (lossless, the connection
        broke) detached; nothing when another connection has taken it over."""
        sess = self.sess
        if sess is None or sess.link is not self:
            return
        if sess.lossless and not ends_session and not sess.closing:
            sess.detach()
        else:
            sess.end()

    def close_from_outside(self, err):
        """Drain, keepalive timeout, superseded: stop reading and fail with `err`."""
        if self.external is None and not self.closing and self.main is not None and not self.main.done():
            self.external = err
            self.main.cancel()

    def close_now(self):
        self.closing = True
        try:
            self.writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass

    async def fail(self, err):
        """Section 4.4: CLOSE with the error (unless section 3 says no CLOSE), sealed once this
        side seals (section 5.1), then close; section 7.13: half-close and read until the peer
        closes or LINGER has passed."""
        self.release(not err.breaks)
        try:
            if err.send_close and not self.closing:
                data = self.frame_bytes(TAG["CLOSE"], [status(err.code, err.message)])
                if data is not None:
                    self.writer.write(data)
            self.closing = True
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
                code = st.get("code", 0)
                raise PeerClosed("the peer sent CLOSE %s %r" % (pc.code_name(code), st.get("message", "")), code)
            if tag in allowed:
                return tag, flags, segs
            if tag not in TAGS:
                if tag >= 0x80:
                    self.log("skipped an ignorable frame of tag %#04x" % tag)
                    continue
                raise Fatal("unknownFrameTag", "unknown critical frame tag %#04x" % tag)
            raise Fatal("unexpectedFrame", "%s is not allowed %s" % (TAGS[tag], self.phase))

    # --- the handshake (sections 5.1, 5.2, 6.3) ----------------------------------------------
    async def handshake(self):
        self.phase = "while waiting for HELLO"
        _, _, segs = await self.next_frame({TAG["HELLO"]})
        self.client_hello = bytes(segs[0])
        hello = self.decode("parley.v1.Hello", segs[0])
        if hello.get("entityType", 0) != 1:
            raise Fatal("protocolViolation", "the client's HELLO has entity type %d, not ENTITY_TYPE_CLIENT"
                        % hello.get("entityType", 0))
        announced = hello.get("maxFrameSize", 0)
        self.peer_limit = MAX_FRAME if announced == 0 else max(announced, MIN_FRAME)
        self.log("HELLO from the client: sees us as %r, limit %d" % (hello.get("peerAddress", ""), self.peer_limit))
        await self.authenticate()
        await self.identify()

    def allowed_methods(self):
        """R-5.1-1: the methods of the policy this connection can use: not `none` when the
        only mode is secure, never `tls` (no TLS transport here)."""
        return [m for m in self.server.methods
                if m == "secret" or (m == "none" and "crc" in self.server.modes)]

    async def authenticate(self):
        attempts = 0
        while True:
            self.phase = "while waiting for AUTH_REQUEST"
            _, _, segs = await self.next_frame({TAG["AUTH_REQUEST"]})
            self.auth_records.append((b"C", TAG["AUTH_REQUEST"], bytes(segs[0])))
            auth = self.decode("parley.v1.AuthRequest", segs[0])
            attempts += 1
            method = auth.get("method", "")
            allowed = self.allowed_methods()
            modes = auth.get("offeredModes") or ["crc"]
            if method in allowed and method == "none":
                if "crc" not in modes:
                    # R-5.1-11: none gives crc only; no common mode.
                    raise Fatal("authenticationFailed", "no common connection mode: the client offers %s with "
                                "method none, which gives crc only" % modes)
                self.send_frame(TAG["AUTH_DONE"], [pb_encode("parley.v1.AuthDone", {"method": "none",
                                                                                    "connectionMode": "crc"})])
                return
            if method in allowed and method == "secret":
                await self.auth_secret(auth, modes)
                return
            if method == "none" and "none" in self.server.methods:
                reason = "method none is not allowed: this server's only connection mode is secure"
            elif method == "tls" and "tls" in self.server.methods:
                reason = "method tls is not allowed: this connection is not TLS"
            else:
                reason = "method %r is not allowed: this server allows %s" % (method, ", ".join(allowed) or "nothing")
            if attempts >= MAX_AUTH_ATTEMPTS:
                raise Fatal("authenticationFailed", "%d authentication attempts; the last: %s" % (attempts, reason))
            bad = pb_encode("parley.v1.AuthBadMethod", {"method": method, "allowedMethods": allowed, "reason": reason})
            self.auth_records.append((b"S", TAG["AUTH_BAD_METHOD"], bad))
            self.send_frame(TAG["AUTH_BAD_METHOD"], [bad])

    def transcript(self):
        """Section 5.1, "Transcript": SHA-256 over direction | tag | u32 length | bytes for both
        banners (re-encoded), both HELLOs, then every AUTH frame in the order of the exchange."""
        v, sup, req = self.peer_banner
        records = [(b"C", 0, encode_banner(v, sup, req)),
                   (b"S", 0, encode_banner(1, self.server.supported, self.server.required)),
                   (b"C", TAG["HELLO"], self.client_hello), (b"S", TAG["HELLO"], self.hello)] + self.auth_records
        h = hashlib.sha256()
        for direction, tag, data in records:
            h.update(direction + bytes([tag]) + struct.pack("<I", len(data)) + data)
        return h.digest()

    async def auth_secret(self, auth, modes):
        """Section 5.1, "Method secret": R-5.1-2, then R-5.1-4 checks 1-7 in order."""
        srv = self.server
        try:
            req = pb_decode("parley.v1.SecretAuthRequest", auth.get("payload", b""))
        except ParleyError as e:
            raise Fatal("malformedPayload", "the SecretAuthRequest does not decode: %s" % e.message)
        cc, cks = req.get("clientChallenge", b""), req.get("clientKeyShare", b"")
        if len(cc) != 32 or len(cks) != 32:
            raise Fatal("malformedPayload", "a SecretAuthRequest with a %d-byte challenge and a %d-byte key share "
                        "(32 each)" % (len(cc), len(cks)))
        # R-5.1-11: the first mode of the client's list the policy allows (secure only with
        # bit 8), then the first cipher in this server's order that the client offers.
        mode = next((m for m in modes if m in srv.modes and (m != "secure" or self.features & F_SECURE)), None)
        if mode is None:
            raise Fatal("authenticationFailed", "no common connection mode: the client offers %s, this server "
                        "allows %s" % (modes, srv.modes))
        cipher = ""
        if mode == "secure":
            offered = auth.get("offeredCiphers", [])
            cipher = next((c for c in srv.ciphers if c in offered), None)
            if cipher is None:
                raise Fatal("authenticationFailed", "no common cipher: the client offers %s, this server allows %s"
                            % (offered, srv.ciphers))
        private = X25519PrivateKey.generate()
        sks = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(cks))
        except ValueError as e:  # a low-order share gives an all-zero secret
            raise Fatal("authenticationFailed", "bad X25519 key share: %s (section 5.1, R-5.1-2)" % e)
        sc = secrets.token_bytes(32)
        challenges = cc + sc
        reply = pb_encode("parley.v1.AuthMore", {"payload": pb_encode("parley.v1.SecretAuthChallenge", {
            "serverChallenge": sc, "serverKeyShare": sks, "connectionMode": mode, "cipher": cipher})})
        self.auth_records.append((b"S", TAG["AUTH_REPLY_MORE"], reply))
        self.send_frame(TAG["AUTH_REPLY_MORE"], [reply])
        t1 = self.transcript()

        self.phase = "while waiting for AUTH_REQUEST_MORE"
        _, _, segs = await self.next_frame({TAG["AUTH_REQUEST_MORE"]})
        self.auth_records.append((b"C", TAG["AUTH_REQUEST_MORE"], bytes(segs[0])))
        t2 = self.transcript()
        # 1. the payload decodes
        more = self.decode("parley.v1.AuthMore", segs[0])
        try:
            proof = pb_decode("parley.v1.SecretAuthProof", more.get("payload", b""))
        except ParleyError as e:
            raise Fatal("malformedPayload", "the SecretAuthProof does not decode: %s" % e.message)
        # 2. the sealed entity opens under the identity key
        identity = hkdf_expand(hkdf_extract(challenges, shared), b"parley v1 identity", 32)
        try:
            name_bytes = ChaCha20Poly1305(identity).decrypt(bytes(12), proof.get("sealedEntity", b""), None)
        except InvalidTag:
            raise Fatal("handshakeTampered", "the sealed entity name does not open: the key shares or challenges "
                        "were changed in transit")
        try:
            entity = name_bytes.decode("utf-8")
        except UnicodeDecodeError:
            entity = None
        # 3-5. in the keyring, not revoked, not expired (the CLOSE does not name the entity)
        srv.keyring.refresh()
        record = srv.keyring.entities.get(entity) if entity else None
        if record is None:
            self.log("method secret: %r is not in the keyring" % name_bytes)
            raise Fatal("authenticationFailed", "the entity is not in the server's keyring")
        if record["revoked"]:
            self.log("method secret: %s is revoked" % entity)
            raise Fatal("authenticationFailed", "the entity's key is revoked")
        if record["expires"] is not None and not record["expires"] > time.time():
            self.log("method secret: %s has expired" % entity)
            raise Fatal("authenticationFailed", "the entity's key has expired")
        # 6. the client's proof (constant time)
        key, n = record["key"], bytes([len(name_bytes)]) + name_bytes
        client_proof = hmac.new(key, b"parley v1 client proof" + n + challenges, hashlib.sha256).digest()
        if not hmac.compare_digest(client_proof, proof.get("clientProof", b"")):
            self.log("method secret: wrong key for %s" % entity)
            raise Fatal("authenticationFailed", "wrong key")
        # 7. the client's transcript MAC
        secret = hkdf_extract(challenges, key + shared)
        mac_key = hkdf_expand(secret, b"parley v1 transcript mac", 32)
        mac = hmac.new(mac_key, b"parley v1 client transcript" + t1, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, proof.get("transcriptMac", b"")):
            raise Fatal("handshakeTampered", "the client's transcript MAC is wrong: the handshake was altered")
        srv.global_ids += 1
        global_id = srv.global_ids
        done = pb_encode("parley.v1.SecretAuthDone", {
            "serverProof": hmac.new(key, b"parley v1 server proof" + n + challenges, hashlib.sha256).digest(),
            "transcriptMac": hmac.new(mac_key, b"parley v1 server transcript" + t2 + struct.pack("<Q", global_id),
                                      hashlib.sha256).digest()})
        self.send_frame(TAG["AUTH_DONE"], [pb_encode("parley.v1.AuthDone", {
            "method": "secret", "globalId": global_id, "connectionMode": mode, "payload": done, "cipher": cipher})])
        self.entity = ("secret", entity)
        self.log("method secret: %s authenticated, mode %s %s" % (entity, mode, cipher))
        if mode == "secure":
            keys = {d: (hkdf_expand(secret, b"parley v1 %s key" % d + t2, 32),
                        hkdf_expand(secret, b"parley v1 %s iv" % d + t2, 12)) for d in (b"c2s", b"s2c")}
            self.sealer = Direction(cipher, *keys[b"s2c"])   # everything sent after AUTH_DONE
            self.opener = Direction(cipher, *keys[b"c2s"])   # everything received after AUTH_REQUEST_MORE
            self.first_opened = True

    def refused(self, ident):
        """Section 8.4: SERVER_IDENT with `refusal`, then CLOSE clientOutOfDate; None when the
        client's version is not below the minimum."""
        minimum = self.server.args.min_client_version
        if not minimum or not version_below(ident.get("version", ""), minimum):
            return None
        text = "%s %s is out of date: this server needs version %s or later; please upgrade" % (
            ident.get("implementation") or "client", ident.get("version", ""), minimum)
        nucleus = self.server.nucleus()
        nucleus.setdefault("messages", []).append({"priority": 1, "text": text})
        self.send_frame(TAG["SERVER_IDENT"], [pb_encode("parley.v1.ServerIdent", self.server_ident(
            nucleus, refusal={"code": CODE["clientOutOfDate"], "message": text}))])
        return Fatal("clientOutOfDate", text)

    async def identify(self):
        """Section 6.3 AWAIT_CLIENT_IDENT, with section 5.2's SESSION_RECONNECT under bit 9."""
        lossless = bool(self.features & F_RECONNECT)
        allowed = {TAG["CLIENT_IDENT"]} | ({TAG["SESSION_RECONNECT"]} if lossless else set())
        self.phase = "while waiting for CLIENT_IDENT"
        while True:
            tag, _, segs = await self.next_frame(allowed)
            if tag == TAG["CLIENT_IDENT"]:
                ident = self.decode("parley.v1.ClientIdent", segs[0])
                self.log("CLIENT_IDENT %r" % ident)
                err = self.refused(ident)
                if err:
                    raise err
                # R-5.2-1: the token from a cryptographically secure generator.
                token = secrets.token_bytes(16) if lossless else b""
                self.sess = Session(self.server, self, lossless, token, self.entity)
                if lossless:
                    self.server.sessions[token] = self.sess
                self.send_frame(TAG["SERVER_IDENT"], [pb_encode("parley.v1.ServerIdent", self.server_ident(
                    self.server.nucleus(), token=token))])
                break
            rec = self.decode("parley.v1.SessionReconnect", segs[0])
            token, connect_seq = rec.get("sessionToken", b""), rec.get("connectSeq", 0)
            if len(token) != 16 or connect_seq == 0:
                raise Fatal("malformedPayload", "a SESSION_RECONNECT with a %d-byte token (16) and connect_seq %d "
                            "(1 or more)" % (len(token), connect_seq))
            ident = rec.get("ident", {})
            self.log("SESSION_RECONNECT %s connect_seq %d last_received_seq %d %r" % (
                token.hex(), connect_seq, rec.get("lastReceivedSeq", 0), ident))
            err = self.refused(ident)                                    # 1
            if err:
                raise err
            sess = self.server.sessions.get(token) if rec.get("serverNonce", 0) == self.server.nonce else None
            if sess is None or sess.closing:                             # 2
                reason = ("the server restarted since the session began" if rec.get("serverNonce", 0) != self.server.nonce
                          else "the server does not have this session (it ended, or was forgotten after its "
                               "retention time)")
                self.send_frame(TAG["SESSION_RESET"], [pb_encode("parley.v1.SessionReset", {"reason": reason})])
                allowed = {TAG["CLIENT_IDENT"]}   # R-5.2-12: a second SESSION_RECONNECT is unexpectedFrame
                self.phase = "after SESSION_RESET (CLIENT_IDENT expected)"
                continue
            if sess.entity != self.entity:                               # 3
                raise Fatal("permissionDenied", "this connection did not authenticate as the entity that started "
                            "the session")
            if connect_seq <= sess.connect_seq:                          # 4
                raise Fatal("sessionSuperseded", "connect_seq %d is not above %d, already accepted for this session"
                            % (connect_seq, sess.connect_seq))
            last_received = rec.get("lastReceivedSeq", 0)
            if last_received > sess.send_seq:                            # 5
                raise Fatal("protocolViolation", "last_received_seq %d is above the highest seq this side sent, %d"
                            % (last_received, sess.send_seq))
            # Accepted: the race rule (the connection it had stops delivering at once and is
            # closed with CLOSE sessionSuperseded), then SESSION_RESUMED and the resend.
            sess.connect_seq = connect_seq
            old = sess.link
            self.sess = sess
            sess.attach(self)
            if old is not None and old is not self:
                old.close_from_outside(Fatal("sessionSuperseded", "a newer connection of this session took over",
                                             breaks=True))
            sess.acknowledged(last_received)   # below an earlier ack: taken as that ack
            ident = self.server_ident(self.server.nucleus(), token=token)
            self.send_frame(TAG["SESSION_RESUMED"], [pb_encode("parley.v1.SessionResumed", {
                "ident": ident, "lastReceivedSeq": sess.recv_seq})])
            sess.ack_sent = sess.recv_seq
            sess.resend(sess.peer_ack)
            break
        self.established = True
        if self.server.args.notice and self.features & F_NOTICE:
            self.send_frame(TAG["NOTICE"], [pb_encode("parley.v1.Notice", {
                "nucleus": {"messages": [{"priority": 0, "text": t} for t in self.server.args.notice]}})])
        if self.server.draining:
            self.sess.start_drain()  # section 6.3: established, then drained at once

    def server_ident(self, nucleus, refusal=None, token=b""):
        ident = {"nucleus": nucleus,
                 "platform": "%s-unknown-%s" % (platform.machine() or "unknown", sys.platform),
                 "implementation": "parley-python-interop", "version": "0.1.0",
                 "name": self.server.args.name, "serverNonce": self.server.nonce}
        if refusal:
            ident["refusal"] = refusal
        if token:
            ident["sessionToken"] = token
        return ident

    # --- the session (section 7) -------------------------------------------------------------
    async def session_loop(self):
        self.phase = "in the session"
        allowed = {TAG["MESSAGE"], TAG["KEEPALIVE"], TAG["KEEPALIVE_ACK"], TAG["DIRECT"], TAG["ACK"]}
        while True:
            tag, flags, segs = await self.next_frame(allowed)
            sess = self.sess
            if sess.link is not self:
                # Superseded (section 5.2): this connection delivers nothing more.
                raise Fatal("sessionSuperseded", "a newer connection of this session took over", breaks=True)
            if tag == TAG["MESSAGE"]:
                sess.on_message(self, flags, segs)
            elif tag == TAG["DIRECT"]:
                sess.on_direct(flags, segs)
            elif tag == TAG["ACK"]:
                if not self.features & F_RECONNECT:
                    raise Fatal("unexpectedFrame", "ACK without the reconnect feature (bit 9)")
                if len(segs[0]) != 8:
                    raise Fatal("malformedPayload", "an ACK of %d bytes (8 expected)" % len(segs[0]))
                sess.check_ack(struct.unpack_from("<Q", segs[0])[0])
            elif not self.features & F_KEEPALIVE:
                raise Fatal("unexpectedFrame", "%s without the keepalive feature" % TAGS[tag])
            elif len(segs[0]) != 8:
                raise Fatal("malformedPayload", "a %s of %d bytes (8 expected)" % (TAGS[tag], len(segs[0])))
            elif tag == TAG["KEEPALIVE"]:
                self.send_frame(TAG["KEEPALIVE_ACK"], [segs[0]])  # at once, the same 8 bytes
            # A KEEPALIVE_ACK is matched by nothing here but the silence it ends.

    # --- keepalive (section 7.12: the sender's policy) ----------------------------------------
    async def keepalive_loop(self):
        interval, limit = self.server.args.keepalive_interval, self.server.args.keepalive_timeout
        try:
            while not self.closing:
                await asyncio.sleep(interval / 4)
                if not self.established or not self.features & F_KEEPALIVE or self.closing:
                    continue
                if self.sess is not None and self.sess.link is self and self.sess.blocked():
                    continue  # not reading: the silence does not count
                silence = time.monotonic() - self.last_rx
                if silence >= limit:
                    text = "nothing received from the peer for %.2f s (keepalive timeout %.2f s)" % (silence, limit)
                    if self.sess is not None and self.sess.lossless:
                        # Section 7.12: in a lossless session, close without CLOSE; the session waits.
                        self.close_from_outside(Fatal("timeout", text, send_close=False, breaks=True))
                    else:
                        self.close_from_outside(Fatal("timeout", text))
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
    if conn.lossless:
        raise Answer("invalidArgument", "cannot use DIRECT frames in a lossless session (R-7.16-3)")
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
    ap.add_argument("--keyring", default="", metavar="FILE",
                    help="keyring of method secret (docs/security.md); turns on the defaults below marked (keyring)")
    ap.add_argument("--auth", default=None, metavar="METHODS",
                    help="methods allowed, comma-separated: none, secret (default: none; none,secret (keyring))")
    ap.add_argument("--mode", default=None, metavar="MODES",
                    help="connection modes allowed: crc, secure (default: crc; crc,secure (keyring)); "
                         "secure alone requires bit 8 in the banner")
    ap.add_argument("--cipher", default=",".join(CIPHERS), metavar="CIPHERS",
                    help="secure mode's ciphers in this server's order of preference (default: %(default)s)")
    ap.add_argument("--session-retention", type=float, default=None, metavar="SECONDS",
                    help="keep lossless sessions (bit 9) and a detached one this long; 0: no bit 9 "
                         "(default: 0; %g (keyring))" % SESSION_RETENTION)
    ap.add_argument("--max-detached", type=int, default=MAX_DETACHED, help="detached sessions kept at most")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    keyring = bool(args.keyring)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]
    args.auth = split(args.auth if args.auth is not None else ("none,secret" if keyring else "none"))
    args.mode = split(args.mode if args.mode is not None else ("crc,secure" if keyring else "crc"))
    args.cipher = split(args.cipher)
    if args.session_retention is None:
        args.session_retention = SESSION_RETENTION if keyring else 0.0
    for what, values, known in (("--auth", args.auth, ("none", "secret", "tls")), ("--mode", args.mode, ("crc", "secure")),
                                ("--cipher", args.cipher, CIPHERS)):
        if not values or any(v not in known for v in values):
            ap.error("%s %s: give one or more of %s" % (what, ",".join(values), ", ".join(known)))
    if "secret" in args.auth and not keyring:
        ap.error("--auth secret needs --keyring FILE")
    if "secure" in args.mode and "secret" not in args.auth:
        ap.error("--mode secure needs method secret (--auth ...,secret): only it can key secure mode")
    if keyring and not HAVE_CRYPTOGRAPHY:
        ap.error("--keyring needs the Python package cryptography")
    if keyring:
        try:
            Keyring(args.keyring, print)
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error("cannot read keyring %s: %s" % (args.keyring, e))
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
