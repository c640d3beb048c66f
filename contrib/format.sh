#!/usr/bin/env bash
# The house formatting (.clang-format) over every C file of src/, include/,
# the C tests and contrib/.
#
#   contrib/format.sh          rewrites the files in place
#   contrib/format.sh --check  changes nothing; lists each file that differs
#                              from the format (with the diff) and exits 1
#
# Code the formatter must not touch (a macro that stringifies its argument)
# sits between /* clang-format off */ and /* clang-format on */.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v clang-format >/dev/null || {
	echo "format: clang-format is not installed (contrib/install-deps.sh)" >&2
	exit 2
}
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- 'src/*.[ch]' 'include/*.h' 'test/*.[ch]' 'contrib/*.[ch]')

if [ "${1:-}" != --check ]; then
	clang-format -i --style=file "${files[@]}"
	exit 0
fi
bad=0
for f in "${files[@]}"; do
	if ! clang-format --style=file "$f" | diff -u --label "$f" --label "$f (formatted)" "$f" -; then
		bad=$((bad + 1))
	fi
done
if [ "$bad" -gt 0 ]; then
	echo "format: $bad file(s) differ from .clang-format; run contrib/format.sh" >&2
	exit 1
fi
echo "format: ${#files[@]} files match .clang-format"
