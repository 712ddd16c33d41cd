"""Thread counts under a CPU quota: the cores a process may use are its affinity lowered to its cgroup's CPU
quota (rounded up), read from fake cgroup v1 and v2 trees as the kernel lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolkit.runtime import hardware
from toolkit.runtime.hardware import available_cores, core_count, cpu_quota, resolve_threads

V1_CPU_LINES = "12:pids:/kubepods/pod1/c1\n4:cpu,cpuacct:{path}\n2:cpuset:/kubepods/pod1/c1\n1:name=systemd:/x\n"


@pytest.fixture(autouse=True)
def eight_cores(monkeypatch):
    """The host's affinity: 8 cores, whatever this machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def v2_tree(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 mount with `cpu.max` in the folders named in `limits` ("" is the mount's root), and a proc
    file that puts this process in `path`."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for folder, cpu_max in limits.items():
        write(root / folder, cpu_max=cpu_max)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def v1_tree(tmp_path: Path, path: str, limits: dict[str, tuple[str, str]]) -> tuple[Path, Path]:
    """A cgroup v1 `cpu,cpuacct` mount with (cfs_quota_us, cfs_period_us) in the folders named in `limits`."""
    root = tmp_path / "cgroup"
    mount = root / "cpu,cpuacct"
    mount.mkdir(parents=True)
    for folder, (quota, period) in limits.items():
        write(mount / folder, **{"cpu_cfs_quota_us": quota, "cpu_cfs_period_us": period})
    proc = tmp_path / "proc_cgroup"
    proc.write_text(V1_CPU_LINES.format(path=path))
    return root, proc


def test_a_quota_below_the_affinity_wins_v2_and_v1(tmp_path):
    root, proc = v2_tree(tmp_path / "v2", "/kubepods/pod1/c1", {"kubepods/pod1/c1": "150000 100000"})
    assert cpu_quota(root, proc) == 1.5
    record = core_count(root, proc)
    assert (record.affinity, record.quota, record.cores) == (8, 1.5, 2)  # ceil(1.5)
    assert record.text == "2 cores (affinity 8, CPU quota 1.5 -> 2)"

    root, proc = v1_tree(tmp_path / "v1", "/kubepods/pod1/c1", {"": ("-1", "100000"), "kubepods/pod1/c1":
                                                                 ("300000", "100000")})  # fmt: skip
    assert cpu_quota(root, proc) == 3.0 and core_count(root, proc).cores == 3


def test_no_quota_means_the_affinity(tmp_path):
    root, proc = v2_tree(tmp_path / "v2", "/a", {"a": "max 100000"})
    assert cpu_quota(root, proc) is None
    assert core_count(root, proc) == (8, None, 8, "8 cores (affinity 8, no CPU quota)")
    root, proc = v1_tree(tmp_path / "v1", "/a", {"": ("-1", "100000"), "a": ("-1", "100000")})
    assert cpu_quota(root, proc) is None and core_count(root, proc).cores == 8
    # A quota above the affinity leaves the affinity.
    root, proc = v2_tree(tmp_path / "big", "/a", {"a": "1600000 100000"})
    assert core_count(root, proc).cores == 8


def test_a_parents_tighter_quota_binds_its_children(tmp_path):
    root, proc = v2_tree(tmp_path / "v2", "/pod/c1", {"pod": "100000 100000", "pod/c1": "400000 100000"})
    assert cpu_quota(root, proc) == 1.0
    root, proc = v1_tree(tmp_path / "v1", "/pod/c1", {"": ("-1", "100000"), "pod": ("50000", "100000"),
                                                      "pod/c1": ("-1", "100000")})  # fmt: skip
    assert cpu_quota(root, proc) == 0.5


def test_a_path_missing_under_the_mount_reads_the_root(tmp_path):
    # A container without its own cgroup namespace sees the host's path, while its files are at the mount's root.
    root, proc = v2_tree(tmp_path / "v2", "/kubepods.slice/pod9/c9", {"": "250000 100000"})
    assert cpu_quota(root, proc) == 2.5 and core_count(root, proc).cores == 3
    root, proc = v1_tree(tmp_path / "v1", "/docker/0123abcd", {"": ("200000", "100000")})
    assert cpu_quota(root, proc) == 2.0
    # With a cgroup namespace the path is "/".
    root, proc = v2_tree(tmp_path / "ns", "/", {"": "100000 100000"})
    assert cpu_quota(root, proc) == 1.0


def test_the_cpu_controller_alone_on_v1(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "cpu" / "job", cpu_cfs_quota_us="150000", cpu_cfs_period_us="100000")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("3:cpuset:/\n2:cpuacct:/\n1:cpu:/job\n0::/\n")  # hybrid: v2 holds no cpu controller
    assert cpu_quota(root, proc) == 1.5


@pytest.mark.parametrize(
    "cpu_max", ["", "garbage", "150000", "1.5 100000", "150000 0", "0 100000", "-5 100000", "inf 1", "\x00\xff"]
)
def test_garbage_is_no_quota(tmp_path, cpu_max):
    root, proc = v2_tree(tmp_path, "/a", {"a": cpu_max})
    assert cpu_quota(root, proc) is None and core_count(root, proc).cores == 8


def test_unreadable_or_missing_files_are_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "nothing", tmp_path / "no_proc_file") is None
    root, proc = v1_tree(tmp_path / "v1", "/a", {"a": ("abc", "100000")})
    assert cpu_quota(root, proc) is None
    root, proc = v1_tree(tmp_path / "half", "/a", {})
    (root / "cpu,cpuacct" / "a").mkdir()
    (root / "cpu,cpuacct" / "a" / "cpu.cfs_quota_us").write_text("100000\n")  # no period file
    assert cpu_quota(root, proc) is None
    proc.write_bytes(b"\xff\xfe not a proc file")
    assert cpu_quota(root, proc) is None
    proc.write_text("0::/../../escape\n")
    assert cpu_quota(root, proc) is None


def test_a_tiny_quota_still_gives_one_core(tmp_path):
    root, proc = v2_tree(tmp_path, "/a", {"a": "1000 100000"})  # 0.01 CPU
    record = core_count(root, proc)
    assert record.quota == 0.01 and record.cores == 1 and record.text == "1 core (affinity 8, CPU quota 0.01 -> 1)"


def test_toolkit_threads_wins_over_the_quota(tmp_path, monkeypatch):
    root, proc = v2_tree(tmp_path, "/a", {"a": "100000 100000"})
    monkeypatch.setattr(hardware, "CGROUP_ROOT", root)
    monkeypatch.setattr(hardware, "PROC_CGROUP", proc)
    monkeypatch.delenv("TOOLKIT_THREADS", raising=False)
    assert available_cores() == 1 and resolve_threads() == 1 and resolve_threads(0) == 1
    monkeypatch.setenv("TOOLKIT_THREADS", "5")
    assert resolve_threads() == 5 and resolve_threads(3) == 3
