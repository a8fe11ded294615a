"""Render 8 procedural assets (through the build's isolated renderer, EGL) and write them as a
shard set, without Ray: the data for ``gpu_check.sh``'s torchrun check.

    python benchmarks/check_shards.py OUT [RESOLUTION]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from know3d.core.shards import ShardConfig, write_index
    from know3d.pipeline.config import BuildConfig
    from know3d.rendering.assets import file_sha256
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.isolation import IsolatedRenderer
    from know3d.rendering.process import read_asset, render_fingerprint
    from know3d.rendering.shards import plan_shards, write_shard
    from know3d.rendering.sources.procedural import ProceduralSource

    out, res = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 512
    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=8), out / "assets").discover()
    cfg = BuildConfig.model_validate({"render": {"resolution": res, "backend": "egl"}})
    work = out / "work"
    summaries = []
    with IsolatedRenderer(cfg.render_job(), work) as renderer:
        for r in records:
            sha = file_sha256(Path(r.uri))
            result = renderer.run(Path(r.uri), sha, r.to_json())
            if result.status != "ok":
                raise SystemExit(f"{r.uri}: {result.reason}")
            summaries.append(read_asset(work, sha))
    seconds = [round(s["timings"]["render_s"], 3) for s in summaries]
    print(f"GL: {summaries[0].get('gl_backend')}; render_s per asset: {seconds}")
    shards = out / "shards"
    plans = plan_shards(work, summaries, ShardConfig(val_fraction=0.0), 0)
    entries = [write_shard(work, shards, plan) for plan in plans]
    write_index(shards, entries, {"render_fingerprint": render_fingerprint(cfg.render_job())})
    print(f"shards: {json.loads((shards / 'shard_index.json').read_text())['num_samples']} samples in {shards}")


if __name__ == "__main__":
    main()
