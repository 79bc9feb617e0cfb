"""Generation engines other than the built-in transformers one (optional extras).

Each engine module imports its heavy dependency lazily, so ``import steerlab`` never needs it.
:mod:`steerlab.engines.vllm_engine`: vLLM with per-request steering through vllm-lens.
"""
