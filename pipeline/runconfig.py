"""The run configuration (config/config.yaml): schema validation and cross-field checks.

The JSON Schema (``pipeline/schema.yaml``, shipped inside the package so that any install can
validate a config) gives every key's type, default and description and
rejects unknown keys; :func:`cross_check` adds what a schema cannot say (trust_lo < trust_hi,
every element known to the oracle, stage systems that exist, a valid DeePMD training input)
with messages naming the key. Snakemake runs both before any job (rules/common.smk);
``dpelt check-config`` runs them by hand.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError



@functools.cache
def schema() -> dict:
    """The run config's JSON Schema (package data ``pipeline/schema.yaml``): the one place of every
    default. Read once; callers do not modify it."""
    from importlib.resources import files

    import yaml

    return yaml.safe_load(files("pipeline").joinpath("schema.yaml").read_text())


def schema_default(key: str):
    """The schema's default of a dotted key (``label.max_force``): what a CLI option falls back to."""
    node = schema()
    for part in key.split("."):
        node = node["properties"][part]
    return copy.deepcopy(node["default"])


def _default_filling_validator(schema: dict):
    import jsonschema

    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def resolved_section(name: str, section: dict | None, source: str | None = None) -> dict:
    """Top-level section ``name`` of a run config with the schema's defaults filled in and
    checked: what a job gets from a --spec written by hand as from the workflow."""
    data = copy.deepcopy(section) if section is not None else {}
    errors = sorted(_default_filling_validator(schema()["properties"][name]).iter_errors(data), key=lambda e: len(list(e.absolute_path)))
    if errors:
        where = _where(errors[0])
        raise ConfigError(errors[0].message, path=source, key=name if where == "(top level)" else f"{name}.{where}")
    return data


def _where(error) -> str:
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path).replace(".[", "[")
    return path or "(top level)"


def validate_schema(config: dict, source: str | None = None) -> dict:
    """Fill defaults and validate against the schema; the first error names its key."""
    validator = _default_filling_validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        e = errors[0]
        raise ConfigError(e.message, path=source, key=_where(e))
    return config


def stage_trust(config: dict, stage: int) -> tuple[float, float]:
    st = config["explore"]["stages"][stage]
    lo = st.get("trust_lo") if st.get("trust_lo") is not None else config["select"]["trust_lo"]
    hi = st.get("trust_hi") if st.get("trust_hi") is not None else config["select"]["trust_hi"]
    return float(lo), float(hi)


def stage_systems(config: dict, stage: int) -> list[str]:
    names = [s["name"] for s in config["init"]["structures"]]
    return list(config["explore"]["stages"][stage].get("systems") or names)


def train_input(config: dict) -> dict:
    """The DeePMD-style training input of the run (type_map filled in)."""
    t = copy.deepcopy(config["train"])
    model = t.get("model", {})
    model.setdefault("type_map", list(config["type_map"]))
    return {"model": model, "learning_rate": t.get("learning_rate", {}), "loss": t.get("loss", {}), "training": t.get("training", {})}


