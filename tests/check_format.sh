#!/usr/bin/env bash
# Every C++ file git tracks is clang-format clean (.clang-format at the root).
# usage: check_format.sh SOURCE_ROOT
set -euo pipefail
cd "$1"
command -v clang-format >/dev/null || { echo "clang-format not installed (./run setup installs it)"; exit 1; }
mapfile -t files < <(git ls-files '*.cpp' '*.hpp' '*.h' 2>/dev/null || find . -name '*.[ch]pp' -not -path './build*')
[ ${#files[@]} -gt 0 ] || { echo "no C++ files found"; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! clang-format --dry-run --Werror "${files[@]}" 2>"$log"; then
    { grep -E '(warning|error):' "$log" || true; } | cut -d: -f1 | sort | uniq -c
    echo "not clang-format clean: run clang-format -i on the files above"
    exit 1
fi
echo "clang-format: ${#files[@]} files clean"
