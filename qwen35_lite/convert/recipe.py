"""What `quantize` quantises (`Recipe`: `--scope`, `--bits`, `--resident-bits`, `--head-bits`) and the
`quantization_config` that says so, exactly as compressed-tensors' ModelCompressor writes it.

`--scope experts`: one config group, the routed experts. `--scope all`: the community recipe
(llm-compressor, AutoRound): every Linear layer but those in `RECIPE_IGNORE` (`KEPT` says why each stays);
one group targeting class `Linear` when every layer has one scheme, else one group per scheme whose `re:`
patterns select exactly its layers. Layers are keyed (family, projection), e.g. ("self_attn", "q_proj").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..weights.packed import QuantScheme, describe

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config this writes
EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
IGNORE = [  # every other Linear, named: vLLM refuses a Linear that no target and no ignore entry names
    "lm_head",
    r"re:.*visual.*",
    r"re:.*mtp.*",
    r"re:.*shared_expert.*",
    r"re:.*mlp\.gate$",
    r"re:.*self_attn\..*_proj$",
    r"re:.*linear_attn\..*_proj.*$",
]
# --scope all: the community recipe (llm-compressor, AutoRound) targets class Linear but these; vLLM wants
# every Linear either targeted or ignored, so this list names each one kept bf16 (embeddings are no Linear)
RECIPE_IGNORE = [
    "lm_head",
    r"re:.*mlp\.gate$",
    r"re:.*shared_expert_gate$",
    r"re:.*linear_attn\.in_proj_[ab]$",
    r"re:.*visual.*",
    r"re:.*mtp.*",
]
# What --scope all keeps in bf16, and why (the command's --help, its summary and docs/quantization.md)
KEPT = (
    ("the router mlp.gate", "its scores pick the experts"),
    ("the shared-expert gate", "one row a layer"),
    ("DeltaNet's in_proj_a/b", "small; they set the recurrence's decay and step"),
    ("the embeddings", "a lookup table, not a Linear layer"),
    ("lm_head", "unless --head-bits: the community recipe keeps it"),
    ("the vision tower and the MTP head", "as released"),
)
# The resident Linear layers --scope all quantises: the module holding them -> their projections
RESIDENT = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "linear_attn": ("in_proj_qkv", "in_proj_z", "out_proj"),
    "mlp.shared_expert": ("gate_proj", "up_proj", "down_proj"),
}
RESIDENT_NAME = re.compile(
    r"^(?!mtp\.)(?!.*visual)(?P<module>.*\.(?P<family>self_attn|linear_attn|mlp\.shared_expert)\.(?P<proj>\w+))"
    r"\.weight$"
)
HEAD = "lm_head"
EXPERTS = "mlp.experts"  # the routed experts' family in a layer key
LAYER_NAMES = {EXPERTS: "routed experts", "self_attn": "attention", "linear_attn": "DeltaNet",
               "mlp.shared_expert": "shared experts", HEAD: "lm_head"}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """What `quantize` quantises, and to which scheme (`--scope`, `--bits`, `--resident-bits`, `--head-bits`).

    A resident layer (or lm_head) whose input features the group size does not divide is quantised per
    channel (one scale a row) instead; the routed experts must divide (`--group-size` says so)."""

    experts: QuantScheme
    # --scope all: attention, DeltaNet, shared experts; None: the experts only
    resident: QuantScheme | None = None
    head: QuantScheme | None = None  # lm_head (--head-bits); None: kept as it is

    @property
    def scope(self) -> str:
        return "experts" if self.resident is None else "all"

    def resident_layer(self, tensor: str) -> tuple[str, tuple[str, str], QuantScheme] | None:
        """(module, (family, projection), scheme) when `tensor` is the weight of a non-expert Linear this
        recipe quantises (lm_head included), else None."""
        if tensor == HEAD + ".weight" and self.head is not None:
            return HEAD, (HEAD, ""), self.head
        m = RESIDENT_NAME.match(tensor)
        if self.resident is None or m is None or m["proj"] not in RESIDENT[m["family"]]:
            return None  # in_proj_a/b and the other tensors of those modules stay as they are
        return m["module"], (m["family"], m["proj"]), self.resident


def head_scheme(scheme: QuantScheme, bits: int | None) -> QuantScheme | None:
    """lm_head's scheme for `--head-bits`: at 8 bits compressed-tensors' W8A16 preset (one scale a row: the
    248K-row head is most of a small model's bytes a token, and the per-channel int8 kernel streams it),
    at 4 bits the experts' groups; None keeps it as it is."""
    if bits is None:
        return None
    return replace(scheme, bits=8, group_size=None) if bits == 8 else replace(scheme, bits=bits)


def per_channel_unless_divided(scheme: QuantScheme, in_features: int) -> QuantScheme:
    """`scheme` for a resident Linear of `in_features` inputs: per channel where its group does not divide."""
    if scheme.group_size and in_features % scheme.group_size:
        return replace(scheme, group_size=None)
    return scheme


def as_recipe(recipe: Recipe | QuantScheme) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe(recipe)


def _weights(scheme: QuantScheme) -> dict:
    return {
        "dynamic": False,
        "group_size": scheme.group_size,
        "num_bits": scheme.bits,
        "strategy": "group" if scheme.group_size else "channel",
        "symmetric": scheme.symmetric,
        "type": "int",
    }


def _config(groups: dict[str, tuple[list[str], QuantScheme]], ignore: list[str]) -> dict:
    """`quantization_config` exactly as compressed-tensors' ModelCompressor.update_config writes it."""
    empty = {"format": None, "input_activations": None, "output_activations": None}
    return {
        "config_groups": {
            name: {**empty, "targets": targets, "weights": _weights(scheme)}
            for name, (targets, scheme) in groups.items()
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def quantization_config(scheme: QuantScheme) -> dict:
    """The config of `--scope experts`: one group targeting the routed experts."""
    return _config({"group_0": ([EXPERT_TARGET], scheme)}, IGNORE)


FAMILIES = {EXPERTS: ("gate_proj", "up_proj", "down_proj"), **RESIDENT, HEAD: ("",)}  # canonical order


def _by_family(layers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(family, projection) pairs -> family: its projections, both in FAMILIES' order."""
    return {
        family: [p for p in projs if (family, p) in layers]
        for family, projs in FAMILIES.items()
        if any((family, p) in layers for p in projs)
    }


def _by_scheme(layers: dict[tuple[str, str], QuantScheme]) -> dict[QuantScheme, list[tuple[str, str]]]:
    """Each scheme: its (family, projection) layers, the experts' scheme first, all in FAMILIES' order."""
    by_scheme: dict[QuantScheme, list[tuple[str, str]]] = {}
    for family, projs in FAMILIES.items():
        for proj in projs:
            if (family, proj) in layers:
                by_scheme.setdefault(layers[(family, proj)], []).append((family, proj))
    return by_scheme


def _target(family: str, projs: list[str]) -> str:
    """The `re:` pattern selecting exactly these projections of `family` in every layer (not the MTP's:
    the ignore list drops those), or lm_head's name."""
    if family == HEAD:
        return HEAD
    if family == EXPERTS and len(projs) == len(FAMILIES[EXPERTS]):
        return EXPERT_TARGET
    if len(projs) == 1:
        alt = projs[0]
    elif all(p.endswith("_proj") for p in projs):
        alt = "(" + "|".join(p.removesuffix("_proj") for p in projs) + ")_proj"
    else:
        alt = "(" + "|".join(projs) + ")"
    where = family.replace(".", r"\.") + (r"\.\d+" if family == EXPERTS else "")
    return rf"re:.*{where}\.{alt}$"


def recipe_config(layers: dict[tuple[str, str], QuantScheme]) -> dict:
    """The config of `--scope all` for the quantised `layers` (layer_schemes): one config group per scheme,
    the experts' first. One scheme for all: targets class `Linear` less the ignore list, as the community
    recipe writes it; several: each group's `re:` patterns select exactly its layers. The ignore list
    names every Linear kept bf16 (vLLM refuses a Linear that no target and no ignore entry names)."""
    by_scheme = _by_scheme(layers)
    ignore = [p for p in RECIPE_IGNORE if not (p == HEAD and (HEAD, "") in layers)]
    if len(by_scheme) == 1:
        return _config({"group_0": (["Linear"], next(iter(by_scheme)))}, ignore)
    groups = {
        f"group_{i}": ([_target(f, projs) for f, projs in _by_family(kinds).items()], scheme)
        for i, (scheme, kinds) in enumerate(by_scheme.items())
    }
    return _config(groups, ignore)


def describe_layers(layers: dict[tuple[str, str], QuantScheme]) -> tuple[tuple[str, str], ...]:
    """(which layers, their scheme) for each scheme, e.g. ("routed experts, attention", "int4 g32 symmetric")."""
    out = []
    for scheme, kinds in _by_scheme(layers).items():
        names = [
            LAYER_NAMES[f] if len(projs) == len(FAMILIES[f]) else f"{LAYER_NAMES[f]} {'/'.join(projs)}"
            for f, projs in _by_family(kinds).items()
        ]
        out.append((", ".join(names), describe(scheme)))
    return tuple(out)
