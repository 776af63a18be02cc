"""What a checkpoint holds, how a run continues from one, and what a resumed run may change.

Owns:
- `plan_resume(cfg, run_dir)`: before anything is written, find the run directory's last
  complete checkpoint, compare its config with the new one, and decide: a fresh run, a
  resume (from which step, how many left), a finished run, or a refusal (the config changed
  in a field that cannot change mid-run; the diff is shown). `ResumePlan.headline()` is the
  run's first line.
- `save_state(run, step)`: everything the run needs to continue as if never stopped:
  trainable weights, optimiser, LR schedule, learner step count, curriculum, every RNG
  (the loop's `random.Random`, torch's CPU/CUDA generators, each engine's sampler), the
  policy engine's version, elapsed time, the W&B run id and the config. The exported policy
  (`RUN/adapter`) is written at the same moment, atomically, tagged with its step.
- `restore_state(run, ckpt)`: the inverse, plus truncating `metrics.jsonl` and
  `trajectories.jsonl` back to the checkpoint's step, so no step is logged twice.
- `export_policy`: the trained policy published atomically as `RUN/adapter` (a symlink to
  `RUN/exports/adapter-step-NNNNNN`, swapped with one rename) or `RUN/model`.

It does not run the loop or catch signals (`trustee/interrupt.py`), nor write checkpoint
files (`trustee/checkpoint.py`). Callers: `trustee.run` (plan), `trustee.train` (save, restore,
export). It reads the `_Run` object of train.py by attribute (learner, curriculum, rng,
policy_engine, sim_engine, log, cfg, run_dir, tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import msgspec
import torch

from trustee.checkpoint import checkpoint_problem, latest_checkpoint, load_checkpoint, save_checkpoint
from trustee.config import Config

log = logging.getLogger("trustee.resume")

# Fields a resumed run may change: they do not alter what has been trained or how the rest of
# the run trains (grpo.steps extends or shortens it; the LR schedule is recomputed for the new
# length). Entries ending in "." cover a whole section.
SAFE_TO_CHANGE = (
    "name",
    "grpo.steps",
    "logging.",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.resume",
    "checkpoint.on_interrupt",
    "checkpoint.before_wake",
    "learner.weight_transport",
    "eval.",
)


class ResumeRefused(ValueError):
    """The run directory's checkpoint cannot be continued with this config (message says why and the fix)."""


