"""Face cap before parsing: what an oversized asset costs the build.

Writes a binary PLY with ``--faces`` triangles (default 8M, ~170 MB), then measures in fresh
processes (peak RSS from ``getrusage``):

* ``ingest``: ``inspect_asset`` with the default ``load.max_faces`` (2M) — the header check that
  filters it now;
* ``parse``: what filtering after a full parse used to cost (``trimesh.load_scene``, as the
  loader calls it).

    .venv/bin/python benchmarks/bench_face_cap.py [--faces 8000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = {
    "ingest": (
        "from know3d.pipeline.config import LoadConfig\n"
        "from know3d.rendering.assets import AssetFiltered, inspect_asset\n"
        "try:\n    inspect_asset(path, LoadConfig())\n    outcome = 'kept'\n"
        "except AssetFiltered as exc:\n    outcome = str(exc)\n"
    ),
    "parse": (  # what load_asset did before the header check: parse the scene, then count
        "import trimesh\n"
        "scene = trimesh.load_scene(str(path), resolver=trimesh.resolvers.FilePathResolver(str(path)))\n"
        "outcome = f'{sum(len(g.faces) for g in scene.geometry.values())} faces parsed, then filtered'\n"
    ),
}


def write_ply(path: Path, num_faces: int) -> None:
    side = int(np.ceil(np.sqrt(num_faces / 2))) + 1
    u, v = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    verts = np.stack([u.ravel(), v.ravel(), np.zeros(side * side, np.float32)], 1)
    idx = np.arange(side * side, dtype=np.int32).reshape(side, side)[:-1, :-1].ravel()
    tris = np.concatenate([np.stack([idx, idx + 1, idx + side], 1), np.stack([idx + 1, idx + side + 1, idx + side], 1)])
    tris = tris[:num_faces]
    face = np.zeros(len(tris), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"], face["i"] = 3, tris
    header = (
        f"ply\nformat binary_little_endian 1.0\nelement vertex {len(verts)}\nproperty float x\n"
        f"property float y\nproperty float z\nelement face {len(tris)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    )
    with open(path, "wb") as fh:
        fh.write(header.encode())
        fh.write(verts.astype("<f4").tobytes())
        fh.write(face.tobytes())


def measure(mode: str, path: Path) -> dict:
    code = (
        "import json, resource, sys, time\nfrom pathlib import Path\n"
        f"path = Path({str(path)!r})\nstart = time.perf_counter()\n{CHILD[mode]}"
        "print(json.dumps({'seconds': time.perf_counter() - start, 'outcome': outcome,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    base = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, trimesh, know3d.pipeline.config, know3d.rendering.assets;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["imports_rss_mb"] = float(base.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=8_000_000)
    parser.add_argument("--keep", type=Path, default=None, help="Folder to write the PLY to (default: a temp dir).")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="know3d-facecap-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"plane_{args.faces}.ply"
    t0 = time.perf_counter()
    write_ply(path, args.faces)
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {args.faces} faces) in {time.perf_counter() - t0:.1f} s"
    )
    for mode in ("ingest", "parse"):
        r = measure(mode, path)
        print(
            f"{mode:>6}: {r['seconds']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MiB "
            f"(imports alone {r['imports_rss_mb']:.0f} MiB) -> {r['outcome']}"
        )
    if args.keep is None:
        path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
