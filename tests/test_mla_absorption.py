"""MLA's up-projection (`kv_b`) belongs to attention, on the attention's device: absorbed into each query in
decode, decompressing each key in prefill. Its FLOPs leave OP0 and enter OP1; on a CPU they run at the GEMM rate
while the rest of attention runs at the vector rate; its weights are held where attention runs."""

from __future__ import annotations

import math

import pytest

from sim.api import resolve_model, resolve_routing, resolve_system, simulate_plan
from sim.cost import OpWork, RooflineCostModel
from sim.cost.roofline import seconds_to_ns
from sim.cost.work import absorb_flops
from sim.plan import Op, OpKind, Phase, Stream
from sim.policies import PlanContext, make_policy
from sim.policies.analytic import Analytic
from sim.policies.compose import cpu_static, gpu_static

DEEPSEEK = resolve_model("deepseek-v2-lite")
MIXTRAL = resolve_model("mixtral-8x7b")
SYSTEM = resolve_system("a100-80g-8452y")


def test_up_projection_params_are_mla_only():
    m = DEEPSEEK
    assert m.attention_up_params == m.kv_lora_rank * m.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)
    assert m.attention_up_params == 512 * 16 * 256  # DeepSeek-V2-Lite's kv_b_proj: 512 -> 16 x (128 + 128)
    assert MIXTRAL.attention_up_params == 0


@pytest.mark.parametrize("prefill", [False, True])
def test_the_up_projection_moves_from_qkv_to_attention(prefill):
    """OP0 + OP1 FLOPs per layer stay what they were when OP0 carried kv_b once per token (in prefill every key is
    a token of the prompt), and OP1 reads kv_b's weights once."""
    w, m = OpWork(DEEPSEEK), DEEPSEEK
    tokens, kv_attended = 96, 96 * 97 // 2 if prefill else 96 * 500
    kv_read = tokens if prefill else 96 * 500
    qkv, attn = w.qkv(tokens), w.attention(tokens, kv_attended, kv_read, prefill)
    up = m.attention_up_params
    assert qkv.flops == 2 * tokens * (m.qkv_params - up)
    assert attn.gemm_flops == 2 * up * (kv_read if prefill else tokens) == absorb_flops(m, tokens, kv_read, prefill)
    assert attn.flops == m.attention_flops(tokens, kv_attended, prefill) + attn.gemm_flops
    assert qkv.flops + attn.flops == 2 * tokens * m.qkv_params + m.attention_flops(tokens, kv_attended, prefill)
    gqa_w = OpWork(MIXTRAL)
    assert gqa_w.attention(tokens, kv_attended, kv_read, prefill).gemm_flops == 0
    assert attn.bytes == gqa_bytes(w, tokens, kv_read) + up * m.bytes_per_param


def gqa_bytes(w: OpWork, tokens: int, kv_read: int) -> int:
    m = w.m
    return kv_read * m.kv_bytes_per_token_layer + tokens * (m.qkv_out_width + m.attn_out_width) * m.bytes_per_param


def attention_op(stream: Stream, phase: Phase, tokens: int, kv_attended: int, kv_read: int) -> tuple[Op, object]:
    work = OpWork(DEEPSEEK).attention(tokens, kv_attended, kv_read, phase is Phase.PREFILL)
    op = Op(0, OpKind.ATTENTION, stream, phase, 1 if phase is Phase.DECODE else 0, 0, 0, tokens, work.flops,
            work.bytes, kv_tokens=kv_read)
    return op, work


def test_cpu_attention_runs_the_up_projection_at_the_gemm_rate():
    cm = RooflineCostModel(SYSTEM)
    cm.use_model(DEEPSEEK)
    op, work = attention_op(Stream.CPU, Phase.DECODE, 1024, 1024 * 129, 1024 * 129)
    cpu = cm.rates(Stream.CPU)
    assert cm.gemm_flops(op) == work.gemm_flops > 0
    compute, memory, fixed = cm.roofs(op.kind, op.stream, op.flops, op.bytes, cm.gemm_flops(op))
    expected = (op.flops - work.gemm_flops) / cpu.vector_flops + work.gemm_flops / cpu.flops
    assert compute == pytest.approx(expected, rel=1e-12)
    assert cpu.flops > cpu.vector_flops  # so the GEMM part costs less than at the vector rate
    assert cm.op_time_ns(op) == seconds_to_ns(max(compute, memory) + fixed)
    # the analytic estimate prices the same work the same way
    ctx = PlanContext(DEEPSEEK, SYSTEM, *resolve_routing(DEEPSEEK, 8, 16, 4, None, "uniform", 0)[:2])
    assert seconds_to_ns(Analytic(ctx).t(OpKind.ATTENTION, Stream.CPU, work)) == cm.op_time_ns(op)


