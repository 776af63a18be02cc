"""The FSDP2 learner with two real gloo ranks on the CPU (learn/distributed.py, learn/fsdp_rank.py).

Each DistributedLearner here starts real rank processes (torch.multiprocessing spawn, one
torch thread each) on the tiny 'test' model. They are compared with the single-process
`Learner` built from the same seed: the step loss, every gradient, the exported weights, and
a DCP checkpoint written by two ranks, resumed on two ranks, on one rank and in the single
process. Three learners are started in all (two ranks full, two ranks LoRA, one rank full).
Run on 2 shared cores: each start takes about 15 s idle, minutes under heavy load.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from learn_samples import make_groups, rank_spec_for

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn.distributed import (
    DistributedLearner,
    RankError,
    balance_by_tokens,
    global_norm,
)
from trustee.learn.export import export_full, export_lora
from trustee.learn.fsdp_rank import load_dcp_into
from trustee.learn.learner import Learner, samples_from_groups
from trustee.learn.packing import plan_bins
from trustee.learn.policy import load_policy
from trustee.types import Group, Trajectory

RTOL = 1e-5  # loss and gradients
# Weights after an AdamW step: Adam divides each gradient entry by its own magnitude, so the
# fp32 summation-order noise of the smallest entries (about 1e-7 of the tensor's norm, more
# of the entry) reaches the weights at about 1e-5 of the norm (LoRA B after a first step:
# 1.5e-5 measured). The gathers themselves are exact: see the start-state export checks.
WEIGHT_RTOL = 1e-4
BUDGET = 32  # micro_batch_tokens: several micro-batches per rank, unequal counts, one oversize


def groups_of(seed: int, n: int = 8, lengths: list[int] | None = None) -> list[Group]:
    """n samples as groups of two with advantages +1 / -1 (deterministic)."""
    return make_groups(seed, n)


def learner_cfg(mode: str) -> LearnerConfig:
    return LearnerConfig(
        mode=mode,
        lr=1e-3,
        micro_batch_tokens=BUDGET,
        logprob_chunk=8,
        lora_rank=4,
        lora_alpha=8.0,
        gradient_checkpointing=True,
    )


GRPO = GrpoConfig(beta=0.0, loss_type="grpo")


def reference(path, mode: str) -> Learner:
    torch.manual_seed(0)  # the ranks seed 0 before building the policy too (same LoRA init)
    lc = learner_cfg(mode)
    return Learner(load_policy(path, lc), GRPO, lc, total_steps=10)


def start(path, mode: str, world: int) -> DistributedLearner:
    return DistributedLearner(rank_spec_for(path, learner_cfg(mode), GRPO, world))


def assert_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, rtol: float = RTOL
) -> None:
    assert list(got) == list(want), f"{what}: names differ"
    for k, w in want.items():
        scale = max(float(w.norm()), 1e-12)
        rel = float((got[k].float() - w.float()).norm()) / scale
        assert rel <= rtol or float(w.norm()) == 0.0 and float(got[k].norm()) < 1e-9, (
            f"{what} {k}: rel err {rel:.2e}"
        )


def full_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for chunk in export_full(model).chunks for k, v in chunk}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def stray_ranks(cwd) -> list[int]:
    """Multiprocessing children running in `cwd` whose parent is gone (reparented to init):
    the rank processes of a finished run that outlived it."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline", "cwd", "ppid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "spawn_main" in cmd and p.info["cwd"] == str(cwd):
            if p.info["ppid"] in (0, 1) or not psutil.pid_exists(p.info["ppid"]):
                out.append(p.pid)
    return out


# ----------------------------------------------------------------------------- pure parts


def test_balance_by_tokens_is_longest_first_onto_the_lightest_rank():
    # 50 -> r0, 30 -> r1, 20 -> r1 (30 < 50), 10 -> r0 (tie at 50: fewer sequences)
    assert balance_by_tokens([10, 50, 20, 30], 2) == [[0, 1], [2, 3]]
    assert balance_by_tokens([5, 5, 5], 2) == [[0, 2], [1]]
    assert balance_by_tokens([7], 3) == [[0], [], []]


def test_global_norm_counts_every_rank():
    samples = samples_from_groups(groups_of(0, 4))
    norm = global_norm("grpo", samples, max_len=7)
    assert norm.n_seqs == 4 and norm.n_tokens == sum(s.n_loss for s in samples) and norm.world_size == 1


