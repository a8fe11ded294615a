"""Resume after interruption: kill -9 of the driver or of a worker, at any point, then re-run.

The re-run must yield exactly the expected samples: none missing, none duplicated.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from know3d.core.shards import sample_key
from know3d.rendering.assets import file_sha256

pytestmark = pytest.mark.slow
NUM_ASSETS = 8


def _cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "know3d.pipeline.cli",
        "data",
        "build",
        "--source",
        "procedural",
        "--output",
        str(out),
        "--set",
        f"source.procedural.num_assets={NUM_ASSETS}",
        "--set",
        "render.resolution=128",
        "--set",
        "shard.max_samples=7",
        "--set",
        "shard.val_fraction=0.25",
        "--set",
        "mlflow.enabled=false",
        "--set",
        "ray.num_cpus=2",
    ]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL the driver and everything it started (the whole local Ray cluster)."""
    for _ in range(3):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _rendered(out: Path) -> int:
    return len(list(out.glob("work/*/*/*/asset.json")))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 240.0) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError("build did not reach the expected point")


def _samples(out: Path) -> list[str]:
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]


def _expected(out: Path) -> set[str]:
    shas = {file_sha256(p) for p in out.glob("procedural/*/*.glb")}
    assert len(shas) == NUM_ASSETS
    return {sample_key(sha, "backview", p) for sha in shas for p in range(6)}


def _run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out), capture_output=True, text=True, timeout=600)


def test_kill_driver_then_resume(tmp_path: Path):
    out = tmp_path / "out"
    rng = random.Random(0)
    # 1) kill -9 the driver alone while it renders: its workers are orphaned mid-asset
    proc = subprocess.Popen(_cmd(out), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: _rendered(out) >= 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(rng.uniform(0.0, 0.5))
    _kill_session(proc.pid)  # hygiene: nothing of the old cluster runs on into the next run
    assert _rendered(out) < NUM_ASSETS

    # 2) kill -9 driver and cluster at a random later moment (may hit shard writing)
    proc = subprocess.Popen(_cmd(out), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _rendered(out) >= NUM_ASSETS - 2, proc)
    time.sleep(rng.uniform(0.0, 1.5))
    _kill_session(proc.pid)
    proc.wait()

    # 3) the re-run completes with exactly the expected samples
    res = _run(out)
    assert res.returncode == 0, res.stderr[-3000:]
    keys = _samples(out)
    assert len(keys) == len(set(keys)) == 6 * NUM_ASSETS
    assert set(keys) == _expected(out)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("work/*/*/.*tmp*"))


def test_kill_a_worker_mid_run(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cmd(out), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed = []

    def render_actor() -> bool:
        for pid in _session_pids(proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::RenderActor.render"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return True
        return False

    assert _wait_for(lambda: _rendered(out) >= 1 and render_actor(), proc)
    stdout, stderr = proc.communicate(timeout=600)
    try:
        assert proc.returncode == 0, stderr[-3000:]
        assert killed
        # Ray restarts the actor; the render stage gives its asset to an actor that runs: the run completes
        keys = _samples(out)
        assert len(keys) == len(set(keys)) == 6 * NUM_ASSETS
        assert set(keys) == _expected(out)
        assert "failed (details" not in stdout  # no asset failed; its render was made again
    finally:
        _kill_session(proc.pid)
