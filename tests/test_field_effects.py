"""Each config field changes what its component does: small checks for the fields whose
evidence in the config walk (tests/test_config_fields.py) was only "the value is read
somewhere" or a test that named the field without varying it.

Every check loads a config through `load_config` (the user's path: a TOML section or a
`--set`), builds the component the way a run builds it (`placement.build_learner`,
`envs.build_environment`, `train.collect`, `trustee.eval`'s runner), and compares an
observable outcome between two values of the field: the sampling parameters an engine
receives, the metrics of a learner step, the built object's settings, what an eval writes.
Engines are test doubles named as such (`Fake*`, `Scripted*`); the learner and the chat
rendering are real (the tiny random model).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest
import torch

from trustee.config import load_config, resolve
from trustee.engines.base import Completion, EngineStats, Sampling


def _cfg(tiny_model_dir, *overrides: str):
    return load_config(None, [f"model.path={tiny_model_dir}", *overrides])


# ============================================================================= engines


def test_simulator_sleep_mode_lets_the_engine_sleep_or_refuses(tiny_model_dir):
    """engines.simulator.enable_sleep_mode: the built engine sleeps only when it is on (the
    simulator's default is off: it stays resident unless a placement needs it asleep)."""
    from trustee.engines import build_engine

    async def sleeps(*overrides: str) -> bool:
        cfg = _cfg(tiny_model_dir, *overrides)
        engine = build_engine(cfg.engines.simulator, str(tiny_model_dir), max_model_len=256)
        try:
            await engine.sleep(1)
        except ValueError as e:
            assert "enable_sleep_mode = false" in str(e)
            return False
        finally:
            await engine.wake()
            await engine.close()
        return True

    assert anyio.run(sleeps) is False
    assert anyio.run(sleeps, "engines.simulator.enable_sleep_mode=true") is True


def test_seed_fixes_the_policy_engines_sampling(tiny_model_dir, tmp_path):
    """seed: the policy engine a run builds samples the same tokens for the same seed and
    others for another seed (temperature 1, the same keyed request)."""
    from trustee.placement import build_engine

    async def sample(seed: int) -> list[list[int]]:
        cfg = _cfg(
            tiny_model_dir, f"seed={seed}", "model.max_model_len=256", "rollout.max_tokens_per_turn=32"
        )
        engine = build_engine(
            cfg.engines.policy, str(tiny_model_dir), cfg, resolve(cfg, tmp_path), role="policy"
        )
        try:
            params = Sampling(max_tokens=16, temperature=1.0)
            return [
                list((await engine.generate([1, 2, 3, 4], params, key=f"k{i}")).token_ids) for i in range(3)
            ]
        finally:
            await engine.close()

    a, b, c = anyio.run(sample, 0), anyio.run(sample, 0), anyio.run(sample, 1)
    assert a == b and a != c


def test_model_dtype_is_the_learners_and_engines_dtype(tiny_model_dir, tiny_tokenizer, tmp_path):
    """model.dtype: 'auto' is float32 on the CPU; an explicit dtype loads the learner's and the
    policy engine's weights in it."""
    from trustee.placement import build_engine, build_learner

    def dtypes(*overrides: str) -> tuple[torch.dtype, torch.dtype]:
        cfg = _cfg(tiny_model_dir, "model.max_model_len=256", "rollout.max_tokens_per_turn=32", *overrides)
        res = resolve(cfg, tmp_path)
        learner = build_learner(cfg, res, tiny_tokenizer)
        engine = build_engine(cfg.engines.policy, str(tiny_model_dir), cfg, res, role="policy")
        anyio.run(engine.close)
        return next(learner.model.parameters()).dtype, next(engine._model.parameters()).dtype

    assert dtypes() == (torch.float32, torch.float32)
    assert dtypes("model.dtype=bfloat16") == (torch.bfloat16, torch.bfloat16)


def test_tiny_builds_the_missing_model(tmp_path):
    """model.tiny: a run whose model directory is missing builds the tiny model there; without
    it the start says the directory is missing and builds nothing."""
    from trustee.run import _model_checks

    path = tmp_path / "models" / "m"
    notes = _model_checks(load_config(None, [f"model.path={path}"]), build=True)
    assert not path.exists() and "not found" in notes[0]
    notes = _model_checks(load_config(None, [f"model.path={path}", "model.tiny=test"]), build=True)
    assert (path / "config.json").exists() and (path / "tokenizer_config.json").exists()
    assert notes[0] == f"built tiny model (test) at {path}"


# ============================================================================= simulator


def test_simulator_model_path_picks_the_simulator_model(tiny_model_dir, tmp_path):
    """simulator.model_path: '' = the policy's model; a path = that model, shown in the plan."""
    from trustee.run import format_plan

    other = tmp_path / "sim-model"
    same = _cfg(tiny_model_dir)
    own = _cfg(tiny_model_dir, f"simulator.model_path={other}")
    r_same, r_own = resolve(same, tmp_path / "run"), resolve(own, tmp_path / "run")
    assert r_same.simulator_model == os.path.abspath(tiny_model_dir)
    assert r_own.simulator_model == str(other)
    assert f"simulator  {other}" in format_plan(own, r_own, [])
    assert f"simulator  {r_same.simulator_model}" in format_plan(same, r_same, [])


def test_judge_temperature_is_the_judges_sampling_temperature(tiny_model_dir, tiny_tokenizer):
    """simulator.judge_temperature: the judge's requests carry it; simulator.temperature: the
    other roles' requests (here the user's) carry that one."""
    import msgspec
    from test_sim_roles import ScriptedTextEngine, _task, _tv

    from trustee.envs import build_environment
    from trustee.sim.log import SimLog
    from trustee.sim.user import UserReply
    from trustee.types import Message

    async def temps(*overrides: str) -> tuple[set[float], float]:
        cfg = _cfg(tiny_model_dir, *overrides)
        engine = ScriptedTextEngine(tiny_tokenizer, [msgspec.json.encode(_tv("yes")).decode()])
        env = build_environment(cfg, engine, tiny_tokenizer)
        task = _task()
        msgs = [Message(role="user", content="hi"), Message(role="assistant", content="Oslo: 3 C")]
        await env.judge.score(task, SimLog.replay(task, msgs), "ended", key="t1")
        judge = {p.temperature for p in engine.params}
        engine.texts = ['{"message": "Oslo, please.", "status": "continue"}']
        await env.client.ask("user", msgs, UserReply, key="t1")
        return judge, engine.params[-1].temperature

    assert anyio.run(temps) == ({0.1}, 0.7)
    assert anyio.run(temps, "simulator.judge_temperature=0.9", "simulator.temperature=0.3") == ({0.9}, 0.3)


def test_judge_mode_and_task_budget_shape_the_simulated_environment(tiny_model_dir, tiny_tokenizer):
    """simulator.judge_mode: 'scripted' scores in code (no judge request reaches the engine);
    simulator.task_max_tokens: a budget under the task generator's longest output is refused
    at build time, naming the field and the size it needs."""
    from test_sim_roles import ScriptedTextEngine, _task

    from trustee.envs import build_environment
    from trustee.sim.judge import Judge, ScriptedJudge
    from trustee.sim.log import SimLog
    from trustee.types import Message

    def env(*overrides: str):
        engine = ScriptedTextEngine(tiny_tokenizer, ["{}"])
        return build_environment(_cfg(tiny_model_dir, *overrides), engine, tiny_tokenizer), engine

    assert isinstance(env()[0].judge, Judge)
    scripted, engine = env("simulator.judge_mode=scripted")
    assert isinstance(scripted.judge, ScriptedJudge)
    task = _task()
    msgs = [Message(role="user", content="hi"), Message(role="assistant", content="done")]
    score, _ = anyio.run(lambda: scripted.judge.score(task, SimLog.replay(task, msgs), "ended", key="t1"))
    assert score.reward in (-1.0, 0.0, 1.0) and engine.params == []
    with pytest.raises(
        ValueError, match=r"simulator.task_max_tokens = 200: .* set simulator.task_max_tokens >= \d+"
    ):
        env("simulator.task_max_tokens=200")


def test_max_user_turns_caps_the_user_simulators_replies(tiny_model_dir, tiny_tokenizer):
    """simulator.max_user_turns: a user who always has more to say replies at most this many
    times; then the episode ends."""
    from test_episode import ScriptedPolicy
    from test_sim_roles import ScriptedTextEngine, _task

    from trustee.config import RolloutConfig
    from trustee.envs import build_environment
    from trustee.rollout.episode import EpisodeRunner

    def user_messages(*overrides: str) -> int:
        cfg = _cfg(tiny_model_dir, "simulator.judge_mode=scripted", *overrides)
        sim = ScriptedTextEngine(tiny_tokenizer, ['{"message": "Tell me more.", "status": "continue"}'])
        env = build_environment(cfg, sim, tiny_tokenizer)
        policy = ScriptedPolicy(tiny_tokenizer, ["Could you say more?"])
        runner = EpisodeRunner(policy, tiny_tokenizer, cfg=RolloutConfig(max_turns=12))
        traj = anyio.run(lambda: runner.run(env, _task(), "e"))
        assert traj.status in ("ok", "truncated"), traj.error
        return sum(m.role == "user" for m in traj.messages)

    assert user_messages("simulator.max_user_turns=1") == 1 + 1  # the opening query + one reply
    assert user_messages("simulator.max_user_turns=3") == 1 + 3


# ============================================================================= environment


def _bfcl_cfg(tiny_model_dir, *overrides: str):
    pytest.importorskip("bfcl_eval", reason="needs bfcl-eval")
    return _cfg(tiny_model_dir, "environment.kind=bfcl", "environment.reward=progress", *overrides)


def test_bfcl_categories_choose_what_training_draws(tiny_model_dir):
    """environment.bfcl.categories: tasks come only from the listed categories."""
    from trustee.envs import build_environment
    from trustee.types import Knobs

    async def drawn(*overrides: str) -> set[str]:
        env = build_environment(_bfcl_cfg(tiny_model_dir, *overrides))
        rng = random.Random(0)
        return {(await env.make_task(Knobs(), rng)).payload["category"] for _ in range(40)}

    assert anyio.run(drawn, 'environment.bfcl.categories=["multi_turn_miss_param"]') == {"miss_param"}
    assert len(anyio.run(drawn)) >= 3  # the default: all four multi-turn categories


def test_bfcl_system_prompt_opens_the_episode(tiny_model_dir):
    """environment.bfcl.system_prompt: '' = no system message (BFCL's mode); text = the first message."""
    from trustee.envs import build_environment
    from trustee.types import Knobs

    async def first(*overrides: str):
        env = build_environment(_bfcl_cfg(tiny_model_dir, *overrides))
        task = await env.make_task(Knobs(), random.Random(0))
        return (await env.start(task, "e0")).messages[0]

    m = anyio.run(first)
    assert m.role == "user"
    m = anyio.run(first, "environment.bfcl.system_prompt=Answer with tool calls only.")
    assert (m.role, m.content) == ("system", "Answer with tool calls only.")


def test_bfcl_split_fields_choose_the_training_pool(tiny_model_dir):
    """environment.bfcl.train_fraction: the share of each category in the train half;
    environment.bfcl.split: which half training draws from (train and heldout are disjoint,
    'all' is both); environment.bfcl.split_seed: which entries fall in each half."""
    from trustee.envs import build_environment

    def pool(*overrides: str) -> set[str]:
        return {i.id for i in build_environment(_bfcl_cfg(tiny_model_dir, *overrides)).pool()}

    train, held, every = pool(), pool("environment.bfcl.split=heldout"), pool("environment.bfcl.split=all")
    assert train and held and not train & held and train | held == every
    quarter = pool("environment.bfcl.train_fraction=0.25")
    assert quarter < every and len(quarter) == pytest.approx(len(train) / 2, abs=4)
    reseeded = pool("environment.bfcl.split_seed=1")
    assert len(reseeded) == len(train) and reseeded != train


_FACTORY = """
class NullEnv:
    name = "null"

    def __init__(self, simulator):
        self.simulator = simulator

    async def make_task(self, knobs, rng): ...
    async def start(self, task, episode_id, group=None): ...
    async def step(self, state, action): return []
    async def score(self, state): ...


def make_env(ctx):
    return NullEnv(ctx.simulator)
"""


def test_uses_simulator_starts_the_simulator_engine_for_the_factory(tiny_model_dir, tmp_path):
    """environment.uses_simulator (kind 'python'): the run's placement starts the simulator
    engine and the factory gets a client of it; off, no simulator engine and ctx.simulator
    is None."""
    from transformers import AutoTokenizer

    from trustee.envs import build_environment
    from trustee.placement import Placement

    mod = tmp_path / "null_env.py"
    mod.write_text(_FACTORY)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    async def seen(*overrides: str):
        cfg = _cfg(
            tiny_model_dir,
            "environment.kind=python",
            "environment.reward=custom",
            f"environment.factory={mod}:make_env",
            *overrides,
        )
        placement = await Placement.start(cfg, resolve(cfg, tmp_path / "run"))
        try:
            env = build_environment(cfg, placement.simulator, tok)
        finally:
            await placement.close()
        return placement.simulator, env.simulator

    engine, client = anyio.run(seen)
    assert engine is None and client is None
    engine, client = anyio.run(seen, "environment.uses_simulator=true")
    assert engine is not None and client is not None and client.engine is engine


# ============================================================================= rollout


class FakePeakPolicy:
    """Test double for the policy engine: answers every turn with a fixed text after a short
    pause; records the sampling parameters and the most requests in flight at once."""

    version = 0

    def __init__(self, tokenizer):
        self.ids = tokenizer.encode("The answer is 7.<|im_end|>", add_special_tokens=False)
        self.params: list[Sampling] = []
        self.active = self.peak = 0

    async def generate(self, prompt, params, *, key=None):
        self.params.append(params)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await anyio.sleep(0.2)  # long enough for every episode allowed to run to be in flight
        finally:
            self.active -= 1
        return Completion(
            token_ids=list(self.ids), logprobs=[-1.0] * len(self.ids), finish_reason="stop", policy_version=0
        )

    async def sleep(self, level: int = 1) -> None: ...
    async def wake(self) -> None: ...
    async def update_weights(self, update) -> None: ...
    async def close(self) -> None: ...
    def stats(self) -> EngineStats:
        return EngineStats()


def _collect(tiny_model_dir, tokenizer, *overrides: str) -> FakePeakPolicy:
    """One step's rollouts through `train.collect` (toy environment, real episode runner)."""
    from trustee.curriculum import Curriculum
    from trustee.envs import build_environment
    from trustee.rollout.episode import EpisodeRunner
    from trustee.train import collect

    cfg = _cfg(
        tiny_model_dir,
        "environment.kind=toy",
        "environment.reward=exact",
        "grpo.tasks_per_step=4",
        "grpo.group_size=2",
        "rollout.max_turns=1",
        *overrides,
    )
    policy = FakePeakPolicy(tokenizer)
    runner = EpisodeRunner.from_config(cfg.rollout, cfg.model, policy, tokenizer)
    env = build_environment(cfg)
    anyio.run(collect, env, runner, Curriculum(cfg.curriculum), cfg, random.Random(0), 0, {})
    assert len(policy.params) == 8
    return policy


def test_max_inflight_episodes_bounds_the_episodes_running_at_once(tiny_model_dir, tiny_tokenizer):
    """rollout.max_inflight_episodes: 2 (one group of 2) runs the 8 episodes 2 at a time;
    the default lets all 8 run together."""
    assert _collect(tiny_model_dir, tiny_tokenizer, "rollout.max_inflight_episodes=2").peak == 2
    assert _collect(tiny_model_dir, tiny_tokenizer).peak == 8


def test_rollout_temperature_reaches_the_engine_and_the_learner(tiny_model_dir, tiny_tokenizer, tmp_path):
    """rollout.temperature: every policy request samples at it, and the learner recomputes
    log-probs at the same temperature."""
    from trustee.placement import build_learner

    policy = _collect(tiny_model_dir, tiny_tokenizer, "rollout.temperature=0.6")
    assert {p.temperature for p in policy.params} == {0.6}
    assert {p.temperature for p in _collect(tiny_model_dir, tiny_tokenizer).params} == {1.0}
    cfg = _cfg(tiny_model_dir, "rollout.temperature=0.6")
    assert build_learner(cfg, resolve(cfg, tmp_path), tiny_tokenizer).temperature == 0.6


# ============================================================================= learner


def _step(tiny_model_dir, tokenizer, tmp_path, *overrides: str, hook=None):
    """One learner step, the learner built as a run builds it (`placement.build_learner`), on
    fixed groups; returns (metrics, learner). The LoRA init is seeded, so two learners differ
    only by the overrides."""
    from test_learn_policy import fixed_groups

    from trustee.placement import build_learner

    cfg = _cfg(tiny_model_dir, "learner.lr=0.01", "learner.gradient_checkpointing=false", *overrides)
    torch.manual_seed(0)
    learner = build_learner(cfg, resolve(cfg, tmp_path), tokenizer)
    if hook is not None:
        hook(learner)
    return learner.step(fixed_groups(0)), learner


def _head_rows(rows: list[int]):
    """A hook that records the rows of each lm_head call."""

    def hook(learner):
        head = learner.model.get_output_embeddings()
        head.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))

    return hook


