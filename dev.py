#!/usr/bin/env python3
"""Set up and run trd-hpc from nothing but Python (standard library only).

  python3 dev.py demo    virtual env + install, then generate -> train -> evaluate -> report
                         on the tiny EMT config (a few minutes on a laptop CPU)
  python3 dev.py test    virtual env + every optional part, then the whole test suite
                         (extra arguments go to pytest, e.g. `python3 dev.py test -m "not slow"`)
  python3 dev.py setup [--all]
  python3 dev.py run CMD [ARGS...]
                         CMD from the virtual env (trd-hpc, torchrun, ray, python, ...), set
                         up first if needed: `python3 dev.py run trd-hpc --help`. Or once per
                         shell: `source .venv/bin/activate`, then `trd-hpc ...` as written.

Environment: TRD_VENV (default .venv), TRD_TORCH (default torch==2.13.0: the CPU
build where a local wheel exists; set e.g. "torch==2.13.0 --index-url URL" for CUDA).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("TRD_VENV", ROOT / ".venv"))
TORCH = os.environ.get("TRD_TORCH", "torch==2.13.0")
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def sh(*cmd: str, **kw) -> None:
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def pip(*args: str) -> None:
    sh(str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args)


def _stamp(name: str) -> Path:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()[:12]
    return VENV / f".installed-{name}-{digest}"


def _create_venv() -> None:
    print(f"creating virtual environment {VENV}", flush=True)
    try:
        venv.EnvBuilder(with_pip=True).create(VENV)
        return
    except subprocess.CalledProcessError:  # Debian/Ubuntu without python3-venv: no ensurepip
        pass
    try:
        import virtualenv  # noqa: F401
    except ImportError:
        sys.exit(
            f"cannot create {VENV}: this Python has no ensurepip. On Debian/Ubuntu: "
            f"apt install python3-venv (or python{sys.version_info[0]}.{sys.version_info[1]}-venv); "
            "elsewhere: python3 -m pip install --user virtualenv. Then run the same command again."
        )
    import shutil

    shutil.rmtree(VENV, ignore_errors=True)  # the half-made one
    sh(sys.executable, "-m", "virtualenv", "-q", str(VENV))


def setup(all_parts: bool) -> None:
    if not PY.exists():
        _create_venv()
    if not _stamp("core").exists():
        pip(*shlex.split(TORCH))
        pip("-e", f"{ROOT}[test]")
        _stamp("core").touch()
    if all_parts and not _stamp("all").exists():
        pip("-e", f"{ROOT}[test,monai,tune,wandb,mlflow,submitit,bids,harmonize,export,bench]")
        # DeepSpeed's setup.py imports torch: build it against the torch above
        # (an isolated build would download a second, multi-GB torch).
        pip("setuptools", "wheel")
        pip("--no-build-isolation", "deepspeed>=0.14,<0.20")
        _stamp("all").touch()


def demo() -> None:
    setup(all_parts=False)
    out = ROOT / "runs" / "demo"
    sh(
        str(BIN / "trd-hpc"),
        "train",
        "configs/emt_tiny.yaml",
        "--out",
        str(out),
        "--generate",  # the demo makes its synthetic cohort (train says what it generates)
        f"data.cohort={ROOT / 'runs' / 'demo-cohort'}",
    )
    print(f"\nreport: {out / 'report.html'}\nmetrics: {out / 'metrics.json'}")


def test(args: list[str]) -> int:
    setup(all_parts=True)
    return subprocess.run([str(PY), "-m", "pytest", *args], cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        demo()
        return 0
    if cmd == "test":
        return test(rest)
    if cmd == "setup":
        setup(all_parts="--all" in rest)
        return 0
    if cmd == "run":
        if not rest:
            print("usage: python3 dev.py run CMD [ARGS...]   e.g. python3 dev.py run trd-hpc --help", file=sys.stderr)
            return 2
        setup(all_parts=False)
        exe = BIN / rest[0]
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV))
        # the command as if the env were activated: its own children (torchrun's ranks) find it too
        return subprocess.run([str(exe) if exe.exists() else rest[0], *rest[1:]], cwd=Path.cwd(), env=env).returncode
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
