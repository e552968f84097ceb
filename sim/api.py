"""The Python API under the CLI: resolve inputs, build a plan with a policy, simulate it, report metrics.

    from sim.api import simulate
    result = simulate("mixtral-8x7b", "a100-80g-8452y", "stream-experts", batch=64, prompt_len=128, gen_len=32)
    result.throughput_tok_s, result.to_dict()
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sim.config import SimConfig
from sim.cost import CostModel, RooflineCostModel
from sim.engine import EngineRecord, run_plan
from sim.errors import SimInputError
from sim.metrics import plan_metrics
from sim.plan import Plan
from sim.policies import PlanContext, make_policy
from sim.search import plan_policy, simulate_with
from sim.specs import ModelSpec, SystemSpec, load_model, load_system
from sim.workload import Workload
from traces import RoutingTrace, SynthConfig, TraceHeader, generate_trace, load_trace
from traces.disk_cache import cache_key, disk_cache_from_env, table_digest
from traces.format import trace_summary
from traces.limits import check_memory, env_size_bytes
from traces.synth import check_routing, workload_lengths
from traces.synth_presets import SynthPreset, synth_preset


@dataclass
class SimulationResult:
    """Metrics of one simulated run; `to_dict` is the `coxmoe simulate --json` object."""

    model: str
    system: str
    policy: str
    knobs: dict[str, Any]
    workload: dict[str, Any]
    routing: str
    seed: int
    prefill_s: float
    decode_s: float
    total_s: float
    generated_tokens: int
    peak_gpu_bytes: int
    peak_cpu_bytes: int
    busy_fraction: dict[str, float]
    busy_s: dict[str, float]
    static_memory: dict[str, dict[str, int]]
    num_ops: int
    events: int
    wall_s: float
    search: dict[str, Any] | None = None
    decode_steps_simulated: int = 0
    decode_steps_total: int = 0
    plan: Plan | None = field(default=None, repr=False)
    record: EngineRecord | None = field(default=None, repr=False)
    peak_bytes: dict[str, int] = field(default_factory=dict)  # every memory pool's peak (extra GPUs too)
    expert_precision: str = "native"
    engine: str = "simpy"  # how the plan ran: "simpy", or "list" (no op slowed another; see sim.uncontended)

    @property
    def throughput_tok_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "expert_precision": self.expert_precision, "system": self.system,
            "policy": self.policy, "knobs": self.knobs,
            "workload": self.workload, "routing": self.routing, "seed": self.seed,
            "throughput_tok_s": self.throughput_tok_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
            "total_s": self.total_s, "generated_tokens": self.generated_tokens,
            "peak_gpu_bytes": self.peak_gpu_bytes, "peak_cpu_bytes": self.peak_cpu_bytes,
            "peak_bytes": self.peak_bytes,
            "busy_fraction": self.busy_fraction, "busy_s": self.busy_s, "static_memory": self.static_memory,
            "num_ops": self.num_ops, "events": self.events, "engine": self.engine, "wall_s": self.wall_s,
            "analytic_total_s": (self.search or {}).get("analytic_total_s"), "search": self.search,
            "decode_steps_simulated": self.decode_steps_simulated, "decode_steps_total": self.decode_steps_total,
        }


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: plans allocate ~10^5 small objects and hold no cycles, so collection
    passes only cost time (and make timings jumpy)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _jsonable(value: Any) -> Any:
    """Plain Python numbers and containers (numpy scalars become floats/ints) for JSON output."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def resolve_model(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else load_model(model)


def config_model(config: SimConfig) -> ModelSpec:
    """The config's model with its `expert_precision` applied (the default, model, keeps a model file's own;
    native forces the model's dtype over a file that says int8)."""
    m = resolve_model(config.model)
    if config.expert_precision != "model":
        if m.expert_bits_per_param:  # the file's stored size would win over the precision's layout: say so
            raise SimInputError(f"model {m.name} sizes its experts with expert_bits_per_param "
                                f"{m.expert_bits_per_param:g}; --expert-precision {config.expert_precision} would not "
                                "change their bytes (leave it at model: the model file, or the checkpoint's "
                                "quantization_config, sets their stored size)")
        m = dataclasses.replace(m, expert_precision=config.expert_precision)
    return m


