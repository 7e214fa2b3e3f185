#!/usr/bin/env bash
# Build the fewstep image and use it as a user would: a debug teacher with `docker run`, a distillation, a sample and
# a domain FID (twice: the second reads the cache volume) through `docker compose`, TensorBoard answering on
# localhost, and every file on the mounted outputs owned by the invoking user. Prints a table of the steps, their
# times and the image size; exits non-zero if any step fails. A slow check (a full image build), not part of .ci/run.
#
#   bash tools/docker_check.sh                                  # python:3.11-slim-bookworm base, CPU torch
#   bash tools/docker_check.sh --torch pypi --ca-bundle /etc/ssl/certs/ca-certificates.crt   # behind a TLS proxy
#   bash tools/docker_check.sh --make-base --torch pypi         # a base made from Debian packages (debootstrap, root)
#
# Options: --base IMAGE (default python:3.11-slim-bookworm), --make-base (debootstrap a minbase bookworm with
# python3 and python3-venv, import it as fewstep-base:bookworm and build on it), --torch cu124|cpu|pypi (default
# cpu), --ca-bundle FILE (given to the build as the ca_bundle secret, then checked absent from the image),
# --port N (TensorBoard's, default 16006), --keep (leave the mounted outputs folder for a look; the logs always stay).
# DOCKER=/path/to/docker picks the client: `docker build --secret` needs BuildKit (buildx, or a 20.10 client).
# shellcheck disable=SC2317  # the step functions run through run_step, which shellcheck cannot follow
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

base=python:3.11-slim-bookworm make_base=0 torch=cpu ca_bundle="" port=16006 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base="$2"; shift 2 ;;
    --make-base) make_base=1; base=fewstep-base:bookworm; shift ;;
    --torch) torch="$2"; shift 2 ;;
    --ca-bundle) ca_bundle="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "docker_check.sh: unknown option $1; see the comment at the top of tools/docker_check.sh" >&2; exit 2 ;;
  esac
done
case "$torch" in cu*|cpu|pypi) ;; *) echo "docker_check.sh: --torch $torch: use cu124, cpu or pypi" >&2; exit 2 ;; esac
if [ -n "$ca_bundle" ] && [ ! -s "$ca_bundle" ]; then echo "docker_check.sh: --ca-bundle $ca_bundle: no such file" >&2; exit 2; fi

docker=${DOCKER:-docker}
export DOCKER_BUILDKIT=1
if ! "$docker" info >/dev/null 2>&1; then
  echo "docker_check.sh: no Docker engine answers: start dockerd (or set DOCKER_HOST)" >&2; exit 2
fi
client="$("$docker" version -f '{{.Client.Version}}' 2>/dev/null)"
if ! "$docker" buildx version >/dev/null 2>&1 && [ "${client%%.*}" -ge 23 ] 2>/dev/null; then
  echo "docker_check.sh: docker $client builds with BuildKit only through buildx: install it (docker-buildx-plugin)" >&2; exit 2
fi
if "$docker" compose version >/dev/null 2>&1; then compose=("$docker" compose)
elif command -v docker-compose >/dev/null; then compose=(docker-compose)
else echo "docker_check.sh: no docker compose: install the compose plugin (or apt-get install docker-compose)" >&2; exit 2; fi

image="fewstep:$torch"
project=fewstep-check
outputs="$(mktemp -d /tmp/fewstep-docker-check.XXXXXX)"  # made here, so it belongs to this user, not to the engine
logs="$outputs.logs"
mkdir -p "$logs"
user="$(id -u):$(id -g)"
# what compose reads: the image tag, the mounted folder, the user to run as, TensorBoard's port
GID="$(id -g)"
export TORCH="$torch" BASE_IMAGE="$base" FEWSTEP_OUTPUTS="$outputs" TENSORBOARD_PORT="$port" UID GID
compose+=(-p "$project")
tiny=(model=unet_tiny data.limit=512)  # a few steps on 512 MNIST digits: the check is of the image, not of training

steps=() seconds=() results=()
failed=0
run_step() {  # run_step NAME COMMAND...: time it, log it to $logs/NAME.log, record the result
  local name="$1" start status
  shift
  start=$(date +%s)
  if [ "$failed" = 1 ]; then status=skipped
  elif "$@" >"$logs/$name.log" 2>&1; then status=ok
  else status="FAILED (log: $logs/$name.log)"; failed=1
  fi
  steps+=("$name") seconds+=("$(( $(date +%s) - start ))") results+=("$status")
}

make_debian_base() {  # a minimal Debian bookworm with Debian's python3 and venv, made from Debian's own packages
  local root
  root="$(mktemp -d /tmp/fewstep-base.XXXXXX)"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" http://deb.debian.org/debian \
    && rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    && tar -C "$root" -c . | "$docker" import -c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]' - "$base"
  local status=$?
  rm -rf "$root"
  return "$status"
}

build() {
  local secret=()
  if [ -n "$ca_bundle" ]; then secret=(--secret "id=ca_bundle,src=$ca_bundle"); fi
  "$docker" build --progress=plain "${secret[@]}" --build-arg "BASE_IMAGE=$base" --build-arg "TORCH=$torch" -t "$image" .
}

