"""The cluster launchers, run here against stand-ins for gcloud, srun and scontrol.

`gcloud compute tpus tpu-vm ssh --worker=all --command=C` is replaced by a script that runs
C with bash in a fake worker's home folder, so the detach, log, status, stop and Python
checks of launch/tpu_pod.sh run for real; `srun` and `scontrol` likewise for the requeue of
launch/slurm.sbatch. The XLA GPU flags that slurm.sbatch exports are checked against this
jaxlib (XLA refuses unknown flags at start-up on any backend).
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, 'launch', 'tpu_pod.sh')
SLURM = os.path.join(ROOT, 'launch', 'slurm.sbatch')


def _script(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize('script', [TPU_POD, SLURM])
def test_scripts_parse(script):
  subprocess.run(['bash', '-n', script], check=True)
  if shutil.which('shellcheck'):
    subprocess.run(['shellcheck', '-S', 'error', script], check=True)


@pytest.fixture
def worker(tmp_path):
  """A fake TPU worker: HOME with a checkout (pyproject, .venv/bin/python) and a gcloud."""
  home = tmp_path / 'home'
  repo = home / 'ogfr_jax'
  (repo / '.venv' / 'bin').mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, 'pyproject.toml'), repo / 'pyproject.toml')
  # `python -m ogfr_jax.main ...` stands for the run: it exits 143 on SIGTERM, as the
  # trainer does after its checkpoint; anything else goes to the real interpreter.
  _script(repo / '.venv' / 'bin' / 'python', f'''#!/bin/bash
if [ "$1" = "-m" ]; then
  trap 'echo "SIGTERM: checkpoint, exit 143"; exit 143' TERM
  echo "main $*"
  while true; do sleep 0.1; done
fi
exec {sys.executable} "$@"
''')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _script(bin_dir / 'gcloud', '''#!/bin/bash
for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}" ;; esac; done
echo "fake gcloud: no --command in $*" >&2; exit 9
''')
  _script(bin_dir / 'curl', '#!/bin/bash\nexit 7\n')  # no TPU metadata: hostname names it
  env = dict(os.environ, HOME=str(home), PATH=f'{bin_dir}:{os.environ["PATH"]}')
  return env, repo


def _pod(env, *args, check=True):
  proc = subprocess.run(['bash', TPU_POD, '--tpu', 't', '--zone', 'z', *args], env=env,
                        capture_output=True, text=True, timeout=120)
  if check:
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def test_tpu_pod_detaches_logs_reports_and_stops(worker):
  env, repo = worker
  started = _pod(env, '--run', 'r1', '--', '--config', 'c.py', '--workdir', 'gs://b/x')
  assert 'started pid' in started.stdout
  logs = sorted(os.listdir(repo / 'logs'))
  assert len(logs) == 2 and logs[0].endswith('.log') and logs[1].endswith('.pid')
  pid = int((repo / 'logs' / logs[1]).read_text())
  os.kill(pid, 0)  # still running after the launching shell ended (detached)
  time.sleep(0.5)
  # The arguments reached the run unchanged; its output goes to the worker's log.
  assert 'main -m ogfr_jax.main --config c.py --workdir gs://b/x' in (
      repo / 'logs' / logs[0]).read_text()
  assert 'running (pid ' in _pod(env, '--status', '--run', 'r1').stdout
  again = _pod(env, '--run', 'r1', '--', '--config', 'c.py', check=False)
  assert again.returncode != 0 and 'still running' in again.stderr
  stopped = _pod(env, '--stop', '--run', 'r1', '--grace', '20')
  assert 'stopped' in stopped.stdout
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  assert 'SIGTERM: checkpoint, exit 143' in (repo / 'logs' / logs[0]).read_text()
  assert 'not running' in _pod(env, '--status', '--run', 'r1').stdout


def test_tpu_pod_checks_the_python_version(worker):
  env, repo = worker
  text = (repo / 'pyproject.toml').read_text()
  (repo / 'pyproject.toml').write_text(
      re.sub(r'requires-python = "[^"]*"', 'requires-python = ">=3.99"', text))
  proc = _pod(env, '--', '--config', 'c.py', check=False)
  assert proc.returncode != 0
  assert "needs requires-python '>=3.99'" in proc.stderr
  assert not list((repo / 'logs').glob('*.pid'))


def test_tpu_pod_refuses_bad_flags(worker):
  env, _ = worker
  for args, message in ((['--run', 'a b', '--status'], '--run a b'),
                        (['--stage_data', '/local=/x', '--', 'x'], 'expected gs://'),
                        (['--bogus'], 'unknown flag --bogus')):
    proc = _pod(env, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_slurm_requeues_on_the_time_limit_signal(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  # The fake tasks handle SIGTERM from before they announce themselves.
  _script(bin_dir / 'srun', f'''#!/bin/bash
trap 'echo "tasks: SIGTERM, checkpoint" >> {calls}; exit 143' TERM
echo "srun $*" >> {calls}
while true; do sleep 0.1; done
''')
  _script(bin_dir / 'scontrol', f'#!/bin/bash\necho "scontrol $*" >> {calls}\n')
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='77',
             OGFR_REPO=str(tmp_path), OGFR_PYTHON='python-of-the-run')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen(['bash', SLURM, '--config', 'c.py', '--workdir', '/w'], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 30
  while not (calls.exists() and 'srun' in calls.read_text()) and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the limit
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 143, out
  lines = calls.read_text().splitlines()
  assert lines[0].startswith('srun --kill-on-bad-exit=1 --cpu-bind=none python-of-the-run '
                             '-m ogfr_jax.main --config c.py --workdir /w')
  assert lines[1:] == ['tasks: SIGTERM, checkpoint', 'scontrol requeue 77'], lines
  assert 'requeued; it resumes from the last checkpoint' in out


def test_slurm_xla_flags_are_known_to_this_jaxlib():
  text = open(SLURM).read()
  flags = re.search(r'OGFR_XLA_GPU_FLAGS:-(.*?)\}"', text, re.S).group(1)
  flags = flags.replace('\\\n', ' ').split()
  assert len(flags) >= 3 and all(f.startswith('--xla_gpu_') for f in flags)
  env = dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu')
  ok = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.ones(1).block_until_ready()'],
                      env=env, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  env['XLA_FLAGS'] = '--xla_gpu_no_such_flag_for_the_check=1'
  bad = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.ones(1)'], env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and 'Unknown flag' in bad.stderr  # the check can fail
