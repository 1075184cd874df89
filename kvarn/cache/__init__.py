"""Paged KV pools: block allocation, the fp16 ('auto') pool and the KVarN record + fp16 pool."""
from kvarn.cache.base import KVPool, PoolSizing
from kvarn.cache.block_allocator import BlockAllocator, DoubleFree
from kvarn.cache.fp16_pool import FP16Pool
from kvarn.cache.kvarn_pool import KVarNPool

__all__ = ["KVPool", "PoolSizing", "BlockAllocator", "DoubleFree", "FP16Pool", "KVarNPool", "make_pool"]


def make_pool(kv_cache_dtype: str, use_triton: bool | None = None, **kw) -> KVPool:
    """The pool class for a cache dtype: 'auto' -> FP16Pool, a KVarN preset -> KVarNPool."""
    from kvarn.format import is_kvarn

    if is_kvarn(kv_cache_dtype):
        return KVarNPool(kv_cache_dtype=kv_cache_dtype, use_triton=use_triton, **kw)
    return FP16Pool(**kw)
