"""Preset catalogs (YAML files beside this module) and custom specs from YAML/JSON files.

`load_model`, `load_system` accept a preset name or a file path. `spec_to_yaml` prints a spec in the exact
shape the file loaders read back, so `coxmoe presets --show NAME > my.yaml` is an editable starting point.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from sim.errors import SimInputError, brief
from sim.specs.hardware import (
    CPUSpec,
    DiskSpec,
    ExtraGPUSpec,
    GPUSpec,
    LinkSpec,
    NDPSpec,
    PeerLinkSpec,
    SystemSpec,
)
from sim.specs.model import ModelSpec
from sim.specs.schema import validate_spec

PRESET_DIR = Path(__file__).with_name("presets")
CATALOGS = {"models": ModelSpec, "gpus": GPUSpec, "cpus": CPUSpec, "links": LinkSpec, "ndps": NDPSpec,
            "disks": DiskSpec, "systems": SystemSpec}


# The shipped presets are parsed with libyaml where PyYAML has it (the same safe constructor, 5-10x faster: the
# pure-Python parser took 0.15 s of a 2 s simulation); user files go through SpecLoader below.
_PRESET_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def _raw_catalog(kind: str) -> dict[str, dict[str, Any]]:
    with open(PRESET_DIR / f"{kind}.yaml", encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=_PRESET_LOADER)  # noqa: S506 - a safe loader
    return {name: entry for name, entry in data.items() if not name.startswith("_")}


def preset_names(kind: str) -> list[str]:
    return sorted(_raw_catalog(kind))


def _build(cls: type, name: str, entry: dict[str, Any], where: str) -> Any:
    fields = {**entry, "name": entry.get("name", name)} if isinstance(entry, dict) else entry
    return validate_spec(cls, fields, where)


def _preset(kind: str, name: str) -> dict[str, Any]:
    catalog = _raw_catalog(kind)
    if name not in catalog:
        singular = kind.rstrip("s")
        raise SimInputError(f"unknown {singular} preset {brief(name)}; choose from {', '.join(sorted(catalog))}")
    return catalog[name]


def _component(kind: str, value: Any, where: str) -> Any:
    cls = CATALOGS[kind]
    if isinstance(value, str):
        return _build(cls, value, _preset(kind, value), f"{kind} preset {value}")
    if isinstance(value, dict):
        return _build(cls, value.get("name", "custom"), value, where)
    raise SimInputError(f"{where}: expected a preset name or a mapping")


def build_system(name: str, entry: dict[str, Any], where: str) -> SystemSpec:
    if not isinstance(entry, dict):
        raise SimInputError(f"{where}: expected a mapping of fields")
    fields = dict(entry)
    for key, kind in (("gpu", "gpus"), ("cpu", "cpus"), ("link", "links")):
        if key not in fields:
            raise SimInputError(f"{where}: missing field {key}")
        fields[key] = _component(kind, fields[key], f"{where}: {key}")
    if fields.get("ndp") is not None:
        fields["ndp"] = _component("ndps", fields["ndp"], f"{where}: ndp")
    if fields.get("disk") is not None:
        fields["disk"] = _component("disks", fields["disk"], f"{where}: disk")
    fields["extra_gpus"] = tuple(_extra_gpu(e, f"{where}: extra_gpus[{i}]")
                                 for i, e in enumerate(_entries(fields, "extra_gpus", where)))
    fields["peer_links"] = tuple(_peer_link(e, f"{where}: peer_links[{i}]")
                                 for i, e in enumerate(_entries(fields, "peer_links", where)))
    return _build(SystemSpec, name, fields, where)


def _entries(fields: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = fields.get(key)
    if value is None:  # absent or null: none (0, false or '' are not lists: refused below, not read as none)
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(e, dict) for e in value):
        raise SimInputError(f"{where}: {key} must be a list of mappings")
    return list(value)


def _extra_gpu(entry: dict[str, Any], where: str) -> ExtraGPUSpec:
    """{name: gpu1, gpu: PRESET-or-mapping, link: PRESET-or-mapping, reserved_bytes: N}."""
    fields = dict(entry)
    for key, kind in (("gpu", "gpus"), ("link", "links")):
        if key not in fields:
            raise SimInputError(f"{where}: missing field {key}")
        fields[key] = _component(kind, fields[key], f"{where}: {key}")
    return validate_spec(ExtraGPUSpec, fields, where)


def _peer_link(entry: dict[str, Any], where: str) -> PeerLinkSpec:
    """{src: gpu, dst: gpu1, link: PRESET-or-mapping}."""
    fields = dict(entry)
    if "link" not in fields:
        raise SimInputError(f"{where}: missing field link")
    fields["link"] = _component("links", fields["link"], f"{where}: link")
    return validate_spec(PeerLinkSpec, fields, where)


def model_preset(name: str) -> ModelSpec:
    return _build(ModelSpec, name, _preset("models", name), f"model preset {name}")


def system_preset(name: str) -> SystemSpec:
    return build_system(name, _preset("systems", name), f"system preset {name}")


def component_preset(kind: str, name: str) -> Any:
    return _component(kind, name, f"{kind} preset {name}")


_OCTAL = re.compile(r"^[-+]?0[0-9_]+$")  # YAML 1.1's `032` is 26 (0x and 0b prefixes say what they are)
MAX_SPEC_FILE_BYTES = 2**20  # spec and sweep files are kilobytes; PyYAML parses about 6 s a MB of mappings


def read_text_bounded(path: Path, what: str) -> str:
    """A user's YAML/JSON file as text, refused past MAX_SPEC_FILE_BYTES before it is read."""
    size = path.stat().st_size
    if size > MAX_SPEC_FILE_BYTES:
        raise SimInputError(f"{what} {path}: {size:,} bytes, over the {MAX_SPEC_FILE_BYTES:,} a spec may have")
    return path.read_text(encoding="utf-8")