class ResumePlan(msgspec.Struct, frozen=True, kw_only=True):
    """What the run will do with its directory. `checkpoint` is None for a fresh run;
    `done_steps` counts steps finished (the checkpoint's step + 1)."""

    run_dir: str
    name: str
    total_steps: int
    checkpoint: str | None = None
    done_steps: int = 0
    changed: list[str] = msgspec.field(default_factory=list)

    export_step: int | None = None
    """The step of the run's published policy (RUN/adapter or RUN/model), None when absent."""

    @property
    def finished(self) -> bool:
        """Every step done and the last one's policy published: nothing left to do."""
        return self.trained and self.export_step == self.total_steps - 1

    @property
    def trained(self) -> bool:
        return self.checkpoint is not None and self.done_steps >= self.total_steps

    def headline(self) -> str:
        if self.checkpoint is None:
            return f"new run '{self.name}': {self.total_steps} steps -> {self.run_dir}"
        if self.trained and not self.finished:
            return (
                f"run '{self.name}' finished its {self.total_steps} steps but its final policy was not "
                f"published (interrupted while writing it): exporting it from {Path(self.checkpoint).name} "
                f"-> {self.run_dir}"
            )
        if self.finished:
            return (
                f"run '{self.name}' is already finished: {self.done_steps} of {self.done_steps} steps done "
                f"in {self.run_dir}. To train it further, raise the step count "
                f"(--set grpo.steps={self.done_steps * 2}); for a new run, pass another --out."
            )
        left = self.total_steps - self.done_steps
        changed = f"; changed: {', '.join(self.changed)}" if self.changed else ""
        return (
            f"resuming run '{self.name}' from {Path(self.checkpoint).name} (steps 0-{self.done_steps - 1} done): "
            f"{left} of {self.total_steps} steps left -> {self.run_dir}{changed}"
        )


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def config_diff(old: dict[str, Any], new: Config) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs, in field order."""
    a, b = _flat(old), _flat(json.loads(msgspec.json.encode(new)))  # JSON on both sides: tuples as lists
    keys = list(b) + [k for k in a if k not in b]
    return [(k, a.get(k, "(absent)"), b.get(k, "(absent)")) for k in keys if a.get(k) != b.get(k)]


def is_safe(field: str) -> bool:
    return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE_TO_CHANGE)


def plan_resume(cfg: Config, run_dir: str | os.PathLike) -> ResumePlan:
    """Decide what the run does with `run_dir`; raises ResumeRefused when it must not start.
    Writes nothing."""
    run_dir = Path(run_dir)
    base = ResumePlan(run_dir=str(run_dir), name=cfg.name, total_steps=cfg.grpo.steps)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return base
    if cfg.checkpoint.resume == "never":
        raise ResumeRefused(
            f"{run_dir} already holds checkpoint {ckpt.name} and checkpoint.resume = 'never': starting over "
            "there would mix two runs' logs. Pass another --out, delete the directory, or set checkpoint.resume = 'auto'."
        )
    if problem := checkpoint_problem(ckpt):
        raise ResumeRefused(problem)
    meta = json.loads((ckpt / "meta.json").read_text())
    old_cfg = meta.get("config")
    if old_cfg is None and (run_dir / "config.json").exists():
        old_cfg = json.loads((run_dir / "config.json").read_text())
    diff = config_diff(old_cfg, cfg) if old_cfg is not None else []
    unsafe = [d for d in diff if not is_safe(d[0])]
    if unsafe:
        lines = "\n".join(f"  {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in diff)
        raise ResumeRefused(
            f"{run_dir} holds checkpoint {ckpt.name} of a run with a different config:\n{lines}\n"
            f"{', '.join(k for k, _, _ in unsafe)} cannot change mid-run (the trained state depends on them). "
            f"Fields that may change on resume: {', '.join(s + '*' if s.endswith('.') else s for s in SAFE_TO_CHANGE)}. "
            "Drop those --set flags to resume, or pass another --out for a new run."
        )
    return msgspec.structs.replace(
        base,
        checkpoint=str(ckpt),
        done_steps=int(meta["step"]) + 1,
        changed=[f"{k} {a} -> {b}" for k, a, b in diff],
        export_step=exported_step(run_dir, export_kind(cfg.learner.mode)),
    )


# ----------------------------------------------------------------------------- state


class Boundary(msgspec.Struct, kw_only=True):
    """The RNG states at a step boundary (after step `step`, before the next one draws): what a
    checkpoint written later, after an interruption mid-step, must hold instead of the
    half-advanced generators."""

    step: int
    python: Any
    torch_cpu: Any
    torch_cuda: Any
    engines: dict[str, Any]


def _engines(run: Any) -> dict[str, Any]:
    return {
        role: e
        for role, e in (
            ("policy", getattr(run, "policy_engine", None)),
            ("simulator", getattr(run, "sim_engine", None)),
        )
        if e is not None
    }


def boundary(run: Any, step: int) -> Boundary:
    return Boundary(
        step=step,
        python=run.rng.getstate(),
        torch_cpu=torch.get_rng_state(),
        torch_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        engines={r: e.rng_state().clone() for r, e in _engines(run).items() if hasattr(e, "rng_state")},
    )


def save_state(run: Any, step: int, at: Boundary | None = None) -> Path:
    """Checkpoint the run after `step` (RNGs from `at` when given, else their current state), then
    export the policy tied to that step. Raises OSError when the disk refuses; the previous
    checkpoint is then untouched (checkpoint.save_checkpoint writes beside it and renames)."""
    from trustee.learn.distributed import DistributedLearner, checkpoint_state

    at = at or boundary(run, step)
    learner = run.learner
    learner.reload()  # state offloaded to the host (learner.offload) is saved from where it trains
    extra = None
    if isinstance(learner, DistributedLearner):  # the ranks write DCP shards into the checkpoint
        state: dict[str, Any] = {}
        extra = lambda d: state.update(learner_schedule=checkpoint_state(learner, d))  # noqa: E731
    else:
        state = {
            "trainable": {
                n: p.detach().cpu().clone() for n, p in learner.model.named_parameters() if p.requires_grad
            },
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
        }
    state |= {
        "rng": at.python,
        "torch_rng": at.torch_cpu,
        "cuda_rng": at.torch_cuda,
        "engine_rng": at.engines,
    }
    meta = {
        "curriculum": msgspec.to_builtins(run.curriculum.state()),
        "learner_steps": learner.step_count,
        # Saved between the update and its push (before a wake, or on a fault there): the version
        # the engine serves once the step's update lands, as a checkpoint after the push holds.
        "policy_version": run.policy_engine.version + int(getattr(run, "push_pending", False)),
        "elapsed_s": run.log.elapsed() if hasattr(run, "log") else 0.0,
        "wandb_id": run.log.wandb_id if hasattr(run, "log") else None,
        "config": json.loads(msgspec.json.encode(run.cfg)),
    }
    path = save_checkpoint(run.run_dir, step, state, meta, keep=run.cfg.checkpoint.keep, write_extra=extra)
    if _mode(learner) in ("lora", "qlora"):
        export_policy(run, step)
    return path


def restore_state(run: Any, ckpt: Path) -> dict[str, Any]:
    """Load checkpoint `ckpt` into the run's learner, curriculum and RNGs; returns its meta.
    The caller pushes the weights to the policy engine and then sets the version
    (`finish_restore`)."""
    from trustee.curriculum import CurriculumState
    from trustee.learn.distributed import DistributedLearner, resume_state

    state, meta = load_checkpoint(ckpt)
    learner = run.learner
    if isinstance(learner, DistributedLearner):
        resume_state(learner, ckpt, state["learner_schedule"])
    else:
        _restore_single(learner, state, ckpt)
    learner.step_count = int(meta["learner_steps"])
    run.curriculum.load_state(msgspec.convert(meta["curriculum"], CurriculumState))
    run.rng.setstate(state["rng"])
    if state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for role, engine in _engines(run).items():
        saved_rng = state.get("engine_rng", {}).get(role)
        if saved_rng is not None and hasattr(engine, "set_rng_state"):
            engine.set_rng_state(saved_rng)
    truncate_logs(run.run_dir, int(meta["step"]))
    return meta


def _mode(learner: Any) -> str:
    """'lora' / 'qlora' / 'full' of either learner."""
    return getattr(learner, "mode", None) or learner.policy.mode


def _restore_single(learner: Any, state: dict[str, Any], ckpt: Path) -> None:
    """The single-process learner's trainable weights, optimiser and schedule."""
    params = dict(learner.model.named_parameters())
    saved = state["trainable"]
    unknown = sorted(set(saved) - set(params))
    mismatched = [n for n in saved if n in params and tuple(saved[n].shape) != tuple(params[n].shape)]
    if unknown or mismatched:
        raise ResumeRefused(
            f"checkpoint {ckpt} does not match this model: "
            + (f"unknown parameters {unknown[:3]} " if unknown else "")
            + (f"different shapes for {mismatched[:3]}" if mismatched else "")
            + "; resume with the config the run started with, or pass another --out"
        )
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])