def _lora_a(learner) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in learner.model.named_parameters() if "lora_A" in n])


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The default learner's step (metrics, learner, rows of each lm_head call), shared by the
    comparisons below."""
    rows: list[int] = []
    m, learner = _step(tiny_model_dir, tiny_tokenizer, tmp_path_factory.mktemp("base"), hook=_head_rows(rows))
    return m, learner, rows


def test_weight_decay_shrinks_the_weights(tiny_model_dir, tiny_tokenizer, tmp_path, baseline):
    """learner.weight_decay: AdamW's decoupled decay. The LoRA A matrices get a zero gradient
    while B is zero, so one step leaves them as they are without decay and multiplies them by
    exactly 1 - lr x weight_decay with it."""
    _, l0, _ = baseline
    _, l1 = _step(tiny_model_dir, tiny_tokenizer, tmp_path, "learner.weight_decay=5.0")
    assert l0.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert l1.optimizer.param_groups[0]["weight_decay"] == 5.0
    a0, a1 = _lora_a(l0), _lora_a(l1)
    assert float(a0.abs().max()) > 0
    torch.testing.assert_close(a1, a0 * (1 - 0.01 * 5.0))


def test_max_grad_norm_clips_the_update(tiny_model_dir, tiny_tokenizer, tmp_path, baseline):
    """learner.max_grad_norm: a tiny norm scales the gradient under Adam's epsilon, so the
    weights barely move against the default (1.0)."""
    free, _, _ = baseline
    clipped, _ = _step(tiny_model_dir, tiny_tokenizer, tmp_path, "learner.max_grad_norm=1e-12")
    assert free.grad_norm == pytest.approx(clipped.grad_norm, rel=1e-4)  # the pre-clip norm
    assert clipped.update_norm < 1e-3 * free.update_norm, (free.update_norm, clipped.update_norm)


def _lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]


def test_lora_alpha_and_dropout_shape_the_adapters(tiny_model_dir, tiny_tokenizer, tmp_path):
    """learner.lora_alpha sets every adapter's scale alpha / r; learner.lora_dropout its
    input dropout (0 = none)."""
    from trustee.placement import build_learner

    def layers(*overrides: str):
        cfg = _cfg(tiny_model_dir, "learner.lora_rank=8", *overrides)
        return _lora_layers(build_learner(cfg, resolve(cfg, tmp_path), tiny_tokenizer).model)

    default = layers()
    assert default and {m.scaling["default"] for m in default} == {32.0 / 8}
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in default)
    changed = layers("learner.lora_alpha=4", "learner.lora_dropout=0.25")
    assert {m.scaling["default"] for m in changed} == {4.0 / 8}
    assert {m.lora_dropout["default"].p for m in changed} == {0.25}


def test_micro_batch_tokens_splits_the_step(tiny_model_dir, tiny_tokenizer, tmp_path, baseline):
    """learner.micro_batch_tokens: the token budget of one packed micro-batch (the step's
    micro-batches are planned from it; a sequence over it runs alone)."""
    from test_learn_policy import fixed_groups

    from trustee.learn.learner import samples_from_groups
    from trustee.placement import build_learner

    big, _, _ = baseline
    assert (big.micro_batches, big.oversize) == (1, 0)
    samples = samples_from_groups(fixed_groups(0))
    cfg = _cfg(tiny_model_dir, "learner.micro_batch_tokens=16")
    learner = build_learner(cfg, resolve(cfg, tmp_path), tiny_tokenizer)
    mbs = learner.micro_batches(samples)
    assert len(mbs) == 4 and sorted(i for mb in mbs for i in mb.sample_ids) == [0, 1, 2, 3]
    assert all(mb.n_input_tokens <= 16 or len(mb.sample_ids) == 1 for mb in mbs)


def test_logprob_chunk_bounds_the_rows_of_the_lm_head(tiny_model_dir, tiny_tokenizer, tmp_path, baseline):
    """learner.logprob_chunk: rows of the [tokens x vocab] log-softmax computed at once."""
    big, _, default_rows = baseline
    rows: list[int] = []
    small, _ = _step(
        tiny_model_dir, tiny_tokenizer, tmp_path, "learner.logprob_chunk=4", hook=_head_rows(rows)
    )
    assert rows and max(rows) <= 4 < max(default_rows)
    assert small.loss == pytest.approx(big.loss, rel=1e-4, abs=1e-7)


def test_beta_adds_the_kl_term(tiny_model_dir, tiny_tokenizer, tmp_path):
    """grpo.beta: the k3 KL to the reference (LoRA: the adapter off) enters the loss and is
    reported; 0 leaves it out. The adapters' B matrices are set off zero first, so the
    policy starts away from its reference."""

    def moved(learner):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in learner.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    off, _ = _step(tiny_model_dir, tiny_tokenizer, tmp_path, "grpo.beta=0", hook=moved)
    on, _ = _step(tiny_model_dir, tiny_tokenizer, tmp_path, "grpo.beta=0.5", hook=moved)
    assert off.kl == 0.0 and on.kl > 0.0
    assert on.loss == pytest.approx(off.loss + 0.5 * on.kl, rel=1e-3, abs=1e-6)


def test_gradient_checkpointing_is_switched_on_the_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    """learner.gradient_checkpointing: the learner's model recomputes activations, or not."""
    from trustee.placement import build_learner

    def checkpointing(*overrides: str) -> bool:
        cfg = _cfg(tiny_model_dir, *overrides)
        model = build_learner(cfg, resolve(cfg, tmp_path), tiny_tokenizer).model
        return model.get_base_model().is_gradient_checkpointing

    assert checkpointing() is True
    assert checkpointing("learner.gradient_checkpointing=false") is False