def resolve_system(system: str | SystemSpec) -> SystemSpec:
    return system if isinstance(system, SystemSpec) else load_system(system)


def config_system(config: SimConfig) -> SystemSpec:
    """The config's system with its `system_settings` applied (none: the preset or file as it is)."""
    from sim.specs.overrides import apply_system_settings

    return apply_system_settings(resolve_system(config.system), config.system_settings)


def check_trace_matches(trace: RoutingTrace | TraceHeader, model: ModelSpec) -> None:
    h = trace.header if isinstance(trace, RoutingTrace) else trace
    want = (model.num_moe_layers, model.num_experts, model.top_k)
    if (h.num_layers, h.num_experts, h.top_k) != want:
        raise SimInputError(
            f"trace is for {h.num_layers} MoE layers x {h.num_experts} experts, top-{h.top_k}; model {model.name} "
            f"has {want[0]} MoE layers x {want[1]} experts, top-{want[2]}")


def resolve_routing(model: ModelSpec, batch: int | None, prompt_len: int | str | None, gen_len: int | str | None,
                    trace: str | Path | RoutingTrace | None, routing: str, seed: int,
                    reuse_prob: float = 0.0, prompt_counts: bool = False,
                    system: SystemSpec | None = None) -> tuple[Workload, RoutingTrace, str]:
    """The workload and its routing: from a trace (lengths from the trace), or synthesised for the lengths. A
    length may be a distribution spec (`traces.synth.request_lengths`: uniform:LO:HI, lognormal:...), drawn per
    request from `seed`: prompts of different lengths, requests that finish at different steps. `prompt_counts`
    synthesises the simulator's form, prompts kept as per-request counts (`RoutingTrace.prompt_counts`: the same
    counts in a quarter of the memory at 800/256); the executor needs every row (the default). With `system`, a
    workload whose KV cache cannot fit the machine is refused before its trace is drawn (`check_kv_fits_machine`)."""
    if trace is not None:
        _refuse_reuse_with_trace(reuse_prob)  # before the file is read
        tr = trace if isinstance(trace, RoutingTrace) else load_trace(trace)
        wl = trace_workload(tr.header, tr.prompt_lens, tr.gen_lens, model, batch, prompt_len, gen_len, reuse_prob)
        return wl, tr, f"trace:{tr.header.source}"
    wl, cfg = synthetic_inputs(model, batch, prompt_len, gen_len, routing, seed, reuse_prob)
    if system is not None:
        check_kv_fits_machine(model, system, wl)
    table = table_digest(cfg.routing)
    if table is None:  # a count table that cannot be read: synthesis reports it (nothing cached under its name)
        return wl, synthesise(cfg, wl, prompt_counts), routing
    return wl, TRACE_CACHE.get((cfg, batch, prompt_len, gen_len, prompt_counts, table),
                               lambda: synthesise(cfg, wl, prompt_counts)), routing


