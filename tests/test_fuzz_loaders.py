"""Property-based fuzzing of every loader (issue 11): valid inputs load, broken ones raise the loader's one typed
error (`SimInputError` / `TraceError`), nothing else escapes. Inputs are valid documents with random mutations
(a field deleted, renamed, or set to a value of another type, a non-finite number, a huge or negative number),
so most examples reach deep into each loader instead of failing at the first byte."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.engine import run_plan
from sim.errors import SimInputError
from sim.specs import CPUSpec, GPUSpec, LinkSpec, ModelSpec, show_preset
from sim.specs.catalog import build_system
from sim.specs.hf_config import model_from_hf_config
from sim.specs.schema import validate_spec
from traces import SynthConfig, generate_trace
from traces.errors import TraceError

FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
# The plan loader is fuzzed by two tests (metadata and columns), each with half of its 1,000 inputs.
HALF = settings(FAST, max_examples=500)

# Values of every kind a document might hold by mistake.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["4096", "65e12", ".inf", "nan", "-1", "1e400", "per-head", "gqa", "mla", ""]),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3), st.dictionaries(st.text(max_size=4),
                                                                                  st.integers(), max_size=2),
)


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with one to three mutations: a key set to an odd value, deleted, or a stray key added."""
    doc = dict(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["set", "set", "delete", "add"]))
        keys = sorted(doc)
        if action == "set" and keys:
            doc[draw(st.sampled_from(keys))] = draw(ODD_VALUES)
        elif action == "delete" and keys:
            doc.pop(draw(st.sampled_from(keys)))
        else:
            doc[draw(st.text(min_size=1, max_size=10))] = draw(ODD_VALUES)
    return doc


def _preset_dict(name: str) -> dict:
    return yaml.safe_load(show_preset(name))


MODEL = _preset_dict("deepseek-v2-lite")
SYSTEM = _preset_dict("a100-80g-8452y")
TWO_GPU_SYSTEM = _preset_dict("2x-h100-sxm-nvlink-8480")
NDP_SYSTEM = _preset_dict("a100-80g-8452y-ndp8")
COMPONENTS = {GPUSpec: _preset_dict("a100-80g-pcie"), CPUSpec: _preset_dict("xeon-8452y"),
              LinkSpec: _preset_dict("pcie4x16")}


@FAST
@given(mutated(MODEL))
def test_model_specs(doc):
    try:
        spec = validate_spec(ModelSpec, doc, "fuzz")
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    assert spec.total_params > 0 and spec.top_k <= spec.num_experts


@FAST
@given(st.sampled_from(["gpu", "cpu", "link", None]), st.data())
def test_system_specs(part, data):
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in SYSTEM.items()}
    if part is None:
        doc = data.draw(mutated(doc))
    else:
        doc[part] = data.draw(mutated(doc[part]))
    try:
        system = build_system("fuzz", doc, "fuzz")
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    for value in (system.gpu.bf16_flops_per_s, system.cpu.dram_bytes_per_s, system.link.h2d_bytes_per_s):
        assert math.isfinite(value) and value > 0


@FAST
@given(st.sampled_from(["extra_gpus", "peer_links", None]), st.data())
def test_multi_gpu_system_specs(part, data):
    """The two-GPU preset with its extra GPU or peer link entry (or the top level) mutated: one-line errors, or
    a system whose topology builds."""
    from sim.topology import topology_of

    doc = {k: [dict(e) for e in v] if isinstance(v, list) else v for k, v in TWO_GPU_SYSTEM.items()}
    if part is None:
        doc = data.draw(mutated(doc))
    else:
        doc[part][0] = data.draw(mutated(doc[part][0]))
    try:
        system = build_system("fuzz", doc, "fuzz")
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    topo = topology_of(system)
    assert all(capacity > 0 for capacity in topo.pools.values()) and set(system.gpu_names) <= set(topo.pools)


