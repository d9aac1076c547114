#!/usr/bin/env bash
# Build the Dockerfile's image with podman and check it from inside, offline.
#
# Where no Docker engine or registry can be reached (CI), the CUDA PyTorch base image
# is replaced by a local stand-in of the same name: a debootstrapped Debian with Python
# and the CPU build of torch in /opt/conda, as in the real image. Then:
#   podman build, then with --network none inside the image:
#   blurctl validate on every shipped recipe, and a short run of the embedded default.
# Last, the Slurm script's docker variant runs one node through podman's docker command.
# Needs root (or rootless podman). Installs podman & co. with apt-get where missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=$(awk '/^FROM /{print $2; exit}' Dockerfile)
IMAGE=localhost/blurctl:check
TORCH=${TORCH_VERSION:-2.13.0}
podman() { command podman --runtime runc "$@"; }
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap uidmap \
    fuse-overlayfs runc >/dev/null
fi

if ! podman image exists "$BASE"; then
  echo "== making a stand-in for $BASE (Debian + Python + CPU torch $TORCH)"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  # this machine's CA bundle, so pip inside trusts the same TLS proxies the host does
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  path=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  inroot() { env -i PATH="$path" PIP_CERT=/etc/ssl/certs/ca-certificates.crt chroot "$rootfs" "$@"; }
  inroot python3 -m venv /opt/conda
  wheel=$(ls /opt/wheels/torch-"$TORCH"+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then
    cp "$wheel" "$rootfs/tmp/"
    inroot pip install -q --no-cache-dir "/tmp/$(basename "$wheel")"
  else
    inroot pip install -q --no-cache-dir "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu
  fi
  rm -rf "$rootfs"/tmp/* "$rootfs"/root/.cache
  tar -C "$rootfs" -c . | podman import --change "ENV PATH=$path" \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

echo "== podman build $IMAGE"
podman build --pull=never --network host -q -t "$IMAGE" . >/dev/null

inside() {  # blurctl ARGS... inside the image, offline
  podman run --rm --network none "${limits[@]}" -e HF_HUB_OFFLINE=1 -e HF_DATASETS_OFFLINE=1 \
    -e BLURCTL_NO_PROGRESS=1 "$IMAGE" "$@"
}
for recipe in recipes/*.yaml; do
  inside validate --quiet "/opt/blurctl/$recipe"
done
inside run /opt/blurctl/recipes/demo.yaml train.max_steps=2 eval.muse.max_examples=4 \
  eval.lm_eval.limit=8 eval.bootstrap=0 output_dir=/runs/check
echo "== the Slurm script's docker variant, one node, through podman's docker command"
work=$(mktemp -d)
shim=$(mktemp -d)
trap 'rm -rf "$work" "$shim"' EXIT
chmod 777 "$work"  # the image runs as uid 1000
cp recipes/demo.yaml "$work/"
cp tests/slurm_standins/srun tests/slurm_standins/scontrol "$shim/"
cat > "$shim/docker" <<'SH'
#!/bin/bash
# docker -> podman, with this sandbox's runtime and limits
if [ "$1" = run ]; then shift; set -- run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"; fi
exec podman --runtime runc "$@"
SH
chmod +x "$shim/docker"
podman run --rm --network none "${limits[@]}" -v "$work:$work" -w "$work" "$IMAGE" \
  launch demo.yaml container.runtime=docker "container.image=$IMAGE" train.max_steps=2 \
  eval.muse.max_examples=4 eval.lm_eval.limit=8 eval.bootstrap=0 output_dir=run --slurm
PATH="$shim:$PATH" SLURM_JOB_NUM_NODES=1 SLURM_JOB_ID=$((RANDOM % 10000 + 1)) \
  SLURM_JOB_NODELIST=localhost bash "$work/run/launch.sbatch"
test -s "$work/run/results.json"
echo "== container check passed"