def test_dr_grpo_length_is_the_loss_normaliser(tiny_model_dir, tiny_tokenizer, tmp_path):
    """grpo.dr_grpo_length: with loss_type 'dr_grpo' the step loss is sum / (seqs x length)."""
    a, _ = _step(tiny_model_dir, tiny_tokenizer, tmp_path, "grpo.loss_type=dr_grpo", "grpo.dr_grpo_length=64")
    b, _ = _step(
        tiny_model_dir, tiny_tokenizer, tmp_path, "grpo.loss_type=dr_grpo", "grpo.dr_grpo_length=256"
    )
    assert a.loss != 0.0
    assert a.loss / b.loss == pytest.approx(4.0, rel=1e-4)


def test_is_level_changes_the_importance_correction(tiny_model_dir, tiny_tokenizer, tmp_path, baseline):
    """grpo.is_level: one importance ratio per token, or one per sequence (the product of its
    tokens' ratios), which the fixed samples' sampler log-probs push far outside [is_min, is_max]."""
    tok, _, _ = baseline
    seq, _ = _step(tiny_model_dir, tiny_tokenizer, tmp_path, "grpo.is_level=sequence")
    assert (tok.is_ratio_min, tok.is_ratio_max) != (seq.is_ratio_min, seq.is_ratio_max)
    assert seq.is_ratio_max > tok.is_ratio_max or seq.is_ratio_min < tok.is_ratio_min
    assert seq.loss != pytest.approx(tok.loss, rel=1e-3)


