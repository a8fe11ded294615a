"""Run the per-asset render in a child process, under a time limit.

Assets come from the internet: a malformed one can hang the parser, segfault a C extension or
leave the GL context broken. The child owns one :class:`ViewRenderer` (reused across assets);
the parent sends it one job at a time and waits at most ``timeout_s``. A hang is killed, a crash
is reported with its signal, and either way only that asset fails — the next job starts a
fresh child.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from know3d.rendering.config import RenderJob
from know3d.rendering.process import Rendered


def short_traceback(exc: BaseException, limit: int = 6) -> str:
    """The last ``limit`` frames and the exception, its message redacted as in manifest reasons
    (a parser's message may quote the file's content)."""
    from know3d.core.errors import describe_exception

    frames = traceback.format_list(traceback.extract_tb(exc.__traceback__)[-limit:])
    return ("".join(frames) + describe_exception(exc, limit=300))[-2000:]


def _child_main(conn: Connection, cfg_json: str, work: str) -> None:
    """Child loop: one renderer, jobs in, result dicts out; None ends it."""
    from know3d.core.errors import describe_exception
    from know3d.rendering.assets import AssetError, AssetFiltered
    from know3d.rendering.process import render_asset
    from know3d.rendering.render import ViewRenderer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    cfg = RenderJob.model_validate_json(cfg_json)
    if cfg.render.gl_threads:
        os.environ["LP_NUM_THREADS"] = str(cfg.render.gl_threads)  # read by Mesa at context creation
    renderer = ViewRenderer(cfg.render.resolution, cfg.render.backend, cfg.render.light_intensity, cfg.render.ambient)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        path, sha, record = job
        result: Rendered
        fatal = False
        try:
            summary = render_asset(Path(path), sha, record, cfg, Path(work), renderer)
            result = Rendered("ok", timings=summary["timings"], num_pairs=len(summary["pairs"]))
        except AssetFiltered as exc:
            result = Rendered("filtered", filter=exc.filter, reason=str(exc))
        except AssetError as exc:
            result = Rendered("failed", reason=str(exc))
        except BaseException as exc:  # noqa: BLE001 - any other error fails this asset only
            reason = f"{Path(path).name}: {describe_exception(exc)}"
            result = Rendered("failed", reason=reason, traceback=short_traceback(exc))
            # GL state may be broken after an unexpected error: start a clean child next time
            fatal = True
        conn.send(result)
        if fatal:
            break
    renderer.close()


class IsolatedRenderer:
    """Parent side. ``run`` never raises for the asset's sake; it returns a result dict."""

    def __init__(self, cfg: RenderJob, work: Path) -> None:
        """``cfg``: the render job, or a config that makes one (``render_job()``, e.g. the build's)."""
        cfg = cfg.render_job() if hasattr(cfg, "render_job") else cfg
        self.cfg = cfg
        self.work = Path(work)
        self._cfg_json = cfg.model_dump_json()
        self._ctx = mp.get_context("spawn")
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.num_restarts = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main, args=(child, self._cfg_json, str(self.work)), daemon=True, name="know3d-render"
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def _kill(self, restart: bool = True) -> None:
        """Stop the child; ``restart`` counts it as a restart (the next job starts a new one)."""
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None
        self.num_restarts += int(restart)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def run(self, path: Path, sha: str, record: dict, timeout_s: float | None = None) -> Rendered:
        timeout_s = self.cfg.render.timeout_s if timeout_s is None else timeout_s
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self._kill()
            self._start()
        assert self._conn is not None and self._proc is not None
        start = time.monotonic()
        try:
            self._conn.send((str(path), sha, record))
            if not self._conn.poll(timeout_s):
                self._kill()
                return Rendered(
                    "failed", reason=f"{Path(path).name}: timeout: rendering took longer than {timeout_s:g} s"
                )
            result = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self._kill()
            if code is not None and code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                why = f"render process crashed ({name})"
            else:
                why = f"render process exited unexpectedly (exit code {code})"
            return Rendered("failed", reason=f"{Path(path).name}: {why}")
        result = dataclasses.replace(result, wall_s=time.monotonic() - start)
        if not self._proc.is_alive() or result.traceback:
            self._proc.join(5)
            self._kill()
        return result

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        if self._proc is not None:
            self._kill(restart=False)

    def __enter__(self) -> IsolatedRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