def test_learner_ranks_config_checks():
    from trustee.config import ConfigError, load_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    assert (
        load_config(
            os.path.join(root, "cpu-tiny.toml"), ["placement.learner_ranks=2"]
        ).placement.learner_ranks
        == 2
    )
    with pytest.raises(ConfigError, match="placement.learner_ranks"):
        load_config(
            None, ["placement.learner_ranks=2", "placement.learner_gpus=[0]", "placement.policy_gpus=[0]"]
        )
    with pytest.raises(ConfigError, match="QLoRA"):
        load_config(
            None,
            [
                "placement.learner_ranks=2",
                "learner.mode=qlora",
                "placement.learner_gpus=[0, 1]",
                "placement.policy_gpus=[0, 1]",
            ],
        )
    with pytest.raises(ConfigError, match="learner_ranks"):
        load_config(None, ["placement.learner_ranks=0"])


# ----------------------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def full2(tiny_model_dir):
    with start(tiny_model_dir, "full", 2) as dl:
        yield dl
    assert not any(alive(p) for p in dl.pids), "a learner rank outlived close()"


@pytest.fixture(scope="module")
def lora2(tiny_model_dir):
    with start(tiny_model_dir, "lora", 2) as dl:
        yield dl
    assert not any(alive(p) for p in dl.pids), "a learner rank outlived close()"


def test_the_test_batch_gives_ranks_unequal_micro_batch_counts():
    """So the equality tests below also cover the idle passes that keep collectives paired."""
    samples = samples_from_groups(groups_of(0))
    split = balance_by_tokens([len(s.tokens) for s in samples], 2)
    counts = [len(plan_bins([len(samples[i].tokens) for i in b], BUDGET)) for b in split]
    assert counts[0] != counts[1], counts


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_loss_and_gradients_equal_the_single_process_learner(mode, tiny_model_dir, full2, lora2):
    dl = full2 if mode == "full" else lora2
    ref = reference(tiny_model_dir, mode)
    for groups in (groups_of(0), groups_of(3, n=2)):  # 8 sequences; then 2, one per rank
        loss, _, _ = ref.accumulate(samples_from_groups(groups))
        want = {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.requires_grad}
        got_loss, got = dl.gradients(groups)
        assert abs(got_loss - loss) <= RTOL * abs(loss), (got_loss, loss)
        assert_close(got, want, f"{mode} gradient")


