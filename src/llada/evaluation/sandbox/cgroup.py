"""A cgroup per sandboxed run: one bound on the memory and the processes of its whole process tree.

Resource limits (``RLIMIT_*``) bind each process alone: 32 processes of 1 GB each, or memory held in
memfds and tmpfs, add up past any one of them. A cgroup counts them together (anonymous memory,
page cache, tmpfs and memfd pages alike) and kills the run's processes when they pass
``memory.max``; ``pids.max`` bounds its processes whatever the uid. This needs a cgroup the caller
may create children in: as root, the v1 ``memory`` and ``pids`` hierarchies (children of the
caller's own groups, so that a container's limits still apply above them), or a cgroup v2 group
whose parent already delegates both controllers. Where neither is possible, :func:`cgroup_problem`
says why and runs keep the per-process limits only.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per hierarchy: {"memory": ..., "pids": ..., "": v2 path}."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _v1_folders(paths: dict[str, str]) -> dict[str, Path] | None:
    folders = {name: _ROOT / name / paths[name].lstrip("/") for name in ("memory", "pids") if name in paths}
    if len(folders) == 2 and all((folder / "cgroup.procs").exists() for folder in folders.values()):
        return folders
    return None


def _v2_folder(paths: dict[str, str]) -> Path | None:
    folder = _ROOT / paths.get("", "/").lstrip("/")
    try:
        delegated = (folder / "cgroup.subtree_control").read_text().split()
    except OSError:
        return None
    return folder if {"memory", "pids"} <= set(delegated) else None


class RunCgroup:
    """A fresh cgroup (one per hierarchy) limiting memory to ``memory_mb`` and processes to
    ``processes``; :meth:`join_prefix` is the command prefix that moves a program into it."""

    def __init__(self, memory_mb: int, processes: int) -> None:
        name = f"llada-sandbox-{secrets.token_hex(6)}"
        paths = _own_paths()
        self.folders: list[Path] = []
        try:
            if (v1 := _v1_folders(paths)) is not None:
                memory, pids = v1["memory"] / name, v1["pids"] / name
                for folder in (memory, pids):
                    folder.mkdir()
                    self.folders.append(folder)
                (memory / "memory.limit_in_bytes").write_text(str(memory_mb * 2**20))
                if (memory / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit
                    (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_mb * 2**20))
                (pids / "pids.max").write_text(str(processes))
            elif (v2 := _v2_folder(paths)) is not None:
                folder = v2 / name
                folder.mkdir()
                self.folders.append(folder)
                (folder / "memory.max").write_text(str(memory_mb * 2**20))
                if (folder / "memory.swap.max").exists():
                    (folder / "memory.swap.max").write_text("0")
                (folder / "pids.max").write_text(str(processes))
            else:
                raise OSError("no cgroup hierarchy with the memory and pids controllers to create groups in")
        except OSError:
            self.remove()
            raise

    def join_prefix(self) -> list[str]:
        """``sh -c`` that writes its own pid into each group, then runs the rest of the command."""
        joins = " && ".join(f"echo $$ > {folder / 'cgroup.procs'}" for folder in self.folders)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sandbox"]

    def remove(self) -> None:
        """Remove the groups once their processes are gone (the kernel reaps a killed tree in ms)."""
        for folder in reversed(self.folders):
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.folders = []


@functools.cache
def cgroup_problem() -> str | None:
    """Why a run cannot get its own cgroup here, or None when it can (checked once)."""
    if os.geteuid() != 0 and _v2_folder(_own_paths()) is None:
        return "not root, and no delegated cgroup v2 group with the memory and pids controllers"
    try:
        RunCgroup(64, 8).remove()
    except (OSError, ValueError) as error:
        return f"cannot create a cgroup: {error}"
    return None