DISK_SYSTEM = _preset_dict("gcp-t4-n1-208g")


def _ndp_ok(system) -> bool:
    return math.isfinite(system.ndp.flops_per_s) and system.ndp.internal_bytes_per_s > 0


def _disk_ok(system) -> bool:
    from sim.topology import topology_of

    disk = system.disk
    return (math.isfinite(disk.read_bytes_per_s) and disk.read_bytes_per_s > 0 and disk.capacity_bytes > 0
            and topology_of(system).pools["disk"] == disk.capacity_bytes)


@FAST
@given(st.sampled_from([("ndp", NDP_SYSTEM, _ndp_ok), ("disk", DISK_SYSTEM, _disk_ok)]), st.data())
def test_tier_system_specs(case, data):
    """An NDP tier's or a disk's mapping mutated: one-line errors, or a tier whose rates (and capacity) are finite
    and positive (a disk's topology then has its pool)."""
    section, preset, ok = case
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in preset.items()}
    doc[section] = data.draw(mutated(doc[section]))
    try:
        system = build_system("fuzz", doc, "fuzz")
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    assert ok(system)


@FAST
@given(st.sampled_from([GPUSpec, CPUSpec, LinkSpec]), st.data())
def test_component_specs(cls, data):
    doc = data.draw(mutated(COMPONENTS[cls]))
    try:
        spec = validate_spec(cls, doc, "fuzz")
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    assert all(not isinstance(v, float) or math.isfinite(v) for v in dataclasses.asdict(spec).values())


HF = {
    "mixtral": {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "intermediate_size": 14336},
    "deepseek_v2": {"model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27, "vocab_size": 102400,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
                    "n_shared_experts": 2, "num_experts_per_tok": 6, "moe_intermediate_size": 1408,
                    "intermediate_size": 10944, "first_k_dense_replace": 1},
    "dbrx": {"model_type": "dbrx", "d_model": 6144, "n_layers": 40, "n_heads": 48, "vocab_size": 100352,
             "attn_config": {"kv_n_heads": 8}, "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4,
                                                               "ffn_hidden_size": 10752}},
    "opt": {"model_type": "opt", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 50272,
            "num_attention_heads": 32, "ffn_dim": 16384, "max_position_embeddings": 2048},
}


@FAST
@given(st.sampled_from(sorted(HF)), st.data())
def test_hf_configs(family, data):
    doc = data.draw(mutated(HF[family]))
    try:
        spec = model_from_hf_config(doc)
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    assert spec.total_params > 0


