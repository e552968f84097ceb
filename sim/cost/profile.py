"""Cost model from measured profiles: times looked up by interpolation, extended past the grid's edges.

A profile directory (written by `coxmoe calibrate profile`, issue 4) holds `profile.json` (version, model
signature, machine fingerprint) and `timings.csv` (device, kind, tokens, kv, median_s, ...). GEMM-shaped ops
interpolate their time over tokens in log-log space; decode attention interpolates over (batch, KV length per
request). Past the grid's edges a time is extended from the measurements (`_extended`; attention in proportion
to its work: requests x KV in decode, requests x prompt length squared in prefill): more tokens never take less
time. Anything the profile does not cover (other kinds, prefill
attention without its rows, copies without a CUDA profile) falls back to the roofline. Shared experts and dense
FFNs, which the profile does not time, take the routed expert's time at their token count scaled by their
parameter count. Prefill attention is looked up by (requests, root-mean-square prompt length) of the op's scope
(`Plan.scope_of`, read when the engine calls `prepare(plan)`; the workload's mean prompt length without a plan).
CPU ops add the executor's measured cost per request in their scope (`overhead_<kind>` rows). This module reads
data only: the simulator never imports the executor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sim.cost.roofline import RooflineCostModel, grouped_op_error, seconds_to_ns
from sim.errors import SimInputError
from sim.plan import PAGEABLE_PAYLOADS, Op, OpKind, Phase, Plan
from sim.specs import ModelSpec, SystemSpec
from sim.topology import UnitKind

# 2 (2026-12-05): o_proj rows no longer time their input's creation (about a third of a CPU row), expert rows take
# their tokens grouped once as the executor does; a version-1 profile's o_proj times are too long: re-measure.
PROFILE_VERSION = 2
GEMM_KINDS = (OpKind.EXPERT, OpKind.QKV, OpKind.O_PROJ, OpKind.ROUTER, OpKind.LM_HEAD)
QUANTIZED_EXPERT_KINDS = {"int8": "expert_int8", "int4": "expert_int4"}  # CPU rows of quantised expert ops
_TOKEN_TABLES = {*(str(k) for k in GEMM_KINDS), *QUANTIZED_EXPERT_KINDS.values(), "copy_h2d_pinned",
                 "copy_d2h_pinned"}
# expert_precision: a profile's rows cover each precision by kind (`expert`, `expert_int8`, ...), and profiles
# written before the field existed keep their signature.
_IGNORED = {"name", "num_layers", "first_dense_layers", "published_total_params", "sources", "expert_precision"}


def model_signature(spec: ModelSpec) -> str:
    """Shapes that decide op times (not the name or depth): a model cut to fewer layers keeps its signature. A field
    at its default is left out, so a field added to ModelSpec later (with a default) keeps older profiles valid."""
    values = dataclasses.asdict(spec)
    fields = {}
    for f in dataclasses.fields(spec):
        if f.name in _IGNORED:
            continue
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or getattr(spec, f.name) != default:
            fields[f.name] = values[f.name]
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


PROFILE_DEVICES = ("cpu", "cuda")  # what `_device` maps a stream's unit to (copies are the cuda rows)
MAX_GRID_POINT = float(1 << 50)


def _checked_timings(frame: pd.DataFrame, where: Path) -> pd.DataFrame:
    """Timings as numbers: grid points >= 0 and times finite and positive (a measured op never takes 0 s;
    per-request overheads may be 0). One SimInputError names the first bad row."""
    if frame.empty:
        raise SimInputError(f"{where}: no timings")
    devices = frame["device"].astype(str)
    unknown = ~devices.isin(PROFILE_DEVICES)
    if unknown.any():  # a row no op would ever read: the run would silently price by the roofline instead
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise SimInputError(f"{where}: row {row + 2}: device must be one of {', '.join(PROFILE_DEVICES)}, got "
                            f"{frame['device'].iloc[row]!r}")
    out = frame.copy()
    for col in ("tokens", "kv", "median_s"):
        values = pd.to_numeric(out[col], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(float))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise SimInputError(f"{where}: row {row + 2}: {col} must be a finite number, got {frame[col].iloc[row]!r}")
        out[col] = values
    for col in ("tokens", "kv"):  # grid points count tokens, KV entries or bytes: whole numbers below 2^50
        values = out[col].to_numpy(float)
        bad = (values % 1 != 0) | (values > MAX_GRID_POINT)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SimInputError(f"{where}: row {row + 2}: {col} must be a whole number up to 2^50, got "
                                f"{frame[col].iloc[row]}")
    if "threads" in out.columns:  # CPU rows name their torch thread count; other rows leave it empty
        values = pd.to_numeric(out["threads"], errors="coerce")
        given, number = out["threads"].notna().to_numpy(), values.to_numpy(float)
        flag = np.array([isinstance(v, bool | np.bool_) for v in out["threads"]], dtype=bool)
        whole = np.isfinite(number) & (number >= 1) & ~flag
        whole[whole] = number[whole] % 1 == 0
        bad = given & ~whole
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SimInputError(f"{where}: row {row + 2}: threads must be an integer >= 1 (or empty), got "
                                f"{frame['threads'].iloc[row]!r}")
        out["threads"] = values
    kind = out["kind"].astype(str)
    overhead, attention = kind.str.startswith("overhead_"), kind.str.startswith("attention")
    bad = ((out["tokens"] < 0) | (out["kv"] < 0) | (out["median_s"] < 0)
           | (~overhead & ((out["median_s"] <= 0) | (out["tokens"] < 1))) | (attention & (out["kv"] < 1)))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        got = f"{kind.iloc[row]!r} tokens {out['tokens'].iloc[row]}, kv {out['kv'].iloc[row]}"  # repr: one line
        raise SimInputError(f"{where}: row {row + 2}: a measured op needs tokens >= 1 (and kv >= 1 for attention) "
                            f"and median_s > 0 (overheads: >= 0); got {got}, median_s {out['median_s'].iloc[row]}")
    return out


def _mean_grid(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, kv, mean median_s over rows at each (tokens, kv); NaN where none was measured)."""
    batches, b = np.unique(rows["tokens"].to_numpy(), return_inverse=True)
    kvs, k = np.unique(rows["kv"].to_numpy(), return_inverse=True)
    sums = np.zeros((batches.size, kvs.size))
    counts = np.zeros_like(sums)
    np.add.at(sums, (b, k), rows["median_s"].to_numpy(float))
    np.add.at(counts, (b, k), 1.0)
    with np.errstate(invalid="ignore"):
        return batches, kvs, sums / counts


