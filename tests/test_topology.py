"""The machine as a topology: the one-GPU machine keeps its streams and groups; extra GPUs and peer links are
streams, pools and resource groups that the engine, the cost model and plan files handle without special cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim.api import simulate
from sim.cost import RooflineCostModel
from sim.engine import run_plan
from sim.errors import CapacityError, SimInputError
from sim.plan import STREAMS, OpKind, Payload, Phase, Plan, PlanBuilder
from sim.policies.expert_parallel import expert_blocks
from sim.specs import load_system
from sim.specs.catalog import build_system
from sim.topology import UnitKind, topology_of
from sim.workload import Workload

TWO_GPU = "2x-h100-sxm-nvlink-8480"


def _two_gpu_fields(**changes):
    base = {"gpu": "a100-80g-pcie", "cpu": "xeon-8452y", "link": "pcie4x16", "dram_bytes": 2**39,
            "gpu_reserved_bytes": 2**30, "dram_reserved_bytes": 2**34,
            "extra_gpus": [{"name": "gpu1", "gpu": "a100-80g-pcie", "link": "pcie4x16", "reserved_bytes": 2**30}]}
    return {**base, **changes}


def test_the_one_gpu_machine_keeps_its_streams_groups_and_pools(paper_system):
    topo = topology_of(paper_system)
    assert topo.stream_order() == tuple(str(s) for s in STREAMS)
    assert topo.group_sizes == {"gpu": 2, "host": 4}  # (SMs, HBM); (cores, DRAM, PCIe H2D, PCIe D2H)
    assert topo.pools == {"gpu": paper_system.gpu_usable_bytes, "cpu": paper_system.dram_usable_bytes}
    # the usage vectors the engine used before the topology: a copy fills its direction and host DRAM
    assert topo.unit_of("h2d_act").usage_vector((0.5, 0.25), 4) == (0.0, 0.25, 0.5, 0.0)
    assert topo.unit_of("d2h").usage_vector((0.5, 0.25), 4) == (0.0, 0.25, 0.0, 0.5)
    assert topo.unit_of("cpu_experts").usage_vector((1.0, 0.3), 4) == (1.0, 0.3, 0.0, 0.0)
    with pytest.raises(SimInputError, match="stream 'gpu1' does not exist on system a100-80g-8452y"):
        topo.unit_of("gpu1")


def test_a_second_gpu_is_a_stream_a_pool_and_a_group():
    system = load_system(TWO_GPU)
    topo = topology_of(system)
    assert system.gpu_names == ("gpu", "gpu1")
    assert {"gpu1", "h2d_gpu1", "d2h_gpu1", "p2p_gpu_gpu1", "p2p_gpu1_gpu"} <= set(topo.streams)
    assert topo.group_sizes["gpu1"] == 2 and topo.group_sizes["host"] == 6  # its host link draws host DRAM too
    assert topo.unit_of("gpu1").kind is UnitKind.GPU and topo.pools["gpu1"] == topo.pools["gpu"]
    peer = topo.unit_of("p2p_gpu_gpu1")
    assert peer.kind is UnitKind.LINK and peer.memory == -1 and (peer.spec.src, peer.spec.dst) == ("gpu", "gpu1")


@pytest.mark.parametrize("changes, message", [
    ({"extra_gpus": [{"name": "gpu", "gpu": "t4", "link": "pcie3x16", "reserved_bytes": 0}]}, "gpu1, gpu2"),
    ({"extra_gpus": [{"name": "gpu1", "gpu": "t4", "link": "pcie3x16", "reserved_bytes": 0}] * 2}, "unique"),
    ({"peer_links": [{"src": "gpu", "dst": "gpu7", "link": "pcie4x16"}]}, "must join two of its GPUs"),
    ({"peer_links": [{"src": "gpu", "dst": "\n", "link": "pcie4x16"}]}, r"'gpu' -> '\\n' must join"),  # one line
    ({"peer_links": [{"src": "gpu", "dst": "gpu1", "link": "pcie4x16"},
                     {"src": "gpu1", "dst": "gpu", "link": "pcie4x16"}]}, "two peer links join"),
    ({"peer_links": [{"src": "gpu", "dst": "gpu1"}]}, "missing field link"),
    ({"extra_gpus": "gpu1"}, "extra_gpus must be a list of mappings"),
    ({"extra_gpus": [{"name": "gpu1", "gpu": "t4", "link": "pcie3x16", "reserved_bytes": 2**40}]},
     "reserved_bytes must be in"),
])
def test_bad_multi_gpu_systems_are_one_line_errors(changes, message):
    with pytest.raises(SimInputError, match=message) as err:
        build_system("bad", _two_gpu_fields(**changes), "test system")
    assert "\n" not in str(err.value)


def _hand_plan(model, system, ops_spec, gen=2):
    b = PlanBuilder()
    for stream, kind, nbytes, flops in ops_spec:
        b.add(kind, stream, Phase.DECODE, 1, 0, tokens=4 if kind is not OpKind.COPY else 0, flops=flops,
              nbytes=nbytes, payload=Payload.ACTIVATIONS if kind is OpKind.COPY else Payload.NONE)
    return Plan("hand", {}, model, system, Workload.uniform(4, 1, gen), b.ops, {"gpu": {}, "cpu": {}})


def test_two_gpus_run_side_by_side_and_their_host_links_share_dram(tiny_model):
    system = load_system(TWO_GPU)
    cost = RooflineCostModel(system)
    alone = _hand_plan(tiny_model, system, [("gpu", OpKind.EXPERT, 10**9, 10**12)])
    both = _hand_plan(tiny_model, system, [("gpu", OpKind.EXPERT, 10**9, 10**12),
                                           ("gpu1", OpKind.EXPERT, 10**9, 10**12)])
    t_alone = run_plan(alone, cost).end_ns[0]
    rec = run_plan(both, cost)
    assert rec.end_ns.tolist() == [t_alone, t_alone]  # separate groups: no contention
    # two host links copying at once: each at its own link's rate while host DRAM has room for both
    nbytes = 10**9
    one = run_plan(_hand_plan(tiny_model, system, [("h2d", OpKind.COPY, nbytes, 0)]), cost).end_ns[0]
    two = run_plan(_hand_plan(tiny_model, system, [("h2d", OpKind.COPY, nbytes, 0),
                                                   ("h2d_gpu1", OpKind.COPY, nbytes, 0)]), cost)
    assert two.end_ns.tolist() == [one, one]
    dram_use = cost.usage(two_plan_op := _hand_plan(tiny_model, system, [("h2d_gpu1", OpKind.COPY, nbytes, 0)]).ops[0])
    assert dram_use[1] > 0 and two_plan_op.stream == "h2d_gpu1"
    # ... and a peer copy draws no host DRAM
    peer_op = _hand_plan(tiny_model, system, [("p2p_gpu_gpu1", OpKind.COPY, nbytes, 0)]).ops[0]
    assert cost.usage(peer_op) == (1.0, 0.0)
    peer = topology_of(system).unit_of("p2p_gpu_gpu1").spec
    assert cost.op_time_ns(peer_op) == int(np.ceil((nbytes / peer.achievable_bytes_per_s + peer.latency_s) * 1e9))
    # a peer link described faster than the GPUs' memory moves data no faster than the slower end's HBM (a topology
    # audit: a 1e16 B/s link copied 1 GiB in 2.1 us, 504 TB/s)
    link = system.peer_links[0]
    fast = dataclasses.replace(system, name="fast-peer", peer_links=(dataclasses.replace(link, link=dataclasses.replace(
        link.link, h2d_bytes_per_s=1e16, d2h_bytes_per_s=1e16)),))
    hbm = min(g.hbm_bytes_per_s * g.hbm_efficiency for g in (system.gpu, system.extra_gpus[0].gpu))
    fast_op = _hand_plan(tiny_model, fast, [("p2p_gpu_gpu1", OpKind.COPY, nbytes, 0)]).ops[0]
    assert RooflineCostModel(fast).op_time_ns(fast_op) == int(np.ceil((nbytes / hbm + link.link.latency_s) * 1e9))
    # ends of different speeds: the slower one's memory (a T4's 320 GB/s under the H100 link's 450 GB/s)
    t4 = load_system("gcp-t4-n1").gpu
    mixed = dataclasses.replace(system, name="h100-t4", extra_gpus=(dataclasses.replace(system.extra_gpus[0], gpu=t4),))
    slow = t4.hbm_bytes_per_s * t4.hbm_efficiency
    assert slow < link.link.h2d_bytes_per_s * link.link.h2d_efficiency
    mixed_op = _hand_plan(tiny_model, mixed, [("p2p_gpu_gpu1", OpKind.COPY, nbytes, 0)]).ops[0]
    assert RooflineCostModel(mixed).op_time_ns(mixed_op) == int(np.ceil((nbytes / slow + link.link.latency_s) * 1e9))


def test_a_plan_on_a_stream_the_system_lacks_is_refused(tiny_model, paper_system):
    plan = _hand_plan(tiny_model, paper_system, [("gpu1", OpKind.EXPERT, 10, 10)])
    with pytest.raises(SimInputError, match="stream 'gpu1' does not exist on system a100-80g-8452y"):
        plan.check()


def test_expert_parallel_uses_the_peer_link_or_stages_through_the_host(tiny_model, tmp_path):
    """The peer link when there is one; without it D2H then the other GPU's H2D (and back). Plans on a two-GPU
    system save and load (the extra GPU and peer link travel in the file's system spec)."""
    from sim.plan_io import load_plan, save_plan

    with_link = load_system(TWO_GPU)
    without = dataclasses.replace(with_link, name="no-peer", peer_links=())
    kw = dict(batch=6, prompt_len=5, gen_len=3, routing="uniform", keep_plan=True)
    linked = simulate(tiny_model, with_link, "expert-parallel", **kw)
    staged = simulate(tiny_model, without, "expert-parallel", **kw)
    streams = {op.stream for op in linked.plan.ops}
    assert {"gpu1", "p2p_gpu_gpu1", "p2p_gpu1_gpu"} <= streams and "d2h" not in streams
    assert {"gpu1", "d2h", "h2d_gpu1", "d2h_gpu1", "h2d_act"} <= {op.stream for op in staged.plan.ops}
    assert linked.total_s < staged.total_s  # NVLink beats two PCIe hops
    assert set(linked.static_memory) == {"gpu", "cpu", "gpu1"} and linked.busy_s["gpu1"] > 0
    path = tmp_path / "ep.parquet"
    save_plan(linked.plan, path)
    back = load_plan(path)
    assert [op.stream for op in back.ops] == [op.stream for op in linked.plan.ops]
    assert back.system == with_link


def test_expert_parallel_refuses_one_gpu_and_names_the_full_gpu(tiny_model, paper_system, mixtral):
    with pytest.raises(SimInputError, match="has one GPU"):
        simulate(tiny_model, paper_system, "expert-parallel", batch=2, prompt_len=2, gen_len=2)
    small = build_system("2x-t4", _two_gpu_fields(gpu="t4", extra_gpus=[
        {"name": "gpu1", "gpu": "t4", "link": "pcie3x16", "reserved_bytes": 2**30}]), "test")
    with pytest.raises(CapacityError, match=r"GPU \(t4\) for expert-parallel"):
        simulate(mixtral, small, "expert-parallel", batch=2, prompt_len=2, gen_len=2)


def test_expert_blocks_cover_every_expert_once():
    for experts, gpus in ((8, 2), (60, 4), (5, 3), (128, 8)):
        blocks = expert_blocks(experts, tuple(f"g{i}" for i in range(gpus)))
        assert np.array_equal(np.sort(np.concatenate(blocks)), np.arange(experts))
        assert max(b.size for b in blocks) - min(b.size for b in blocks) <= 1


def test_expert_parallel_memory_names_the_extra_gpu_and_counts_host_staging(tiny_model):
    """A full second GPU is named by its model; without a peer link the states are staged in host memory."""
    system = load_system(TWO_GPU)
    t4 = load_system("gcp-t4-n1").gpu
    small = dataclasses.replace(system, name="small-gpu1", extra_gpus=(
        dataclasses.replace(system.extra_gpus[0], gpu=dataclasses.replace(t4, hbm_bytes=2 * 2**30)),))
    kw = dict(batch=4, prompt_len=4, gen_len=2)
    from sim.specs import load_model

    with pytest.raises(CapacityError, match=r"GPU1 \(t4\) for expert-parallel"):
        simulate(load_model("mixtral-8x7b"), small, "expert-parallel", **kw)
    linked = simulate(tiny_model, system, "expert-parallel", **kw)
    staged = simulate(tiny_model, dataclasses.replace(system, name="no-peer", peer_links=()), "expert-parallel", **kw)
    assert linked.static_memory["cpu"] == {} and staged.static_memory["cpu"]["staging"] > 0
    assert set(linked.peak_bytes) == {"gpu", "cpu", "gpu1"} and linked.peak_bytes["gpu1"] > 0


@pytest.mark.parametrize("use_cuda", [False, pytest.param(True, marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA (a second GPU is folded onto the first)"))])
def test_the_executor_runs_a_two_gpu_plan(use_cuda):
    """Every stream of the two-GPU topology gets a device (GPU streams on the CPU without CUDA, labelled), and the
    numbers equal the sequential reference forward pass."""
    result = _execute_tiny(TWO_GPU, "expert-parallel", use_cuda)
    assert result.gpu_role_on_cpu is not use_cuda and {"gpu", "gpu1"} <= set(result.devices)
    real = __import__("torch").cuda.device_count() if use_cuda else 0
    assert result.gpus_shared is (use_cuda and real < 2)  # one real GPU: the peer copies never crossed a link


NDP_SYSTEM = "a100-80g-8452y-ndp8"


def test_a_near_memory_tier_is_a_unit_with_its_own_rates(tiny_model):
    """NDP ops are priced from the tier's spec and contend with neither the GPU nor the host's cores."""
    system = load_system(NDP_SYSTEM)
    topo = topology_of(system)
    unit = topo.unit_of("ndp")
    assert unit.kind is UnitKind.NDP and unit.group == "ndp" and unit.pool == "cpu"
    cost = RooflineCostModel(system)
    ndp = system.ndp
    op = _hand_plan(tiny_model, system, [("ndp", OpKind.EXPERT, 10**9, 10**9)]).ops[0]
    want = max(1e9 / ndp.flops_per_s, 1e9 / ndp.internal_bytes_per_s) + ndp.launch_s
    assert cost.op_time_ns(op) == int(np.ceil(want * 1e9))
    ops = {"ndp": ("ndp", OpKind.EXPERT, 10**9, 10**9), "cpu": ("cpu", OpKind.EXPERT, 10**9, 10**9),
           "gpu": ("gpu", OpKind.EXPERT, 10**9, 10**12)}
    alone = {name: run_plan(_hand_plan(tiny_model, system, [spec]), cost).end_ns[0] for name, spec in ops.items()}
    together = run_plan(_hand_plan(tiny_model, system, list(ops.values())), cost)
    assert together.end_ns.tolist() == list(alone.values())  # each as fast as alone, on all three sides


@pytest.mark.parametrize("changes, message", [
    ({"ndp": {"name": "x", "dimms": 0, "dimm_bytes": 2**30, "dimm_flops_per_s": 1e11,
              "dimm_internal_bytes_per_s": 1e11, "compute_efficiency": 1, "internal_efficiency": 1,
              "launch_s": 0}}, "dimms must be in"),
    ({"ndp": "hermes-ndp-dimm-x8", "dram_bytes": 2**37}, "more than its 128 GiB of DRAM"),
    ({"ndp": "no-such-tier"}, "unknown ndp preset"),
])
def test_bad_ndp_tiers_are_one_line_errors(changes, message):
    fields = {k: v for k, v in _two_gpu_fields(**changes).items() if k != "extra_gpus"}
    with pytest.raises(SimInputError, match=message):
        build_system("bad", fields, "test system")


def test_ndp_experts_decode_on_the_dimms_and_prefill_on_the_gpu(tiny_model, paper_system, mixtral):
    system = load_system(NDP_SYSTEM)
    r = simulate(tiny_model, system, "ndp-experts", batch=6, prompt_len=5, gen_len=3, keep_plan=True)
    where = {(op.phase, op.stream) for op in r.plan.ops if op.kind is OpKind.EXPERT}
    assert where == {(Phase.PREFILL, "gpu"), (Phase.DECODE, "ndp")}
    on_dimms = simulate(tiny_model, system, "ndp-experts", batch=6, prompt_len=5, gen_len=3,
                        policy_options={"prefill": "ndp"}, keep_plan=True)
    assert {op.stream for op in on_dimms.plan.ops if op.kind is OpKind.EXPERT} == {"ndp"}
    with pytest.raises(SimInputError, match="has no NDP tier"):
        simulate(tiny_model, paper_system, "ndp-experts", batch=2, prompt_len=2, gen_len=2)
    one_dimm = dataclasses.replace(system, name="one-dimm", ndp=dataclasses.replace(system.ndp, dimms=1))
    with pytest.raises(CapacityError, match=r"NDP \(hermes-ndp-dimm-x8\) for ndp-experts"):
        simulate(mixtral, one_dimm, "ndp-experts", batch=2, prompt_len=2, gen_len=2)
    with pytest.raises(SimInputError, match="prefill must be gpu or ndp"):
        simulate(tiny_model, system, "ndp-experts", batch=2, prompt_len=2, gen_len=2,
                 policy_options={"prefill": "cpu"})


def test_the_executor_emulates_the_ndp_tier_on_the_cpu_and_says_so():
    result = _execute_tiny(NDP_SYSTEM, "ndp-experts", False)
    assert result.ndp_emulated and result.devices["ndp"] == "cpu" and result.to_dict()["ndp_emulated"]


def _execute_tiny(system: str, policy: str, use_cuda: bool):
    """A tiny model's plan under `policy` on `system`, executed; its outputs must equal the reference forward."""
    from executor.reference import reference_forward
    from executor.run import execute_plan
    from executor.weights import random_weights
    from sim.specs import ModelSpec
    from traces import SynthConfig, generate_trace

    spec = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=97, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=48)
    prompts, gens = np.array([5, 3, 4]), np.array([3, 2, 3])
    trace = generate_trace(SynthConfig("tiny", 2, 4, 2, "uniform", 0.0, 0), prompts, gens)
    r = simulate(spec, load_system(system), policy, trace=trace, keep_plan=True)
    weights = random_weights(spec, seed=3)
    result = execute_plan(r.plan, weights, trace, use_cuda=use_cuda)
    want = reference_forward(weights, trace, Workload(prompts, gens))
    worst = max(float((result.outputs[k].float() - want[k].float()).norm() / want[k].float().norm()) for k in want)
    assert worst < 2e-2
    return result


def test_ndp_prefill_fetches_each_layer_once_for_every_micro_batch(tiny_model):
    """Prefill on the GPU runs layer by layer over its micro-batches: each MoE layer's experts cross PCIe once,
    every micro-batch's experts of that layer read them, and each fetch reuses the buffer of the fetch before
    last once every expert op that reads it has run (at most two layers' experts on the GPU, as
    `expert_buffers` reserves). Splitting the prompt into micro-batches moves no more bytes."""
    from sim.plan import Payload

    system = load_system(NDP_SYSTEM)
    kw = dict(batch=8, prompt_len=16, gen_len=2, keep_plan=True)
    r = simulate(tiny_model, system, "ndp-experts", policy_options={"prefill_tokens": "32"}, **kw)
    ops = r.plan.ops
    assert len(r.plan.micro_batches["prefill"]) == 4
    fetches = [op for op in ops if op.payload is Payload.EXPERT_WEIGHTS]
    assert [op.layer for op in fetches] == list(range(tiny_model.num_layers))
    readers = {f.id: [op.id for op in ops if op.kind is OpKind.EXPERT and f.id in op.deps] for f in fetches}
    for f in fetches:
        assert {ops[i].micro_batch for i in readers[f.id]} == {0, 1, 2, 3}
    for k in range(2, len(fetches)):  # waits for every expert op that read the buffer it overwrites
        assert set(readers[fetches[k - 2].id]) <= set(fetches[k].deps)
    whole = simulate(tiny_model, system, "ndp-experts", **kw)
    assert r.busy_s["h2d"] == pytest.approx(whole.busy_s["h2d"], rel=1e-6)
    assert r.plan.static_memory["gpu"]["hidden_states"] > 0 == whole.plan.static_memory["gpu"]["hidden_states"]


def test_every_stream_of_a_topology_gets_a_readable_track():
    from sim.timeline import track_name

    names = {s: track_name(s) for s in topology_of(load_system(TWO_GPU)).streams}
    names.update(ndp=track_name("ndp"))
    assert names["gpu"] == "GPU compute" and names["gpu1"] == "GPU1 compute"
    assert names["h2d_gpu1"] == "PCIe H2D gpu1" and names["p2p_gpu1_gpu"] == "peer gpu1 -> gpu"
    assert names["ndp"] == "NDP DIMMs compute" and len(set(names.values())) == len(names)


def test_the_executor_counts_the_gpus_a_plan_needs():
    """Two modelled GPUs on a machine with one real GPU share it, and their peer copies run within that device:
    the result says so (`gpus_shared`), counted from the plan's streams."""
    from executor.run import ExecutionResult, gpus_modelled
    from sim.api import simulate
    from sim.engine import ops_by_stream

    two = simulate("mixtral-8x7b", "2x-h100-sxm-nvlink-8480", "expert-parallel", batch=4, prompt_len=16, gen_len=2,
                   keep_plan=True).plan
    one = simulate("mixtral-8x7b", "a100-80g-8452y", "coxmoe", batch=4, prompt_len=16, gen_len=2, keep_plan=True).plan
    for plan, gpus in ((two, 2), (one, 1)):
        topo = topology_of(plan.system)
        assert gpus_modelled(topo, ops_by_stream(plan.ops, topo)) == gpus
    assert "gpus_shared" in ExecutionResult.__dataclass_fields__
