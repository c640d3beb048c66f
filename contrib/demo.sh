#!/usr/bin/env bash
# The nbdfs demo (README.md: "Try it"): builds nbdfs, starts nbdkit with a
# partitioned disk (an ext4 and a vfat partition made here), mounts it with
# -P, loop-mounts the ext4 partition and lists it, reads the vfat partition
# with mtools, writes through the loop mount, and cleans everything up on
# exit (also on Ctrl-C or failure).  Needs root for losetup and mount.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

contrib/install-deps.sh
if [ ! -x build/demo/src/nbdfs ]; then
	meson setup build/demo >/dev/null
fi
ninja -C build/demo >/dev/null
nbdfs=$top/build/demo/src/nbdfs

work=$(mktemp -d /tmp/nbdfs-demo.XXXXXX)
nbdkit_pid= loop= fsmnt= mnt=
cleanup() {
	set +e
	[ -n "$fsmnt" ] && mountpoint -q "$fsmnt" && umount "$fsmnt"
	[ -n "$loop" ] && losetup -d "$loop"
	[ -n "$mnt" ] && mountpoint -q "$mnt" && { fusermount3 -u "$mnt" || fusermount3 -uz "$mnt"; }
	[ -n "$nbdkit_pid" ] && kill "$nbdkit_pid" 2>/dev/null && wait "$nbdkit_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# Two filesystem images, filled without mounting anything.
mkdir -p "$work/content"
echo "hello from an ext4 partition served over NBD" >"$work/content/hello.txt"
seq 1 1000 >"$work/content/numbers.txt"
truncate -s 64M "$work/ext4.img"
mkfs.ext4 -q -F -L demo-ext4 -d "$work/content" "$work/ext4.img"
truncate -s 32M "$work/vfat.img"
mkfs.vfat -n DEMOFAT "$work/vfat.img" >/dev/null
echo "hello from a vfat partition" >"$work/readme.txt"
mcopy -i "$work/vfat.img" "$work/readme.txt" ::README.TXT

# nbdkit builds an MBR disk from them (writes go to the image files).
sock=$work/nbd.sock
nbdkit -f --exit-with-parent -U "$sock" partitioning \
	"$work/ext4.img" "$work/vfat.img" partition-type=mbr &
nbdkit_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done

mnt=$work/mnt fsmnt=$work/ext4
mkdir -p "$mnt" "$fsmnt"
say "nbdfs -P nbd+unix:///?socket=$sock $mnt"
"$nbdfs" -P "nbd+unix:///?socket=$sock" "$mnt"
say "ls -l $mnt"
ls -l "$mnt"
say "getfattr -d $mnt/disk-part1"
getfattr -d "$mnt/disk-part1"

say "losetup -f --show --direct-io=on $mnt/disk-part1"
loop=$(losetup -f --show --direct-io=on "$mnt/disk-part1")
echo "$loop"
say "mount $loop $fsmnt && ls -l $fsmnt"
mount "$loop" "$fsmnt"
ls -l "$fsmnt"
say "cat $fsmnt/hello.txt"
cat "$fsmnt/hello.txt"
say "echo written-through-nbdfs > $fsmnt/new.txt"
echo written-through-nbdfs >"$fsmnt/new.txt"
umount "$fsmnt"
losetup -d "$loop"
loop=
say "debugfs -R 'cat /new.txt' $mnt/disk-part1"
debugfs -R 'cat /new.txt' "$mnt/disk-part1" 2>/dev/null

say "mdir -i $mnt/disk-part2 ::   (vfat, read with mtools)"
mdir -i "$mnt/disk-part2" ::
say "mtype -i $mnt/disk-part2 ::README.TXT"
mtype -i "$mnt/disk-part2" ::README.TXT

say "fusermount3 -u $mnt"
fusermount3 -u "$mnt"
mnt=
echo
echo "demo finished: everything unmounted, detached and stopped."
