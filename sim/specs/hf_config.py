"""Build a `ModelSpec` from a Hugging Face `config.json` (read locally; no network).

The config's fields are mapped onto `ModelSpec` fields and the result goes through the same boundary as every
spec (`sim.specs.schema.validate_spec`): a string, a list, a null or a fraction where a count belongs is one
line naming the config field."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from sim.errors import SimInputError, brief
from sim.specs.model import MAX_STORAGE_BITS, MODEL_MAXIMA, ModelSpec
from sim.specs.schema import validate_spec

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx", "opt")
OPT_POSITION_OFFSET = 2  # transformers' OPTLearnedPositionalEmbedding keeps 2 extra rows
# ModelSpec field -> the config key it came from, so an error names the key the user wrote.
_COMMON = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads", "top_k": "num_experts_per_tok"}
ALIASES: dict[str, dict[str, str]] = {
    "mixtral": {**_COMMON, "num_experts": "num_local_experts", "expert_intermediate_size": "intermediate_size"},
    "qwen2_moe": {**_COMMON, "expert_intermediate_size": "moe_intermediate_size"},
    "deepseek_v2": {**_COMMON, "num_experts": "n_routed_experts", "expert_intermediate_size": "moe_intermediate_size",
                    "dense_intermediate_size": "intermediate_size", "first_dense_layers": "first_k_dense_replace"},
    "dbrx": {"num_layers": "n_layers", "num_experts": "ffn_config.moe_num_experts", "top_k": "ffn_config.moe_top_k",
             "expert_intermediate_size": "ffn_config.ffn_hidden_size", "num_kv_heads": "attn_config.kv_n_heads",
             "hidden_size": "d_model", "num_attention_heads": "n_heads"},
    "opt": {**_COMMON, "expert_intermediate_size": "ffn_dim", "linear_bias": "enable_bias"},
}
ALIASES["qwen3_moe"] = ALIASES["qwen2_moe"]
ALIASES["olmoe"] = {**_COMMON, "expert_intermediate_size": "intermediate_size"}
ALIASES["deepseek_v3"] = ALIASES["deepseek_v2"]


_NUMERIC_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelSpec) if f.type in ("int", "float"))
# Optional integer keys read with a default: a boolean there is a malformed config, not 0 or 1
_OPTIONAL_INTEGERS = ("decoder_sparse_step", "moe_layer_freq", "n_shared_experts", "q_lora_rank",
                      "first_k_dense_replace", "shared_expert_intermediate_size")


def _get(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise SimInputError(f"{where}: missing field {key}")
    return cfg[key]


def _count(cfg: dict[str, Any], key: str, where: str) -> int:
    """A positive integer field (used before it can reach the spec: heads divide the hidden size). A float with no
    fractional part (4096.0) is that integer, as the spec's schema reads every other integer field."""
    value = _get(cfg, key, where)
    if isinstance(value, float) and value.is_integer() and 0 < value <= 2**53:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SimInputError(f"{where}: {key} must be a positive integer, got {brief(value)}")
    return value


def _optional_count(cfg: dict[str, Any], key: str, default: Any, where: str) -> Any:
    """An optional positive integer field: `default` when absent or null, never a silent stand-in for 0."""
    if cfg.get(key) is None:
        return default
    return _count(cfg, key, where)


def _head_dim(cfg: dict[str, Any], hidden: int, heads: int, where: str) -> int:
    """`head_dim` as given, else hidden_size / num_attention_heads, which must then divide evenly."""
    given = _optional_count(cfg, "head_dim", None, where)
    if given is not None:
        return given
    if hidden % heads:
        raise SimInputError(f"{where}: hidden_size {hidden} is not a multiple of the {heads} attention heads (and no "
                            "head_dim is given)")
    return hidden // heads


