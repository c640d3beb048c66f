#!/usr/bin/python3
"""Regenerates the seed corpus of fuzz-part (test/fuzz/part/corpus/) from
partition tables written by real tools: sfdisk, sgdisk, nbdkit's
partitioning plugin, and (as root, on a 4096-byte-sector loop device) sfdisk
and sgdisk again; plus a few damaged copies.  Run by hand:
    sudo /usr/bin/python3 test/fuzz/part/make_corpus.py

Each seed is in harness.h's compact format: only the non-zero 512-byte
blocks of the image are stored.  The disks are small (256 KiB, the harness's
cap, so that every run is fast), with tables that fit them.
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


def encode(img, sector_size=512, fix_crcs=False):
    with open(img, "rb") as f:
        data = f.read()
    assert len(data) <= 256 * 1024, img
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


SIZE = 256 * 1024
MBR_SCRIPT = ("label: dos\nunit: sectors\nstart=8, size=64, type=83\n"
              "start=72, size=64, type=7\nstart=136, type=5\nstart=140, size=60, type=83\n"
              "start=210, size=60, type=83\nstart=280, size=60, type=82\n")
MBR_EXT_START = 136
GPT_SGDISK = ["-a", "8", "-n", "1:40:+32K", "-t", "1:ef00", "-c", "1:EFI system",
              "-n", "2:0:+64K", "-t", "2:8300", "-c", "2:root \u00e9t\u00e9",
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
        mbr = image(t("mbr.img"), SIZE)
        run("sfdisk", "-q", mbr, input=MBR_SCRIPT.encode())
        save("sfdisk-mbr-logicals", mbr)
        # The second EBR's link pointing back at the first EBR (a loop).
        with open(mbr, "rb") as f:
            f.seek(MBR_EXT_START * 512 + 446 + 16 + 8)
            ebr2 = MBR_EXT_START + struct.unpack("<I", f.read(4))[0]
        save("sfdisk-mbr-ebr-loop", patch(mbr, t("mbr-loop.img"),
             ebr2 * 512 + 446 + 16 + 8, struct.pack("<I", 0)))
        # GPT (sgdisk), then with a damaged primary header and entries.
        gpt = image(t("gpt.img"), SIZE)
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
                                     "partitioning", "alignment=4096", *files,
                                     f"partition-type={kind}"])
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
                img = image(t(f"4k-{kind}.img"), SIZE)
                loop = loop_attach(img, 4096)
                try:
                    if kind == "mbr":
                        run("sfdisk", "-q", loop, input=(
                            "label: dos\nunit: sectors\nstart=8, size=8, type=83\n"
                            "start=16, size=8, type=7\nstart=24, type=5\n"
                            "start=26, size=8, type=83\nstart=36, size=8, type=83\n").encode())
                    else:
                        run("sgdisk", "-a", "1", "-n", "1:6:+32K", "-c", "1:boot",
                            "-n", "2:0:0", "-c", "2:data", loop)
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
