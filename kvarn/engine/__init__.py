"""The inference engine: scheduler, block manager, model runner, sampler, LLM API.

    from kvarn.engine import LLMEngine, EngineConfig, RequestOutput, SamplingParams, NotEnoughBlocks
"""
from kvarn.engine.block_manager import NotEnoughBlocks
from kvarn.engine.config import EngineConfig
from kvarn.engine.executor import Executor, MultiprocExecutor, UniProcExecutor
from kvarn.engine.llm import LLM
from kvarn.engine.llm_engine import LLMEngine
from kvarn.engine.outputs import CompletionOutput, RequestOutput
from kvarn.engine.sampling_params import SamplingParams
from kvarn.engine.sequence import Sequence, SequenceStatus

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "CompletionOutput", "SamplingParams",
           "NotEnoughBlocks", "Executor", "UniProcExecutor", "MultiprocExecutor", "Sequence", "SequenceStatus"]
