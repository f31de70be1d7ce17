#!/usr/bin/env bash
# Cloud TPU pod slice: create (queued resource), install, run main.py on all workers, stream
# logs, delete. Each step is a sub-command so a step can be re-run on its own:
#
#   launch/tpu_pod.sh create | install | run [--config.x=y ...] | logs | ssh | delete | all
#
# jax.distributed.initialize() is automatic on Cloud TPU (main.py detects the pod from
# TPU_WORKER_HOSTNAMES). The workdir must be a gs:// path: all workers write checkpoint
# shards there. Preemption (spot/queued resources) sends SIGTERM: the run saves and exits 0;
# `run` again resumes from the newest checkpoint.
set -euo pipefail

# ---------------------------------------------------------------- edit these
PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-diffusion-pod}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"          # 16 chips, 4 hosts.
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:---spot}"                                  # "" for on-demand.
REPO_URL="${REPO_URL:-https://github.com/your-org/diffusion-jax.git}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/cifar10_ddpm.py}"
WORKDIR="${WORKDIR:-gs://my-bucket/runs/cifar10_ddpm}"
LOG="${LOG:-/tmp/diffusion-jax.log}"                    # On each worker.
# -----------------------------------------------------------------------------

GCLOUD_TPU=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")
on_all_workers() {
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="$1"
}

create() {
  gcloud compute tpus queued-resources create "${TPU_NAME}-qr" \
    --project="${PROJECT}" --zone="${ZONE}" --node-id="${TPU_NAME}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" ${SPOT}
  echo "Waiting for ${TPU_NAME} to become ACTIVE ..."
  until gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --project="${PROJECT}" \
      --zone="${ZONE}" --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
  # Without queued resources: "${GCLOUD_TPU[@]}" create "${TPU_NAME}" \
  #   --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" ${SPOT}
}

install() {
  on_all_workers "set -e
    [ -d diffusion-jax ] || git clone -b ${BRANCH} ${REPO_URL} diffusion-jax
    cd diffusion-jax && git fetch && git checkout ${BRANCH} && git pull
    python3 -m venv .venv && . .venv/bin/activate
    pip install -U pip && pip install -e . && pip install -U 'jax[tpu]'"
}

run() {
  # Same command on every worker; nohup so that a dropped ssh does not kill training.
  local extra="$*"
  on_all_workers "cd diffusion-jax && . .venv/bin/activate &&
    nohup python main.py --config=${CONFIG} --workdir=${WORKDIR} ${extra} > ${LOG} 2>&1 &"
  logs
}

logs() {  # Worker 0's log (process 0 writes summaries) until training ends; Ctrl-C stops
  # only the streaming.
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=0 --command="sleep 5;
    pid=\$(pgrep -f 'python main.py' | head -n 1);
    if [ -n \"\$pid\" ]; then tail -n +1 -F ${LOG} --pid=\$pid; else cat ${LOG}; fi"
}

ssh_() { "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker="${1:-0}"; }

delete() {
  gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --project="${PROJECT}" \
    --zone="${ZONE}" --force --quiet \
    || "${GCLOUD_TPU[@]}" delete "${TPU_NAME}" --quiet
}

cmd="${1:-all}"
shift || true
case "${cmd}" in
  create) create ;;
  install) install ;;
  run) run "$@" ;;
  logs) logs ;;
  ssh) ssh_ "$@" ;;
  delete) delete ;;
  all) create; install; run "$@"; delete ;;
  *) echo "unknown command ${cmd}"; exit 2 ;;
esac