def yaml_problem(exc: Exception) -> str:
    """A YAML or JSON parse error in a few words, with its line: PyYAML's first line only said what it was doing
    ('while parsing a flow sequence')."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem:
        return f"{problem} (line {mark.line + 1})" if mark is not None else str(problem)
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class SpecLoader(yaml.SafeLoader):
    """YAML for user files: safe_load's types without YAML 1.1's surprises, each refused rather than read as
    something else: sexagesimal numbers (`1:30` would be 90), binary blobs (`!!binary`) and a key given twice in
    one mapping (the last silently won: a second `extra_gpus:` block replaced the first machine)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            merged = False
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then an explicit key overrides it
                    if merged:  # a second `<<:` replaced the first's values silently
                        raise yaml.constructor.ConstructorError(
                            None, None, "the merge key '<<' is given twice (merge several with <<: [*a, *b])",
                            key_node.start_mark)
                    merged = True
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {brief(key)} is given twice",
                                                            key_node.start_mark)
        return super().construct_mapping(node, deep)

    @staticmethod
    def _not_base60(node: yaml.Node) -> None:
        if ":" in str(node.value):
            raise yaml.constructor.ConstructorError(None, None, f"{brief(node.value)} reads as a base-60 number in "
                                                    "YAML 1.1: quote it, or write the number", node.start_mark)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        self._not_base60(node)
        if _OCTAL.match(str(node.value)):
            raise yaml.constructor.ConstructorError(None, None, f"{brief(node.value)} reads as an octal number in YAML "
                                                    "1.1: write it without the leading zero", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.Node) -> float:
        self._not_base60(node)
        return super().construct_yaml_float(node)

    def construct_yaml_binary(self, node: yaml.Node) -> bytes:
        raise yaml.constructor.ConstructorError(None, None, "binary values (!!binary) are not spec data",
                                                node.start_mark)


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_yaml_int)
SpecLoader.add_constructor("tag:yaml.org,2002:float", SpecLoader.construct_yaml_float)
SpecLoader.add_constructor("tag:yaml.org,2002:binary", SpecLoader.construct_yaml_binary)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with SpecLoader: what every user-written YAML file (specs, sweeps, points) is read with."""
    return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - a SafeLoader subclass


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct (json.loads keeps the last of a repeated key silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(f"the key {brief(key)} is given twice")
        out[key] = value
    return out


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping; errors name the file and the problem in one line."""
    path = Path(path)
    if path.is_dir():
        raise SimInputError(f"spec file {path} is a directory")
    if not path.exists():
        raise SimInputError(f"spec file not found: {path}")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise SimInputError(f"spec file {path} is not a regular file")
    try:
        text = read_text_bounded(path, "spec file")
        data = json.loads(text, object_pairs_hook=_unique_keys) if path.suffix == ".json" else load_yaml(text)
    except _RepeatedKey as exc:
        raise SimInputError(f"cannot parse spec file {path}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimInputError(f"cannot parse spec file {path}: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise SimInputError(f"spec file {path}: top level must be a mapping")
    return data


def is_spec_path(name_or_path: str) -> bool:
    """A spec file rather than a preset name: a spec suffix or a path with a separator (preset names have
    neither). A bare name is always a preset, whatever files the working folder holds (a file named like a preset
    there replaced it silently); `as_spec_path` makes a `--X-file` value a path."""
    return Path(name_or_path).suffix in (".yaml", ".yml", ".json") or "/" in name_or_path


def as_spec_path(value: str) -> str:
    """A `--model-file` / `--system-file` value as a path, never a preset name (`mysys` is `./mysys`)."""
    return value if is_spec_path(value) else f"./{value}"


def load_model(name_or_path: str) -> ModelSpec:
    """A model preset by name, or a model spec / Hugging Face config.json file by path."""
    path = Path(name_or_path)
    if is_spec_path(name_or_path):
        data = read_spec_file(path)
        if "architectures" in data or "model_type" in data:
            from sim.specs.hf_config import model_from_hf_config

            # a checkpoint's config.json is named by its folder (the current folder for a bare `config.json`)
            # (not following links: a Hugging Face cache's snapshot folder links its files into blobs/)
            name = path.stem if path.stem != "config" else (path.absolute().parent.name or path.stem)
            return model_from_hf_config(data, name=name, source=str(path))
        return _build(ModelSpec, data.get("name", path.stem), data, f"model file {path}")
    return model_preset(name_or_path)


def load_system(name_or_path: str) -> SystemSpec:
    path = Path(name_or_path)
    if is_spec_path(name_or_path):
        data = read_spec_file(path)
        return build_system(data.get("name", path.stem), data, f"system file {path}")
    return system_preset(name_or_path)


def spec_to_yaml(spec: Any) -> str:
    """YAML that the file loaders accept back unchanged (nested specs written inline)."""
    return yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False, width=120)