def truncate_logs(run_dir: Path, last_step: int) -> dict[str, int]:
    """Drop records of steps after `last_step` (and a torn last line) from the run's JSONL logs,
    atomically. Returns lines dropped per file."""
    dropped: dict[str, int] = {}
    for name in ("metrics.jsonl", "trajectories.jsonl", "eval_trajectories.jsonl"):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        keep: list[bytes] = []
        n = 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    ok = line.endswith(b"\n") and json.loads(line)["step"] <= last_step
                except (ValueError, KeyError, TypeError):
                    ok = False
                if ok:
                    keep.append(line)
                else:
                    n += 1
        if n:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        dropped[name] = n
    return dropped


# ----------------------------------------------------------------------------- export


def _swap_link(link: Path, target: Path) -> None:
    """Point `link` at `target` with one rename (readers see the old or the new export, never
    a half-written one). A real directory left at `link` by an older version is replaced."""
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


def export_policy(run: Any, step: int) -> Path:
    """Publish the learner's policy after `step` as RUN/adapter (LoRA) or RUN/model (full):
    written to RUN/exports/<kind>-step-NNNNNN with a `trustee_step.json` beside the weights,
    then swapped in atomically; older exports are removed."""
    from trustee.learn.export import export_lora

    run_dir = Path(run.run_dir)
    from trustee.learn.distributed import DistributedLearner

    kind = export_kind(_mode(run.learner))
    lora = kind == "adapter"
    exports = run_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    final = exports / f"{kind}-step-{step:06d}"
    tmp = exports / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if isinstance(run.learner, DistributedLearner):
        run.learner.save_pretrained(tmp, run.res.policy_model)
        if not lora:
            run.tokenizer.save_pretrained(tmp)
    elif lora:
        export_lora(run.learner.model, path=tmp, tensors=False)
    else:
        run.learner.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
    (tmp / "trustee_step.json").write_text(json.dumps({"step": step, "run": run.cfg.name}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _swap_link(run_dir / kind, final)
    for old in exports.iterdir():
        if old != final and old.name.startswith(f"{kind}-step-"):
            shutil.rmtree(old, ignore_errors=True)
    return run_dir / kind


def export_final(run: Any) -> Path:
    """The end of a run: publish the policy after the last step, unless the final checkpoint
    already exported exactly that (LoRA adapters are exported with every checkpoint)."""
    last = run.cfg.grpo.steps - 1
    kind = export_kind(_mode(run.learner))
    if exported_step(run.run_dir, kind) == last:
        return Path(run.run_dir) / kind
    return export_policy(run, last)


def export_kind(mode: str) -> str:
    """Where a learner mode's policy is published: RUN/adapter (LoRA, QLoRA) or RUN/model."""
    return "adapter" if mode in ("lora", "qlora") else "model"


def exported_step(run_dir: str | os.PathLike, kind: str = "adapter") -> int | None:
    """The step of RUN/<kind>, or None when there is no tagged export."""
    f = Path(run_dir) / kind / "trustee_step.json"
    return int(json.loads(f.read_text())["step"]) if f.exists() else None


def seed_everything(seed: int) -> None:
    """Torch's global generators (dropout, any torch sampling outside the engines)."""
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- train.py's hooks


async def continue_run(run: Any, update: Any) -> tuple[int, dict[str, Any]]:
    """At the end of `_Run.setup`: make the policy engine's sampling independent of batching
    (`HFEngine.keyed_sampling`), then continue from the last checkpoint when there is one
    (`checkpoint.resume = 'auto'`; `trustee.run` has already checked the config against it).
    Returns (first step to run, the checkpoint's meta or {}). `update()` builds the weight
    update for the policy engine."""
    if hasattr(run.policy_engine, "keyed_sampling"):
        run.policy_engine.keyed_sampling = True
    run.saved_step = None
    ckpt = latest_checkpoint(run.run_dir) if run.cfg.checkpoint.resume == "auto" else None
    if ckpt is None:
        truncate_logs(run.run_dir, -1)  # records of a run killed before its first checkpoint
        if run.cfg.model.adapter:  # a new run from a trained adapter: the engine samples with it from step 0
            await run.policy_engine.update_weights(update())
            log.info("policy engine starts from the adapter %s", run.cfg.model.adapter)
        return 0, {}
    meta = restore_state(run, ckpt)
    await run.policy_engine.update_weights(update())
    # The restored weights are the ones the engine served after this step: same version.
    run.policy_engine.version = int(meta.get("policy_version", run.policy_engine.version))
    run.saved_step = int(meta["step"])
    log.info("resumed from %s", ckpt)
    return int(meta["step"]) + 1, meta


def saves_before_waking(cfg: Config) -> bool:
    """Whether a step is checkpointed between its update and its engines' wake
    (`checkpoint.before_wake`: 'auto' only where that checkpoint is an adapter, small)."""
    when = cfg.checkpoint.before_wake
    return when == "always" or (when == "auto" and cfg.learner.mode in ("lora", "qlora"))


def checkpoint_or_warn(run: Any, step: int) -> int | None:
    """A scheduled checkpoint. A full or unwritable disk does not stop the run: it says so and
    names the previous checkpoint, which is intact. Returns the step saved, or the previous one."""
    try:
        save_state(run, step)
        return step
    except OSError as e:
        prev = latest_checkpoint(run.run_dir)
        msg = (
            f"checkpoint of step {step} failed ({e}); the previous checkpoint "
            f"{prev.name if prev else '(none)'} is intact and a resume would start from it"
        )
        log.error(msg)
        print(f"warning: {msg}", flush=True)
        run.checkpoint_failures = getattr(run, "checkpoint_failures", 0) + 1
        return getattr(run, "saved_step", None)
