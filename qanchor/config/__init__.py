"""One typed config tree: a dataclass per component and per command, loaded from YAML with OmegaConf.

Structured configs make an unknown or mistyped key fail with its dotted path. ``key=value`` overrides
are typed by the schema: a string setting takes the text after ``=`` verbatim (so a query may hold any
characters), every other value is read as YAML (numbers, booleans, ``[a, b]`` lists, ``null``); a list
of strings also takes a single bare value. A component receives its own sub-config, never the whole tree.

Layer: the base of the package (imports nothing of qanchor but ``errors``).

Example:
    >>> from qanchor.config import load_config, PretrainConfig
    >>> cfg = load_config("configs/pretrain/tiny-synth.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> cfg.train.max_steps  # doctest: +SKIP
    10
    >>> load_config(None, ["query=Will it rain: yes or no?"], schema=BenchConfig).query  # doctest: +SKIP
    'Will it rain: yes or no?'
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qanchor.config.commands import (
    AskConfig,
    BenchConfig,
    CompleteJourneyConfig,
    CompleteJourneyProfileConfig,
    DataOverrides,
    DescribeConfig,
    EmbedConfig,
    IndexBuildConfig,
    IndexSearchConfig,
    InferConfig,
    PretrainConfig,
    PromptTuneConfig,
    SynthConfig,
    UpdateConfig,
    UqaConfig,
    UserUConfig,
    require,
)
from qanchor.config.sections import (
    BackboneConfig,
    DataConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    TextEncoderConfig,
    TrainConfig,
    UserEncoderConfig,
    reading_saved_run,
)
from qanchor.errors import ConfigError

try:  # what OmegaConf.load reads YAML with (its float, timestamp and duplicate-key rules), without making a tree of it
    from omegaconf._yaml import get_yaml_loader  # omegaconf >= 2.4
except ImportError:
    try:
        from omegaconf._utils import get_yaml_loader  # omegaconf 2.1-2.3
    except ImportError:  # a private name moved again: PyYAML's safe loader (the typed merge still converts "1e-3",
        def get_yaml_loader() -> Any:  # and qanchor.data.io refuses a repeated key where it matters)
            return yaml.SafeLoader

__all__ = [
    "TextEncoderConfig", "DataConfig", "LoraConfig", "BackboneConfig", "UserEncoderConfig", "ModelConfig",
    "LossConfig", "TrainConfig", "PretrainConfig", "DataOverrides", "PromptTuneConfig", "BenchConfig", "InferConfig",
    "EmbedConfig", "UpdateConfig", "AskConfig", "DescribeConfig", "UqaConfig", "IndexBuildConfig", "IndexSearchConfig", "SynthConfig", "CompleteJourneyConfig",
           "CompleteJourneyProfileConfig",
    "UserUConfig", "SCHEMAS", "FILE_KEYS", "configs_root", "load_config", "with_overrides", "to_yaml", "to_container",
    "require",
    "require_file", "load_run_config",
]

# Which schema a YAML follows is given by its folder under configs/.
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "pretrain": PretrainConfig,
    "prompt_tune": PromptTuneConfig,
    "bench": BenchConfig,
    "uqa": UqaConfig,
    "data": DataConfig,
    "embed": EmbedConfig,
    "update": UpdateConfig,
}


# Settings that name another config file. Relative paths in them are read from the working directory, as every path
# is; one written in a config file that is not there is then looked up from that file's folder and the folders above it,
# so the shipped configs (`prompt_tune_config: configs/prompt_tune/tiny-cj.yaml`) work from any working directory.
FILE_KEYS: dict[type, tuple[str, ...]] = {
    BenchConfig: ("prompt_tune_config",),
    PretrainConfig: ("train.deepspeed_config",),
}


def configs_root() -> Path:
    """The repository's ``configs/`` directory (the package is installed editable next to it)."""
    return Path(__file__).resolve().parents[2] / "configs"


