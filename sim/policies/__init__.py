"""Policies turn (model, system, workload, routing) into a plan. `POLICIES` maps CLI names to classes."""

from sim.errors import SimInputError
from sim.policies.base import PlanContext, Policy, parse_kv_pairs, parse_options
from sim.policies.coxmoe import CoxMoePolicy
from sim.policies.cpu_only import CpuOnlyPolicy
from sim.policies.expert_parallel import ExpertParallelPolicy
from sim.policies.fiddler import FiddlerPolicy
from sim.policies.flexgen import FlexGenPolicy
from sim.policies.gpu_only import GpuOnlyPolicy
from sim.policies.moe_gen import MoEGenPolicy
from sim.policies.moe_lightning import MoELightningPolicy
from sim.policies.ndp_experts import NdpExpertsPolicy
from sim.policies.stream_experts import StreamExpertsPolicy
from sim.policies.trimoe import TriMoePolicy
from sim.policies.zero_inference import ZeroInferencePolicy

# The one list of policies: the CLI, `compare` (those with `compared`), plot labels and colours read it. Its
# order is the order of `compare`'s table.
POLICIES: dict[str, type[Policy]] = {p.name: p for p in (CoxMoePolicy, MoELightningPolicy, FlexGenPolicy,
                                                              FiddlerPolicy, StreamExpertsPolicy, GpuOnlyPolicy,
                                                              CpuOnlyPolicy, ExpertParallelPolicy,
                                                              NdpExpertsPolicy, ZeroInferencePolicy, TriMoePolicy,
                                                              MoEGenPolicy)}


def make_policy(name: str, options: dict[str, str] | None = None) -> Policy:
    """A policy by name with options from KEY=VALUE strings; unknown names are one-line errors."""
    if name not in POLICIES:
        raise SimInputError(f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}")
    return POLICIES[name].from_strings(options or {})


__all__ = ["POLICIES", "PlanContext", "Policy", "make_policy", "parse_kv_pairs", "parse_options"]