def cross_check(config: dict, source: str | None = None, check_paths: bool = True) -> None:
    """Checks across keys, after schema validation (which filled the defaults).

    ``check_paths``: also require the files of ``init.data`` and ``init.structures`` (the
    workflow skips this once the initial data exist: only the init job reads them)."""
    from .label.oracles import check_elements, make_oracle
    from .train.config import parse_train_config

    tm = list(config["type_map"])
    sel = config["select"]
    if not sel["trust_lo"] < sel["trust_hi"]:
        raise ConfigError(f"trust_lo ({sel['trust_lo']}) must be below trust_hi ({sel['trust_hi']})", path=source, key="select.trust_lo")
    if (sel["v_trust_lo"] is None) != (sel["v_trust_hi"] is None) or (sel["v_trust_lo"] is not None and not sel["v_trust_lo"] < sel["v_trust_hi"]):
        raise ConfigError("give both v_trust_lo < v_trust_hi, or neither", path=source, key="select.v_trust_lo")
    names = [s["name"] for s in config["init"]["structures"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"structure names must be unique: {names}", path=source, key="init.structures")
    if not names and not config["init"]["data"]:
        raise ConfigError("no structures and no data: nothing to start from", path=source, key="init.structures")
    for k, s in enumerate(config["init"]["structures"]):
        if (s.get("file") is None) == (s.get("lattice") is None):
            raise ConfigError("give either lattice (with elements) or file", path=source, key=f"init.structures[{k}]")
        if check_paths and s.get("file") is not None and not Path(s["file"]).exists():  # paths are relative to the run directory
            raise ConfigError(f"{s['file']}: no such file (relative paths are taken from the run directory {Path.cwd()})", path=source, key=f"init.structures[{k}].file")
        for el in s.get("elements", []):
            if el not in tm:
                raise ConfigError(f"element {el!r} is not in type_map {tm}", path=source, key=f"init.structures[{k}].elements")
    for k, p in enumerate(config["init"]["data"] if check_paths else []):
        if not Path(p).exists():
            raise ConfigError(f"{p}: no such file or directory (relative paths are taken from the run directory {Path.cwd()})", path=source, key=f"init.data[{k}]")
    oracle = config["label"]["oracle"]
    try:
        built = make_oracle(oracle, source=source or "config")
        check_elements(oracle, tm, source=source or "config")
        lattices = [s["name"] for s in config["init"]["structures"] if s.get("lattice") is not None]
        if getattr(built, "molecular_only", False) and lattices:
            raise ConfigError(f"oracle {oracle['name']!r} is molecular (no periodic cells), but init structures {lattices} are periodic lattices", key="oracle.name")
    except ConfigError as exc:
        raise ConfigError(exc.message, path=source, key="label.oracle.name" if exc.key in (None, "oracle.name") else f"label.{exc.key}" if exc.key.startswith("oracle.") else exc.key) from None
    for k, st in enumerate(config["explore"]["stages"]):
        for name in st.get("systems", []):
            if name not in names:
                raise ConfigError(f"unknown system {name!r}; init structures are {names}", path=source, key=f"explore.stages[{k}].systems")
        if not (st.get("systems") or names):
            raise ConfigError("exploration needs init structures to start from", path=source, key=f"explore.stages[{k}].systems")
        lo, hi = stage_trust(config, k)
        if not lo < hi:
            raise ConfigError(f"trust_lo ({lo}) must be below trust_hi ({hi})", path=source, key=f"explore.stages[{k}].trust_lo")
        if st["ensemble"].startswith("npt") and any(p is None for p in st["press"]):
            raise ConfigError(f"ensemble {st['ensemble']} needs pressures in bar", path=source, key=f"explore.stages[{k}].press")
        if not st["ensemble"].startswith("npt") and any(p is not None for p in st["press"]):
            raise ConfigError(f"ensemble {st['ensemble']} keeps the volume fixed: pressures {st['press']} would be recorded but never applied (use an npt ensemble, or press: [null])", path=source, key=f"explore.stages[{k}].press")
        if st["trj_freq"] > st["nsteps"]:
            raise ConfigError(f"trj_freq {st['trj_freq']} > nsteps {st['nsteps']}: only the (already labelled) start frame would be kept", path=source, key=f"explore.stages[{k}].trj_freq")
    if sel.get("adapt_perc_candi") and sel.get("adapt_numb_candi") is None:
        raise ConfigError("adapt_perc_candi works with the adaptive trust_lo, which adapt_numb_candi switches on; set adapt_numb_candi (0 for a fraction only)", path=source, key="select.adapt_perc_candi")
    t = config["train"]
    for name in ("warm_start_steps", "warm_start_start_lr"):
        if t.get(name) is not None and not t.get("warm_start"):
            raise ConfigError(f"{name} applies to warm-started members only; set train.warm_start: true (or remove {name})", path=source, key=f"train.{name}")
    inp = train_input(config)
    if list(inp["model"]["type_map"]) != tm:
        raise ConfigError(f"train.model.type_map {inp['model']['type_map']} differs from type_map {tm}", path=source, key="train.model.type_map")
    if isinstance(inp["training"].get("training_data", {}).get("batch_size"), list):
        raise ConfigError("a list (one value per system) cannot follow the loop's data, whose systems grow every iteration; use an integer or 'auto:N'", path=source, key="train.training.training_data.batch_size")
    if "systems" in inp["training"].get("training_data", {}):
        raise ConfigError("filled in by the loop (initial data + every iteration's labels); remove it", path=source, key="train.training.training_data.systems")
    if "validation_data" in inp["training"]:
        raise ConfigError("the loop validates on the held-out set; remove it", path=source, key="train.training.validation_data")
    probe = copy.deepcopy(inp)
    probe["training"]["training_data"] = dict(probe["training"].get("training_data", {}), systems=["<loop data>"])
    try:
        parse_train_config({f"{k}": v for k, v in probe.items()}, source=source)
    except ConfigError as exc:
        raise ConfigError(exc.message, path=source, key=f"train.{exc.key}" if exc.key else "train") from None


def load_run_config(path: str | os.PathLike) -> dict:
    """Read, validate (schema + cross checks) and return a run config with defaults filled."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", path=path)
    try:
        config: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML: {exc}", path=path) from None
    if not isinstance(config, dict):
        raise ConfigError("top level must be a mapping", path=path)
    validate_schema(config, str(path))
    cross_check(config, str(path))
    return config