def _preset_path(preset: str, beside: Path | None = None) -> Path:
    """The file of ``preset``: a YAML path (relative ones from the working directory, else from ``beside``, the folder
    of the file that names it, as a config file's other file settings are found), or a shipped preset's name."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        if beside is not None and not path.is_absolute() and (beside / path).is_file():
            return beside / path
    candidate = configs_root() / "model" / f"{preset}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in (configs_root() / "model").glob("*.yaml"))
        raise ConfigError(f"model.preset: unknown preset '{preset}'; choose one of {known} or give a YAML path")
    return candidate


def _load_yaml(path: Path) -> Any:
    """The YAML file ``path`` as plain values, read as OmegaConf.load reads YAML, but not made an OmegaConf tree: that
    parses "${" in every text as an interpolation, and "Spend over ${50?" in a text setting failed as one."""
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give a YAML file")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=get_yaml_loader())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save "
                          "it as UTF-8") from None
    except yaml.MarkedYAMLError as exc:  # the problem and where: its first line alone said "while constructing a mapping"
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """``exc``'s problem and where it is, e.g. "found duplicate key seed at line 3, column 1"; for an unclosed bracket
    or quote (found where the file ends) also where it was opened."""
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    text = exc.problem or exc.context or "unreadable"
    if exc.problem_mark is not None:
        text += f" at {at(exc.problem_mark)}"
    if isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError)) and exc.context and exc.context_mark:
        text += f" ({exc.context} from {at(exc.context_mark)})"
    return text


def _is_text(tp: Any) -> bool:
    return tp is str or typing.get_origin(tp) is Literal


def _verbatim(text: str) -> str:
    """``text`` escaped for OmegaConf, which would otherwise resolve ``${...}`` in it as an interpolation ("spent over
    ${100}?" failed, "${oc.env:HOME}" became the home folder): a text setting is taken as written."""
    # each backslash just before "${" doubled (OmegaConf reads "\\${" as a backslash, then an interpolation), then the
    # "${" escaped: "C:\\${x}" stays "C:\\${x}"
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text) if isinstance(text, str) else text