# ============================================================================= eval


def _oracle_class():
    pytest.importorskip("bfcl_eval", reason="needs bfcl-eval")
    from test_eval_bfcl import ScriptedOracleEngine

    class FakeRecordingOracle(ScriptedOracleEngine):
        """Test double: the scripted BFCL oracle (ground-truth calls), which also records the
        sampling parameters, the requests per entry and the most requests in flight at once.
        `repeat`: always replay the first turn's calls (a policy that never ends its turn)."""

        def __init__(self, tokenizer, repeat: bool = False, delay: float = 0.0):
            super().__init__(tokenizer)
            self.repeat, self.delay = repeat, delay
            self.params: list[Sampling] = []
            self.per_entry: dict[str, int] = {}
            self.active = self.peak = 0

        def _calls(self, key, prompt):
            if not self.repeat:
                return super()._calls(key, prompt)
            entry = key.rsplit("/", 1)[0]
            if entry not in self._oracle:
                from trustee.envs.bfcl_exec import oracle_calls

                self._oracle[entry] = oracle_calls(self.multi[entry])
            return self._oracle[entry][0]

        async def generate(self, prompt, params, *, key=None):
            self.params.append(params)
            entry = key.rsplit("/", 1)[0]
            self.per_entry[entry] = self.per_entry.get(entry, 0) + 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                await anyio.sleep(self.delay)
            finally:
                self.active -= 1
            return await super().generate(prompt, params, key=key)

    return FakeRecordingOracle