QUANT_CONFIGS = [{"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]},
                 {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
                 {"quant_method": "awq", "bits": 4, "group_size": -1, "modules_to_not_convert": ["gate"]},
                 {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                      "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}]


@FAST
@given(st.sampled_from(sorted(HF)), st.sampled_from(range(len(QUANT_CONFIGS))), st.data())
def test_hf_quantization_configs(family, which, data):
    """A damaged quantization_config is one line or a spec whose stored sizes are finite and in range."""
    doc = {**HF[family], "quantization_config": data.draw(mutated(QUANT_CONFIGS[which]))}
    try:
        spec = model_from_hf_config(doc)
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    for bits in (spec.weight_bits_per_param, spec.expert_bits_per_param):
        assert 1 <= bits <= 32
    assert spec.weight_bytes < spec.total_params * 4


# ---- traces and imports -------------------------------------------------------------------------------------
def _trace_bytes(prompt_counts: bool = False) -> bytes:
    trace = generate_trace(SynthConfig("m", 2, 8, 2), np.full(3, 4), np.full(3, 3), prompt_counts=prompt_counts)
    buf = io.BytesIO()
    extra = {"prompt_counts": trace.prompt_counts} if prompt_counts else {}
    np.savez(buf, header=np.frombuffer(json.dumps(trace.header.to_json()).encode(), np.uint8),
             prompt_lens=trace.prompt_lens, gen_lens=trace.gen_lens, experts=trace.experts, **extra)
    return buf.getvalue()


TRACE_BYTES = _trace_bytes()
COUNTED_TRACE_BYTES = _trace_bytes(prompt_counts=True)  # prompts as per-request counts (the simulator's form)


def _damage(data: bytes):
    """Up to six byte overwrites and, in one example in eight, a truncation point (0: none) of `data`: mostly
    the archive's own checks (a cut loses the zip directory, a flip fails a member's CRC), which the member
    fuzzing below (`test_trace_members`) goes past."""
    return (st.lists(st.tuples(st.integers(min_value=0, max_value=len(data) - 1),
                               st.integers(min_value=0, max_value=255)), max_size=6),
            st.one_of(st.just(0), st.just(0), st.just(0), st.just(0), st.just(0), st.just(0), st.just(0),
                      st.integers(min_value=1, max_value=len(data))))


@FAST
@given(*_damage(TRACE_BYTES))
def test_trace_files(tmp_path_factory, flips, cut):
    _fuzz_trace(tmp_path_factory, TRACE_BYTES, flips, cut)


@FAST
@given(*_damage(COUNTED_TRACE_BYTES))
def test_trace_files_with_prompt_counts(tmp_path_factory, flips, cut):
    _fuzz_trace(tmp_path_factory, COUNTED_TRACE_BYTES, flips, cut)


def _trace_members(prompt_counts: bool) -> dict:
    trace = generate_trace(SynthConfig("m", 2, 8, 2), np.full(3, 4), np.full(3, 3), prompt_counts=prompt_counts)
    out = {"header": trace.header.to_json(), "prompt_lens": trace.prompt_lens, "gen_lens": trace.gen_lens,
           "experts": trace.experts}
    if prompt_counts:
        out["prompt_counts"] = trace.prompt_counts
    return out


ODD_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
              "float64", "bool", "complex64", "U2", "object")


@st.composite
def damaged_member(draw, array: np.ndarray) -> np.ndarray:
    """One member of a valid trace, damaged past the archive's checks: another dtype, another shape, fewer or
    more elements, or one value set to something odd (negative, huge, past the experts, a NaN)."""
    action = draw(st.sampled_from(["dtype", "reshape", "resize", "value", "value", "empty"]))
    with np.errstate(all="ignore"), warnings.catch_warnings():  # casts that overflow are the point
        warnings.simplefilter("ignore")
        return _damage_member(draw, array, action)


def _damage_member(draw, array: np.ndarray, action: str) -> np.ndarray:
    if action == "dtype":
        dtype = draw(st.sampled_from(ODD_DTYPES))
        if dtype == "object":
            return np.array(array.tolist() or [None], dtype=object)
        # a member damaged twice: text such as "0." has no integer form, an object array's Python int 128 no int8,
        # its None none at all
        with contextlib.suppress(ValueError, OverflowError, TypeError):
            return array.astype(dtype)
        return array
    if action == "reshape":
        return array.reshape(-1) if array.ndim > 1 else array.reshape(1, -1, 1)
    if action == "resize":
        n = draw(st.integers(min_value=0, max_value=array.size + 3))
        return np.resize(array, (n, *array.shape[1:]) if array.ndim > 1 else n)
    if action == "empty":
        return array[:0]
    flat = array.astype(np.float64 if draw(st.booleans()) else array.dtype).reshape(-1).copy()
    if flat.size:
        value = draw(st.one_of(st.integers(min_value=-(2**40), max_value=2**40),
                               st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 7, 8, 9, 255])))
        index = draw(st.integers(min_value=0, max_value=flat.size - 1))
        with contextlib.suppress(OverflowError, ValueError):  # a value the dtype cannot hold leaves it as it was
            flat[index] = value
    return flat.reshape(array.shape)


@st.composite
def damaged_trace(draw, prompt_counts: bool) -> dict:
    """A valid trace's members with one to three of them damaged, dropped, or joined by a stray one; the header
    through `mutated` (its fields set to odd values, deleted or added)."""
    members = _trace_members(prompt_counts)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        name = draw(st.sampled_from(sorted(members) + ["stray", "gate_weights", "request_features"]))
        if name == "header":
            members["header"] = draw(mutated(members["header"]))
        elif name not in members:  # an optional member the trace lacks, or an unknown one
            members[name] = draw(damaged_member(np.zeros((6, 2, 2), np.float32)))
        elif draw(st.integers(min_value=0, max_value=5)) == 0:
            members.pop(name)
        else:
            members[name] = draw(damaged_member(members[name]))
    return members


@FAST
@given(damaged_trace(prompt_counts=False))
def test_trace_members(tmp_path_factory, members):
    _fuzz_members(tmp_path_factory, members)


@HALF
@given(damaged_trace(prompt_counts=True))
def test_trace_members_with_prompt_counts(tmp_path_factory, members):
    _fuzz_members(tmp_path_factory, members)


def _fuzz_members(tmp_path_factory, members: dict) -> None:
    """Members re-saved as a well-formed archive (valid zip, valid .npy headers), so the trace loader itself
    judges them: it loads a trace consistent with its header or raises one one-line TraceError."""
    arrays = dict(members)
    header = arrays.pop("header", None)
    if header is not None:
        arrays["header"] = np.frombuffer(json.dumps(header, default=str).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # object arrays are pickled into the file: the loader must refuse, not unpickle
    _fuzz_trace(tmp_path_factory, buf.getvalue(), [], 0)


def _fuzz_trace(tmp_path_factory, original: bytes, flips, cut) -> None:
    from traces import load_trace

    data = bytearray(original)
    for pos, value in flips:
        data[pos] = value
    path = tmp_path_factory.getbasetemp() / "fuzz.npz"
    path.write_bytes(bytes(data[:cut]) if cut else bytes(data))
    try:
        trace = load_trace(path)
    except TraceError as exc:
        assert "\n" not in str(exc)
        return
    # what loaded is consistent: one row of top-k experts per layer for every prompt token (unless prompts are
    # counted) and every generated token after the first, each an expert the model has
    h, prompts, gens = trace.header, trace.prompt_lens.astype(np.int64), trace.gen_lens.astype(np.int64)
    assert prompts.shape == gens.shape and prompts.size > 0 and (prompts >= 1).all() and (gens >= 1).all()
    rows = int((gens - 1).sum()) + (0 if trace.prompt_counts is not None else int(prompts.sum()))
    assert trace.experts.shape == (rows, h.num_layers, h.top_k)
    assert trace.experts.size == 0 or int(trace.experts.max()) < trace.header.num_experts
    if trace.prompt_counts is not None:  # each request's prompt, top-k per layer
        assert (trace.prompt_counts.sum(axis=2) == trace.prompt_lens[:, None] * trace.header.top_k).all()


RECORD = {"request": 0, "token": 0, "phase": "prefill", "layer": 0, "experts": [1, 2], "probs": [0.6, 0.4]}


@FAST
@given(st.lists(mutated(RECORD), min_size=1, max_size=4))
def test_jsonl_imports(tmp_path_factory, records):
    from traces import import_jsonl

    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_text("\n".join(json.dumps(r, default=str) for r in records))
    try:
        trace = import_jsonl(path)
    except TraceError as exc:
        assert "\n" not in str(exc)
        return
    assert trace.num_tokens >= 1


# ---- sweep specs and plans ----------------------------------------------------------------------------------
SWEEP = {"fixed": {"model": "mixtral-8x7b", "system": "a100-80g-8452y", "batch": 4, "prompt_len": 8, "gen_len": 2},
         "axes": {"policy": ["coxmoe", "flexgen"]}}


@FAST
@given(st.sampled_from(["fixed", "axes", None]), st.data())
def test_sweep_specs(part, data):
    from experiments.sweep.spec import expand

    spec = {k: dict(v) for k, v in SWEEP.items()}
    if part is None:
        spec = data.draw(mutated(spec))
    else:
        spec[part] = data.draw(mutated(spec[part]))
    try:
        points = expand(spec)
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    assert points and all(p.key for p in points)


TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, vocab_size=128, num_attention_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=4, top_k=2, expert_intermediate_size=32)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """A small plan on disk (a two-layer model, so that one example takes milliseconds)."""
    from sim.api import simulate
    from sim.plan_io import save_plan

    result = simulate(TINY, "a100-80g-8452y", "coxmoe", batch=3, prompt_len=4, gen_len=3, keep_plan=True)
    return save_plan(result.plan, tmp_path_factory.mktemp("fuzzplan") / "p.parquet")


def _load_fuzzed_plan(table, path: Path) -> None:
    """Write `table` and load it: a broken plan is one SimInputError line, a loaded one passes its check."""
    from sim.plan_io import load_plan

    pq.write_table(table, path)
    try:
        plan = load_plan(path, isolate_footer=False)  # pyarrow wrote this footer: no raw bytes are fuzzed here
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    plan.check()


@HALF
@given(st.data())
def test_plan_metadata(plan_file, tmp_path_factory, data):
    table = pq.read_table(plan_file)
    meta = json.loads(table.schema.metadata[b"cox-moe-plan"])
    meta = data.draw(mutated(meta))
    _load_fuzzed_plan(table.replace_schema_metadata({b"cox-moe-plan": json.dumps(meta, default=str).encode()}),
                      tmp_path_factory.getbasetemp() / "fuzz_meta.parquet")


# A plan column replaced by: cells of the same type with odd values, a column of another type, or nothing.
_CELL_VALUES = {
    "int": st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from([-1, 0, 2**50 + 1])),
    "str": st.one_of(st.text(max_size=8), st.sampled_from(["gpu", "cpu", "h2d", "decode", "prefill", "expert",
                                                           "kv", "", "GPU"])),
    "list_int": st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    "list_str": st.lists(st.sampled_from(["gpu", "cpu", "dram", "", "x"]), max_size=3),
}


