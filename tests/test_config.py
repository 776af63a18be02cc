"""Config: strict sections, every problem at once, overrides, clean CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from trustee.config import (
    Config,
    ConfigError,
    Section,
    field_docs,
    load_config,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"cpu-tiny.toml", "8gpu.toml", "1gpu-qlora.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_resolves(path):
    cfg = load_config(path)
    res = resolve(cfg, "runs/x")
    assert res.episodes_per_step == cfg.grpo.tasks_per_step * cfg.grpo.group_size
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must open with a comment saying what the run is for"


def _all_sections():
    seen, todo = [], [Config]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in msgspec.structs.fields(cls):
            tp = f.type
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
                todo.append(tp)
    return seen


@pytest.mark.parametrize("cls", _all_sections(), ids=lambda c: c.__name__)
def test_every_section_is_strict_and_documented(cls):
    assert issubclass(cls, Section)
    cfg = cls.__struct_config__
    assert cfg.forbid_unknown_fields and cfg.frozen
    with pytest.raises(TypeError):  # keyword-only: positional construction is refused
        cls(*[None] * len(msgspec.structs.fields(cls)))
    docs = field_docs(cls)
    undocumented = [
        f.name
        for f in msgspec.structs.fields(cls)
        if f.name not in docs and not (isinstance(f.type, type) and issubclass(f.type, Section))
    ]
    assert undocumented == [], f"{cls.__name__}: fields without a one-line docstring: {undocumented}"


def test_three_problems_reported_together(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[grpo]\ngroup_size = 1\nbogus_key = 3\n[rollout]\nmax_turns = "ten"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    paths = {x.path for x in e.value.problems}
    assert paths == {"grpo.group_size", "grpo.bogus_key", "rollout.max_turns"}
    msg = str(e.value)
    assert "3 problems" in msg and "set grpo.group_size to an integer >= 2" in msg and "'ten'" in msg


def test_unknown_key_suggests_the_near_name():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.lora_rnk=8"])
    assert "did you mean 'lora_rank'" in str(e.value)


def test_cross_field_checks_are_collected():
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "grpo.clip_low=0.3",
                "grpo.clip_high=0.1",
                "placement.policy_gpus=[0, 1]",
                "engines.simulator.backend=openai",
                "curriculum.low=0.6",
            ],
        )
    paths = [p.path for p in e.value.problems]
    assert paths == [
        "grpo.clip_high",
        "curriculum.high",
        "placement.policy_gpus",
        "engines.simulator.base_url",
    ]


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(
        None,
        [
            "grpo.group_size=4",
            "learner.lr=3e-5",
            "model.enable_thinking=true",
            "learner.lora_targets=['q_proj', 'v_proj']",
            "model.path=/models/with=equals",
            "name=123",
        ],
    )
    assert cfg.grpo.group_size == 4 and cfg.learner.lr == 3e-5 and cfg.model.enable_thinking is True
    assert cfg.learner.lora_targets == ["q_proj", "v_proj"]
    assert cfg.model.path == "/models/with=equals" and cfg.name == "123"


def test_a_simulator_engine_table_keeps_the_simulator_s_own_defaults(tmp_path):
    # Writing one key of [engines.simulator] must not give the simulator the policy engine's
    # adapter slot and sleep mode (EngineConfig's class defaults) for the keys not written.
    default = load_config(None).engines.simulator
    assert default.max_lora_rank == 0 and default.enable_sleep_mode is False
    path = tmp_path / "c.toml"
    path.write_text("[engines.simulator]\nmax_num_seqs = 4\n")
    sim = load_config(path).engines.simulator
    assert sim.max_num_seqs == 4
    assert sim.max_lora_rank == 0 and sim.enable_sleep_mode is False
    # the same through --set, and what the file sets still wins
    sim = load_config(None, ["engines.simulator.max_num_seqs=8"]).engines.simulator
    assert sim.max_num_seqs == 8 and sim.max_lora_rank == 0 and sim.enable_sleep_mode is False
    path.write_text("[engines.simulator]\nenable_sleep_mode = true\n")
    assert load_config(path).engines.simulator.enable_sleep_mode is True
    # the policy engine keeps EngineConfig's defaults
    assert load_config(path).engines.policy.max_lora_rank > 0


def test_syntax_error_and_missing_file_are_config_errors(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[grpo\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def _run(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "trustee.run", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[grpo]\ngroup_size = 1\nunknown = 1\n[learner]\nlr = "fast"\n')
    r = _run(str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    for path in ("grpo.group_size", "grpo.unknown", "learner.lr"):
        assert path in r.stderr


def test_cli_dry_run_prints_plan(tmp_path):
    r = _run("configs/cpu-tiny.toml", "--dry-run", "--set", "grpo.steps=3", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "3 x 8 tasks x 4 episodes = 96 episodes" in r.stdout
    assert not (tmp_path / "run").exists()


def test_cli_run_writes_resolved_config(tmp_path, tiny_model_dir):
    import hashlib

    def digest():
        return hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()

    before = digest()
    out = tmp_path / "run"
    r = _run(
        "configs/cpu-tiny.toml",
        *("--set", f"model.path={tiny_model_dir}", "--set", "model.tiny=''", "--set", "grpo.steps=1"),
        *("--set", "grpo.tasks_per_step=2"),
        *(
            "--set",
            "grpo.group_size=2",
            "--set",
            "rollout.max_tokens_per_turn=16",
            "--set",
            "logging.progress_bar=false",
        ),
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    resolved = json.loads((out / "resolved.json").read_text())
    assert resolved["policy_model"] == str(tiny_model_dir) and resolved["device"] == "cpu"
    assert json.loads((out / "config.json").read_text())["grpo"]["group_size"] == 2
    assert "prefix-preserving" in r.stdout
    # cpu-tiny asks for an SFT-warmed tiny model, but an existing model directory is never modified.
    assert digest() == before


def test_cli_help():
    r = _run("--help")
    assert r.returncode == 0 and "--set" in r.stdout and "--dry-run" in r.stdout