def trace_workload(header: TraceHeader, prompt_lens: np.ndarray, gen_lens: np.ndarray, model: ModelSpec,
                   batch: int | None, prompt_len: int | str | None, gen_len: int | str | None,
                   reuse_prob: float = 0.0) -> Workload:
    """The workload of a trace's first `batch` requests (all without one), refused where the trace's shape does
    not match the model or the given lengths contradict the trace's."""
    _refuse_reuse_with_trace(reuse_prob)
    check_trace_matches(header, model)
    n = len(prompt_lens) if batch is None else batch
    if not 1 <= n <= len(prompt_lens):
        raise SimInputError(f"batch {n} needs that many requests; the trace has {len(prompt_lens)}")
    wl = Workload(prompt_lens[:n].astype(np.int64), gen_lens[:n].astype(np.int64))
    for flag, name, given, have in (("--prompt-len", "prompt length", prompt_len, wl.prompt_lens),
                                    ("--gen-len", "generation length", gen_len, wl.gen_lens)):
        if isinstance(given, str):
            raise SimInputError(f"{flag} {given}: a trace brings its own {name}s (omit {flag})")
        if given is not None and not (have == given).all():
            raise SimInputError(f"{flag} {given} conflicts with the trace's {name}s (omit it to use the trace's)")
    return wl


def _refuse_reuse_with_trace(reuse_prob: float) -> None:
    if reuse_prob:
        raise SimInputError("--reuse-prob shapes synthetic routing; a trace keeps its own (omit one of them)")


def check_point(config: SimConfig) -> None:
    """Refuse what `simulate_config` would refuse about a point's inputs before drawing a trace or building a
    plan: its model, system and policy options, a hot-expert map, the routing and lengths, or its trace's shape and
    lengths (the routing arrays are read only when the point runs). A sweep checks every point with it when it
    reads its spec, so bad input is one error, not a column of failed points."""
    c = config
    m, _ = config_model(c), config_system(c)
    policy = make_policy(c.policy, dict(c.policy_options))
    hot_map = getattr(policy.options, "hot_map", "")
    if hot_map:
        from sim.policies.coxmoe import checked_hot_map

        checked_hot_map(hot_map, m.num_moe_layers, m.num_experts)
    if c.trace is not None:
        trace_workload(*trace_summary(c.trace), m, c.batch, c.prompt_len, c.gen_len, c.reuse_prob)
        return
    synthetic_workload(c.batch, c.prompt_len, c.gen_len, c.seed)
    kind, _, name = c.routing.partition(":")
    if kind == "preset":  # its name, reuse and shape only: building its config solves its draw weights (seconds)
        preset_for_model(checked_preset(name, c.reuse_prob), m)
        return
    check_routing(known_routing(c.routing), m.num_moe_layers, m.num_experts)


def synthetic_inputs(model: ModelSpec, batch: int | None, prompt_len: int | str | None, gen_len: int | str | None,
                     routing: str, seed: int, reuse_prob: float = 0.0) -> tuple[Workload, SynthConfig]:
    """The workload (lengths drawn from `seed` when given as distributions) and the synthesis settings of a
    point without a trace: everything that determines its synthetic trace's bytes."""
    wl = synthetic_workload(batch, prompt_len, gen_len, seed)
    return wl, synth_config(model, routing, reuse_prob, seed)


def synthetic_workload(batch: int | None, prompt_len: int | str | None, gen_len: int | str | None,
                       seed: int) -> Workload:
    """The workload of a point without a trace: lengths as given, or drawn from `seed` for distributions."""
    if batch is None or prompt_len is None or gen_len is None:
        raise SimInputError("give batch, prompt length and generation length (or a trace)")
    # the lengths arrays alone cost 16 bytes a request: refuse a batch past the memory limit before allocating them
    check_memory(16.0 * batch, f"a workload of {batch:,} requests")
    if isinstance(prompt_len, str) or isinstance(gen_len, str):
        if batch < 1:
            raise SimInputError("workload: batch must be at least 1")
        prompt, gen = workload_lengths(prompt_len, gen_len, batch, seed)
        return Workload(prompt.astype(np.int64), gen.astype(np.int64))
    return Workload.uniform(batch, prompt_len, gen_len)


KV_BYTES_PER_VALUE_FLOOR = 0.5625  # a cache kept at 4 bits, with group scales (FlexGen's compression): the fewest