def test_gpu_attention_prices_every_flop_alike():
    cm = RooflineCostModel(SYSTEM)
    cm.use_model(DEEPSEEK)
    op, work = attention_op(Stream.GPU, Phase.PREFILL, 800, 800 * 801 // 2, 800)
    assert cm.gemm_flops(op) == work.gemm_flops == 2 * DEEPSEEK.attention_up_params * 800
    with_part = cm.roofs(op.kind, op.stream, op.flops, op.bytes, work.gemm_flops)
    without = cm.roofs(op.kind, op.stream, op.flops, op.bytes)
    assert with_part == without


def test_a_cost_model_told_a_gqa_model_sees_no_gemm_part():
    cm = RooflineCostModel(SYSTEM)
    cm.use_model(DEEPSEEK)
    op, _ = attention_op(Stream.CPU, Phase.DECODE, 64, 64 * 100, 64 * 100)
    absorbed = cm.op_time_ns(op)
    cm.use_model(MIXTRAL)  # the cache is cleared: the same op is now priced as plain attention
    assert cm.gemm_flops(op) == 0
    assert cm.op_time_ns(op) > absorbed


def test_the_up_projection_weights_live_where_attention_runs():
    ctx = PlanContext(DEEPSEEK, SYSTEM, *resolve_routing(DEEPSEEK, 8, 16, 4, None, "uniform", 0)[:2])
    up = DEEPSEEK.num_layers * DEEPSEEK.attention_up_params * DEEPSEEK.bytes_per_param
    on_gpu = gpu_static(ctx, "ggg", "ggg", 8, 8, 0, 1)["non_expert_weights"]
    cpu_attention = gpu_static(ctx, "gcg", "gcg", 8, 8, 0, 1)["non_expert_weights"]
    assert on_gpu - cpu_attention == up
    assert cpu_static(ctx, "gcg", "gcg")["non_expert_weights"] == up
    assert "non_expert_weights" not in cpu_static(ctx, "ggg", "ggg")


def test_a_coxmoe_plan_with_cpu_attention_carries_the_up_projection_on_the_cpu():
    """Every attention op of a DeepSeek plan with attention on the CPU has the GEMM part the cost model derives
    from its tokens, and the plan simulates."""
    wl, trace, _ = resolve_routing(DEEPSEEK, 16, 32, 4, None, "uniform", 0)
    plan = make_policy("coxmoe", {"prefill_placement": "ggg", "decode_placement": "gcg"}).build(
        PlanContext(DEEPSEEK, SYSTEM, wl, trace))
    cm = RooflineCostModel(SYSTEM)
    cm.prepare(plan)
    attention = [op for op in plan.ops if op.kind is OpKind.ATTENTION]
    on_cpu = [op for op in attention if op.stream == Stream.CPU]
    assert on_cpu and all(op.phase is Phase.DECODE for op in on_cpu)
    for op in attention:
        prefill = op.phase is Phase.PREFILL
        assert cm.gemm_flops(op) == absorb_flops(DEEPSEEK, op.tokens, op.kv_tokens, prefill) > 0
    record, _ = simulate_plan(plan)
    assert math.isfinite(record.makespan_ns) and record.makespan_ns > 0


def test_an_mla_plan_file_from_before_the_move_is_refused(tmp_path):
    """A DeepSeek plan written before 2026-12-06 carries kv_b in its QKV ops; priced now, its attention would count
    none of it and put all its FLOPs at the GEMM rate (+13% on a CPU-attention plan). Its file lacks the flag."""
    import json

    import pyarrow.parquet as pq

    from sim.api import simulate
    from sim.errors import SimInputError
    from sim.plan_io import load_plan, save_plan

    plan = simulate(DEEPSEEK, SYSTEM, "coxmoe", batch=4, prompt_len=8, gen_len=2, keep_plan=True).plan
    path = save_plan(plan, tmp_path / "p.parquet")
    assert load_plan(path).ops == plan.ops
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"cox-moe-plan"])
    del meta["attention_up_in_attention"]
    old = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata({b"cox-moe-plan": json.dumps(meta).encode()}), old)
    with pytest.raises(SimInputError, match="an MLA plan written before 2026-12-06"):
        load_plan(old)


def test_moe_lightnings_analytic_cpu_attention_prices_the_up_projection_as_the_engine_does():
    from sim.policies.moe_lightning import hrm_layer_s

    wl, trace, _ = resolve_routing(DEEPSEEK, 1024, 97, 32, None, "uniform", 0)
    ctx = PlanContext(DEEPSEEK, SYSTEM, wl, trace)
    a = Analytic(ctx)
    ubs = 128
    kv = int(ubs * (wl.prompt_lens.mean() + wl.gen_lens.mean()))
    work = OpWork(DEEPSEEK).attention(ubs, kv, kv)
    per_ub = a.t(OpKind.ATTENTION, Stream.CPU, work) - a.cm.rates(Stream.CPU).attention_overhead
    n_ub = -(-1024 // ubs)
    assert hrm_layer_s(ctx, a, ubs, 0)["cpu"] == pytest.approx(n_ub * per_ub, rel=1e-9)
