#!/usr/bin/env bash
# Start Easel: ./launch.sh [arguments for app.py]
#
# Needs only Python 3.10+ on the machine. The first run creates ./venv and installs Easel into it
# (several minutes); later runs reuse it, and scripts/install.py reinstalls only when
# pyproject.toml or constraints.txt changed. All install logic lives in scripts/install.py so
# that launch.bat shares it. scripts/run_tests.sh sources this file for its functions.
#
# Until Python is found only bash builtins are used, so the "no Python" message shows even on a
# machine with a bare PATH.

easel_fail() {
    printf '\nEasel cannot start: %s\n' "$*" >&2
    exit 1
}

# cd into the folder holding this file, wherever it is run from.
easel_enter_root() {
    local here=${BASH_SOURCE[0]}
    if [[ $here == */* ]]; then
        cd "${here%/*}" || easel_fail "cannot enter the folder ${here%/*}."
    fi
}

# Sets EASEL_PYTHON to the first Python 3.10+ on PATH.
easel_find_python() {
    local candidate version newest=""
    for candidate in python3 python python3.14 python3.13 python3.12 python3.11 python3.10; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        # A stub that is not a working Python (macOS asks to install developer tools) prints nothing.
        version=$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
        [[ $version =~ ^([0-9]+)\.([0-9]+)$ ]] || continue
        if (( BASH_REMATCH[1] > 3 || (BASH_REMATCH[1] == 3 && BASH_REMATCH[2] >= 10) )); then
            EASEL_PYTHON=$candidate
            return 0
        fi
        [[ -n $newest ]] || newest="$version ($candidate)"
    done
    if [[ -n $newest ]]; then
        easel_fail "Easel needs Python 3.10 or newer, but the Python found here is $newest.
Install Python 3.10 or newer (https://www.python.org/downloads/ or your system's package manager), then run ./launch.sh again."
    fi
    easel_fail "Easel needs Python 3.10 or newer, and no Python was found.
Install it (https://www.python.org/downloads/ or your system's package manager), then run ./launch.sh again."
}

# Creates ./venv on first use and installs Easel into it; arguments go to scripts/install.py.
easel_ensure_venv() {
    # pyvenv.cfg marks an existing venv: one whose Python stopped working is reported rather
    # than rebuilt over, as its packages were installed for that Python.
    if [[ ! -e venv/pyvenv.cfg ]]; then
        easel_find_python
        echo "First run: creating a Python environment in $PWD/venv ..."
        if ! "$EASEL_PYTHON" -m venv venv; then
            rm -rf venv
            easel_fail "Python could not create its environment (see above).
On Debian or Ubuntu, install the python3-venv package (sudo apt install python3-venv), then run ./launch.sh again."
        fi
    elif ! venv/bin/python -c '' 2>/dev/null; then
        easel_fail "the Python environment in $PWD/venv no longer works (was Python updated or removed?).
Delete the venv folder and run ./launch.sh again: it will be set up anew."
    fi
    venv/bin/python scripts/install.py "$@" || easel_fail "the installation did not finish (see the messages above)."
}

easel_main() {
    easel_enter_root
    easel_ensure_venv
    exec venv/bin/python app.py "$@"
}

# Run only when executed, not when sourced by scripts/run_tests.sh.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    easel_main "$@"
fi
