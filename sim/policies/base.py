"""What every policy shares: its inputs (`PlanContext`), typed options from `KEY=VALUE`, and the registry."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sim.cost import CostModel, OpWork
from sim.errors import CapacityError, SimInputError
from sim.plan import Plan, PlanBuilder
from sim.specs import ModelSpec, SystemSpec
from sim.workload import Workload
from traces import RoutingTrace

if TYPE_CHECKING:
    from sim.policies.analytic import SearchSpace


def memo_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """`functools.cache` for a method whose memo lives on the instance, so it is freed with it: `cache` on a method
    keys on `self` in one class-wide table and so keeps every instance, and what it refers to (a search's context and
    routing trace), alive for the rest of the process (ruff B019). Arguments are keys as `cache` takes them (a
    keyword argument is a key apart from the same value passed by position)."""
    attr = f"_memo_{method.__qualname__}"

    @functools.wraps(method)
    def cached(self: Any, *args: Any, **kwargs: Any) -> Any:
        memo = self.__dict__.get(attr)
        if memo is None:
            memo = self.__dict__[attr] = {}
        key = (args, tuple(kwargs.items())) if kwargs else args
        try:
            return memo[key]
        except KeyError:
            value = memo[key] = method(self, *args, **kwargs)
            return value

    return cached


@dataclass(frozen=True)
class PlanContext:
    """Inputs of a policy: what to run (model, workload, routing) and where (system)."""

    model: ModelSpec
    system: SystemSpec
    workload: Workload
    trace: RoutingTrace
    decode_sample: int = 0  # simulate this many evenly spaced decode steps and scale (0: every step)
    # The cost model the plan will be simulated with (a profile, learned factors); a search re-scores its
    # candidates with it, so it picks the best plan under the costs it reports. None: the roofline.
    cost: CostModel | None = None

    @cached_property
    def work(self) -> OpWork:
        """The model's op work, built once per context (its per-kind caches shared by every plan built here)."""
        return OpWork(self.model)

    @property
    def decode_steps_total(self) -> int:
        return max(self.workload.max_gen_len - 1, 0)

    def builder(self) -> PlanBuilder:
        """A plan builder that knows the decode steps to come (active requests of each), so a plan too big
        for the memory limit is refused after its first decode step."""
        gen = np.sort(self.workload.gen_lens)
        active = gen.size - np.searchsorted(gen, np.asarray(self.steps()), side="right")
        return PlanBuilder(active.tolist())

    def steps(self) -> list[int]:
        """Decode steps to emit: all of 1..max_gen-1, or `decode_sample` of them spread evenly (first and last
        included). The engine scales the simulated decode time by total / emitted."""
        total = self.decode_steps_total
        if self.decode_sample <= 0 or self.decode_sample >= total:
            return list(range(1, total + 1))
        picks = np.unique(np.round(np.linspace(1, total, self.decode_sample)).astype(int))
        return [int(t) for t in picks]

    @property
    def decode_scale(self) -> float:
        """Workload decode steps per planned decode step."""
        planned = len(self.steps())
        return self.decode_steps_total / planned if planned else 1.0

    def decode_counts(self, groups: list[np.ndarray]) -> np.ndarray | None:
        """Per (decode step, micro-batch) expert loads of `groups` in one pass over the trace
        (`RoutingTrace.decode_step_counts`), when the plan emits enough of the steps to pay for counting them
        all (a quarter or more); None: count step by step."""
        if 4 * len(self.steps()) < self.decode_steps_total:
            return None
        return self.trace.decode_step_counts(groups)

    def with_sample(self, decode_sample: int) -> PlanContext:
        return replace(self, decode_sample=decode_sample)


