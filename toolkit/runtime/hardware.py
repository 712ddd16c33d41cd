"""One answer, everywhere, to "how many threads" and "which device": evaluation, benchmarks, training and the
service all ask here.

The cores a process may use are its CPU affinity (taskset, a cpuset) and its cgroup's CPU quota (Kubernetes
`resources.limits.cpu`, `docker run --cpus`), whichever is tighter: under a quota the affinity still shows every
host core, and as many intra-op threads as host cores are throttled together once the quota is spent. A fractional
quota is rounded up: with 1.5 CPUs, two threads can spend the whole quota (and are throttled for part of each
period when both are busy), one would leave a third of it unused. Go 1.25's default GOMAXPROCS rounds up too
(`ceil`, at least 2: runtime/cgroup_linux.go) and so does .NET's `Environment.ProcessorCount` ("the CPU utilization
limit rounded up to the next whole number"); here at least 1. Unlike Go, which reads only the process's own
cgroup, every cgroup from there up to the mount's root counts: a parent's quota binds its children. TOOLKIT_THREADS
overrides all of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

Backend = Literal["torch", "onnx"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts the `cpu` controller under the root: alone, or together with cpuacct.
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


class CoreCount(NamedTuple):
    """Where `available_cores()` came from: the affinity, the cgroup CPU quota (CPUs, None when unlimited), the
    count chosen and a line saying so, for logs and the run manifest."""

    affinity: int
    quota: float | None
    cores: int
    text: str


def affinity_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset's or a cpuset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _v2_quota(folder: Path) -> float | None:
    """`cpu.max`: "max 100000" (no limit) or "150000 100000" (quota and period in microseconds)."""
    quota, period = (folder / "cpu.max").read_text().split()
    return None if quota == "max" else _ratio(int(quota), int(period))


def _v1_quota(folder: Path) -> float | None:
    """`cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    return _ratio(quota, int((folder / "cpu.cfs_period_us").read_text()))


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def _tightest(mount: Path, cgroup: str, read: Callable[[Path], float | None]) -> float | None:
    """The lowest quota from `cgroup`'s folder up to the mount's root (a parent's quota binds its children). A
    path that is not under the mount (a container without a cgroup namespace shows the host's) reads the root."""
    parts = [p for p in cgroup.split("/") if p and p != "."]
    if ".." in parts or not mount.joinpath(*parts).is_dir():
        parts = []
    quotas = []
    for depth in range(len(parts), -1, -1):
        try:
            quotas.append(read(mount.joinpath(*parts[:depth])))
        except (OSError, ValueError):  # no such file (the v2 root has no cpu.max), or not what the kernel writes
            continue
    return min((q for q in quotas if q is not None), default=None)


def cpu_quota(root: Path | str | None = None, proc_cgroup: Path | str | None = None) -> float | None:
    """This process's cgroup CPU quota in CPUs (1.5 for `--cpus 1.5`), or None when there is none or it cannot be
    read; never raises. `proc_cgroup` (default /proc/self/cgroup) names the cgroup: cgroup v2's line `0::/path`,
    v1's line of the `cpu` controller (`4:cpu,cpuacct:/path`); the files are under `root` (default /sys/fs/cgroup):
    v2's `cpu.max` in root/path, v1's `cpu.cfs_quota_us` and `cpu.cfs_period_us` in root/cpu/path (or
    root/cpu,cpuacct/path). Where both name a quota (a hybrid setup), the lower one."""
    try:
        return _cgroup_quota(Path(root or CGROUP_ROOT), Path(proc_cgroup or PROC_CGROUP))
    except (OSError, ValueError):  # unreadable, or not what the kernel writes: as if there were no quota
        return None


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    quotas = []
    for line in proc_cgroup.read_text().splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, cgroup = fields
        if hierarchy == "0" and not controllers:
            quotas.append(_tightest(root, cgroup, _v2_quota))
        elif "cpu" in controllers.split(","):
            mounts = [root / name for name in dict.fromkeys((controllers, *V1_CPU_MOUNTS))]
            mount = next((m for m in mounts if m.is_dir()), None)
            quotas.append(_tightest(mount, cgroup, _v1_quota) if mount else None)
    return min((q for q in quotas if q is not None), default=None)


def core_count(root: Path | str | None = None, proc_cgroup: Path | str | None = None) -> CoreCount:
    """min(affinity, ceil(quota)), at least 1, with where it came from (see the module's docstring)."""
    affinity, quota = affinity_cores(), cpu_quota(root, proc_cgroup)
    cores = max(1, min(affinity, math.ceil(quota))) if quota is not None else affinity
    limit = f"CPU quota {quota:g} -> {max(1, math.ceil(quota))}" if quota is not None else "no CPU quota"
    return CoreCount(affinity, quota, cores, f"{cores} core{'s' if cores != 1 else ''} (affinity {affinity}, {limit})")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, lowered to its cgroup's CPU quota rounded up."""
    return core_count().cores


def cpu_model() -> str:
    """The CPU's model name as `lscpu` shows it (figures are only comparable on the same one)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_threads(requested: int | None = None) -> int:
    """Intra-op threads: `requested` when > 0, else TOOLKIT_THREADS, else every core this process may use."""
    if requested:
        return requested
    if os.environ.get("TOOLKIT_THREADS"):
        return max(1, int(os.environ["TOOLKIT_THREADS"]))
    return available_cores()


def resolve_device(requested: str | None = None, backend: Backend = "torch") -> Literal["cpu", "cuda"]:
    """`cpu`, or `cuda` where the backend can use a GPU. `requested` is a recipe's device (auto, cpu, cuda);
    None reads TOOLKIT_DEVICE (the service's setting, default cpu). Never fails for want of a GPU: `auto` and
    `cuda` fall back to the CPU, and the result says which one runs."""
    if requested is None:
        requested = os.environ.get("TOOLKIT_DEVICE", "cpu").lower()
    if requested == "cpu":
        return "cpu"
    return "cuda" if cuda_available(backend) else "cpu"


def cuda_available(backend: Backend) -> bool:
    if backend == "onnx":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    try:
        import torch
    except ImportError:  # the CPU bento ships no torch
        return False
    return torch.cuda.is_available()