def _section(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = _get(cfg, key, where)
    if not isinstance(value, dict):
        raise SimInputError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def model_from_hf_config(cfg: dict[str, Any], name: str = "hf-model", source: str = "config.json") -> ModelSpec:
    """Map the fields of the supported MoE families (and dense OPT) onto `ModelSpec`."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise SimInputError(f"{source}: model_type {brief(model_type)} not supported; supported: "
                            f"{', '.join(SUPPORTED)}")
    where = f"{source} ({model_type})"
    for key in _OPTIONAL_INTEGERS:  # `cfg.get(key) or 0` and `== 1` read false as 0 and true as 1
        if isinstance(cfg.get(key), bool):
            raise SimInputError(f"{where}: {key} must be an integer, got {cfg[key]}")
    fields = _fields(cfg, model_type, name, where)
    aliases = ALIASES[model_type]
    for field, value in fields.items():  # the schema would read "32" as 32; a config's numbers are JSON numbers
        if field in _NUMERIC_FIELDS and isinstance(value, str):
            raise SimInputError(f"{where}: {aliases.get(field, field)} must be a number, got {brief(value)}")
    spec = validate_spec(ModelSpec, fields, where, aliases)
    if cfg.get("quantization_config") is None:
        return spec
    return quantized(spec, _section(cfg, "quantization_config", where), model_type, where)


# Modules a checkpoint's quantisation leaves in the model's dtype (the embedding, the LM head, MoE routers, norms and
# DeepSeek's router bias), by the last part of their name; Qwen's FP8 configs list every layer's norms and router.
# Any other entry would keep weights this model sizes as quantised in 16 bits, so it is refused rather than mispriced.
UNQUANTISED_MODULES = frozenset({"embed_tokens", "lm_head", "gate", "shared_expert_gate", "norm", "input_layernorm",
                                 "post_attention_layernorm", "q_norm", "k_norm", "q_a_layernorm", "kv_a_layernorm",
                                 "e_score_correction_bias"})
GROUP_QUANT_METHODS = ("gptq", "awq")
FP8_SCALE_BITS = 32  # DeepSeek-V3's `weight_scale_inv` is float32 (Qwen's FP8 scales are bf16: 0.001 bits less)


def _linears(model_type: str) -> set[str]:
    """The last part of every quantised linear's name in this family (q_proj, w1, gate_proj, ...)."""
    family = _family(model_type)
    return {t.rsplit(".", 1)[-1] for part in LINEAR_PARTS for t in family[part]}


def _integral(value: Any) -> Any:
    """4096.0 read as 4096, as the spec's schema reads integer fields."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53 else value


def _block(value: Any, what: str, where: str) -> tuple[int, int]:
    """A scale block's (rows, columns): two positive integers (FP8's weight_block_size, compressed-tensors'
    block_structure)."""
    block = [_integral(b) for b in value] if isinstance(value, list) else value
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16 for b in block)):
        raise SimInputError(f"{where}: quantization_config {what} must be two positive integers, got {brief(value)}")
    return block[0], block[1]


def _blocks(rows: int, cols: int, block: tuple[int, int]) -> int:
    """How many scale blocks cover a rows x cols matrix."""
    return math.ceil(rows / block[0]) * math.ceil(cols / block[1])


def _names(qc: dict[str, Any], key: str, where: str) -> list[str]:
    """A quantization_config list of module names (keep or ignore lists); absent: none."""
    names = qc.get(key) or []
    if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
        raise SimInputError(f"{where}: quantization_config {key} must be a list of names")
    return names


def _format(qc: dict[str, Any], where: str) -> tuple[Callable[[int, int], float], str]:
    """A function giving the stored bits per weight of one quantised matrix (`rows` outputs x `cols` inputs),
    scales included, and how they are counted."""
    method = qc.get("quant_method")
    if method == "fp8":  # e4m3 weights and an inverse scale per block (per tensor without a block size)
        if qc.get("weight_block_size") is None:
            return (lambda rows, cols: 8.0 + FP8_SCALE_BITS / (rows * cols)), "fp8, one scale per tensor"
        block = _block(qc["weight_block_size"], "weight_block_size", where)

        def fp8(rows: int, cols: int) -> float:
            return 8.0 + FP8_SCALE_BITS * _blocks(rows, cols, block) / (rows * cols)
        return fp8, f"fp8 in {block[0]} x {block[1]} blocks with float32 scales"
    if method in GROUP_QUANT_METHODS:  # packed integers; an fp16 scale and a packed zero point per group and row
        bits, group = _integral(qc.get("bits")), _integral(qc.get("group_size", 128))
        if bits not in (2, 3, 4, 8) or isinstance(bits, bool):
            raise SimInputError(f"{where}: quantization_config bits must be 2, 3, 4 or 8, got {brief(bits)}")
        if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or 0 < group <= 1 << 20):
            raise SimInputError(f"{where}: quantization_config group_size must be a positive integer or -1, got "
                                f"{brief(group)}")
        g_idx = 32 if method == "gptq" else 0  # GPTQ's int32 group index per input row

        def grouped(rows: int, cols: int) -> float:
            groups = 1 if group == -1 else math.ceil(cols / group)
            return bits + (16 + bits) * groups / cols + g_idx / rows
        per = "one scale per row" if group == -1 else f"groups of {group}"
        return grouped, f"{method} {bits}-bit, {per} (fp16 scale, packed zero{', int32 g_idx' if g_idx else ''})"
    raise SimInputError(f"{where}: quantization_config quant_method {brief(method)} is not modelled (fp8, gptq, "
                        "awq and compressed-tensors are); write the weights' stored size into a model file "
                        "(weight_bits_per_param, expert_bits_per_param)")


def _containing(joined: str, part: str) -> str:
    """The first of the newline-joined names that holds `part` as a substring ("" when none does)."""
    at = joined.find(part) if part and "\n" not in part else -1
    if at < 0:
        return ""
    end = joined.find("\n", at)
    return joined[joined.rfind("\n", 0, at) + 1:end if end >= 0 else len(joined)]


def _kept_modules(qc: dict[str, Any], spec: ModelSpec, model_type: str, where: str) -> None:
    """Refuse what would keep more of the model unquantised than the embedding, LM head, routers and norms (or
    quantise the LM head), which the sizes below assume. An entry is matched by substring against each module's full
    name, as AutoAWQ and transformers match it, so a bare `gate` also keeps Qwen's and DeepSeek's `gate_proj` (every
    expert) and a dotted `mlp.experts.0.gate` each layer's `experts.0.gate_proj` unquantised."""
    joined: str | None = None
    for key in ("modules_to_not_convert", "ignored_layers"):
        for name in _names(qc, key, where):
            last = name.rsplit(".", 1)[-1]
            if joined is None:
                joined = "\n".join(_quantised_names(spec, model_type, where))
            clash = _containing(joined, name)
            if last not in UNQUANTISED_MODULES or clash:
                also = f" (as a substring it also matches {clash})" if clash else ""
                raise SimInputError(f"{where}: quantization_config {key} keeps {brief(name)} unquantised{also}; only "
                                    "embeddings, the LM head, routers and norms are modelled as kept (write the "
                                    "stored size into a model file instead)")
    if qc.get("dynamic"):
        raise SimInputError(f"{where}: quantization_config dynamic (per-module rules, e.g. attention left in 16 bits) "
                            "is not modelled; write the stored size into a model file instead")
    if qc.get("lm_head") is True or qc.get("modules_in_block_to_quantize") is not None:
        key = "lm_head" if qc.get("lm_head") is True else "modules_in_block_to_quantize"
        raise SimInputError(f"{where}: quantization_config {key} changes which modules are quantised and is not "
                            "modelled; write the stored size into a model file instead")


