"""compressed-tensors itself as the int4 / int8 oracle (test-only): its quantiser, compressor and decompressor.

`ct_compress` / `ct_decompress` run one matrix through compressed-tensors' own API; `make_ct_checkpoint`
turns a transformers-written tiny checkpoint into a W4A16 (or W8A16) pack-quantized one the way compressed-tensors
lays it out (routed experts per expert, everything else untouched), or with `all_linear` every Linear layer
the community recipe (llm-compressor / AutoRound) quantises: all but the router, the shared-expert gate,
DeltaNet's in_proj_a/b, embeddings, lm_head (unless `head`) and the vision tower.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from safetensors import safe_open
from safetensors.torch import save_file

EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"


# the community recipe's ignore list (its targets: class Linear; embeddings are not Linear layers)
RECIPE_IGNORE = [
    "lm_head",
    r"re:.*mlp\.gate$",
    r"re:.*shared_expert_gate$",
    r"re:.*linear_attn\.in_proj_[ab]$",
    r"re:.*visual.*",
    r"re:.*mtp.*",
]


def ct_scheme(
    group_size: int | None, symmetric: bool, bits: int = 4, targets: list[str] | None = None
) -> QuantizationScheme:
    """W4A16 (bits 8: W8A16) on the routed experts (or `targets`); group_size None is the channel strategy."""
    strategy = "group" if group_size else "channel"
    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, group_size=group_size, strategy=strategy
    )
    return QuantizationScheme(targets=targets or [EXPERT_TARGET], weights=weights)


def _ignored(module: str, ignore: list[str]) -> bool:
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


def resident_linear(name: str, t: torch.Tensor, ignore: list[str]):
    """(module, weight) when `name` is a resident Linear's weight the recipe quantises; none otherwise."""
    module = name.removesuffix(".weight")
    if module == name or t.dim() != 2 or module.endswith("embed_tokens") or _ignored(module, ignore):
        return
    yield module, t


def ct_compress(w: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """Min/max round-to-nearest qparams (compressed-tensors' calculate_qparams), then its pack compressor."""
    args = scheme.weights
    if args.strategy == "group":
        scale, zp = compute_dynamic_scales_and_zp(w, args, module=None)
    else:  # channel: one min/max per row (dynamic qparams refuse channel, the math is the same)
        from compressed_tensors.quantization.utils import calculate_qparams

        scale, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    return PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme
    )


def ct_decompress(state: dict[str, torch.Tensor], scheme: QuantizationScheme) -> torch.Tensor:
    return PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]


EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts\.)(?:(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight|(?P<fused>gate_up_proj|down_proj))$"
)
IGNORE = [  # every other Linear, named: vLLM refuses a Linear that no target and no ignore entry names
    "lm_head",
    r"re:.*visual.*",
    r"re:.*mtp.*",
    r"re:.*shared_expert.*",
    r"re:.*mlp\.gate$",
    r"re:.*self_attn\..*_proj$",
    r"re:.*linear_attn\..*_proj.*$",
]
META_FILES = ("*.json", "*.jinja", "*.txt", "*.model")


def per_expert(name: str, t: torch.Tensor):
    """(module name, [out, in] weight) of each routed expert matrix in `name`; none for other tensors."""
    m = EXPERT.match(name)
    if not m:
        return
    prefix = m["prefix"]
    if m["e"] is not None:
        yield f"{prefix}{m['e']}.{m['proj']}_proj", t
    elif m["fused"] == "gate_up_proj":  # [E, 2I, D]: gate rows first, then up
        half = t.shape[1] // 2
        for e in range(t.shape[0]):
            yield f"{prefix}{e}.gate_proj", t[e, :half]
            yield f"{prefix}{e}.up_proj", t[e, half:]
    else:  # down_proj [E, D, I]
        for e in range(t.shape[0]):
            yield f"{prefix}{e}.down_proj", t[e]


