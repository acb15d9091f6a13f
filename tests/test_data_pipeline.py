"""data.json -> cache / streaming -> packed batches -> StatefulDataLoader; and `mmtune data check`."""

from __future__ import annotations

import copy
import io
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from mmtune.data.check import check_data
from mmtune.data.cli import main as data_main
from mmtune.data.config import load_data_config, parse_data_config
from mmtune.data.dataset import SamplePreprocessor, build_dataset
from mmtune.data.images import ImageProcessor
from mmtune.data.llava import llava_to_mllm
from mmtune.data.loader import DistributedRowSampler, StreamingRows, build_train_loader, from_one_buffer, to_one_buffer
from mmtune.data.packing import plan_rows, truncation_point
from mmtune.data.shapes import make_shapes
from mmtune.data.template import NOT_UTF8
from mmtune.data.tokenizer_tiny import save_tiny_tokenizer
from mmtune.models.glm4v_moe.rope import get_rope_index
from mmtune.tokens import TINY_SPECIAL_BASE, special_token_ids

SEED_DATA_JSON = Path(__file__).parent / "recipe" / "data_106B.json"  # the recipe's file verbatim
IDS = special_token_ids(TINY_SPECIAL_BASE)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tok = root / "tok"
    save_tiny_tokenizer(tok)
    (tok / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1568, "longest_edge": 100352}}))
    make_shapes(root / "shapes", num=48, seed=0)
    llava_to_mllm(root / "shapes" / "llava_format.json", root / "shapes" / "mllm.json")
    return root


def _raw_cfg(env, **basic):
    raw = json.loads(SEED_DATA_JSON.read_text())  # the recipe's file, paths changed
    raw["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = str(env / "tok")
    b = raw["dataset_param"]["basic_parameters"]
    b.update(dataset_dir=str(env / "shapes"), dataset="mllm.json", cache_dir=None, preprocessing_num_workers=None)
    b.update(basic)
    return raw


def _cfg(env, shuffle=True, num_workers=0, **basic):
    raw = _raw_cfg(env, **basic)
    raw["dataloader_param"]["shuffle"] = shuffle
    raw["dataloader_param"]["num_workers"] = num_workers
    return parse_data_config(raw)


def test_seed_config_accepted_and_unknown_keys_named(env, tmp_path):
    raw = _raw_cfg(env)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(raw))
    cfg = load_data_config(path)
    assert cfg.basic.template == "glm4v_moe" and cfg.basic.enable_thinking is False
    assert cfg.preprocess.image_max_pixels == 262144 and cfg.attr.messages == "messages"
    assert cfg.dataset_files() == [(env / "shapes" / "mllm.json").resolve()]
    bad = copy.deepcopy(raw)
    bad["dataset_param"]["basic_parameters"]["packng"] = True
    bad["dataloader_param"]["colate"] = 1
    with pytest.raises(ValueError, match=r"basic_parameters\.packng.*colate|colate.*basic_parameters\.packng"):
        parse_data_config(bad, "x.json")
    bad = copy.deepcopy(raw)
    bad["dataset_param"]["basic_parameters"]["template"] = "qwen2_vl"
    with pytest.raises(ValueError, match="template"):
        parse_data_config(bad)


def _segments(batch):
    cu = batch["cu_seqlens"].tolist()
    return list(zip(cu[:-1], cu[1:]))


