"""Every policy's plan, executed op by op on real tensors, equals the plain sequential forward pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from executor.interpret import PlanInterpreter
from executor.reference import reference_forward
from executor.weights import random_weights, truncated
from sim.plan import OpKind, ungroup
from sim.policies import PlanContext, make_policy
from sim.specs import load_model
from sim.topology import UnitKind, topology_of
from sim.workload import Workload
from traces import SynthConfig, generate_trace

CASES = [
    ("gpu-only", {"prefill_tokens": "10", "decode_micro_batch": "2"}),
    ("stream-experts", {"attention": "cpu", "decode_micro_batch": "3"}),
    ("coxmoe", {}),
    ("coxmoe", {"coalesce": "off", "prefill_micro_batch": "2", "decode_micro_batch": "2"}),
    ("coxmoe", {"prefill_placement": "cgc", "decode_placement": "gcg", "resident_experts": "1", "split": "auto",
                "prefill_micro_batch": "3", "decode_micro_batch": "0"}),
    ("moe-lightning", {"micro_batch": "2", "wg": "0.25"}),
    ("flexgen", {"gpu_batch_size": "2", "weights_gpu_percent": "50", "kv_gpu_percent": "50", "act_gpu_percent": "0"}),
    ("fiddler", {"attention": "cpu", "resident_experts": "2"}),
    ("fiddler", {"resident_experts": "0", "cpu_max_tokens": "100000", "cpu_moe": "fused"}),  # KTransformers' call
    ("moe-gen", {"resident_experts": "1", "prefill_micro_batch": "2", "decode_micro_batch": "2"}),
    ("coxmoe", {"decode_placement": "ggg", "decode_micro_batch": "2", "attention_split": "0.5"}),
    ("cpu-only", {"coalesce": "off", "decode_micro_batch": "2", "prefill_tokens": "9"}),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny_specs():
    from sim.specs import ModelSpec

    gqa = ModelSpec(name="tiny", num_layers=3, hidden_size=64, vocab_size=97, num_attention_heads=4, num_kv_heads=2,
                    head_dim=16, num_experts=6, top_k=2, expert_intermediate_size=96)
    mla = ModelSpec(name="tiny-mla", num_layers=3, hidden_size=64, vocab_size=97, num_attention_heads=4,
                    num_kv_heads=4, head_dim=24, num_experts=8, top_k=3, expert_intermediate_size=32, attention="mla",
                    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                    shared_expert_intermediate_size=48, shared_expert_gate=True, first_dense_layers=1,
                    dense_intermediate_size=80)
    # a latent wider than the nope head (as DeepSeek's 512 against 128), so absorbed decode's scale is not the
    # default one of its wider query
    wide = dataclasses.replace(mla, name="tiny-mla-wide", kv_lora_rank=40)
    return {"gqa": gqa, "mla": mla, "mla-wide": wide}


@pytest.mark.parametrize("policy, opts", CASES)
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_executed_plan_matches_the_reference(tiny_specs, paper_system, policy, opts, kind):
    spec = tiny_specs[kind]
    prompts, gens = np.array([5, 3, 7, 4, 6]), np.array([3, 1, 3, 2, 3])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "zipf:1.0",
                                       0.2, 1), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy(policy, opts).build(PlanContext(spec, paper_system, workload, trace))
    weights = random_weights(spec, seed=3)
    got = PlanInterpreter(plan, weights, trace).run()
    want = reference_forward(weights, trace, workload)
    assert got.keys() == want.keys()
    worst = max(rel_err(got[k], want[k]) for k in want)
    assert worst < 2e-2, f"{policy} {opts}: relative error {worst:.2e}"


def test_the_check_notices_a_wrong_plan(tiny_specs, paper_system):
    spec = tiny_specs["gqa"]
    prompts, gens = np.array([4, 4]), np.array([2, 2])
    trace = generate_trace(SynthConfig("tiny", 3, 6, 2, "uniform", 0.0, 0), prompts, gens)
    plan = make_policy("gpu-only", {}).build(PlanContext(spec, paper_system, Workload(prompts, gens), trace))
    weights = random_weights(spec, seed=3)
    plan = ungroup(plan)  # one op per expert (a group's members: tests/test_grouped_experts.py)
    first_expert = next(op for op in plan.ops if op.kind.value == "expert")
    first_expert.tokens += 1
    with pytest.raises(ValueError, match="trace routes"):
        PlanInterpreter(plan, weights, trace).run()


def test_truncated_real_model_shapes():
    spec = truncated(load_model("deepseek-v2-lite"), 2)
    assert spec.num_layers == 2 and spec.first_dense_layers == 1 and spec.num_moe_layers == 1
    assert truncated(load_model("mixtral-8x7b"), 1).num_moe_layers == 1
    with pytest.raises(ValueError, match="first 1 layers are dense"):
        truncated(load_model("deepseek-v2-lite"), 1)
    with pytest.raises(ValueError):
        truncated(load_model("mixtral-8x7b"), 0)


@pytest.mark.parametrize("policy, opts", [("cpu-only", {"decode_micro_batch": "2"}), ("coxmoe", {}),
                                          ("moe-lightning", {"micro_batch": "2", "wg": "0.5"}),
                                          ("flexgen", {"gpu_batch_size": "2", "weights_gpu_percent": "50",
                                                       "kv_gpu_percent": "50", "act_gpu_percent": "0"}),
                                          # a KV cache streamed to GPU attention, split with the CPU (MoE-Gen's
                                          # hybrid): the copies run as timed byte copies in their dependency order
                                          ("moe-gen", {"attn_mode": "2", "decode_micro_batch": "1",
                                                       "coalesce": "decode", "prefill_micro_batch": "2"}),
                                          ("coxmoe", {"decode_placement": "ggg", "decode_micro_batch": "1",
                                                      "kv_cache": "cpu"})])
def test_timed_execution_matches_the_reference_and_records_every_op(tiny_specs, paper_system, policy, opts):
    from executor.run import execute_plan

    spec = tiny_specs["mla"]
    prompts, gens = np.array([5, 3, 6, 4]), np.array([3, 2, 3, 3])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "zipf:1.0",
                                       0.0, 2), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy(policy, opts).build(PlanContext(spec, paper_system, workload, trace))
    weights = random_weights(spec, seed=5)
    result = execute_plan(plan, weights, trace, use_cuda=False)
    want = reference_forward(weights, trace, workload)
    assert max(rel_err(result.outputs[k], want[k]) for k in want) < 2e-2
    rec = result.record
    assert (rec.start_ns >= 0).all()
    worked = np.array([op.flops > 0 or op.bytes > 0 for op in plan.ops])
    assert worked.any() and (rec.end_ns[worked] > rec.start_ns[worked]).all()  # every op with work was timed
    assert (rec.end_ns >= rec.start_ns).all()
    last_end: dict[str, int] = {}
    for op in plan.ops:  # measured times respect the plan's dependencies and stream order
        for d in op.deps:
            assert rec.start_ns[op.id] >= rec.end_ns[d]
        assert rec.start_ns[op.id] >= last_end.get(op.stream, 0), f"op {op.id} overlaps the one before on {op.stream}"
        last_end[op.stream] = int(rec.end_ns[op.id])
    assert result.gpu_role_on_cpu == (policy != "cpu-only")
    assert set(result.devices.values()) == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy, opts", [c for c in CASES if c[0] != "cpu-only"])
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_cuda_execution_matches_the_reference(tiny_specs, paper_system, policy, opts, kind):
    """Every policy's plan, timed on CUDA streams (copies on their own, CPU ops beside them), computes the reference's
    numbers, and each op's measured interval respects its dependencies."""
    from executor.run import execute_plan

    spec = tiny_specs[kind]
    prompts, gens = np.array([5, 3, 6, 4]), np.array([3, 2, 3, 3])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "zipf:1.0",
                                       0.0, 2), prompts, gens)
    workload = Workload(prompts, gens)
    plan = make_policy(policy, opts).build(PlanContext(spec, paper_system, workload, trace))
    weights = random_weights(spec, seed=5)
    result = execute_plan(plan, weights, trace, use_cuda=True)
    want = reference_forward(weights, trace, workload)
    worst = max(rel_err(result.outputs[k], want[k]) for k in want)
    assert worst < 3e-2, f"{policy} {opts}: relative error {worst:.2e}"
    assert not result.gpu_role_on_cpu and any(d.startswith("cuda") for d in result.devices.values())
    rec = result.record
    streams = topology_of(plan.system).streams
    host_timed = {s for s, unit in streams.items() if unit.kind is UnitKind.CPU}  # the rest: CUDA events
    for op in plan.ops:
        for d in op.deps:
            # CUDA event times reach the host clock through one reading per run, so a dependency across the
            # host/GPU boundary gets a tolerance for the two clocks' drift over the run (same side: exact)
            across = (str(op.stream) in host_timed) != (str(plan.ops[d].stream) in host_timed)
            assert rec.start_ns[op.id] >= rec.end_ns[d] - (CLOCK_TOLERANCE_NS if across else 0), \
                f"{policy}: op {op.id} started before its dep {d} ended"


