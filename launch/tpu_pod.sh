#!/usr/bin/env bash
# Cloud TPU pod slice: create (queued resource), install, run main.py on all workers, wait,
# delete. Each step is a sub-command so a step can be re-run on its own:
#
#   launch/tpu_pod.sh [--dry-run] create | install | run [--config.x=y ...] | logs | ssh [W]
#                                 | delete | all [--config.x=y ...]
#
# --dry-run prints every gcloud command (and the polls) and runs none of them.
#
# jax.distributed: main.py recognises a Cloud TPU VM (TPU chips + libtpu) and lets JAX read
# the workers from the TPU metadata server; the started command also passes --distributed, so
# every worker initialises jax.distributed even if that detection changes. The workdir must
# be a gs:// path: all workers write checkpoint shards there.
#
# `all` deletes the slice only after the run has both started and finished:
#   started:  <workdir>/config.json (written by main.py at every start) is new or rewritten,
#             or a new <workdir>/checkpoints/<step> appeared; polled with `gcloud storage ls`
#             every POLL_S s, at most START_TIMEOUT_S s;
#   finished: main.py exited 0 on every worker (each worker writes its exit status to
#             EXIT_FILE); polled over ssh every POLL_S s, at most FINISH_TIMEOUT_S s.
# On a timeout, a failed worker or unreachable workers it stops with a message and leaves the
# slice as it is (inspect with `logs` / `ssh`, remove with `delete`).
#
# Preemption (spot / queued resources) sends SIGTERM: the run saves and exits 0. Delete the
# preempted slice and run `all` again: it resumes from the newest checkpoint.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi

# ---------------------------------------------------------------- edit these
PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-diffusion-pod}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"          # 16 chips, 4 hosts.
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT---spot}"                                   # SPOT="" for on-demand.
REPO_URL="${REPO_URL:-https://github.com/diffusion-jax/diffusion-jax.git}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/cifar10_ddpm.py}"
WORKDIR="${WORKDIR:-gs://my-bucket/runs/cifar10_ddpm}"
LOG="${LOG:-/tmp/diffusion-jax.log}"                    # On each worker.
EXIT_FILE="${EXIT_FILE:-/tmp/diffusion-jax.exit}"       # On each worker: main.py's exit status.
POLL_S="${POLL_S:-60}"
START_TIMEOUT_S="${START_TIMEOUT_S:-3600}"              # Install + TPU start-up + first write.
FINISH_TIMEOUT_S="${FINISH_TIMEOUT_S:-5184000}"         # 60 days.
MAX_SSH_FAILURES="${MAX_SSH_FAILURES:-30}"              # Consecutive unreachable polls.
# -----------------------------------------------------------------------------

GCLOUD_TPU=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")
GCLOUD_QR=(gcloud compute tpus queued-resources)
LOCATION=(--project="${PROJECT}" --zone="${ZONE}")

show() {  # Prints a command, single-quoting the arguments that need it.
  local arg line="+"
  for arg in "$@"; do
    case "${arg}" in
      '' | *[!A-Za-z0-9_./:=@,+%-]*) line+=" '${arg//\'/\'\\\'\'}'" ;;
      *) line+=" ${arg}" ;;
    esac
  done
  printf '%s\n' "${line}"
}
run_cmd() { if [[ "${DRY_RUN}" == 1 ]]; then show "$@"; else "$@"; fi; }
is_dry_run() { [[ "${DRY_RUN}" == 1 ]]; }
on_all_workers() { run_cmd "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="$1"; }
slice_state() { "${GCLOUD_QR[@]}" describe "${TPU_NAME}-qr" "${LOCATION[@]}" --format='value(state.state)'; }

create() {
  run_cmd "${GCLOUD_QR[@]}" create "${TPU_NAME}-qr" "${LOCATION[@]}" --node-id="${TPU_NAME}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" \
    ${SPOT:+"${SPOT}"}
  # Without queued resources: "${GCLOUD_TPU[@]}" create "${TPU_NAME}" \
  #   --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" ${SPOT}
  echo "Waiting for ${TPU_NAME} to become ACTIVE ..."
  if is_dry_run; then
    show "${GCLOUD_QR[@]}" describe "${TPU_NAME}-qr" "${LOCATION[@]}" --format='value(state.state)'
    echo "# every 30 s until ACTIVE (stops on FAILED / SUSPENDED)"
    return
  fi
  local state=""
  until [[ "${state}" == ACTIVE ]]; do
    state="$(slice_state || true)"
    case "${state}" in
      FAILED | SUSPENDED | SUSPENDING) echo "${TPU_NAME}-qr is ${state}." >&2; exit 1 ;;
      ACTIVE) ;;
      *) sleep 30 ;;
    esac
  done
}

