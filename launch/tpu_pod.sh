#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every host (`--worker=all`); `jax.distributed.initialize()` needs no
# arguments on TPU VMs (ttm_jax/runtime/mesh.py). The workdir must be shared storage (gs://...): Orbax writes one
# checkpoint from all hosts, and each host resumes its own Grain iterator state from it.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/stage2.py:wan1.3b gs://bucket/ttm/stage2 [extra flags]
#
# Environment: REPO (checkout path on the hosts, default ~/ttm-jax), SETUP=1 to pip-install the checkout first,
# PROJECT (gcloud project). Maintenance events send SIGTERM: every host checkpoints and exits; run again to resume.
set -euo pipefail

TPU=${1:?usage: $0 TPU_NAME ZONE CONFIG[:variant] WORKDIR [extra flags]}
ZONE=${2:?usage: $0 TPU_NAME ZONE CONFIG[:variant] WORKDIR [extra flags]}
CONFIG=${3:?usage: $0 TPU_NAME ZONE CONFIG[:variant] WORKDIR [extra flags]}
WORKDIR=${4:?usage: $0 TPU_NAME ZONE CONFIG[:variant] WORKDIR [extra flags]}
shift 4
REPO=${REPO:-'~/ttm-jax'}
EXTRA=$(printf ' %q' "$@")
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

SETUP_CMD=""
if [[ "${SETUP:-0}" == "1" ]]; then
  SETUP_CMD="pip install -q -e ${REPO} 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && "
fi

# shellcheck disable=SC2086
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="\
  ${SETUP_CMD}cd ${REPO} && \
  python -m ttm_jax.main --mode=train --config=${CONFIG} --workdir=${WORKDIR}${EXTRA} 2>&1 | tee -a ~/ttm_train.log"