CLOCK_TOLERANCE_NS = 200_000  # 200 us: host/GPU clock drift over a run of a few seconds, well under an op


def test_weights_move_without_sharing_or_copying_through_the_host(tiny_specs):
    w = random_weights(tiny_specs["mla"], seed=1)
    moved = w.to("cpu")
    assert torch.equal(moved.layers[1].w1, w.layers[1].w1) and moved.layers[0].dense.keys() == w.layers[0].dense.keys()
    assert moved.layers[1].shared["gate"].shape == w.layers[1].shared["gate"].shape


def test_a_host_side_staging_copy_is_timed_as_a_real_copy(tiny_specs, paper_system):
    """MoE-Lightning pages expert weights into pinned memory on the CPU expert stream: the executor copies those
    bytes between host buffers (on any machine), so the copy takes measured time rather than none."""
    from executor.run import execute_plan
    from sim.plan import OpKind
    from sim.topology import UnitKind, topology_of

    spec = tiny_specs["gqa"]
    prompts, gens = np.array([5, 3, 6, 4]), np.array([3, 2, 3, 3])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "uniform",
                                       0.0, 2), prompts, gens)
    plan = make_policy("moe-lightning", {"micro_batch": "2", "wg": "0.5"}).build(
        PlanContext(spec, paper_system, Workload(prompts, gens), trace))
    topo = topology_of(plan.system)
    staging = [op.id for op in plan.ops if op.kind is OpKind.COPY and topo.streams[op.stream].kind is UnitKind.CPU]
    assert staging, "the plan pages expert weights on a CPU stream"
    for i in staging:  # 64 MiB each: a real copy takes >= 0.16 ms even at 400 GB/s; a skipped one microseconds
        plan.ops[i].bytes = 64 * 2**20
    rec = execute_plan(plan, random_weights(spec, seed=5), trace, use_cuda=False).record
    assert min(rec.end_ns[i] - rec.start_ns[i] for i in staging) >= 64 * 2**20 / 400e9 * 1e9