def _kind_of(field_type) -> str:
    import pyarrow as pa

    if pa.types.is_list(field_type):
        return "list_str" if pa.types.is_string(field_type.value_type) else "list_int"
    if pa.types.is_dictionary(field_type) or pa.types.is_string(field_type):
        return "str"
    return "int"


@HALF
@given(st.data())
def test_plan_columns(plan_file, tmp_path_factory, data):
    import pyarrow as pa

    table = pq.read_table(plan_file)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        name = data.draw(st.sampled_from(table.column_names))
        index = table.column_names.index(name)
        action = data.draw(st.sampled_from(["cells", "cells", "retype", "drop"]))
        if action == "drop":
            table = table.remove_column(index)
            continue
        kind = _kind_of(table.schema.field(name).type)
        if action == "retype":
            kind = data.draw(st.sampled_from(sorted(set(_CELL_VALUES) - {kind})))
            values = data.draw(st.lists(_CELL_VALUES[kind], min_size=table.num_rows, max_size=table.num_rows))
        else:
            values = table.column(name).to_pylist()
            for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
                values[data.draw(st.integers(min_value=0, max_value=table.num_rows - 1))] = data.draw(
                    st.one_of(st.none(), _CELL_VALUES[kind]))
        pa_type = {"int": pa.int64(), "str": pa.string(), "list_int": pa.list_(pa.int64()),
                   "list_str": pa.list_(pa.string())}[kind]
        table = table.set_column(index, name, pa.array(values, pa_type))
    _load_fuzzed_plan(table, tmp_path_factory.getbasetemp() / "fuzz_cols.parquet")


