"""The speedrun configs' pieces: their callbacks are basic.yaml's plus the heap allocator
(CPU) or the EMA of the weights (GPU), and their data is resident
(each config itself runs shrunk in tests/test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import CONFIGS

SPEEDRUN_CALLBACKS = {
    "speedrun.yaml": ["dnn_tricks.callbacks.allocator.HeapAllocator"],
    "speedrun_ema.yaml": ["dnn_tricks.callbacks.averaging.EMA"],
}


def test_speedrun_callbacks_extend_the_basic_set():
    basic = yaml.safe_load((CONFIGS / "callbacks/basic.yaml").read_text())
    for name, added in SPEEDRUN_CALLBACKS.items():
        speedrun = yaml.safe_load((CONFIGS / "callbacks" / name).read_text())
        assert speedrun[: len(basic)] == basic, name
        assert [c["class_path"] for c in speedrun[len(basic) :]] == added, name


def _top_level_keys(config: Path) -> dict:
    """A config file's top-level keys over those of its `config:` parents (child wins)."""
    text = yaml.safe_load(config.read_text())
    parent = text.pop("config", None)
    return {**(_top_level_keys(config.parent / parent) if parent else {}), **text}


def test_every_speedrun_config_uses_speedrun_callbacks_and_resident_data():
    callbacks = {f"../callbacks/{name}" for name in SPEEDRUN_CALLBACKS}
    for config in sorted((CONFIGS / "speedrun").glob("*.yaml")):
        text = _top_level_keys(config)
        assert text["trainer.callbacks"] in callbacks, config.name
        assert text["data"]["device_resident"] is True, config.name
