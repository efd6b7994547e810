#!/bin/sh
# Run every check of the project, from a fresh checkout:
#   sh tests/run.sh
# It makes .venv if there is none, installs the project (editable) with its
# test tools, runs the trial suite under branch coverage, then the gates:
# coverage of tlsproxy/ at 100%, mypy --strict, ruff check and format, the
# in-memory tests again in .venv-floors, on the oldest versions that
# setup.cfg allows (tests/floors.py), the proxy's size (tests/size.py), the
# docs (HTML and man pages, sphinx-build -W) and each man page rendered by
# groff without a warning.  The last line counts trial's tests plus the
# eight gates: "N passed, N failed, N skipped".
set -u
cd "$(dirname "$0")/.." || exit 1
[ -x .venv/bin/python ] || python3 -m venv .venv || exit 1
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]' || exit 1

log=$(mktemp)
trap 'rm -f "$log" "$log.pins" "$log.floors" "$log.man" "$log.said"' EXIT
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

docs() {  # the HTML (with pydoctor's API reference) and the man pages, anew
    rm -rf docs/_build
    .venv/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html &&
        .venv/bin/sphinx-build -q -W --keep-going -b man docs docs/_build/man
}
gate "the docs build without a warning (sphinx-build -W, html and man)" docs

man_pages() {  # each man page, as man would show it, without a warning
    set -- docs/_build/man/man*/*
    [ -f "$1" ] || { echo "no man page in docs/_build/man"; return 1; }
    for page; do
        groff -t -man -Tutf8 -ww "$page" >"$log.man" 2>"$log.said" &&
            [ -s "$log.man" ] && [ ! -s "$log.said" ] ||
            { echo "$page:"; cat "$log.said"; return 1; }
    done
}
gate "each man page renders (groff -ww)" man_pages

echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
