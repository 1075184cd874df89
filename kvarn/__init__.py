"""kvarn: an LLM inference engine whose KV cache is stored in the KVarN format.

Import-light: ``kvarn.format`` and ``kvarn.quant`` need only torch; the engine API
(``LLM``, ``SamplingParams``) is loaded on first use. Never imports Ray.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("LLM", "SamplingParams"):
        from kvarn.engine import llm, sampling_params
        return {"LLM": llm.LLM, "SamplingParams": sampling_params.SamplingParams}[name]
    raise AttributeError(f"module 'kvarn' has no attribute {name!r}")