# Module name templates of each family ({l}: layer, {e}: expert), by part: the linears a "Linear" target quantises
# (attention in every layer, the dense FFN in dense layers, each expert's matrices and the shared expert's in MoE
# layers) and the router where it is an nn.Linear (DeepSeek's is not). Keep and ignore lists are checked against
# every name the model has (`_quantised_names`).
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")
LINEAR_PARTS = ("attention", "dense", "experts", "shared")
_QWEN = {"attention": tuple(f"model.layers.{{l}}.self_attn.{n}" for n in _ATTENTION),
         "dense": tuple(f"model.layers.{{l}}.mlp.{n}" for n in _FFN),
         "experts": tuple(f"model.layers.{{l}}.mlp.experts.{{e}}.{n}" for n in _FFN),
         "shared": tuple(f"model.layers.{{l}}.mlp.shared_expert.{n}" for n in _FFN),  # (its one-row gate: with it)
         "routers": ("model.layers.{l}.mlp.gate",)}
MODULE_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"attention": _QWEN["attention"], "dense": (), "shared": (),
                "experts": tuple(f"model.layers.{{l}}.block_sparse_moe.experts.{{e}}.{n}" for n in ("w1", "w2", "w3")),
                "routers": ("model.layers.{l}.block_sparse_moe.gate",)},
    "qwen_moe": _QWEN,
    "deepseek": {"attention": tuple(f"model.layers.{{l}}.self_attn.{n}" for n in ("q_proj", "q_a_proj", "q_b_proj",
                                                                                 "kv_a_proj_with_mqa", "kv_b_proj",
                                                                                 "o_proj")),
                 "dense": _QWEN["dense"], "experts": _QWEN["experts"],
                 "shared": tuple(f"model.layers.{{l}}.mlp.shared_experts.{n}" for n in _FFN), "routers": ()},
    "opt": {"attention": tuple(f"model.decoder.layers.{{l}}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj",
                                                                                    "out_proj")),
            "dense": ("model.decoder.layers.{l}.fc1", "model.decoder.layers.{l}.fc2"), "experts": (), "shared": (),
            "routers": ()},
}
MAX_CHECKED_NAMES = 1 << 20  # module names a keep or ignore list is checked against (DeepSeek-V3: 47,641)
MAX_IGNORE_REGEXES = 64  # `re:` entries of one ignore list
CT_FORMATS = {  # stored bits a weight (None: num_bits packed into int32 words), and the weights' type it holds
    "pack-quantized": (None, "int"), "int-quantized": (8, "int"), "float-quantized": (8, "float"),
    "naive-quantized": (8, None), "nvfp4-pack-quantized": (4, "float"), "mxfp4-pack-quantized": (4, "float")}