# ---- profiles -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> tuple[Path, ModelSpec]:
    pytest.importorskip("torch")
    from executor.profile import profile

    spec = TINY
    out = profile(spec, tmp_path_factory.mktemp("fuzzprof") / "p", rounds=1, max_tokens=8, progress=False,
                  max_requests=4, max_kv=4)
    return out, spec


@pytest.fixture(scope="module")
def profile_case(tiny_profile, tmp_path_factory) -> Path:
    """A copy of the tiny profile whose files each example overwrites."""
    import shutil

    case = tmp_path_factory.mktemp("fuzzprof_case") / "p"
    shutil.copytree(tiny_profile[0], case)
    return case


PROFILE_TABLE: dict = {}  # the tiny profile's timings and metadata, read once
PROFILE_EDIT = st.tuples(st.integers(min_value=0, max_value=10_000),
                         st.sampled_from(["tokens", "kv", "median_s", "kind", "device", "threads"]), ODD_VALUES)


def test_a_profile_kind_with_a_newline_is_a_one_line_error(tiny_profile, profile_case):
    """Found by the fuzz below: an op kind holding a newline was quoted raw, so its error took two lines."""
    import pandas as pd

    from sim.cost.profile import ProfileCostModel
    from sim.specs import load_system

    src, spec = tiny_profile
    table = pd.read_csv(src / "timings.csv").astype(object)
    table.loc[len(table) - 1, "kind"] = "\n"
    table.to_csv(profile_case / "timings.csv", index=False)
    (profile_case / "profile.json").write_text((src / "profile.json").read_text())
    with pytest.raises(SimInputError) as err:
        ProfileCostModel(load_system("a100-80g-8452y"), profile_case, spec)
    assert "\n" not in str(err.value) and "'\\n'" in str(err.value)


