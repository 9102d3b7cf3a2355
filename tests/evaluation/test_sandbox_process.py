"""The sandbox against an attack suite: raw programs (no Python-level guard at all) try each known way
out, and each must be stopped by the isolation and limits themselves, with the host checked afterwards."""

from __future__ import annotations

import os
import platform
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llada.evaluation.sandbox.cgroup import cgroup_problem
from llada.evaluation.sandbox.process import (
    OPEN_FILES,
    IsolationUnavailable,
    SandboxLimits,
    isolation_problem,
    python_command,
    run_sandboxed,
)

needs_isolation = pytest.mark.skipif(isolation_problem() is not None,
                                     reason=f"bubblewrap isolation unavailable here: {isolation_problem()}")


def run_python(source: str, limits: SandboxLimits | None = None, **kwargs):
    return run_sandboxed(python_command() + ["{files}/attack.py", "{channel_fd}"], {"attack.py": source},
                         limits=limits or SandboxLimits(timeout=20), **kwargs)


@needs_isolation
def test_a_plain_program_runs_and_sees_only_its_own_world() -> None:
    """Sanity: the program runs, reads its input, writes its channel, and is not root."""
    result = run_python("import os, sys\nprint(os.getuid(), sorted(os.listdir('/')), sys.stdin.read())\n"
                        "os.write(int(sys.argv[1]), b'done')\n", stdin=b"hello")
    assert result.returncode == 0, result.stderr
    uid, *rest = result.stdout.split(" ", 1)
    assert int(uid) != 0
    assert "'root'" in rest[0] or "'sandbox'" in rest[0]
    assert "'work'" not in rest[0] and "'etc'" not in rest[0] and "'proc'" not in rest[0]
    assert result.stdout.strip().endswith("hello") and result.channel == b"done"


@needs_isolation
@pytest.mark.parametrize("how", [
    "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)",
    "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', PORT))",
    "import importlib, socket\nimportlib.reload(socket)\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
    ("import ctypes, socket, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"  # libc, no Python socket
     "address = struct.pack('<H', 2) + struct.pack('!H4s8x', PORT, socket.inet_aton('127.0.0.1'))\n"
     "assert libc.connect(fd, address, 16) == 0"),
    "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
])
def test_no_network_even_to_the_host_loopback(how: str) -> None:
    """A server listening on the host's loopback is unreachable (its own network namespace)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted, finished = [], threading.Event()

    def accept() -> None:
        while not finished.is_set() and not accepted:
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    watcher = threading.Thread(target=accept)
    watcher.start()
    result = run_python(how.replace("PORT", str(port)) + "\nprint('CONNECTED')\n")
    finished.set()
    watcher.join()
    server.close()
    assert not accepted and "CONNECTED" not in result.stdout
    assert result.returncode != 0


@needs_isolation
@pytest.mark.parametrize("how", [
    "open(TARGET, 'w').write('pwned')",
    "import os\nos.remove(TARGET)",
    "import shutil\nshutil.rmtree(os.path.dirname(TARGET))",
    ("import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo pwned > ' + TARGET], {})\nos.wait()\n"
     "assert open(TARGET).read() == 'pwned'"),
    "import ctypes\nassert ctypes.CDLL(None).unlink(TARGET.encode()) == 0",
    "import subprocess\nsubprocess.run(['rm', '-f', TARGET], check=True)\nassert not os.path.exists(TARGET)",
])
def test_host_files_cannot_be_written_or_deleted(tmp_path: Path, how: str) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("intact")
    run_python("import os\nTARGET = " + repr(str(target)) + "\n" + how + "\n")
    assert target.read_text() == "intact"


@needs_isolation
def test_read_only_system_and_private_tmp(tmp_path: Path) -> None:
    """System folders are read-only; what the program writes to /tmp stays in its own /tmp."""
    marker = f"llada-sandbox-{secrets.token_hex(4)}"
    result = run_python(f"import os, sys\nopen('/tmp/{marker}', 'w').write('x')\n"
                        f"try:\n    open(sys.base_prefix + '/{marker}', 'w')\nexcept OSError as e:\n    print(e)\n")
    assert "Read-only file system" in result.stdout, result.stderr
    assert not Path(f"/tmp/{marker}").exists()
    assert not Path(sys.base_prefix, marker).exists()


@needs_isolation
def test_host_secrets_cannot_be_read(tmp_path: Path, monkeypatch) -> None:
    """Files outside the system folders, the caller's environment and /proc of the caller are out of reach."""
    secret = secrets.token_hex(16)
    (tmp_path / "secret.txt").write_text(secret)
    monkeypatch.setenv("LLADA_TEST_SECRET", secret)
    source = (
        "import os\n"
        f"for path in [{str(tmp_path / 'secret.txt')!r}, '/proc/1/environ', '/proc/self/environ',\n"
        f"             '/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ', {str(Path(__file__))!r}]:\n"
        "    try:\n        print(open(path, errors='replace').read())\n"
        "    except OSError as error:\n        print('blocked', error)\n"
        "print(dict(os.environ))\n")
    result = run_python(source)
    assert secret not in result.stdout and secret not in result.stderr
    assert "blocked" in result.stdout
    assert "LLADA_TEST_SECRET" not in result.stdout


