#!/usr/bin/env bash
# Build samopt's release artifacts on x86_64 Linux, from a clean checkout:
#   * the abi3 wheel (CPython >= 3.9) tagged manylinux2014 / manylinux_2_17 (glibc 2.17), so it
#     installs on Ubuntu 18.04+, RHEL/CentOS 7+ and HPC clusters, not only on the glibc of the
#     build machine. The host's gcc/glibc (2.36 here) would tag it manylinux_2_34; maturin's
#     `--zig` links against glibc 2.17 with zig (the `ziglang` package from PyPI) instead, so
#     no manylinux container is needed;
#   * the sdist (`maturin sdist`);
# then checks them: `auditwheel show` must find the wheel consistent with manylinux_2_17 (or
# older), `twine check --strict` must pass on both, every classifier must be a valid,
# non-deprecated trove classifier, both must carry LICENSE, and the long description is
# rendered as PyPI renders it (relative links and images, broken there, are warned about).
#
#   bash tools/build_wheels.sh [OUT_DIR]      # default: dist/ of the checkout
#
# Needs: cargo/rustc (Cargo.toml's rust-version or newer) and python3 >= 3.9 with pip. The
# build tools are pip-installed into the active virtual environment; with none active, into
# a fresh one made for this run. Environment: MATURIN_SPEC, ZIGLANG_SPEC (pip requirement
# strings for the pinned, tested versions). Prints each step and how long it took; exits
# non-zero on any failure.
set -euo pipefail
# OUT_DIR is taken relative to where the script is called from; the default, to the repo.
out=${1:-}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "$out" ]; then
    out=dist
