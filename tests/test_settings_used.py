"""Every flag and key of the recipe's files (examples/glm4.5v: data_106B.json, model_106B.json,
fsdp2_config.yaml and the two launch scripts) is either used by `mmtune train` or named in its ONE
"accepted for compatibility, no effect here" line.

"Used" is observed, not declared: the recipe's files (paths pointed at the tiny model and data, sizes made
small) are parsed and trained for one step in this process while every read of a config field is recorded;
a setting whose field nothing reads cannot change what training does. A key set to null asks for nothing and
is skipped; a key with one allowed value must reject any other (ValueError naming it).
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml

from mmtune.config_files import StrictModel
from mmtune.data.config import DataConfig
from mmtune.train.args import Fsdp2Config, ModelJsonConfig, TrainConfig, build_parser, parse_train_args
from test_demo import _script_flags

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "glm4.5v"
SCRIPTS = ("finetune_glm4_5v_106B.sh", "finetune_glm4_5v_1node_reduced.sh")
# flags that are not TrainConfig fields: what they change when parsed
CONSUMED_BY_PARSER = {"--lr-warmup-fraction": ("0.1", "0.3", "lr_warmup_iters")}
# flags naming a file that the parser loads into a TrainConfig field
FILE_FLAGS = {"--mm-model": "model", "--fsdp2-config-path": "fsdp2"}


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _owner(model: type, dotted: str) -> tuple[type, str]:
    """(the pydantic class holding the leaf, the field name) of a dotted key."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model, leaf


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory, tiny_hf_dir, shapes_dir):
    """The recipe's files and flags, pointed at the tiny model, parsed and trained one step with every config
    field read recorded. Returns (reads, printed lines, argv)."""
    from mmtune.convert import hf_to_dcp
    from mmtune.data.llava import llava_to_mllm
    from mmtune.train.cli import run

    root = tmp_path_factory.mktemp("settings")
    if not (shapes_dir / "mllm_train.json").exists():
        llava_to_mllm(shapes_dir / "llava_format.json", shapes_dir / "mllm_train.json")
    data = json.loads((RECIPE / "data_106B.json").read_text())
    data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = str(tiny_hf_dir)
    data["dataset_param"]["basic_parameters"].update(dataset_dir=str(shapes_dir), dataset="mllm_train.json",
                                                     cache_dir=str(root / "cache"), max_samples=8)
    (root / "data.json").write_text(json.dumps(data))
    model = json.loads((RECIPE / "model_106B.json").read_text())
    model["init_from_hf_path"] = str(tiny_hf_dir)
    (root / "model.json").write_text(json.dumps(model))
    hf_to_dcp(tiny_hf_dir, root / "dcp", progress=False)
    values = {"--mm-data": str(root / "data.json"), "--mm-model": str(root / "model.json"),
              "--fsdp2-config-path": str(RECIPE / "fsdp2_config.yaml"), "--load": str(root / "dcp"),
              "--save": str(root / "save"), "--global-batch-size": "2", "--train-iters": "1", "--seq-length": "256",
              "--num-workers": "0", "--save-interval": "1"}
    argv, seen = [], set()
    for script in SCRIPTS:  # the union of both scripts' flags, in order, once each
        flags = _script_flags(RECIPE / script)
        for i, tok in enumerate(flags):
            if not tok.startswith("--") or tok in seen:
                continue
            seen.add(tok)
            has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            argv += [tok] + ([values.get(tok, flags[i + 1])] if has_value else [])
    reads: set[tuple[type, str]] = set()

    def traced(self, name):
        cls = object.__getattribute__(self, "__class__")
        if name in cls.model_fields:
            reads.add((cls, name))
        return object.__getattribute__(self, name)

    printed: list[str] = []
    mp = pytest.MonkeyPatch()
    for cls in (StrictModel, TrainConfig):
        mp.setattr(cls, "__getattribute__", traced, raising=False)
    try:
        cfg = parse_train_args(argv, world_size=1)
        run(cfg, print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
    finally:
        mp.undo()
    return reads, printed, argv


def _no_effect_line(printed: list[str]) -> str:
    lines = [p for p in printed if "accepted for compatibility, no effect here" in p]
    assert len(lines) == 1, printed  # ONE line
    return lines[0]


def test_every_recipe_key_is_used_or_named(traced_run):
    reads, printed, _ = traced_run
    line = _no_effect_line(printed)
    # file -> (its pydantic model, its contents, how the line names its keys)
    files = {"data_106B.json": (DataConfig, json.loads((RECIPE / "data_106B.json").read_text()), "data.json "),
             "model_106B.json": (ModelJsonConfig, json.loads((RECIPE / "model_106B.json").read_text()), "model.json "),
             "fsdp2_config.yaml": (Fsdp2Config, yaml.safe_load((RECIPE / "fsdp2_config.yaml").read_text()), "fsdp2 ")}
    unused, walked = [], 0
    for name, (model, tree, prefix) in files.items():
        for key, value in _leaves(tree):
            if value is None:
                continue  # null: nothing asked
            walked += 1
            owner, field = _owner(model, key)
            if (owner, field) in reads or prefix + key.removeprefix("dataset_param.") in line:
                continue
            annotation = owner.model_fields[field].annotation
            if typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1:
                with pytest.raises(ValueError, match=field):  # the one value mmtune has: others are errors
                    owner.model_validate({field: "something-else"})
                continue
            unused.append(f"{name}: {key}")
    assert walked > 50 and not unused, f"accepted, neither used nor named in the no-effect line: {unused}\n{line}"


def test_every_recipe_flag_is_used_or_named(traced_run):
    reads, printed, argv = traced_run
    line = _no_effect_line(printed)
    parser = build_parser()
    unused = []
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) > 30
    for flag in flags:
        dest = parser._option_string_actions[flag].dest
        if flag in line or (TrainConfig, FILE_FLAGS.get(flag, dest)) in reads:
            continue
        if flag in CONSUMED_BY_PARSER:
            a, b, field = CONSUMED_BY_PARSER[flag]
            alt = list(argv)
            alt[alt.index("--train-iters") + 1] = "100"
            i = alt.index(flag)
            runs = [parse_train_args(alt[:i + 1] + [v] + alt[i + 2:], world_size=1) for v in (a, b)]
            assert getattr(runs[0], field) != getattr(runs[1], field), flag
            continue
        unused.append(flag)
    assert not unused, f"accepted, neither used nor named in the no-effect line: {unused}\n{line}"


