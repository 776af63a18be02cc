"""The simulated environment's roles, each played by the simulator model with a typed output.

- `client.py`: one typed, JSON-schema-constrained simulator call with decode retries (`SimClient`, `SimError`).
- `taskgen.py`: task generator (tools, persona, goal, hidden info, expected calls, rubric) and tool catalogs.
- `user.py`: user simulator (persona, information gap, explicit stop signal).
- `tools.py`: tool simulator (schema check in code, group consistency memo, error injection).
- `judge.py`: judge (TRUSTEE verdict tiers or SynthAgent rubric; k votes).
- `fakes.py`: `FakeJsonEngine`, a test double.
- `prompts/*.txt`: the prompt templates; `domains.txt`: task domains.

`envs/simulated.py` composes them into an `Environment`.
"""
