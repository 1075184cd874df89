"""The ``kvarn`` command line.

    kvarn generate --model smollm2-135m --kv-cache-dtype kvarn_k4v2_g128 "Hello, my name is"
    kvarn generate --chat --max-tokens 64 "Write a haiku about caches"
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from kvarn.format import KV_CACHE_DTYPES


def _generate(args) -> int:
    from kvarn.engine import LLM, SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, stop=args.stop or None, ignore_eos=args.ignore_eos)
    except ValueError as e:
        print(f"kvarn: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    llm = LLM(args.model, kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, device=args.device, dtype=args.dtype,
              load_format=args.load_format, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    t1 = time.perf_counter()
    try:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
        else:
            outs = llm.generate(list(args.prompts), params)
    finally:
        llm.shutdown()
    t2 = time.perf_counter()
    ntok = sum(len(o.token_ids) for o in outs)
    if args.json:
        print(json.dumps([{"prompt": o.prompt, "text": o.text, "token_ids": o.token_ids,
                           "finish_reason": o.finish_reason} for o in outs], indent=2))
    else:
        for o in outs:
            print(o.text)
            if len(outs) > 1:
                print("-" * 40)
    print(f"[kvarn] {ntok} tokens in {t2 - t1:.2f} s ({ntok / max(t2 - t1, 1e-9):.1f} tok/s); "
          f"load {t1 - t0:.1f} s; kv_cache_dtype={args.kv_cache_dtype}; capacity "
          f"{llm.engine.capacity_tokens} tokens", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvarn", description="kvarn: LLM inference with a KVarN KV cache")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+", help="prompt text(s)")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--kv-cache-dtype", default="kvarn_k4v2_g128", choices=KV_CACHE_DTYPES)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--load-format", default="auto")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print results as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        return _generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
