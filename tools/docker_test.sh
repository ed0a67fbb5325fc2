#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile), serve its models from the image's own filesystem with the image's command
# (the HTTP frontend beside tritonserver), and call them from outside: an OpenAI chat answer from the frontend
# (plain HTTP, then the openai SDK: client_examples/openai_client.py), a gRPC token stream
# (client_examples/grpc_stream.py) and KServe v2 inference (client_examples/kserve_infer.py,
# client_examples/kserve_v2_on_kserve.py) on tritonserver's ports. `make docker-test` runs it.
#
# Made for hosts where images build but containers cannot run (no registry, `podman run` refused by the
# sandbox): the base image is made with debootstrap, the image is built with podman, and its command runs
# with chroot in the image's mounted root filesystem, as the image's user, with the image's environment,
# working directory and CMD, on the host's network. Needs root and Debian's apt (installs podman and
# debootstrap when missing). On a host where containers run, `docker run` does the same (docker/README.md).
#
#   bash tools/docker_test.sh [--from-clone] [--keep-image]
#     --from-clone   build from a fresh `git clone` of this repository's HEAD (committed files only)
#                    instead of the working tree
#     --keep-image   (default) / --remove-image: remove the built image at the end
#
# Environment: IMAGE (default localhost/mstriton:cpu), BASE_IMAGE (default localhost/debian:bookworm-minbase,
# made with debootstrap when absent), DEBIAN_MIRROR (default: the Debian mirror of this host's apt sources, in
# either format: sources.list / *.list lines or deb822 *.sources stanzas; else deb.debian.org),
# PIP_CA (CA bundle handed to the build as the secret pip-ca; default /etc/ssl/certs/ca-certificates.crt,
# for hosts behind a TLS-intercepting proxy), FRONTEND_PORT (default 19000), HTTP_PORT/GRPC_PORT/METRICS_PORT
# (tritonserver's, default 18000/18001/18002),
# READY_TIMEOUT (seconds, default 600), VENV (the host environment the clients run from, default .venv).
set -Eeuo pipefail

# set -e alone stops at a failing command without a word: say which command, where, and with what status.
# Only the main shell speaks (a failure inside $(...) or a pipeline is reported by the command that holds it).
on_error() {
  local status=$1 line=$2
  [ "$BASH_SUBSHELL" = 0 ] || return 0
  printf '\ndocker_test.sh: FAILED: `%s` exited with status %d (%s line %d%s)\n' "$BASH_COMMAND" "$status" \
    "$(basename "${BASH_SOURCE[1]:-$0}")" "$line" "${FUNCNAME[1]:+, in ${FUNCNAME[1]}}" >&2
}
trap 'on_error $? $LINENO' ERR

# The first Debian archive in the apt sources under APT_DIR (default /etc/apt), for debootstrap: a `deb` entry
# with the component main that is not the security archive, one that lists bookworm first, else any (a Debian
# 13 host's mirror serves bookworm too). Reads both formats apt reads: one-line entries (sources.list,
# sources.list.d/*.list) and deb822 stanzas (sources.list.d/*.sources, all a Debian 12/13 host made from a
# recent image has). Prints nothing when there is none; never fails (a missing file is no error).
debian_mirror() {
  local apt_dir="${1:-/etc/apt}" file files=()
  [ -r "$apt_dir/sources.list" ] && files+=("$apt_dir/sources.list")
  for file in "$apt_dir"/sources.list.d/*; do  # in name order, as apt reads them
    case "$file" in *.list | *.sources) [ -r "$file" ] && files+=("$file") ;; esac
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk '
    function consider(uri, suites, components,   n, i, suite, archive, bookworm) {
      if (uri !~ /^(https?|ftp|file):/ || (" " components " ") !~ /[ \t]main[ \t]/) return
      n = split(suites, suite)
      for (i = 1; i <= n; i++) {
        if (suite[i] ~ /-security$/) continue
        archive = 1
        if (suite[i] ~ /^bookworm(-updates|-backports)?$/) bookworm = 1
      }
      if (!archive) return
      if (first == "") first = uri
      if (bookworm && preferred == "") preferred = uri
    }
    function end_stanza(   uri) {  # deb822: what the stanza read so far declares
      split(fields["uris"], uri)
      if (fields["enabled"] !~ /^[ \t]*no[ \t]*$/ && (" " fields["types"] " ") ~ /[ \t]deb[ \t]/)
        consider(uri[1], fields["suites"], fields["components"])
      split("", fields); field = ""
    }
    FNR == 1 { end_stanza(); deb822 = FILENAME ~ /\.sources$/ }
    deb822 && /^#/ { next }
    deb822 && /^[ \t]*$/ { end_stanza(); next }
    deb822 && /^[ \t]/ { if (field != "") fields[field] = fields[field] " " $0; next }  # a continued value
    deb822 && index($0, ":") {
      field = tolower(substr($0, 1, index($0, ":") - 1))
      fields[field] = substr($0, index($0, ":") + 1)
      next
    }
    !deb822 {
      sub(/#.*/, "")
      if ($1 != "deb") next
      i = 2
      if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }  # [ options ]
      components = ""
      for (j = i + 2; j <= NF; j++) components = components " " $j
      consider($i, $(i + 1), components)
    }
    END {
      end_stanza()
      if (preferred != "") print preferred; else if (first != "") print first
    }' "${files[@]}"
}