def test_cuda_execution_refuses_a_streamed_kv_cache(tiny_specs, paper_system):
    """The executor keeps the KV cache where attention runs, so a plan that streams it from host memory to GPU
    attention would hold the whole cache in VRAM on CUDA: one line, before any device is touched."""
    from executor.run import execute_plan
    from sim.errors import SimInputError

    spec = tiny_specs["gqa"]
    prompts, gens = np.array([5, 3]), np.array([3, 2])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "uniform",
                                       0.0, 0), prompts, gens)
    plan = make_policy("coxmoe", {"decode_placement": "ggg", "kv_cache": "cpu"}).build(
        PlanContext(spec, paper_system, Workload(prompts, gens), trace))
    with pytest.raises(SimInputError, match="runs on the CPU only"):
        execute_plan(plan, random_weights(spec, seed=5), trace, use_cuda=True)


def test_a_failed_op_stops_every_stream(tiny_specs, paper_system, monkeypatch):
    """After one stream's op raises, the other streams ran their remaining ops (12-13 of them here) before the
    error surfaced; now each stops at its next op, and the first error is what the caller sees."""
    from executor.run import execute_plan

    spec = tiny_specs["mla"]
    prompts, gens = np.array([5, 3, 7, 4, 6]), np.array([3, 1, 3, 2, 3])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k, "uniform",
                                       0.0, 2), prompts, gens)
    plan = make_policy("moe-lightning", {}).build(PlanContext(spec, paper_system, Workload(prompts, gens), trace))
    failing = next(op.id for op in plan.ops if op.stream == "cpu" and op.kind.value == "attention")
    original, after = PlanInterpreter.step, []

    def step(self, op):
        if op.id == failing:
            after.append("failed")
            raise RuntimeError("injected")
        if after:
            after.append(op.id)
        return original(self, op)

    monkeypatch.setattr(PlanInterpreter, "step", step)
    with pytest.raises(RuntimeError, match="injected"):
        execute_plan(plan, random_weights(spec, seed=3), trace, use_cuda=False)
    assert len(after) <= 1 + len({op.stream for op in plan.ops})  # at most an op already running per stream


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_attention_in_chunks_of_query_rows_equals_one_call(tiny_specs, kind, monkeypatch):
    """A long prompt's attention runs in chunks of query rows (its scores were one heads x L x L array): each
    row's softmax is its own, so the result is the one-call result."""
    import executor.kernels as K

    spec = tiny_specs[kind]
    lw = random_weights(spec, seed=5).layers[-1]
    x = torch.randn(37, spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    positions = torch.arange(37)

    def run() -> torch.Tensor:
        cache = K.KVCache(spec, 40, torch.bfloat16)
        return K.attention(spec, lw, K.qkv(spec, lw, x, positions), cache, 0, 0)

    whole = run()
    monkeypatch.setattr(K, "ATTENTION_SCORES_BYTES", 4 * spec.num_attention_heads * 37 * 5)  # 5 rows a call
    assert torch.allclose(run().float(), whole.float(), rtol=1e-2, atol=1e-3)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out in fp32, each query [T, heads, d] the cache's last T positions."""
    rows, keys, n = q.shape[0], k.shape[0], q.shape[1]
    k = k.float().repeat_interleave(n // k.shape[1], dim=1)
    v = v.float().repeat_interleave(n // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / q.shape[-1] ** 0.5
    visible = torch.arange(keys)[None, :] <= (keys - rows + torch.arange(rows))[:, None]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v).reshape(rows, -1)


def _unit_tokens(spec, rows: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """What OP0 hands OP1 for `rows` tokens, drawn at unit scale (OP0's norm and small random weights give scores
    so near zero that softmax is almost flat and a wrong scale or mask barely shows)."""
    n = spec.num_attention_heads
    if spec.attention == "mla":
        shapes = {"q": (rows, n, spec.qk_nope_head_dim + spec.qk_rope_head_dim), "c": (rows, spec.kv_lora_rank),
                  "k_rope": (rows, spec.qk_rope_head_dim)}
    else:
        shapes = {"q": (rows, n, spec.head_dim), "k": (rows, spec.num_kv_heads, spec.head_dim),
                  "v": (rows, spec.num_kv_heads, spec.head_dim)}
    return {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in shapes.items()}


@pytest.mark.parametrize("kind", ["gqa", "mla", "mla-wide"])
@pytest.mark.parametrize("chunk_rows", [None, 5, 1])
def test_attention_equals_softmax_attention_written_out(tiny_specs, kind, chunk_rows, monkeypatch):
    """OP1 (whole prompts, a prompt continued over a cache, one decode query; in one call or chunks of query
    rows) equals causal softmax attention written out in fp32, grouped K/V heads repeated, MLA's keys
    decompressed from the latent: the fused kernel's 4-D call, its padded MLA values and its masks change
    nothing but speed."""
    import executor.kernels as K

    spec = tiny_specs[kind]
    if chunk_rows:
        monkeypatch.setattr(K, "ATTENTION_SCORES_BYTES", 4 * spec.num_attention_heads * 40 * chunk_rows)
    lw = random_weights(spec, seed=5).layers[-1]
    gen = torch.Generator().manual_seed(2)
    cache = K.KVCache(spec, 40, torch.bfloat16)
    done = 0
    for rows in (17, 9, 1):  # a prompt, its continuation, a decode step
        new = _unit_tokens(spec, rows, gen)
        got = K.attention(spec, lw, new, cache, 0, 0)
        done += rows
        if spec.attention == "mla":
            latent, k_rope = (buf[:done] for buf in cache.store[(0, 0)])
            nope = spec.qk_nope_head_dim
            kv = (latent @ lw.attn["wkv_b"].T).view(done, spec.num_attention_heads, -1)
            k = torch.cat([kv[..., :nope], k_rope[:, None, :].expand(-1, spec.num_attention_heads, -1)], dim=-1)
            v = kv[..., nope:]
        else:
            k, v = (buf[:done] for buf in cache.store[(0, 0)])
        want = _explicit_attention(new["q"], k, v)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-2, (rows, rel_err(got, want))


@pytest.mark.parametrize("kind", ["gqa", "mla", "mla-wide"])
def test_cpu_attention_runs_the_fused_kernel(tiny_specs, kind):
    """torch runs its fused (flash) CPU attention only on 4-D inputs of equal key and value widths; the executor's
    3-D call ran the unfused math kernel, 4-15x slower on an AMX Xeon VM at 256-1024 prompt tokens
    (docs/cost-model.md). A prompt and a decode step each reach the fused kernel, never the math one."""
    from torch.profiler import profile

    import executor.kernels as K

    spec = tiny_specs[kind]
    lw = random_weights(spec, seed=5).layers[-1]
    cache = K.KVCache(spec, 40, torch.bfloat16)
    with profile() as prof:
        for start, rows in ((0, 12), (12, 1)):
            positions = torch.arange(start, start + rows)
            x = torch.randn(rows, spec.hidden_size, generator=torch.Generator().manual_seed(start))
            K.attention(spec, lw, K.qkv(spec, lw, x.to(torch.bfloat16), positions), cache, 0, 0)
    calls = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    assert calls.count("aten::_scaled_dot_product_flash_attention_for_cpu") == 2, calls
    assert "aten::_scaled_dot_product_attention_math" not in calls


def test_a_run_whose_kv_cache_and_scores_exceed_the_limit_is_refused(tiny_specs, monkeypatch):
    from executor.kernels import check_run_memory
    from traces.limits import LIMIT_ENV, ResourceLimitError

    monkeypatch.setenv(LIMIT_ENV, "0.5")
    spec = tiny_specs["gqa"]
    check_run_memory(spec, Workload(np.array([2000]), np.array([2])), torch.bfloat16, "a run")
    with pytest.raises(ResourceLimitError, match="a KV cache of 1 x 12002 tokens x 3 layers"):
        check_run_memory(spec, Workload(np.array([12000]), np.array([2])), torch.bfloat16, "a run")


def test_cuda_op_times_keep_microseconds_late_in_a_long_run(monkeypatch):
    """CUDA reports event intervals as single-precision milliseconds: an op 600 s after the run's base event read
    its start and end from that base in 31 us steps, so a 20 us decode op measured 0 or 31 us. Its duration now
    comes from its own two events. (Fake events with float32 arithmetic: this runs without a GPU.)"""
    import numpy as np
    import torch

    from executor.run import _CudaTimer

    class FakeEvent:
        def __init__(self, t_s: float) -> None:
            self.t_s = t_s

        def elapsed_time(self, other: FakeEvent) -> float:
            return float(np.float32((other.t_s - self.t_s) * 1e3))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    timer = object.__new__(_CudaTimer)
    timer.base = {"cuda:0": (FakeEvent(0.0), 1_000)}
    timer.pairs = {0: ("cuda:0", FakeEvent(600.0000013), FakeEvent(600.0000213)),
                   1: ("cuda:0", FakeEvent(0.001), FakeEvent(0.0010075))}
    start, end = np.zeros(2, np.int64), np.zeros(2, np.int64)
    timer.resolve(start, end, t0=1_000)
    assert end[0] - start[0] == 20_000  # 20 us, to the nanosecond
    assert abs(start[0] - 600_000_001_300) <= 40_000  # the start keeps the base's coarser step
    assert end[1] - start[1] == 7_500 and abs(start[1] - 1_000_000) <= 1


def test_a_padded_dense_ffn_plan_runs_and_matches_the_reference():
    """FlexGen's one-expert FFN counts padded prompt positions (the simulator prices them); the executor computes
    the real tokens and accepts the padding (it had refused the plan: 'runs expert 0 on 14 tokens; the trace routes
    8', found by a review)."""
    from sim.plan_verify import verify_assignments
    from sim.specs import ModelSpec, load_system

    spec = ModelSpec(name="tiny-dense", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=1, top_k=1, expert_intermediate_size=96)
    prompts, gens = np.array([5, 3, 7, 4]), np.array([3, 1, 3, 2])
    trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, 1, 1, "uniform", 0.0, 1), prompts, gens)
    wl = Workload(prompts, gens)
    plan = make_policy("flexgen", {"gpu_batch_size": "2", "weights_gpu_percent": "50", "kv_gpu_percent": "50",
                                   "act_gpu_percent": "0"}).build(
        PlanContext(spec, load_system("rtx6000ada-8452y"), wl, trace))
    assert any(op.tokens > 8 for op in plan.ops if op.kind is OpKind.EXPERT)  # padded: 2 requests x 7 positions
    verify_assignments(plan, trace)
    weights = random_weights(spec, seed=3)
    got = PlanInterpreter(plan, weights, trace).run()
    want = reference_forward(weights, trace, wl)
    for key in want:
        assert torch.equal(got[key], want[key])


def test_absorbed_decode_splits_the_up_projection_once_per_layer_weights(tiny_specs):
    """MLA decode multiplies by the up-projection's two halves, made contiguous once per layer weights (strided
    halves copied 4 MB a call on DeepSeek-V2-Lite); a copy of the weights on a device starts without them."""
    import executor.kernels as K

    spec = tiny_specs["mla"]
    mw = random_weights(spec, seed=5)
    lw = mw.layers[-1]
    key_up, value_up = K.absorbed_up(spec, lw)
    n, nope, vd, rank = (spec.num_attention_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank)
    assert key_up.shape == (n, nope, rank) and value_up.shape == (n, rank, vd)
    assert key_up.is_contiguous() and value_up.is_contiguous()
    up = lw.attn["wkv_b"].view(n, nope + vd, rank)
    assert torch.equal(key_up, up[:, :nope]) and torch.equal(value_up, up[:, nope:].transpose(1, 2))
    assert K.absorbed_up(spec, lw)[0] is key_up  # made once
    assert mw.to("cpu").layers[-1].absorbed_up is None
