#!/usr/bin/env bash
# Check the artifacts of tools/build_wheels.sh as a user without Rust would meet them:
#   1. for each interpreter (python3, then CPython 3.9 and 3.13 where this machine has them):
#      a fresh venv whose PATH has no cargo and no rustc (checked), the wheel installed with
#      `pip install --only-binary=:all:` (nothing may compile), then examples/quickstart.py and
#      a smoke of the tests (test_installed, test_errors, test_state) against it;
#   2. the sdist built into a wheel by `pip wheel` (this one needs cargo: PATH as given), that
#      wheel installed in another fresh venv without cargo on PATH, and the same smoke.
#
#   bash tools/check_wheel.sh [DIST_DIR]      # default: dist/ of the checkout
#
# DIST_DIR must hold exactly one samopt wheel and one samopt sdist. Environment: PYTHON (the
# main interpreter, default python3), EXTRA_PYTHONS (default "3.9 3.13": versions also tried
# with the wheel, skipped with a message where not installed), KEEP_WORK=1 keeps the scratch
# folder. Prints each step and how long it took; exits non-zero on any failure.
set -euo pipefail
# DIST_DIR is taken relative to where the script is called from; the default, to the repo.
dist=${1:-}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
if [ -z "$dist" ]; then
    dist=dist
