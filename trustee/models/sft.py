"""Supervised warm-up of a tiny model on the toy environment's reference conversations.

Owns `sft_warm`: renders `ToyEnv.sft_messages` conversations token by token with the same
TITO machinery the episode runner uses (so the trained ids are exactly what rollouts see),
trains every weight with cross-entropy on the assistant tokens only, saves the model back,
and measures the well-formed tool-call rate: the share of sampled first turns (temperature 1,
fresh tasks) that hold at least one tool call and no parse error. A random-weight tiny model
never emits a tool call; a warmed one does most of the time, which is what the CPU learning
demo starts from. Called by `tools/make_tiny_model.py --sft N` and tests. Not an SFT
framework: no packing, no schedules, CPU-sized.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from trustee.chat.parse import ToolCallParser
from trustee.chat.render import ChatFormat, Conversation
from trustee.envs.base import Knobs
from trustee.envs.toy import ToyEnv
from trustee.types import Message, Task


class SftReport(msgspec.Struct, kw_only=True):
    """What one warm-up did; written as trustee_sft.json beside the weights."""

    steps: int
    batch_size: int
    lr: float
    loss_first: float
    loss_last: float
    well_formed_rate: float
    """Policy: sampled first turns with >= 1 call and no parse error (JSON, tool name, argument
    schema). Simulator: sampled task-role outputs that make a valid task with no grammar
    constraining them (run time constrains them; this measures what the model learnt)."""
    attempt_rate: float
    """Policy: sampled first turns with any <tool_call> block. Simulator: those that decode as
    the role's JSON at all."""
    eval_samples: int
    guess_share: float = 0.0
    """Share of the warm-up conversations that skip the tools and guess (`GUESS_SHARE`)."""
    slip_share: float = 0.0
    """Share of the calling ones whose demonstrator slips first and recovers (`SLIP_SHARE`)."""
    data: str = "policy"
    """'policy' (toy reference conversations) or 'simulator' (the toy teacher's role answers)."""
    wall_s: float