elif [[ "$out" != /* ]]; then
    out="$OLDPWD/$out"
fi
MATURIN_SPEC=${MATURIN_SPEC:-maturin==1.16.0}
ZIGLANG_SPEC=${ZIGLANG_SPEC:-ziglang==0.17.1}

log() { printf '[build_wheels] %s\n' "$*"; }
now_ms() { date +%s%3N; }
timings=()
step() {
    # step "what it does" command args...: runs the command, prints how long it took.
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

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    log "this script builds the x86_64 Linux wheel; this is $(uname -s)-$(uname -m)" >&2
    log "(the other platforms are built by .github/workflows/release.yml)" >&2
    exit 1
fi
for tool in cargo rustc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool is not on PATH: building the wheel needs a Rust toolchain (rustup)" >&2
        exit 1
    fi
done

if [ -z "${VIRTUAL_ENV:-}" ]; then
    venv_parent=$(mktemp -d)
    trap 'rm -rf "$venv_parent"' EXIT
    venv="$venv_parent/build-venv"
    step "no virtual environment active: making a temporary one at $venv" python3 -m venv "$venv"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
fi
log "python: $(command -v python) ($(python -c 'import sys; print(sys.version.split()[0])'))"
log "rust:   $(rustc --version); $(cargo --version)"
log "out:    $out"

step "pip install the build and check tools ($MATURIN_SPEC, $ZIGLANG_SPEC, auditwheel, twine, trove-classifiers, readme-renderer[md])" \
    python -m pip install --quiet --disable-pip-version-check --upgrade \
    "$MATURIN_SPEC" "$ZIGLANG_SPEC" auditwheel twine trove-classifiers "readme-renderer[md]"
log "tools:  $(python -m maturin --version), zig $(python -m ziglang version), $(python -c '
from importlib.metadata import PackageNotFoundError, version
found = []
for name in ("auditwheel", "twine", "trove-classifiers", "readme-renderer", "comrak", "cmarkgfm"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print(", ".join(found))')"

mkdir -p "$out"
mapfile -t stale < <(find "$out" -maxdepth 1 \( -name 'samopt-*.whl' -o -name 'samopt-*.tar.gz' \) -print)
if [ "${#stale[@]}" -gt 0 ]; then
    log "removing earlier samopt artifacts from $out:"
    printf '    %s\n' "${stale[@]}"
    rm -f "${stale[@]}"
fi

# --compatibility manylinux2014 pypi: tag manylinux2014 (glibc 2.17) and refuse any tag PyPI
# would not accept; --zig: link with zig against glibc 2.17; --locked: Cargo.lock as committed.
step "maturin build --release --locked --zig --compatibility manylinux2014 pypi (the abi3 wheel; ~1 min on 2 cores)" \
    python -m maturin build --release --locked --zig --compatibility manylinux2014 pypi --out "$out"
step "maturin sdist" python -m maturin sdist --out "$out"

shopt -s nullglob
wheels=("$out"/samopt-*.whl)
sdists=("$out"/samopt-*.tar.gz)
shopt -u nullglob
if [ "${#wheels[@]}" -ne 1 ] || [ "${#sdists[@]}" -ne 1 ]; then
    log "expected one wheel and one sdist in $out, found: ${wheels[*]:-no wheel} ${sdists[*]:-no sdist}" >&2
    exit 1
fi
wheel=${wheels[0]}
sdist=${sdists[0]}
case "$(basename "$wheel")" in
    *-cp39-abi3-*manylinux_2_17_x86_64*.whl) ;;
    *)
        log "unexpected wheel tags: $(basename "$wheel") (want cp39-abi3 ... manylinux_2_17_x86_64)" >&2
        exit 1
        ;;
esac

audit_wheel() {
    local report tag
    report=$(python -m auditwheel show "$wheel")
    printf '%s\n' "$report" | sed 's/^/    | /'
    # auditwheel wraps its lines: read the tag from the text with newlines made spaces.
    tag=$(printf '%s\n' "$report" | tr '\n' ' ' |
        sed -n 's/.*is consistent with the following platform tag: *"\([^"]*\)".*/\1/p')
    if [[ ! "$tag" =~ ^manylinux_2_([0-9]+)_x86_64$ ]] || [ "${BASH_REMATCH[1]}" -gt 17 ]; then
        log "auditwheel: the wheel is consistent with '${tag:-no manylinux tag}', not manylinux_2_17 (manylinux2014) or older" >&2
        return 1
    fi
    log "auditwheel: consistent with $tag: the wheel installs on glibc >= 2.${BASH_REMATCH[1]}"
}
step "auditwheel show (must be manylinux_2_17 or older)" audit_wheel

step "twine check --strict (wheel and sdist)" python -m twine --no-color check --strict "$wheel" "$sdist"

check_metadata() {
    python - "$wheel" "$sdist" <<'EOF'
import email.parser
import sys
import tarfile
import zipfile

from trove_classifiers import classifiers, deprecated_classifiers

wheel_path, sdist_path = sys.argv[1:]
failures = []
with zipfile.ZipFile(wheel_path) as wheel:
    names = wheel.namelist()
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    if not any(n.split("/")[-1].startswith("LICENSE") for n in names if ".dist-info/" in n):
        failures.append(f"{wheel_path}: no LICENSE in .dist-info")
with tarfile.open(sdist_path) as sdist:
    names = sdist.getnames()
    if not any(n.count("/") == 1 and n.endswith("/LICENSE") for n in names):
        failures.append(f"{sdist_path}: no LICENSE at the top")
    pkg_info = sdist.extractfile(next(n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO")))
    assert pkg_info is not None
    sdist_metadata = pkg_info.read()
for path, raw in ((wheel_path, metadata), (sdist_path, sdist_metadata)):
    msg = email.parser.BytesParser().parsebytes(raw)
    found = msg.get_all("Classifier") or []
    for c in found:
        if c in deprecated_classifiers:
            failures.append(f"{path}: deprecated classifier {c!r}")
        elif c not in classifiers:
            failures.append(f"{path}: unknown classifier {c!r}")
    urls = msg.get_all("Project-URL") or []
    print(f"    {path.split('/')[-1]}: Metadata-Version {msg['Metadata-Version']}, "
          f"License {msg['License']!r}, {len(found)} classifiers, {len(urls)} project URLs, "
          f"Requires-Python {msg['Requires-Python']}")
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
EOF
}
step "metadata: trove classifiers valid, LICENSE shipped in both" check_metadata

# twine check does not render Markdown ("rendering cannot fail" for text/markdown): render
# the long description with readme-renderer[md], PyPI's renderer, and point out links and
# images that are relative: on PyPI they resolve against pypi.org and break. A warning only:
# the README serves the repository too.
check_readme() {
    python - "$wheel" <<'EOF'
import email.parser
import re
import sys
import zipfile

import readme_renderer.markdown

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    msg = email.parser.BytesParser().parsebytes(wheel.read(name))
content_type = msg["Description-Content-Type"]
body = msg.get_payload()
if not content_type or not content_type.startswith("text/markdown"):
    sys.exit(f"Description-Content-Type is {content_type!r}, not text/markdown")
html = readme_renderer.markdown.render(body)
if not html:
    sys.exit("the long description did not render")
relative = sorted({
    f"{attr}={url}"
    for attr, url in re.findall(r'\b(src|href)="([^"]*)"', html)
    if not re.match(r"(https?:|mailto:|#)", url)
})
print(f"    rendered {len(body)} characters of Markdown to {len(html)} of HTML")
for item in relative:
    print(f"    WARNING: relative {item}: broken on PyPI (make it an absolute URL)")
EOF
}
step "long description renders as on PyPI (readme-renderer[md])" check_readme

total1=$(now_ms)
log "artifacts in $out:"
stat -c '    %10s bytes  %n' "$wheel" "$sdist"
log "timings:"
printf '    %s\n' "${timings[@]}"
log "total $(awk -v ms="$((total1 - total0))" 'BEGIN { printf "%.1f", ms / 1000 }') s"