def _eval_main(monkeypatch, tmp_path, tiny_model_dir, engine, *args: str) -> dict:
    """`python -m trustee.eval` in-process with the policy engine replaced by `engine`;
    returns the JSON report. Runs in tmp_path (the default output is under runs/)."""
    import json

    import trustee.eval.__main__ as cli

    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model_dir}"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "build_policy_engine", lambda c: engine)
    out = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    assert cli.main([str(cfg), "--no-progress", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_eval_sampling_and_concurrency_fields(monkeypatch, tmp_path, tiny_model_dir, tiny_tokenizer):
    """eval.temperature / eval.max_tokens_per_turn: every policy request of the evaluation
    samples at them; eval.concurrency: entries evaluated at once."""
    Oracle = _oracle_class()
    default = Oracle(tiny_tokenizer, delay=0.1)  # long enough for entries to overlap
    _eval_main(monkeypatch, tmp_path, tiny_model_dir, default, "--categories", "simple", "--limit", "6")
    changed = Oracle(tiny_tokenizer, delay=0.1)
    rep = _eval_main(
        monkeypatch,
        tmp_path,
        tiny_model_dir,
        changed,
        "--categories",
        "simple",
        "--limit",
        "6",
        "--set",
        "eval.temperature=0.3",
        "--set",
        "eval.max_tokens_per_turn=96",
        "--set",
        "eval.concurrency=1",
    )
    assert rep["config"]["temperature"] == 0.3 and len(rep["entries"]) == 6
    assert {p.temperature for p in default.params} == {0.001}
    assert {p.temperature for p in changed.params} == {0.3}
    assert max(p.max_tokens for p in default.params) == 1024
    assert max(p.max_tokens for p in changed.params) == 96
    assert changed.peak == 1 < default.peak


def test_eval_multi_turn_split_and_step_cap(monkeypatch, tmp_path, tiny_model_dir, tiny_tokenizer):
    """eval.multi_turn_split: which half of a multi-turn category is evaluated (disjoint);
    eval.max_steps_per_turn: a policy that never ends its turn is made to quit after that
    many steps (BFCL's force-quit)."""
    Oracle = _oracle_class()
    args = ("--categories", "multi_turn_base", "--limit", "2")
    ids = {}
    for split in ("train", "heldout"):
        rep = _eval_main(
            monkeypatch,
            tmp_path,
            tiny_model_dir,
            Oracle(tiny_tokenizer),
            *args,
            "--set",
            f"eval.multi_turn_split={split}",
        )
        ids[split] = {e["id"] for e in rep["entries"]}
        assert len(ids[split]) == 2
    assert not ids["train"] & ids["heldout"]
    for cap in (2, 3):
        looping = Oracle(tiny_tokenizer, repeat=True)
        rep = _eval_main(
            monkeypatch, tmp_path, tiny_model_dir, looping, *args, "--set", f"eval.max_steps_per_turn={cap}"
        )
        assert set(looping.per_entry.values()) == {cap}, looping.per_entry
        assert all(e["valid"] is False for e in rep["entries"])


def test_eval_writes_outside_the_model_directory(
    monkeypatch, tmp_path, tiny_model_dir, tiny_tokenizer, capsys
):
    """eval.out chooses the report path; by default the report goes under runs/eval/, and the
    model directory is never written (a report path inside it is refused)."""
    import os

    import trustee.eval.__main__ as cli

    def tree(d):
        return sorted((p.relative_to(d).as_posix(), p.stat().st_mtime_ns) for p in Path(d).rglob("*"))

    before = tree(tiny_model_dir)
    Oracle = _oracle_class()
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model_dir}"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRUSTEE_RUNS_DIR", raising=False)  # the default root: runs/ under the cwd (tmp_path)
    monkeypatch.setattr(cli, "build_policy_engine", lambda c: Oracle(tiny_tokenizer))
    base = [str(cfg), "--no-progress", "--categories", "simple", "--limit", "1"]
    assert cli.main(base) == 0
    default = tmp_path / "runs" / "eval" / Path(tiny_model_dir).name / "bfcl_eval.json"
    assert default.exists()
    assert cli.main([*base, "--set", f"eval.out={tmp_path / 'mine.json'}"]) == 0
    assert (tmp_path / "mine.json").exists()
    assert cli.main([*base, "--out", os.path.join(tiny_model_dir, "bfcl_eval.json")]) == 2
    err = capsys.readouterr().err
    assert "eval.out" in err and "inside the model directory" in err and "Traceback" not in err
    assert tree(tiny_model_dir) == before


