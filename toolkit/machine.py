"""How busy the machine was while something was timed, and what it is: speed figures are only worth what the
machine let them be, so every one carries this record.

`others_cores` is the CPU time that *other* processes took on the cores this process may use (from the per-CPU
lines of /proc/stat, minus this process's own CPU time), in cores, averaged over the measurement. A second job
spinning one core reads about 1.0. `steal_pct` is the share of time the hypervisor gave those cores to other
machines. The 1-minute load average is recorded too, but it lags by design, so the flag does not rest on it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
BUSY_OTHERS_CORES = 0.5  # another process using half a core of ours, on average
BUSY_STEAL_PCT = 10.0


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return set(range(os.cpu_count() or 1))


def _jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, steal) clock ticks summed over `cpus`, or None where /proc/stat is not readable."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    busy = steal = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, stolen = (int(v) for v in fields[:8])
        busy += user + nice + system + irq + softirq
        steal += stolen
    return busy, steal


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class LoadMeter:
    """`with LoadMeter() as meter: ...` then `meter.result`: others' cores, steal, load average, busy flag."""

    def __enter__(self) -> LoadMeter:
        self.cpus = _cpus()
        self.start = (time.perf_counter(), _own_cpu_seconds(), _jiffies(self.cpus))
        return self

    def __exit__(self, *exc: Any) -> None:
        wall0, own0, jiffies0 = self.start
        wall, own, jiffies = time.perf_counter() - wall0, _own_cpu_seconds() - own0, _jiffies(self.cpus)
        # /proc/stat counts in ticks of 10 ms: over a window of a few ticks `others_cores` is coarse.
        result: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2), "cores": len(self.cpus),
                                  "seconds": round(wall, 2)}  # fmt: skip
        if jiffies0 is not None and jiffies is not None and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            busy, steal = (jiffies[i] - jiffies0[i] for i in range(2))
            result["others_cores"] = round(max(0.0, (busy / hz - own) / wall), 2)
            result["steal_pct"] = round(100 * steal / hz / wall / len(self.cpus), 1)
        result["busy"] = busy_flag(result)
        self.result = result


def busy_flag(load: dict[str, Any]) -> bool:
    return load.get("others_cores", 0.0) >= BUSY_OTHERS_CORES or load.get("steal_pct", 0.0) >= BUSY_STEAL_PCT


def describe_load(load: dict[str, Any]) -> str:
    parts = (
        [f"other processes used {load['others_cores']:.1f} of {load['cores']} cores"] if "others_cores" in load else []
    )
    if load.get("steal_pct"):
        parts.append(f"steal {load['steal_pct']:.0f}%")
    parts.append(f"load average {load['loadavg_1m']}")
    return ", ".join(parts)


def environment() -> dict[str, Any]:
    """What the figures were taken on: CPU, cores, and the versions of the libraries that time and run models.
    `cores` is min(affinity, ceil(cgroup CPU quota)); `affinity_cores` and `cpu_quota` (CPUs, None: no quota) are
    its parts, `threads` the intra-op threads a model gets when its settings name none (TOOLKIT_THREADS, else
    `cores`) and `cores_source` the line that says so."""
    import importlib.metadata
    import platform

    from toolkit.runtime import cpu_model, resolve_threads
    from toolkit.runtime.hardware import core_count

    versions = {}
    for package in ("torch", "transformers", "onnxruntime", "optimum", "optimum-onnx", "accelerate", "bentoml"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    cores = core_count()
    return {
        "cpu": cpu_model(),
        "cores": cores.cores,
        "affinity_cores": cores.affinity,
        "cpu_quota": cores.quota,
        "threads": resolve_threads(),
        "cores_source": cores.text,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": versions,
    }
