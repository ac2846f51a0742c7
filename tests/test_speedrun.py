"""The speedrun configs' pieces: their callbacks are basic.yaml's plus the EMA of the weights
and the heap allocator
(each config itself runs shrunk in tests/test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import CONFIGS


def test_speedrun_callbacks_extend_the_basic_set_with_ema_and_the_heap():
    basic = yaml.safe_load((CONFIGS / "callbacks/basic.yaml").read_text())
    speedrun = yaml.safe_load((CONFIGS / "callbacks/speedrun.yaml").read_text())
    assert speedrun[: len(basic)] == basic
    assert [c["class_path"] for c in speedrun[len(basic) :]] == [
        "dnn_tricks.callbacks.averaging.EMA",
        "dnn_tricks.callbacks.allocator.HeapAllocator",
    ]


def _top_level_keys(config: Path) -> dict:
    """A config file's top-level keys over those of its `config:` parents (child wins)."""
    text = yaml.safe_load(config.read_text())
    parent = text.pop("config", None)
    return {**(_top_level_keys(config.parent / parent) if parent else {}), **text}


def test_every_speedrun_config_uses_the_speedrun_callbacks_and_resident_data():
    for config in sorted((CONFIGS / "speedrun").glob("*.yaml")):
        text = _top_level_keys(config)
        assert text["trainer.callbacks"] == "../callbacks/speedrun.yaml", config.name
        assert text["data"]["device_resident"] is True, config.name
