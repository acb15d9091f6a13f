"""Export a LoRA training checkpoint (adapters only, plus the `lora` metadata blob; docs/INTERNALS.md "LoRA").

Merged (`mmtune convert dcp-to-hf` on a LoRA run): the base HF dir is streamed shard by shard, tensor by
tensor, and each adapted weight gets its update W + (alpha / r) B A before it is written, into the same
shard files and index as the base. Per-expert hub tensors get their expert's rows of the stacked update
(the state-dict adapter's own split decides which rows), so the full [E, out, in] delta is never built.
Dtypes: "keep" writes adapted tensors in fp32 (the adapters' dtype; adding a bf16-rounded update would
lose most of a small one) and the rest as in the base; "hf" casts everything back to the base's dtypes.

PEFT (`--adapter-only`): `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(<transformers model of the base>, DIR)` loads (PEFT >= 0.18, which has
`target_parameters`). Linear adapters are ordinary LoRA layers (`<module>.lora_A.weight` [r, in],
`.lora_B.weight` [out, r]); the routed experts' adapters use PEFT's `target_parameters` on the stacked
`mlp.experts.gate_up_proj` / `down_proj`: `lora_A.weight` [E*r, in] (expert e's A in rows e*r..e*r+r-1),
`lora_B.weight` [out, r*E] (column k*E + e is row k of expert e's B) — the same per-expert rank-r
update, so exact. When both expert projections are adapted PEFT nests its wrappers: down_proj's adapter
is `experts.lora_*`, gate_up_proj's `experts.base_layer.lora_*`.

One name clash needs care (GLM-4.5V / GLM-4.6V, `glm4v_moe`): transformers 5 folds their per-expert
gate/up/down projections into stacked tensors, and PEFT (0.21) rewrites every `target_modules` entry
named `gate_proj`, `up_proj` or `down_proj` into a target on those stacked expert tensors — so an adapter
on a dense MLP, the shared experts or the vision MLP named that way would load onto the routed experts
instead. We therefore name those Linear weights in `target_parameters` (`<module>.weight`), which PEFT
applies to exactly that parameter with the same rank-r math (its wrapper has no dropout, irrelevant at
inference). Which names clash is the architecture's `peft_fused_names` (mmtune.models): none for the
dense `glm4v` (transformers has no weight conversion for it), whose adapters are all `target_modules`.
Everything mmtune trains is expressible this way; `lora_dropout` is written as 0 (PEFT refuses it with
`target_parameters`, and dropout is off at inference anyway).

Serving: vLLM reads `target_modules` LoRA of Linear layers, but does not apply PEFT `target_parameters`
adapters correctly (3D expert LoRA read transposed or rejected with a shape error, 2D parameter targets
ignored; vLLM pull requests #41384, #52194, #52198), so for vLLM export the merged model (the default).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from mmtune.convert.dcp_io import LORA_KEY, load_blob, load_tensors, model_tensors, read_metadata
from mmtune.models import architecture_of, load_config
from mmtune.ops.lora import is_adapter_name as _is_adapter
from mmtune.weights.hf_files import INDEX_FILE, copy_non_weight_files, list_shards, staged_output, write_weight_files
from mmtune.weights.safetensors_io import iter_tensors

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def lora_info(ckpt: Path) -> dict | None:
    """The `lora` metadata of a checkpoint (decoded JSON), None when it is not a LoRA checkpoint."""
    if LORA_KEY not in read_metadata(ckpt).state_dict_metadata:
        return None
    return json.loads(bytes(load_blob(ckpt, LORA_KEY)).decode())


def adapter_pairs(ckpt: Path, info: dict) -> dict[str, tuple[str, str]]:
    """base native tensor name -> (A native name, B native name) of every adapter in the checkpoint."""
    have = model_tensors(read_metadata(ckpt))
    pairs = {}
    for module, kind in info["modules"].items():
        bases = [("weight", "lora")] if kind == "linear" else [(p, f"{p}_lora") for p in ("gate_up_proj", "down_proj")]
        for base, stem in bases:
            a, b = (f"{module}.{stem}_A", f"{module}.{stem}_B") if kind == "experts" else (
                f"{module}.lora_A", f"{module}.lora_B")
            if a in have and b in have:
                pairs[f"{module}.{base}"] = (a, b)
            elif kind == "linear":
                raise ValueError(f"{ckpt}: the LoRA metadata names {module} but the checkpoint lacks {a} / {b}")
    if not pairs:
        raise ValueError(f"{ckpt}: a LoRA checkpoint without adapter tensors")
    return pairs


def _load(ckpt: Path, names: list[str]) -> dict[str, torch.Tensor]:
    tensors = model_tensors(read_metadata(ckpt))
    loaded = load_tensors(ckpt, {tensors[n][0]: tensors[n][1] for n in names})
    return {n: loaded[tensors[n][0]] for n in names}


# ------------------------------------------------------------------------------------------- merged


def _row_map(adapter, native: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """hub name -> the flat row indices (over the native tensor's [..., out] rows) it holds. The adapter's
    own `to_hub` is applied to a tensor of row indices, so its split decides (no second copy of the names)."""
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    index = torch.arange(n_rows).view(*shape[:-1], 1).expand(shape)
    out = {native: torch.arange(n_rows)}
    for hub, part in adapter.to_hub(native, index):
        if hub != native:
            out[hub] = part[..., 0].reshape(-1)
    return out


def _delta_rows(A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """The update's rows `rows` (flat over [E, out] or [out]) as [len(rows), in], in fp32."""
    A, B = A.float(), B.float()
    if A.dim() == 2:
        return scale * (B[rows] @ A)
    out_dim = B.shape[1]
    experts = rows // out_dim
    parts = []
    for e in torch.unique_consecutive(experts).tolist():
        mine = rows[experts == e]
        parts.append(B[e, mine % out_dim] @ A[e])
    return scale * torch.cat(parts)


def merged_export(hf_dir: Path, ckpt: Path, save_dir: Path, info: dict, *, dtype: str = "keep", force: bool = False,
                  progress: bool = True) -> Path:
    """The base HF dir with the checkpoint's adapters merged in, written to `save_dir` (see the module doc)."""
    arch, config = load_config(hf_dir)
    adapter = arch.adapter_class(config)
    pairs = adapter_pairs(ckpt, info)
    scale = float(info["alpha"]) / int(info["r"])
    for base in pairs:
        if base not in adapter.shapes:
            raise ValueError(f"{ckpt}: adapted tensor {base} is not a tensor of the model in {hf_dir}/config.json")
    shards = list_shards(hf_dir)
    rows: dict[str, tuple[str, torch.Tensor]] = {}  # hub (or native) name -> (base native name, rows)
    for base in pairs:
        for name, r in _row_map(adapter, base, adapter.shapes[base]).items():
            rows[name] = (base, r)
    present = {e.name for s in shards for e in s.entries}
    # other model tensors a LoRA checkpoint holds (persistent buffers, e.g. the routers' score-correction
    # bias, which may be updated in training) replace the base's
    adapters = {n for ab in pairs.values() for n in ab}
    others = [n for n in model_tensors(read_metadata(ckpt)) if n not in adapters and not _is_adapter(n)]
    missing = [n for n in others if n not in present]
    if missing:
        raise ValueError(f"{hf_dir}: the base weights lack {missing[0]}, which the LoRA checkpoint holds")
    replace = _load(ckpt, others) if others else {}
    pending = {base: 0 for base in pairs}  # hub tensors still to write per adapted base tensor
    for name, (base, _) in rows.items():
        if name in present:
            pending[base] += 1
    lost = [base for base, n in pending.items() if n == 0]
    if lost:
        raise ValueError(f"{hf_dir}: the base weights lack {lost[0]} (or its per-expert tensors), which the adapter "
                         "changes — is --hf-dir the model this LoRA run trained on?")

    def out_dtype(name: str, d: torch.dtype) -> torch.dtype:
        return torch.promote_types(d, torch.float32) if name in rows and dtype == "keep" else d

    plans = [[(e.name, out_dtype(e.name, e.dtype), e.shape) for e in s.entries] for s in shards]
    total = sum(d.itemsize * _numel(shape) for plan in plans for _, d, shape in plan)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with staged_output(save_dir, force, protect=[hf_dir, ckpt]) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge LoRA", disable=not progress)

        def stream(shard, plan):
            dtypes = {n: d for n, d, _ in plan}
            for name, tensor in iter_tensors(shard.path, shard.entries):
                if name in replace:
                    tensor = replace.pop(name)
                if name in rows:
                    base, r = rows[name]
                    if base not in cache:
                        cache[base] = tuple(_load(ckpt, list(pairs[base])).values())
                    A, B = cache[base]
                    tensor = tensor.float() + _delta_rows(A, B, r, scale).view(tensor.shape)
                    pending[base] -= 1
                    if not pending[base]:
                        del cache[base]
                tensor = tensor.to(dtypes[name])
                bar.update(tensor.nbytes)
                yield name, tensor

        write_weight_files(tmp, ((shard.path.name, plan, stream(shard, plan)) for shard, plan in zip(shards, plans)),
                           index=(hf_dir / INDEX_FILE).is_file())
        bar.close()
        copy_non_weight_files(hf_dir, tmp)
    return save_dir


# ------------------------------------------------------------------------------------------- PEFT


def peft_tensors(ckpt: Path, info: dict, fused_names: tuple[str, ...] = ()
                 ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(PEFT state dict, target_modules, target_parameters) of a LoRA checkpoint (see the module doc).
    `fused_names`: Linear names PEFT moves onto the routed experts (the architecture's `peft_fused_names`);
    those Linears go to target_parameters."""
    pairs = adapter_pairs(ckpt, info)
    loaded = _load(ckpt, [n for ab in pairs.values() for n in ab])
    sd: dict[str, torch.Tensor] = {}
    modules, params = [], []
    for base, (a, b) in pairs.items():
        A, B = loaded[a].float(), loaded[b].float()
        if A.dim() == 2:  # a Linear: base = <module>.weight
            module = base.rpartition(".")[0]
            if module.rpartition(".")[2] in fused_names:
                params.append(base)
            else:
                modules.append(module)
            key = PEFT_PREFIX + module
        else:  # stacked experts: base = <experts module>.<projection>
            module, _, proj = base.rpartition(".")
            params.append(base)
            nested = proj == "gate_up_proj" and f"{module}.down_proj" in pairs
            key = PEFT_PREFIX + module + (".base_layer" if nested else "")
            E, r, _ = A.shape
            A = A.reshape(E * r, A.shape[-1])
            B = B.permute(1, 2, 0).reshape(B.shape[1], r * E)
        sd[f"{key}.lora_A.weight"] = A.contiguous()
        sd[f"{key}.lora_B.weight"] = B.contiguous()
    return sd, sorted(modules), sorted(params)


def peft_export(hf_dir: Path, ckpt: Path, save_dir: Path, info: dict, *, force: bool = False) -> Path:
    """A PEFT adapter dir for the base model in `hf_dir` (see the module doc)."""
    from safetensors.torch import save_file

    arch = json.loads((hf_dir / "config.json").read_text()).get("architectures") or [None]
    _check_buffers_unchanged(hf_dir, ckpt, info)
    sd, modules, params = peft_tensors(ckpt, info, architecture_of(hf_dir).peft_fused_names)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(hf_dir.resolve()),
        "r": int(info["r"]), "lora_alpha": float(info["alpha"]), "lora_dropout": 0.0, "bias": "none",
        "target_modules": modules or None, "target_parameters": params or None, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "auto_mapping": {"base_model_class": arch[0], "parent_library": "transformers"} if arch[0] else None,
    }
    with staged_output(save_dir, force, protect=[hf_dir, ckpt]) as tmp:
        save_file(sd, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return save_dir


def _check_buffers_unchanged(hf_dir: Path, ckpt: Path, info: dict) -> None:
    """A PEFT adapter carries only adapters: refuse when the checkpoint's other tensors (router score-correction
    biases updated in training) differ from the base's, which only the merged export keeps."""
    adapters = {n for ab in adapter_pairs(ckpt, info).values() for n in ab}
    others = [n for n in model_tensors(read_metadata(ckpt)) if n not in adapters and not _is_adapter(n)]
    if not others:
        return
    saved = _load(ckpt, others)
    for shard in list_shards(hf_dir):
        wanted = [e for e in shard.entries if e.name in saved]
        for name, tensor in iter_tensors(shard.path, wanted):
            if not torch.equal(tensor.to(saved[name].dtype), saved[name]):
                raise ValueError(f"--adapter-only: {name} changed in training (the router's load-balancing bias), "
                                 "which a PEFT adapter cannot carry; export the merged model (drop --adapter-only)")


def _numel(size) -> int:
    n = 1
    for s in size:
        n *= int(s)
    return n