def test_the_line_names_what_has_no_effect_and_why(traced_run):
    line = _no_effect_line(traced_run[1])
    for name, why in (("--use-torch-fsdp2", "always shards with FSDP2"),
                      ("--init-model-with-meta-device", "meta device"),
                      ("--bf16", "the CPU trains in fp32"),
                      ("--no-load-optim", "not a training checkpoint"),
                      ("text_decoder.num_layers=46 (config.json: 3)", "config.json")):
        assert name in line and why in line, (name, line)
    # honoured settings are not listed: the recipe's fast tokenizer, drop_last, sampler, uniform recompute of 1
    for honoured in ("use_fast_tokenizer", "drop_last", "sampler_type", "--recompute-num-layers", "pin_memory",
                     "--log-tps", "--num-workers", "attn_implementation"):
        assert honoured not in line, (honoured, line)


def test_seq_length_default_is_real():
    help_text = " ".join(build_parser().format_help().split())
    assert "(default 4096)" in help_text
    assert TrainConfig.model_fields["seq_length"].default == 4096


def test_flash_attention_that_cannot_run_is_named():
    from mmtune.train.compat import runtime_items

    recipe = Path(__file__).parent / "recipe"
    argv = ["--mm-data", str(recipe / "data_106B.json"), "--mm-model", str(recipe / "model_106B.json"),
            "--train-iters", "10", "--lr", "1e-5", "--use-flash-attn"]
    fp32 = parse_train_args(argv, world_size=1)  # no --bf16, no fsdp2 yaml: fp32 parameters on CUDA
    names = [n for n, _ in runtime_items(fp32, device_type="cuda", load_kind=None, flash=True)]
    assert any(n.startswith("flash attention") for n in names)
    names = [n for n, _ in runtime_items(fp32, device_type="cpu", load_kind=None, flash=True)]
    assert any(n.startswith("flash attention") for n in names)
    assert not runtime_items(fp32, device_type="cpu", load_kind=None, flash=False)