CT_STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block")
SCALE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32, "float8_e4m3fn": 8, "uint8": 8}
MAX_IGNORE_PATTERN = 256  # characters of one `re:` entry


def _family(model_type: str) -> dict[str, tuple[str, ...]]:
    if model_type.startswith("deepseek"):
        return MODULE_TEMPLATES["deepseek"]
    return MODULE_TEMPLATES.get(model_type, MODULE_TEMPLATES["qwen_moe"])  # Qwen2/3-MoE and OLMoE name alike


def _moe_layer(spec: ModelSpec, layer: int) -> bool:
    return spec.num_experts > 1 and spec.is_moe_layer(layer)  # a dense model (OPT) is one expert without router


def _quantised_names(spec: ModelSpec, model_type: str, where: str) -> list[str]:
    """The full name of every linear a "Linear" target quantises in this model, layer by layer: attention, then the
    dense FFN (dense layers) or each expert's matrices and the shared expert's where it has one (MoE layers)."""
    family = _family(model_type)
    per_moe = len(family["experts"]) * spec.num_experts + (len(family["shared"]) if spec.shared_expert_intermediate_size
                                                           else 0)
    total = spec.num_layers * (len(family["attention"]) + max(per_moe, len(family["dense"])))
    if total > MAX_CHECKED_NAMES:
        raise SimInputError(f"{where}: quantization_config keep or ignore lists on a model with {total:,} linear "
                            f"modules are not checked (at most {MAX_CHECKED_NAMES:,}); write the stored size into a "
                            "model file instead")
    out: list[str] = []
    for layer in range(spec.num_layers):
        out += [t.format(l=layer) for t in family["attention"]]
        if not _moe_layer(spec, layer):
            out += [t.format(l=layer) for t in family["dense"]]
            continue
        out += [t.format(l=layer, e=e) for e in range(spec.num_experts) for t in family["experts"]]
        if spec.shared_expert_intermediate_size:
            out += [t.format(l=layer) for t in family["shared"]]
    return out