def _extended(table: tuple[np.ndarray, np.ndarray], value: float) -> float:
    """Seconds at `value` (tokens or bytes) from a log-log table: interpolated inside the grid; below it the first
    point's time (a smaller op never takes longer); above it the last point's time plus the last segment's cost
    per unit beyond it (a GEMM's or copy's marginal cost; its average cost where noise made the segment fall).
    Extended from the measurements rather than handed to the roofline, which prices another machine's rates: an
    op one token past the grid must not take a fraction of the one at its edge."""
    lx, ly = table
    x = math.log(value)
    if x <= lx[-1]:
        return float(np.exp(np.interp(x, lx, ly)))
    x1, t1 = math.exp(lx[-1]), math.exp(ly[-1])
    slope = t1 / x1
    if len(lx) > 1:
        x0, t0 = math.exp(lx[-2]), math.exp(ly[-2])
        if t1 > t0 and x1 > x0:
            slope = (t1 - t0) / (x1 - x0)
    return t1 + slope * (value - x1)


class ProfileCostModel:
    """Measured times where the profile has them; the roofline (and its usages) everywhere else."""

    def __init__(self, system: SystemSpec, profile_dir: str | Path, model: ModelSpec,
                 mean_prompt_len: float | None = None, threads: int | None = None):
        if model.stored_at_bits:
            raise SimInputError(f"model {model.name}: a profile times the executor's kernels, which have no form for "
                                "weights stored at weight_bits_per_param / expert_bits_per_param; simulate this model "
                                "without --profile")
        self.fallback = RooflineCostModel(system)
        self.fallback.use_model(model)
        self.topology = self.fallback.topology
        self.model = model
        self.dir = Path(profile_dir)
        meta_path, table_path = self.dir / "profile.json", self.dir / "timings.csv"
        if not meta_path.is_file() or not table_path.is_file():
            raise SimInputError(f"{self.dir}: not a profile (needs profile.json and timings.csv)")
        try:
            self.meta = json.loads(meta_path.read_text())
            frame = pd.read_csv(table_path)
        except (json.JSONDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise SimInputError(f"{self.dir}: unreadable profile ({type(exc).__name__})") from None
        if not isinstance(self.meta, dict):
            raise SimInputError(f"{self.dir}/profile.json: must be a JSON object")
        if self.meta.get("version") != PROFILE_VERSION:
            old = self.meta.get("version") == 1
            raise SimInputError(f"{self.dir}: profile version {self.meta.get('version')!r}, this reader reads "
                                f"{PROFILE_VERSION}" + ("; version 1 timed each O-projection's input creation too "
                                                       "(rows about a third too long): re-measure it with `coxmoe "
                                                       "calibrate profile`" if old else ""))
        if self.meta.get("model_signature") != model_signature(model):
            raise SimInputError(f"{self.dir}: profile measured for {self.meta.get('model')!r}, whose shapes differ "
                                f"from {model.name}'s")
        needed = {"device", "kind", "tokens", "kv", "median_s"}
        if not needed <= set(frame.columns):
            missing = ", ".join(sorted(needed - set(frame.columns)))
            raise SimInputError(f"{self.dir}/timings.csv lacks column(s) {missing}")
        frame = _checked_timings(frame, self.dir / "timings.csv")
        self.mean_prompt_len = mean_prompt_len
        if "threads" in frame.columns:  # CPU rows per torch thread count: the asked one, else the most
            available = sorted(int(t) for t in frame["threads"].dropna().unique())
            chosen = threads if threads is not None else (available[-1] if available else None)
            if threads is not None and threads not in available:
                raise SimInputError(f"{self.dir}: no rows for {threads} threads (profiled: {available})")
            frame = frame[(frame["device"] != "cpu") | (frame["threads"] == chosen)]
            self.threads = chosen
        else:
            self.threads = None
        self.gemm: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self.attention: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for (device, kind), rows in frame.groupby(["device", "kind"]):
            if kind in ("attention", "attention_prefill"):
                batches, kvs, grid = _mean_grid(rows)
                if np.isnan(grid).any():  # interpolation needs the whole (requests x kv) grid
                    b, k = (int(i[0]) for i in np.nonzero(np.isnan(grid)))
                    raise SimInputError(f"{self.dir}: the {device} {kind} grid lacks requests {int(batches[b])} x "
                                        f"kv {int(kvs[k])} (every requests x kv pair of the grid must be measured)")
                self.attention[(str(device), str(kind))] = (np.log(batches), np.log(kvs), np.log(grid))
            elif kind in _TOKEN_TABLES:  # 1-D over tokens (bytes for copies: the executor copies pinned memory)
                mean = rows.groupby("tokens")["median_s"].mean().sort_index()  # a repeated grid point: its mean
                self.gemm[(str(device), str(kind))] = (np.log(mean.index.to_numpy(float)),
                                                       np.log(mean.to_numpy(float)))
        self.expert_kind = QUANTIZED_EXPERT_KINDS.get(model.expert_precision, str(OpKind.EXPERT))
        if model.expert_precision != "native" and ("cpu", self.expert_kind) not in self.gemm:
            raise SimInputError(f"{self.dir}: no {self.expert_kind} rows for the model's {model.expert_precision} "
                                "experts (profile again with this version; a GPU's quantised experts use the "
                                "roofline)")
        self.overhead = {(str(d), str(k).removeprefix("overhead_")): float(v) for (d, k), v in  # per device
                         frame[frame["kind"].str.startswith("overhead_")].groupby(["device", "kind"])["median_s"]
                         .first().items()}
        self._cache: dict[tuple, int] = {}
        self._prefill_cache: dict[tuple, int] = {}
        self._scope_stats: dict[tuple, tuple[float, float]] = {}
        self._plan: Plan | None = None
        self.hits = self.misses = 0

    def _device(self, op: Op) -> str | None:
        kind = self.topology.unit_of(op.stream).kind
        return "cpu" if kind is UnitKind.CPU else ("cuda" if kind is UnitKind.GPU else None)

    def _lookup(self, op: Op) -> float | None:
        unit = self.topology.unit_of(op.stream)
        if op.kind is OpKind.COPY and unit.kind is UnitKind.LINK:
            ends = (unit.spec.src, unit.spec.dst)
            units = self.topology.units
            if op.payload in PAGEABLE_PAYLOADS or unit.memory < 0 or "cpu" not in ends or not any(
                    end in units and units[end].kind is UnitKind.GPU for end in ends):
                return None  # measured: pinned copies between the host and a GPU only (not a disk's)
            kind = "copy_h2d_pinned" if unit.spec.src == "cpu" else "copy_d2h_pinned"
            table = self.gemm.get(("cuda", kind))
            if table is None or op.bytes <= 0:
                return None
            return _extended(table, op.bytes)
        device = self._device(op)
        if device is None or op.tokens <= 0:
            return None
        if op.kind is OpKind.ATTENTION:
            if op.phase is Phase.DECODE:  # grid: (requests, KV entries per request)
                grid = self.attention.get((device, "attention"))
                b, kv = np.log(op.tokens), np.log(max(op.kv_tokens / op.tokens, 1.0))
            else:  # grid: (requests, prompt length) of the op's scope (else from the workload's mean length)
                grid = self.attention.get((device, "attention_prefill"))
                stats = self._prefill_scope(op)
                if stats is None:
                    return None
                b, kv = np.log(max(stats[0], 1.0)), np.log(stats[1])
            if grid is None:
                return None
            lb, lk, lt = grid
            # Outside the grid: the nearest edge's time, scaled in proportion to attention's work beyond the top
            # (requests x KV entries in decode; requests x prompt length squared in prefill, every token attending
            # to those before it), so more requests or a longer KV never take less time.
            power = 1.0 if op.phase is Phase.DECODE else 2.0
            scale = math.exp(max(b - lb[-1], 0.0) + power * max(kv - lk[-1], 0.0))
            b, kv = min(max(b, lb[0]), lb[-1]), min(max(kv, lk[0]), lk[-1])
            i = min(np.searchsorted(lb, b, side="right") - 1, len(lb) - 2) if len(lb) > 1 else 0
            j = min(np.searchsorted(lk, kv, side="right") - 1, len(lk) - 2) if len(lk) > 1 else 0
            fb = (b - lb[i]) / (lb[i + 1] - lb[i]) if len(lb) > 1 else 0.0
            fk = (kv - lk[j]) / (lk[j + 1] - lk[j]) if len(lk) > 1 else 0.0
            ib, jk = min(i + 1, len(lb) - 1), min(j + 1, len(lk) - 1)
            v = ((1 - fb) * (1 - fk) * lt[i, j] + fb * (1 - fk) * lt[ib, j] + (1 - fb) * fk * lt[i, jk]
                 + fb * fk * lt[ib, jk])
            return scale * float(np.exp(v))
        kind, scale = str(op.kind), 1.0
        if op.kind is OpKind.EXPERT:  # routed experts at the model's precision; shared ones stay native
            kind = self.expert_kind
        if op.kind in (OpKind.SHARED_EXPERT, OpKind.DENSE_FFN) and (device, kind) not in self.gemm:
            # The same gated-FFN GEMMs as a routed expert, only wider: FLOPs and weight bytes both grow with the
            # parameter count, so the measured expert time at these tokens scales by it.
            params = (self.model.shared_expert_params if op.kind is OpKind.SHARED_EXPERT
                      else self.model.dense_ffn_params)
            kind, scale = str(OpKind.EXPERT), params / self.model.expert_params
        table = self.gemm.get((device, kind))
        if table is None or scale <= 0:
            return None
        return scale * _extended(table, op.tokens)

    def prepare(self, plan: Plan) -> None:
        """Called by the engine before it prices `plan`'s ops: prefill ops then read their requests and prompt
        lengths from their scopes (`Plan.scope_of`). A new plan drops the prefill prices of the last one."""
        if plan.model.expert_precision != self.model.expert_precision:
            raise SimInputError(f"this profile cost model prices {self.model.expert_precision} experts; the plan's "
                                f"are {plan.model.expert_precision} (build it for the plan's model)")
        if plan.model.stored_at_bits:  # its own model cannot be (the constructor refuses it)
            raise SimInputError("this profile cost model prices the executor's kernels; the plan's model stores "
                                "weights at weight_bits_per_param / expert_bits_per_param (simulate it without "
                                "--profile)")
        fused = self.fallback.fused_experts, self.fallback.fused_cpu_experts
        self.fallback.prepare(plan)
        if (self.fallback.fused_experts, self.fallback.fused_cpu_experts) != fused:  # cached prices are stale
            self._cache.clear()
        if plan is not self._plan:
            self._plan = plan
            self._prefill_cache.clear()
            self._scope_stats.clear()

    def _prefill_scope(self, op: Op) -> tuple[float, float] | None:
        """(requests, effective prompt length) of a prefill op's scope: the root mean square of its prompt lengths,
        so that requests x length^2 is the scope's sum of squares, attention's quadratic work (the mean had
        under-priced ShareGPT- or MT-Bench-like lengths 1.7-1.9x); without a plan, the tokens over the workload's
        mean prompt length."""
        if self._plan is None:
            if not self.mean_prompt_len:
                return None
            return op.tokens / self.mean_prompt_len, self.mean_prompt_len
        key = (op.micro_batch, op.scope, op.tokens)
        hit = self._scope_stats.get(key)
        if hit is None:
            requests = self._plan.scope_of(op)[0]
            lens = self._plan.workload.prompt_lens[requests].astype(np.float64)
            rms = float(np.sqrt((lens * lens).mean())) if lens.size else 1.0
            # a policy that pads prompts to the longest (FlexGen) carries the padded tokens: that is the length
            # its attention computes over
            padded = op.tokens / requests.size if requests.size else rms
            hit = self._scope_stats[key] = (float(requests.size), max(rms, padded))
        return hit

    def _requests(self, op: Op) -> float:
        """Requests in an op's scope: its tokens in decode (one per request); its scope's in prefill."""
        if op.phase is Phase.DECODE:
            return float(op.tokens)
        stats = self._prefill_scope(op)
        return float(op.tokens) if stats is None else stats[0]

    def op_time_ns(self, op: Op) -> int:
        if op.members:
            raise grouped_op_error(op)
        decode = op.phase is Phase.DECODE
        key = (op.kind, op.stream, op.tokens, op.kv_tokens, op.flops, op.bytes, op.payload)
        if not decode:  # a prefill op's price depends on its scope's requests and prompt lengths
            key += (op.micro_batch, op.scope)
        cache = self._cache if decode else self._prefill_cache
        hit = cache.get(key)
        if hit is None:
            seconds = self._lookup(op)
            if seconds is None:
                self.misses += 1
                hit = self.fallback.op_time_ns(op)
            else:
                self.hits += 1
                hit = seconds_to_ns(seconds)
            device = self._device(op)
            if device is not None and op.kind not in (OpKind.EXPERT, OpKind.ATTENTION):
                # the executor's cost per request in the scope, on the op's device (attention's profile already
                # loops per request); a profile without a device's overhead rows adds nothing there
                hit += seconds_to_ns(self.overhead.get((device, str(op.kind)), 0.0) * self._requests(op))
            cache[key] = hit
        return hit

    def usage(self, op: Op) -> tuple[float, float]:
        """The roofline's usage, scaled down where the profile's time is longer (as the framework model scales
        it): an op that takes longer for the same bytes draws them at a lower rate. A measured DeepSeek-V2-Lite
        CPU expert at 64 tokens took 2.17 ms and had claimed the whole DRAM, while it draws 8 GB/s of it."""
        first, memory = self.fallback.usage(op)
        measured, roof = self.op_time_ns(op), self.fallback.op_time_ns(op)
        if measured > roof > 0:
            share = roof / measured
            return first * share, memory * share
        return first, memory
