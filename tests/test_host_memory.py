"""host_memory.py: when a job restarts itself with glibc's huge-page tunable, and that it does."""
import os
import subprocess
import sys

import pytest

from detailflow_jax import host_memory

GLIBC = (2, 36)


def test_reads_the_bracketed_mode(tmp_path):
  mode_file = tmp_path / "enabled"
  mode_file.write_text("always [madvise] never\n")
  assert host_memory.transparent_hugepage_mode(str(mode_file)) == "madvise"
  mode_file.write_text("[always] madvise never\n")
  assert host_memory.transparent_hugepage_mode(str(mode_file)) == "always"
  assert host_memory.transparent_hugepage_mode(str(tmp_path / "absent")) is None


def test_adds_the_tunable_only_where_it_helps():
  restart = host_memory.tunables_with_hugepages
  assert restart({}, "madvise", GLIBC) == "glibc.malloc.hugetlb=1"
  # Other tunables are kept.
  assert (restart({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  # Already there (the restarted process, or the user's own choice, even 0): no restart.
  assert restart({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", GLIBC) is None
  assert restart({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=0"}, "madvise", GLIBC) is None
  # Turned off by the user; huge pages everywhere already, or nowhere; no such tunable.
  assert restart({host_memory.OPT_OUT_VARIABLE: "0"}, "madvise", GLIBC) is None
  assert restart({host_memory.OPT_OUT_VARIABLE: "1"}, "madvise", GLIBC) == "glibc.malloc.hugetlb=1"
  assert restart({}, "always", GLIBC) is None
  assert restart({}, "never", GLIBC) is None
  assert restart({}, None, GLIBC) is None
  assert restart({}, "madvise", None) is None        # not glibc
  assert restart({}, "madvise", (2, 34)) is None     # before the tunable existed


@pytest.mark.skipif(host_memory.glibc_version() is None
                    or host_memory.glibc_version() < host_memory.FIRST_GLIBC_WITH_TUNABLE,
                    reason="needs glibc >= 2.35 (glibc.malloc.hugetlb)")
def test_the_process_restarts_once_with_the_tunable_and_keeps_its_id(tmp_path):
  mode_file = tmp_path / "enabled"
  mode_file.write_text("always [madvise] never\n")
  script = (
      "import os\n"
      "from detailflow_jax import host_memory\n"
      f"host_memory.THP_MODE_FILE = {str(mode_file)!r}\n"
      "print('start', os.getpid(), flush=True)\n"
      "host_memory.restart_with_hugepages()\n"
      "print('running', os.getpid(), os.environ['GLIBC_TUNABLES'], flush=True)\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT_VARIABLE)}
  lines = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
  starts = [line.split()[1] for line in lines if line.startswith("start")]
  running = [line.split() for line in lines if line.startswith("running")]
  assert len(starts) == 2 and starts[0] == starts[1]        # one restart, same process
  assert running == [["running", starts[0], "glibc.malloc.hugetlb=1"]]
