"""Typed experiment configs: YAML files plus dotted ``key=value`` overrides.

YAML and overrides are merged with OmegaConf (which also parses the override
values: ``20000`` is an int, ``[1,2]`` a list, ``${cohort.seed}`` an
interpolation of another key); the merged tree is validated by pydantic models
that reject unknown keys and non-finite numbers.  Every error names the dotted
key and, for an unknown key, lists the valid ones at that level.

OmegaConf resolvers (``${oc.env:VAR}``, ``${oc.decode:...}``, any ``${name:...}``)
are refused: they read the environment, and the resolved value would end up in
the run's config.yaml, its W&B record and every log that prints the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    Tag,
    ValidationError,
)

from trd_hpc.errors import ConfigError  # noqa: E402  (re-exported: a config file or override is invalid)

# The shared sections live in trd_hpc/sections.py; Strict is re-exported here, the base
# of every config class (a task of your own imports it from either).
from trd_hpc.sections import Strict  # noqa: E402,F401


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# What a config may be.  The classes live in the paper folders (trd_hpc/tasks/NAME/config.py)
# and in task modules registered at run time; the config layer only keeps them by name.
ExperimentConfig = BaseModel
CohortConfig = BaseModel
_TASKS: dict[str, type[BaseModel]] = {}
_COHORTS: dict[str, type[BaseModel]] = {}
_INGEST_SPECS: dict[str, type[BaseModel]] = {}
_builtins_loaded = False


def _load_builtin_configs() -> None:
    """Register the config classes of the built-in papers (``trd_hpc.registry.BUILTIN_TASKS``).

    Each paper folder's ``config.py`` names them: ``EXPERIMENT`` (the class of ``task: NAME``),
    ``COHORTS`` ({cohort kind: class}) and ``INGEST_SPEC`` (an ingest spec's class, or None).
    They are imported by name on first use, as the task and cohort-kind registries import
    their entries: the paper folders sit above this module and import it."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import importlib

    from trd_hpc.registry import BUILTIN_TASKS, load_plugins

    for task in BUILTIN_TASKS:
        mod = importlib.import_module(f"trd_hpc.tasks.{task}.config")
        register_experiment(task, mod.EXPERIMENT)
        for kind, cls in mod.COHORTS.items():
            register_cohort(kind, cls)
        if mod.INGEST_SPEC is not None:
            register_ingest_spec(task, mod.INGEST_SPEC)
    load_plugins()  # their register() calls add their classes here


def experiment_class(task: str) -> type[BaseModel] | None:
    _load_builtin_configs()
    return _TASKS.get(task)


def ingest_spec_class(task: str) -> type[BaseModel] | None:
    """The class of an ingest spec with ``task: NAME`` (trd_hpc.ingest.resolve)."""
    _load_builtin_configs()
    return _INGEST_SPECS.get(task)


def ingest_tasks() -> list[str]:
    _load_builtin_configs()
    return sorted(_INGEST_SPECS)


def register_cohort(kind: str, cls: type[BaseModel]) -> None:
    """Make ``kind: NAME`` in a cohort section validate with ``cls`` (trd_hpc.data.kinds.register)."""
    have = _COHORTS.get(kind)
    if have is not None and have is not cls:
        raise ValueError(f"cohort kind {kind!r} already has the config class {have.__name__}")
    _COHORTS[kind] = cls


def register_ingest_spec(task: str, cls: type[BaseModel]) -> None:
    """Make ``task: NAME`` in an ingest spec validate with ``cls``."""
    have = _INGEST_SPECS.get(task)
    if have is not None and have is not cls:
        raise ValueError(f"task {task!r} already has the ingest spec class {have.__name__}")
    _INGEST_SPECS[task] = cls


def register_experiment(task: str, cls: type[BaseModel]) -> None:
    """Make ``task: NAME`` in a config validate with ``cls`` (called by trd_hpc.tasks.register)."""
    have = _TASKS.get(task)
    if have is not None and have is not cls:
        raise ValueError(f"task {task!r} already has the config class {have.__name__}")
    _TASKS[task] = cls


# --------------------------------------------------------------------------- loading
def _tagged_members(ann: Any) -> dict[str, type] | None:
    """{tag: class} of a tagged union (a `cohort` section), else None."""
    import typing

    if typing.get_origin(ann) is not Union:
        return None
    out = {}
    for member in typing.get_args(ann):
        args = typing.get_args(member)
        tags = [a for a in args[1:] if isinstance(a, Tag)]
        if not tags:
            return None
        out[tags[0].tag] = args[0]
    return out


def _walk(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, tuple]:
    """(the pydantic model class that owns the field at ``loc``, ``loc`` without union tags).

    A tagged union (the `cohort` section) puts its tag into the error's location
    (``cohort.emt.bogus``); the key a user wrote has none."""
    import typing

    model: Any = root
    keys: list = []
    skip_key = False  # the next loc part is a dict key or list index
    pending_union: dict[str, type] | None = None
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if pending_union is not None:
            model, pending_union = pending_union.get(str(part)), None
            continue
        keys.append(part)
        if last:
            break
        if skip_key:
            skip_key = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            model = None
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            model = None
            continue
        ann = field.annotation
        members = _tagged_members(ann)
        if members is not None:
            pending_union = members
            continue
        if typing.get_origin(ann) in (dict, list):
            ann = typing.get_args(ann)[-1]
            skip_key = True
        model = ann
    owner = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    return owner, tuple(keys)


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for listing valid keys)."""
    return _walk(root, loc)[0]


def format_validation_error(err: ValidationError, root: type[BaseModel], source: str, what: str = "config") -> str:
    """pydantic's errors as lines naming each dotted key; an unknown key lists the valid ones there."""
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        owner, loc = _walk(root, tuple(e["loc"]))
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            valid = sorted(owner.model_fields) if owner else []
            lines.append(f"  unknown key '{key}'; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  '{key}': missing")
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            lines.append(f"  '{key}.kind' must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check across keys: its message names them; the input is a whole section.
            lines.append(f"  '{key}': {msg}" if loc else f"  {msg}")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            lines.append(f"  '{key}': {msg} (got {got_s})")
    return "\n".join(lines)


# libyaml's safe loader where PyYAML was built with it: the same safe subset (no tags that
# construct objects), 10x faster on a bundle's config (most of a small predict's start-up)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 (a safe loader)


def _read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; ConfigError naming the file when it is missing or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = safe_load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def merge_overrides(data: dict, overrides: list[str] | None, source: str = "") -> dict:
    """Apply dotted ``key=value`` overrides (OmegaConf parses the values)."""
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. cohort.n_subjects=2000)")
    try:
        base = OmegaConf.create(data)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        uses = _resolver_uses(OmegaConf.to_container(merged, resolve=False))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply overrides {overrides} to {source or 'config'}: {e}") from e
    if uses:
        key, name = uses[0]
        raise ConfigError(
            f"{source or 'config'}: key '{key}' calls the OmegaConf resolver '{name}' (${{{name}:...}}); resolvers are "
            f"not allowed (they read the environment, and the value would be written into the run's config.yaml): "
            f"write the value itself" + (f" (also in: {', '.join(k for k, _ in uses[1:])})" if len(uses) > 1 else "")
        )
    try:
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot apply overrides {overrides} to {source or 'config'}: {e}") from e