def check_kv_fits_machine(model: ModelSpec, system: SystemSpec, wl: Workload) -> None:
    """Refuse, before a trace is drawn, a workload whose KV cache alone, even at 4 bits a value, exceeds every
    memory of the machine together (GPUs, DRAM, disk): no policy can place it, and drawing its trace would take
    minutes. A CapacityError, as a plan that does not fit: sweeps of machines record it as their row."""
    from sim.errors import CapacityError
    from sim.topology import topology_of

    full = wl.kv_tokens_total * model.kv_bytes_per_token
    need = full * KV_BYTES_PER_VALUE_FLOOR / model.bytes_per_param
    pools = topology_of(system).pools
    have = sum(pools.values())
    if need > have:
        raise CapacityError(" + ".join(p.upper() for p in pools), need, have,
                            f"the KV cache of {wl.batch:,} requests, {wl.kv_tokens_total:,} tokens, even at 4 bits a "
                            f"value; {full / 2**30:,.1f} GiB at the model's precision")


@dataclass(frozen=True)
class TraceJob:
    """A synthetic trace a sweep point will read from the on-disk cache: its cache key and its size (routed
    tokens x layers x top-k, the work of drawing it), so a sweep can build each once, largest first."""

    key: str
    size: int


def trace_job(config: SimConfig) -> TraceJob | None:
    """The synthetic trace `config` would read through the on-disk cache, or None (a trace file, no cache, the
    trace already on disk, or a point its own run will reject)."""
    disk = disk_cache_from_env()
    if disk is None or config.trace is not None:
        return None
    try:
        model = config_model(config)
        wl, cfg = synthetic_inputs(model, config.batch, config.prompt_len, config.gen_len, config.routing,
                                   config.seed, config.reuse_prob)
        key = cache_key(cfg, wl.prompt_lens, wl.gen_lens, prompt_counts=True)  # as its run asks (`build_trace`)
    except Exception:  # noqa: BLE001 - the point's own run reports it
        return None
    if key is None or (disk.directory / f"{key}.npz").exists():
        return None
    routed = int((wl.prompt_lens + wl.gen_lens - 1).sum())  # the work of drawing it: every token's draws
    return TraceJob(key, routed * cfg.num_layers * cfg.top_k)


def build_trace(config: SimConfig) -> None:
    """Synthesise `config`'s trace into the on-disk cache when one is on (a sweep's first pass), as its run
    would."""
    resolve_routing(config_model(config), config.batch, config.prompt_len, config.gen_len, None, config.routing,
                    config.seed, config.reuse_prob, prompt_counts=True)


def synthesise(cfg: SynthConfig, wl: Workload, prompt_counts: bool = False) -> RoutingTrace:
    """A synthetic trace for the workload's lengths (prompts as counts when `prompt_counts`), through the on-disk
    cache when $COXMOE_TRACE_DIR names one (`traces/disk_cache.py`; sweeps set it to their directory's `traces/`)."""
    build = partial(generate_trace, cfg, wl.prompt_lens, wl.gen_lens, prompt_counts=prompt_counts)
    disk = disk_cache_from_env()
    return build() if disk is None else disk.get(cfg, wl.prompt_lens, wl.gen_lens, build, prompt_counts)


