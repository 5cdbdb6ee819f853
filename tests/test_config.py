"""Config loading: defaults < file < overrides; unknown keys and wrong types are errors naming the key."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from lmforge.config import apply_overrides, build_config, flat_fields, load_config
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10  # optimizer steps
    schedule: Literal["cosine", "wsd"] = "cosine"


@dataclass
class Outer:
    name: str = "run"
    compile: bool = False
    tags: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    train: Inner = field(default_factory=Inner)


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "from-file"\n[train]\nlr = 0.5\nsteps = 3\n')
    cfg = load_config(Outer, path, {"train.steps": "7", "compile": "true", "tags": "a,b"})
    assert cfg.name == "from-file" and cfg.train.lr == 0.5 and cfg.train.steps == 7
    assert cfg.compile is True and cfg.tags == ["a", "b"] and cfg.limit is None


@pytest.mark.parametrize("suffix,text", [(".yaml", "train:\n  lr: 0.25\n"), (".json", '{"train": {"lr": 0.25}}')])
def test_yaml_and_json(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert load_config(Outer, path).train.lr == 0.25


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        build_config(Outer, {"train": {"lrr": 1.0}})


@pytest.mark.parametrize("data,key", [({"train": {"steps": "ten"}}, "train.steps"), ({"compile": "maybe"}, "compile"),
                                      ({"train": {"schedule": "linear"}}, "train.schedule"),
                                      ({"train": 3}, "train")])
def test_wrong_type_names_the_key(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        build_config(Outer, data)


def test_optional_none_and_int_from_float_string():
    cfg = build_config(Outer, {"limit": "none", "train": {"steps": "1e3"}})
    assert cfg.limit is None and cfg.train.steps == 1000


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(Outer, bad)
    other = tmp_path / "c.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match="expected a .toml"):
        load_config(Outer, other)


def test_overrides_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, {"name.sub": 1})


def test_flat_fields_lists_leaves():
    keys = [k for k, _, _, _ in flat_fields(Outer)]
    assert keys == ["name", "compile", "tags", "limit", "train.lr", "train.steps", "train.schedule"]
    assert dict((k, h) for k, _, _, h in flat_fields(Outer))["train.steps"] == "optimizer steps"


def test_model_config_derived_fields_and_errors():
    cfg = ModelConfig(d_model=96, n_head=6, n_kv_head=2, mlp="swiglu", multiple_of=32)
    assert cfg.head_dim == 16 and cfg.d_ff == 256 and cfg.qkv_bias is False
    assert ModelConfig(mlp="gelu", d_model=64, n_head=4).d_ff == 256
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("nope")
    llama = ModelConfig.preset("tiny-llama", vocab_size=300)
    assert llama.vocab_size == 300 and llama.positions == "rope" and llama.n_kv_head == 2
    assert ModelConfig.from_dict(llama.to_dict()) == llama


@pytest.mark.parametrize("overrides", [
    {"n_head": 0}, {"n_kv_head": 0}, {"n_kv_head": -2}, {"head_dim": 0}, {"d_ff": 0}, {"multiple_of": 0},
    {"d_model": -1}, {"vocab_size": 0},
])
def test_model_config_rejects_non_positive_sizes(overrides):
    (name, value), = overrides.items()
    with pytest.raises(ConfigError, match=rf"model\.{name} must be positive, got {value}"):
        ModelConfig(**overrides)
    with pytest.raises(ConfigError, match=rf"model\.{name} must be positive"):
        build_config(ModelConfig, {name: str(value)}, prefix="model.")


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_model_config_rejects_bad_dropout(dropout):
    with pytest.raises(ConfigError, match=r"model\.dropout must be in \[0, 1\)"):
        ModelConfig(dropout=dropout)
    assert ModelConfig(dropout=0.5).dropout == 0.5


def test_field_comments_merge_over_base_classes():
    from lmforge.config import field_comments
    from lmforge.infer.generate import GenerateConfig, GenerationConfig

    base = field_comments(GenerationConfig)
    assert "greedy" in base["temperature"]
    helps = {k: h for k, _, _, h in flat_fields(GenerateConfig)}
    assert all(helps[name] == text for name, text in base.items())  # inherited from the base class
    assert "cuda" in helps["device"]  # the subclass's own fields are still there

    @dataclass
    class Sub(GenerationConfig):
        temperature: float = 0.7  # overridden help

    assert field_comments(Sub)["temperature"] == "overridden help"
    assert field_comments(Sub)["top_k"] == base["top_k"]


def test_example_configs_are_valid():
    from pathlib import Path

    from lmforge.data.prepare import DataConfig
    from lmforge.train.config import PretrainConfig

    configs = Path(__file__).resolve().parent.parent / "configs"
    data = load_config(DataConfig, configs / "data-wordnet-kjv.toml")
    assert [s.weight for s in data.sources] == [2.0, 0.5]
    llama = load_config(PretrainConfig, configs / "pretrain-llama-small.toml")
    gpt2 = load_config(PretrainConfig, configs / "pretrain-gpt2-small.yaml")
    assert llama.model.n_kv_head == 2 and gpt2.model.tie_embeddings and gpt2.train.schedule == "wsd"


def test_a_stage_keeps_its_section_defaults_when_some_keys_are_set(tmp_path):
    from lmforge.config import load_config
    from lmforge.stages.config import SFTConfig
    from lmforge.train.config import PretrainConfig

    sft = load_config(SFTConfig, None, {"train.max_steps": 5})
    assert (sft.train.max_steps, sft.train.lr, sft.train.weight_decay) == (5, 3e-4, 0.0)  # not TrainConfig's 1e-3, 0.1
    (tmp_path / "sft.toml").write_text("[train]\nlr = 1e-3\n")
    assert load_config(SFTConfig, tmp_path / "sft.toml").train.weight_decay == 0.0
    pre = load_config(PretrainConfig, None, {"model.n_head": 8, "model.d_model": 512})
    assert (pre.model.n_kv_head, pre.model.head_dim) == (8, 64)  # derived fields are derived anew