def _verbatim_copy(cfg: Any) -> Any:
    """A typed config with every text in it escaped as :func:`_verbatim` does: what OmegaConf.structured reads back as
    the same values (a config loaded verbatim, then rebuilt by :func:`with_overrides`, resolved "${...}" in it)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        # a copy of a config already made: the checks a new run gets (a saved run's recipe an earlier qanchor allowed,
        # read to compare it with a resume's) are not its to run again
        with reading_saved_run():
            return dataclasses.replace(cfg, **{f.name: _verbatim_copy(getattr(cfg, f.name))
                                               for f in dataclasses.fields(cfg) if f.init})
    if isinstance(cfg, str):
        return _verbatim(cfg)
    if isinstance(cfg, list):
        return [_verbatim_copy(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: _verbatim_copy(v) for k, v in cfg.items()}
    return cfg


def _text_as_written(typed: Any, raw: Any, tp: Any, source: str, key: str = "") -> Any:
    """``typed`` (a YAML file's values as YAML 1.1 types them) with every value of a text setting taken as written
    (``raw``: the same file read with every scalar as text). Unquoted, `options: [yes, no]` would be booleans and
    `user: 0012` the number 10, which the schema then turns into the texts "True" and "10". As on the command line,
    one bare value where a list belongs is a list of one (`tasks: churn`), and an item of a list of text must be text
    (``source``, ``key``: the file and dotted key, to name them)."""
    tp, _ = _strip_optional(tp)
    if typed is None or raw is None:
        return typed
    if _is_text(tp):
        return _verbatim(typed) if isinstance(typed, str) or not isinstance(raw, str) else _verbatim(raw)
    if typing.get_origin(tp) is list and not isinstance(typed, (list, dict)):
        typed, raw = [typed], [raw]  # OmegaConf said "Invalid value assigned: AnyNode is not a ListConfig"
    if typing.get_origin(tp) is list and isinstance(typed, list) and isinstance(raw, list) and len(raw) == len(typed):
        (item,) = typing.get_args(tp) or (Any,)
        if _is_text(_strip_optional(item)[0]):
            odd = next((r for t, r in zip(typed, raw) if isinstance(t, (list, dict))), None)
            if odd is not None:  # `tasks: [churn, [x]]` failed later, in a TypeError (unhashable list) or as [False]
                raise ConfigError(f"{source}: '{key}': item {odd!r} is not text; quote an item that holds ': ', ',' "
                                  f"or brackets, e.g. {key}: [\"first: item\", \"second, item\"]")
        return [_text_as_written(t, r, item, source, key) for t, r in zip(typed, raw)]
    if isinstance(typed, dict) and isinstance(raw, dict):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            # an unknown key's value escaped too: OmegaConf names the key, rather than failing to parse its "${"
            return {k: _text_as_written(v, raw.get(str(k)), hints[k], source, _dotted(key, k))
                    if k in hints else _verbatim_copy(v) for k, v in typed.items()}
        if typing.get_origin(tp) is dict:
            value_type = typing.get_args(tp)[1]
            odd = next(((k, v) for k, v in typed.items() if isinstance(v, (list, dict))), None)
            if odd is not None and _strip_optional(value_type)[0] in (int, float, bool, str):
                # OmegaConf let `max_events: {a: [1]}` through to the section's own check, which failed in a
                # TypeError it reported as "Could not create instance of DataConfig", on the command line
                name = _strip_optional(value_type)[0].__name__
                raise ConfigError(f"{source}: '{_dotted(key, odd[0])}' takes one {name} value, not "
                                  f"{type(odd[1]).__name__} {odd[1]!r}, e.g. {key}: {{{odd[0]}: 32}}")
            return {k: _text_as_written(v, raw.get(str(k)), value_type, source, _dotted(key, k)) for k, v in typed.items()}
    return typed


def _dotted(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    where = f"key '{key}'" if key else "config"
    return ConfigError(f"{source}: {where}: {msg}")


def _in_layer(layer: dict, dotted: str) -> bool:
    """Whether the overrides ``layer`` sets the dotted key ``dotted`` (or a key above it)."""
    node: Any = layer
    for part in re.sub(r"\[\d+\]", "", dotted).split("."):  # "train.betas[0]": an item of the list the layer sets
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _field_type(schema: type, path: list[str], item: str) -> Any:
    """The declared type at dotted ``path`` of ``schema`` (ConfigError naming the key if there is none)."""
    tp: Any = schema
    for depth, part in enumerate(path):
        tp, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(tp))
                raise ConfigError(f"override '{item}': unknown key '{'.'.join(path[:depth + 1])}' (known here: {known})")
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(path[:depth])}' has no sub-keys")
    return tp


def _check_sections(values: Any, schema: type, source: str, prefix: str = "") -> None:
    """A config file's sections given one value (``data: data/synth``) or a list, and mappings given a list (or the
    other way round), named by their dotted key: OmegaConf's merge said "str is not a subclass of DataConfig", or
    "Cannot merge incompatible container types", without the key."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        if key not in hints or value is None:
            continue  # an unknown key is OmegaConf's to name (with its "did you mean")
        tp, _ = _strip_optional(hints[key])
        dotted = f"{prefix}{key}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(str(_section_error(dotted, tp, source)).replace("{value}", str(value)))
            _check_sections(value, tp, source, f"{dotted}.")
        elif typing.get_origin(tp) is dict and not isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' takes a mapping, e.g. {{name: 1}}, not {type(value).__name__} "
                              f"{value!r}")
        elif typing.get_origin(tp) is list and isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' takes a list, e.g. [a, b], not a mapping")


def _section_error(key: str, tp: Any, where: str) -> ConfigError:
    hint = f"{key}.preset={{value}}" if tp is ModelConfig else f"{key}.{dataclasses.fields(tp)[0].name}=..."
    return ConfigError(f"{where}: '{key}' is a section of settings, not a value; set its keys, e.g. {hint}")