@FAST
@given(st.lists(PROFILE_EDIT, max_size=3), st.booleans(), st.data())
def test_profiles(tiny_profile, profile_case, edits, mutate_meta, data):
    import pandas as pd

    from sim.cost.profile import ProfileCostModel
    from sim.specs import load_system

    src, spec = tiny_profile
    table = PROFILE_TABLE.setdefault("timings", pd.read_csv(src / "timings.csv").astype(object)).copy()
    for row, col, value in edits:
        if col in table.columns:
            table.loc[row % len(table), col] = value if not isinstance(value, list | dict) else str(value)
    table.to_csv(profile_case / "timings.csv", index=False)
    meta = PROFILE_TABLE.setdefault("meta", json.loads((src / "profile.json").read_text()))
    if mutate_meta:
        meta = data.draw(mutated(meta))
    (profile_case / "profile.json").write_text(json.dumps(meta, default=str))
    try:
        cost = ProfileCostModel(load_system("a100-80g-8452y"), profile_case, spec)
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    try:  # a profile that loads prices a plan of its model: a run of finite, ordered op times, or one typed error
        record = run_plan(_tiny_plan(spec), cost)
    except SimInputError as exc:
        assert "\n" not in str(exc)
        return
    assert 0 < record.makespan_ns < 2**62 and (record.end_ns >= record.start_ns).all()


def _tiny_plan(spec: ModelSpec):
    """A CPU-only plan of `spec` (CPU ops: the rows a CPU profile prices), built once."""
    if "plan" not in PROFILE_TABLE:
        from sim.policies import PlanContext, make_policy
        from sim.specs import load_system
        from sim.workload import Workload

        prompts, gens = np.full(3, 4), np.full(3, 3)
        trace = generate_trace(SynthConfig(spec.name, spec.num_moe_layers, spec.num_experts, spec.top_k), prompts,
                               gens)
        PROFILE_TABLE["plan"] = make_policy("cpu-only", {}).build(PlanContext(
            spec, load_system("a100-80g-8452y"), Workload(prompts, gens), trace))
    return PROFILE_TABLE["plan"]