elif [[ "$dist" != /* ]]; then
    dist="$OLDPWD/$dist"
fi
PYTHON=${PYTHON:-python3}
EXTRA_PYTHONS=${EXTRA_PYTHONS-3.9 3.13}

log() { printf '[check_wheel] %s\n' "$*"; }
now_ms() { date +%s%3N; }
timings=()
step() {
    local what=$1 t0 t1 secs
    shift
    log "==> $what"
    t0=$(now_ms)
    "$@"
    t1=$(now_ms)
    secs=$(awk -v ms="$((t1 - t0))" 'BEGIN { printf "%.1f", ms / 1000 }')
    log "    done in ${secs} s"
    timings+=("$(printf '%7s s  %s' "$secs" "$what")")
}
total0=$(now_ms)

shopt -s nullglob
wheels=("$dist"/samopt-*.whl)
sdists=("$dist"/samopt-*.tar.gz)
shopt -u nullglob
if [ "${#wheels[@]}" -ne 1 ] || [ "${#sdists[@]}" -ne 1 ]; then
    log "expected one samopt wheel and one sdist in $dist, found: ${wheels[*]:-no wheel} ${sdists[*]:-no sdist}" >&2
    exit 1
fi
wheel=$(cd "$(dirname "${wheels[0]}")" && pwd)/$(basename "${wheels[0]}")
sdist=$(cd "$(dirname "${sdists[0]}")" && pwd)/$(basename "${sdists[0]}")
log "wheel: $wheel"
log "sdist: $sdist"

work=$(mktemp -d)
if [ "${KEEP_WORK:-0}" = 1 ]; then
    log "scratch folder (kept): $work"
else
    trap 'rm -rf "$work"' EXIT
fi

# PATH without any folder that holds cargo or rustc (~/.cargo/bin, a distro's /usr/bin, ...).
nocargo_path=""
IFS=: read -r -a path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}"; do
    [ -n "$dir" ] || continue
    if [ -e "$dir/cargo" ] || [ -e "$dir/rustc" ] || [ "$dir" = "${CARGO_HOME:-$HOME/.cargo}/bin" ]; then
        continue
    fi
    nocargo_path=${nocargo_path:+$nocargo_path:}$dir
done
# Runs a command with that PATH and none of the variables that point at a Rust toolchain.
without_rust() {
    env -u CARGO -u RUSTC -u CARGO_HOME -u RUSTUP_HOME -u RUSTUP_TOOLCHAIN -u CARGO_BUILD_TARGET \
        PATH="$nocargo_path" "$@"
}

# The executable behind an interpreter name (a pyenv shim that cannot run is no interpreter).
resolve_python() {
    local want=$1 candidate
    for candidate in $(command -v "$want" || true) \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${want#python}".*/bin/"$want"; do
        if [ -x "$candidate" ] && "$candidate" -c "" >/dev/null 2>&1; then
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

# smoke VENV_PYTHON: the quickstart and the smoke tests, from the checkout's root (where
# `samopt` resolves to the installed package: the sources live under python/).
smoke() {
    local py=$1
    (
        cd "$repo"
        # shellcheck disable=SC2016 # expanded by the inner bash, $0 being the venv's python
        without_rust bash -c '
            set -euo pipefail
            if command -v cargo || command -v rustc; then
                echo "cargo or rustc is still on PATH" >&2
                exit 1
            fi
            echo "    no cargo, no rustc on PATH (command -v finds neither)"
            "$0" -c "import shutil, sys; assert shutil.which(\"cargo\") is None and shutil.which(\"rustc\") is None; import numpy, samopt, samopt._core as c; print(\"    samopt\", samopt.__version__, \"from\", c.__file__, \"with numpy\", numpy.__version__)"
            "$0" examples/quickstart.py
            SAMOPT_EXPECT_INSTALLED=1 "$0" -m pytest -q -p no:cacheprovider \
                tests/test_installed.py tests/test_errors.py tests/test_state.py
        ' "$py"
    )
}

# install_and_smoke LABEL BASE_PYTHON WHEEL: a fresh venv, no Rust on PATH, binaries only.
install_and_smoke() {
    local label=$1 base=$2 whl=$3 venv
    venv="$work/venv-$label"
    step "[$label] fresh venv from $base" without_rust "$base" -m venv "$venv"
    step "[$label] pip install --only-binary=:all: $(basename "$whl") pytest hypothesis (no cargo on PATH)" \
        without_rust "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --only-binary=:all: "$whl" pytest hypothesis
    step "[$label] quickstart + smoke tests (no cargo on PATH)" smoke "$venv/bin/python"
}

main_python=$(resolve_python "$PYTHON") || {
    log "$PYTHON: no such interpreter" >&2
    exit 1
}
log "without Rust, PATH is: $nocargo_path"
if without_rust bash -c 'command -v cargo || command -v rustc' >/dev/null; then
    log "could not take cargo/rustc off PATH" >&2
    exit 1
fi

tried=()
install_and_smoke "wheel-py$("$main_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    "$main_python" "$wheel"
tried+=("wheel on $("$main_python" -V)")
for version in $EXTRA_PYTHONS; do
    if extra=$(resolve_python "python$version"); then
        install_and_smoke "wheel-py$version" "$extra" "$wheel"
        tried+=("wheel on $("$extra" -V)")
    else
        log "python$version is not installed here: the wheel is not tried on it"
        tried+=("python$version: not installed, skipped")
    fi
done

# The sdist: pip builds it (maturin from PyPI in an isolated build env, cargo from PATH).
build_sdist() {
    local venv="$work/venv-sdist-build" log_file="$work/pip-wheel-sdist.log"
    "$main_python" -m venv "$venv"
    if ! "$venv/bin/python" -m pip wheel --verbose --no-deps --disable-pip-version-check \
        --wheel-dir "$work/from-sdist" "$sdist" >"$log_file" 2>&1; then
        tail -n 60 "$log_file" >&2
        log "pip wheel of the sdist failed (log above)" >&2
        return 1
    fi
    grep -E 'Finished .release|Built wheel' "$log_file" | sed 's/^/    | /' || true
}
if ! command -v cargo >/dev/null 2>&1; then
    log "building the sdist needs cargo on PATH, and there is none" >&2
    exit 1
fi
step "pip wheel of the sdist (compiles the Rust extension: cargo $(cargo --version | cut -d' ' -f2))" build_sdist
shopt -s nullglob
built=("$work"/from-sdist/samopt-*.whl)
shopt -u nullglob
if [ "${#built[@]}" -ne 1 ]; then
    log "pip wheel of the sdist made no single samopt wheel: ${built[*]:-none}" >&2
    exit 1
fi
log "the sdist built $(basename "${built[0]}")"
install_and_smoke "sdist-wheel" "$main_python" "${built[0]}"
tried+=("sdist -> $(basename "${built[0]}") on $("$main_python" -V)")

total1=$(now_ms)
log "checked:"
printf '    %s\n' "${tried[@]}"
log "timings:"
printf '    %s\n' "${timings[@]}"
log "all checks passed in $(awk -v ms="$((total1 - total0))" 'BEGIN { printf "%.1f", ms / 1000 }') s"
