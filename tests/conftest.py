"""Shared fixtures: the real test assets (../shared/assets, read-only) and one local Ray."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's preemption watcher is an actor per run that polls the cluster for nodes being drained
# (spot reclaims); the tests drain no node, and the ~3.7 CPU-s it costs each of the suite's ~13 Ray
# Train runs is CPU the 2-core suite needs (benchmarks/RESULTS.md, the census). Users keep Ray's
# default (on); node *loss* is still tested (tests/test_multinode.py), it does not need the watcher.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Under pytest-xdist (`-n 2`, what scripts/test.sh runs) each worker process takes one core: two
# workers with torch's default of one thread per core would oversubscribe the machine, and
# OpenMP's spinning threads slow down badly when they share a core. Child processes (torchrun,
# Ray workers, CLI runs) inherit the setting; a test that wants more threads sets its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
warnings.filterwarnings("ignore", module="trimesh")

# Mesa's llvmpipe and triton (pulled in by torch._dynamo, which transformers imports) each load
# an LLVM: importing triton after a GL context exists in the process segfaults, the other order
# is fine. The product never mixes them in one process (renders run in child processes, VLMs in
# their own actors); tests do, so triton comes first, whatever the test order.
try:
    import torch._dynamo  # noqa: F401
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = next(
    (p for p in (REPO / "shared" / "reference", REPO.parent / "shared" / "reference") if p.is_dir()), None
)
SHARED_ASSETS = next((p for p in (REPO / "shared" / "assets", REPO.parent / "shared" / "assets") if p.is_dir()), None)
REAL_ASSETS = [
    "BoxTextured.glb",
    "Duck.glb",
    "bunny.ply",
    "fandisk.obj",
    "fuze/fuze.obj",
    "monkey.glb",
    "pins.glb",
    "quadknot.obj",
    "simple_pole.glb",
    "testplate.glb",
    "textured_tetrahedron.obj",
]
BAD_ASSETS = [
    "empty.obj",
    "empty_nodes.glb",
    "nancolor.obj",
    "negative_indices.obj",
    "not_a_mesh.glb",
    "notenoughindices.obj",
    "truncated_duck.glb",
    "zero_bytes.glb",
]
# negative_indices.obj uses relative (negative) OBJ indices, which the OBJ format allows: it is
# accepted by default (issue 10) and refused only with load.allow_relative_obj_indices=false.
ACCEPTED_FROM_BAD = ["negative_indices.obj"]
REFUSED_BAD = [name for name in BAD_ASSETS if name not in ACCEPTED_FROM_BAD]


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    if SHARED_ASSETS is None:
        pytest.skip("../shared/assets not found (tests read the shared real/bad assets)")
    return SHARED_ASSETS


@pytest.fixture(scope="session")
def real_dir(shared_assets: Path) -> Path:
    return shared_assets / "real"


@pytest.fixture(scope="session")
def bad_dir(shared_assets: Path) -> Path:
    return shared_assets / "bad"


@pytest.fixture()
def assets_copy(tmp_path: Path, real_dir: Path, bad_dir: Path) -> Path:
    """A writable copy of real/ and bad/ (the shared folder must never be modified)."""
    root = tmp_path / "assets"
    shutil.copytree(real_dir, root / "real")
    shutil.copytree(bad_dir, root / "bad")
    for f in root.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return root


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test file that asks for it, shut down after the file. An idle local Ray
    (GCS, raylet, agents, 2 prestarted workers) burns ~4 CPU-s a minute: held by each xdist
    worker for the whole session, it cost more than starting one per file (~5 s, 9 files)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=256 * 2**20,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def one_rank():
    """This process as rank 0 of a one-process group, for the whole session (the local launcher's
    ``only_rank``): trainers run in it through ``torchrun_main`` as under ``torchrun
    --nproc_per_node 1`` without a fresh interpreter's ~25 s of imports."""
    from know3d.training.engine.launch import only_rank

    with only_rank():
        yield


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """../shared/reference: key/shape lists of the official checkpoints."""
    if SHARED_REFERENCE is None:
        pytest.skip("../shared/reference not found (key lists of the official checkpoints)")
    return SHARED_REFERENCE