# ============================================================================= vLLM engine arguments


def test_vllm_engine_fields_reach_the_engine_args(tiny_model_dir, monkeypatch, tmp_path):
    """Every [engines.*] field the vLLM backend honours reaches vLLM's AsyncEngineArgs, built
    the way a run builds its policy engine (`placement.build_engine`). vLLM's engine start is
    replaced by a recorder (`FakeAsyncLLM.from_engine_args`: no engine process); the GPU
    platform is assumed so sleep mode and eager mode pass through (on CPU vLLM has neither)."""
    pytest.importorskip("vllm", reason="needs vllm")
    import vllm.v1.engine.async_llm as async_llm

    import trustee.engines.vllm as tv
    from trustee.placement import build_engine

    seen = []

    class FakeAsyncLLM:
        @classmethod
        def from_engine_args(cls, args, **kw):
            seen.append(args)
            return cls()

    monkeypatch.setattr(async_llm, "AsyncLLM", FakeAsyncLLM)
    monkeypatch.setattr(tv, "on_cpu", lambda: False)

    def args(*overrides: str, role: str = "policy"):
        cfg = _cfg(
            tiny_model_dir,
            f"engines.{role}.backend=vllm",
            "learner.lora_rank=8",
            *(o.replace("engines.policy.", f"engines.{role}.") for o in overrides),
        )
        ecfg = getattr(cfg.engines, role)
        engine = build_engine(ecfg, str(tiny_model_dir), cfg, resolve(cfg, tmp_path), role=role)
        assert isinstance(engine, tv.VLLMEngine)  # backend 'vllm' (the default 'hf' builds HFEngine)
        return seen.pop()

    changes = (
        "engines.policy.max_num_seqs=7",
        "engines.policy.gpu_memory_utilization=0.55",
        "engines.policy.enable_prefix_caching=false",
        "engines.policy.enable_sleep_mode=false",
        "engines.policy.max_lora_rank=32",
        "engines.policy.tensor_parallel_size=2",
        "engines.policy.data_parallel_size=2",
        "engines.policy.enforce_eager=true",
    )
    fields = (
        "max_num_seqs",
        "gpu_memory_utilization",
        "enable_prefix_caching",
        "enable_sleep_mode",
        "max_lora_rank",
        "tensor_parallel_size",
        "data_parallel_size",
        "enforce_eager",
    )
    a, b = args(), args(*changes)
    assert [getattr(a, f) for f in fields] == [256, 0.3, True, True, 64, 1, 1, False]
    assert [getattr(b, f) for f in fields] == [7, 0.55, False, False, 32, 2, 2, True]
    assert a.enable_lora and a.kv_cache_memory_bytes is None
    c = args("engines.policy.kv_cache_gib=1.5")
    assert c.kv_cache_memory_bytes == int(1.5 * 2**30)
    # The simulator's engine: the same fields; it never loads an adapter (LoRA off, vLLM's
    # placeholder rank 16). Writing [engines.simulator] keeps the simulator's own defaults for
    # what it does not set (no sleep mode), and a value it sets reaches the engine.
    simulator_changes = [o for o in changes if "max_lora_rank" not in o]
    a, b = args(role="simulator"), args(*simulator_changes, role="simulator")
    assert [getattr(a, f) for f in fields] == [256, 0.3, True, False, 16, 1, 1, False]
    assert args("engines.policy.enable_sleep_mode=true", role="simulator").enable_sleep_mode
    assert [getattr(b, f) for f in fields] == [7, 0.55, False, False, 16, 2, 2, True]
    assert not a.enable_lora and not b.enable_lora
    c = args("engines.policy.kv_cache_gib=1.5", role="simulator")
    assert c.kv_cache_memory_bytes == int(1.5 * 2**30)