@dataclass(frozen=True)
class OptionsBase:
    """Validation helpers shared by every policy's options dataclass."""

    policy_name: ClassVar[str] = "policy"

    def choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise SimInputError(f"policy {self.policy_name}: {name} must be one of {', '.join(allowed)}, "
                                f"got {value!r}")

    def at_least(self, name: str, low: float) -> None:
        value = getattr(self, name)
        if value < low:
            raise SimInputError(f"policy {self.policy_name}: {name} must be >= {low}, got {value}")

    def fraction(self, name: str) -> None:
        value = getattr(self, name)
        if not 0.0 <= value <= 1.0:
            raise SimInputError(f"policy {self.policy_name}: {name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class MicroBatchOptions(OptionsBase):
    """Knobs every policy has. prefill_tokens: prompt tokens per prefill micro-batch (whole requests);
    decode_micro_batch: requests per decode micro-batch (0 = the whole batch)."""

    prefill_tokens: int = 8192
    decode_micro_batch: int = 0

    def __post_init__(self) -> None:
        self.at_least("prefill_tokens", 1)
        self.at_least("decode_micro_batch", 0)


def published_split(policy: str, size_name: str, count_name: str, size: int, count: int, batch: int) -> int:
    """The per-batch size of a split given as published, `count` batches (of `size` requests, or the even share
    when size <= 0); an error when that split does not cover `batch` in exactly `count` batches."""
    size = size if size > 0 else -(-batch // count)
    if -(-batch // size) != count:
        raise SimInputError(f"policy {policy}: {size_name} {size} x {count_name} {count} does not cover batch "
                            f"{batch} in exactly that many")
    return size


def require_fits(pool: str, device: str, policy: str, parts: dict[str, int], capacity: int) -> None:
    """Raise CapacityError naming every part when the static parts of a pool exceed its capacity."""
    need = sum(parts.values())
    if need > capacity:
        detail = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in parts.items())
        raise CapacityError(f"{pool} ({device}) for {policy}", need, capacity, detail)


class Policy:
    """A plan generator. Subclasses set `name`, `Options` (a dataclass of knobs), their display `label` and
    `color`, their `example_options` (and `example_system` when they need another machine shape), and implement
    `build` or `search_space`; adding the class to `POLICIES` registers it everywhere, tests included."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = object
    # How reports show it (figure legends, tables) and its colour in every plot; `compared`: whether
    # `coxmoe compare` runs it by default (a GPU-less `cpu-only` run would only add noise there).
    label: ClassVar[str] = ""
    color: ClassVar[str] = "#555555"
    compared: ClassVar[bool] = True
    # Option sets that exercise the policy's branches: the plan-invariant tests (tests/test_plan_engine.py) run
    # each on a tiny model; `example_system`: a preset of the machine shape it needs (None: any one-GPU system).
    example_options: ClassVar[tuple[dict[str, str], ...]] = ({},)
    example_system: ClassVar[str | None] = None
    # How its runtime launches the GPU's routed experts, recorded on every plan (`Plan.expert_kernels`): a
    # kernel call per expert (a Python loop over experts) or one fused MoE call per layer and micro-batch.
    expert_kernels: ClassVar[str] = "per_expert"

    def __init__(self, options: Any):
        self.options = options

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> Policy:
        return cls(parse_options(cls.Options, raw, cls.name))

    def search_space(self, ctx: PlanContext) -> SearchSpace | None:
        """A searching policy's candidates and how to build them (`sim/search.py` picks); None: `build` makes
        the one plan."""
        return None

    def build(self, ctx: PlanContext) -> Plan:
        """The plan for `ctx`. A searching policy's is the search's pick, scored with the context's cost model
        (`sim.search.plan_policy`, which also returns the search's report and record)."""
        if type(self).search_space is Policy.search_space:
            raise NotImplementedError(f"policy {self.name}: implement build() or search_space()")
        from sim.search import plan_policy  # the search sits above the policies

        return plan_policy(self, ctx).plan

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


def _convert(value: str, type_name: str, key: str, policy: str) -> Any:
    try:
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
    except ValueError:
        raise SimInputError(f"policy {policy}: option {key}={value!r} is not a valid {type_name}") from None
    return value


def parse_options(options_cls: type, raw: dict[str, str], policy: str) -> Any:
    """Build an options dataclass from strings; unknown keys and bad values are one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise SimInputError(f"policy {policy}: unknown option(s) {', '.join(unknown)}; options: {known}")
    values = {k: _convert(v, str(fields[k].type), k, policy) for k, v in raw.items()}
    return options_cls(**values)


def parse_kv_pairs(pairs: list[str] | None, what: str = "policy option") -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}; a pair without '=' is an error naming `what` it was."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SimInputError(f"{what} {pair!r} must look like KEY=VALUE")
        key = key.strip()
        if key in out:  # the later value won silently (a sweep spec refuses the same)
            raise SimInputError(f"{what} {key!r} is given twice ({out[key]!r} and {value.strip()!r})")
        out[key] = value.strip()
    return out