def _resolver_call(text: str) -> str | None:
    """The name of a resolver ``text`` calls anywhere (``oc.env``; ``${...}.env`` when the name
    is itself an interpolation), or None.

    Read from OmegaConf's own parse tree, not a pattern: a pattern misses what the grammar
    accepts (``x\\\\${oc.env:V}`` is an escaped backslash then a live call; in
    ``${${tracking.group}.env:V}`` the resolver's name is an interpolation), and anything the
    grammar calls a resolver is refused, whatever it resolves to."""
    if "${" not in text:
        return None
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as P

    try:
        tree = grammar_parser.parse(text)
    except Exception:  # not valid interpolation syntax: OmegaConf itself refuses it on resolve
        return None
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, P.InterpolationResolverContext):
            name = node.resolverName()
            return name.getText() if name is not None else "?"
        stack.extend(node.getChild(i) for i in range(node.getChildCount()) if not hasattr(node.getChild(i), "symbol"))
    return None


def _resolver_uses(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, resolver name) of every string value that calls a resolver."""
    if isinstance(node, dict):
        return [u for k, v in node.items() for u in _resolver_uses(v, f"{prefix}{k}.")]
    if isinstance(node, (list, tuple)):
        return [u for i, v in enumerate(node) for u in _resolver_uses(v, f"{prefix}{i}.")]
    if isinstance(node, str):
        name = _resolver_call(node)
        if name:
            return [(prefix[:-1], name)]
    return []


def validate_experiment(data: dict, source: str = "config") -> ExperimentConfig:
    task = data.get("task")
    _load_builtin_configs()
    if task not in _TASKS:
        raise ConfigError(f"{source}: key 'task' must be one of {sorted(_TASKS)}, got {task!r}")
    model = _TASKS[task]
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None


def _read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """An experiment YAML with its ``extends: OTHER.yaml`` chain merged in (OTHER relative to
    the file naming it; this file's keys win), so a variant config states only what differs."""
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: key 'extends' must name one config file, got {parent!r}")
    target = (path.parent / parent).resolve()
    if target in seen or target == path.resolve():
        chain = " -> ".join(str(p) for p in (*seen, path.resolve(), target))
        raise ConfigError(f"{path}: key 'extends' makes a cycle: {chain}")
    if not target.is_file():
        raise ConfigError(f"{path}: key 'extends': config file not found: {target}")
    return deep_merge(_read_config_file(target, (*seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment config from a YAML file, or a packaged one by name (``emt_tiny``:
    trd_hpc.resources), with ``key=value`` overrides applied."""
    from trd_hpc import resources

    path = resources.config_path(path)
    data = merge_overrides(_read_config_file(path), overrides, str(path))
    return validate_experiment(data, str(path))


def validate_cohort(data: dict, source: str = "cohort config") -> CohortConfig:
    kind = data.get("kind")
    _load_builtin_configs()
    if kind not in _COHORTS:
        raise ConfigError(f"{source}: key 'kind' must be one of {sorted(_COHORTS)}, got {kind!r}")
    model = _COHORTS[kind]
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data['a']['b'] = value`` for ``key='a.b'`` (missing levels are created, so validation
    reports an unknown key by name; the value is copied)."""
    import copy

    *path, last = key.split(".")
    node = data
    for part in path:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[last] = copy.deepcopy(value)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys: ``{"test": {"auc": 1}}`` -> ``{"test.auc": 1}``.
    Lists stay values; so does an empty mapping (a section set to ``{}`` is visible)."""
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out


def derive(cfg: BaseModel, updates: dict[str, Any], source: str = "derived config") -> Any:
    """A new config: ``cfg`` as a dict, the dotted ``updates`` set, validated again whole.

    The one way to make a config from another (a baseline's, a fold's, a benchmark's): setting
    attributes on a copy (pydantic's ``model_copy``, or assignment) validates only the field
    set, so a cross-key rule (a single-task baseline's early-stopping monitor, the patch that
    must divide the fMRI shape) would not be applied again."""
    data = to_dict(cfg)
    for key, value in updates.items():
        set_dotted(data, key, value)
    if isinstance(cfg, tuple(_TASKS.values())):
        return validate_experiment(data, source)
    try:
        return type(cfg).model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, type(cfg), source)) from None


def to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