def test_malformed_turn_credit_reaches_the_ranks(tiny_model_dir, full2):
    """grpo.turn_credit = 'malformed' (the default): the ranks give a flagged turn's tokens
    min(advantage, malformed_advantage), as the one-process learner does."""
    from msgspec.structs import replace

    groups = groups_of(0)
    flagged = []
    for g in groups:
        trajs = []
        for t in g.trajectories:
            loss = [i for i, m in enumerate(t.loss_mask) if m]
            trajs.append(replace(t, malformed_turns=[(loss[len(loss) // 2], loss[-1] + 1)]))
        flagged.append(replace(g, trajectories=trajs))
    ref = reference(tiny_model_dir, "full")
    loss, _, _ = ref.accumulate(samples_from_groups(flagged, GRPO.malformed_advantage))
    want = {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.requires_grad}
    plain, _, _ = ref.accumulate(samples_from_groups(groups))
    assert abs(plain - loss) > 1e-3 * abs(loss)  # the spans change the loss
    got_loss, got = full2.gradients(flagged)
    assert abs(got_loss - loss) <= RTOL * abs(loss), (got_loss, loss)
    assert_close(got, want, "full gradient with malformed turns")


def test_a_rank_with_no_sequence_still_steps(tiny_model_dir, full2):
    """One sequence, two ranks: rank 1 only runs idle passes; the gradient is unchanged."""
    ref = reference(tiny_model_dir, "full")
    one = groups_of(5, n=2)
    one = [Group(task_id="x", trajectories=one[0].trajectories[:1], advantages=[1.0])]
    loss, _, _ = ref.accumulate(samples_from_groups(one))
    want = {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.requires_grad}
    got_loss, got = full2.gradients(one)
    assert abs(got_loss - loss) <= RTOL * abs(loss)
    assert_close(got, want, "one-sequence gradient")


def put_at_start(dl: DistributedLearner, ref: Learner, path, *, full: bool) -> None:
    """Load the reference's untrained state into `dl` through a DCP checkpoint written by one
    process (so the test does not depend on what earlier tests did with the module's learner;
    this also covers 1 -> 2 resharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=not full)
    m_sd, o_sd = get_state_dict(ref.model, ref.optimizer, options=opts)
    dcp.save({"model": m_sd, "optim": o_sd}, checkpoint_id=str(path), no_dist=True)
    dl.load(path, {"scheduler": ref.scheduler.state_dict(), "step_count": 0})


def exported(dl: DistributedLearner) -> dict[str, torch.Tensor]:
    return {k: v for chunk in dl.export_full().chunks for k, v in chunk}


def test_full_export_and_dcp_checkpoint_resume_on_two_one_and_single(tiny_model_dir, full2, tmp_path):
    ref = reference(tiny_model_dir, "full")
    put_at_start(full2, ref, tmp_path / "start", full=True)
    assert_close(exported(full2), full_weights(ref.model), "2-rank export of the start state", rtol=0.0)
    a, b = groups_of(1), groups_of(2)
    m_ref, m2 = ref.step(a), full2.step(a)
    assert abs(m2.loss - m_ref.loss) <= RTOL * abs(m_ref.loss)
    assert abs(m2.grad_norm - m_ref.grad_norm) <= RTOL * m_ref.grad_norm
    assert_close(
        exported(full2), full_weights(ref.model), "2-rank export after a step", rtol=WEIGHT_RTOL
    )  # names, order, values
    sched = full2.save(tmp_path / "two")  # written by two ranks
    assert sched["world_size"] == 2 and sched["step_count"] == 1
    ref.step(b)
    want = full_weights(ref.model)
    full2.step(b)
    assert_close(exported(full2), want, "2-rank export after two steps", rtol=WEIGHT_RTOL)
    full2.load(tmp_path / "two", sched)  # resume on two ranks, redo the second step
    full2.step(b)
    assert_close(exported(full2), want, "resumed on two ranks", rtol=WEIGHT_RTOL)
    with start(tiny_model_dir, "full", 1) as one:  # resume on one rank
        one.load(tmp_path / "two", sched)
        one.step(b)
        assert_close(exported(one), want, "resumed on one rank", rtol=WEIGHT_RTOL)
    assert not any(alive(p) for p in one.pids)
    single = reference(tiny_model_dir, "full")  # resume in the single-process learner
    load_dcp_into(single.model, single.optimizer, str(tmp_path / "two"), full=True)
    single.scheduler.load_state_dict(sched["scheduler"])
    single.step(b)
    assert_close(full_weights(single.model), want, "resumed in one process", rtol=WEIGHT_RTOL)


def test_lora_export_and_dcp_checkpoint(tiny_model_dir, lora2, tmp_path):
    ref = reference(tiny_model_dir, "lora")
    put_at_start(lora2, ref, tmp_path / "start", full=False)
    start_state = dict(sorted(export_lora(ref.model).tensors.items()))
    assert_close(
        dict(sorted(lora2.export_lora().tensors.items())), start_state, "LoRA at the start", rtol=0.0
    )
    a, b = groups_of(1), groups_of(2)
    m_ref, m2 = ref.step(a), lora2.step(a)
    assert abs(m2.loss - m_ref.loss) <= RTOL * abs(m_ref.loss)
    assert abs(m2.grad_norm - m_ref.grad_norm) <= RTOL * m_ref.grad_norm
    want = export_lora(ref.model).tensors
    got = lora2.export_lora(path=tmp_path / "adapter")
    assert got.config["r"] == 4 and got.path == str(tmp_path / "adapter")
    assert_close(
        dict(sorted(got.tensors.items())), dict(sorted(want.items())), "LoRA export", rtol=WEIGHT_RTOL
    )
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert_close(dict(sorted(on_disk.items())), dict(sorted(want.items())), "adapter file", rtol=WEIGHT_RTOL)
    sched = lora2.save(tmp_path / "two")
    ref.step(b)
    want2 = export_lora(ref.model).tensors
    lora2.step(b)
    lora2.load(tmp_path / "two", sched)  # resume on two ranks: the second step again
    lora2.step(b)
    assert_close(
        dict(sorted(lora2.export_lora().tensors.items())),
        dict(sorted(want2.items())),
        "LoRA resumed on two",
        rtol=WEIGHT_RTOL,
    )
    single = reference(tiny_model_dir, "lora")  # and in one process
    load_dcp_into(single.model, single.optimizer, str(tmp_path / "two"), full=False)
    single.scheduler.load_state_dict(sched["scheduler"])
    single.step(b)
    assert_close(
        dict(sorted(export_lora(single.model).tensors.items())),
        dict(sorted(want2.items())),
        "LoRA resumed in one process",
        rtol=WEIGHT_RTOL,
    )


def test_full_save_pretrained_loads_in_transformers(full2, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    want = exported(full2)
    out = full2.save_pretrained(tmp_path / "model", tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_close(full_weights(model), want, "saved model", rtol=0.0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # re-tied


def shared_groups(seed: int) -> list[Group]:
    """Two GRPO groups of three whose members share a 17-token prompt (shared-prefix packing
    needs 16) and continue with 2 to 8 tokens of their own; advantages +1 / 0.5 / -1."""
    import random

    rng = random.Random(seed)
    out = []
    for g in range(2):
        prompt = [rng.randrange(1024) for _ in range(17)]
        trajs = []
        for j in range(3):
            mask = [1] * rng.randint(1, 4) + [0] * rng.randint(0, 2) + [1] * rng.randint(1, 2)
            trajs.append(
                Trajectory(
                    episode_id=f"s{g}{j}",
                    task_id=f"g{g}",
                    tokens=prompt + [rng.randrange(1024) for _ in mask],
                    loss_mask=[0] * 17 + mask,
                    logprobs=[0.0] * 17 + [rng.uniform(-3.0, -1.0) if m else 0.0 for m in mask],
                    versions=[-1] * 17 + [0 if m else -1 for m in mask],
                    prompt_len=17,
                )
            )
        out.append(Group(task_id=f"g{g}", trajectories=trajs, advantages=[1.0, 0.5, -1.0]))
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_shared_prefix_ranks_equal_the_unshared_single_process_learner(
    mode, tiny_model_dir, full2, lora2, tmp_path
):
    """learner.share_prefix = 'auto' on two ranks (the run-time check is collective): the
    gradient and the step loss equal the single-process learner's with every episode whole."""
    import msgspec

    dl = full2 if mode == "full" else lora2
    torch.manual_seed(0)
    lc = msgspec.structs.replace(learner_cfg(mode), share_prefix="off")
    ref = Learner(load_policy(tiny_model_dir, lc), GRPO, lc, total_steps=10)
    put_at_start(dl, ref, tmp_path / "start", full=mode == "full")  # earlier tests stepped `dl`
    groups = shared_groups(0)
    loss, _, mbs = ref.accumulate(samples_from_groups(groups))
    assert all(mb.layout is None for mb in mbs)
    want = {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.requires_grad}
    got_loss, got = dl.gradients(groups)
    assert abs(got_loss - loss) <= RTOL * abs(loss), (got_loss, loss)
    assert_close(got, want, f"{mode} shared-prefix gradient")
    m_ref, m2 = ref.step(groups), dl.step(groups)
    assert abs(m2.loss - m_ref.loss) <= RTOL * abs(m_ref.loss)
    assert m2.shared_prefix_frac > 0.0 and m2.shared_prefix_fallback == 0  # the ranks did share
    assert m_ref.shared_prefix_frac == 0.0


@pytest.mark.slow  # two runs of two ranks each: 512 s measured on 2 shared cores at load ~15
def test_training_loop_with_two_ranks_trains_checkpoints_resumes_and_ends_its_ranks(tmp_path, tiny_model_dir):
    """`python -m trustee.run configs/cpu-tiny.toml --set placement.learner_ranks=2` (shrunk as in
    test_train.py): two steps with DCP checkpoints, then a third step resumed from them; no
    rank process is alive after either run."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import ROOT, _run, _steps

    out = tmp_path / "run"
    for steps in (2, 3):
        r = _run(tiny_model_dir, out, steps, "--set", "placement.learner_ranks=2")
        assert r.returncode == 0, r.stderr[-3000:]
        assert not stray_ranks(ROOT), "a learner rank outlived the run"
    recs = _steps(out)
    assert [x["step"] for x in recs] == [0, 1, 2]
    assert [x["policy_version"] for x in recs] == [1.0, 2.0, 2.0]  # resume pushed the restored adapter first
    assert recs[-1]["learn/step"] == 3  # the ranks' schedule and step counter came back from DCP
    assert (out / "checkpoints" / "step-000001" / "learner-dcp" / ".metadata").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_a_dead_rank_raises_and_leaves_no_process(lora2):
    """Runs last (it ends the module's LoRA learner): a rank killed mid-run makes the next call
    raise RankError naming it, and closes the learner; no rank process is left."""
    os.kill(lora2.pids[1], signal.SIGKILL)
    with pytest.raises(RankError, match="rank 1"):
        lora2.step(groups_of(0))
    assert not any(alive(p) for p in lora2.pids)
    with pytest.raises(RankError, match="closed"):
        lora2.step(groups_of(0))
