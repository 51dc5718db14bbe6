#!/usr/bin/env bash
# Run Easel's tests: bash scripts/run_tests.sh [pytest arguments]   (default: all of tests/)
#
# Makes sure ./venv exists and is installed with the test tools (the same installer as
# launch.sh), then runs pytest in it. Browser tests (marker `browser`) need Debian's chromium,
# which this script does not install (.ci/run does: apt-get install chromium).

here=${BASH_SOURCE[0]}
[[ $here == */* ]] && here=${here%/*} || here=.
# shellcheck source=../launch.sh
source "$here/../launch.sh"
easel_enter_root
easel_ensure_venv --test
if (( $# == 0 )); then
    set -- tests
fi
exec venv/bin/python -m pytest "$@"