# Sourced (by tests/test_deploy_manifests.py): the functions above only.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then return 0; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE="${IMAGE:-localhost/mstriton:cpu}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian:bookworm-minbase}"
HTTP_PORT="${HTTP_PORT:-18000}"
GRPC_PORT="${GRPC_PORT:-18001}"
METRICS_PORT="${METRICS_PORT:-18002}"
FRONTEND_PORT="${FRONTEND_PORT:-19000}"
READY_TIMEOUT="${READY_TIMEOUT:-600}"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
PIP_CA="${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}"
PROMPT="Triton is an inference server."
CHAT_MODEL="${CHAT_MODEL:-smollm2}"  # the image's model with a chat template (SmolLM2-135M-Instruct)
CHAT_PROMPT="What is the capital of France?"

FROM_CLONE=0
KEEP_IMAGE=1
for arg in "$@"; do
  case "$arg" in
    --from-clone) FROM_CLONE=1 ;;
    --keep-image) KEEP_IMAGE=1 ;;
    --remove-image) KEEP_IMAGE=0 ;;
    -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "docker_test.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

START=$SECONDS
WORK="$(mktemp -d /var/tmp/mstriton-docker-test.XXXXXX)"
LOGS="$ROOT/build/docker-test"   # build.log and server.log of the last run stay here
mkdir -p "$LOGS"
CONTAINER=""
MNT=""
SERVER_PID=""
MOUNTED=()
step() { printf '\n==> [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
say() { printf '    %s\n' "$*"; }
die() { printf '\ndocker_test.sh: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local status=$?
  set +e
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null
  fi
  [ -n "$MNT" ] && kill_chrooted KILL
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}"; done
  if [ -n "$CONTAINER" ]; then
    podman umount "$CONTAINER" >/dev/null 2>&1
    podman rm -f "$CONTAINER" >/dev/null 2>&1
  fi
  if [ $KEEP_IMAGE = 0 ] && podman image exists "$IMAGE" 2>/dev/null; then podman rmi -f "$IMAGE" >/dev/null 2>&1; fi
  rm -rf "$WORK"
  if [ $status = 0 ]; then
    printf '\ndocker_test.sh: PASSED in %ds\n' "$((SECONDS - START))"
  else
    printf '\ndocker_test.sh: stopped with status %d after %ds (cleaned up)\n' "$status" "$((SECONDS - START))" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Processes whose root directory is the mounted image (the server and its Python-backend stubs).
chrooted_pids() {
  local link pid
  for link in /proc/[0-9]*/root; do
    pid="${link#/proc/}"; pid="${pid%/root}"
    [ "$(readlink "$link" 2>/dev/null)" = "$MNT" ] && echo "$pid"
  done
  return 0
}
kill_chrooted() { local pids; mapfile -t pids < <(chrooted_pids); [ ${#pids[@]} = 0 ] || kill "-$1" "${pids[@]}" 2>/dev/null || true; }

http_status() {  # METHOD URL [HEADER VALUE] -> prints the HTTP status (000: no answer)
  "$PY" - "$@" <<'PY'
import sys, urllib.error, urllib.request
method, url, header = sys.argv[1], sys.argv[2], sys.argv[3:5]
request = urllib.request.Request(url, method=method, headers=dict([header]) if header else {})
try:
    with urllib.request.urlopen(request, timeout=3) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}
http_get() { [ "$(http_status GET "$1")" = 200 ]; }  # URL -> exit status 0 when it answers 200
port_free() {
  "$PY" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: only a listener makes it busy
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# ---------------------------------------------------------------------------------------------------------
step "checking the tools"
[ "$(id -u)" = 0 ] || die "run as root (podman build and chroot into the image's filesystem need it)"
[ -x "$PY" ] || die "no $PY: run 'make install' first (the clients run from the host environment)"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || podman image exists "$BASE_IMAGE" 2>/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
say "$(podman --version)"
for port in "$FRONTEND_PORT" "$HTTP_PORT" "$GRPC_PORT" "$METRICS_PORT"; do
  port_free "$port" || die "port $port is in use: choose others with FRONTEND_PORT, HTTP_PORT, GRPC_PORT, METRICS_PORT"
done

# ---------------------------------------------------------------------------------------------------------
step "base image $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
  say "present (remove it with 'podman rmi $BASE_IMAGE' to make it again)"
else
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    mirror="$DEBIAN_MIRROR"; mirror_from="DEBIAN_MIRROR"
  else
    mirror="$(debian_mirror)"; mirror_from="this host's apt sources"
  fi
  [ -n "$mirror" ] || { mirror="http://deb.debian.org/debian"; mirror_from="none in this host's apt sources"; }
  say "debootstrap --variant=minbase bookworm from $mirror ($mirror_from; a few minutes)"
  t0=$SECONDS
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  say "made in $((SECONDS - t0))s"
fi

# ---------------------------------------------------------------------------------------------------------
CONTEXT="$ROOT"
if [ $FROM_CLONE = 1 ]; then
  step "fresh clone of HEAD ($(git rev-parse --short HEAD)) as the build context"
  git clone --quiet --no-hardlinks "$ROOT" "$WORK/src"
  CONTEXT="$WORK/src"
fi
step "building $IMAGE from docker/Dockerfile (first time: ~15 min, mostly pip and training the demo model)"
build_args=(--isolation=chroot --network host --format docker --build-arg "BASE=$BASE_IMAGE"
            -f "$CONTEXT/docker/Dockerfile" -t "$IMAGE")
if [ -s "$PIP_CA" ]; then
  build_args+=(--secret "id=pip-ca,src=$PIP_CA")
  say "CA bundle for pip: $PIP_CA (build secret; not stored in the image)"
fi
t0=$SECONDS
set +e
podman build "${build_args[@]}" "$CONTEXT" 2>&1 | tee "$LOGS/build.log" | grep --line-buffered -E \
  'STEP [0-9]|^==>|^\[demo model|^make demo|converted demo|install finished|^COMMIT|rror' | cut -c1-160
build_status=${PIPESTATUS[0]}
set -e
[ "$build_status" = 0 ] || { tail -n 30 "$LOGS/build.log" >&2; die "podman build failed"; }
BUILD_SECONDS=$((SECONDS - t0))
size_bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
IMAGE_SIZE="$(awk -v b="$size_bytes" 'BEGIN {printf "%.2f GB", b / 1e9}')"
say "built in ${BUILD_SECONDS}s; image size $IMAGE_SIZE"

# ---------------------------------------------------------------------------------------------------------
step "the image's configuration"
podman image inspect "$IMAGE" > "$WORK/inspect.json"
image_config="$("$PY" - "$WORK/inspect.json" <<'PY'
import json, shlex, sys
image = json.load(open(sys.argv[1]))[0]
c = dict(image["Config"], Healthcheck=image.get("Healthcheck") or image["Config"].get("Healthcheck"))
cmd = (c.get("Entrypoint") or []) + (c.get("Cmd") or [])
print("IMG_USER=" + shlex.quote(c.get("User") or "0"))
print("IMG_WORKDIR=" + shlex.quote(c.get("WorkingDir") or "/"))
print("IMG_CMD=(" + " ".join(shlex.quote(a) for a in cmd) + ")")
print("IMG_ENV=(" + " ".join(shlex.quote(e) for e in c.get("Env") or []) + ")")
print("IMG_PORTS=" + shlex.quote(" ".join(sorted(c.get("ExposedPorts") or {}))))
print("IMG_HEALTH=" + shlex.quote(" ".join((c.get("Healthcheck") or {}).get("Test") or [])))
PY
)" || die "could not read the image's configuration from podman image inspect ($WORK/inspect.json)"
eval "$image_config"
say "user $IMG_USER, working directory $IMG_WORKDIR, exposes $IMG_PORTS"
say "command: ${IMG_CMD[*]}"
say "health check: $IMG_HEALTH"

# ---------------------------------------------------------------------------------------------------------
step "mounting the image's filesystem (podman create + podman mount)"
CONTAINER="$(podman create --name "mstriton-docker-test-$$" "$IMAGE")"
MNT="$(podman mount "$CONTAINER")"
say "container ${CONTAINER:0:12}, root filesystem $MNT"
# What a container runtime provides: /proc, /dev, a /dev/shm of its own (1 GiB, as `--shm-size 1g`), /sys.
mount -t proc proc "$MNT/proc"; MOUNTED+=("$MNT/proc")
mount --bind /dev "$MNT/dev"; MOUNTED+=("$MNT/dev")
mount -t tmpfs -o size=1g,mode=1777 shm "$MNT/dev/shm"; MOUNTED+=("$MNT/dev/shm")
mount --bind /sys "$MNT/sys"; MOUNTED+=("$MNT/sys")

# The image's user, numerically (its /etc/passwd resolves a name), and its home.
uid="${IMG_USER%%:*}"; gid="${IMG_USER#*:}"; [ "$gid" = "$IMG_USER" ] && gid=""
if ! [[ "$uid" =~ ^[0-9]+$ ]]; then
  uid="$(awk -F: -v u="$uid" '$1 == u {print $3}' "$MNT/etc/passwd")"
  [ -n "$uid" ] || die "user ${IMG_USER%%:*} is not in the image's /etc/passwd"
fi
[ -n "$gid" ] || gid="$(awk -F: -v u="$uid" '$3 == u {print $4}' "$MNT/etc/passwd")"
gid="${gid:-$uid}"
home="$(awk -F: -v u="$uid" '$3 == u {print $6}' "$MNT/etc/passwd")"
[ "$uid" != 0 ] || say "WARNING: the image runs as root"
say "running as uid $uid gid $gid (home ${home:-none})"

# ---------------------------------------------------------------------------------------------------------
step "starting the image's command in it (chroot): frontend $FRONTEND_PORT; tritonserver HTTP $HTTP_PORT, gRPC $GRPC_PORT, metrics $METRICS_PORT"
# The admin key, as a deployment gives it (MSTRITON_ADMIN_KEY): the image's command closes tritonserver's admin
# APIs behind it, which the step after readiness checks.
ADMIN_KEY="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
env_args=("${IMG_ENV[@]}" "MSTRITON_ADMIN_KEY=$ADMIN_KEY")
[ -n "$home" ] && env_args=("HOME=$home" "${env_args[@]}")
t0=$SECONDS
chroot --userspec="$uid:$gid" "$MNT" /usr/bin/env -i -C "$IMG_WORKDIR" "${env_args[@]}" "${IMG_CMD[@]}" \
  --frontend-port "$FRONTEND_PORT" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
  > "$LOGS/server.log" 2>&1 &
SERVER_PID=$!
# Ready as the image's HEALTHCHECK and the probes see it: the frontend's /health (tritonserver ready, an LLM served).
say "server pid $SERVER_PID; waiting for the frontend's /health (log: $LOGS/server.log)"
while ! http_get "http://127.0.0.1:$FRONTEND_PORT/health"; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    grep -E '^E[0-9]|rror' "$LOGS/server.log" | cut -c1-400 | head -n 20 >&2 || true  # no such line: die says why
    die "the server exited before it was ready (whole log: $LOGS/server.log)"
  fi
  if [ $((SECONDS - t0)) -gt "$READY_TIMEOUT" ]; then
    tail -n 40 "$LOGS/server.log" >&2
    die "not ready after ${READY_TIMEOUT}s"
  fi
  sleep 2
done
READY_SECONDS=$((SECONDS - t0))
say "ready after ${READY_SECONDS}s"
http_get "http://127.0.0.1:$HTTP_PORT/v2/health/ready" \
  || die "the frontend's /health answers 200 but tritonserver's /v2/health/ready on $HTTP_PORT does not (--expose-triton?)"
grep -E '^\| (demo[a-z_]*) +\| 1 +\| READY' "$LOGS/server.log" | sed 's/^/    /' || true
rss_kb=0; nproc_chroot=0
for pid in $(chrooted_pids); do
  kb="$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
  rss_kb=$((rss_kb + ${kb:-0})); nproc_chroot=$((nproc_chroot + 1))
done
say "memory: $((rss_kb / 1024)) MiB resident in $nproc_chroot processes; /dev/shm used: $(df -h --output=used "$MNT/dev/shm" | tail -n1 | tr -d ' ')"

# ---------------------------------------------------------------------------------------------------------
step "admin APIs closed behind the key (header admin-key)"
index="http://127.0.0.1:$HTTP_PORT/v2/repository/index"
without="$(http_status POST "$index")"
with="$(http_status POST "$index" admin-key "$ADMIN_KEY")"
say "POST /v2/repository/index: $without without the key, $with with it"
[ "$without" = 403 ] || die "the repository index answered $without without the admin key (403 expected)"
[ "$with" = 200 ] || die "the repository index answered $with with the admin key (200 expected)"
! grep -qF -- "$ADMIN_KEY" "$LOGS/server.log" || die "the server log shows the admin key it was given"

# ---------------------------------------------------------------------------------------------------------
step "OpenAI chat answer from outside (the frontend, plain HTTP): POST /v1/chat/completions, model $CHAT_MODEL"
if ! "$PY" - "http://127.0.0.1:$FRONTEND_PORT/v1/chat/completions" "$CHAT_MODEL" "$CHAT_PROMPT" <<'PY' | sed 's/^/    /'
import json, sys, urllib.request
url, model, prompt = sys.argv[1:4]
body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as response:
    answer = json.load(response)
choice = answer["choices"][0]
content = choice["message"]["content"]
assert answer["object"] == "chat.completion" and choice["message"]["role"] == "assistant", answer
assert content and content.strip(), f"an empty answer: {answer}"
assert choice["finish_reason"] in ("stop", "length"), answer
print(f"{model}: {content!r} (finish_reason {choice['finish_reason']}, usage {answer['usage']})")
PY
then
  die "the OpenAI chat request to the frontend failed"
fi

step "OpenAI chat, streamed through the openai SDK: client_examples/openai_client.py --chat"
if ! "$PY" client_examples/openai_client.py --url "http://127.0.0.1:$FRONTEND_PORT" --chat --model "$CHAT_MODEL" \
  --max-tokens 24 --temperature 0 "$CHAT_PROMPT" 2>&1 | sed 's/^/    /'; then
  die "the OpenAI SDK's chat stream failed"
fi

step "gRPC token stream from outside: client_examples/grpc_stream.py"
if ! "$PY" client_examples/grpc_stream.py --url "127.0.0.1:$GRPC_PORT" --max-tokens 24 "$PROMPT" 2>&1 | sed 's/^/    /'; then
  die "the gRPC stream failed"
fi

step "KServe v2 inference from outside: client_examples/kserve_infer.py"
if ! "$PY" client_examples/kserve_infer.py --url "127.0.0.1:$HTTP_PORT" --max-tokens 16 "$PROMPT" 2>&1 | sed 's/^/    /'; then
  die "the KServe v2 request failed"
fi

step "the KServe example (as it calls an InferenceService): client_examples/kserve_v2_on_kserve.py"
if ! "$PY" client_examples/kserve_v2_on_kserve.py --url "http://127.0.0.1:$HTTP_PORT" --host mstriton-demo.example.com \
  --max-tokens 16 "$PROMPT" 2>&1 | sed 's/^/    /'; then
  die "the KServe example failed"
fi

step "metrics: tritonserver's on $METRICS_PORT, the frontend's (vLLM's gauges for the gateway and KEDA) on $FRONTEND_PORT"
if ! "$PY" - "http://127.0.0.1:$METRICS_PORT/metrics" "http://127.0.0.1:$FRONTEND_PORT/metrics" <<'PY' | sed 's/^/    /'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
lines = [l for l in text.splitlines() if l.startswith(("mstriton_requests_finished_total", "mstriton_generation_tokens_total"))]
print("\n".join(lines) or "no mstriton_ metrics")
text = urllib.request.urlopen(sys.argv[2], timeout=5).read().decode()
gauges = [l for l in text.splitlines() if l.startswith(("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"))]
assert any(l.startswith("vllm:num_requests_waiting ") for l in gauges), "no vllm:num_requests_waiting on /metrics"
print("\n".join(gauges))
PY
then
  die "the metrics are not as expected"
fi

# ---------------------------------------------------------------------------------------------------------
step "stopping the server (SIGTERM)"
t0=$SECONDS
kill -TERM "$SERVER_PID"
for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  say "still running after 60s: SIGKILL"
  kill -KILL "$SERVER_PID"
fi
wait "$SERVER_PID" 2>/dev/null && rc=0 || rc=$?
SERVER_PID=""
sleep 1
left="$(chrooted_pids | wc -l)"
say "server exited with status $rc after $((SECONDS - t0))s; processes left in the image's root: $left"
kill_chrooted KILL

printf '\nSummary: image %s (%s) built in %ds from %s; served the demo model from its own filesystem as uid %s,\n' \
  "$IMAGE" "$IMAGE_SIZE" "$BUILD_SECONDS" "$([ $FROM_CLONE = 1 ] && echo "a fresh clone" || echo "the working tree")" "$uid"
printf 'ready in %ds; the OpenAI chat (HTTP and SDK), the gRPC stream and KServe v2 inference answered.\n' "$READY_SECONDS"
