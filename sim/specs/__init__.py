"""Model and hardware specifications, their presets, and loaders for custom YAML/JSON/HF-config files."""

from sim.specs.catalog import load_model, load_system, preset_names, show_preset, spec_to_yaml
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

__all__ = ["CPUSpec", "DiskSpec", "ExtraGPUSpec", "GPUSpec", "LinkSpec", "ModelSpec", "NDPSpec", "PeerLinkSpec",
           "SystemSpec", "load_model", "load_system", "preset_names", "show_preset", "spec_to_yaml"]