install() {
  on_all_workers "set -e
    [ -d diffusion-jax ] || git clone -b ${BRANCH} ${REPO_URL} diffusion-jax
    cd diffusion-jax && git fetch && git checkout ${BRANCH} && git pull
    python3 -m venv .venv && . .venv/bin/activate
    pip install -U pip && pip install -e . && pip install -U 'jax[tpu]'"
}

start_training() {
  # The same command on every worker, in a background subshell that ignores SIGHUP (a dropped
  # ssh does not stop training) and records main.py's exit status in EXIT_FILE.
  local arg flags=""
  for arg in --config="${CONFIG}" --workdir="${WORKDIR}" --distributed "$@"; do
    flags+=" $(printf '%q' "${arg}")"
  done
  # Only the subshell goes to the background (not the whole && list, which would hold the
  # ssh session's output open until training ends).
  on_all_workers "cd diffusion-jax && . .venv/bin/activate && rm -f ${EXIT_FILE} || exit 1
    ( trap '' HUP; python main.py${flags}; echo \$? > ${EXIT_FILE} ) > ${LOG} 2>&1 < /dev/null &"
}

run() { start_training "$@"; logs; }

logs() {  # Worker 0's log (process 0 writes summaries) until training ends; Ctrl-C stops
  # only the streaming.
  run_cmd "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=0 --command="sleep 5;
    pid=\$(pgrep -f 'python main.py' | head -n 1);
    if [ -n \"\$pid\" ]; then tail -n +1 -F ${LOG} --pid=\$pid; else cat ${LOG}; fi"
}

ssh_() { run_cmd "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker="${1:-0}"; }

delete() {
  run_cmd "${GCLOUD_QR[@]}" delete "${TPU_NAME}-qr" "${LOCATION[@]}" --force --quiet \
    || run_cmd "${GCLOUD_TPU[@]}" delete "${TPU_NAME}" --quiet
}

# ------------------------------------------------------------------ waiting on the run

config_listing() { gcloud storage ls -l "${WORKDIR}/config.json" 2>/dev/null | head -n 1 || true; }
newest_checkpoint() {
  gcloud storage ls "${WORKDIR}/checkpoints/" 2>/dev/null | sort -V | tail -n 1 || true
}
STATUS_COMMAND="if [ -f ${EXIT_FILE} ]; then echo diffusion-jax-exit=\$(cat ${EXIT_FILE});
  else echo diffusion-jax-exit=running; fi"
worker_statuses() {  # One line per reachable worker: main.py's exit status, or "running".
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker="$1" --command="${STATUS_COMMAND}" 2>/dev/null \
    | sed -n 's/.*diffusion-jax-exit=\([0-9a-z]*\).*/\1/p'
}
no_slice_message() {
  echo "The slice ${TPU_NAME} is NOT deleted: look at 'launch/tpu_pod.sh logs'," \
       "remove it with 'launch/tpu_pod.sh delete'." >&2
}

wait_for_start() {  # $1, $2: config.json's listing and the newest checkpoint before the start.
  local deadline=$(( SECONDS + START_TIMEOUT_S )) listing checkpoint worker0
  while true; do
    # Worker 0's status first: had main.py exited before the listings, its writes show in them.
    worker0="$(worker_statuses 0 || true)"
    listing="$(config_listing)"
    if [[ -n "${listing}" && "${listing}" != "$1" ]]; then
      echo "Training started: ${listing}"; return 0
    fi
    checkpoint="$(newest_checkpoint)"
    if [[ -n "${checkpoint}" && "${checkpoint}" != "$2" ]]; then
      echo "Training started: new checkpoint ${checkpoint}"; return 0
    fi
    if [[ -n "${worker0}" && "${worker0}" != running ]]; then
      echo "main.py exited with status ${worker0} on worker 0 before writing" \
           "${WORKDIR}/config.json." >&2
      no_slice_message; return 1
    fi
    if (( SECONDS >= deadline )); then
      echo "Training did not start within START_TIMEOUT_S=${START_TIMEOUT_S} s:" \
           "${WORKDIR}/config.json was not written." >&2
      no_slice_message; return 1
    fi
    sleep "${POLL_S}"
  done
}

wait_for_finish() {
  local deadline=$(( SECONDS + FINISH_TIMEOUT_S )) failures=0 workers statuses count
  workers="$("${GCLOUD_TPU[@]}" describe "${TPU_NAME}" --format='value(networkEndpoints.len())' \
             2>/dev/null || true)"
  while true; do
    statuses="$(worker_statuses all || true)"
    count="$(grep -c . <<<"${statuses}" || true)"
    if [[ "${count}" == 0 ]]; then
      failures=$(( failures + 1 ))
      if (( failures >= MAX_SSH_FAILURES )); then
        echo "No worker answered ${failures} polls in a row (slice state:" \
             "$(slice_state 2>/dev/null || echo unknown)); preempted? Then delete it and run" \
             "'all' again to resume from the newest checkpoint." >&2
        no_slice_message; return 1
      fi
    else
      failures=0
      if ! grep -q running <<<"${statuses}" && [[ -z "${workers}" || "${count}" == "${workers}" ]]; then
        if grep -qv '^0$' <<<"${statuses}"; then
          echo "main.py failed: exit statuses of the workers: $(tr '\n' ' ' <<<"${statuses}")." >&2
          no_slice_message; return 1
        fi
        echo "main.py exited 0 on all ${count} workers."; return 0
      fi
    fi
    if (( SECONDS >= deadline )); then
      echo "Training still running after FINISH_TIMEOUT_S=${FINISH_TIMEOUT_S} s." >&2
      no_slice_message; return 1
    fi
    sleep "${POLL_S}"
  done
}

all() {
  create
  install
  if is_dry_run; then
    show gcloud storage ls -l "${WORKDIR}/config.json"
    show gcloud storage ls "${WORKDIR}/checkpoints/"
    echo "# (listings before the start, to tell this run's writes from earlier ones)"
    start_training "$@"
    show gcloud storage ls -l "${WORKDIR}/config.json"
    echo "# wait for start: every ${POLL_S} s until config.json is (re)written or a new" \
         "checkpoint appears, at most START_TIMEOUT_S=${START_TIMEOUT_S} s; else exit 1, slice kept"
    show "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="${STATUS_COMMAND}"
    echo "# wait for finish: every ${POLL_S} s until main.py exited on every worker, at most" \
         "FINISH_TIMEOUT_S=${FINISH_TIMEOUT_S} s; delete only if all exited 0"
    delete
    return
  fi
  local listing_before checkpoint_before
  listing_before="$(config_listing)"
  checkpoint_before="$(newest_checkpoint)"
  start_training "$@"
  wait_for_start "${listing_before}" "${checkpoint_before}" || exit 1
  echo "Follow the run with 'launch/tpu_pod.sh logs'."
  wait_for_finish || exit 1
  delete
  echo "Deleted ${TPU_NAME}. Newest checkpoint: $(newest_checkpoint)"
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
  all) all "$@" ;;
  *) echo "unknown command ${cmd}; one of create install run logs ssh delete all" >&2; exit 2 ;;
esac