class TraceCache:
    """Synthetic traces built once per process for a (synthesis config, batch, lengths) and shared: every
    policy of a `compare`, every point of a sweep worker with the same model and workload (fig7: 12 traces for
    108 points). Synthesis is deterministic, so a hit is the trace a rebuild would give; cached traces are
    read-only. Holds at most `max_bytes` of routing arrays (default 512 MiB, or $COXMOE_TRACE_CACHE_MIB; 0 turns
    it off), least recently used out first."""

    def __init__(self, max_bytes: int | None = None):
        self._max_bytes = max_bytes
        self._items: OrderedDict[tuple, RoutingTrace] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def max_bytes(self) -> int:
        """The byte budget: as given, else $COXMOE_TRACE_CACHE_MIB (read at each use, checked), else 512 MiB."""
        if self._max_bytes is not None:
            return self._max_bytes
        return env_size_bytes("COXMOE_TRACE_CACHE_MIB", 512, 2**20, "MiB", SimInputError)

    @staticmethod
    def _nbytes(trace: RoutingTrace) -> int:
        """Its arrays and the count tables it has gathered since (prompt table, per-step decode tables)."""
        arrays = [trace.experts, trace.gate_weights, trace.request_features, trace.prompt_counts,
                  trace.__dict__.get("_prefill_counts_table"),
                  *trace.__dict__.get("_decode_step_tables", {}).values()]
        return sum(a.nbytes for a in arrays if a is not None)

    def get(self, key: tuple, build: Callable[[], RoutingTrace]) -> RoutingTrace:
        trace = self._items.get(key)
        if trace is not None:
            self.hits += 1
            self._items.move_to_end(key)
            self._evict(self.max_bytes, keep=key)  # its tables may have grown since it was cached
            return trace
        self.misses += 1
        budget = self.max_bytes
        trace = build()
        size = self._nbytes(trace)
        if size > budget:
            return trace  # too big to keep: built each time
        for array in (trace.prompt_lens, trace.gen_lens, trace.experts, trace.gate_weights, trace.request_features,
                      trace.prompt_counts):
            if array is not None:
                array.flags.writeable = False
        self._items[key] = trace
        self._evict(budget, keep=key)
        return trace

    def _evict(self, budget: int, keep: tuple) -> None:
        """Least recently used out until the held bytes fit (the trace in use stays, whatever its size)."""
        while len(self._items) > 1 and sum(self._nbytes(t) for t in self._items.values()) > budget:
            oldest = next(iter(self._items))
            if oldest == keep:
                break
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


TRACE_CACHE = TraceCache()


def checked_preset(name: str, reuse_prob: float) -> SynthPreset:
    """The synthesis preset `preset:NAME` names, refused beside a reuse probability (it sets its own)."""
    if reuse_prob:
        raise SimInputError(f"routing preset:{name}: the preset sets its own per-layer reuse; drop the reuse "
                            "probability")
    return synth_preset(name)


def known_routing(routing: str) -> str:
    """`routing` when it has one of a simulation's forms (the trace layer's message leaves presets out, which only
    a simulation takes)."""
    kind, sep, arg = routing.partition(":")  # `uniform:` too, as the trace layer reads it
    if not ((kind == "uniform" and not arg) or (kind in ("zipf", "table", "preset") and sep)):
        raise SimInputError(f"unknown routing {routing!r}; use uniform, zipf:ALPHA, table:NAME or preset:NAME")
    return routing


def synth_config(model: ModelSpec, routing: str, reuse_prob: float, seed: int) -> SynthConfig:
    """Synthesis settings for `routing`: uniform, zipf:ALPHA, table:NAME, or preset:NAME (a synthesis preset's
    popularity and per-layer reuse, tuned to published routing statistics; see traces/synth_presets.py)."""
    kind, _, name = known_routing(routing).partition(":")
    if kind != "preset":
        return SynthConfig(model.name, model.num_moe_layers, model.num_experts, model.top_k, routing, reuse_prob,
                           seed)
    preset = preset_for_model(checked_preset(name, reuse_prob), model)
    return preset.config(model.num_moe_layers, model.num_experts, model.top_k, seed=seed)


def preset_for_model(preset: SynthPreset, model: ModelSpec) -> SynthPreset:
    """A routing preset on `model`: its own model's experts and top-k, its layers or a model cut to its first
    layers (which keep their targets); another model's shape is refused (its targets would describe nothing)."""
    own = resolve_model(preset.model)
    if (model.num_experts, model.top_k) != (own.num_experts, own.top_k) or \
            model.num_moe_layers > len(preset.same_top1):
        raise SimInputError(f"routing preset:{preset.model} describes {own.name} ({len(preset.same_top1)} MoE layers, "
                            f"{own.num_experts} experts, top-{own.top_k}); {model.name} has {model.num_moe_layers} MoE "
                            f"layers, {model.num_experts} experts, top-{model.top_k}")
    if model.num_moe_layers < len(preset.same_top1):  # a model cut to its first layers keeps their targets
        preset = dataclasses.replace(preset, same_top1=preset.same_top1[:model.num_moe_layers])
    return preset