def _shards(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def make_ct_checkpoint(
    src_dir: Path,
    out_dir: Path,
    group_size: int | None,
    symmetric: bool,
    bits: int = 4,
    all_linear: bool = False,
    head: bool = False,
) -> Path:
    """Quantise every routed expert of `src_dir` with compressed-tensors and write it per expert to `out_dir`;
    `all_linear`: every Linear layer the community recipe quantises too (`head`: lm_head as well)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ignore = [p for p in RECIPE_IGNORE if not (head and p == "lm_head")] if all_linear else IGNORE
    scheme = ct_scheme(group_size, symmetric, bits, ["Linear", EXPERT_TARGET] if all_linear else None)
    weight_map: dict[str, str] = {}
    for shard in _shards(src_dir):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(src_dir / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                experts = list(per_expert(name, t))
                if all_linear and not experts:
                    experts = list(resident_linear(name, t, ignore))
                if not experts:
                    tensors[name] = t
                for module, w in experts:
                    for key, value in ct_compress(w.contiguous(), scheme).items():
                        tensors[f"{module}.{key}"] = value.contiguous()
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    for pattern in META_FILES:
        for path in src_dir.glob(pattern):
            if path.name != "model.safetensors.index.json":
                shutil.copy(path, out_dir / path.name)
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    ModelCompressor(quantization_config=config).update_config(str(out_dir))
    return out_dir


def load_ct_reference(path: Path, dtype: torch.dtype = torch.float32):
    """transformers + compressed-tensors, experts dequantised at load (the CPU path: no int4 kernels).

    Symmetric only: transformers 5.23's MoE decompression (`CompressedTensorsDequantize`) drops
    `weight_zero_point`, so an asymmetric checkpoint fails to load; use `decompress_ct_checkpoint`.
    """
    from transformers import CompressedTensorsConfig, Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration.from_pretrained(
        path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()


def module_scheme(module: str, schemes: list[QuantizationScheme]) -> QuantizationScheme:
    """The scheme compressed-tensors gives the Linear `module` (several config groups: the most specific
    target that selects it, exact name, then `re:`, then class, as its apply_quantization_config picks)."""
    from compressed_tensors.utils.match import match_targets

    by_target = {t: s for s in schemes for t in s.targets}
    matched = match_targets(module, torch.nn.Linear(1, 1), by_target)
    assert matched, f"no config group targets {module}"
    return by_target[matched[0]]


def decompress_ct_checkpoint(ct_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A dense copy of a pack-quantized checkpoint, every packed layer through compressed-tensors' `decompress`
    with the scheme of the config group compressed-tensors matches it to.

    The oracle for what transformers 5.23 cannot load (see `load_ct_reference`): asymmetric checkpoints,
    and configs whose non-expert layers have several schemes (its dequantising load gives every non-expert
    layer the first non-expert group's scheme); transformers then runs the model on exactly the weights
    compressed-tensors dequantises.
    """
    ct_dir, out_dir = Path(ct_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((ct_dir / "config.json").read_text())
    raw = config.pop("quantization_config")
    schemes = [QuantizationScheme.model_validate(g) for g in raw["config_groups"].values()]
    weight_map: dict[str, str] = {}
    for shard in _shards(ct_dir):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(ct_dir / shard), "pt") as f:
            names = list(f.keys())
            for name in names:
                if name.endswith(".weight_packed"):
                    module = name.removesuffix(".weight_packed")
                    state = {
                        k.removeprefix(module + "."): f.get_tensor(k)
                        for k in names
                        if k.startswith(module + ".")
                    }
                    scheme = module_scheme(module, schemes)
                    tensors[module + ".weight"] = ct_decompress(state, scheme).to(dtype)
                elif not name.rpartition(".")[2].startswith(("weight_scale", "weight_shape", "weight_zero")):
                    tensors[name] = f.get_tensor(name)
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    for pattern in META_FILES:
        for path in ct_dir.glob(pattern):
            shutil.copy(path, out_dir / path.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir
