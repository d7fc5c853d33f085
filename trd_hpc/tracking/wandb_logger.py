"""Weights & Biases, offline by default: ``WandbLogger`` and the reader of offline runs.

``WandbLogger.start(cfg, run_dir, rank)`` opens a W&B run whose files live inside the run
directory (``RUN_DIR/wandb/offline-run-*``) and records its id in ``RUN_DIR/wandb_run.json``;
a later start on the same run directory (a requeued or ``--resume auto`` training,
``trd-hpc evaluate``) continues the same W&B run.  On ranks other than 0, with
``tracking.wandb: false``, ``tracking.mode: disabled`` (or ``WANDB_MODE=disabled``) or
without the ``wandb`` package, it does nothing (and says once why on stderr).

Mode: ``WANDB_MODE`` from the environment wins over ``tracking.mode``.  Offline (the
default) opens no network connection; upload later with ``wandb sync RUN_DIR/wandb/offline-run-*``.
Online mode with a key but no network waits ~90 s in ``wandb.init`` before giving up, hence
offline on clusters.

``read_offline_run(run_dir)`` reads config, summary and history back from the ``.wandb``
transaction logs on disk (``wandb leet inspect``, wandb >= 0.31).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from trd_hpc.errors import RunDirError, TrdError
from trd_hpc.tracking.base import say_once

RUN_RECORD = "wandb_run.json"


def _say_once(msg: str, who: str = "W&B tracking") -> None:
    say_once(msg, who)


def _secret() -> str | None:
    key = os.environ.get("WANDB_API_KEY", "").strip()
    return key or None


def _redact(obj: Any, secret: str | None) -> Any:
    """``obj`` with every occurrence of ``secret`` inside its strings replaced."""
    if not secret:
        return obj
    if isinstance(obj, str):
        return obj.replace(secret, "<redacted>")
    if isinstance(obj, Mapping):
        return {_redact(k, secret): _redact(v, secret) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, secret) for v in obj)
    return obj


def _resolve_mode(cfg_mode: str) -> tuple[str, str]:
    """(mode, where it came from): the user's WANDB_MODE wins over the config."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return ("offline" if env == "dryrun" else env), "WANDB_MODE"
    return cfg_mode, "tracking.mode"


def _env_disabled() -> bool:
    return os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes")


def _settings(wandb: Any) -> Any:
    """Quiet and fast: no console capture, no system-metrics sampling, no pip freeze.
    Only the fields this wandb version knows (0.18 .. 0.31)."""
    wanted = {
        "silent": True,
        "quiet": True,
        "console": "off",
        "x_disable_stats": True,  # no sampler thread (and no cloud-metadata probe)
        "x_save_requirements": False,  # no pip freeze at start
        "x_disable_viewer": True,  # online: no extra viewer query at init
    }
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is not None:
        wanted = {k: v for k, v in wanted.items() if k in fields}
    try:
        return wandb.Settings(**wanted)
    except Exception:  # an old wandb without some field
        return wandb.Settings(silent=True, console="off")


def _reinit(wandb: Any) -> Any:
    """Another run may be open in this process (the main run while a baseline trains):
    keep both ("create_new", wandb >= 0.19.10; older versions: finish the other)."""
    field = getattr(wandb.Settings, "model_fields", {}).get("reinit")
    return "create_new" if field is not None and "create_new" in str(field.annotation) else True


def read_run_record(run_dir: Path) -> dict | None:
    p = Path(run_dir) / RUN_RECORD
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("id") else None


class WandbLogger:
    """One W&B run for one run directory (or nothing, see ``enabled``)."""

    name = "wandb"

    def __init__(
        self, run: Any = None, run_dir: Path | None = None, record: dict | None = None, reason: str | None = None
    ):
        self.run = run
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.record = record or {}
        self.reason = reason  # why this tracker does nothing (None when enabled)
        self._last_step = int(self.record.get("last_step") or 0)
        self._failed = False

    # ---------------------------------------------------------------- start
    @classmethod
    def noop(cls, reason: str | None = None) -> "WandbLogger":
        return cls(reason=reason or "off")

    @classmethod
    def start(
        cls,
        cfg,
        run_dir: Path,
        rank: int = 0,
        job_type: str | None = None,
        group: str | None = None,
        name: str | None = None,
        cohort: dict | None = None,
    ) -> "WandbLogger":
        """``cohort``: the cohort's identity (data.manifest.cohort_identity), kept in the W&B
        config beside the training config, so a run in the dashboard names its data."""
        run_dir = Path(run_dir)
        if rank != 0:
            return cls.noop(f"rank {rank}")
        return cls._start_wandb(cfg, run_dir, job_type, group, name, cohort)

    @classmethod
    def _start_wandb(
        cls, cfg, run_dir: Path, job_type: str | None, group: str | None, name: str | None, cohort: dict | None = None
    ) -> "WandbLogger":
        tc = cfg.tracking
        if not tc.wandb:
            _say_once("off (tracking.wandb is false)")
            return cls.noop("tracking.wandb is false")
        if _env_disabled():
            _say_once("off (WANDB_DISABLED is set)")
            return cls.noop("WANDB_DISABLED")
        mode, source = _resolve_mode(tc.mode)
        if mode == "disabled":
            _say_once(f"off ({source}=disabled)")
            return cls.noop(f"{source}=disabled")
        try:
            import wandb  # noqa: PLC0415  (slow import: only when tracking is on)
        except ImportError:
            _say_once("off (the wandb package is not installed: pip install 'trd-hpc[wandb]')")
            return cls.noop("wandb not installed")

        if mode == "offline":  # wandb-core's own error reports are the one remaining network use
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        secret = _secret()
        previous = read_run_record(run_dir)
        run_id = previous["id"] if previous else None
        kwargs = dict(
            project=tc.project,
            group=group if group is not None else tc.group,
            job_type=job_type if job_type is not None else tc.job_type,
            tags=list(tc.tags) or None,
            name=name if name is not None else run_dir.name,
            config={**cfg.model_dump(mode="json"), **({"cohort_identity": cohort} if cohort else {})},
        )
        kwargs = _redact(kwargs, secret)
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            run = wandb.init(
                dir=str(run_dir),
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
                reinit=_reinit(wandb),
                settings=_settings(wandb),
                **kwargs,
            )
        except Exception as e:  # noqa: BLE001  (tracking must never stop a training run)
            msg = str(e).replace(secret, "<redacted>") if secret else str(e)
            _say_once(f"off: wandb.init failed in {mode} mode ({type(e).__name__}: {msg})")
            return cls.noop(f"wandb.init failed: {msg}")
        seconds = time.perf_counter() - t0

        sync_dir = Path(getattr(run.settings, "sync_dir", "") or Path(run.dir).parent)
        try:
            rel = str(sync_dir.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            rel = str(sync_dir)
        dirs = list(previous.get("directories", [])) if previous else []
        if rel not in dirs:
            dirs.append(rel)
        record = {
            "id": run.id,
            "project": kwargs["project"],
            "group": kwargs["group"],
            "job_type": kwargs["job_type"],
            "name": kwargs["name"],
            "mode": mode,
            "mode_from": source,
            "directory": rel,  # relative to the run directory
            "directories": dirs,  # every process that wrote this run, oldest first
            "resumed": bool(run_id),
            "last_step": int(previous.get("last_step") or 0) if previous else 0,
            "url": getattr(run, "url", None) if mode == "online" else None,
            "init_seconds": round(seconds, 3),
        }
        t = cls(run, run_dir, _redact(record, secret))
        t._write_record()
        where = f"{run_dir / rel}" if mode != "online" else (record["url"] or str(run_dir / rel))
        verb = "resumed" if run_id else "started"
        print(
            f"W&B {mode} run {run.id} {verb}: {where}"
            + (f" (upload later: wandb sync {run_dir / rel})" if mode == "offline" else ""),
            file=sys.stderr,
            flush=True,
        )
        return t

    # ---------------------------------------------------------------- state
    @property
    def enabled(self) -> bool:
        return self.run is not None and not self._failed

    @property
    def id(self) -> str | None:
        """The W&B run id (kept after ``finish``); None for a no-op tracker."""
        return self.record.get("id")

    def _write_record(self) -> None:
        if self.run_dir is None:
            return
        self.record["last_step"] = self._last_step
        from trd_hpc.fsio import atomic_write_json

        atomic_write_json(self.run_dir / RUN_RECORD, _redact(self.record, _secret()))

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._failed = True
            _say_once(f"stopped: {what} failed ({type(e).__name__}: {e}); training goes on without W&B")

    # ---------------------------------------------------------------- logging
    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` row, at step = ``row["epoch"]``."""
        if not self.enabled:
            return
        step = int(row["epoch"])
        if step < self._last_step:  # already logged by an earlier process (W&B drops it anyway)
            return
        self._guard("log", self.run.log, dict(row), step=step)
        self._last_step = max(self._last_step, step)
        self._guard("writing wandb_run.json", self._write_record)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Final metrics (flat dotted keys) into the run summary; None/NaN kept out."""
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self._guard("summary", self.run.summary.update, clean)

    def log_figures(self, figures: Mapping[str, Path | str], step: int | None = None) -> None:
        """PNGs as ``wandb.Image`` under ``figures/<title>``, at one step after the last epoch
        (so they do not merge into an epoch's history row)."""
        if not self.enabled or not figures:
            return
        import wandb

        def _log() -> None:
            imgs = {
                f"figures/{title}": wandb.Image(str(p), caption=title)
                for title, p in figures.items()
                if Path(p).is_file()
            }
            if imgs:
                s = step if step is not None else max(self._last_step, int(getattr(self.run, "step", 0) or 0)) + 1
                self.run.log(imgs, step=s)
                self._last_step = max(self._last_step, s)

        self._guard("log_figures", _log)

    def finish(self, exit_code: int | None = None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            self._write_record()
        except OSError:
            pass
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            _say_once(f"finish failed ({type(e).__name__}: {e})")

    @staticmethod
    def read_back(run_dir: Path) -> dict | None:
        """The offline W&B run's epoch rows and summary (``Logger.read_back``), None without one."""
        if not [d for d in wandb_run_dirs(run_dir) if d.name.startswith("offline-run-")]:
            return None
        w = read_offline_run(run_dir)
        return {"history": [r for r in w["history"] if "epoch" in r], "summary": dict(w["summary"])}

    def __enter__(self) -> "WandbLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


# ---------------------------------------------------------------------------- reading back
def wandb_run_dirs(run_dir: Path) -> list[Path]:
    """W&B run folders (offline-run-* or run-*) with a .wandb log, oldest first."""
    root = Path(run_dir) / "wandb"
    if not root.is_dir():
        return []
    found = [
        d
        for d in root.iterdir()
        if d.is_dir()
        and not d.is_symlink()
        and (d.name.startswith("offline-run-") or d.name.startswith("run-"))
        and any(d.glob("run-*.wandb"))
    ]

    # offline-run-YYYYMMDD_HHMMSS-ID: the timestamp orders them; mtime breaks ties
    def key(d: Path) -> tuple[str, float]:
        m = re.search(r"\d{8}_\d{6}", d.name)
        return (m.group(0) if m else "", d.stat().st_mtime)

    return sorted(found, key=key)


def _inspect(path: Path, summary: bool) -> str:
    env = dict(os.environ)
    env["WANDB_MODE"] = "offline"  # no observability upload from the reader
    env["WANDB_SILENT"] = "true"
    env.pop("WANDB_API_KEY", None)
    cmd = (
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json"] + (["--summary"] if summary else []) + [str(path)]
    )
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise TrdError(f"{' '.join(cmd)} failed ({r.returncode}); it needs wandb >= 0.31:\n{r.stderr.strip()}")
    return r.stdout


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "+Infinity": math.inf}


def _unjson(v: Any) -> Any:
    """wandb-core writes non-finite floats as strings; turn them back into floats."""
    if isinstance(v, str) and v in _SPECIAL:
        return _SPECIAL[v]
    if isinstance(v, dict):
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


def _public(d: Mapping[str, Any]) -> dict:
    return {k: _unjson(v) for k, v in d.items() if not k.startswith("_")}


def read_offline_run(run_dir: Path) -> dict:
    """What the W&B run(s) of ``run_dir`` hold on disk, without a server:
    ``{"id", "project", "group", "job_type", "tags", "state", "directories",
    "config", "summary", "history": [rows]}``.  A run resumed by several processes
    (several offline-run-* folders with the same id) is merged in order; history
    rows are the logged dicts (keys starting with ``_`` dropped, NaN restored), one
    per step, a later process's row replacing an earlier one at the same step."""
    dirs = wandb_run_dirs(run_dir)
    if not dirs:
        raise RunDirError(f"{run_dir}: no W&B run folder (wandb/offline-run-*) with a .wandb log")
    out: dict[str, Any] = {
        "id": None,
        "project": None,
        "group": None,
        "job_type": None,
        "tags": [],
        "state": None,
        "directories": [str(d) for d in dirs],
        "config": {},
        "summary": {},
    }
    by_step: dict[int, dict] = {}
    for d in dirs:
        s = json.loads(_inspect(d, summary=True))
        out["config"] = _public(s.get("config") or {})
        out["summary"].update(_public(s.get("summary") or {}))
        out["state"] = s.get("state")
        out["id"] = s.get("run_id") or out["id"]
        out["project"] = s.get("project") or out["project"]
        out["tags"] = s.get("tags") or out["tags"]
        for line in _inspect(d, summary=False).splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "run":
                r = rec.get("run", {})
                out["group"] = r.get("run_group", out["group"])
                out["job_type"] = r.get("job_type", out["job_type"])
            elif kind == "history":
                h = rec.get("history", {})
                item = h.get("item", {})
                step = h.get("step", {}).get("num", item.get("_step"))
                by_step[int(step or 0)] = _public(item)
    out["history"] = [by_step[k] for k in sorted(by_step)]
    return out
