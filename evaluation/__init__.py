"""HY3D-Bench-style evaluation, usable without Ray.

* :mod:`know3d.evaluation.meshes` — safe geometry-only loading, the benchmark's normalization, seeded
  surface sampling and farthest point sampling;
* :mod:`know3d.evaluation.geometry` — Chamfer-L1/L2, F-score, normal consistency, voxel IoU;
* :mod:`know3d.evaluation.images` — PSNR, SSIM, LPIPS of back views;
* :mod:`know3d.evaluation.semantic` and :mod:`know3d.evaluation.models` — ULIP / Uni3D image–shape scores;
* :mod:`know3d.evaluation.shapes` / :mod:`know3d.evaluation.backviews` — everything measured for one
  uid (and the LPIPS choice); :mod:`know3d.evaluation.scoring` — the ULIP / Uni3D holder (a Ray actor);
* :mod:`know3d.evaluation.discovery` — which uids a run covers and which inputs are left out (why);
* :mod:`know3d.evaluation.protocol` — the protocol fingerprint and input keys a stored result depends on;
* :mod:`know3d.evaluation.store` — per-uid result files and what a rerun reuses;
* :mod:`know3d.evaluation.summary`, :mod:`know3d.evaluation.results`, :mod:`know3d.evaluation.report` —
  summary.json, tables and the HTML report; :mod:`know3d.evaluation.demo` — a demo set.

The command line, the Ray fan-out and MLflow logging are in :mod:`know3d.pipeline.evaluate`.
"""
