#!/bin/sh
# Run every check of the project, from a fresh checkout:
#   sh tests/run.sh
# It makes .venv if there is none, installs the project (editable) with its
# test tools, runs the trial suite under branch coverage, then the gates:
# coverage of tlsproxy/ at 100%, mypy --strict, ruff.  The last line counts
# trial's tests plus the three gates: "N passed, N failed".
set -u
cd "$(dirname "$0")/.." || exit 1
[ -x .venv/bin/python ] || python3 -m venv .venv || exit 1
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]' || exit 1

log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/coverage erase
[ $# -gt 0 ] || set -- tests
.venv/bin/coverage run -m twisted.trial "$@" 2>&1 | tee "$log"

# trial ends with e.g. "FAILED (skips=3, failures=1, successes=90)".
summary=$(grep -E '^(PASSED|FAILED) \(' "$log" | tail -n 1)
count() {  # count NAME: trial's count of NAME, 0 when it names none
    n=$(echo "$summary" | sed -n "s/.*[(, ]$1=\([0-9]*\).*/\1/p")
    echo "${n:-0}"
}
passed=$(count successes)
failed=$(( $(count failures) + $(count errors) + $(count unexpectedSuccesses) ))
skipped=$(( $(count skips) + $(count expectedFailures) ))
if [ -z "$summary" ]; then
    echo "trial printed no summary"
    failed=$(( failed + 1 ))
fi

gate() {  # gate NAME COMMAND...: one more check, counted like a test
    name=$1; shift
    if "$@"; then
        passed=$(( passed + 1 ))
    else
        echo "gate failed: $name"
        failed=$(( failed + 1 ))
    fi
}
gate "branch coverage of tlsproxy/ is 100%" .venv/bin/coverage report
gate "mypy --strict" .venv/bin/mypy
gate "ruff check" .venv/bin/ruff check .
gate "ruff format" .venv/bin/ruff format --check .

echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
