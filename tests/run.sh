#!/bin/sh
# Run every check of the project, from a fresh checkout:
#   sh tests/run.sh
# It makes .venv if there is none, installs the project (editable) with its
# test tools, runs the trial suite under branch coverage, then the gates:
# coverage of tlsproxy/ at 100%, mypy --strict, ruff check and format, the
# in-memory tests again in .venv-floors, on the oldest versions that
# setup.cfg allows (tests/floors.py), and the proxy's size (tests/size.py).  The last line counts trial's tests
# plus the six gates: "N passed, N failed, N skipped".
set -u
cd "$(dirname "$0")/.." || exit 1
[ -x .venv/bin/python ] || python3 -m venv .venv || exit 1
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]' || exit 1

log=$(mktemp)
trap 'rm -f "$log" "$log.pins" "$log.floors"' EXIT
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

floors() {  # the in-memory tests on the oldest versions setup.cfg names
    .venv/bin/python tests/floors.py >"$log.pins" || return 1
    [ -x .venv-floors/bin/python ] || python3 -m venv .venv-floors || return 1
    .venv-floors/bin/python -m pip install -q -c "$log.pins" -e . trustme \
        hypothesis >"$log.floors" 2>&1 || { tail -n 20 "$log.floors"; return 1; }
    .venv-floors/bin/python -m twisted.trial tests.test_tls tests.test_sni \
        tests.test_relay tests.test_flow tests.test_service tests.test_backend \
        tests.test_metrics tests.test_record >"$log.floors" 2>&1 ||
        { tail -n 40 "$log.floors"; return 1; }
}
gate "the oldest versions setup.cfg allows" floors

gate "the proxy's size within its budget (tests/size.py)" .venv/bin/python tests/size.py

echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