def _typed_value(tp: Any, raw: str, item: str) -> Any:
    tp, optional = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):  # `model=tiny`: a section given one value
        key = item.split("=", 1)[0].strip()
        raise ConfigError(str(_section_error(key, tp, f"override '{item}'")).replace("{value}", raw))
    if optional and raw in ("null", "None", "~"):
        return None
    if tp is str or typing.get_origin(tp) is Literal:
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return _verbatim(raw[1:-1] if quoted else raw)  # one layer of quotes a Makefile or script kept
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        if not raw.lstrip().startswith("["):
            return [_verbatim(raw)] if raw else []
        try:  # every item is text: `options=[yes,no]` means the words, not YAML 1.1's booleans
            items = yaml.load(raw, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': cannot read '{raw}' as a list of text") from None
        odd = next((x for x in items if not isinstance(x, str)), None) if isinstance(items, list) else items
        if odd is not None:  # `[Film 0: drama]` is a YAML mapping, `[[a]]` a list: not what a list of text means
            raise ConfigError(f"override '{item}': item {odd!r} is not text; quote an item that holds ': ', ',' or "
                              f"brackets, e.g. {item.split('=', 1)[0]}=[\"first: item\", \"second, item\"]")
        return [_verbatim(x) for x in items] if isinstance(items, list) else items
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': cannot read '{raw}' as a value of type {tp}") from None
    origin, key = typing.get_origin(tp), item.split("=", 1)[0].strip()
    if origin is list and value is not None and not isinstance(value, (list, dict)):
        return [value]  # one bare value is a list of one, as for lists of text
    want = "a list, e.g. [1, 2]" if origin is list else "a mapping, e.g. {name: 1}" if origin is dict else None
    if (origin is list and isinstance(value, dict)) or (origin is dict and value is not None and not isinstance(value, dict)) \
            or (want is None and isinstance(value, (list, dict))):
        raise ConfigError(f"override '{item}': {key} takes {want or 'one value, not a list or mapping'}")
    return value


def _overrides_layer(schema: type, overrides: list[str] | tuple[str, ...]) -> dict:
    layer: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            hint = " (settings are key=value, not --flags)" if item.startswith("--") else ""
            raise ConfigError(f"override '{item}' is not of the form key=value{hint}")
        key, raw = item.split("=", 1)
        try:  # a lone surrogate: bytes that are not UTF-8 on the command line, as Python decodes argv
            raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"{key.strip()}: the value given is not valid Unicode text (character {exc.start}); pass "
                              "it as UTF-8") from None
        path = key.strip().split(".")
        value = _typed_value(_field_type(schema, path, item), raw, item)
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return layer


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type | None = None,
                *, _resolved: bool = False):
    """Load a YAML config into its dataclass, applying ``key=value`` overrides.

    The schema follows from the file's folder under ``configs/`` (``pretrain``, ``model``, ...) unless
    given. A model ``preset`` (from the file or an override) is merged under the ``model`` section first.
    """
    path = Path(path) if path is not None else None
    if schema is None:
        folder = path.parent.name if path is not None else ""
        if folder not in SCHEMAS:
            raise ConfigError(f"{path}: cannot tell the config kind from folder '{folder}'; pass schema=")
        schema = SCHEMAS[folder]
    source = str(path) if path else "<command line>"
    cli_layer = _overrides_layer(schema, overrides)
    try:
        base = OmegaConf.structured(schema)
        file_values = _load_yaml(path) if path is not None else None
        if file_values is None:  # no file, or an empty one
            file_values = {}
        if not isinstance(file_values, dict):
            raise ConfigError(f"{source}: a config file is a mapping of settings (key: value), not a "
                              f"{type(file_values).__name__}")
        if path is not None:
            with path.open(encoding="utf-8") as fh:
                raw = yaml.load(fh, Loader=yaml.BaseLoader)  # every scalar as the text it was written as
            _check_sections(file_values, schema, source)
            file_values = _text_as_written(file_values, raw, schema, source)
        file_cfg = OmegaConf.create(file_values)
        cli_cfg = OmegaConf.create(cli_layer)
        layers = [base]
        if (schema is PretrainConfig or schema is ModelConfig) and not _resolved:
            layers.append(_preset_layer(schema, file_cfg, cli_cfg, path))
        merged = OmegaConf.merge(*layers, file_cfg)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, source) from None
    except TypeError as exc:  # OmegaConf: a list where the schema has a mapping, or the other way round
        raise ConfigError(f"{source}: {exc} (a list where a mapping belongs, or the other way round)") from None
    try:  # apart from the file's layer: a bad value given on the command line is not the file's fault
        merged = OmegaConf.merge(merged, cli_cfg)
        _replace_mappings(merged, cli_layer, _mapping_literals(schema, overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise _wrap(exc, "<command line>" if key and _in_layer(cli_layer, str(key)) else source) from None
    except TypeError as exc:
        raise ConfigError(f"<command line>: {exc} (a list where a mapping belongs, or the other way round)") from None
    if path is not None:
        _resolve_file_keys(cfg, schema, path, cli_layer)
    return cfg


def load_run_config(path: str | Path) -> PretrainConfig:
    """The resolved pretraining config a run saved (a checkpoint's ``config.yaml``: :func:`to_yaml` of every key).

    Its ``model.preset`` is a record of where the model section came from, not merged again: the file already holds
    every key the preset gave, and the preset file may not exist where the checkpoint is read (another machine, another
    working directory, a preset edited since).
    """
    with reading_saved_run():  # a model trained before a check was added stays loadable
        return load_config(path, schema=PretrainConfig, _resolved=True)


def _resolve_file_keys(cfg: Any, schema: type, config_path: Path, cli_layer: dict) -> None:
    """Point each :data:`FILE_KEYS` setting that ``config_path`` wrote as a relative path, and that does not exist
    from the working directory, at the file it names relative to that config's folder or a folder above it.

    A value given on the command line stays as given (relative to the working directory), as does one found nowhere:
    :func:`require_file` refuses it where it is needed, with where it looked.
    """
    for key in FILE_KEYS.get(schema, ()):
        *parents, name = key.split(".")
        node, layer = cfg, cli_layer
        for part in parents:
            node, layer = getattr(node, part), layer.get(part, {})
        value = getattr(node, name)
        if value is None or name in layer or Path(value).is_absolute() or Path(value).exists():
            continue
        folder = config_path.resolve().parent
        for base in (folder, *folder.parents):
            if (base / value).is_file():
                setattr(node, name, str(base / value))
                break


def require_file(value: str | None, key: str) -> None:
    """ConfigError naming ``key`` when it names a file that is not there (``None``: nothing to check)."""
    if value is None or Path(value).is_file():
        return
    where = (f"{Path(value).resolve()} is not a file" if Path(value).exists() else
             f"looked from the working directory {Path.cwd()} and, for a path written in a config file, from that file's "
             "folder and the folders above it")
    raise ConfigError(f"{key}: {value} not found ({where}); give the file's path, or {key}=null")


def _mapping_literals(schema: type, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The keys of ``overrides`` whose value is written as a whole mapping (``data.max_events={bill: 8}``, ``{}``)."""
    out = []
    for item in overrides:
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if isinstance(_typed_value(_field_type(schema, path, item), raw, item), dict):
            out.append(key.strip())
    return out


def _replace_mappings(cfg: Any, layer: dict, literal_keys: list[str]) -> None:
    """A mapping given whole on the command line (``data.max_events={bill: 8}``; ``{}`` clears it) replaces the file's
    rather than merging into it, as a list or a number does; a dotted key (``data.max_events.bill=8``) sets that one
    entry and keeps the others."""
    for key in literal_keys:
        node = OmegaConf.select(cfg, key)
        if node is None or not OmegaConf.is_dict(node) or OmegaConf.get_type(node) is not dict:
            continue  # a section of the schema (model={...}) merges key by key
        value = layer
        for part in key.split("."):
            value = value[part]
        OmegaConf.update(cfg, key, value, merge=False)  # the layer's whole mapping: later dotted keys joined it


def with_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """A copy of the typed config ``cfg`` with ``key=value`` overrides applied (validated, and mappings replaced or
    merged, as on load)."""
    schema = type(cfg)
    try:
        layer = _overrides_layer(schema, overrides)
        merged = OmegaConf.merge(OmegaConf.structured(_verbatim_copy(cfg)), OmegaConf.create(layer))
        _replace_mappings(merged, layer, _mapping_literals(schema, overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, "<overrides>") from None


def _preset_layer(schema: type, file_cfg: Any, cli_cfg: Any, config_path: Path | None = None) -> Any:
    def pick(cfg: Any) -> str | None:
        node = cfg.get("model", {}) if schema is PretrainConfig else cfg
        if node is not None and not isinstance(node, (DictConfig, dict)):  # `model: tiny` in a file
            raise ConfigError(str(_section_error("model", ModelConfig, "config")).replace("{value}", str(node)))
        return node.get("preset") if node is not None else None

    cli_node = cli_cfg.get("model", {}) if schema is PretrainConfig else cli_cfg
    given_here = isinstance(cli_node, (DictConfig, dict)) and "preset" in cli_node
    preset = pick(cli_cfg) if given_here else pick(file_cfg)  # model.preset=null on the command line: no preset
    if not preset:
        return OmegaConf.create({})
    # a model config loaded directly is the chain's first link: a preset naming it back is a cycle too
    chain = [str(config_path)] if schema is ModelConfig and config_path is not None and not given_here else []
    beside = config_path.resolve().parent if config_path is not None and not given_here else None
    layer = _preset_chain(preset, chain, [config_path.resolve()] if chain else [], beside)
    layer.preset = preset  # the record of where the model section came from: the name given, not the files it named
    return OmegaConf.create({"model": layer}) if schema is PretrainConfig else layer


def _preset_chain(preset: str, chain: list[str], seen: list[Path], beside: Path | None = None) -> Any:
    """The model settings of ``preset``, on top of those of the preset its own file names (``preset: tiny`` in a
    file given as ``model.preset=my.yaml``), and so on down: a preset file says what it builds on, as a model config
    loaded directly does. ``chain`` / ``seen``: the presets (as written / as files) that led here; ``beside``: the
    folder of the file that named ``preset`` (a relative path in it is found from there too)."""
    path = _preset_path(preset, beside)
    chain = [*chain, preset]
    if path.resolve() in seen:
        raise ConfigError(f"model.preset: the presets name each other in a cycle ({' -> '.join(chain)}); remove the "
                          "'preset:' line of one of them")
    values = _load_yaml(path)
    if not isinstance(values, (dict, type(None))):
        raise ConfigError(f"{path}: a preset file is a mapping of model settings (key: value), not a "
                          f"{type(values).__name__}")
    layer = OmegaConf.create(_verbatim_copy(values or {}))  # text as written
    try:  # a bad key in the preset file is the preset's fault, not the config file's
        OmegaConf.merge(OmegaConf.structured(ModelConfig), layer)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, str(path)) from None
    below = layer.get("preset")
    if below:
        layer = OmegaConf.merge(_preset_chain(str(below), chain, [*seen, path.resolve()], path.resolve().parent), layer)
    return layer


def _structured_as_written(cfg: Any) -> DictConfig:
    """``cfg`` as an OmegaConf tree whose every text reads back exactly as it was given (resolve it to get them).
    OmegaConf parses "${" in a text as an interpolation: "r_${x" failed to parse, at the first checkpoint save."""
    return OmegaConf.structured(_verbatim_copy(cfg))


def to_container(cfg: Any) -> dict:
    """The typed config ``cfg`` as plain dicts and lists, every text as given (``${...}`` in it stays text)."""
    return OmegaConf.to_container(_structured_as_written(cfg), resolve=True)  # resolving only unescapes: text as given


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (what a checkpoint stores as ``config.yaml``): every text as given, so that
    :func:`load_config` reads the same config back."""
    return OmegaConf.to_yaml(_structured_as_written(cfg), resolve=True)
