#!/usr/bin/env python3
"""gen-corpus.py: writes the seed corpus of the NBD fuzz target (fuzz-nbd.c).

Each file is one mode byte followed by records [u8 gate][u16 be length][bytes]:
what a server sends, each record held back until the client has sent `gate`
more messages (options or requests).  The records are a greeting, option
replies in the order the client asks (fixed newstyle: STRUCTURED_REPLY,
SET_META_CONTEXT base:allocation, GO; listing: LIST, then INFO per export with
details, then ABORT), then replies to the requests fuzz-nbd.c issues, whose
cookies count from 1 in this order:
  1 READ 4096@0, 2 BLOCK_STATUS 8192@0 (only with block status),
  3 WRITE 512@0 FUA, 4 FLUSH (sent while the write is unfinished, so it goes
  out even when the write fails), 5 READ 4096@4096, 6 READ 4096@8192,
  7 TRIM 4096@0, 8 WRITE_ZEROES 4096@0.
(Without block status there is no request 2 and the later cookies move down.)

Usage: gen-corpus.py [OUTDIR]   (default: the corpus/ directory next to this file)
Written out by hand from the NBD protocol (doc/proto.md); no other code used.
"""
import os
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE = 0x00420281861253
REPLY_MAGIC = 0x3E889045565A9
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_SR, OPT_SET_META = 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 0x80000000
ERR_UNSUP, ERR_POLICY, ERR_UNKNOWN, ERR_PLATFORM = ERR + 1, ERR + 2, ERR + 6, ERR + 4
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
CH_NONE, CH_DATA, CH_HOLE, CH_BS = 0, 1, 2, 5
CH_ERROR, CH_ERROR_OFFSET = 0x8001, 0x8002
DONE = 1

# HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_DF
EFLAGS = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80
SIZE = 1 << 20

MODE_LIST, MODE_DETAILS, MODE_NO_SR, MODE_NO_BS = 1, 2, 4, 8


def u16(v): return struct.pack(">H", v)
def u32(v): return struct.pack(">I", v)
def u64(v): return struct.pack(">Q", v)


def pattern(off, n):
    return bytes(((o * 131) ^ (o >> 9) ^ 0x5C) & 0xFF for o in range(off, off + n))


def greeting(hflags=3):
    return u64(NBDMAGIC) + u64(IHAVEOPT) + u16(hflags)


def oldstyle(size=SIZE, eflags=EFLAGS):
    return u64(NBDMAGIC) + u64(OLDSTYLE) + u64(size) + u32(eflags) + bytes(124)


def rep(opt, typ, payload=b""):
    return u64(REPLY_MAGIC) + u32(opt) + u32(typ) + u32(len(payload)) + payload


def info_export(opt, size=SIZE, eflags=EFLAGS):
    return rep(opt, REP_INFO, u16(INFO_EXPORT) + u64(size) + u16(eflags))


def info_block_size(opt, mn, pref, mx):
    return rep(opt, REP_INFO, u16(INFO_BLOCK_SIZE) + u32(mn) + u32(pref) + u32(mx))


def info_str(opt, typ, s):
    return rep(opt, REP_INFO, u16(typ) + s.encode())


def server(name, desc=""):
    return rep(OPT_LIST, REP_SERVER, u32(len(name)) + name.encode() + desc.encode())


def go_full(opt=OPT_GO):
    return (info_export(opt) + info_block_size(opt, 1, 4096, 32 << 20)
            + info_str(opt, INFO_NAME, "disk") + info_str(opt, INFO_DESCRIPTION, "fuzz seed")
            + rep(opt, REP_ACK))


def simple(cookie, err=0, data=b""):
    return u32(SIMPLE) + u32(err) + u64(cookie) + data


def chunk(cookie, flags, typ, payload=b""):
    return u32(STRUCTURED) + u16(flags) + u16(typ) + u64(cookie) + u32(len(payload)) + payload


def data_chunk(cookie, flags, off, n):
    return chunk(cookie, flags, CH_DATA, u64(off) + pattern(off, n))


