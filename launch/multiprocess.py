r"""Runs perl_jax.main as N local processes that form one mesh: the multi-host path, on one machine.

  python -m launch.multiprocess --processes=2 --devices_per_process=4 -- \
      --config=configs/demo.py:small --workdir=/tmp/demo_2proc

Process i runs `python -m perl_jax.main --distributed --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i ARGS...`; with --devices_per_process each is given that many CPU
devices (XLA_FLAGS). Output comes through with a `[pI]` prefix (process 0 reports progress, the
others only errors). When one process exits with an error, the launcher says which and how, gives
the others --grace_s to stop on their own (they notice the lost peer: perl_jax.distributed), then
kills them. Exit code: 0 if all succeed, else the first failing process's code (128 + signal when
killed). Rerunning the same command resumes from the last complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_command(args: list[str], index: int, count: int, port: int,
                    heartbeat_timeout_s: int = 30) -> list[str]:
  return [sys.executable, "-u", "-m", "perl_jax.main", "--distributed",
          f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
          f"--process_id={index}", f"--heartbeat_timeout_s={heartbeat_timeout_s}", *args]


def process_env(devices_per_process: int) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if devices_per_process:
    flag = f"--xla_force_host_platform_device_count={devices_per_process}"
    kept = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(kept + [flag])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()


def describe_exit(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with code {code}"


def run(args: list[str], processes: int, devices_per_process: int = 0, port: int = 0,
        grace_s: float = 60.0, heartbeat_timeout_s: int = 30, out=sys.stdout) -> int:
  """Starts the processes, waits for them; returns the launcher's exit code (see the module)."""
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}")
  port = port or free_port()
  env = process_env(devices_per_process)
  children, threads, exited_at = [], [], {}

  def wait_for(index, child):  # the exit time, so that exits seen in one poll round keep order
    child.wait()
    exited_at[index] = time.monotonic()

  for index in range(processes):
    child = subprocess.Popen(process_command(args, index, processes, port, heartbeat_timeout_s),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    thread = threading.Thread(target=_forward, args=(child.stdout, f"[p{index}] ", out),
                              daemon=True)
    thread.start()
    children.append(child)
    threads.append(thread)
    threading.Thread(target=wait_for, args=(index, child), daemon=True).start()
  say = lambda message: (out.write(f"[launch] {message}\n"), out.flush())
  say(f"{processes} processes, coordinator 127.0.0.1:{port}, pids "
      f"{' '.join(str(c.pid) for c in children)}")
  first_failure, failed_at, reported, killed = None, None, set(), set()
  try:
    while len(reported) < processes:
      # Oldest exit first: a killed process and the one its loss brings down can both have
      # exited by the time this loop looks, and the first is the cause.
      for index in sorted(set(exited_at) - reported, key=exited_at.get):
        code = children[index].returncode
        reported.add(index)
        if code and first_failure is None:
          first_failure, failed_at = (index, code), exited_at[index]
          say(f"process {index} {describe_exit(code)}; waiting up to {grace_s:.0f}s for the "
              f"others to stop")
        elif first_failure is not None and index not in killed:
          say(f"process {index} {describe_exit(code)} on its own, "
              f"{exited_at[index] - failed_at:.1f}s after process {first_failure[0]} failed")
      if failed_at is not None and time.monotonic() > failed_at + grace_s:
        for index, child in enumerate(children):
          if child.poll() is None and index not in killed:
            say(f"process {index} still running {grace_s:.0f}s after process "
                f"{first_failure[0]} failed: killing it")
            child.kill()
            killed.add(index)
      time.sleep(0.1)
  except KeyboardInterrupt:
    for child in children:
      child.send_signal(signal.SIGINT)
    raise
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
      child.wait()
    for thread in threads:
      thread.join(timeout=5)
  if first_failure is None:
    say(f"all {processes} processes finished")
    return 0
  index, code = first_failure
  say(f"FAILED: process {index} {describe_exit(code)} first. Rerun the same command to resume "
      f"from the last complete checkpoint")
  return 128 - code if code < 0 else code


def main(argv):
  f = flags.FLAGS
  sys.exit(run(argv[1:], f.processes, f.devices_per_process, f.port, f.grace_s,
               f.heartbeat_timeout_s))


def define_flags():
  """The launcher's flags (defined only when it runs: importing it defines none)."""
  flags.DEFINE_integer("processes", 2, "How many processes.")
  flags.DEFINE_integer(
      "devices_per_process", 0, "CPU devices per process (XLA_FLAGS "
      "--xla_force_host_platform_device_count); 0 leaves the platform's devices as they are.")
  flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
  flags.DEFINE_float(
      "grace_s", 60.0, "After a process fails, how long the others may take to stop on their own "
      "before they are killed.")
  flags.DEFINE_integer("heartbeat_timeout_s", 30, "Passed to perl_jax.main (see its flag).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