def _nested_repeat(pattern: str) -> bool:
    """Whether a regex repeats something that itself repeats ((a*)*, (.*)+x): such a pattern can take exponential
    time on a plain module name, so it is refused rather than run."""
    import re._parser as sre_parse  # noqa: PLC0415 - the stdlib's own regex parser, to walk the pattern's tree

    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}

    def walk(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                found = inside or walk(arg[2], True)
            elif op is sre_parse.SUBPATTERN:
                found = walk(arg[-1], inside)
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                found = walk(arg[1], inside)
            elif op is sre_parse.BRANCH:
                found = any(walk(branch, inside) for branch in arg[1])
            else:
                found = False
            if found:
                return True
        return False
    return walk(sre_parse.parse(pattern), False)


def _ct_format(qc: dict[str, Any], where: str) -> tuple[Callable[[int, int], float], str]:
    """compressed-tensors (llm-compressor's checkpoints): one scheme for every Linear, its stored bits per weight
    with scales, zero points and group indices counted per matrix shape (compressed-tensors' own layout)."""
    def bad(what: str) -> SimInputError:
        return SimInputError(f"{where}: quantization_config (compressed-tensors) {what}; write the weights' stored "
                             "size into a model file instead")
    if qc.get("kv_cache_scheme"):
        raise bad("kv_cache_scheme is not modelled (the KV cache keeps the model's dtype here)")
    sparsity = qc.get("sparsity_config")  # written as {} when there is none
    if sparsity and not (isinstance(sparsity, dict) and sparsity.get("format") == "dense"):
        raise bad("sparsity_config is not modelled (weights are sized dense)")
    fmt = qc.get("format")
    if not isinstance(fmt, str) or fmt not in CT_FORMATS:
        raise bad(f"format {brief(fmt)} is not modelled ({', '.join(CT_FORMATS)} are)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise bad("config_groups must hold one scheme (schemes per module are not modelled)")
    group = next(iter(groups.values()))
    if not isinstance(group, dict) or group.get("targets") != ["Linear"] or not isinstance(group.get("weights"), dict):
        raise bad("its scheme must target [\"Linear\"] with a weights mapping")
    w = group["weights"]
    bits, kind, strategy = _integral(w.get("num_bits")), w.get("type"), w.get("strategy")
    stored_bits, fmt_kind = CT_FORMATS[fmt]
    if isinstance(bits, bool) or bits not in (4, 8) or kind not in ("int", "float") or strategy not in CT_STRATEGIES:
        raise bad(f"weights num_bits {brief(bits)}, type {brief(kind)}, strategy {brief(strategy)} are not modelled "
                  f"(4 or 8 bits, int or float, one of {', '.join(CT_STRATEGIES)})")
    if (fmt_kind and kind != fmt_kind) or (kind == "float" and bits == 4) != fmt.endswith("fp4-pack-quantized"):
        raise bad(f"format {fmt} does not hold {kind}{bits} weights")
    stored_bits = stored_bits or bits
    symmetric = w.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise bad(f"weights symmetric must be true or false, got {brief(symmetric)}")
    size = _integral(w.get("group_size"))
    if strategy in ("group", "tensor_group") and (isinstance(size, bool) or not isinstance(size, int)
                                                  or not 0 < size <= 1 << 20):
        raise bad(f"weights group_size must be a positive integer for strategy {strategy}, got {brief(size)}")
    block = _block(w.get("block_structure"), "weights block_structure", where) if strategy == "block" else (1, 1)
    # Scales in the model's dtype (compressed-tensors keeps the observed dtype: bf16) unless the scheme names one,
    # fp8 for NVFP4 (plus a float32 global scale a tensor), e8m0 for MXFP4; a packed zero point per scale where the
    # scheme is asymmetric; an int32 group index per input row with group activation ordering ("dynamic" is its
    # alias, true its old spelling)
    scale = 8 if fmt.endswith("fp4-pack-quantized") else 16
    if w.get("scale_dtype") is not None:
        named = str(w["scale_dtype"]).removeprefix("torch.")
        if named not in SCALE_BITS:
            raise bad(f"weights scale_dtype {brief(w['scale_dtype'])} is not modelled ({', '.join(SCALE_BITS)} are)")
        scale = SCALE_BITS[named]
    zero = 0 if symmetric else stored_bits
    g_idx = 32 if w.get("actorder") in ("group", "dynamic", True) else 0

    def ct(rows: int, cols: int) -> float:
        if strategy == "tensor":
            scales = 1 / rows
        elif strategy == "channel":
            scales = 1.0
        elif strategy == "block":
            scales = _blocks(rows, cols, block) / rows
        else:
            scales = math.ceil(cols / size)
        extra = 32 / (rows * cols) if fmt == "nvfp4-pack-quantized" else 0.0
        return stored_bits + (scale + zero) * scales / cols + g_idx / rows + extra
    per = {"tensor": "one scale a tensor", "channel": "one scale a row",
           "block": f"{block[0]} x {block[1]} blocks"}.get(strategy, f"groups of {size}")
    return ct, f"compressed-tensors {fmt}, {kind}{bits} in {per}"


def _ct_kept(qc: dict[str, Any], spec: ModelSpec, model_type: str, where: str) -> tuple[bool, bool]:
    """Whether compressed-tensors' `ignore` keeps the LM head and the routers in the model's dtype (its "Linear"
    target quantises both otherwise). As compressed-tensors matches them, a plain entry is one module's full name
    and a `re:` entry a regex matched from the name's start; an entry that would keep a projection or an expert is
    refused, and the routers count as kept only when every MoE layer's is."""
    names = _names(qc, "ignore", where)
    regexes = sum(entry.startswith("re:") for entry in names)
    if regexes > MAX_IGNORE_REGEXES:
        raise SimInputError(f"{where}: quantization_config ignore has {regexes} `re:` entries, more than the "
                            f"{MAX_IGNORE_REGEXES} the importer checks; write the stored size into a model file "
                            "instead")
    quantised = _quantised_names(spec, model_type, where) if regexes else []
    router_names = {t.format(l=layer) for t in _family(model_type)["routers"] for layer in range(spec.num_layers)
                    if _moe_layer(spec, layer)}
    leaves = _linears(model_type)
    lm_head, kept_routers = False, set()
    for entry in names:
        if entry.startswith("re:"):
            text = entry[3:]
            try:
                if len(text) > MAX_IGNORE_PATTERN or _nested_repeat(text):
                    raise re.error(f"longer than {MAX_IGNORE_PATTERN} characters or a repeat inside a repeat")
                pattern = re.compile(text)
            except (re.error, OverflowError, RecursionError) as exc:
                raise SimInputError(f"{where}: quantization_config ignore {brief(entry)} is not a regex the importer "
                                    f"evaluates: {brief(str(exc))}") from None
            hit = next((n for n in quantised if pattern.match(n)), None)
            if hit:
                raise SimInputError(f"{where}: quantization_config ignore {brief(entry)} keeps {hit} unquantised; "
                                    "only embeddings, the LM head, routers and norms are modelled as kept (write the "
                                    "stored size into a model file instead)")
            lm_head |= bool(pattern.match("lm_head"))
            kept_routers |= {n for n in router_names if pattern.match(n)}
        elif entry.rsplit(".", 1)[-1] in leaves:  # one projection or expert matrix kept in 16 bits
            raise SimInputError(f"{where}: quantization_config ignore keeps {brief(entry)} unquantised; only "
                                "embeddings, the LM head, routers and norms are modelled as kept (write the stored "
                                "size into a model file instead)")
        else:  # a full name: the LM head or a router is kept; any other name matches nothing quantised here
            lm_head |= entry == "lm_head"
            kept_routers |= {entry} & router_names
    return lm_head, not router_names or kept_routers == router_names


def quantized(spec: ModelSpec, qc: dict[str, Any], model_type: str, where: str) -> ModelSpec:
    """`spec` with its weights at a quantised checkpoint's stored size: every linear layer of the decoder (attention,
    shared and routed experts, dense FFNs) at the method's bits, the embedding, LM head, routers and norms in the
    model's dtype; non-expert weights as their average. Without it the importer had sized a quantised checkpoint
    (DeepSeek-V3's own config is FP8) at 16 bits a weight."""
    if model_type == "dbrx":  # its experts are fused parameters, not Linear modules: each quantiser has its own way
        raise SimInputError(f"{where}: a quantization_config on DBRX is not modelled (its experts are fused "
                            "parameters, which quantisers store each their own way); write the stored size into a "
                            "model file instead")
    if qc.get("quant_method") == "compressed-tensors":
        stored, how = _ct_format(qc, where)
        lm_head_kept, routers_kept = _ct_kept(qc, spec, model_type, where)
    else:  # these quantisers leave the LM head and routers alone unless told otherwise (refused above)
        stored, how = _format(qc, where)
        _kept_modules(qc, spec, model_type, where)
        lm_head_kept = routers_kept = True
    m = spec
    h, i = m.hidden_size, m.expert_intermediate_size
    # an expert's matrices: gate and up (i x h) where gated, and down (h x i)
    shapes = [(i, h)] * (m.ffn_matrices - 1) + [(h, i)]
    expert = sum(r * c * stored(r, c) for r, c in shapes) / sum(r * c for r, c in shapes)
    linear = stored(h, h)  # attention, shared experts, dense FFNs: a square matrix's scale share stands for them
    kept = (m.embedding_params + m.final_norm_params + m.num_layers * m.norm_params_per_layer
            + (m.lm_head_params if lm_head_kept else 0) + (m.num_moe_layers * m.router_params if routers_kept else 0))
    average = (kept * 8 * m.bytes_per_param + (m.non_expert_params - kept) * linear) / m.non_expert_params
    worst = max(expert, average)
    if worst > MAX_STORAGE_BITS:  # a scale per weight or two: no checkpoint stores that; name the config's keys
        raise SimInputError(f"{where}: quantization_config ({how}) stores {worst:.4g} bits a weight with its scales, "
                            f"more than {MAX_STORAGE_BITS:g}: its blocks or groups are too small for a checkpoint "
                            "format")
    dtype_parts = ", ".join(["the embedding", *(["LM head"] if lm_head_kept else []),
                             *(["routers"] if routers_kept else []), "norms"])
    sources = {**m.sources,
               "expert_bits_per_param": f"config.json quantization_config: {how}, {expert:.4g} bits a weight",
               "weight_bits_per_param": f"the same ({linear:.4g} bits) for attention, shared experts and dense FFNs"
                                        f"{'' if lm_head_kept else ', the LM head'}"
                                        f"{'' if routers_kept else ', routers'}; {dtype_parts} in the model's dtype: "
                                        f"{average:.4g} bits on average"}
    return dataclasses.replace(m, weight_bits_per_param=average, expert_bits_per_param=expert, sources=sources)


def _qwen_dense_layers(cfg: dict[str, Any], layers: Any, where: str) -> int:
    """How many leading layers Qwen's `decoder_sparse_step` and `mlp_only_layers` make dense (a layer is sparse
    when it is not listed and (index + 1) is a multiple of the step); any other pattern is refused, since only
    leading dense layers are modelled (`first_dense_layers`)."""
    step = cfg.get("decoder_sparse_step", 1)
    listed = cfg.get("mlp_only_layers") or []
    if step in (None, 1) and not listed:
        return 0
    if not isinstance(layers, int) or isinstance(layers, bool) or not isinstance(step, int) or step < 1 \
            or not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise SimInputError(f"{where}: decoder_sparse_step must be an integer >= 1 and mlp_only_layers a list of "
                            "layer indices")
    if not 1 <= layers <= MODEL_MAXIMA["num_layers"]:  # checked before the walk over layers below
        raise SimInputError(f"{where}: num_hidden_layers must be in [1, {MODEL_MAXIMA['num_layers']}], got {layers}")
    only_mlp = set(listed)
    dense = [i for i in range(layers) if i in only_mlp or (i + 1) % step]
    if dense != list(range(len(dense))):
        raise SimInputError(f"{where}: decoder_sparse_step {step} / mlp_only_layers {listed} make layers "
                            f"{dense[:8]}{'...' if len(dense) > 8 else ''} dense; only leading dense layers are "
                            "modelled")
    return len(dense)

def _fields(cfg: dict[str, Any], model_type: str, name: str, where: str) -> dict[str, Any]:
    source = {"config": f"Hugging Face config.json (model_type {model_type})"}
    if model_type == "dbrx":
        attn, ffn = _section(cfg, "attn_config", where), _section(cfg, "ffn_config", where)
        heads, hidden = _count(cfg, "n_heads", where), _count(cfg, "d_model", where)
        return dict(name=name, num_layers=_get(cfg, "n_layers", where), hidden_size=hidden,
                    vocab_size=_get(cfg, "vocab_size", where), num_attention_heads=heads,
                    num_kv_heads=_optional_count(attn, "kv_n_heads", heads, f"{where} attn_config"),
                    head_dim=_head_dim({}, hidden, heads, where),
                    num_experts=_get(ffn, "moe_num_experts", f"{where} ffn_config"),
                    top_k=_get(ffn, "moe_top_k", f"{where} ffn_config"),
                    expert_intermediate_size=_get(ffn, "ffn_hidden_size", f"{where} ffn_config"),
                    tie_word_embeddings=cfg.get("tie_word_embeddings", False), sources=source)

    def g(key: str) -> Any:
        return _get(cfg, key, where)

    hidden, heads = _count(cfg, "hidden_size", where), _count(cfg, "num_attention_heads", where)
    common: dict[str, Any] = dict(
        name=name, num_layers=g("num_hidden_layers"), hidden_size=hidden, vocab_size=g("vocab_size"),
        num_attention_heads=heads, num_kv_heads=_optional_count(cfg, "num_key_value_heads", heads, where),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), sources=source,
    )
    if model_type == "opt":
        # Dense: a one-expert model whose FFN is OPT's ReLU fc1/fc2 (see ModelSpec.has_router).
        if cfg.get("word_embed_proj_dim", hidden) != hidden:
            raise SimInputError(f"{where}: word_embed_proj_dim differs from hidden_size (OPT-350m's projected "
                                "embeddings are not modelled)")
        positions = _count(cfg, "max_position_embeddings", where)
        return {**common, "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
                "head_dim": _head_dim({}, hidden, heads, where),
                "num_experts": 1, "top_k": 1, "expert_intermediate_size": g("ffn_dim"), "ffn_gated": False,
                "linear_bias": cfg.get("enable_bias", True),
                "learned_position_embeddings": positions + OPT_POSITION_OFFSET}
    if model_type == "mixtral":
        return {**common, "head_dim": _head_dim(cfg, hidden, heads, where), "num_experts": g("num_local_experts"),
                "top_k": g("num_experts_per_tok"), "expert_intermediate_size": g("intermediate_size")}
    if model_type in ("qwen2_moe", "qwen3_moe", "olmoe"):
        shared = cfg.get("shared_expert_intermediate_size", 0) or 0
        qk_norm = {"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none")
        # transformers 5 saves Qwen's expert count as num_local_experts
        experts = g("num_experts") if "num_experts" in cfg or "num_local_experts" not in cfg else g("num_local_experts")
        dense = _qwen_dense_layers(cfg, g("num_hidden_layers"), where)
        return {**common, "head_dim": _head_dim(cfg, hidden, heads, where), "num_experts": experts,
                **({"first_dense_layers": dense, "dense_intermediate_size": g("intermediate_size")} if dense else {}),
                "top_k": g("num_experts_per_tok"),
                # Qwen's dense intermediate_size is not its experts' (transformers defaults the expert width
                # otherwise, 768 / 1408): required there; OLMoE has only the one width
                "expert_intermediate_size": g("intermediate_size") if model_type == "olmoe"
                else _count(cfg, "moe_intermediate_size", where),
                "shared_expert_intermediate_size": shared, "shared_expert_gate": bool(shared),
                "qkv_bias": model_type == "qwen2_moe", "qk_norm": qk_norm}
    # deepseek_v2 / deepseek_v3: MLA, shared experts, leading dense layers.
    freq = cfg.get("moe_layer_freq", 1)
    if freq != 1:
        raise SimInputError(f"{where}: moe_layer_freq {brief(freq)} makes every {brief(freq)}th layer an MoE layer; "
                            "only leading dense layers (first_k_dense_replace) are modelled")
    n_shared = cfg.get("n_shared_experts") or 0
    moe_inter = g("moe_intermediate_size")
    if isinstance(n_shared, bool) or not isinstance(n_shared, int) or n_shared < 0:
        raise SimInputError(f"{where}: n_shared_experts must be an integer >= 0, got {brief(n_shared)}")
    if not isinstance(moe_inter, int) or isinstance(moe_inter, bool):
        raise SimInputError(f"{where}: moe_intermediate_size must be an integer, got {brief(moe_inter)}")
    nope, rope = g("qk_nope_head_dim"), g("qk_rope_head_dim")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (nope, rope)):
        raise SimInputError(f"{where}: qk_nope_head_dim and qk_rope_head_dim must be integers")
    return {**common, "attention": "mla", "head_dim": nope + rope, "num_experts": g("n_routed_experts"),
            "top_k": g("num_experts_per_tok"), "expert_intermediate_size": moe_inter,
            "q_lora_rank": cfg.get("q_lora_rank") or 0, "kv_lora_rank": g("kv_lora_rank"),
            "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": g("v_head_dim"),
            "shared_expert_intermediate_size": n_shared * moe_inter,
            "first_dense_layers": cfg.get("first_k_dense_replace", 0) or 0,
            "dense_intermediate_size": g("intermediate_size"), "router_bias": cfg.get("topk_method") == "noaux_tc"}