def show_preset(name: str) -> str:
    """YAML for a preset of any catalog (looked up in models, systems, gpus, cpus, links, ndps, disks), or for a
    model or system spec file as the simulator reads it (a Hugging Face config.json too: its mapping, and the
    stored size its quantization_config gives, with their sources)."""
    if is_spec_path(name):
        data = read_spec_file(Path(name))
        keys = set(data) if isinstance(data, dict) else set()
        if keys & {"gpu", "cpu", "link"} and not keys & {"model_type", "architectures"}:
            return spec_to_yaml(load_system(name))  # a system missing a part is told so by the system loader
        component = next((kind for kind in ("gpus", "cpus", "links", "ndps", "disks")
                          if keys and keys <= {f.name for f in dataclasses.fields(CATALOGS[kind])}), None)
        if component and not keys & {"num_layers", "hidden_size"}:
            raise SimInputError(f"{brief(name)} looks like a {component[:-1]} spec: --show reads a file only as a "
                                f"model or a system (give it inside a system file, or name a {component[:-1]} preset)")
        return spec_to_yaml(load_model(name))
    for kind in ("models", "systems", "gpus", "cpus", "links", "ndps", "disks"):
        if name in _raw_catalog(kind):
            if kind == "models":
                return spec_to_yaml(model_preset(name))
            if kind == "systems":
                return spec_to_yaml(system_preset(name))
            return spec_to_yaml(component_preset(kind, name))
    every = sorted(n for kind in CATALOGS for n in _raw_catalog(kind))
    raise SimInputError(f"unknown preset {brief(name)}; choose from {', '.join(every)}")
