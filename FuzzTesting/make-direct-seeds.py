#!/usr/bin/env python3
"""Writes the two DIRECT seeds of the fuzz corpus (FuzzTesting/README.md).

    python3 FuzzTesting/make-direct-seeds.py FuzzTesting/Corpus/ping-session-client.bin FuzzTesting/Corpus

From a recorded client session (banner, handshake, five requests) it makes
  direct-large-session.bin     the banner with feature bit 4 (direct, docs/protocol.md 7.16)
                               and three DIRECT requests after the requests, of 20,000,
                               16,384 and 16,383 bytes of data: frames large enough that
                               WireDecoder.decodeCollecting keeps their data as the reads it
                               arrives in (16 KiB on), and one just under; then a KEEPALIVE,
                               which the harness reaches only if the last DIRECT frame passed
                               the session's rules;
  direct-large-bad-data-crc.bin  the first two of them, the second's data CRC wrong.
FuzzCorpusTests checks how far each decodes. Frames are built as docs/protocol.md sections 3
and 4 describe them; nothing here is read from the implementation.
"""
import struct
import sys

POLY = 0x82F63B78
TABLE = []
for n in range(256):
    c = n
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    TABLE.append(c)


def crc32c(data):
    c = 0xFFFFFFFF
    for x in data:
        c = TABLE[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def frame(tag, segments, alignments):
    preamble = bytearray(32)
    preamble[0] = tag
    preamble[2] = len(segments)
    for i, (segment, alignment) in enumerate(zip(segments, alignments)):
        struct.pack_into("<IH", preamble, 4 + 6 * i, len(segment), alignment)
    struct.pack_into("<I", preamble, 28, crc32c(preamble[:28]))
    epilogue = b"".join(struct.pack("<I", crc32c(s) if s else 0) for s in segments)
    return bytes(preamble) + b"".join(segments) + epilogue


def direct(request_id, data_length):
    segment0 = struct.pack("<Q", request_id) + bytes(24)  # the id, then a service header
    data = bytes((j * 7 + request_id) & 0xFF for j in range(data_length))
    return frame(0x16, [segment0, data], [0, 4096])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    session = bytearray(open(sys.argv[1], "rb").read())
    if session[:8] != b"PARLEY\r\n":
        sys.exit(f"{sys.argv[1]}: not a recorded session (no banner)")
    struct.pack_into("<Q", session, 12, struct.unpack_from("<Q", session, 12)[0] | 0x10)
    struct.pack_into("<I", session, 28, crc32c(session[:28]))
    keepalive = frame(0x12, [struct.pack("<Q", 5)], [0])
    good = bytes(session) + direct(1, 20000) + direct(2, 16384) + direct(3, 16383) + keepalive
    bad = bytearray(bytes(session) + direct(1, 20000) + direct(2, 16384))
    bad[-1] ^= 0x40  # the last u32 of the epilogue: the second frame's data CRC
    with open(f"{sys.argv[2]}/direct-large-session.bin", "wb") as f:
        f.write(good)
    with open(f"{sys.argv[2]}/direct-large-bad-data-crc.bin", "wb") as f:
        f.write(bytes(bad))
    print(f"direct-large-session.bin {len(good)} bytes, direct-large-bad-data-crc.bin {len(bad)} bytes")


main()
