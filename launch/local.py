#!/usr/bin/env python3
r"""Starts N JAX processes on this machine, each with its own fake CPU devices.

A stand-in for a multi-host cluster when testing: every process runs the same command with
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I
appended, on the CPU backend with --devices_per_process fake devices (XLA's
--xla_force_host_platform_device_count), and the processes form one global mesh through
jax.distributed and gloo collectives.

  python launch/local.py --num_processes 2 --devices_per_process 4 -- \
      python -m ogfr_jax.main --config configs/synthetic.py:runlocal --workdir /tmp/ogfr_mp

Flags:
  --num_processes N          processes to start (default 2)
  --devices_per_process D    fake CPU devices of each process (default 4)
  --port P                   coordinator port on 127.0.0.1 (default: a free one)
  --log_dir DIR              write process I's output to DIR/process_I.log instead of the
                             terminal
  --timeout S                stop everything after S seconds (default: no limit)

If one process fails, the others would wait forever in their next collective, so they are
stopped; the exit status is the first failing process's (0 when all succeed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

_DEVICE_FLAG = '--xla_force_host_platform_device_count'


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of one process: CPU backend with `devices` fake devices."""
  env = dict(os.environ if base is None else base)
  kept = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_FLAG)]
  env['XLA_FLAGS'] = ' '.join(kept + [f'{_DEVICE_FLAG}={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def process_command(command: list[str], *, port: int, num_processes: int,
                    process_id: int) -> list[str]:
  return command + [f'--coordinator_address=127.0.0.1:{port}',
                    f'--num_processes={num_processes}', f'--process_id={process_id}']


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: list[str], *, num_processes: int = 2, devices_per_process: int = 4,
           port: int = 0, log_dir: str | None = None, timeout_s: float = 0.0,
           env: dict[str, str] | None = None) -> int:
  """Runs the processes to completion; returns 0 or the first failing exit status."""
  if not command:
    raise ValueError('no command to launch (put it after --)')
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f'--num_processes ({num_processes}) and --devices_per_process '
                     f'({devices_per_process}) must be >= 1')
  port = port or free_port()
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  procs, logs = [], []
  try:
    for i in range(num_processes):
      cmd = process_command(command, port=port, num_processes=num_processes, process_id=i)
      out = None
      if log_dir:
        out = open(os.path.join(log_dir, f'process_{i}.log'), 'w')
        logs.append(out)
      procs.append(subprocess.Popen(cmd, env=process_env(devices_per_process, env), stdout=out,
                                    stderr=subprocess.STDOUT if out else None))
    start = time.time()
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        _stop(procs)
        return failed[0]
      if all(c == 0 for c in codes):
        return 0
      if timeout_s and time.time() - start > timeout_s:
        _stop(procs)
        print(f'launch/local.py: stopped after {timeout_s:.0f} s: {shlex.join(command)}',
              file=sys.stderr)
        return 124
      time.sleep(0.2)
  finally:
    _stop(procs)
    for f in logs:
      f.close()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '--' not in argv:
    print('usage: launch/local.py [flags] -- COMMAND ...   (see the module docstring)',
          file=sys.stderr)
    return 2
  split = argv.index('--')
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--num_processes', type=int, default=2)
  p.add_argument('--devices_per_process', type=int, default=4)
  p.add_argument('--port', type=int, default=0)
  p.add_argument('--log_dir', default=None)
  p.add_argument('--timeout', type=float, default=0.0)
  args = p.parse_args(argv[:split])
  try:
    return launch(argv[split + 1:], num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, port=args.port,
                  log_dir=args.log_dir, timeout_s=args.timeout)
  except ValueError as e:
    print(f'launch/local.py: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
