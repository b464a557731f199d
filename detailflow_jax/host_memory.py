"""Transparent huge pages for the host heap of a job (glibc's `glibc.malloc.hugetlb` tunable).

XLA:CPU takes every step's buffers from glibc's malloc, and glibc hands the freed memory back to
the kernel between steps, so the next step faults it in again, 4 KiB at a time: a train step of
the tiny tokenizer took about 50,000 page faults, a fifth of the job's CPU time in the kernel.
Most Linux hosts give transparent huge pages only to memory that asks for them (the `madvise`
mode of /sys/kernel/mm/transparent_hugepage/enabled); with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
malloc asks, the same memory comes back in 2 MiB pages, and the tiny tokenizer trains 1.5x
faster with the same numbers (docs/performance.md).

The tunable is read once, when the process starts, so `main.py` restarts itself with it
(`os.execv`: same process id, same arguments) before it parses its flags or starts JAX's
backends (importing the package first costs about a second). Nothing happens
where it would not help: not glibc or glibc < 2.35 (no such tunable), huge pages `always` (every
heap already has them) or `never`, a GLIBC_TUNABLES that already says glibc.malloc.hugetlb (the
user's choice stands), or DETAILFLOW_HOST_HUGEPAGES=0 in the environment (the switch to turn it
off).
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_VARIABLE = "DETAILFLOW_HOST_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
FIRST_GLIBC_WITH_TUNABLE = (2, 35)


def transparent_hugepage_mode(path=None):
  """The kernel's mode ('always', 'madvise' or 'never': the bracketed word), None if unknown."""
  try:
    with open(path or THP_MODE_FILE, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version():
  """(major, minor) of the C library this Python runs on, None when it is not glibc."""
  name, version = platform.libc_ver()
  if name != "glibc":
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def tunables_with_hugepages(environ, thp_mode, libc_version):
  """The GLIBC_TUNABLES value to restart with, or None when the process should stay as it is."""
  if environ.get(OPT_OUT_VARIABLE) == "0":
    return None
  if thp_mode != "madvise" or libc_version is None or libc_version < FIRST_GLIBC_WITH_TUNABLE:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if any(entry.split("=")[0] == TUNABLE for entry in current.split(":") if entry):
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def restart_with_hugepages():
  """Re-executes this process with the tunable set when it would help; returns otherwise.

  Call first thing in an entry point, before JAX starts its backends: exec replaces the process.
  """
  tunables = tunables_with_hugepages(os.environ, transparent_hugepage_mode(), glibc_version())
  if tunables is None:
    return
  os.environ["GLIBC_TUNABLES"] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