@needs_isolation
def test_processes_outside_cannot_be_signalled() -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result = run_python(f"import os, signal\nfor pid in ({victim.pid}, {os.getpid()}, 1, -1):\n"
                            "    try:\n        os.kill(pid, signal.SIGKILL)\n"
                            "    except OSError as error:\n        print(pid, error)\n")
        time.sleep(0.2)
        assert victim.poll() is None, "a process outside the sandbox was killed"
        assert result.stdout.count("No such process") + result.stdout.count("not permitted") >= 2
    finally:
        victim.kill()
        victim.wait()


@needs_isolation
def test_fork_bomb_is_capped_by_the_process_limit() -> None:
    """RLIMIT_NPROC binds even when the caller is root (the program runs as a fresh unprivileged uid)."""
    limits = SandboxLimits(timeout=20, processes=16)
    result = run_python("import os, time\nn = 0\ntry:\n    for _ in range(500):\n        if os.fork() == 0:\n"
                        "            time.sleep(5)\n            os._exit(0)\n        n += 1\n"
                        "except OSError as error:\n    print('capped', n)\n", limits=limits)
    assert result.stdout.startswith("capped"), result.stdout + result.stderr
    assert int(result.stdout.split()[1]) < limits.processes


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@needs_isolation
@pytest.mark.parametrize("main_waits", [True, False])
def test_the_whole_process_tree_dies_with_the_run(main_waits: bool) -> None:
    """Daemonised grandchildren do not outlive the run: after a timeout, or after the main program exits."""
    marker = f"grandchild_{secrets.token_hex(6)}"
    source = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        time.sleep(120)\n    os._exit(0)\n" + ("time.sleep(120)\n" if main_waits else "time.sleep(0.5)\n"))
    started = time.time()
    result = run_sandboxed(python_command() + [f"{{files}}/{marker}.py"], {f"{marker}.py": source},
                           limits=SandboxLimits(timeout=2))
    assert time.time() - started < 20
    assert result.timed_out == main_waits
    time.sleep(0.5)
    assert _host_processes_with(marker) == []


@needs_isolation
@pytest.mark.parametrize("program, check", [
    ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
     lambda r: len(r.stdout) <= 64 * 1024 and r.returncode != 0),
    ("open('/tmp/big', 'w').write('x' * 10_000_000)\n", lambda r: r.returncode != 0),
    ("x = bytearray(3 * 1024 ** 3)\n", lambda r: "MemoryError" in r.stderr),
    ("while True:\n    pass\n", lambda r: r.returncode != 0 and not r.timed_out),
    ("import time\ntime.sleep(60)\n", lambda r: r.timed_out),
])
def test_resource_limits(program: str, check) -> None:
    limits = SandboxLimits(timeout=4, cpu_seconds=2, memory_mb=512, output_kb=64)
    started = time.time()
    result = run_python(program, limits=limits)
    assert check(result), (result.returncode, result.stderr[-300:])
    assert time.time() - started < 15


