"""The simulated environment's roles, each played by the simulator model with a typed output.

- `client.py`: one typed, JSON-schema-constrained simulator call with decode retries, the
  budget and context check, and per-role counters (`SimClient`, `SimError`, `SimStats`).
- `budget.py`: the longest output a bounded schema allows (so no role's JSON is ever cut).
- `log.py`: `SimLog`, the append-only simulator chat of one episode that every role extends
  (the KV-cache layout).
- `taskgen.py`: task generator (tools one per request, persona, goal, hidden info, expected
  calls, rubric) and tool catalogs.
- `user.py`: user simulator (persona, information gap, explicit stop signal).
- `tools.py`: tool simulator (schema check in code, state-aware group memo, error injection).
- `judge.py`: judge (TRUSTEE verdict tiers or SynthAgent rubric; k votes) and `ScriptedJudge`.
- `metrics.py`: per-step `sim/*` figures and the block model of a prefix cache.
- `fakes.py`: `FakeJsonEngine`, a test double.
- `prompts/*.txt`: the prompt templates; `domains.txt`: task domains.

`envs/simulated.py` composes them into an `Environment`. Nothing here imports the environments package (envs/ sits above sim/).
"""
