"""The sweep YAML: loading it, and checking every key before any trial starts. A mistake is reported
as one 'key.path: what is wrong' line per problem, translated from the errors of the schema and checks
that wandb itself uses (the `sweeps` package), and each parameter's values are parsed by train.py's
own parser so that a flag train.py lacks fails here once, not in every trial."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from sweep.trials import ARG_MACROS, DEFAULT_COMMAND, ENVVAR_MACRO, format_args, runs_train_py


class SweepConfigError(ValueError):
    """A mistake in the sweep YAML or the flags, named by file and key; printed without a traceback."""


def import_sweeps() -> Any:
    """wandb's sweep engine. Its pydantic-1 style model warns on import under pydantic 2 (harmless)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def swept_parameters(config: dict[str, Any]) -> list[str]:
    """The parameters that vary between trials (those without a single fixed value)."""
    return [k for k, spec in config["parameters"].items() if "value" not in spec]


def load_config(path: str | Path, mode: str | None = None) -> dict[str, Any]:
    """Read a sweep YAML, apply --mode, fill wandb's default program/command, check every key."""
    path = Path(path)
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        shipped = sorted((Path(__file__).resolve().parent.parent / "sweep_configs").glob("*.yaml"))
        hint = (f"; the shipped sweeps are sweep_configs/<name>.yaml ({', '.join(p.stem for p in shipped)})"
                if not path.exists() else "")
        raise SweepConfigError(f"{path}: cannot read it ({e.strerror}){hint}") from None
    except yaml.YAMLError as e:
        raise SweepConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise SweepConfigError(f"{path}: expected a mapping of sweep keys (method, metric, parameters, ...)")
    if not {"method", "parameters"} & set(config):  # e.g. a training script's config file (model:, training:)
        raise SweepConfigError(f"{path}: not a sweep config: a sweep has method, metric and parameters (see "
                               "sweep_configs/); a training config's keys are train.py's flags, given on its "
                               "command line")
    if mode and isinstance(config.get("parameters"), dict):
        config["parameters"]["mode"] = {"value": mode}
    config.setdefault("program", "train.py")
    config.setdefault("command", list(DEFAULT_COMMAND))
    problems = check_config(config)
    if problems:
        raise SweepConfigError("\n".join(f"{path}: {p}" for p in problems))
    return config


def check_config(config: dict[str, Any]) -> list[str]:
    """Everything wrong with a sweep config, one 'key: what' line each; later checks need earlier ones clean."""
    for check in (check_schema, check_semantics, check_command, check_train_flags):
        problems = check(config)
        if problems:
            return problems
    return []


# ----------------------------------------------------------------------------- the schema

def check_schema(config: dict[str, Any]) -> list[str]:
    """The sweeps package's JSON schema (the one wandb validates with), errors translated to key paths."""
    import_sweeps()
    from sweeps.config.schema import validator

    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [_describe_error(e) for e in errors]
    if "parameters" not in config:
        problems.append("parameters: missing: the sweep needs at least one parameter")
    if "metric" not in config:
        problems.append("metric: missing: trials are ranked by it (e.g. metric: {name: val_loss, goal: minimize})")
    return problems


def _leaf_errors(error: Any) -> list[Any]:
    """The innermost errors under a jsonschema error (an anyOf failure holds one per alternative)."""
    return [leaf for sub in error.context for leaf in _leaf_errors(sub)] if error.context else [error]


def _key_path(path: Any) -> str:
    return ".".join(str(p) for p in path)


def _describe_error(error: Any) -> str:
    """One jsonschema error as 'key.path: message', digging into anyOf for the error that explains it."""
    path = list(error.absolute_path)
    if len(path) == 2 and path[0] == "parameters":
        return f"{_key_path(path)}: {_explain_parameter(error.instance)}"
    leaves = _leaf_errors(error)
    if len(leaves) > 1 and all(e.validator == "required" for e in leaves):  # alternatives, each incomplete
        needs = " or ".join(sorted({" + ".join(e.schema["required"]) for e in leaves}))
        return f"{_key_path(path) or '(top level)'}: needs {needs}"
    leaf = max(leaves, key=lambda e: len(e.absolute_path))
    return _error_line(leaf, _key_path(leaf.absolute_path))