@pytest.mark.parametrize("packing", [True, False])
def test_batch_format(env, packing):
    cfg = _cfg(env, packing=packing)
    loader = build_train_loader(cfg, seq_length=96, micro_batch_size=3, seed=0, num_workers=0, progress=False)
    if packing:
        assert loader.pack_stats.efficiency > 0.8
    batch = next(iter(loader))
    B, S = batch["input_ids"].shape
    assert B == 3 and (S == 96 if packing else S <= 96)
    ids, labels, pos = batch["input_ids"].flatten(), batch["labels"].flatten(), batch["position_ids"].reshape(3, -1)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"][-1] == B * S
    grids = batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
    n_samples, g_used = 0, 0
    for a, b in _segments(batch):
        assert a // S == (b - 1) // S  # no segment crosses a row
        seg = ids[a:b]
        if (labels[a:b] == -100).all() and (seg == IDS["<|endoftext|>"]).all():  # a pad run
            assert torch.equal(pos[:, a:b], torch.arange(b - a).expand(3, -1))
            continue
        n_samples += 1
        assert seg[0] == IDS["[gMASK]"] and seg[-1] == IDS["<|user|>"]
        lab = labels[a:b]
        assert lab[-1] == -100
        trained = lab != -100
        assert trained.any() and torch.equal(lab[:-1][trained[:-1]], seg[1:][trained[:-1]])  # shifted targets
        n_img = int((seg == IDS["<|image|>"]).sum()) // 4  # 56x56 images -> 4 tokens each
        ref, _ = get_rope_index(seg, grids[g_used:g_used + n_img] if n_img else None, image_token_id=IDS["<|image|>"],
                                video_start_token_id=IDS["<|begin_of_video|>"], video_end_token_id=IDS["<|end_of_video|>"])
        g_used += n_img
        assert torch.equal(pos[:, a:b], ref)
    assert n_samples == batch["num_samples"] and g_used == len(grids)
    if len(grids):
        assert batch["pixel_values"].shape == (int(grids.prod(-1).sum()), 1176)


def test_recipe_data_json_trains_one_sample_a_row_padded_to_the_longest(env):
    """The recipe's data.json has no `packing` key: one sample per row (a global batch counts samples) and
    each micro-batch padded to its longest sample, not to --seq-length."""
    raw = _raw_cfg(env)
    assert "packing" not in raw["dataset_param"]["basic_parameters"]
    raw["dataloader_param"].update(shuffle=False, num_workers=0)
    loader = build_train_loader(parse_data_config(raw), seq_length=512, micro_batch_size=4, seed=0, progress=False)
    lengths = loader.prepared.ds["length"]
    assert loader.pack_stats.rows == loader.pack_stats.samples == len(lengths)
    for k, batch in enumerate(_take(loader, 3)):
        want = lengths[4 * k: 4 * k + 4]
        assert batch["num_samples"] == 4 and batch["input_ids"].shape == (4, max(want)) and max(want) < 100
        real = [b - a for a, b in _segments(batch) if (batch["labels"].flatten()[a:b] != -100).any()]
        assert real == want


def test_loader_takes_num_workers_and_pin_memory_from_data_json(env):
    cfg = _cfg(env, num_workers=1)
    cfg.dataloader_param.pin_memory = True
    kw = dict(seq_length=96, micro_batch_size=1, seed=0, progress=False)
    loader = build_train_loader(cfg, **kw)  # no --num-workers: data.json's; pinning only where CUDA is
    assert loader.num_workers == 1 and loader.pin_memory == torch.cuda.is_available()
    loader = build_train_loader(cfg, num_workers=0, pin_memory=True, **kw)  # what `mmtune train` passes on CUDA
    assert loader.num_workers == 0 and loader.pin_memory


def test_one_buffer_round_trip_keeps_every_tensor_and_value():
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 99, (3, 7), generator=g), "num_samples": 5,
             "cu_seqlens": torch.tensor([0, 4, 21], dtype=torch.int32), "pixel_values": torch.randn(5, 3, generator=g),
             "empty": torch.zeros(0, 3, dtype=torch.long), "mask": torch.tensor([True, False, True])}
    packed = to_one_buffer(batch)
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["_one_buffer"]  # one tensor crosses
    back = from_one_buffer(packed)
    assert list(back) == list(batch)  # the same keys in the same order
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            assert back[k].dtype == v.dtype and torch.equal(back[k], v) and back[k].data_ptr() % 64 == 0
        else:
            assert back[k] == v
    assert from_one_buffer(batch) is batch  # a batch from the main process passes through


