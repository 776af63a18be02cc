"""The simulator's view of one episode: one append-only chat that every role extends.

Owns `SimLog` and the renderings of the group context and of each episode event. The
layout is chosen for the KV cache (a prefix cache keyed on token blocks reuses a prompt's
longest prefix that an earlier prompt or output already filled):

1. the run-wide rules of every role (`prompts/sim_system.txt`): one fixed text, the same for
   every task, so it is cached once for the whole run; then the run's worked tool-role turns
   when there are any (simulator.tool_few_shot: the same for every task, so also cached once);
2. the group's task block (domain, persona, goal, hidden facts, opening message, tools):
   identical for every episode of a GRPO group;
3. this episode's events in order, each rendered once and never rewritten: the agent's
   messages and calls, each role request together with the simulator's own answer (kept as
   the text the model produced, so its cached output tokens are reused);
4. the new request (a user role turn, a tool call, the verdict).

So every simulator prompt of an episode extends the previous one: the user simulator,
the tool simulator and the judge read the same transcript, and the judge's prompt is the
episode's last prompt plus one short request. What only the judge may know (reference
calls, criteria, rubric) goes in the judge's request, after the transcript, so the other
roles never see it. The user simulator's rules say it only knows what the agent told it.

Called by the roles (`user.py`, `tools.py`, `judge.py`) and `envs/simulated.py`; the
judge-agreement meter (`eval/judge_agreement.py`) replays a finished conversation into a
log with `SimLog.replay`. It does not call the model.
"""

from __future__ import annotations

from string import Template

from trustee.chat.parse import canonical_json
from trustee.sim.client import load_prompt
from trustee.types import Message, Task, ToolCall, ToolSpec

AGENT_TEXT_CHARS = 1200
"""Longest agent message kept in the log (the rest is cut with a marker)."""


def tools_block(tools: list[ToolSpec]) -> str:
    return "\n".join(canonical_json(t.to_openai()["function"]) for t in tools)


def call_text(call: ToolCall) -> str:
    """The canonical form of a call (name + arguments, sorted keys), as every role reads it."""
    return canonical_json({"name": call.name, "arguments": call.arguments})


def system_message() -> Message:
    """The run-wide rules: the same tokens for every task of a run."""
    return Message(role="system", content=load_prompt("sim_system"))


def task_message(task: Task) -> Message:
    """The group's task block: the same for every episode of the group."""
    text = Template(load_prompt("sim_task")).substitute(
        domain=task.domain or "general",
        persona=task.persona or "an ordinary user",
        goal=task.goal or task.first_query,
        hidden=task.hidden_info or "- (none)",
        first_query=task.first_query,
        tools=tools_block(task.tools) or "(none)",
    )
    return Message(role="user", content=text)


def _cut(text: str, limit: int = AGENT_TEXT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ...[cut]"


class SimLog:
    """One episode's simulator chat. `messages` only ever grows (append-only), except that a
    request is sent as `messages + [request]` and joins the log with its answer afterwards."""

    def __init__(self, task: Task, examples: list[Message] | None = None):
        self.task = task
        self.messages: list[Message] = [system_message(), *(examples or []), task_message(task)]
        self.agent_calls: list[tuple[ToolCall, bool]] = []
        """The agent's parsed calls in order, each with whether it passed its schema."""

    def prompt(self, request: str) -> list[Message]:
        """The messages of a request: the whole log so far, then the request."""
        return [*self.messages, Message(role="user", content=request)]

    def answered(self, request: str, answer: str) -> None:
        """A request and the simulator's answer join the log."""
        self.messages += [Message(role="user", content=request), Message(role="assistant", content=answer)]

    def note(self, text: str) -> None:
        """An event that needs no simulator answer (an agent message nobody replies to, a call
        rejected by its schema)."""
        self.messages.append(Message(role="user", content=text))

    # ------------------------------------------------------------------ event texts

    @staticmethod
    def agent_says(text: str) -> str:
        return f"AGENT: {_cut(text) or '(no message)'}"

    @staticmethod
    def user_request(agent_text: str) -> str:
        return SimLog.agent_says(agent_text) + "\n" + load_prompt("sim_user_request").rstrip()

    @staticmethod
    def tool_request(call: ToolCall, fails: bool, agent_text: str = "") -> str:
        head = SimLog.agent_says(agent_text) + "\n" if agent_text.strip() else ""
        outcome = "it FAILS: return an error" if fails else "it succeeds"
        return f"{head}AGENT CALLS: {call_text(call)}\nTOOL: return this call's result ({outcome})."

    @staticmethod
    def rejected_call(call: ToolCall, error: str, agent_text: str = "") -> str:
        head = SimLog.agent_says(agent_text) + "\n" if agent_text.strip() else ""
        return f"{head}AGENT CALLS: {call_text(call)}\nREJECTED (shown to the agent): {error}"

    @staticmethod
    def malformed(content: str) -> str:
        return f"AGENT'S MALFORMED CALL (shown to the agent): {_cut(content, 300)}"

    # ------------------------------------------------------------------ replay

    @classmethod
    def replay(cls, task: Task, conversation: list[Message]) -> SimLog:
        """A log of a finished conversation (the judge-agreement meter, tests): the event
        texts the live environment writes, with each user turn as the user role's answer
        and each tool result as the tool role's answer to the call it follows."""
        log = cls(task)
        text = ""  # the agent's latest message, not yet in the log
        queue: list[ToolCall] = []  # its calls still waiting for a result
        opening = True
        for m in conversation:
            if m.role == "system":
                continue
            if m.role == "user":
                if opening and m.content == task.first_query:  # already in the task block
                    opening = False
                    continue
                opening = False
                answer = canonical_json({"message": m.content, "status": "continue"})
                log.answered(cls.user_request(text), answer)
                text = ""
            elif m.role == "assistant":
                if text:
                    log.note(cls.agent_says(text))
                text, queue = m.content, list(m.tool_calls)
            elif queue:  # a tool result
                call = queue.pop(0)
                log.agent_calls.append((call, True))
                log.answered(cls.tool_request(call, False, text), m.content)
                text = ""
            else:
                log.note(f"TOOL RESULT: {_cut(m.content, 600)}")
        if text:
            log.note(cls.agent_says(text))
        return log