def encode_conversation(tokenizer: Any, task: Task, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a reference conversation: mask 1 on assistant tokens (end-of-turn id
    included), as if the policy had sampled them."""
    fmt = ChatFormat(tokenizer, task.tools)
    conv = Conversation.start(fmt, messages[:2])
    pending: list[Message] = []
    for k in range(2, len(messages)):
        m = messages[k]
        if m.role != "assistant":
            pending.append(m)
            continue
        if pending:
            conv.append_env(pending)
            pending = []
        before = fmt.render_text(messages[:k], generation_prompt=True)
        after = fmt.render_text(messages[: k + 1], generation_prompt=False)
        text = after[len(before) :]
        text = text[: text.index("<|im_end|>") + len("<|im_end|>")]
        ids = fmt.encode(text)
        conv.append_sampled(ids, [0.0] * len(ids), 0)
        if k + 1 < len(messages) and messages[k + 1].role == "tool" and _refused(messages[k + 1].content):
            conv.mask[len(conv.mask) - len(ids) :] = [0] * len(ids)  # a demonstrator's slip: context only
        conv.add_assistant(m)
    return conv.ids, conv.mask


def _refused(content: str | None) -> bool:
    """A tool result that is an error object (`{"error": ...}`)."""
    try:
        obj = json.loads(content or "")
    except ValueError:
        return False
    return isinstance(obj, dict) and "error" in obj


def _knobs(rng: random.Random) -> Knobs:
    """Mostly the tasks RL starts on (the curriculum's D = 1: one tool, one call, one-digit
    numbers), some with a distractor tool, a second call or larger numbers: on-distribution
    data is what a few hundred CPU steps can afford."""
    d = rng.choice([1.0, 1.0, 1.0, 1.0, 50.0])
    return Knobs(difficulty=d, n_tools=rng.choice([1, 1, 2]), n_expected_calls=rng.choice([1, 1, 1, 2]))


GUESS_SHARE = 0.6
"""Share of warm-up conversations in which the demonstrator skips the tools and guesses.

The warm-up imitates an imperfect demonstrator on purpose: a warmed model that already did
everything its data showed would leave RL nothing to find in 30 CPU steps (a 430k-parameter
model learns to copy numbers far too slowly for that). 60% of the time it guesses, so the
warmed policy calls a tool on fewer than half of its first turns, and the reward (0 for a
guess, up to 1 through the tools) is the only thing that tells GRPO which to keep."""


SLIP_SHARE = 0.3
"""Share of the calling warm-up conversations (of a task whose tool can refuse a call) in which
the demonstrator first slips: one or two well-formed calls the tool refuses (`ToyEnv.sft_messages`),
then the right call. Only the recovery is trained (the refused calls are context, mask 0).
Without them a warmed model had never seen a tool's error, and RL, which makes it call 5 times
as often, met one on most wrong first calls: its calls after an error broke about a third of
the time, and those were most of the trained policy's malformed episodes (issue 26)."""


def _examples(
    tokenizer: Any, n: int, seed: int, guess_share: float = GUESS_SHARE, slip_share: float = 0.0
) -> list[tuple[list[int], list[int]]]:
    env, rng = ToyEnv(), random.Random(seed)
    out = []
    for _ in range(n):
        task = env.task(_knobs(rng), rng)
        guess = rng if rng.random() < guess_share else None
        slip = rng if slip_share and rng.random() < slip_share else None
        out.append(encode_conversation(tokenizer, task, env.sft_messages(task, guess=guess, slip=slip)))
    return out


def _sim_examples(tokenizer: Any, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of the toy teacher's role requests (`envs/toy_teacher.py`): the prompt exactly
    as `SimClient` renders it, then the answer and the end-of-turn id, mask 1 on those."""
    from trustee.envs.toy_teacher import examples

    fmt = ChatFormat(tokenizer, [], enable_thinking=False)
    out = []
    for ex in examples(n, seed):
        prompt, ans = fmt.prompt_ids(ex.messages), [*fmt.encode(ex.answer), fmt.eos_id]
        out.append((prompt + ans, [0] * len(prompt) + [1] * len(ans)))
    return out


def _warm_up_data(
    tokenizer: Any, n: int, seed: int, data: str, guess_share: float, slip_share: float
) -> list[tuple[list[int], list[int]]]:
    """`n` (ids, mask) examples: toy conversations for the policy, role answers for the simulator."""
    if data == "policy":
        return _examples(tokenizer, n, seed, guess_share, slip_share)
    return _sim_examples(tokenizer, n, seed)


def _batch(examples: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T] loss mask
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m)
        attn[i, : len(x)] = 1
    return ids, mask, attn


def _loss(model: Any, ids: Any, mask: Any, attn: Any) -> Any:
    """Mean cross-entropy over the assistant tokens. The vocabulary projection runs only at
    the positions that predict one (about a tenth of a toy conversation is the policy's):
    the prompt's logits would be computed and thrown away."""
    import torch.nn.functional as F

    hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]  # [B, T-1, H]
    keep = mask[:, 1:].bool()  # [B, T-1] positions whose next token is an assistant token
    logits = model.get_output_embeddings()(hidden[keep])  # [N, V]
    return F.cross_entropy(logits, ids[:, 1:][keep])


def _sample(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> list[list[int]]:
    """The new ids sampled after each prompt (pure sampling, no top-k/p), as one left-padded batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, T] left-padded
    attn = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )  # [B, T + new]
    return out[:, width:].tolist()


def well_formed_rate(
    model: Any, tokenizer: Any, *, samples: int = 32, seed: int = 12345, max_new_tokens: int = 64
) -> float:
    """Share of sampled first turns (temperature 1) on fresh toy tasks with >= 1 tool call
    and no parse error (valid JSON, known tool, schema-valid arguments)."""
    return call_rates(model, tokenizer, samples=samples, seed=seed, max_new_tokens=max_new_tokens)[0]


def call_rates(
    model: Any, tokenizer: Any, *, samples: int = 32, seed: int = 12345, max_new_tokens: int = 64
) -> tuple[float, float]:
    """(well-formed rate, attempt rate) over fresh toy tasks from the training distribution;
    the attempt rate counts turns with any `<tool_call>` block, valid or not. All samples
    are generated as one left-padded batch."""
    env, rng = ToyEnv(), random.Random(seed)
    tasks = [env.task(_knobs(rng), rng) for _ in range(samples)]
    prompts = [ChatFormat(tokenizer, t.tools).prompt_ids(env.sft_messages(t)[:2]) for t in tasks]
    rows = _sample(model, tokenizer, prompts, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    good = tried = 0
    for task, row in zip(tasks, rows, strict=True):
        parsed = ToolCallParser(task.tools).parse(tokenizer.decode(row, skip_special_tokens=False))
        good += bool(parsed.calls) and not parsed.errors
        tried += parsed.blocks > 0
    return good / samples, tried / samples


def task_rates(model: Any, tokenizer: Any, *, samples: int = 8, seed: int = 12345) -> tuple[float, float]:
    """(valid-task rate, decodable rate) of the task role's scenario answers sampled at
    temperature 0.7 with no grammar, on fresh toy-catalog draws at the curriculum's start
    (D = 1). Valid: decodes to `ScenarioDraft` and its expected calls pass the tools' schemas."""
    from trustee.envs.toy_teacher import toy_catalog
    from trustee.sim.client import decode_json
    from trustee.sim.taskgen import ScenarioDraft, catalog_history, scenario_messages, task_problems
    from trustee.types import ToolCall

    rng, catalog = random.Random(seed), toy_catalog()
    fmt = ChatFormat(tokenizer, [], enable_thinking=False)
    draws = [catalog.sample(1, rng) for _ in range(samples)]
    prompts = [fmt.prompt_ids(scenario_messages(Knobs(), catalog_history(d, tools))) for d, tools in draws]
    rows = _sample(model, tokenizer, prompts, temperature=0.7, max_new_tokens=400, seed=seed)
    valid = decoded = 0
    for (_, tools), row in zip(draws, rows, strict=True):
        text = tokenizer.decode([t for t in row if t not in (fmt.eos_id, tokenizer.pad_token_id)])
        try:
            draft = decode_json(text, ScenarioDraft)
        except (ValueError, msgspec.ValidationError):
            continue
        decoded += 1
        calls = [ToolCall(name=c.name, arguments=c.arguments) for c in draft.expected_calls]
        valid += not task_problems(tools, calls)
    return valid / samples, decoded / samples


def sft_warm(
    model_dir: str | Path,
    steps: int,
    *,
    batch_size: int = 0,
    lr: float = 3e-3,
    seed: int = 0,
    eval_samples: int = 32,
    out_dir: str | Path | None = None,
    guess_share: float = GUESS_SHARE,
    slip_share: float = SLIP_SHARE,
    data: Literal["policy", "simulator"] = "policy",
    progress: bool = False,
) -> SftReport:
    """Train the model in `model_dir` for `steps` steps on toy reference conversations
    (`data='policy'`) or on the toy teacher's simulator-role answers (`'simulator'`,
    `envs/toy_teacher.py`) and save it to `out_dir` (default: in place). Returns (and writes) the
    report. `batch_size` 0: 8 conversations a step (policy), 4 (simulator). `progress`: a tqdm bar."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1:
        raise ValueError(f"sft steps = {steps}: give at least 1 (e.g. --sft 300)")
    t0 = time.perf_counter()
    batch_size = batch_size or (8 if data == "policy" else 4)
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    # Fresh examples for every step (no repeats): a tiny model that sees the same few hundred
    # conversations again memorises their numbers instead of learning to copy them.
    n = max(256, batch_size * steps)
    examples = _warm_up_data(tok, n, seed, data, guess_share, slip_share)
    rng = random.Random(seed)
    rng.shuffle(examples)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Linear decay to 10% of lr over the run: the last steps settle instead of bouncing.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(1, steps - 1))
    model.train()
    losses = []
    bar = tqdm(total=steps, desc="SFT warm-up", unit="step", disable=not progress, dynamic_ncols=True)
    for i in range(steps):
        batch = [examples[(i * batch_size + j) % len(examples)] for j in range(batch_size)]
        ids, mask, attn = _batch(batch, tok.pad_token_id)
        loss = _loss(model, ids, mask, attn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    if data == "policy":
        rate, attempts = call_rates(model, tok, samples=eval_samples)
    else:
        rate, attempts = task_rates(model, tok, samples=eval_samples)
    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    report = SftReport(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        loss_first=losses[0],
        loss_last=sum(losses[-10:]) / len(losses[-10:]),
        well_formed_rate=rate,
        attempt_rate=attempts,
        eval_samples=eval_samples,
        guess_share=guess_share if data == "policy" else 0.0,
        slip_share=slip_share if data == "policy" else 0.0,
        data=data,
        wall_s=time.perf_counter() - t0,
    )
    (out / "trustee_sft.json").write_text(json.dumps(msgspec.to_builtins(report), indent=1))
    return report