@pytest.mark.parametrize("streaming", [False, True])
def test_worker_batches_equal_in_process_batches(env, streaming):
    """With a loader worker the batch crosses processes as one buffer (to_one_buffer); what the trainer gets
    is what the in-process loader makes, key order and dtypes included, and resuming from the worker
    loader's state continues where it stopped."""
    cfg = _cfg(env, packing=True, shuffle=True, streaming=streaming)
    kw = dict(seq_length=96, micro_batch_size=2, seed=0, progress=False)
    inproc = _take(build_train_loader(cfg, num_workers=0, **kw), 4)
    loader = build_train_loader(cfg, num_workers=1, **kw)
    it = iter(loader)
    got = [next(it) for _ in range(2)]
    state = loader.state_dict()
    resumed = build_train_loader(cfg, num_workers=1, **kw)
    resumed.load_state_dict(state)
    got += _take(resumed, 2)
    for a, b in zip(inproc, got, strict=True):
        assert list(a) == list(b)
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


def test_pixels_in_token_order(env):
    cfg = _cfg(env, packing=True, shuffle=False)
    loader = build_train_loader(cfg, seq_length=96, micro_batch_size=1, seed=0, num_workers=0, progress=False)
    ds, rows = loader.dataset.ds, loader.dataset.rows
    batch = next(iter(loader))
    paths = [p for r, _ in rows[0] for p in ds[r]["images"]]
    from PIL import Image

    pv, _ = ImageProcessor(min_pixels=1568, max_pixels=100352, pre_min_pixels=1024, pre_max_pixels=262144).process(
        [Image.open(p) for p in paths])
    assert torch.equal(batch["pixel_values"], torch.from_numpy(pv))


def test_cache_reuse_and_invalidation(env, tmp_path):
    shapes = tmp_path / "shapes"
    make_shapes(shapes, num=12, seed=1)
    llava_to_mllm(shapes / "llava_format.json", shapes / "mllm.json")
    base = dict(dataset_dir=str(shapes), cache_dir=str(tmp_path / "cache"))
    tok = env / "tok"
    first = build_dataset(_cfg(env, **base), tok, progress=False)
    again = build_dataset(_cfg(env, **base), tok, progress=False)
    assert not first.from_cache and again.from_cache and again.cache_path == first.cache_path
    assert again.ds["input_ids"] == first.ds["input_ids"]
    changed = build_dataset(_cfg(env, enable_thinking=True, **base), tok, progress=False)
    assert not changed.from_cache and changed.cache_path != first.cache_path
    assert changed.ds["input_ids"] != first.ds["input_ids"]  # no /nothink
    data = json.loads((shapes / "mllm.json").read_text())
    data[0]["messages"][1]["content"] = "blue"
    (shapes / "mllm.json").write_text(json.dumps(data))
    edited = build_dataset(_cfg(env, **base), tok, progress=False)
    assert not edited.from_cache and edited.cache_path != first.cache_path
    tok2 = tmp_path / "tok2"
    save_tiny_tokenizer(tok2)
    (tok2 / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1568, "longest_edge": 3136}}))
    other_proc = build_dataset(_cfg(env, **base), tok2, progress=False)
    assert not other_proc.from_cache and other_proc.cache_path != edited.cache_path
    assert build_dataset(_cfg(env, **base), tok, progress=False).from_cache
    assert not build_dataset(_cfg(env, overwrite_cache=True, **base), tok, progress=False).from_cache


def _take(loader, n):
    it, out = iter(loader), []
    for _ in range(n):
        out.append(next(it))
    return out


def test_streaming_equals_cached_sequence(env):
    for rank in range(2):
        kw = dict(seq_length=96, micro_batch_size=2, seed=0, dp_rank=rank, dp_size=2, num_workers=2, progress=False)
        cached = _take(build_train_loader(_cfg(env, packing=False, shuffle=False), **kw), 5)
        stream = _take(build_train_loader(_cfg(env, packing=False, shuffle=False, streaming=True), **kw), 5)
        for c, s in zip(cached, stream):
            assert c.keys() == s.keys()
            for k in c:
                assert torch.equal(c[k], s[k]) if torch.is_tensor(c[k]) else c[k] == s[k], k


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_exact(env, streaming):
    kw = dict(seq_length=96, micro_batch_size=2, seed=3, num_workers=2, progress=False)
    cfg = _cfg(env, packing=True, shuffle=True, streaming=streaming)
    loader = build_train_loader(cfg, **kw)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(4)]  # crosses the end of the streaming epoch
    resumed = build_train_loader(cfg, **kw)
    resumed.load_state_dict(state)
    got = _take(resumed, 4)
    for e, g in zip(expected, got):
        assert torch.equal(e["input_ids"], g["input_ids"]) and torch.equal(e["labels"], g["labels"])


