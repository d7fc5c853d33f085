"""DeepSpeed: the engine built from a JSON in configs/deepspeed/ plus the run's
optimiser, batch and clipping settings (so one place, the experiment config,
holds the learning rate whatever the strategy).

Nothing here compiles C++ ops: the optimiser is torch's own (``torch_adam``),
there is no CPU offload (no cpu_adam), and the shared-memory communication op
is switched off before the engine starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trd_hpc import resources
from trd_hpc.errors import ConfigError
from trd_hpc.sections import TrainConfig


def resolve_config_path(name: str) -> Path:
    """A DeepSpeed JSON: a file path, or a packaged one by name (``zero1_bf16``, with or
    without ``.json``; the packaged ones are trd_hpc/train/deepspeed_configs, shown in a
    checkout as configs/deepspeed/)."""
    packaged = resources.deepspeed_configs()
    stem = Path(name).name.removesuffix(".json")
    for cand in (Path(name), packaged.get(stem) if Path(name).parent in (Path("."), Path("deepspeed")) else None):
        if cand is not None and cand.is_file():
            return cand
    raise ConfigError(
        f"train.deepspeed_config: {name} not found (a path, or a packaged name); packaged: {', '.join(packaged)}"
    )


def build_ds_config(train: TrainConfig, world_size: int) -> tuple[dict, str]:
    """(DeepSpeed config dict, precision actually used)."""
    if not train.deepspeed_config:
        raise ConfigError("train.strategy=deepspeed needs train.deepspeed_config (e.g. zero2_bf16.json)")
    path = resolve_config_path(train.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    for key in ("optimizer", "scheduler", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_clipping"):
        if key in ds:
            raise ConfigError(f"{path}: '{key}' comes from the experiment config (train.*); remove it from the JSON")
    file_precision = (
        "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    )
    precision = file_precision if train.precision == "auto" else train.precision
    ds.pop("bf16", None) if precision != "bf16" else None
    ds.pop("fp16", None) if precision != "fp16" else None
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16" and "fp16" not in ds:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    ds["optimizer"] = {
        "type": "AdamW" if train.optimizer == "adamw" else "Adam",
        "params": {
            "lr": train.lr,
            "weight_decay": train.weight_decay,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "torch_adam": True,
        },
    }
    if train.optimizer == "adam":
        ds["optimizer"]["params"]["adam_w_mode"] = False
    ds["train_micro_batch_size_per_gpu"] = train.batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum_steps
    ds["train_batch_size"] = train.batch_size * world_size * train.grad_accum_steps
    if train.grad_clip_norm:
        ds["gradient_clipping"] = train.grad_clip_norm
    ds.setdefault("steps_per_print", 10**9)
    return ds, precision


def initialize(model: torch.nn.Module, ds_config: dict):
    import deepspeed
    import deepspeed.ops

    # Avoid compiling the shared-memory communication op on first use.
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        dist_init_required=False,
    )
    return engine, optimizer


def engine_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def universal_info() -> dict:
    """The client state DeepSpeed's ``ds_to_universal`` requires of a checkpoint (a model
    without tensor or pipeline parallelism: its version key alone)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def to_universal(src: Path, dst: Path) -> None:
    """``src`` (one tag's ZeRO partitions) as a universal checkpoint in ``dst``, through
    DeepSpeed's own converter, in this process (its worker pools of 1)."""
    import contextlib
    import io
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as convert

    from trd_hpc.fsio import atomic_write_text

    shutil.rmtree(dst, ignore_errors=True)  # a conversion killed half-way
    from types import SimpleNamespace

    args = SimpleNamespace(  # the converter's parsed arguments
        input_folder=str(src),
        output_folder=str(dst),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its per-parameter progress lines
        convert(args)
    atomic_write_text(dst / "complete", "ok\n")