def hole_chunk(cookie, flags, off, n):
    return chunk(cookie, flags, CH_HOLE, u64(off) + u32(n))


def error_chunk(cookie, flags, err, msg=b"", offset=None):
    payload = u32(err) + u16(len(msg)) + msg
    if offset is None:
        return chunk(cookie, flags, CH_ERROR, payload)
    return chunk(cookie, flags, CH_ERROR_OFFSET, payload + u64(offset))


def bs_chunk(cookie, flags, ctx, extents):
    return chunk(cookie, flags, CH_BS, u32(ctx) + b"".join(u32(l) + u32(f) for l, f in extents))


def R(gate, data):
    """One record: sent once the client has sent `gate` more messages."""
    assert len(data) < 65536
    return bytes([gate]) + u16(len(data)) + data


def simple_session(first=1):
    """Simple replies to: READ, WRITE, FLUSH, READ, READ, TRIM, ZERO (no block status)."""
    c = first
    out = R(1, simple(c, 0, pattern(0, 4096)))          # READ 4096@0
    out += R(1, simple(c + 1)) + R(1, simple(c + 2))    # WRITE, FLUSH
    out += R(2, simple(c + 4, 0, pattern(8192, 4096))   # two reads: the later one first
             + simple(c + 3, 0, pattern(4096, 4096)))
    out += R(1, simple(c + 5)) + R(1, simple(c + 6, 5))  # TRIM ok, ZERO fails with EIO
    return out


def structured_session():
    out = R(1, data_chunk(1, DONE, 0, 4096))
    out += R(1, bs_chunk(2, DONE, 7, [(4096, 0), (4096, 3)]))
    out += R(1, simple(3)) + R(1, simple(4))
    out += R(2, hole_chunk(6, 0, 8192, 2048) + data_chunk(5, 0, 4096 + 2048, 2048)
             + data_chunk(6, DONE, 8192 + 2048, 2048) + data_chunk(5, 0, 4096, 2048)
             + chunk(5, DONE, CH_NONE))
    out += R(1, simple(7)) + R(1, chunk(8, DONE, CH_NONE))
    return out


def structured_errors_session():
    out = R(1, error_chunk(1, DONE, 5, b"bad sector", offset=512))
    out += R(1, bs_chunk(2, 0, 99, [(8192, 0)]) + bs_chunk(2, DONE, 7, [(16384, 3)]))
    out += R(1, error_chunk(3, DONE, 28, b"full"))
    out += R(1, simple(4, 0xDEADBEEF))
    out += R(2, error_chunk(5, 0, 1) + data_chunk(5, DONE, 4096, 4096)
             + chunk(6, DONE, 0x8000 | 42, u32(28) + u16(0) + b"extra"))
    out += R(1, chunk(7, DONE, CH_NONE)) + R(1, chunk(8, DONE, CH_NONE))
    return out


def scrambled_session():
    """Read 1 in 16 chunks (data and holes) in a scrambled order, then errors."""
    parts = b""
    for i in range(16):
        k = (i * 7) % 16
        if k % 5 == 0:
            parts += hole_chunk(1, 0, k * 256, 256)
        else:
            parts += data_chunk(1, 0, k * 256, 256)
    out = R(1, parts + chunk(1, DONE, CH_NONE))
    out += R(1, bs_chunk(2, DONE, 7, [(512, 0), (512, 1), (1024, 2), (6144, 3)]))
    out += R(1, chunk(3, 0xFFF0 | DONE, CH_NONE)) + R(1, simple(4))
    out += R(2, data_chunk(6, 0, 8192, 1024) + data_chunk(5, 0, 4096, 4096)
             + data_chunk(6, 0, 8192 + 1024, 3072) + chunk(5, DONE, CH_NONE)
             + chunk(6, DONE, CH_NONE))
    return out


def fixed_handshake(go=None):
    """Greeting, then the replies to STRUCTURED_REPLY, SET_META_CONTEXT and GO."""
    return (R(0, greeting(3)) + R(1, rep(OPT_SR, REP_ACK))
            + R(1, rep(OPT_SET_META, REP_META, u32(7) + b"base:allocation")
                + rep(OPT_SET_META, REP_ACK))
            + R(1, go if go is not None else go_full()))