def _error_line(error: Any, where: str) -> str:
    """A leaf error as 'where: message': an unknown key with the keys allowed there, a number YAML read
    as text with how to write it."""
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        return f"{key}: unknown key (allowed here: {', '.join(allowed)})"
    hint = ""
    if isinstance(error.instance, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", error.instance):
        hint = f" (YAML reads {error.instance} as text: write it with a dot, e.g. 1.0e-4)"
    return f"{where or '(top level)'}: {error.message}{hint}"


def _explain_parameter(spec: Any) -> str:
    """Why a parameter matches none of the schema's parameter forms, judged against the closest form."""
    from jsonschema import Draft7Validator
    from sweeps.config.schema import format_checker, sweep_config_jsonschema as schema

    if not isinstance(spec, dict):
        return "expected a mapping such as {value: 3}, {values: [1, 2]} or {min: 1.0e-4, max: 1.0e-2}"
    definitions = schema["definitions"]
    forms = []
    for ref in definitions["parameter"]["anyOf"]:
        form = definitions[ref["$ref"].split("/")[-1]]
        forms += form.get("anyOf", [form])  # uniform is itself a choice of forms
    forms = [f for f in forms if "distribution" in f.get("properties", {})]  # not nested parameter dicts
    dist = spec.get("distribution")
    if dist is not None:
        known = sorted({d for f in forms for d in f["properties"]["distribution"]["enum"]})
        forms = [f for f in forms if dist in f["properties"]["distribution"]["enum"]]
        if not forms:
            return f"distribution: unknown distribution {dist!r} (one of: {', '.join(known)})"
    else:
        forms = [f for f in forms if "distribution" not in f.get("required", [])]
    candidates = [_leaf_errors_against(Draft7Validator(f, format_checker=format_checker), spec) for f in forms]
    errors = min(candidates, key=len)
    # An unknown key explains the rest (a misspelt 'values' also makes 'values' missing).
    error = min(errors, key=lambda e: e.validator != "additionalProperties")
    if error.validator == "additionalProperties":
        unknown = sorted(set(spec) - set(error.schema["properties"]))
        return (f"{unknown[0]}: unknown key (a parameter takes value, values [+ probabilities], min + max, "
                f"or a distribution with its fields)")
    if error.validator == "required":
        return f"missing {error.message.split(' is a required')[0]}"
    return _error_line(error, _key_path(error.absolute_path)) if error.absolute_path else error.message


def _leaf_errors_against(validator: Any, instance: Any) -> list[Any]:
    return [leaf for e in validator.iter_errors(instance) for leaf in _leaf_errors(e)]


# ----------------------------------------------------------------------------- beyond the schema

def check_semantics(config: dict[str, Any]) -> list[str]:
    """The checks the sweeps package makes beyond the schema, and a dry run of its search and stopping."""
    sweeps = import_sweeps()
    from sweeps.config import schema

    def without_name(e: Exception, name: str) -> str:  # the package's messages start with the name
        return re.sub(rf"^(Parameter )?{re.escape(name)}:? ", "", str(e))

    problems = []
    for name, spec in config["parameters"].items():
        try:
            schema.validate_min_max(name, spec)
            schema.validate_categorical_prob(name, spec)
        except ValueError as e:
            problems.append(f"parameters.{name}: {without_name(e, name)}")
            continue
        try:  # wandb only warns: min/max as exponents is legitimate, if easy to get wrong
            schema.check_for_deprecated_distributions(name, spec)
        except ValueError as e:
            print(f"warning: parameters.{name}: {without_name(e, name)}", file=sys.stderr)
    if config["metric"]["name"] == "loss":
        print("warning: metric: 'loss' is the training loss; rank by val_loss (train loss rewards overfitting "
              "and batch settings, not generalisation)", file=sys.stderr)
    if "out_dir" in config["parameters"]:
        problems.append("parameters.out_dir: remove it: every trial gets its own --out_dir in the sweep folder")
    fixed = {k: spec["value"] for k, spec in config["parameters"].items() if "value" in spec}
    if (config["metric"]["name"].startswith("val_") and fixed.get("val_data_path") == ""
            and float(fixed.get("val_fraction", 1)) == 0):
        problems.append(f"metric.name: no trial can report {config['metric']['name']}: val_data_path '' with "
                        f"val_fraction 0 leaves no validation data; give val_data_path, or a val_fraction above 0")
    if problems:
        return problems
    try:
        sweeps.next_run(config, [])
    except ValueError as e:
        problems.append(f"method ({config['method']}): {e}")
    if "early_terminate" in config:
        try:
            sweeps.stop_runs(config, [])
        except ValueError as e:
            problems.append(f"early_terminate: {e}")
    return problems


def check_command(config: dict[str, Any]) -> list[str]:
    """The command must pass the parameters on (an ${args...} macro) and name a program that exists."""
    command = [str(c) for c in config["command"]]
    known = {"env", "interpreter", "program", *ARG_MACROS}
    problems = [f"command[{i}]: unknown macro {c} (known: {', '.join('${%s}' % k for k in sorted(known))}, "
                f"${{envvar:NAME}})" for i, c in enumerate(command)
                if c.startswith("${") and c.endswith("}") and c[2:-1] not in known and not ENVVAR_MACRO.fullmatch(c)]
    if not any(c[2:-1] in ARG_MACROS for c in command):
        problems.append("command: needs ${args} (or another ${args...} macro): it carries each trial's parameters "
                        "and --out_dir")
    if "${program}" in command and not Path(config["program"]).is_file():
        problems.append(f"program: {config['program']} not found from {Path.cwd()} "
                        "(run from the repository root, or give its path)")
    return problems


def check_train_flags(config: dict[str, Any]) -> list[str]:
    """Parse each parameter's values with train.py's own parser for the sweep's mode: a typo, a flag of another
    mode or a mode train.py lacks fails here once, not in every trial."""
    if not runs_train_py(config):
        return []
    import train

    mode = config["parameters"].get("mode", {}).get("value", "pretrain")
    # allow_abbrev=False: a parameter must name a flag exactly. An unknown mode fails on its own value below.
    parser = train.build_parser(mode if mode in train.MODES else "pretrain")

    def raise_instead_of_exiting(message: str) -> None:
        raise ValueError(message)

    parser.error = raise_instead_of_exiting  # report the problem instead of exiting
    macro = next(str(c)[2:-1] for c in config["command"] if str(c)[2:-1] in ARG_MACROS)
    problems = []
    for name, spec in config["parameters"].items():
        for value in [spec[k] for k in ("value", "min", "max") if k in spec] + list(spec.get("values", [])):
            argv = format_args({name: value}, macro)
            try:
                unknown = parser.parse_known_args(argv)[1]
            except ValueError as e:
                problems.append(f"parameters.{name}: train.py rejects {' '.join(argv)}: {e}")
                break
            if unknown:
                problems.append(f"parameters.{name}: train.py does not accept {' '.join(unknown)}")
                break
    # --eval_iters counts global batches: trials of other global batches would be ranked on other validation rows
    params, metric = config["parameters"], config["metric"]["name"]
    varied = [k for k in ("batch_size", "accumulation_steps") if k in params and "value" not in params[k]]
    eval_iters = params.get("eval_iters", {}).get("value", parser.get_default("eval_iters"))
    if varied and metric.startswith("val_") and eval_iters != 0:
        problems.append(f"parameters.{varied[0]}: trials of other global batches would be validated on other rows "
                        f"(eval_iters {eval_iters} counts global batches), so their {metric} would not compare: add "
                        f"eval_iters: {{value: 0}} (the whole validation set)")
    return problems