@needs_isolation
@pytest.mark.skipif(cgroup_problem() is not None, reason=f"no cgroup for a run here: {cgroup_problem()}")
def test_one_memory_bound_for_the_whole_run() -> None:
    """Four processes of 300 MB each are within the per-process limit but not the run's (512 MB): some
    are killed; and the run's cgroup is gone afterwards."""
    program = ("import os\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
               "        data = bytearray(300 * 2**20)\n        for k in range(0, len(data), 4096):\n"
               "            data[k] = 1\n        os._exit(0)\n    kids.append(pid)\n"
               "print(sum(os.waitpid(pid, 0)[1] != 0 for pid in kids))\n")
    before = set(Path("/sys/fs/cgroup").rglob("llada-sandbox-*"))
    result = run_python(program, limits=SandboxLimits(timeout=30, memory_mb=1024, total_memory_mb=512))
    assert int(result.stdout) >= 1, result.stderr
    assert set(Path("/sys/fs/cgroup").rglob("llada-sandbox-*")) == before


@needs_isolation
def test_memory_in_memfds_is_bounded() -> None:
    """memfd pages count against no per-process limit; open files (and each file's size) bound them."""
    program = ("import os\nfds = []\ntry:\n    while len(fds) < 2000:\n"
               "        fd = os.memfd_create('x')\n        os.write(fd, b'x' * 2**20)\n        fds.append(fd)\n"
               "except OSError as error:\n    pass\nprint(len(fds))\n")
    result = run_python(program, limits=SandboxLimits(timeout=30))
    assert 0 < int(result.stdout) <= OPEN_FILES, result.stderr


@needs_isolation
def test_a_program_that_never_reads_its_input_still_times_out() -> None:
    started = time.time()
    result = run_python("import time\ntime.sleep(60)\n", limits=SandboxLimits(timeout=2), stdin=b"x" * 2**20)
    assert result.timed_out and time.time() - started < 10


@needs_isolation
@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="no keyring filter for this machine")
def test_kernel_keyrings_are_out_of_reach() -> None:
    """Keys would outlive the run in the kernel, per uid: add_key and keyctl fail with EPERM."""
    numbers = {"x86_64": (248, 250), "aarch64": (217, 219)}[platform.machine()]
    result = run_python(f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                        f"print(libc.syscall({numbers[0]}, b'user', b'k', b'v', 1, -3), ctypes.get_errno())\n"
                        f"print(libc.syscall({numbers[1]}, 0, -3, 0, 0, 0), ctypes.get_errno())\n")
    assert result.stdout.split() == ["-1", "1", "-1", "1"], result.stdout + result.stderr


def test_refuses_without_isolation_unless_asked(monkeypatch) -> None:
    """Where bubblewrap cannot run, untrusted code is refused, naming the way to accept the risk."""
    from llada.evaluation.sandbox import process as sandbox

    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "bwrap is not installed")
    with pytest.raises(IsolationUnavailable, match="isolation='none'"):
        run_python("print('ran')")
    result = run_python("print('ran')", isolation="none")
    assert result.stdout.strip() == "ran"


def test_limits_still_bind_without_isolation() -> None:
    result = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout=10, cpu_seconds=1), isolation="none")
    assert result.returncode != 0 and not result.timed_out


def test_bad_limits_and_file_names_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", limits=SandboxLimits(timeout=0))
    with pytest.raises(ValueError, match="plain names"):
        run_sandboxed(["true"], {"../escape.py": ""}, isolation="none")