def seeds():
    s = {}
    m0 = bytes([0])
    s["fixed-go-structured"] = m0 + fixed_handshake() + structured_session()
    s["fixed-go-structured-errors"] = m0 + fixed_handshake() + structured_errors_session()
    s["fixed-go-scrambled-chunks"] = m0 + fixed_handshake() + scrambled_session()
    s["fixed-go-simple"] = bytes([MODE_NO_SR | MODE_NO_BS]) + R(0, greeting(3)) \
        + R(1, info_export(OPT_GO) + rep(OPT_GO, REP_ACK)) + simple_session()
    s["fixed-no-sr"] = m0 + R(0, greeting(1)) + R(1, rep(OPT_SR, ERR_UNSUP)) \
        + R(1, info_export(OPT_GO) + rep(OPT_GO, REP_ACK)) + simple_session()
    s["oldstyle"] = m0 + R(0, oldstyle()) + simple_session()
    s["newstyle-nonfixed"] = m0 + R(0, greeting(0)) \
        + R(1, u64(SIZE) + u16(EFLAGS) + bytes(124)) + simple_session()
    s["newstyle-nonfixed-nozeroes"] = m0 + R(0, greeting(2)) + R(1, u64(SIZE) + u16(EFLAGS)) \
        + simple_session()
    s["go-unsup-export-name"] = m0 + R(0, greeting(3)) + R(1, rep(OPT_SR, ERR_UNSUP)) \
        + R(1, rep(OPT_GO, ERR_UNSUP)) + R(1, u64(SIZE) + u16(EFLAGS)) + simple_session()
    s["go-unknown"] = m0 + fixed_handshake(rep(OPT_GO, ERR_UNKNOWN, b"no such export")) \
        + R(1, rep(OPT_ABORT, REP_ACK))
    s["go-read-only-block-size"] = m0 + fixed_handshake(
        info_export(OPT_GO, 3 * 4096 + 100, 0x1 | 0x2)
        + info_block_size(OPT_GO, 4096, 4096, 65536) + rep(OPT_GO, REP_ACK)) \
        + R(1, data_chunk(1, DONE, 0, 4096)) + R(1, bs_chunk(2, DONE, 7, [(8192, 0)])) \
        + R(2, data_chunk(4, DONE, 8192, 4096) + error_chunk(3, DONE, 5))
    s["list"] = bytes([MODE_LIST]) + R(0, greeting(3)) \
        + R(1, server("a", "first") + server("b") + server("disk") + rep(OPT_LIST, REP_ACK)) \
        + R(1, rep(OPT_ABORT, REP_ACK))
    details = b""
    for size in (SIZE, 2 * SIZE):
        details += R(1, info_export(OPT_INFO, size) + info_block_size(OPT_INFO, 512, 4096, 1 << 20)
                     + info_str(OPT_INFO, INFO_DESCRIPTION, "d") + rep(OPT_INFO, REP_ACK))
    s["list-details"] = bytes([MODE_LIST | MODE_DETAILS]) + R(0, greeting(3)) \
        + R(1, server("a", "x") + server("b") + rep(OPT_LIST, REP_ACK)) + details \
        + R(1, rep(OPT_ABORT, REP_ACK))
    s["list-policy"] = bytes([MODE_LIST]) + R(0, greeting(3)) \
        + R(1, server("a") + rep(OPT_LIST, ERR_POLICY, b"no")) + R(1, rep(OPT_ABORT, REP_ACK))
    s["list-platform"] = bytes([MODE_LIST]) + R(0, greeting(3)) + R(1, rep(OPT_LIST, ERR_PLATFORM))
    s["list-oldstyle"] = bytes([MODE_LIST]) + R(0, oldstyle())
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out, exist_ok=True)
    for name, data in sorted(seeds().items()):
        with open(os.path.join(out, name + ".bin"), "wb") as f:
            f.write(data)
        print(f"{name}.bin: {len(data)} bytes")


if __name__ == "__main__":
    main()
