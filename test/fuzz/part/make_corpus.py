#!/usr/bin/python3
"""Regenerates the seed corpus of fuzz-part (test/fuzz/part/corpus/) from
partition tables written by real tools: sfdisk, sgdisk, nbdkit's
partitioning plugin, and (as root, on a 4096-byte-sector loop device) sfdisk
and sgdisk again; plus a few damaged copies.  Run by hand:
    sudo /usr/bin/python3 test/fuzz/part/make_corpus.py

Each seed is in harness.h's compact format: only the non-zero 512-byte
blocks of the image are stored, so an 8 MiB disk is a few KiB.
"""
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
MIB = 1 << 20


def encode(img, sector_size=512, fix_crcs=False):
    with open(img, "rb") as f:
        data = f.read()
    assert len(data) <= 8 * MIB, img
    sectors, extra = divmod(len(data), sector_size)
    out = bytearray(struct.pack("<BIH", (1 if sector_size == 4096 else 0) | (2 if fix_crcs else 0),
                                sectors, extra))
    blk, i = 512, 0
    while i < len(data):
        if not any(data[i:i + blk]):
            i += blk
            continue
        j = i
        while j < len(data) and any(data[j:j + blk]) and j - i < 32768:
            j += blk
        out += struct.pack("<IH", i, j - i) + data[i:j]
        i = j
    return bytes(out)


def save(name, img, sector_size=512, fix_crcs=False):
    blob = encode(img, sector_size, fix_crcs)
    with open(os.path.join(CORPUS, name), "wb") as f:
        f.write(blob)
    print(f"{name}: {len(blob)} bytes")


def run(*args, **kw):
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, **kw)


def image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def patch(src, dst, offset, data):
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


MBR_SCRIPT = ("label: dos\nunit: sectors\n2048,2048,83\n4096,2048,7\n6144,,5\n"
              ",1024,83\n,1024,83\n,1024,82\n")
GPT_SGDISK = ["-n", "1:2048:+1M", "-t", "1:ef00", "-c", "1:EFI system",
              "-n", "2:0:+2M", "-t", "2:8300", "-c", "2:root \u00e9t\u00e9",
              "-n", "5:0:0", "-t", "5:8200", "-c", "5:swap"]


def loop_attach(img, sector_size):
    out = subprocess.run(["losetup", "-f", "--show", "-b", str(sector_size), img],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def main():
    os.makedirs(CORPUS, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = lambda n: os.path.join(tmp, n)  # noqa: E731
        # MBR with an extended partition and logicals 5, 6, 7 (sfdisk).
        mbr = image(t("mbr.img"), 8 * MIB)
        run("sfdisk", "-q", mbr, input=MBR_SCRIPT.encode())
        save("sfdisk-mbr-logicals", mbr)
        # The second EBR's link pointing back at the first EBR (a loop).
        with open(mbr, "rb") as f:
            f.seek(6144 * 512 + 446 + 16 + 8)
            ebr2 = 6144 + struct.unpack("<I", f.read(4))[0]
        save("sfdisk-mbr-ebr-loop", patch(mbr, t("mbr-loop.img"),
             ebr2 * 512 + 446 + 16 + 8, struct.pack("<I", 0)))
        # GPT (sgdisk), then with a damaged primary header and entries.
        gpt = image(t("gpt.img"), 8 * MIB)
        run("sgdisk", *GPT_SGDISK, gpt)
        save("sgdisk-gpt", gpt)
        save("sgdisk-gpt-bad-primary-crc", patch(gpt, t("g1.img"), 512 + 40, b"\x23"))
        save("sgdisk-gpt-bad-entries", patch(gpt, t("g2.img"), 1024 + 32, b"\x01"))
        save("sgdisk-gpt-fixcrc-bad-entry", patch(gpt, t("g3.img"), 1024 + 128 + 40,
             struct.pack("<Q", 1 << 40)), fix_crcs=True)
        save("sgdisk-gpt-fixcrc-entries-size", patch(gpt, t("g4.img"), 512 + 84,
             struct.pack("<I", 256)), fix_crcs=True)
        # nbdkit's partitioning plugin: 5 files make MBR logicals, and a GPT.
        files = []
        for i in range(1, 6):
            f = t(f"part{i}.img")
            with open(f, "wb") as fh:
                fh.truncate(4096 * i)   # contents do not matter, zeros stay small
            files.append(f)
        for kind in ("mbr", "gpt"):
            sock = t(f"nbdkit-{kind}.sock")
            proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                                     "partitioning", *files, f"partition-type={kind}"])
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(sock):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.02)
                out = t(f"nbdkit-{kind}.img")
                image(out, 0)
                run("nbdcopy", f"nbd+unix:///?socket={sock}", out)
                save(f"nbdkit-partitioning-{kind}", out)
            finally:
                proc.terminate()
                proc.wait()
        # 4096-byte sectors: the same tools on a 4K loop device (root only).
        if os.geteuid() == 0:
            for kind in ("mbr", "gpt"):
                img = image(t(f"4k-{kind}.img"), 8 * MIB)
                loop = loop_attach(img, 4096)
                try:
                    if kind == "mbr":
                        run("sfdisk", "-q", loop, input=(
                            "label: dos\nunit: sectors\n256,256,83\n512,256,7\n768,,5\n"
                            ",128,83\n,128,83\n").encode())
                    else:
                        run("sgdisk", "-n", "1:256:+1M", "-c", "1:boot", "-n", "2:0:0",
                            "-c", "2:data", loop)
                    run("blockdev", "--flushbufs", loop)
                finally:
                    run("losetup", "-d", loop)
                tool = "sfdisk" if kind == "mbr" else "sgdisk"
                save(f"{tool}-{kind}-4096", img, sector_size=4096)
        else:
            print("not root: 4096-byte sector seeds skipped", file=sys.stderr)
        # Degenerate devices.
        save("empty", image(t("empty.img"), 0))
        save("one-sector-pmbr", patch(image(t("tiny.img"), 512), t("tiny2.img"), 446,
             bytes([0, 0, 0, 0, 0xee, 0, 0, 0]) + struct.pack("<II", 1, 1) + b"\0" * 48 +
             b"\x55\xaa"))


if __name__ == "__main__":
    main()