def test_sampler_ranks_disjoint_and_consumed_offset():
    a = DistributedRowSampler(10, rank=0, world=2, shuffle=True, seed=5)
    b = DistributedRowSampler(10, rank=1, world=2, shuffle=True, seed=5)
    ia, ib = iter(a), iter(b)
    ea, eb = [next(ia) for _ in range(5)], [next(ib) for _ in range(5)]
    assert sorted(ea + eb) == list(range(10))
    assert [next(ia) for _ in range(5)] != ea  # new epoch, new order
    skip = iter(DistributedRowSampler(10, rank=0, world=2, shuffle=True, seed=5, start=3))
    assert [next(skip) for _ in range(2)] == ea[3:5]


def test_packing_efficiency_and_bounds():
    rng = random.Random(0)
    lengths = [min(4096, int(rng.lognormvariate(6.3, 0.6))) + 1 for _ in range(3000)]  # LLaVA-like mix
    rows = plan_rows(lengths, 4096)
    assert sorted(i for r in rows for i in r) == list(range(3000))
    assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    assert sum(lengths) / (len(rows) * 4096) >= 0.95
    assert plan_rows(lengths[:3], 4096, pack=False) == [[0], [1], [2]]


def test_truncate_never_splits_an_image(env):
    img, start = IDS["<|image|>"], IDS["<|begin_of_image|>"]
    ids = [1, 2, start] + [img] * 4 + [IDS["<|end_of_image|>"], 5, 6, 7, 8]
    labels = [-100, 2, -100, -100, -100, -100, -100, -100, 5, 6, 7, 8]
    kw = dict(image_token_id=img, image_start_token_id=start)
    assert truncation_point(ids, labels, 5, **kw) == 2  # cut moved before <|begin_of_image|>
    assert truncation_point(ids, labels, 10, **kw) == 10
    assert truncation_point(ids, [-100] * 8 + [5, 6, 7, 8], 5, **kw) is None  # nothing trained left
    drop = build_train_loader(_cfg(env, too_long="drop"), seq_length=24, micro_batch_size=1, num_workers=0, progress=False)
    cut = build_train_loader(_cfg(env, too_long="truncate"), seq_length=24, micro_batch_size=1, num_workers=0, progress=False)
    assert drop.pack_stats.dropped_too_long > 0 and drop.pack_stats.truncated == 0
    assert cut.pack_stats.truncated > 0 and cut.pack_stats.samples > drop.pack_stats.samples
    for batch in _take(cut, 4):  # one sample a row (packing off), so no padding at micro-batch size 1
        assert batch["input_ids"].shape[1] <= 24 and batch["cu_seqlens"].tolist() == [0, batch["input_ids"].shape[1]]


