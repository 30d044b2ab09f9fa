#!/usr/bin/env bash
# Set everything up and run the test suite.
#
#   bash tests/run.sh [pytest arguments...]
#
# Meant for a fresh Debian machine with python3 and pip, run as root from
# anywhere in the repository. In order, it:
#   1. installs missing apt packages (git; chromium and chromium-driver for the
#      receipts page tests), running `apt-get update` at most once;
#   2. installs the project and its test extras (`pip install -e '.[test]'`);
#   3. builds dist/spell_runner.pyz (build_zipapp.py);
#   4. makes sure a docker engine answers, starting a private one if needed
#      (tests/support/docker-engine.sh), and exports DOCKER_HOST;
#   5. builds the runner image from the zipapp (tests/support/images.py) and
#      exports SPELL_TEST_RUNNER_IMAGE;
#   6. runs pytest with coverage of spell and spell_runner.
# A docker engine it started is stopped again on exit. The exit status is
# pytest's, except that "no tests collected" (5) counts as a failure.
#
# With CI=true, docker and chromium are mandatory: if either cannot be set up
# the run fails here. Elsewhere it warns and the tests that need them skip.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

STRICT=0
[[ "${CI:-}" == "true" ]] && STRICT=1
export DEBIAN_FRONTEND=noninteractive

say() { printf '\n== %s\n' "$*" >&2; }
warn() { printf 'tests/run.sh: warning: %s\n' "$*" >&2; }
die() { printf 'tests/run.sh: error: %s\n' "$*" >&2; exit 1; }

# A missing optional piece is fatal under CI and a warning elsewhere.
need() {
    if (( STRICT )); then die "$* (CI=true: required)"; fi
    warn "$*; tests that need it will be skipped"
}

APT_UPDATED=0
apt_install() {  # apt_install PACKAGE...: install, updating the lists once
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        return 1
    fi
    if (( ! APT_UPDATED )); then
        apt-get update -qq >/dev/null || return 1
        APT_UPDATED=1
    fi
    apt-get install -y -qq -o Dpkg::Use-Pty=0 "$@" >/tmp/spell-apt.log 2>&1 \
        || { tail -20 /tmp/spell-apt.log >&2; return 1; }
}

started=$SECONDS

# 1. System packages ##########################################################
say "system packages"
if ! command -v git >/dev/null 2>&1; then
    apt_install git || die "git is missing and could not be installed"
fi
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "installing chromium and chromium-driver" >&2
    apt_install chromium chromium-driver \
        || need "chromium could not be installed"
fi
if [[ -x /usr/bin/chromium ]]; then
    export SPELL_TEST_CHROMIUM=/usr/bin/chromium
    /usr/bin/chromium --version 2>/dev/null >&2 || true
fi

# 2. Python packages ##########################################################
say "python packages"
python3 -m pip install -q --disable-pip-version-check \
    --root-user-action=ignore -e '.[test]'
# wheel lets test_zipapp build and install the package without isolation
# (no network access to a build backend); it is a test-time tool only.
python3 -m pip install -q --disable-pip-version-check \
    --root-user-action=ignore wheel

# 3. The runner zipapp ########################################################
say "dist/spell_runner.pyz"
if [[ -f build_zipapp.py ]]; then
    python3 build_zipapp.py
else
    need "build_zipapp.py is missing"
fi

# 4. Docker engine ############################################################
say "docker engine"
ENGINE=tests/support/docker-engine.sh
engine_started=0
stop_engine() {
    if (( engine_started )); then
        bash "$ROOT/$ENGINE" stop || true
    fi
}
trap stop_engine EXIT

if line=$(bash "$ENGINE" env 2>/dev/null); then
    export "${line?}"
    echo "using the running engine: $line" >&2
elif line=$(bash "$ENGINE" start); then
    engine_started=1
    export "${line?}"
    echo "started a private engine: $line" >&2
else
    need "no docker engine could be started"
fi

# 5. Runner image #############################################################
if [[ -n "${DOCKER_HOST:-}" && -f dist/spell_runner.pyz ]]; then
    say "runner image"
    if tag=$(python3 tests/support/images.py --pyz dist/spell_runner.pyz); then
        export SPELL_TEST_RUNNER_IMAGE=$tag
        echo "SPELL_TEST_RUNNER_IMAGE=$tag" >&2
    else
        need "the runner image could not be built"
    fi
elif [[ -n "${DOCKER_HOST:-}" ]]; then
    need "dist/spell_runner.pyz is missing, so there is no runner image"
fi

echo "setup took $(( SECONDS - started ))s" >&2

# 6. Tests ####################################################################
say "pytest"
status=0
python3 -m pytest -q --cov=spell --cov=spell_runner --cov-report=term "$@" \
    || status=$?
if (( status == 5 )); then
    echo "tests/run.sh: pytest collected no tests" >&2
    status=1
fi
exit "$status"
