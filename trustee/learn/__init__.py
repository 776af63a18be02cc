"""The learner side of GRPO: policy loading, advantages, losses, packing, the step, export.

Modules (import them directly; this package imports nothing, so `advantages` stays usable
without loading torch):
- `advantages`: group-relative advantages, zero-variance filtering (pure Python);
- `grpo`: per-token losses, IS correction, aggregations, the step normaliser (pure torch);
- `packing`: micro-batches by token budget, packed or padded;
- `logprobs`: chunked log-probs over loss tokens only;
- `policy`: full / LoRA / QLoRA models and the KL reference;
- `learner`: `Learner.step` / `step_async` and `StepMetrics`;
- `export`: LoRA adapters, full and merged weights as engine updates.
"""