def _bad_dataset(env, root):
    """One good sample and one bad sample of each kind; returns (data.json, {index: reason fragment})."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 0, 0)).save(root / "img" / "ok.png")
    (root / "img" / "garbage.png").write_bytes(b"this is not an image")
    (root / "img" / "truncated.png").write_bytes((root / "img" / "ok.png").read_bytes()[:60])
    (root.parent / "outside.png").write_bytes((root / "img" / "ok.png").read_bytes())

    def s(user, answer="red", images=("img/ok.png",), first="user"):
        second = "assistant" if first == "user" else "user"
        return {"messages": [{"role": first, "content": user}, {"role": second, "content": answer}], "images": list(images)}

    samples = [
        s("<image>\nWhat color?"),  # 0 good
        s("<image>\nWhat color?", images=["img/garbage.png"]),
        s("<image>\nWhat color?", images=["img/truncated.png"]),
        s("<image><image>\nWhat color?"),
        s("<image>\nWhat color?", first="assistant"),
        s("<image>\nWhat color?", answer="   "),
        s("<image>\nWhat color? " + "very long question " * 30),
        s("<image>\nWhat color?", images=["img/missing.png"]),
        s("<image>\nWhat color?", images=["../outside.png"]),
        s("<image>\nWhat color?", images=[str((root / "img" / "ok.png").resolve())]),
    ]
    reasons = {1: "unreadable or corrupt image", 2: "unreadable or corrupt image", 3: "2 <image> tags for 1 images",
               4: "not from the user", 5: "empty assistant turn", 6: "too long for the sequence",
               7: "missing image file", 8: "outside dataset_dir", 9: "absolute image path"}
    (root / "mllm.json").write_text(json.dumps(samples))
    raw = _raw_cfg(env, dataset_dir=str(root), dataset="mllm.json")
    (root / "data.json").write_text(json.dumps(raw))
    return root / "data.json", reasons


def test_check_names_each_bad_sample(env, tmp_path, capsys):
    data_json, reasons = _bad_dataset(env, tmp_path / "ds")
    assert data_main(["check", "--mm-data", str(data_json), "--seq-length", "64"]) == 1
    out = capsys.readouterr().out
    src = (tmp_path / "ds" / "mllm.json").resolve()
    for i, why in reasons.items():
        assert f"{src}:{i}: " in out and why in [l for l in out.splitlines() if l.startswith(f"{src}:{i}: ")][0], (i, out)
    assert f"{src}:0:" not in out and out.strip().splitlines()[-1] == "checked 10 samples: 1 good, 9 bad"
    assert data_main(["check", "--mm-data", str(tmp_path / "missing.json")]) == 2  # could not check: not "bad"
    # training: skip (default) counts and goes on; error stops naming the samples
    cfg = load_data_config(data_json)
    prepared = build_dataset(cfg, env / "tok", progress=False)
    assert len(prepared.bad) == 7  # all but the truncated png (pixels) and the length (depends on seq_length)
    cfg.basic.on_bad_sample = "error"
    with pytest.raises(ValueError, match=rf"{src}:3: 2 <image> tags"):
        build_dataset(cfg, env / "tok", progress=False)
    cfg.basic.allow_absolute_image_paths = True
    ok = parse_data_config(_raw_cfg(env, dataset_dir=str(tmp_path / "ds"), dataset="mllm.json", allow_absolute_image_paths=True))
    assert len(build_dataset(ok, env / "tok", progress=False).bad) == 5  # absolute and ../ now accepted


def test_data_cli_help(capsys):
    import argparse

    from mmtune.cli import main as mmtune_main
    from mmtune.data.cli import _parser

    tools = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"make-shapes", "llava-to-mllm", "check", "preprocess"} <= set(tools)
    for tool in tools:
        with pytest.raises(SystemExit) as e:
            data_main([tool, "--help"])
        assert e.value.code == 0
    assert "--seq-length" in capsys.readouterr().out
    # `mmtune --help` and `mmtune data --help` name every tool
    assert mmtune_main(["--help"]) == 0
    data_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("data "))
    with pytest.raises(SystemExit) as e:
        mmtune_main(["data", "--help"])
    assert e.value.code == 0
    data_help = capsys.readouterr().out
    for tool in tools:
        assert tool in data_line and tool in data_help, (tool, data_line)


def test_loader_skips_or_stops_on_undecodable_image(env, tmp_path):
    data_json, _ = _bad_dataset(env, tmp_path / "ds")
    cfg = load_data_config(data_json)
    cfg.basic.packing = True  # the three samples share one row
    loader = build_train_loader(cfg, seq_length=512, micro_batch_size=1, num_workers=0, progress=False, seed=0)
    assert loader.pack_stats.samples == 3  # 0, 2 (pixels broken) and 6 (long) pass preprocessing
    batch = next(iter(loader))
    assert batch["num_samples"] == 2  # the truncated png was skipped
    samples = json.loads((tmp_path / "ds" / "mllm.json").read_text())
    (tmp_path / "ds" / "two.json").write_text(json.dumps([samples[0], samples[2]]))
    cfg = parse_data_config(_raw_cfg(env, dataset_dir=str(tmp_path / "ds"), dataset="two.json", on_bad_sample="error",
                                      packing=True))
    loader = build_train_loader(cfg, seq_length=512, micro_batch_size=1, num_workers=0, progress=False, seed=0)
    src = (tmp_path / "ds" / "two.json").resolve()
    with pytest.raises(ValueError, match=rf"{src}:1: unreadable or corrupt image"):
        next(iter(loader))


def test_attr_mapping_datasets_list_max_samples_and_workers(env, tmp_path):
    """sharegpt-style columns through `attr`, two comma-separated files, max_samples per file, and
    preprocessing_num_workers giving the same rows as one process."""
    mllm = json.loads((env / "shapes" / "mllm.json").read_text())
    role = {"user": "human", "assistant": "gpt"}
    share = [{"conversations": [{"from": role[m["role"]], "value": m["content"]} for m in s["messages"]],
              "pics": s["images"], "sys": "Be brief."} for s in mllm]
    (tmp_path / "share.json").write_text("\n".join(json.dumps(s) for s in share))  # jsonl
    for s in mllm:
        s["messages"].insert(0, {"role": "system", "content": "Be brief."})
    (tmp_path / "mllm_sys.json").write_text(json.dumps(mllm))
    raw = _raw_cfg(env, dataset_dir=str(env / "shapes"), dataset=f"{tmp_path / 'share.json'},{tmp_path / 'share.json'}", max_samples=5)
    raw["dataset_param"]["attr"].update(messages="conversations", role_tag="from", content_tag="value", user_tag="human",
                                        assistant_tag="gpt", images="pics", system="sys")
    shared = build_dataset(parse_data_config(raw), env / "tok", progress=False)
    assert len(shared.ds) == 10 and not shared.bad
    ref = build_dataset(parse_data_config(_raw_cfg(env, dataset=str(tmp_path / "mllm_sys.json"), max_samples=5)), env / "tok",
                        progress=False)
    assert shared.ds["input_ids"][:5] == shared.ds["input_ids"][5:] == ref.ds["input_ids"]
    one = build_dataset(_cfg(env), env / "tok", progress=False)
    two = build_dataset(_cfg(env, preprocessing_num_workers=2), env / "tok", progress=False)
    assert two.ds["input_ids"] == one.ds["input_ids"] and two.ds["labels"] == one.ds["labels"]


def test_streaming_resume_rebuilds_open_rows(env):
    cfg = _cfg(env, packing=True, streaming=True)
    kw = dict(seq_length=96, micro_batch_size=1, seed=0, num_workers=0, progress=False)
    stream = build_train_loader(cfg, **kw).dataset
    it = iter(stream)
    checked = 0
    for _ in range(40):  # more than one pass over the 48 samples
        state = stream.state_dict()
        expected = next(it)
        if state["open"]:  # resume from a state with half-filled rows: they are rebuilt from the files
            fresh = StreamingRows(cfg, stream.mat, rank=0, world=1, micro_batch_size=1)
            fresh.load_state_dict(state)
            got = next(iter(fresh))
            assert [s.src for s in got] == [s.src for s in expected]
            checked += 1
            if checked == 4:
                break
        assert sum(len(s.input_ids) for s in expected) <= 96
    assert checked == 4


def _red_sample(*images, user="<image>\nWhat color?"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "red"}], "images": list(images)}


def test_symlinked_images_and_image_dirs_load_and_dotdot_still_escapes(env, tmp_path):
    """A Hugging Face snapshot (its files link into ../../blobs) with data/COCO2017 -> shared storage in it:
    llava-to-mllm and training take the links where they sit; a `..` that climbs out is still refused,
    through a linked folder too."""
    from PIL import Image

    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    (snap / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 0, 0)).save(blobs / "deadbeef", format="PNG")
    (snap / "images" / "0.png").symlink_to("../../../blobs/deadbeef")
    shared = tmp_path / "shared" / "coco" / "train2017"
    shared.mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 0, 0)).save(shared / "1.png")
    (snap / "COCO2017").symlink_to(tmp_path / "shared" / "coco", target_is_directory=True)
    (snap.parent / "secret.png").write_bytes((blobs / "deadbeef").read_bytes())  # where the `..`s lead lexically
    conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    llava = [{"id": "file", "image": "images/0.png", "conversations": conv},
             {"id": "dir", "image": "COCO2017/train2017/1.png", "conversations": conv},
             {"id": "up", "image": "../secret.png", "conversations": conv},
             {"id": "link-up", "image": "COCO2017/../../secret.png", "conversations": conv}]
    (snap / "llava.json").write_text(json.dumps(llava))
    report = llava_to_mllm(snap / "llava.json", snap / "mllm.json")
    assert report.kept == 2 and [n for n, _ in report.skipped] == ["id up", "id link-up"]
    assert report.outside == 0 and report.outside_note(snap / "mllm.json") is None
    assert all("escapes the image dir" in why for _, why in report.skipped)
    converted = json.loads((snap / "mllm.json").read_text())
    assert [s["images"] for s in converted] == [["images/0.png"], ["COCO2017/train2017/1.png"]]  # the links, kept
    samples = converted + [_red_sample("../secret.png"), _red_sample("COCO2017/../../secret.png")]
    (snap / "train.json").write_text(json.dumps(samples))
    cfg = _cfg(env, dataset_dir=str(snap), dataset="train.json", cache_dir=str(tmp_path / "cache"))
    for built in (True, False):  # built, then reused
        prepared = build_dataset(cfg, env / "tok", progress=False)
        assert prepared.from_cache is not built and prepared.good == [0, 1]
        assert [i for i in range(4) if "outside dataset_dir" in prepared.ds[i]["error"]] == [2, 3]
        root = snap.resolve()
        assert prepared.ds["images"][:2] == [[str(root / "images" / "0.png")], [str(root / "COCO2017" / "train2017" / "1.png")]]
    pre = SamplePreprocessor(cfg, env / "tok")  # the streaming / data check path
    assert [pre(s, f"x:{i}")["error"] for i, s in enumerate(samples[:2])] == ["", ""]
    assert "outside dataset_dir" in pre(samples[3], "x:3")["error"]


def test_a_lone_surrogate_is_one_bad_sample(env, tmp_path):
    """A json string with half an emoji ("\\ud83d") loads in Python but cannot be UTF-8 encoded: that sample
    is bad (named), the others go through, in the cached build, the streaming preprocessor and data check."""
    bad_text = '{"messages": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", "content": "ok"}]}'
    bad_image = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "images": ["a\\udc00.png"]}'
    good = _red_sample(user="Name the color in: a red circle. 日本 🙂")
    (tmp_path / "mllm.json").write_text(f"[{json.dumps(good)}, {bad_text}, {json.dumps(good)}, {bad_image}]")
    src = (tmp_path / "mllm.json").resolve()
    expected = [(f"{src}:1", f"{NOT_UTF8} in message 0"), (f"{src}:3", f"{NOT_UTF8} in the 'images' column")]
    cfg = _cfg(env, dataset_dir=str(tmp_path), dataset="mllm.json", cache_dir=str(tmp_path / "cache"))
    for built in (True, False):  # built, then reused
        prepared = build_dataset(cfg, env / "tok", progress=False)
        assert prepared.from_cache is not built and prepared.good == [0, 2] and prepared.bad == expected
    pre = SamplePreprocessor(cfg, env / "tok")
    assert pre(json.loads(bad_text), "x:1")["error"] == expected[0][1] and not pre(good, "x:0")["error"]
    raw = _raw_cfg(env, dataset_dir=str(tmp_path), dataset="mllm.json")
    (tmp_path / "data.json").write_text(json.dumps(raw))
    bad = check_data(str(tmp_path / "data.json"), out=io.StringIO())
    assert bad == expected


def test_a_cache_that_recorded_a_missing_image_is_rebuilt_once_the_image_exists(env, tmp_path, caplog):
    """The fingerprint does not cover image files: a reused cache re-checks the files it recorded missing
    and is rebuilt (once) when one exists now; other bad samples read from a cache name overwrite_cache."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "garbage.png").write_bytes(b"this is not an image")
    samples = [_red_sample("img/a.png"), _red_sample("img/b.png"), _red_sample("img/garbage.png")]
    (tmp_path / "mllm.json").write_text(json.dumps(samples))
    cfg = _cfg(env, dataset_dir=str(tmp_path), dataset="mllm.json", cache_dir=str(tmp_path / "cache"))
    log_name = "mmtune.data.dataset"
    first = build_dataset(cfg, env / "tok", progress=False)
    assert first.good == [0] and "missing image file" in first.bad[0][1] and not first.from_cache
    with caplog.at_level(logging.INFO, logger=log_name):
        again = build_dataset(cfg, env / "tok", progress=False)  # nothing changed: reused as it is
    assert again.from_cache and again.good == [0] and again.cache_path == first.cache_path
    assert "rebuilding" not in caplog.text and "overwrite_cache: true" in caplog.text
    caplog.clear()
    Image.new("RGB", (56, 56), (0, 0, 200)).save(tmp_path / "img" / "b.png")  # the user supplies it
    with caplog.at_level(logging.INFO, logger=log_name):
        fresh = build_dataset(cfg, env / "tok", progress=False)
    assert not fresh.from_cache and fresh.good == [0, 1] and [s for s, _ in fresh.bad] == [first.bad[1][0]]
    assert "rebuilding: 1 image/video files recorded missing now exist" in caplog.text and "rebuilding" in fresh.note
    assert len(list((tmp_path / "cache").glob("mmtune-*.old-*"))) == 1  # the stale one, set aside (not deleted)
    later = build_dataset(cfg, env / "tok", progress=False)  # the rebuilt cache is reused, not rebuilt again
    assert later.from_cache and later.good == [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_point_of_uneven_ranks_skips_no_sample(env, workers):
    """Two ranks of a packed stream, one ahead of the other (7 rows against 3), resumed on one rank from
    their `resume_point`: to the end of the pass it reads every sample neither had trained, each once, and
    again only samples from the point on that the faster rank had trained. Restarting after as many samples
    as were trained (a count) would skip some. (Items are numbered over all ranks in file order, as
    `raw_samples` gives them.)"""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from mmtune.data.dataset import raw_samples
    from mmtune.data.loader import resume_point

    cfg = _cfg(env, packing=True, streaming=True)
    order = [src for _, src in raw_samples(cfg)]
    kw = dict(seq_length=96, micro_batch_size=1, dp_size=2, num_workers=0, progress=False)
    trained, progress = [], []
    for rank, rows in ((0, 7), (1, 3)):
        stream = build_train_loader(cfg, dp_rank=rank, **kw).dataset
        loader = StatefulDataLoader(stream, batch_size=1, num_workers=workers, collate_fn=lambda rows: rows)
        it = iter(loader)
        for _ in range(rows):
            trained += [s.src for row in next(it) for s in row]
        progress += stream.progress(loader.state_dict())
    point = resume_point(progress)
    assert point["epoch"] == 0 and point["open"] and len(set(trained)) == len(trained)
    assert [i for i in range(len(trained)) if order[i] not in trained]  # what a count would skip
    resumed = build_train_loader(cfg, stream_start=point, **dict(kw, dp_size=1)).dataset
    again = []
    for row in iter(resumed):
        again += [s.src for s in row]
        if resumed.state["epoch"] > 0 or len(again) > 2 * len(order):
            break
    again = again[: len(again) - len(row)] if resumed.state["epoch"] > 0 else again  # this pass only
    assert len(set(again)) == len(again)
    assert set(order) - set(trained) - set(again) == set()  # nothing skipped
    assert all(order.index(src) >= point["k"] for src in set(again) & set(trained))  # read twice: past k only


def test_resume_point_takes_the_earliest_pass_and_the_open_items_before_it():
    """A worker already in the next pass counts for nothing (the new ranks read its pass's rest again);
    open items at or after the point are read anyway, so only the earlier ones are reopened."""
    from mmtune.data.loader import resume_point

    progress = [(1, 5, [[2, 3]]), (0, 40, [[30, 31], [39, 45]]), (0, 38, [[12]])]
    assert resume_point(progress) == {"epoch": 0, "k": 38, "open": [[12], [30, 31]]}
