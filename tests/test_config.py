import json

import pytest
from transformers import AutoConfig

from mmtune.models.glm4v_moe.config import Glm4vMoeConfig, glm45v_config, tiny_config
from mmtune.models.glm4v_moe.rope import get_rope_index


@pytest.mark.parametrize("make", [tiny_config, glm45v_config])
def test_config_round_trip_and_transformers_reads_it(tmp_path, make):
    cfg = make()
    cfg.save_pretrained(tmp_path)
    assert Glm4vMoeConfig.from_pretrained(tmp_path) == cfg
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "glm4v_moe"
    assert hf.text_config.head_dim == cfg.text.head_dim
    assert hf.text_config.vocab_size == cfg.text.vocab_size
    assert hf.text_config.rope_parameters["mrope_section"] == cfg.text.mrope_section
    assert hf.image_token_id == cfg.image_token_id


def test_legacy_rope_style_is_read(tmp_path):
    d = glm45v_config().to_dict()
    rope = d["text_config"].pop("rope_parameters")
    d["text_config"].update(rope_scaling={"type": "default", "mrope_section": [8, 12, 12]},
                            rope_theta=rope["rope_theta"], partial_rotary_factor=0.5)
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = Glm4vMoeConfig.from_pretrained(tmp_path)
    assert cfg.text.mrope_section == [8, 12, 12] and cfg.text.rotary_dim == 64 and cfg.text.rope_theta == 10000


def test_bad_configs_name_the_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json.*model_type is 'llama'"):
        Glm4vMoeConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Glm4vMoeConfig.from_pretrained(tmp_path / "nope")
    d = glm45v_config().to_dict()
    d["text_config"]["rope_parameters"]["mrope_section"] = [8, 8, 8]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="mrope_section"):
        Glm4vMoeConfig.from_pretrained(tmp_path)


def test_rope_index_equals_transformers():
    import types

    import torch
    from transformers import Glm4vMoeConfig as HFConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeModel

    from mmtune.models.glm4v_moe.rope import mm_token_types

    fake = types.SimpleNamespace(config=HFConfig())
    fake.get_vision_position_ids = types.MethodType(Glm4vMoeModel.get_vision_position_ids, fake)
    I, VS, VE, BI, EI = 151363, 151341, 151342, 151339, 151340
    ids = torch.tensor([1] * 7 + [BI] + [I] * 6 + [EI] + [5] * 3 + [BI] + [I] * 4 + [EI]
                       + [VS, BI] + [I] * 4 + [EI, 7, BI] + [I] * 4 + [EI, VE, 9, 9])
    image_grid, video_grid = torch.tensor([[1, 4, 6], [1, 4, 4]]), torch.tensor([[2, 4, 4]])
    types_ = mm_token_types(ids, image_token_id=I, video_start_token_id=VS, video_end_token_id=VE)
    ref, ref_delta = Glm4vMoeModel.get_rope_index(fake, ids[None], types_[None], image_grid, video_grid.clone())
    ours, delta = get_rope_index(ids, image_grid, video_grid, image_token_id=I, video_start_token_id=VS,
                                 video_end_token_id=VE)
    assert torch.equal(ref[:, 0], ours) and int(ref_delta) == delta
    # 7 text tokens, then a 2x3 LLM grid: the example of docs/GLM45V.md section 3
    assert ours[:, 8:14].tolist() == [[8] * 6, [8, 8, 8, 9, 9, 9], [8, 9, 10, 8, 9, 10]]
    with pytest.raises(ValueError, match="grids"):
        get_rope_index(ids, image_grid[:1], video_grid, image_token_id=I, video_start_token_id=VS,
                       video_end_token_id=VE)
