"""`coxmoe`: CoX-MoE (Son, Chen, Yoo, Choi, Kim; DAC 2026): coalesced experts with CPU-GPU co-execution.

Per layer and phase (prefill and decode decide separately):
- OP0 (QKV), OP1 (attention over the KV cache), OP2 (O projection) each run wholly on the GPU or the CPU
  (placement x0 x1 x2, written as three letters of g/c, e.g. "gcg"), in micro-batches of mu requests. The KV
  cache lives where decode attention runs; QKV on the GPU with attention on the CPU ships the new K/V down.
- OP3 (the gated experts) runs coalesced on the whole batch. Experts split three ways: E_R resident in VRAM
  (the hottest per layer), E_M copied over PCIe into a double buffer and run on the GPU, E_C run on the CPU
  (AMX) while the GPU runs its share. Activations cross PCIe whenever consecutive work changes device.

Search (the paper's "coalescing-aware orchestration"): a roofline model of every op, summed over a layer as
T = T(OP0..OP2 over micro-batches) + max(T_GPU(E_R + E_M, with the E_M fetch), T_CPU(E_C)), evaluated
over every placement, micro-batch size and residency that fits the VRAM budget (weights of E_R and of the
non-expert ops placed on the GPU, the E_M buffers, the KV cache if on the GPU, hidden states, activation and
expert workspace). Per layer, E_M vs E_C comes from ordering the non-resident experts by how much more they
cost on the CPU than fetched to the GPU, and taking the prefix that minimises the layer's max(T_GPU, T_CPU).
T(OP0..OP2 over micro-batches) is the paper's sum over micro-batches with `estimate=serial`; by default it is
pipelined (the busiest stream's share of every micro-batch plus one pass through the other streams), as the
runtime overlaps one micro-batch's GPU work with another's CPU attention and copies. The best few by this model
are then simulated; the fastest simulated plan wins.

Ablation switches: coalesce=off (OP3 per micro-batch), attention=gpu|cpu (forces x1), stratify=off (resident
experts by index instead of by measured load), split=cpu|gpu (all non-resident experts on one side).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, NamedTuple

import numpy as np

from sim.errors import NoFeasibleConfig, SimInputError
from sim.plan import GPU_EXPERT_KERNELS, OpKind, Phase, Plan, Stream
from sim.policies import compose
from sim.policies.analytic import Analytic, Candidate, SearchSpace, expected_counts
from sim.policies.base import OptionsBase, PlanContext, Policy, memo_method
from sim.policies.compose import (
    CPU,
    CPU_EXPERTS,
    D2H,
    DEVICE_STREAM,
    GPU,
    H2D,
    H2D_ACT,
    Layout,
    LayoutEmitter,
    Schedule,
)
from sim.policies.layers import BatchSlice, decode_slices, prefill_slices, split_by_count, split_by_tokens
from traces.eas import HotExpertMap, load_map

PLACEMENTS = tuple("".join(p) for p in itertools.product("gc", repeat=3))
SPLIT_SHARDS = 8  # a split expert's tokens are shared between GPU and CPU in eighths
RESIDENT_GRID_STEPS = 16  # resident counts the search ranks per configuration: most, then about most/16 apart
# Re-scored configurations within this share of the fastest count as tied (below what the re-scoring's 4-step sample
# resolves) and the smallest plan wins: a finer decode micro-batching that simulated 0.2% faster doubled the
# standard scenario's plan (259k -> 490k ops) and its simulation time. Within a decode family the same share of the
# analytic estimate picks the re-scored candidate by plan size: the pipelined estimate put half as large prefill
# micro-batches 0.15% ahead on the standard scenario (+1.6% ops, +8% time, the same throughput within 0.03%).
RESCORE_TIE = 0.01


@dataclass(frozen=True)
class CoxMoeOptions(OptionsBase):
    """prefill_placement / decode_placement: auto, or x0x1x2 as three of g/c (e.g. gcg: QKV on the GPU, attention on the
    CPU, O-proj on the GPU); attention: auto | gpu | cpu forces x1 in both phases; prefill_micro_batch /
    decode_micro_batch: requests per micro-batch of OP0-OP2 (-1 = search, 0 = whole batch); resident_experts: E_R
    per layer (-1 = as many as fit); split: auto | cpu | gpu (where non-resident experts run); coalesce: on | off |
    decode (off: OP3 per micro-batch; decode: coalesced in decode, per micro-batch in prefill, as MoE-Gen's release
    runs its prefill over MoE micro-batches); stratify: on | off (off: resident experts by index, not by measured
    load); hot_map: a hot-expert map file (`coxmoe eas`) whose ranking picks E_R instead of the trace's own load;
    restratify: off, or ema:ALPHA:EVERY (beyond the paper: every EVERY decode steps, make the E_R set the top
    experts of an exponential moving average, weight ALPHA, of the routing seen so far, and pay the PCIe copy of
    each expert that enters); split_tokens: on | off (beyond the paper: per layer, one expert's tokens shared
    between GPU and CPU in eighths, the share the search's model balances best); attention_split: beyond the paper,
    the share of decode micro-batches whose attention runs on the CPU over a host-memory KV cache while the rest
    attend on the GPU (0: off; decode placements with attention on the GPU only); attention_split_unit: micro_batch
    (the first floor(S n + 1/2) of n micro-batches) | requests (the first ceil(S B) requests as one CPU batch, the
    rest in micro-batches: MoE-Gen's hybrid split); kv_cache: gpu | cpu, where decode attention on the GPU finds the
    KV cache (cpu: in host memory, each micro-batch's entries copied into one of `compose.KV_STREAM_BUFFERS` GPU
    buffers before its attention and the new entries written back, as MoE-Gen's GPU attention mode runs; CPU
    attention always reads host memory; with attention_split, every request's cache in host memory, read there or
    streamed: MoE-Gen's hybrid mode); expert_kernels: fused | per_expert, how the runtime launches the GPU's routed
    experts (`Plan.expert_kernels`: one fused MoE call per layer and micro-batch, or a kernel call per expert; the
    paper does not say: fused, as its baselines MoE-Lightning and the FlexGen port run them); rescore: candidates
    the simulation re-scores (5: with 3 the search missed 4-12% at two batch-1024 points under the serial
    estimate, and 3% at one batch-256 point under the pipelined one); estimate: pipelined | serial, how the
    search's analytic model adds up micro-batched OP0-OP2 (serial: the paper's sum over micro-batches;
    pipelined: overlapped across streams as the runtime runs them, see `pipelined_s`)."""

    policy_name = "coxmoe"
    prefill_placement: str = "auto"
    decode_placement: str = "auto"
    attention: str = "auto"
    prefill_micro_batch: int = -1
    decode_micro_batch: int = -1
    resident_experts: int = -1
    split: str = "auto"
    coalesce: str = "on"
    stratify: str = "on"
    hot_map: str = ""
    restratify: str = "off"
    split_tokens: str = "off"
    attention_split: float = 0.0
    attention_split_unit: str = "micro_batch"
    kv_cache: str = "gpu"
    expert_kernels: str = "fused"
    rescore: int = 5
    estimate: str = "pipelined"

    def __post_init__(self) -> None:
        for name in ("prefill_placement", "decode_placement"):
            self.choice(name, ("auto", *PLACEMENTS))
        self.choice("attention", ("auto", "gpu", "cpu"))
        self.choice("split", ("auto", "cpu", "gpu"))
        self.choice("coalesce", ("on", "off", "decode"))
        self.choice("stratify", ("on", "off"))
        self.choice("split_tokens", ("on", "off"))
        self.choice("kv_cache", ("gpu", "cpu"))
        self.choice("attention_split_unit", ("micro_batch", "requests"))
        self.choice("expert_kernels", GPU_EXPERT_KERNELS)
        self.choice("estimate", ("pipelined", "serial"))
        if self.kv_cache == "cpu" and (self.attention == "cpu" or self.decode_placement not in ("auto",)
                                       and self.decode_placement[1] == "c"):
            raise SimInputError(f"policy {self.policy_name}: kv_cache=cpu streams the cache to decode attention on "
                                "the GPU; with decode attention on the CPU it reads host memory anyway")
        if self.hot_map and self.stratify == "off":
            raise SimInputError(f"policy {self.policy_name}: hot_map chooses the resident experts, stratify=off keeps "
                                "them by index; give one")
        if self.split_tokens == "on" and self.restratify != "off":
            raise SimInputError(f"policy {self.policy_name}: split_tokens=on does not combine with restratify (a split "
                                "names one layer's expert for the whole run)")
        if not 0.0 <= float(self.attention_split) < 1.0:
            raise SimInputError(f"policy {self.policy_name}: attention_split must be in [0, 1), got "
                                f"{self.attention_split}")
        if self.attention_split and (self.attention == "cpu" or self.decode_placement not in ("auto",)
                                     and self.decode_placement[1] != "g"):
            raise SimInputError(f"policy {self.policy_name}: attention_split shares decode attention of a GPU "
                                "placement with the CPU; it needs decode attention on the GPU")
        if not self.attention_split and self.attention_split_unit != "micro_batch":
            raise SimInputError(f"policy {self.policy_name}: attention_split_unit={self.attention_split_unit} says how "
                                "attention_split shares decode attention; give attention_split too (it is 0)")
        for name in ("prefill_micro_batch", "decode_micro_batch", "resident_experts"):
            self.at_least(name, -1)
        self.at_least("rescore", 1)
        _ = self.ema  # validates restratify
        if self.attention != "auto":
            x1 = self.attention[0]
            for name in ("prefill_placement", "decode_placement"):
                value = getattr(self, name)
                if value != "auto" and value[1] != x1:
                    raise SimInputError(f"policy {self.policy_name}: attention={self.attention} contradicts "
                                        f"{name}={value}")

    @property
    def ema(self) -> tuple[float, int] | None:
        """(alpha, every) of online re-stratification, or None when it is off."""
        if self.restratify == "off":
            return None
        parts = self.restratify.split(":")
        try:
            if parts[0] != "ema" or len(parts) != 3:
                raise ValueError
            alpha, every = float(parts[1]), int(parts[2])
        except ValueError:
            raise SimInputError(
                f"policy {self.policy_name}: restratify must be off or ema:ALPHA:EVERY, got {self.restratify!r}"
            ) from None
        if not 0 < alpha <= 1 or every < 1:
            raise SimInputError(f"policy {self.policy_name}: restratify needs 0 < ALPHA <= 1 and EVERY >= 1, got "
                                f"{self.restratify}")
        return alpha, every

    @property
    def searched(self) -> bool:
        return "auto" in (self.prefill_placement, self.decode_placement) or -1 in (
            self.prefill_micro_batch, self.decode_micro_batch, self.resident_experts)


def checked_hot_map(path: str, layers: int, experts: int) -> HotExpertMap:
    """A hot-expert map file, checked against the model's shape."""
    hot = load_map(path)
    if (hot.num_layers, hot.num_experts) != (layers, experts):
        raise SimInputError(f"hot-expert map {path} is for {hot.num_layers} layers x {hot.num_experts} experts, "
                            f"the model has {layers} x {experts}")
    return hot


def _spread(load: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Each layer's routed tokens (`totals`) shared among its experts in proportion to `load` (evenly where a
    layer's load is all zero): expected counts from a map's estimate instead of the run's own routing."""
    load = np.asarray(load, dtype=np.float64)
    sums = load.sum(axis=1, keepdims=True)
    share = np.where(sums > 0, load / np.where(sums > 0, sums, 1.0), 1.0 / load.shape[1])
    return share * np.asarray(totals, dtype=np.float64)[:, None]


def _split_sorted(rest: np.ndarray, ks: np.ndarray, experts: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per layer (row of `rest`, experts in rank order), the first k[layer] experts and the others, each as a sorted
    tuple of ids: one mask and two `nonzero` passes for every layer (sorting each layer's lists took 0.2 s of a
    Qwen3 search)."""
    layers, width = rest.shape
    side = np.full((layers, experts), -1, dtype=np.int8)  # -1: not in `rest` (resident), 1: first k, 0: the rest
    np.put_along_axis(side, rest, (np.arange(width)[None, :] < ks[:, None]).astype(np.int8), axis=1)
    out = []
    for flag, sizes in ((1, ks), (0, width - ks)):
        ids = np.nonzero(side == flag)[1].tolist()  # row by row, ascending within a row
        ends = np.cumsum(sizes).tolist()
        out.append(tuple(tuple(ids[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)))
    return out[0], out[1]


class Op3:
    """OP3 of one phase under a residency: summed layer time, the widest fetch, and per MoE layer E_M, E_C, token
    splits and (three tiers) the experts on a near-memory tier. The split=auto rule gives E_M and E_C as experts in
    rank order with each layer's count of fetched ones (`ranked`), made into sorted tuples on first use: the ranking
    prices about a thousand residencies of a 128-expert model and builds a plan from one."""

    __slots__ = ("_fetched", "_on_cpu", "_ranked", "on_ndp", "splits", "total_s", "widest")

    def __init__(self, total_s: float, widest: int, fetched: tuple | None = None, on_cpu: tuple | None = None,
                 splits: tuple = (), on_ndp: tuple = (), *, ranked: tuple[np.ndarray, np.ndarray, int] | None = None):
        if (fetched is None or on_cpu is None) and ranked is None:
            raise ValueError("Op3 needs E_M and E_C, or the ranked experts they come from")
        self.total_s, self.widest, self.splits, self.on_ndp = total_s, widest, splits, on_ndp
        self._fetched, self._on_cpu, self._ranked = fetched, on_cpu, ranked

    def _split(self) -> None:
        self._fetched, self._on_cpu = _split_sorted(*self._ranked)
        self._ranked = None

    @property
    def fetched(self) -> tuple[tuple[int, ...], ...]:
        """E_M per MoE layer: sorted expert ids."""
        if self._fetched is None:
            self._split()
        return self._fetched

    @property
    def on_cpu(self) -> tuple[tuple[int, ...], ...]:
        """E_C per MoE layer: sorted expert ids."""
        if self._on_cpu is None:
            self._split()
        return self._on_cpu

    def _key(self) -> tuple:
        return self.total_s, self.widest, self.fetched, self.on_cpu, self.splits, self.on_ndp

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op3) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Op3(total_s={self.total_s!r}, widest={self.widest!r}, fetched={self.fetched!r}, ...)"


class Op3Terms(NamedTuple):
    """The per-phase inputs of an OP3 rule (`_Model.op3_terms`)."""

    counts: np.ndarray
    n_mb: int
    fetch_s: float
    shared_s: float
    hidden_copy_s: float
    gpu_s: np.ndarray
    cpu_s: np.ndarray
    dense_s: float


class _Model:
    """The analytic model of one context: per-phase costs of OP0-OP2 and of OP3, and the VRAM budget."""

    def __init__(self, ctx: PlanContext, opts: CoxMoeOptions):
        self.ctx, self.opts = ctx, opts
        m, wl = ctx.model, ctx.workload
        self.m, self.wl, self.w, self.a = m, wl, ctx.work, Analytic(ctx, opts.expert_kernels)
        self.prefill_counts, self.decode_counts = expected_counts(ctx)
        load = self.prefill_counts + self.decode_counts * max(wl.max_gen_len - 1, 1)
        if opts.hot_map:
            hot = checked_hot_map(opts.hot_map, m.num_moe_layers, m.num_experts)
            self.order = hot.ranking.astype(np.int64)
            # The search knows the map, not the run's routing: E_M and E_C are priced from the map's probe load
            # (a random map's, none, as uniform), spread over the tokens each layer routes.
            self.prefill_counts = _spread(hot.load, self.prefill_counts.sum(axis=1))
            self.decode_counts = _spread(hot.load, self.decode_counts.sum(axis=1))
        elif opts.stratify == "on":
            self.order = np.argsort(-load, axis=1, kind="stable")  # hottest first, per layer
        else:
            self.order = np.tile(np.arange(m.num_experts), (m.num_moe_layers, 1))
        self.decode_steps = max(wl.max_gen_len - 1, 0)
        self.prefills: dict = {}  # the prefills this search's plans emitted (`LayoutEmitter.prefill`)
        self.streamed = opts.kv_cache == "cpu"  # GPU decode attention over a KV cache in host memory
        self.kv_bytes = wl.kv_tokens_total * m.kv_bytes_per_token
        self.kv_mean = float(wl.prompt_lens.mean() + wl.gen_lens.mean() / 2)
        lens = wl.prompt_lens.astype(np.float64)
        self.prompt_pairs_mean = float((lens * (lens + 1) / 2).mean())  # causal scores of a prompt, on average

    # ---- a split decode attention ---------------------------------------------------------------------
    @memo_method
    def prefill_tokens(self, mu: int) -> int:
        """The prefill micro-batches' token budget for `mu` requests each (<= 0: the whole batch): the mean prompt
        times `mu`, so a micro-batch holds whole requests of about `mu` prompts' tokens (as the plan builds them)."""
        wl = self.wl
        if mu <= 0 or mu >= wl.batch:  # the whole batch: its exact sum (mean x batch may round one token short)
            return int(wl.prompt_lens.sum())
        return int(max(float(wl.prompt_lens.mean()), 1.0) * mu)

    @memo_method
    def prefill_groups(self, mu: int) -> list[np.ndarray]:
        """The prefill micro-batches of `prefill_tokens(mu)` tokens each (whole requests)."""
        wl = self.wl
        return split_by_tokens(np.arange(wl.batch), wl.prompt_lens, self.prefill_tokens(mu))

    @memo_method
    def prefill_tokens_max(self, mu: int) -> int:
        """The most prompt tokens any prefill micro-batch of `prefill_tokens(mu)` holds (one request longer than
        the budget forms its own micro-batch): what the GPU's activation workspace is sized for."""
        return max(int(self.wl.prompt_lens[g].sum()) for g in self.prefill_groups(mu))

    def plan_size(self, o: CoxMoeOptions) -> int:
        """Micro-batches a configuration's plan runs (prefill, then each decode step): what its ops and its
        simulation time grow with."""
        return len(self.prefill_groups(o.prefill_micro_batch)) + self.decode_steps * len(
            self.decode_groups(o.decode_micro_batch))

    @memo_method
    def decode_groups(self, mu: int) -> list[np.ndarray]:
        """The decode micro-batches: `mu` requests each (<= 0: one); with attention_split_unit=requests, the first
        ceil(S B) requests (at least one left for the GPU) attend on the CPU as one batch and the rest form the
        micro-batches, as MoE-Gen's hybrid mode splits its batch."""
        requests = np.arange(self.wl.batch)
        share = float(self.opts.attention_split)
        if share and self.opts.attention_split_unit == "requests":
            n_cpu = min(math.ceil(share * requests.size), requests.size - 1)
            if n_cpu > 0:
                return [requests[:n_cpu], *split_by_count(requests[n_cpu:], mu)]
        return split_by_count(requests, mu)

    @memo_method
    def _split_requests(self, mu: int) -> tuple[int, int, np.ndarray]:
        """(decode micro-batches, how many attend on the CPU, per request whether it is one of theirs): the first
        floor(S n + 1/2) of the n micro-batches for `attention_split` S, at least one left on the GPU; or, by
        requests, the first of `decode_groups`."""
        groups = self.decode_groups(mu)
        if self.opts.attention_split_unit == "requests":
            n_cpu = 1 if self.opts.attention_split and len(groups) > 1 else 0
        else:
            n_cpu = _cpu_micro_batches(float(self.opts.attention_split), len(groups))
        mask = np.zeros(self.wl.batch, dtype=bool)
        for g in groups[:n_cpu]:
            mask[g] = True
        return len(groups), n_cpu, mask

    def attention_split(self, mu: int) -> tuple[int, int, int]:
        """(decode micro-batches, how many of them attend on the CPU, KV entries their requests hold)."""
        n, n_cpu, mask = self._split_requests(mu)
        wl = self.wl
        return n, n_cpu, int((wl.prompt_lens[mask] + wl.gen_lens[mask] - 1).sum())

    def cpu_requests(self, mu: int) -> np.ndarray:
        """Per request, whether its decode attention (and KV cache) is on the CPU under `attention_split`."""
        return self._split_requests(mu)[2]

    def ops012_split_s(self, phase: Phase, placement: str, mu_d: int, mu: int) -> float:
        """`ops012_s` with `attention_split`: decode mixes the two fronts by the CPU requests' share, prefill its
        K/V stores by the CPU requests' share of prompt tokens (each request's K/V goes where its decode attention
        reads it)."""
        cpu = self.cpu_requests(mu_d)
        gpu_kv = not self.streamed  # the GPU requests' cache in VRAM, or streamed from host memory like the rest
        if not cpu.any():
            return self.ops012_s(phase, placement, mu, gpu_kv)
        if phase is Phase.DECODE:
            share = float(cpu.mean())
            cpu_placement = placement[0] + "c" + placement[2]
            gpu_front = (1 - share) * self.ops012_s(phase, placement, mu, gpu_kv)
            if self.opts.attention_split_unit == "requests":  # the CPU's requests attend as one batch
                return self.ops012_s(phase, cpu_placement, int(cpu.sum()), False, batches=1) + gpu_front
            return share * self.ops012_s(phase, cpu_placement, mu, False) + gpu_front
        if self.streamed:  # every request's K/V goes to host memory
            return self.ops012_s(phase, placement, mu, False)
        lens = self.wl.prompt_lens
        share = float(lens[cpu].sum() / max(lens.sum(), 1))
        return share * self.ops012_s(phase, placement, mu, False) + (1 - share) * self.ops012_s(phase, placement, mu,
                                                                                               True)

    # ---- OP0..OP2 --------------------------------------------------------------------------------------
    @memo_method
    def ops012_s(self, phase: Phase, placement: str, mu: int, kv_on_gpu: bool, batches: int = 0) -> float:
        """Per-layer time of OP0-OP2, the router and the activation copies over all micro-batches of `mu` requests
        (or over `batches` of them): summed (the paper's model, `estimate=serial`) or pipelined (`pipelined_s`)."""
        w, a, wl = self.w, self.a, self.wl
        batch = wl.batch
        mu = batch if mu <= 0 else min(mu, batch)
        n_mb = batches or -(-batch // mu)
        if phase is Phase.PREFILL:  # mu average prompts: their tokens, and their causal scores (not the mean's)
            tokens = int(round(mu * float(wl.prompt_lens.mean())))
            kv_att, kv_read = int(mu * self.prompt_pairs_mean), tokens
        else:
            tokens = mu
            kv_att = kv_read = int(mu * self.kv_mean)
        x0, x1, x2 = (DEVICE_STREAM[c] for c in placement)
        busy: dict[Stream, float] = {}  # one micro-batch's seconds per stream

        def add(stream: Stream, seconds: float) -> None:
            busy[stream] = busy.get(stream, 0.0) + seconds

        def copy(stream: Stream, nbytes: int) -> None:
            add(stream, a.copy(stream, nbytes))

        add(x0, a.t(OpKind.QKV, x0, w.qkv(tokens)))
        add(x1, a.t(OpKind.ATTENTION, x1, w.attention(tokens, kv_att, kv_read, phase is Phase.PREFILL)))
        add(x2, a.t(OpKind.O_PROJ, x2, w.o_proj(tokens)) + a.t(OpKind.ROUTER, x2, w.router(tokens)))
        if x0 is CPU:
            copy(D2H, w.hidden_bytes(tokens))
        if x0 != x1:
            copy(D2H if x1 is CPU else H2D_ACT, w.qkv_out_bytes(tokens))
        if x1 != x2:
            copy(D2H if x2 is CPU else H2D_ACT, w.attn_out_bytes(tokens))
        if phase is Phase.PREFILL and (x0 is GPU) == (x1 is GPU) != kv_on_gpu:  # KV store to where decode reads it
            copy(D2H if x1 is GPU else H2D_ACT, w.kv_bytes(tokens))  # (on both devices already when x0 != x1)
        if phase is Phase.DECODE and x1 is GPU and not kv_on_gpu:  # a streamed cache: load, then write back
            copy(H2D_ACT, w.kv_bytes(kv_read - tokens))
            copy(D2H, w.kv_bytes(tokens))
        if x2 is CPU:
            copy(H2D_ACT, w.hidden_bytes(tokens))  # the GPU experts need the hidden states too
        if self.opts.estimate == "serial":
            return n_mb * sum(busy.values())
        return pipelined_s(busy.values(), n_mb)

    # ---- OP3 -------------------------------------------------------------------------------------------
    @memo_method  # its arrays are read, never written
    def op3_terms(self, phase: Phase, mu: int) -> Op3Terms:
        """What every OP3 rule prices a layer with: expected tokens per expert, micro-batches per OP3, one
        expert's PCIe copy, the shared expert, the hidden states' copy down and back, and every expert's time on
        the GPU and on the CPU (summed over the OP3 runs of a step)."""
        m, w, a = self.m, self.w, self.a
        counts = self.prefill_counts if phase is Phase.PREFILL else self.decode_counts
        batch = self.wl.batch
        coalesced = self.opts.coalesce == "on" or self.opts.coalesce == "decode" and phase is Phase.DECODE
        n_mb = 1 if coalesced or mu <= 0 else -(-batch // min(mu, batch))
        tokens_total = float(counts.sum(axis=1).max()) / m.top_k if counts.size else 0.0
        shared = a.t(OpKind.SHARED_EXPERT, GPU, w.shared_expert(int(tokens_total))) if (
            m.shared_expert_intermediate_size) else 0.0
        hidden = w.hidden_bytes(int(tokens_total))
        dense = (m.num_layers - m.num_moe_layers) * a.t(OpKind.DENSE_FFN, GPU, w.dense_ffn(int(tokens_total)))
        return Op3Terms(counts, n_mb, a.copy(H2D, m.expert_bytes), shared,
                        a.copy(D2H, hidden) + a.copy(H2D_ACT, hidden),
                        a.expert_times(GPU, m, counts / n_mb) * n_mb,
                        a.expert_times(CPU_EXPERTS, m, counts / n_mb) * n_mb, dense)

    @memo_method
    def op3(self, phase: Phase, resident: int, mu: int, max_fetch: int = -1) -> Op3:
        """Sum over MoE layers of max(T_GPU, T_CPU); the largest E_M; E_M, E_C and the token splits per layer.
        `max_fetch` >= 0 caps E_M per layer (split=auto; the rest run on the CPU): the fetch buffers VRAM holds."""
        m = self.m
        counts, n_mb, fetch, shared, hidden_copy, gpu_all, cpu_all, dense = self.op3_terms(phase, mu)
        if self.opts.split == "auto" and self.opts.split_tokens != "on" and m.num_moe_layers:
            return self._op3_auto(phase, resident, mu, max_fetch, hidden_copy, fetch, dense)
        total, widest, fetched, on_cpu, splits = 0.0, 0, [], [], []
        for layer in range(m.num_moe_layers):
            gpu, cpu = gpu_all[layer], cpu_all[layer]
            order = self.order[layer]
            res, rest = order[:resident], order[resident:]
            base_g = shared + gpu[res].sum()
            g_cost = gpu[rest] + fetch
            c_cost = cpu[rest]
            if self.opts.split == "gpu":
                k = rest.size
            elif self.opts.split == "cpu":
                k = 0
            else:
                rank = np.argsort(-(c_cost - g_cost), kind="stable")
                rest, g_cost, c_cost = rest[rank], g_cost[rank], c_cost[rank]
                fetched_k = np.arange(rest.size + 1)
                gpu_side = np.maximum(base_g + np.concatenate([[0.0], np.cumsum(gpu[rest])]), fetch * fetched_k)
                cpu_side = np.concatenate([np.cumsum(c_cost[::-1])[::-1], [0.0]])
                cpu_side = np.where(cpu_side > 0, cpu_side + hidden_copy, 0.0)
                makespan = np.maximum(gpu_side, cpu_side)
                k = int(np.argmin(makespan if max_fetch < 0 else makespan[:max_fetch + 1]))
            em, ec = rest[:k], rest[k:]
            # E_M's weights cross PCIe while the GPU computes: the layer's fetch is issued once the layer two visits
            # back is done with its buffer (double buffering), so it overlaps the previous layer and this one's
            # resident experts; the GPU side is the longer of its compute and its copy (the paper's T_GPU
            # "including the PCIe fetch of E_M", with transfers overlapped). A sum had overrated the CPU: a faster
            # AMX moved experts to it past the point where the CPU became the bottleneck.
            t_gpu = max(base_g + gpu[em].sum(), fetch * em.size)
            t_cpu = cpu[ec].sum() + (hidden_copy if cpu[ec].sum() > 0 else 0.0)
            split: tuple[tuple[int, int, int], ...] = ()
            layer_t = max(t_gpu, t_cpu)
            if self.opts.split_tokens == "on":
                layer_t, split = self._split(counts[layer] / n_mb, n_mb, np.concatenate([res, em]), ec, t_gpu,
                                             t_cpu, fetch, hidden_copy, gpu, cpu)
            total += layer_t
            widest = max(widest, int(em.size) + sum(1 for e, _, _ in split if int(e) in set(ec.tolist())))
            fetched.append(tuple(sorted(em.tolist())))
            on_cpu.append(tuple(sorted(ec.tolist())))
            splits.append(split)
        return Op3(total + dense, widest, tuple(fetched), tuple(on_cpu), tuple(splits))

    @memo_method  # its arrays are read, never written
    def _by_rank(self, phase: Phase, mu: int) -> tuple[np.ndarray, np.ndarray]:
        """Every expert's GPU and CPU time (`op3_terms`) with each layer's experts in `order` (hottest first)."""
        _, _, _, _, _, gpu_all, cpu_all, _ = self.op3_terms(phase, mu)
        return np.take_along_axis(gpu_all, self.order, axis=1), np.take_along_axis(cpu_all, self.order, axis=1)

    def _auto_ranking(self, phase: Phase, resident: int, mu: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """split=auto's experts per layer outside E_R in the order E_M takes them (the CPU's gain over the GPU's
        cost, fetch included, highest first), with E_R's GPU time, their GPU and CPU times in that order, and the
        layer's makespan for each count of them fetched (`_op3_auto`)."""
        layers = self.m.num_moe_layers
        _, _, fetch, shared, hidden_copy, _, _, _ = self.op3_terms(phase, mu)
        gpu_ranked, cpu_ranked = self._by_rank(phase, mu)
        rest = self.order[:, resident:]
        base_g = shared + gpu_ranked[:, :resident].sum(axis=1)  # each row summed as `row.sum()` sums it (pairwise)
        gpu_rest, c_cost = gpu_ranked[:, resident:], cpu_ranked[:, resident:]
        rank = np.argsort(-(c_cost - (gpu_rest + fetch)), axis=1, kind="stable")
        rows = np.arange(layers)[:, None]
        rest, gpu_sorted, c_cost = rest[rows, rank], gpu_rest[rows, rank], c_cost[rows, rank]
        zeros = np.zeros((layers, 1))
        fetched_k = np.arange(rest.shape[1] + 1)
        gpu_side = np.maximum(base_g[:, None] + np.concatenate([zeros, np.cumsum(gpu_sorted, axis=1)], axis=1),
                              fetch * fetched_k)
        cpu_side = np.concatenate([np.cumsum(c_cost[:, ::-1], axis=1)[:, ::-1], zeros], axis=1)
        cpu_side = np.where(cpu_side > 0, cpu_side + hidden_copy, 0.0)
        return rest, base_g, gpu_sorted, c_cost, np.maximum(gpu_side, cpu_side)

    def _op3_auto(self, phase: Phase, resident: int, mu: int, max_fetch: int, hidden_copy: float, fetch: float,
                  dense: float) -> Op3:
        """`op3` for split=auto without token splits, every layer at once: the same arithmetic as its per-layer loop
        (row-wise stable sorts and running sums give the same numbers; each sum the loop takes with `.sum()` is
        taken so here too), in a few dozen numpy calls instead of a few dozen per layer (the ranking calls `op3`
        about a thousand times on a 128-expert model). The ranking of experts and the makespan of each split point
        do not depend on the fetch cap (`_auto_ranking`; not cached: 921 of a Qwen3 search's 989 calls were distinct,
        and 0.2 MB each)."""
        layers = self.m.num_moe_layers
        rest, base_g, gpu_sorted, c_cost, makespan = self._auto_ranking(phase, resident, mu)
        ks = np.argmin(makespan if max_fetch < 0 else makespan[:, :max_fetch + 1], axis=1)
        # Each layer's E_M sum on the GPU and E_C sum on the CPU, taken as the loop takes them (a row's contiguous
        # prefix or suffix, summed by numpy's pairwise rule over its own length), for every layer of one k at once
        gpu_em, cpu_ec = np.empty(layers), np.empty(layers)
        for k in np.unique(ks).tolist():
            rows = np.flatnonzero(ks == k)
            gpu_em[rows] = gpu_sorted[rows, :k].sum(axis=1)
            cpu_ec[rows] = c_cost[rows, k:].sum(axis=1)
        total = 0.0
        for g_res, g_em, c_ec, k in zip(base_g.tolist(), gpu_em.tolist(), cpu_ec.tolist(), ks.tolist(), strict=True):
            t_gpu = max(g_res + g_em, fetch * k)
            total += max(t_gpu, c_ec + (hidden_copy if c_ec > 0 else 0.0))
        ranked = rest.astype(np.uint16) if self.m.num_experts <= 1 << 16 else rest  # 12 kB kept per Op3, not 49
        return Op3(total + dense, int(ks.max(initial=0)), splits=((),) * layers,
                   ranked=(ranked, ks, self.m.num_experts))

    def _split(self, tokens: np.ndarray, n_mb: int, on_gpu: np.ndarray, ec: np.ndarray, t_gpu: float, t_cpu: float,
               fetch: float, hidden_copy: float, gpu: np.ndarray, cpu: np.ndarray
               ) -> tuple[float, tuple[tuple[int, int, int], ...]]:
        """The busier side hands eighths of its heaviest expert's tokens to the other: a GPU expert's to the CPU
        (its weights are in DRAM anyway), or an E_C expert's to the GPU (its weights then cross PCIe). Returns the
        layer's time and (expert, GPU shards, shards) when a share beats the unsplit layer."""
        n = SPLIT_SHARDS
        best, pick = max(t_gpu, t_cpu), ()
        share = np.arange(1, n) / n  # the GPU's share of the expert's tokens
        if t_gpu > t_cpu and on_gpu.size:
            e = int(on_gpu[np.argmax(gpu[on_gpu])])
            g = self.a.expert_times(GPU, self.m, tokens[e] * share) * n_mb
            c = self.a.expert_times(CPU_EXPERTS, self.m, tokens[e] * (1 - share)) * n_mb
            side = np.maximum(t_gpu - gpu[e] + g, t_cpu + c + (hidden_copy if t_cpu == 0 else 0.0))
        elif t_cpu > t_gpu and ec.size:
            e = int(ec[np.argmax(cpu[ec])])
            g = self.a.expert_times(GPU, self.m, tokens[e] * share) * n_mb + fetch
            c = self.a.expert_times(CPU_EXPERTS, self.m, tokens[e] * (1 - share)) * n_mb
            side = np.maximum(t_gpu + g, t_cpu - cpu[e] + c)
        else:
            return best, pick
        j = int(np.argmin(side))
        if side[j] < best * (1 - 1e-9):
            best, pick = float(side[j]), ((e, j + 1, n),)
        return best, pick

    # ---- memory ----------------------------------------------------------------------------------------
    def op3_fitting(self, pre: str, dec: str, mu_p: int, mu_d: int, resident: int, cap_gpu: int,
                    cap: bool = True) -> tuple[Op3, Op3] | None:
        """OP3 of both phases with `resident` experts per layer whose fetch buffers fit in `cap_gpu` with the rest of
        the configuration's VRAM: the best split when it fits; else, with `cap` and split=auto, E_M capped at the
        buffers that fit (the other experts on the CPU), E_R, E_M and E_C under the VRAM budget as the paper's
        search picks them; None when nothing fits."""
        # `compose.gpu_static` is linear in the resident experts and the fetch buffers (the other parts do not
        # depend on them): its rest comes from it once per placement and micro-batches, its two slopes from
        # `compose.gpu_static_slopes`
        rest, per_resident, per_buffer = self.gpu_static_linear(pre, dec, mu_p, mu_d)
        base = rest + resident * per_resident
        if base > cap_gpu:
            return None
        pair = self.op3(Phase.PREFILL, resident, mu_p), self.op3(Phase.DECODE, resident, mu_d)
        if base + per_buffer * max(p.widest for p in pair) <= cap_gpu:
            return pair
        if not cap or self.opts.split != "auto" or per_buffer <= 0:
            return None
        buffers = int((cap_gpu - base) // per_buffer)
        pair = self.op3(Phase.PREFILL, resident, mu_p, buffers), self.op3(Phase.DECODE, resident, mu_d, buffers)
        if base + per_buffer * max(p.widest for p in pair) <= cap_gpu:
            return pair
        return None

    @memo_method
    def gpu_static_linear(self, pre: str, dec: str, mu_p: int, mu_d: int) -> tuple[int, int, int]:
        """VRAM of a configuration without resident experts or fetch buffers, and what one more resident expert
        per layer and one more fetch buffer add (`op3_fitting` and the resident-count grid add those)."""
        return (sum(self.gpu_static(pre, dec, mu_p, mu_d, 0, 0).values()), *compose.gpu_static_slopes(self.m))

    def gpu_static(self, pre: str, dec: str, mu_p: int, mu_d: int, resident: int, widest: int) -> dict[str, int]:
        """VRAM of a configuration: the placement's memory (`compose.gpu_static`) for these micro-batches, with
        OP3's hidden states for the whole prompt when coalesced and for one micro-batch otherwise (and for the
        whole decode batch when coalesced in decode only)."""
        wl = self.wl
        batch = wl.batch
        mb_d = batch if mu_d <= 0 else min(mu_d, batch)
        mb_tokens = max(self.prefill_tokens_max(mu_p), mb_d)
        if self.opts.attention_split and self.opts.attention_split_unit == "requests":  # the CPU share's one batch
            mb_tokens = max(mb_tokens, int(self.decode_groups(mu_d)[0].size))
        expert_tokens = {"on": wl.prompt_tokens, "off": mb_tokens, "decode": max(mb_tokens, batch)}[self.opts.coalesce]
        kv_cpu = self.attention_split(mu_d)[2] if self.opts.attention_split and dec[1] == "g" else 0
        # a streamed cache's buffers hold the largest decode micro-batch at its longest context, one layer
        kv_stream = mb_d * int((wl.prompt_lens + wl.gen_lens).max()) if self.streamed else 0
        return compose.gpu_static(self.ctx, pre, dec, mb_tokens, expert_tokens, resident, widest, kv_cpu, kv_stream)

    def cpu_static(self, pre: str, dec: str, mu_d: int = 0) -> dict[str, int]:
        kv_cpu = self.attention_split(mu_d)[2] if self.opts.attention_split and dec[1] == "g" else 0
        return compose.cpu_static(self.ctx, pre, dec, kv_cpu, kv_streamed=self.streamed)


def _cpu_micro_batches(share: float, n: int) -> int:
    """Decode micro-batches whose attention `attention_split` puts on the CPU: floor(share n + 1/2), at least one
    left on the GPU."""
    return max(0, min(n - 1, int(np.floor(share * n + 0.5)))) if share > 0 else 0


def pipelined_s(per_stream_s: Iterable[float], n: int) -> float:
    """`n` micro-batches through stages on streams that overlap across micro-batches (a flow shop): the busiest
    stream's n shares plus one pass through the others (fill and drain). One micro-batch, or one stream, gives
    the plain sum."""
    times = [t for t in per_stream_s if t > 0]
    if not times:
        return 0.0
    busiest = max(times)
    return n * busiest + sum(times) - busiest


def _placements(opts: CoxMoeOptions, fixed: str, decode: bool = False) -> list[str]:
    if fixed != "auto":
        return [fixed]
    out = list(PLACEMENTS)
    if opts.attention != "auto":
        out = [p for p in out if p[1] == opts.attention[0]]
    if decode and opts.attention_split:  # a share of GPU attention moves to the CPU
        out = [p for p in out if p[1] == "g"]
    return out


def _micro_batches(ctx: PlanContext, phase: Phase, fixed: int) -> list[int]:
    if fixed >= 0:
        return [fixed]
    batch = ctx.workload.batch
    if phase is Phase.PREFILL:
        mean = max(float(ctx.workload.prompt_lens.mean()), 1.0)
        sizes = {max(1, min(batch, int(tokens // mean))) for tokens in (2048, 4096, 8192, 16384, 32768)}
    else:
        sizes = {0} | {batch // d for d in (2, 4, 8, 16) if batch // d >= 8}
    return sorted(sizes)


def decode_family(o: CoxMoeOptions) -> tuple[str, int]:
    """Candidates sharing the decode placement and micro-batch. The analytic model ranks prefill micro-batches and
    resident counts close to the simulation but decode configurations less well (the serial estimate over-rates
    the whole batch by 2-5% on the paper's grid, 24-27% at some batch-1024 points; the pipelined one still misses
    the engine's contention for host DRAM), so the re-scoring simulates distinct decode configurations (with the
    resident count in the key, Qwen3's three slots went to one decode configuration at 95, 94 and 93 residents)."""
    return o.decode_placement, o.decode_micro_batch


class CoxMoePolicy(Policy):
    name = "coxmoe"
    label = "CoX-MoE"
    color = "#c0392b"
    summary = "CoX-MoE: OP0-OP2 placed per phase in micro-batches, coalesced experts split E_R/E_M/E_C (AMX)"
    Options = CoxMoeOptions

    @property
    def expert_kernels(self) -> str:  # type: ignore[override]  # an option of this family (CoxMoeOptions)
        return self.options.expert_kernels
    Model: ClassVar[type] = _Model  # the analytic model the search ranks with (a variant swaps its OP3 rule)
    example_options = ({}, {"coalesce": "off", "decode_micro_batch": "4", "prefill_micro_batch": "3"},
                       {"prefill_placement": "ccg", "decode_placement": "gcc", "resident_experts": "2",
                        "split": "auto"},
                       {"prefill_placement": "cgc", "decode_placement": "cgg", "resident_experts": "0",
                        "split": "gpu", "decode_micro_batch": "3", "prefill_micro_batch": "2"},
                       {"split_tokens": "on"},
                       {"split_tokens": "on", "coalesce": "off", "decode_micro_batch": "4", "prefill_micro_batch": "3"})

    def search_space(self, ctx: PlanContext) -> SearchSpace:
        o: CoxMoeOptions = self.options
        model = self.Model(ctx, o)
        candidates = self._candidates(ctx, model)
        most = [c for c in candidates if c.detail["resident_rule"] == "most"]  # the rule before 2026-12-05
        return SearchSpace(candidates, lambda c, opts: self._plan(c, model, opts),
                           searched=o.searched, rescore=o.rescore,
                           explain_empty=lambda: self._raise_capacity(ctx, model), family=decode_family,
                           anchor=min(most, key=lambda c: c.analytic_s) if most else None, tie_share=RESCORE_TIE,
                           size=model.plan_size)

    def _raise_capacity(self, ctx: PlanContext, model: _Model) -> None:
        """Say which pool overflows, with its parts, for the configuration the given knobs pin down (the
        search's first placement and micro-batch where a knob is left to it)."""
        from sim.policies.base import require_fits

        o, m = self.options, ctx.model
        gpu_attention = o.attention_split or o.attention == "gpu"  # the search tried GPU decode attention only
        pre = o.prefill_placement if o.prefill_placement != "auto" else "gcg"
        dec = o.decode_placement if o.decode_placement != "auto" else ("ggg" if gpu_attention else "gcg")
        mu_p = max(o.prefill_micro_batch, 1)
        mu_d = o.decode_micro_batch if o.attention_split and o.decode_micro_batch >= 0 else max(o.decode_micro_batch,
                                                                                                 1)
        if o.resident_experts > m.num_experts:
            raise SimInputError(f"policy {self.name}: resident_experts {o.resident_experts} exceeds the model's "
                                f"{m.num_experts} experts per layer")
        require_fits("DRAM", ctx.system.name, self.name, model.cpu_static(pre, dec, mu_d),
                     ctx.system.dram_usable_bytes)
        resident = max(o.resident_experts, 0)
        widest = max(model.op3(Phase.PREFILL, resident, mu_p).widest, model.op3(Phase.DECODE, resident, mu_d).widest)
        require_fits("GPU", ctx.system.gpu.name, self.name, model.gpu_static(pre, dec, mu_p, mu_d, resident, widest),
                     ctx.system.gpu_usable_bytes)
        raise NoFeasibleConfig(f"policy {self.name}: no configuration of these knobs fits on {ctx.system.name} (each "
                               "placement and micro-batch the search may still choose overflows GPU or DRAM)")

    # ---- search ----------------------------------------------------------------------------------------
    def _candidates(self, ctx: PlanContext, model: _Model) -> list[Candidate]:
        o: CoxMoeOptions = self.options
        m = ctx.model
        cap_gpu, cap_cpu = ctx.system.gpu_usable_bytes, ctx.system.dram_usable_bytes
        pre_options = [(p, mu) for p in _placements(o, o.prefill_placement)
                       for mu in _micro_batches(ctx, Phase.PREFILL, o.prefill_micro_batch)]
        dec_options = [(p, mu) for p in _placements(o, o.decode_placement, decode=True)
                       for mu in _micro_batches(ctx, Phase.DECODE, o.decode_micro_batch)]
        out: list[Candidate] = []
        if o.attention_split:  # only micro-batch sizes that put some decode attention on the CPU
            dec_options = [(p, mu) for p, mu in dec_options if model.attention_split(mu)[1]]
            if not dec_options:
                raise SimInputError(f"policy {self.name}: attention_split={o.attention_split} puts no decode "
                                    f"micro-batch on the CPU at decode_micro_batch={o.decode_micro_batch} (batch "
                                    f"{ctx.workload.batch}); use smaller micro-batches or a larger share")
        for (pre, mu_p), (dec, mu_d) in itertools.product(pre_options, dec_options):
            kv_on_gpu = dec[1] == "g" and not model.streamed  # where decode attention runs, unless streamed
            if o.attention_split:
                t_pre = model.ops012_split_s(Phase.PREFILL, pre, mu_d, mu_p)
                t_dec = model.ops012_split_s(Phase.DECODE, dec, mu_d, mu_d)
            else:
                t_pre = model.ops012_s(Phase.PREFILL, pre, mu_p, kv_on_gpu)
                t_dec = model.ops012_s(Phase.DECODE, dec, mu_d, kv_on_gpu)
            if sum(model.cpu_static(pre, dec, mu_d).values()) > cap_cpu:
                continue
            candidate = functools.partial(self._candidate, model, (pre, mu_p, t_pre), (dec, mu_d, t_dec))
            if o.resident_experts >= 0:  # given: that count, E_M capped at the buffers that fit
                if o.resident_experts <= m.num_experts:
                    pair = model.op3_fitting(pre, dec, mu_p, mu_d, o.resident_experts, cap_gpu)
                    if pair is not None:
                        out.append(candidate(o.resident_experts, pair, "given"))
                continue
            free = cap_gpu - model.gpu_static_linear(pre, dec, mu_p, mu_d)[0]
            if free < 0:
                continue
            most = min(m.num_experts, int(free // (m.num_moe_layers * m.expert_bytes)))
            # The most residents whose uncapped split fits (the rule before 2026-12-05, kept as a candidate and as
            # the search's anchor: always re-scored), and the analytic best over a grid of resident counts with
            # E_M capped at the buffers that fit. Fewer residents than fit can win: cold experts then run on the
            # CPU beside the GPU instead of leaving it idle (DeepSeek-V2-Lite all-resident: 9-14% slower), and a
            # capped split can hold more residents than an uncapped one (Mixtral on the A100: 16%).
            for resident in range(most, -1, -1):
                pair = model.op3_fitting(pre, dec, mu_p, mu_d, resident, cap_gpu, cap=False)
                if pair is not None:
                    out.append(candidate(resident, pair, "most"))
                    break
            step = max(1, round(most / RESIDENT_GRID_STEPS))
            best: tuple[float, int, tuple[Op3, Op3]] | None = None  # (estimate, resident, pair): the grid's best
            for resident in sorted({*range(most, -1, -step), 0}, reverse=True):
                pair = model.op3_fitting(pre, dec, mu_p, mu_d, resident, cap_gpu)
                if pair is not None:
                    total = self._estimate(model, t_pre, t_dec, pair)[0]
                    if best is None or total < best[0]:
                        best = (total, resident, pair)
            if best is not None:  # options made for the grid's best only (a Qwen3 search ranked 32 k of them)
                chosen = candidate(best[1], best[2], "grid")
                if all(c.options != chosen.options for c in out[-1:]):
                    out.append(chosen)
        return out

    @staticmethod
    def _estimate(model: _Model, t_pre: float, t_dec: float, pair: tuple[Op3, Op3]) -> tuple[float, float, float]:
        """(total, prefill, decode) seconds of a configuration: OP0-OP2 per layer (`t` of each phase's placement
        and micro-batch) plus OP3 of each phase."""
        op3_p, op3_d = pair
        prefill = model.m.num_layers * t_pre + op3_p.total_s
        decode = model.decode_steps * (model.m.num_layers * t_dec + op3_d.total_s)
        return prefill + decode, prefill, decode

    def _candidate(self, model: _Model, prefill: tuple[str, int, float], decode: tuple[str, int, float],
                   resident: int, pair: tuple[Op3, Op3], rule: str) -> Candidate:
        """A configuration with its analytic estimate (`_estimate`); `rule` says how its resident count was
        chosen."""
        (pre, mu_p, t_pre), (dec, mu_d, t_dec) = prefill, decode
        opts = replace(self.options, prefill_placement=pre, decode_placement=dec, prefill_micro_batch=mu_p,
                       decode_micro_batch=mu_d, resident_experts=resident)
        total, prefill_s, decode_s = self._estimate(model, t_pre, t_dec, pair)
        detail = {"prefill_s": prefill_s, "decode_s": decode_s,
                  "expert_fetched_per_layer": max(pair[0].widest, pair[1].widest), "resident_rule": rule}
        return Candidate(opts, total, detail)

    # ---- plan ------------------------------------------------------------------------------------------
    def _plan(self, ctx: PlanContext, model: _Model, o: CoxMoeOptions) -> Plan:
        m, wl = ctx.model, ctx.workload
        resident = o.resident_experts
        residents = tuple(tuple(int(e) for e in model.order[li][:resident]) for li in range(m.num_moe_layers))
        layouts = {}
        fitting = model.op3_fitting(o.prefill_placement, o.decode_placement, o.prefill_micro_batch,
                                    o.decode_micro_batch, resident, ctx.system.gpu_usable_bytes)
        for k, (phase, placement, mu) in enumerate(((Phase.PREFILL, o.prefill_placement, o.prefill_micro_batch),
                                                    (Phase.DECODE, o.decode_placement, o.decode_micro_batch))):
            # the split the search priced (E_M capped to the buffers VRAM holds); uncapped when nothing fits, so
            # the engine names the overflow
            choice = fitting[k] if fitting is not None else model.op3(phase, resident, mu)
            n_cpu = model.attention_split(mu)[1] if phase is Phase.DECODE and o.attention_split else 0
            layouts[phase] = Layout(placement, residents, choice.fetched, choice.on_cpu, splits=choice.splits,
                                    on_ndp=choice.on_ndp, attention_cpu_mbs=frozenset(range(n_cpu)),
                                    kv_streamed=model.streamed and phase is Phase.DECODE)
        widest = max(lay.widest_fetch for lay in layouts.values())  # E_M and E_C experts split onto the GPU
        gpu = model.gpu_static(o.prefill_placement, o.decode_placement, o.prefill_micro_batch,
                               o.decode_micro_batch, resident, widest)
        cpu = model.cpu_static(o.prefill_placement, o.decode_placement, o.decode_micro_batch)
        schedule = Schedule.split(ctx, model.prefill_tokens(o.prefill_micro_batch), o.decode_micro_batch,
                                  expert_batch=0 if o.coalesce in ("on", "decode") else 1,
                                  prefill_expert_batch=1 if o.coalesce == "decode" else None)
        schedule = replace(schedule, decode=model.decode_groups(o.decode_micro_batch))  # the search's own groups
        builder = ctx.builder()
        split_kv = layouts[Phase.DECODE].attention_cpu_mbs
        emit = LayoutEmitter(ctx, builder, kv_on_gpu=o.decode_placement[1] == "g" and not model.streamed,
                             expert_batch=schedule.expert_batch, prefill_expert_batch=schedule.prefill_expert_batch,
                             kv_on_cpu=model.cpu_requests(o.decode_micro_batch) if split_kv and not model.streamed
                             else None)
        first = prefill_slices(ctx, schedule.prefill)
        emit.prefill(first, layouts[Phase.PREFILL], model.prefills)
        restrat = _Restratifier(layouts[Phase.DECODE], first, o.ema, ctx) if o.ema and resident else None
        steps = ctx.steps()
        sampled = steps if ctx.decode_scale != 1.0 else None
        for step in steps:
            slices = decode_slices(ctx, step, schedule.decode)
            if not slices:
                continue
            if restrat is None:
                emit.step(slices, Phase.DECODE, step, layouts[Phase.DECODE])
                continue
            emit.step(slices, Phase.DECODE, step, *restrat.at(step, sampled, m.expert_bytes))
        knobs = {**asdict(o), **({"restratify_swaps": restrat.swaps} if restrat else {}),
                 **({"attention_cpu_micro_batches": len(layouts[Phase.DECODE].attention_cpu_mbs)}
                    if o.attention_split else {}),
                 "fetched_experts_per_layer": {str(p): [len(f) for f in lay.fetched] for p, lay in layouts.items()},
                 "cpu_experts_per_layer": {str(p): [len(c) for c in lay.on_cpu] for p, lay in layouts.items()},
                 **({"split_experts_per_layer": {str(p): [len(x) for x in lay.splits] for p, lay in layouts.items()}}
                    if o.split_tokens == "on" else {}),
                 **({"ndp_experts_per_layer": {str(p): [len(x) for x in lay.on_ndp] for p, lay in layouts.items()}}
                    if any(lay.on_ndp for lay in layouts.values()) else {})}
        return Plan(self.name, knobs, m, ctx.system, wl, builder.result(), {"gpu": gpu, "cpu": cpu}, schedule.groups(),
                    decode_scale=ctx.decode_scale, scopes=emit.scopes, expert_kernels=self.expert_kernels)


class _Restratifier:
    """Online re-stratification: an EMA of per-layer expert load over observed routing picks E_R every few decode
    steps. Experts that leave E_R join E_C (so E_M never outgrows the fetch buffer the VRAM budget was planned
    with); entering experts leave E_M / E_C and are copied over PCIe into the evicted experts' slots before their
    layer runs.

    The bookkeeping (EMA, re-picks, swaps) runs over every decode step of the workload from the trace's per-step
    counts, whichever steps the plan emits: a sampled step has the E_R the full run has there, and carries the
    swaps of the steps it stands for (those since the previous sampled step) at the sample's scale, so that
    scaled to all steps the swaps' bytes count once and early steps, which swap more, weigh as they do. (Before
    2026-12-06 the EMA saw only the sampled steps and each sampled step re-picked and copied a whole block's swaps:
    an 8-step sample of 64 charged 2.7x the H2D time. Later that day every sampled step carried an equal share,
    step 1 too, which the full run never swaps at: its copy waits only for the prefill's pass over its layer, so
    it ran inside the prefill, which is not scaled; a 2-step sample of 7 decode steps reported 47% less decode
    time than the full run.)"""

    def __init__(self, static: Layout, prefill: list[BatchSlice], ema: tuple[float, int], ctx: PlanContext):
        self.residents, self.static = list(static.resident), static
        self.alpha, self.every = ema
        self.load = self._share(sum(s.counts.astype(np.float64) for s in prefill))
        self.epoch = 0
        self.layout = self._split()
        self.steps: dict[int, tuple[Layout, tuple[tuple[int, ...], ...]]] = {}
        wl, trace = ctx.workload, ctx.trace
        requests = np.arange(wl.batch)
        table = trace.decode_step_counts([requests])  # [S, 1, L, E], or None when too large to hold
        self.total_steps = ctx.decode_steps_total
        # swaps_until[t]: experts copied in per layer at steps 1..t (the last row: over the whole decode)
        self.swaps_until = np.zeros((self.total_steps + 1, len(self.residents)), dtype=np.int64)
        for step in range(1, self.total_steps + 1):
            self.steps[step] = self._before(step)
            self.swaps_until[step] = self.swaps_until[step - 1] + [len(e) for e in self.steps[step][1]]
            if table is not None:
                counts = table[step - 1, 0].astype(np.float64)
            else:
                counts = trace.expert_counts(trace.decode_rows(step, requests[wl.gen_lens > step])).astype(np.float64)
            self.load = (1.0 - self.alpha) * self.load + self.alpha * self._share(counts)

    @property
    def swaps(self) -> int:
        """Experts copied into E_R over the whole decode (every step's, whichever the plan emits)."""
        return int(self.swaps_until[-1].sum())

    @staticmethod
    def _share(counts: np.ndarray) -> np.ndarray:
        return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)

    def _before(self, step: int) -> tuple[Layout, tuple[tuple[int, ...], ...]]:
        """Step `step`'s layout and, per MoE layer, the experts entering E_R now (E_R is re-picked when a new block
        of `every` decode steps begins)."""
        entering: list[tuple[int, ...]] = [() for _ in self.residents]
        epoch = (step - 1) // self.every
        if epoch > self.epoch:
            self.epoch = epoch
            count = len(self.residents[0])
            for li, old in enumerate(self.residents):
                new = tuple(int(e) for e in np.argsort(-self.load[li], kind="stable")[:count])
                entering[li] = tuple(sorted(set(new) - set(old)))
                self.residents[li] = new
            self.layout = self._split()  # the split only changes when E_R does
        return self.layout, tuple(entering)

    def at(self, step: int, sampled: Sequence[int] | None, expert_bytes: int
           ) -> tuple[Layout, tuple[tuple[int, ...], ...], tuple[int, ...] | None]:
        """What decode step `step` emits: its layout, the experts entering E_R at it, and (when the plan emits
        only the `sampled` steps, in order) the bytes of each layer's swap copy: the swaps of the steps it stands
        for (after the previous sampled step, up to it; the last one to the end) at the sample's scale."""
        layout, entering = self.steps[step]
        if sampled is None:
            return layout, entering, None
        i = sampled.index(step)
        first = sampled[i - 1] if i else 0  # the steps (first, last] are this one's
        last = self.total_steps if i == len(sampled) - 1 else step
        swaps = self.swaps_until[last] - self.swaps_until[first]
        # scaled by total / len(sampled) afterwards, the sampled steps' swaps add up to every step's
        scale = len(sampled) / self.total_steps
        return layout, entering, tuple(round(int(n) * expert_bytes * scale) for n in swaps)

    def _split(self) -> Layout:
        """E_M / E_C for the current E_R: the static plan's E_M minus residents; everything else on the CPU."""
        fetched, on_cpu = [], []
        for li, res in enumerate(self.residents):
            resident = set(res)
            static_fetched = set(self.static.fetched[li])
            others = [e for e in range(len(self.load[li])) if e not in resident]
            fetched.append(tuple(e for e in others if e in static_fetched))
            on_cpu.append(tuple(e for e in others if e not in static_fetched))
        return replace(self.static, resident=tuple(self.residents), fetched=tuple(fetched), on_cpu=tuple(on_cpu))
