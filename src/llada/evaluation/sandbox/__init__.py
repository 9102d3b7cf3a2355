"""Isolation for untrusted code: a bubblewrap sandbox with resource limits (``process``), a cgroup per
run (``cgroup``) and a seccomp filter (``seccomp``)."""
