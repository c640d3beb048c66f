#!/usr/bin/env bash
# The whole nbdfs test suite, as CI runs it (README.md: "Test").
#
#  1. installs the Debian packages it needs (contrib/install-deps.sh) and
#     checks that the C sources match .clang-format (contrib/format.sh);
#  2. builds with -Dwerror=true and runs every test: GLib unit tests, the
#     fake-server tests and the pytest suite (real servers, FUSE mounts, loop
#     devices, real filesystems);
#  3. builds again with ASan+UBSan and runs the whole suite again;
#  4. builds the libFuzzer targets with clang and runs each for a fixed
#     number of runs over its seed corpus;
#  5. runs the benchmark in smoke mode (no assertions on speed).
# Exits non-zero when anything fails.  Build trees go to build/ci-*.
set -uo pipefail
cd "$(dirname "$0")/.."
top=$PWD

contrib/install-deps.sh || exit 1

failed=()
step() {
	echo
	echo "==== $* ===="
}
run() {
	local name=$1
	shift
	if ! "$@"; then
		failed+=("$name")
		echo "FAILED: $name"
	fi
}

# Counts of meson tests passed/failed across every build, for the last line.
passed_total=0
failed_total=0
count_results() {
	local log=$1/meson-logs/testlog.json
	[ -f "$log" ] || return 0
	local p f
	p=$(grep -c '"result": "OK"' "$log" || true)
	f=$(grep -c -E '"result": "(FAIL|TIMEOUT|ERROR|UNEXPECTEDPASS)"' "$log" || true)
	passed_total=$((passed_total + p))
	failed_total=$((failed_total + f))
}

suite() {
	local dir=$1
	shift
	step "build $dir ($*)"
	rm -rf "$dir"
	if ! meson setup "$dir" "$@" >"$dir.setup.log" 2>&1; then
		cat "$dir.setup.log"
		failed+=("setup $dir")
		return
	fi
	run "build $dir" ninja -C "$dir"
	step "unit tests ($dir)"
	run "unit tests $dir" meson test -C "$dir" --print-errorlogs --no-suite pytest-suite \
		--num-processes 2
	count_results "$dir"
	step "pytest suite ($dir)"
	# Streamed (-v) so the pytest summary shows in the CI log.
	run "pytest $dir" meson test -C "$dir" --suite pytest-suite -v --no-rebuild
	count_results "$dir"
}

step "format check (contrib/format.sh --check)"
run "format check" contrib/format.sh --check

mkdir -p build
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0

suite build/ci-werror -Dwerror=true
suite build/ci-asan -Dwerror=true -Db_sanitize=address,undefined -Db_lundef=false

step "fuzzers (clang libFuzzer, fixed run counts)"
rm -rf build/ci-fuzz
if CC=clang meson setup build/ci-fuzz -Dfuzzing=true -Dtests=false \
	-Db_sanitize=address,undefined -Db_lundef=false >build/ci-fuzz.setup.log 2>&1 &&
	ninja -C build/ci-fuzz >build/ci-fuzz.build.log 2>&1; then
	run "fuzzers" meson test -C build/ci-fuzz --suite fuzz --print-errorlogs --no-rebuild
	grep -h -E "^(Done [0-9]+ runs|stat::number_of_executed_units|#[0-9]+[[:space:]]+DONE)" \
		build/ci-fuzz/meson-logs/testlog.txt || true
	count_results build/ci-fuzz
else
	cat build/ci-fuzz.setup.log build/ci-fuzz.build.log 2>/dev/null | tail -40
	failed+=("fuzz build")
fi

step "benchmark smoke run"
if [ -f contrib/bench/bench.py ]; then
	run "bench smoke" /usr/bin/python3 contrib/bench/bench.py --quick --build build/ci-werror
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
	echo "failed steps: ${failed[*]}"
fi
echo "tests: $passed_total passed, $failed_total failed"
[ ${#failed[@]} -eq 0 ] && [ "$failed_total" -eq 0 ]
