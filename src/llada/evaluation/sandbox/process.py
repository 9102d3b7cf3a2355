"""Run untrusted programs (model-written code) isolated from the machine, with limits that bind.

Isolation comes from bubblewrap (``bwrap``, Debian's ``bubblewrap`` package), not from patching
Python: each run gets

- its own mount namespace: a read-only view of the system's programs and libraries (``/usr``,
  the Python installation) and nothing else of the host (no home, no project, no ``/etc``, no
  ``/proc``); a private, size-limited, writable ``/tmp`` that is the working directory; the run's
  files read-only under ``/sandbox``;
- its own network namespace (no interface but a loopback that is down: no network at all), and
  its own IPC and UTS namespaces;
- its own PID namespace: it sees only its own processes, cannot signal the caller's, and the whole
  process tree (daemons and grandchildren included) dies with it on a timeout;
- an unprivileged user: when the caller is root, a fresh uid (never root) is taken with ``setpriv``
  inside the sandbox, with no capabilities and ``no_new_privs``, so that the process limit binds
  (``RLIMIT_NPROC`` does not bind root); otherwise bubblewrap's user namespace maps the caller's own
  unprivileged uid;
- resource limits set with ``prlimit`` before bubblewrap starts, inherited by every process of the
  run: CPU seconds, address space, number of processes, open files, size of any file written
  (stdout and stderr are files, so their size is bounded too) and no core dumps; where the host
  allows it, a cgroup of its own bounding the memory and processes of the whole run
  (:mod:`llada.evaluation.sandbox.cgroup`); a wall-clock timeout over the whole run; a clean environment;
- a seccomp filter refusing the kernel keyring calls, whose state would outlive the run
  (:mod:`llada.evaluation.sandbox.seccomp`).

Where bubblewrap (or, as root, ``setpriv``) is missing or cannot create namespaces,
:func:`isolation_problem` says why and :func:`run_sandboxed` refuses to run untrusted code unless
the caller passes ``isolation="none"``, which keeps only the resource limits and the timeout: the
program can then read and write whatever the caller can, and reach the network.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from llada.evaluation.sandbox.cgroup import RunCgroup, cgroup_problem
from llada.evaluation.sandbox.seccomp import keyring_filter

Isolation = Literal["bubblewrap", "none"]

# Where the run's files appear inside the sandbox (read-only) and its writable working directory.
SANDBOX_FILES = "/sandbox"
SANDBOX_TMP = "/tmp"
# Open files per process: enough for Python and bubblewrap, and a bound on memory held in memfds
# (each at most output_kb, as any file).
OPEN_FILES = 128
# Unprivileged uids for runs started by root: one per run, so that runs never share a process count.
_UID_RANGE = (200_000, 2_000_000_000)


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Limits of one sandboxed run; all bind whoever the caller is."""

    timeout: float = 10.0   # wall-clock seconds for the whole process tree
    cpu_seconds: int = 10   # CPU seconds per process (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024   # address space per process
    processes: int = 32     # processes (and threads) the run may have at once
    output_kb: int = 1024   # size of stdout, of stderr and of every file the program writes
    tmp_mb: int = 64        # size of the private writable /tmp
    total_memory_mb: int = 1024  # memory of the whole run, all its processes, tmpfs and memfds (a cgroup)

    def validate(self) -> None:
        for name in ("timeout", "cpu_seconds", "memory_mb", "processes", "output_kb", "tmp_mb", "total_memory_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    """What a run left behind: exit status (negative: killed by that signal), bounded outputs, and
    ``channel``, what the program wrote to the file descriptor given to it as ``{channel_fd}``."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    channel: bytes


class IsolationUnavailable(RuntimeError):
    """Raised when untrusted code would run without isolation that the caller did not ask to give up."""


def _python_paths() -> tuple[str, list[str]]:
    """The interpreter to run inside the sandbox (the base installation, never a virtual
    environment: the program gets the standard library and nothing the project installed) and the
    host folders it needs, read-only."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    folders = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
               os.path.dirname(executable)}
    return executable, sorted(folders)


def _system_folders() -> list[tuple[str, str | None]]:
    """(path, symlink target or None) for the system folders every program needs."""
    entries = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            entries.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            entries.append((path, None))
    return entries


def _mkdirs(args: list[str], path: str, made: set[str]) -> None:
    """Create ``path``'s ancestors in the sandbox world-readable (bubblewrap makes them 0700)."""
    parts = Path(path).parent.parts[1:]
    current = ""
    for part in parts:
        current += "/" + part
        if current not in made:
            made.add(current)
            args += ["--perms", "0755", "--dir", current]


def bubblewrap_command(files_dir: str, limits: SandboxLimits, as_root: bool, seccomp_fd: int | None = None) -> list[str]:
    """The ``prlimit … bwrap …`` prefix that runs a command isolated, with ``files_dir`` at /sandbox
    and, given ``seccomp_fd`` (a readable descriptor of :func:`keyring_filter`'s program), the
    kernel keyring calls refused."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise IsolationUnavailable("bubblewrap (bwrap) is needed")
    # The process limit is set here only (unisolated runs never had it: root is exempt from it).
    command = _prlimit_command(limits, f"--nproc={limits.processes}") + [
        bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SANDBOX_TMP,
        "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    if not as_root:  # an unprivileged caller: bubblewrap's user namespace, the caller's own uid outside
        command += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns"]
    made: set[str] = set()
    for path, target in _system_folders():
        command += ["--symlink", target, path] if target else ["--ro-bind", path, path]
        made.add(path)
    _, python_folders = _python_paths()
    for folder in python_folders:
        if not any(folder == root or folder.startswith(root + "/") for root in made):
            _mkdirs(command, folder, made)
            command += ["--ro-bind", folder, folder]
            made.add(folder)
    command += ["--dev", "/dev", "--perms", "01777", "--size", str(limits.tmp_mb * 2**20), "--tmpfs", SANDBOX_TMP,
                "--ro-bind", files_dir, SANDBOX_FILES, "--chdir", SANDBOX_TMP, "--"]
    if as_root:  # drop to a fresh unprivileged uid inside, with no capabilities left
        uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise IsolationUnavailable("running as root needs setpriv (util-linux) to drop to an unprivileged uid")
        command += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
    return command


def _prlimit_command(limits: SandboxLimits, *more: str) -> list[str]:
    """The ``prlimit … --`` prefix setting ``limits`` (and ``more`` of prlimit's options) for every
    process the command starts."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise IsolationUnavailable("prlimit (util-linux) is needed")
    return [prlimit, f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}", f"--as={limits.memory_mb * 2**20}",
            f"--fsize={limits.output_kb * 1024}", f"--nofile={OPEN_FILES}", "--core=0", *more, "--"]


@contextlib.contextmanager
def _seccomp_file(folder: str) -> Iterator[BinaryIO | None]:
    """The keyring filter in a file of ``folder``, open for reading (None where no filter is known)."""
    program = keyring_filter()
    if program is None:
        yield None
        return
    path = os.path.join(folder, ".seccomp")
    Path(path).write_bytes(program)
    with open(path, "rb") as handle:
        yield handle


@functools.cache
def isolation_problem() -> str | None:
    """Why bubblewrap isolation cannot be used here, or None when it works (checked once, by
    running ``true`` in a sandbox)."""
    try:
        with tempfile.TemporaryDirectory() as files, _seccomp_file(files) as seccomp:
            os.chmod(files, 0o755)
            fds = () if seccomp is None else (seccomp.fileno(),)
            command = bubblewrap_command(files, SandboxLimits(), os.geteuid() == 0, *fds) + ["/bin/true"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False, pass_fds=fds)
    except IsolationUnavailable as error:
        return str(error)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bubblewrap could not start: {error}"
    if done.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {done.stderr.strip()[-300:]}"
    return None


def require_isolation(isolation: Isolation) -> None:
    """Refuse, naming why and the way out, when ``isolation`` asks for bubblewrap and it cannot run."""
    if isolation not in ("bubblewrap", "none"):
        raise ValueError(f"isolation must be 'bubblewrap' or 'none', got {isolation!r}")
    if isolation == "bubblewrap" and (problem := isolation_problem()) is not None:
        raise IsolationUnavailable(f"cannot isolate model-written code: {problem}. Install bubblewrap (apt-get "
                                   "install bubblewrap), or accept running it with resource limits only, where it "
                                   "can read and write your files and reach the network: --unsafe-no-isolation on "
                                   "the command line, isolation='none' in Python")


def python_command() -> list[str]:
    """The command that runs the standard library's Python inside the sandbox (isolated mode: no
    user site, no environment variables read, no site-packages)."""
    executable, _ = _python_paths()
    return [executable, "-I", "-S"]


def _read_bounded(path: str, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit)


class SandboxProcess:
    """One program started in a sandbox in the background; ``wait`` collects its result.

    ``{channel_fd}`` in the command becomes the number of a file descriptor the program may write
    to (what it wrote comes back as ``result.channel``, at most 4 KiB); ``{files}`` becomes the
    folder holding ``files`` ({name: text}, read-only: ``/sandbox`` under bubblewrap, a temporary
    folder otherwise). ``pass_fds`` are further descriptors the program inherits under the same
    numbers (pipes to another sandboxed program, say). ``stdin`` is the program's whole input.

    Raises:
        IsolationUnavailable: bubblewrap cannot be used here and ``isolation`` is not ``"none"``.
    """

    def __init__(self, command: list[str], files: dict[str, str], *, stdin: bytes = b"",
                 pass_fds: tuple[int, ...] = (), limits: SandboxLimits | None = None,
                 isolation: Isolation = "bubblewrap") -> None:
        self.limits = limits = limits or SandboxLimits()
        limits.validate()
        require_isolation(isolation)
        for name in files:
            if "/" in name or name.startswith("."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
        self._cgroup = RunCgroup(limits.total_memory_mb, limits.processes) if cgroup_problem() is None else None
        self._folder: tempfile.TemporaryDirectory | None = None
        try:
            self._start(command, files, stdin, pass_fds, isolation)
        except BaseException:
            self._release()
            raise

    def _start(self, command: list[str], files: dict[str, str], stdin: bytes, pass_fds: tuple[int, ...],
               isolation: Isolation) -> None:
        limits = self.limits
        self._folder = tempfile.TemporaryDirectory(prefix="llada-sandbox-")
        host_dir = self._folder.name
        os.chmod(host_dir, 0o755)
        files_dir = os.path.join(host_dir, "files")
        os.mkdir(files_dir, 0o755)
        for name, text in files.items():
            path = os.path.join(files_dir, name)
            Path(path).write_text(text, encoding="utf-8")
            os.chmod(path, 0o644)
        self._outputs = {name: os.path.join(host_dir, name) for name in ("stdout", "stderr", "channel")}
        with contextlib.ExitStack() as opened:  # the child keeps its copies; ours close once it started
            handles = {name: opened.enter_context(open(path, "wb")) for name, path in self._outputs.items()}
            channel_fd = handles["channel"].fileno()
            if isolation == "bubblewrap":
                seccomp = opened.enter_context(_seccomp_file(host_dir))
                seccomp_fd = None if seccomp is None else seccomp.fileno()
                pass_fds = pass_fds if seccomp_fd is None else (*pass_fds, seccomp_fd)
                prefix = bubblewrap_command(files_dir, limits, os.geteuid() == 0, seccomp_fd)
                files_path, cwd = SANDBOX_FILES, None
            else:
                prefix, files_path, cwd = _prlimit_command(limits), files_dir, files_dir
            argv = prefix + [part.format(channel_fd=channel_fd, files=files_path) for part in command]
            if self._cgroup is not None:
                argv = self._cgroup.join_prefix() + argv
            environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=handles["stdout"],
                                            stderr=handles["stderr"], pass_fds=(channel_fd, *pass_fds), cwd=cwd,
                                            env=environment, start_new_session=True)
        # Written from a thread: a program that does not read its input must not stall the caller's timeout.
        self._writer = threading.Thread(target=self._write_input, args=(stdin,), daemon=True)
        self._writer.start()

    def _write_input(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.close()
        except (BrokenPipeError, OSError):  # the program exited, or closed its input, before reading it
            pass

    def kill(self) -> None:
        """Kill the run: its process group (bubblewrap's sandbox then dies with its parent, taking its
        whole PID namespace along)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, deadline: float | None = None) -> SandboxResult:
        """The result once the program has ended, or once ``deadline`` (``time.monotonic()``; default:
        the limits' timeout from now) has passed and it has been killed."""
        deadline = time.monotonic() + self.limits.timeout if deadline is None else deadline
        timed_out = False
        try:
            returncode = self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            returncode = self.process.wait()
        limit = self.limits.output_kb * 1024
        result = SandboxResult(returncode=returncode,
                               stdout=_read_bounded(self._outputs["stdout"], limit).decode("utf-8", "replace"),
                               stderr=_read_bounded(self._outputs["stderr"], limit).decode("utf-8", "replace"),
                               timed_out=timed_out, channel=_read_bounded(self._outputs["channel"], 4096))
        self._release()
        return result

    def _release(self) -> None:
        if self._cgroup is not None:
            self._cgroup.remove()
        if self._folder is not None:
            self._folder.cleanup()


def run_sandboxed(command: list[str], files: dict[str, str], *, stdin: bytes = b"",
                  limits: SandboxLimits | None = None, isolation: Isolation = "bubblewrap") -> SandboxResult:
    """Run ``command`` in a sandbox to its end or its timeout (see :class:`SandboxProcess`)."""
    return SandboxProcess(command, files, stdin=stdin, limits=limits, isolation=isolation).wait()