def simulate_plan(plan: Plan, cost: CostModel | None = None) -> tuple[EngineRecord, dict[str, Any]]:
    """Run a built plan; returns the engine record and the phase timing and busy metrics."""
    record = run_plan(plan, cost or RooflineCostModel(plan.system))
    return record, plan_metrics(plan, record)


def simulate(*args: Any, cost: CostModel | None = None, keep_plan: bool = False, **settings: Any) -> SimulationResult:
    """Simulate one point and return its metrics. The point is a `SimConfig`, or its fields as arguments
    (`simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", batch=64, ...)`); `cost` overrides the cost model
    (default: the config's profile, else the roofline) and `keep_plan` keeps the plan and engine record."""
    if args and isinstance(args[0], SimConfig):
        if len(args) > 1 or settings:
            raise TypeError("simulate() takes a SimConfig or its fields, not both (use config.replace(...))")
        config = args[0]
    else:
        config = SimConfig(*args, **settings)
    return simulate_config(config, cost=cost, keep_plan=keep_plan)


def simulate_config(config: SimConfig, cost: CostModel | None = None, keep_plan: bool = False) -> SimulationResult:
    """`simulate` for a `SimConfig`. The collector stays paused until the point's plans and engine records are
    gone (unless kept): collecting them when it resumes took 0.17 s of the 6.2 s standard point, for nothing."""
    with gc_paused():
        return _simulate_config(config, cost, keep_plan)


def _simulate_config(config: SimConfig, cost: CostModel | None, keep_plan: bool) -> SimulationResult:
    t0 = time.perf_counter()
    c = config
    m, s = config_model(c), config_system(c)
    pol = make_policy(c.policy, dict(c.policy_options))
    wl, tr, routing_name = resolve_routing(m, c.batch, c.prompt_len, c.gen_len, c.trace, c.routing, c.seed,
                                           c.reuse_prob, prompt_counts=True, system=s)
    if c.profile is not None and cost is None:
        from sim.cost.profile import ProfileCostModel

        cost = ProfileCostModel(s, c.profile, m, float(wl.prompt_lens.mean()))
    ctx = PlanContext(m, s, wl, tr, decode_sample=c.decode_sample, cost=cost)
    planned = plan_policy(pol, ctx, simulate_with(ctx))
    plan, record = planned.plan, planned.record  # a record: the search already simulated it, same costs
    if record is None:
        record, metrics = simulate_plan(plan, cost)
    else:
        metrics = planned.metrics if planned.metrics is not None else plan_metrics(plan, record)
    search = _jsonable(planned.search.to_dict()) if planned.search is not None else None
    return SimulationResult(
        model=m.name, expert_precision=m.expert_precision, system=s.name, policy=pol.name, knobs=plan.knobs,
        workload=wl.to_dict(),
        routing=routing_name, seed=c.seed, generated_tokens=wl.generated_tokens,
        peak_gpu_bytes=record.peak_bytes["gpu"], peak_cpu_bytes=record.peak_bytes["cpu"],
        peak_bytes=dict(record.peak_bytes),
        static_memory=plan.static_memory, num_ops=plan.num_ops, events=record.events, engine=record.engine,
        search=search,
        decode_steps_simulated=len(ctx.steps()), decode_steps_total=ctx.decode_steps_total,
        wall_s=time.perf_counter() - t0, plan=plan if keep_plan else None, record=record if keep_plan else None,
        **metrics,
    )
