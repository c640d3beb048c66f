#!/usr/bin/env bash
# Installs the Debian packages nbdfs needs to build, test, benchmark and run
# its demo.  Does nothing when they are all present; needs root otherwise.
# python3-docutils: rst2man for the man page; man-db: the test that renders it
# (man -l); bash-completion: its pkg-config file says where the completion goes;
# clang-format: the format check (contrib/format.sh).
set -euo pipefail

pkgs=(
	build-essential meson ninja-build pkg-config
	libfuse3-dev fuse3 libglib2.0-dev libgnutls28-dev gnutls-bin
	clang libclang-rt-14-dev clang-format
	nbdkit libnbd-bin qemu-utils nbd-server
	python3 python3-pytest fio attr util-linux
	e2fsprogs xfsprogs dosfstools mtools fdisk gdisk
	python3-docutils man-db bash-completion
)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing Debian packages (run as root): ${missing[*]}" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
