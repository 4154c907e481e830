"""GPU utilization: what nvidia-smi (CUDA) or ioreg (Metal) says, None where nothing can say it.

The tools are real executables put on PATH (this machine has neither a GPU nor those tools):
the code runs them as it would on a CUDA box or a Mac and parses what they print there.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from forgellm.services.common import gpu


def tool(folder: Path, name: str, output: str, code: int = 0) -> None:
    """An executable ``name`` that prints ``output`` (shell builtins only: PATH holds just it)."""
    (folder / f"{name}.out").write_text(output + "\n")
    path = folder / name
    path.write_text(f'#!/bin/sh\nwhile IFS= read -r line; do printf "%s\\n" "$line"; done < "{folder}/{name}.out"\n'
                    f"exit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def path_of(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_none_without_a_gpu_tool(path_of, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert gpu.measure() is None
    monkeypatch.setattr(sys, "platform", "win32")
    assert gpu.measure() is None


def test_cuda_reads_nvidia_smi_mean_over_gpus(path_of, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    tool(path_of, "nvidia-smi", "37\n[N/A]\n53")
    assert gpu.measure() == 45.0
    tool(path_of, "nvidia-smi", "NVIDIA-SMI has failed", code=9)  # driver gone: not a number
    assert gpu.measure() is None


def test_metal_reads_ioreg_device_utilization(path_of, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    tool(path_of, "ioreg", '+-o AGXAcceleratorG14X  <class AGXAccelerator>\n'
         '    "PerformanceStatistics" = {"In use system memory"=123,"Device Utilization %"=62,'
         '"Renderer Utilization %"=60}')
    assert gpu.measure() == 62.0


def test_readings_are_cached_for_a_second(path_of, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(gpu, "_cached", None)
    tool(path_of, "nvidia-smi", "10")
    assert gpu.utilization() == 10.0
    tool(path_of, "nvidia-smi", "90")
    assert gpu.utilization() == 10.0  # within CACHE_S
    monkeypatch.setattr(gpu, "_cached", (0.0, 10.0))  # as if the reading were old
    assert gpu.utilization() == 90.0