checkpoint() {  # the newest checkpoints/last.ckpt on the mounted outputs, as the container sees it
  local path
  path="$(find "$outputs" -name last.ckpt -path '*/checkpoints/*' | sort | tail -n 1)"
  [ -n "$path" ] || { echo "no checkpoints/last.ckpt under $outputs" >&2; return 1; }
  echo "outputs/${path#"$outputs"/}"
}

in_container() {  # in_container MODULE ARGS...: a fewstep entry point through the compose service, outputs mounted
  "${compose[@]}" run --rm -T --entrypoint python train -m "$@"
}

sample() {
  local ckpt
  ckpt="$(checkpoint)" && in_container fewstep.sample "ckpt=$ckpt" n=16 sampler=euler nfe=4 \
    && compgen -G "$outputs/sample/*/samples.png"
}

evaluate() {  # the first run trains the domain classifier into the cache volume; the second only reads it
  local ckpt
  ckpt="$(checkpoint)" || return 1
  in_container fewstep.evaluate "ckpt=$ckpt" metric=fid_domain n=64 sampler=euler nfe=4 | tee "$logs/evaluate-first.out" \
    && grep -q "features (real images)" "$logs/evaluate-first.out" \
    && in_container fewstep.evaluate "ckpt=$ckpt" metric=fid_domain n=64 sampler=euler nfe=4 | tee "$logs/evaluate-cached.out" \
    && grep -q "fid_domain = " "$logs/evaluate-cached.out" \
    && ! grep -q "features (real images)" "$logs/evaluate-cached.out"
}

tensorboard() {  # up, answering on localhost, and healthy by its compose health check
  local tries
  "${compose[@]}" up -d tensorboard || return 1
  for tries in $(seq 60); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:$port/', timeout=5)" 2>/dev/null \
       && [ "$("$docker" inspect -f '{{.State.Health.Status}}' "$("${compose[@]}" ps -q tensorboard)")" = healthy ]; then
      echo "TensorBoard answers on http://localhost:$port/ and is healthy after ${tries} tries"
      return 0
    fi
    sleep 2
  done
  "${compose[@]}" logs tensorboard
  return 1
}

owned_by_user() {  # the files on the mounted outputs are the invoking user's, and no step was refused a write
  local others complaints
  others="$(find "$outputs" \( ! -uid "$(id -u)" -o ! -gid "$(id -g)" \) -print)"
  echo "$(find "$outputs" | wc -l) files and folders under $outputs"
  [ -z "$others" ] || { echo "not owned by $user:"; echo "$others"; return 1; }
  complaints="$(grep -iE "permission denied|not a writable directory" "$logs"/*.log)"
  [ -z "$complaints" ] || { echo "a step could not write:"; echo "$complaints"; return 1; }
}

bundle_copies() {  # bundle_copies IMAGE: anything left in /run/secrets, and the files with the CA bundle's size and SHA-256
  local size digest
  size="$(stat -c %s "$ca_bundle")" digest="$(sha256sum "$ca_bundle" | cut -c1-64)"
  "$docker" run --rm --user 0 --entrypoint bash "$1" -c \
    "ls /run/secrets 2>/dev/null; find / -xdev -type f -size ${size}c -exec sha256sum {} + | grep $digest"
}

ca_bundle_absent() {  # no layer's history carries a certificate, and no file the build added is the bundle
  local copies
  if "$docker" history --no-trunc "$image" | grep -q "BEGIN CERTIFICATE"; then echo "a certificate in the history"; return 1; fi
  copies="$(comm -23 <(bundle_copies "$image" | sort) <(bundle_copies "$base" | sort))"
  [ -z "$copies" ] || { echo "the CA bundle is in $image:"; echo "$copies"; return 1; }
  echo "no certificate in the history of $image; no file in it is $ca_bundle (SHA-256 and size), /run/secrets is empty"
}

cleanup() {
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
  if [ "$keep" = 0 ]; then rm -rf "$outputs"; fi
}
trap cleanup EXIT

if [ "$make_base" = 1 ]; then run_step make-base make_debian_base; fi
run_step build build
if [ -n "$ca_bundle" ]; then run_step ca-bundle-absent ca_bundle_absent; fi
run_step teacher "$docker" run --rm --user "$user" -v "$outputs:/work/outputs" "$image" trainer=debug "${tiny[@]}"
run_step distill "${compose[@]}" run --rm -T train method=gdd trainer=debug "${tiny[@]}"
run_step sample sample
run_step evaluate-twice evaluate
run_step tensorboard tensorboard
run_step owned-by-user owned_by_user

size="$("$docker" image inspect -f '{{.Size}}' "$image" 2>/dev/null || echo 0)"
printf '\nfewstep docker check: base %s, torch %s, %s\n' "$base" "$torch" "$(date -u +%Y-%m-%d)"
printf '| %-16s | %8s | %s\n' step seconds result
for i in "${!steps[@]}"; do printf '| %-16s | %8s | %s\n' "${steps[$i]}" "${seconds[$i]}" "${results[$i]}"; done
printf 'image %s: %s MB\nlogs: %s\n' "$image" "$(( size / 1000000 ))" "$logs"
exit "$failed"
