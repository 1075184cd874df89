#!/usr/bin/env python
"""Accuracy of a KVarN KV cache: how a model's next-token predictions change when
its past keys/values are read from the cache the way a decode step reads them.

    python benchmarks/accuracy.py                      # full sweep on SmolLM2-135M
    python benchmarks/accuracy.py --kv-cache-dtype kvarn_k4v2_g128 --json
    python benchmarks/accuracy.py --out benchmarks/results/accuracy_smollm2.json \\
                                  --plot benchmarks/results/accuracy_smollm2.png

Method
------
The text is fed to the model in chunks of C tokens (``--chunk``, default 64, at most
the tile size G). Every chunk attends exactly (fp16 K/V) to itself, causally, and to
the past as a KVarN cache holds it (KVARN_FORMAT.md, "Which tokens stay fp16"):

    past = [ sink: block 0, fp16 | records: every full block after it, quantized
             with ``kvarn.quant.quantize_blocks`` and read back with
             ``dequantize_blocks`` | tail: the partial last block, fp16 ]

Each full block is quantized once, when it fills up, exactly as the engine commits
it. The model runs in float32 on the CPU through Hugging Face transformers; the
attention of every layer is replaced by ``kvarn_eval`` (registered through
``transformers.AttentionInterface``), which keeps its own per-layer past store
(``module.layer_idx``): the full-precision past K/V and the "cache view" of it. Each
chunk is one ``model(...)`` call with ``use_cache=False`` and position ids offset by
the past length, so RoPE is the one the cache saw. Errors compound as in decode: the
K/V a chunk adds to the past were computed by layers that read the quantized past.

Baselines and ablations (``--kv-cache-dtype``, generic syntax ``name[:opt,...]``):

* ``auto``: past cast to fp16 and back (the fp16 cache). It is the reference: KL and
  top-1 agreement of every configuration are measured against its distributions, so
  it is always run first (prepended when not asked for).
* ``kvarn_k4v2_g128`` etc.: the presets, with the reference constants.
* options: ``no_rotation`` (rotate=False), ``no_norm`` (normalize=False), ``kivi``
  (both: plain per-channel K / per-token V round-to-nearest, KIVI-like),
  ``clip=LO`` (log_clip=(LO, 10)), ``iters=N`` (norm_iters=N). Diagnostics that are
  not formats: ``fp16_k`` / ``fp16_v`` (that tensor is read back in fp16, only the
  other goes through the records), ``no_sink`` (block 0 is quantized too).
* ``fp8_e4m3``: the whole past cast to torch.float8_e4m3fn and back, per-tensor
  scale 1 (torch saturates at +-448).

When C divides G (the default: 64 | 64, 128), every query sees exactly what a decode
step at its position would read: its own block's earlier tokens in fp16 (this chunk,
or this chunk plus the tail) and every earlier full block but the sink quantized.

Metrics, over every predicted position (0..N-2, predicting tokens 1..N-1):
perplexity = exp(mean NLL of the true next token); ``kl`` = mean KL(p_fp16 || p_cfg);
``top1_agreement`` = fraction of positions whose argmax equals the fp16 run's;
``ppl_rel_to_fp16`` (%) with ``ppl_rel_ci95``, a (naive, positions-independent) 95%
half-width of that delta: perplexity deltas below ~0.5% are within noise here, KL is
the finer measure.

Text
----
The default text is The Python Language Reference as shipped inside every CPython
installation: the ``pydoc_data.topics`` module of the standard library holds the
plain-text rendering of the reference's sections for ``help()``. We concatenate the
sections "Objects, values and types", "Execution model", "The import system", "The
standard type hierarchy" and "Comparisons" (then any other sections, in sorted
order, should a Python version lack some). It is genuine, human-written English
expository prose (by the Python documentation authors, PSF licence), not written by
this project, and it is guaranteed present on any machine that can run the project:
it is part of the interpreter itself, needs no download, and no extra package (a
stdlib module, unlike ``idlelib`` or ``test`` which some distributions split off).
The default sections give ~16k tokens with the SmolLM2 tokenizer; the first
``--num-tokens`` (default 4,096) are evaluated. Its exact content depends on the
Python version, which the results header records. ``--text-file PATH`` evaluates
any other UTF-8 text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvarn.format import PRESETS, KVarNConfig  # noqa: E402
from kvarn.quant import dequantize_blocks, quantize_blocks  # noqa: E402

ATTN_NAME = "kvarn_eval"

DEFAULT_SWEEP = (
    "auto",
    "kvarn_k4v2_g128",
    "kvarn_k4v4_g128",
    "kvarn_k4v2_g64",
    "kvarn_k4v4_g64",
    "kvarn_k4v2_g128:no_rotation",
    "kvarn_k4v2_g128:no_norm",
    "kvarn_k4v2_g128:kivi",
    "fp8_e4m3",
)
REFERENCE = "auto"
TEXT_TOPICS = ("objects", "execmodel", "import", "types", "comparisons")
FP8_MAX = 448.0
# Diagnostic switches (not KVarN formats): which part of the error comes from where.
BENCH_OPTIONS = {
    "fp16_k": "K read back in fp16 (only V goes through the records)",
    "fp16_v": "V read back in fp16 (only K goes through the records)",
    "no_sink": "block 0 is quantized too (no fp16 sink)",
}

# Targets (on SmolLM2-135M, 4,096 tokens): perplexity within this much of fp16.
PPL_TARGETS = {"kvarn_k4v4_g128": 1.0, "kvarn_k4v2_g128": 2.0}


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class CacheSpec:
    """One ``--kv-cache-dtype`` value: how the past is held."""

    label: str                      # the string as given, e.g. "kvarn_k4v2_g128:no_norm"
    kind: str                       # "auto" | "fp8_e4m3" | "kvarn"
    preset: str = ""
    options: dict = field(default_factory=dict)     # KVarNConfig overrides
    bench: frozenset = frozenset()                  # benchmark-only switches (diagnostics)

    def kvarn_config(self, head_dim: int) -> KVarNConfig:
        if self.kind != "kvarn":
            raise ValueError(f"{self.label} is not a KVarN configuration")
        return KVarNConfig.from_name(self.preset, head_dim, **self.options)

    @property
    def group_size(self) -> int | None:
        return PRESETS[self.preset][2] if self.kind == "kvarn" else None


def parse_spec(label: str) -> CacheSpec:
    """``name[:option,...]`` -> CacheSpec. Options apply to KVarN presets only."""
    label = label.strip()
    name, _, opts = label.partition(":")
    name = name.strip()
    options: dict = {}
    bench: set = set()
    for opt in (o.strip() for o in opts.split(",") if o.strip()):
        key, eq, val = opt.partition("=")
        key = key.strip().lower()
        try:
            if key in ("no_rotation", "no_rotate", "norot"):
                options["rotate"] = False
            elif key in ("no_norm", "no_normalization", "nonorm"):
                options["normalize"] = False
            elif key == "kivi":
                options["rotate"] = False
                options["normalize"] = False
            elif key == "clip" and eq:
                options["log_clip"] = (float(val), 10.0)
            elif key == "iters" and eq:
                options["norm_iters"] = int(val)
            elif key in BENCH_OPTIONS and not eq:
                bench.add(key)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad option {opt!r} in {label!r}; known: no_rotation, no_norm, kivi, clip=LO, iters=N, "
                f"{', '.join(BENCH_OPTIONS)}"
            ) from None
    if name in ("auto", "fp16"):
        kind = "auto"
    elif name in ("fp8_e4m3", "fp8"):
        kind = "fp8_e4m3"
    elif name in PRESETS:
        kind = "kvarn"
    else:
        raise ValueError(
            f"unknown kv cache dtype {name!r}; known: auto, fp8_e4m3, {', '.join(PRESETS)}"
        )
    if (options or bench) and kind != "kvarn":
        raise ValueError(f"options only apply to KVarN presets, got {label!r}")
    if {"fp16_k", "fp16_v"} <= bench:
        raise ValueError(f"fp16_k and fp16_v together leave nothing quantized: {label!r}")
    return CacheSpec(label=label, kind=kind, preset=name if kind == "kvarn" else "", options=options,
                     bench=frozenset(bench))


# ----------------------------------------------------------------------------- the cache view


def _fp16_rt(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def _fp8_rt(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


class KVarNEvalAttention:
    """The ``kvarn_eval`` attention: one evaluation's per-layer past store and cache view.

    Per layer (``module.layer_idx``), batch 1, preallocated for ``capacity`` tokens:

    * ``k``/``v`` [layers, Hkv, capacity, D] fp32: the past as computed (full precision);
    * ``view_k``/``view_v``: the past as the cache returns it to attention. Written when
      tokens arrive (fp16 round trip, or fp8 for ``fp8_e4m3``); for KVarN, each block
      after the sink is overwritten by its dequantized record once it is full (it is
      quantized exactly once, for all layers in one batched call, when layer 0 of the
      next chunk runs: all layers then hold the same past).
    """

    def __init__(self, spec: CacheSpec, num_layers: int, hkv: int, head_dim: int, capacity: int):
        self.spec = spec
        self.cfg = spec.kvarn_config(head_dim) if spec.kind == "kvarn" else None
        self.g = self.cfg.group_size if self.cfg else None
        shape = (num_layers, hkv, capacity, head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.view_k = torch.zeros(shape)
        self.view_v = torch.zeros(shape)
        self.length = [0] * num_layers
        self.frozen = 0                  # KVarN: tokens [0, frozen) are sink + records
        self.quant_seconds = 0.0
        self._mask_cache: tuple | None = None

    def _freeze_full_blocks(self, p: int):
        """Quantize (all layers at once) every block that is full in a past of p tokens."""
        g = self.g
        full = p // g * g
        if self.frozen == 0 and full >= g and "no_sink" not in self.spec.bench:
            self.frozen = g              # block 0, the sink, stays fp16 (already in the view)
        if full <= self.frozen:
            return
        if len(set(self.length)) != 1:
            raise RuntimeError("layers hold pasts of different lengths")
        t0 = time.perf_counter()
        nl, hkv, _, d = self.k.shape
        n = (full - self.frozen) // g
        sl = slice(self.frozen, full)

        def blocks(x):                   # [layers, Hkv, n*G, D] -> [layers*n, G, Hkv, D] fp16
            x = x[:, :, sl].reshape(nl, hkv, n, g, d).permute(0, 2, 3, 1, 4)
            return x.reshape(nl * n, g, hkv, d).to(torch.float16).contiguous()

        def unblocks(x):                 # inverse of blocks, fp32
            return x.float().reshape(nl, n, g, hkv, d).permute(0, 3, 1, 2, 4).reshape(nl, hkv, n * g, d)

        k2, v2 = dequantize_blocks(quantize_blocks(blocks(self.k), blocks(self.v), self.cfg), self.cfg)
        if "fp16_k" not in self.spec.bench:
            self.view_k[:, :, sl] = unblocks(k2)
        if "fp16_v" not in self.spec.bench:
            self.view_v[:, :, sl] = unblocks(v2)
        self.frozen = full
        self.quant_seconds += time.perf_counter() - t0

    def _mask(self, p: int, lq: int, rep: int) -> torch.Tensor:
        """[rep*lq, p+lq] bool: the whole past visible, causal inside the chunk."""
        key = (p, lq, rep)
        if self._mask_cache is None or self._mask_cache[0] != key:
            m = torch.ones(lq, p + lq, dtype=torch.bool)
            m[:, p:] = torch.ones(lq, lq, dtype=torch.bool).tril()
            self._mask_cache = (key, m.repeat(rep, 1))
        return self._mask_cache[1]

    def past_view(self, layer_idx: int):
        """(k, v) [Hkv, P, D] fp32: the past of a layer as this cache returns it."""
        p = self.length[layer_idx]
        return self.view_k[layer_idx, :, :p], self.view_v[layer_idx, :, :p]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query [1, Hq, L, D], key/value [1, Hkv, L, D] (post-RoPE) -> ([1, L, Hq, D], None)."""
        if query.shape[0] != 1:
            raise ValueError("kvarn_eval evaluates one sequence at a time (batch 1)")
        li = module.layer_idx
        p = self.length[li]
        _, hq, lq, d = query.shape
        hkv = key.shape[1]
        if p + lq > self.k.shape[2]:
            raise RuntimeError("past store capacity exceeded")
        if self.cfg is not None and li == 0:
            self._freeze_full_blocks(p)
        kn, vn = key[0].float(), value[0].float()
        new = slice(p, p + lq)
        self.k[li, :, new] = kn
        self.v[li, :, new] = vn
        self.view_k[li, :, new] = _fp16_rt(kn)          # the chunk itself: exact, fp16
        self.view_v[li, :, new] = _fp16_rt(vn)
        k_all = self.view_k[li, :, :p + lq]
        v_all = self.view_v[li, :, :p + lq]
        # GQA without repeating K/V: the rep query heads of a KV head become rep*L queries
        rep = hq // hkv
        q = query[0].float().reshape(hkv, rep * lq, d)
        if scaling is None:
            scaling = d ** -0.5
        out = torch.nn.functional.scaled_dot_product_attention(
            q[None], k_all[None], v_all[None], attn_mask=self._mask(p, lq, rep), scale=scaling
        )
        out = out[0].reshape(hq, lq, d).transpose(0, 1)[None]
        if self.spec.kind == "fp8_e4m3":                # later chunks read these tokens as fp8
            self.view_k[li, :, new] = _fp8_rt(kn)
            self.view_v[li, :, new] = _fp8_rt(vn)
        self.length[li] = p + lq
        return out.contiguous().to(query.dtype), None


_ACTIVE: list[KVarNEvalAttention] = []


def _kvarn_eval_attention(module, query, key, value, attention_mask, **kwargs):
    if not _ACTIVE:
        raise RuntimeError("kvarn_eval attention called outside evaluate()")
    return _ACTIVE[-1](module, query, key, value, attention_mask, **kwargs)


def register_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _kvarn_eval_attention)


def prepare_model(model):
    """Switch a loaded transformers model to the ``kvarn_eval`` attention."""
    register_attention()
    model.eval()
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:
        model.config._attn_implementation = ATTN_NAME
    return model


# ----------------------------------------------------------------------------- evaluation


@dataclass
class RunResult:
    spec: CacheSpec
    nll: torch.Tensor               # [N-1] fp64
    kl: torch.Tensor | None         # [N-1] fp64
    top1: torch.Tensor | None       # [N-1] bool
    argmax: torch.Tensor            # [N-1]
    seconds: float
    quant_seconds: float

    def summary(self, ref: "RunResult | None" = None) -> dict:
        ppl = math.exp(self.nll.mean().item())
        out = {
            "kv_cache_dtype": self.spec.label,
            "perplexity": ppl,
            "kl": self.kl.mean().item() if self.kl is not None else None,
            "top1_agreement": self.top1.float().mean().item() if self.top1 is not None else None,
            "num_tokens": int(self.nll.numel() + 1),
            "num_predictions": int(self.nll.numel()),
        }
        if ref is not None:
            ref_ppl = math.exp(ref.nll.mean().item())
            out["ppl_rel_to_fp16"] = (ppl / ref_ppl - 1.0) * 100.0
            # noise of that delta: 95% half-width from the per-position NLL differences
            # (treats positions as independent, so it is optimistic)
            dn = self.nll - ref.nll
            se = dn.std().item() / math.sqrt(dn.numel()) if dn.numel() > 1 else 0.0
            out["ppl_rel_ci95"] = 1.96 * se * ppl / ref_ppl * 100.0
        if self.kl is not None:
            out["kl_p99"] = torch.quantile(self.kl.float(), 0.99).item()
            out["kl_max"] = self.kl.max().item()
        out["seconds"] = round(self.seconds, 2)
        out["quant_seconds"] = round(self.quant_seconds, 2)
        if self.spec.kind == "kvarn":
            cfg = self.spec.kvarn_config(64)
            out["bits_per_element_d64"] = round(cfg.bits_per_element, 4)
        return out


@torch.inference_mode()
def run_one(model, input_ids: torch.Tensor, spec: CacheSpec, chunk: int,
            ref_logprobs: list | None = None, keep_logprobs: bool = False, pbar=None) -> tuple[RunResult, list]:
    """Evaluate one cache configuration. input_ids [N] long.

    ref_logprobs: per-chunk log-softmax tensors of the reference run (for KL/top-1).
    Returns the result and (if keep_logprobs) this run's per-chunk log-probs.
    """
    cfgm = model.config
    hkv = cfgm.num_key_value_heads
    d = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // cfgm.num_attention_heads
    n = input_ids.numel()
    if spec.group_size is not None and chunk > spec.group_size:
        raise ValueError(f"--chunk {chunk} exceeds the tile size G={spec.group_size} of {spec.label}")
    attn = KVarNEvalAttention(spec, cfgm.num_hidden_layers, hkv, d, n)
    nll, kls, tops, argmaxes, kept = [], [], [], [], []
    t0 = time.perf_counter()
    _ACTIVE.append(attn)
    try:
        for ci, start in enumerate(range(0, n, chunk)):
            ids = input_ids[start:start + chunk]
            pos = torch.arange(start, start + ids.numel())[None]
            logits = model(input_ids=ids[None], position_ids=pos, use_cache=False).logits[0].float()
            # predictions for tokens start+1 .. ; the very last position has no target
            npred = min(ids.numel(), n - 1 - start)
            lp = torch.log_softmax(logits[:npred], dim=-1)
            tgt = input_ids[start + 1:start + 1 + npred]
            nll.append(-lp.gather(1, tgt[:, None])[:, 0].double())
            am = lp.argmax(-1)
            argmaxes.append(am)
            if ref_logprobs is not None:
                ref = ref_logprobs[ci]
                kls.append((ref.exp() * (ref - lp)).sum(-1).double().clamp_min(0.0))
                tops.append(am == ref.argmax(-1))
            if keep_logprobs:
                kept.append(lp)
            if pbar is not None:
                pbar.update(1)
    finally:
        _ACTIVE.remove(attn)
    res = RunResult(
        spec=spec,
        nll=torch.cat(nll),
        kl=torch.cat(kls) if ref_logprobs is not None else None,
        top1=torch.cat(tops) if ref_logprobs is not None else None,
        argmax=torch.cat(argmaxes),
        seconds=time.perf_counter() - t0,
        quant_seconds=attn.quant_seconds,
    )
    return res, kept


def evaluate(model, input_ids, labels, chunk: int = 64, progress: bool = True, on_result=None) -> list[dict]:
    """Run ``auto`` (the reference) then every other label; return one summary dict per label.

    The reference is always computed (first); it is reported only if asked for.
    """
    specs = [parse_spec(x) for x in labels]
    for s in specs:
        if s.group_size is not None and chunk > s.group_size:
            raise ValueError(f"chunk {chunk} exceeds the tile size G={s.group_size} of {s.label}")
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    n_chunks = math.ceil(input_ids.numel() / chunk)
    want_ref = any(s.kind == "auto" for s in specs)
    others = [s for s in specs if s.kind != "auto"]
    ref_spec = next((s for s in specs if s.kind == "auto"), parse_spec(REFERENCE))
    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=n_chunks * (1 + len(others)), unit="chunk", desc="accuracy", file=sys.stderr)
    out = []
    try:
        if pbar is not None:
            pbar.set_postfix_str(ref_spec.label)
        ref, ref_lp = run_one(model, input_ids, ref_spec, chunk, keep_logprobs=True, pbar=pbar)
        # the reference against itself: KL 0, top-1 1.0 by construction; computed, not assumed
        ref.kl = torch.cat([(lp.exp() * (lp - lp)).sum(-1).double() for lp in ref_lp])
        ref.top1 = torch.cat([lp.argmax(-1) == lp.argmax(-1) for lp in ref_lp])
        if want_ref:
            s = ref.summary(ref)
            out.append(s)
            if on_result:
                on_result(s)
        for spec in others:
            if pbar is not None:
                pbar.set_postfix_str(spec.label)
            res, _ = run_one(model, input_ids, spec, chunk, ref_logprobs=ref_lp, pbar=pbar)
            s = res.summary(ref)
            out.append(s)
            if on_result:
                on_result(s)
    finally:
        if pbar is not None:
            pbar.close()
    # report in the order asked
    order = {s.label: i for i, s in enumerate(specs)}
    out.sort(key=lambda r: order.get(r["kv_cache_dtype"], -1))
    return out


# ----------------------------------------------------------------------------- text, model, header


def default_text() -> tuple[str, str]:
    """The Python Language Reference sections from the stdlib's pydoc_data (see module doc)."""
    from pydoc_data import topics as topics_mod

    topics = topics_mod.topics
    keys = [k for k in TEXT_TOPICS if k in topics]
    keys += [k for k in sorted(topics) if k not in keys]
    text = "\n\n".join(topics[k].strip() for k in keys)
    src = (
        f"Python {platform.python_version()} standard library, pydoc_data.topics "
        f"({Path(topics_mod.__file__).name}): The Python Language Reference sections "
        f"{', '.join(repr(k) for k in keys[:len(TEXT_TOPICS)])}, ... concatenated in that order"
    )
    return text, src


def load_text(path: str | None) -> tuple[str, str]:
    if path is None:
        return default_text()
    p = Path(path)
    return p.read_text(encoding="utf-8"), f"file {p.resolve()}"


def tokenize(tokenizer, text: str, num_tokens: int) -> torch.Tensor:
    tokenizer.model_max_length = 1 << 30          # we truncate ourselves; silence the warning
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < num_tokens:
        raise ValueError(f"the text has only {ids.numel()} tokens, fewer than --num-tokens {num_tokens}")
    return ids[:num_tokens]


def load_model(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvarn.models import resolve

    path = resolve(name)
    register_attention()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_NAME)
    return prepare_model(model), tok, path


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else "no-commit"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        if head.returncode != 0:
            dirty = dirty or git("status", "--porcelain").stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args, text_source: str, model_path, threads: int) -> dict:
    import transformers

    return {
        "benchmark": "kvarn accuracy (chunked prefill over a KVarN cache view)",
        "device": f"cpu: {_cpu_name()} ({os.cpu_count()} cores, {threads} torch threads)",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "model": args.model,
        "model_path": str(model_path),
        "text_source": text_source,
        "num_tokens": args.num_tokens,
        "chunk": args.chunk,
        "reference": REFERENCE,
        "targets": {
            "ppl_rel_to_fp16_max_pct": PPL_TARGETS,
            "kl": "every KVarN preset below the no_rotation/no_norm (kivi) ablation at the same bits",
        },
    }


# ----------------------------------------------------------------------------- report


def format_table(results: list[dict]) -> str:
    lines = [f"{'kv_cache_dtype':34s} {'ppl':>9s} {'rel % (95%)':>15s} {'KL':>10s} {'top1':>7s} {'sec':>7s}"]
    for r in results:
        rel, kl, top1 = r.get("ppl_rel_to_fp16"), r.get("kl"), r.get("top1_agreement")
        rel_s = f"{rel:+.3f}±{r.get('ppl_rel_ci95', 0.0):.3f}" if rel is not None else "-"
        kl_s = f"{kl:.3e}" if kl is not None else "-"
        top1_s = f"{top1:.4f}" if top1 is not None else "-"
        lines.append(f"{r['kv_cache_dtype']:34s} {r['perplexity']:9.4f} {rel_s:>15s} {kl_s:>10s} "
                     f"{top1_s:>7s} {r['seconds']:7.1f}")
    return "\n".join(lines)


def check_targets(results: list[dict]) -> list[str]:
    """Human-readable verdicts for the targets that apply to the configurations run."""
    by = {r["kv_cache_dtype"]: r for r in results}
    notes = []
    for name, lim in PPL_TARGETS.items():
        if name in by and by[name].get("ppl_rel_to_fp16") is not None:
            rel = by[name]["ppl_rel_to_fp16"]
            notes.append(f"{name}: ppl {rel:+.3f}% vs fp16 (target within {lim}%): "
                         f"{'MET' if abs(rel) <= lim else 'MISSED'}")
    # KVarN presets vs the ablation at the same bits (the ablations are at k4v2_g128)
    for r in results:
        spec = parse_spec(r["kv_cache_dtype"])
        if spec.kind != "kvarn" or spec.options or spec.bench:
            continue
        for abl in ("kivi", "no_rotation", "no_norm"):
            a = by.get(f"{spec.preset}:{abl}")
            if a is not None:
                ok = r["kl"] < a["kl"]
                notes.append(f"{spec.preset} KL {r['kl']:.3e} vs {a['kv_cache_dtype']} {a['kl']:.3e}: "
                             f"{'MET' if ok else 'MISSED'}")
    return notes


def plot(results: list[dict], path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["kv_cache_dtype"] != REFERENCE]
    labels = [r["kv_cache_dtype"].replace("kvarn_", "").replace(":", "\n") for r in rows]
    rel = [r["ppl_rel_to_fp16"] for r in rows]
    kl = [max(r["kl"], 1e-12) for r in rows]

    def color(r):
        s = parse_spec(r["kv_cache_dtype"])
        if s.kind != "kvarn":
            return "tab:gray"
        if s.options.get("rotate") is False or s.options.get("normalize") is False:
            return "tab:orange"
        return "tab:green" if (s.options or s.bench) else "tab:blue"

    colors = [color(r) for r in rows]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8.0, 0.95 * len(rows) + 2), 8.5))
    x = range(len(rows))
    a1.bar(x, rel, color=colors)
    a1.axhline(1.0, color="tab:green", ls="--", lw=1, label="1% (k4v4_g128 target)")
    a1.axhline(2.0, color="tab:red", ls="--", lw=1, label="2% (k4v2_g128 target)")
    a1.axhline(0.0, color="black", lw=0.8)
    a1.set_ylabel("perplexity vs fp16 (%)")
    a1.set_xticks(list(x), labels, fontsize=8)
    a1.legend(fontsize=8)
    for i, v in enumerate(rel):
        a1.text(i, v, f"{v:+.2f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    a2.bar(x, kl, color=colors)
    a2.set_yscale("log")
    a2.set_ylabel("mean KL(p_fp16 || p_cfg) (nats)")
    a2.set_xticks(list(x), labels, fontsize=8)
    for i, v in enumerate(kl):
        a2.text(i, v, f"{v:.2e}", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch

    kinds = {"tab:blue": "KVarN preset", "tab:green": "KVarN remedy / diagnostic option",
             "tab:orange": "ablation (no rotation / no norm)", "tab:gray": "fp8 e4m3 (scale 1)"}
    a2.legend(handles=[Patch(color=c, label=t) for c, t in kinds.items() if c in colors], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="kvarn.models.resolve name or path")
    ap.add_argument("--kv-cache-dtype", nargs="+", default=None, metavar="NAME[:OPT,...]",
                    help=f"configurations (default: the sweep {' '.join(DEFAULT_SWEEP)})")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per forward call (<= G)")
    ap.add_argument("--num-tokens", type=int, default=4096)
    ap.add_argument("--text-file", default=None, help="UTF-8 text to evaluate instead of the default")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    ap.add_argument("--out", default=None, help="write a results JSON file (header + results)")
    ap.add_argument("--plot", default=None, help="write a PNG of ppl delta and KL per configuration")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    labels = args.kv_cache_dtype or list(DEFAULT_SWEEP)
    for lab in labels:
        parse_spec(lab)                       # fail early on a typo
    if args.chunk < 1:
        ap.error("--chunk must be >= 1")

    t0 = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, tok, model_path = load_model(args.model)
    text, source = load_text(args.text_file)
    ids = tokenize(tok, text, args.num_tokens)

    def emit(r):
        if args.json:
            print(json.dumps(r), flush=True)

    results = evaluate(model, ids, labels, chunk=args.chunk, progress=not args.no_progress, on_result=emit)
    total = time.perf_counter() - t0
    verdicts = check_targets(results)
    if not args.json:
        print(f"model {args.model} ({model_path}), {ids.numel()} tokens, chunk {args.chunk}, "
              f"{args.threads} threads\ntext: {source}")
        print(format_table(results))
        for v in verdicts:
            print("  " + v)
        print(f"total {total:.1f} s")
    if args.out:
        doc = header(args, source, model_path, args.threads)
        doc["total_seconds"] = round(total, 1)
        # other processes on the machine slow the run down: record how busy it was
        doc["machine"]["loadavg_1_5_15_start"] = load_start
        doc["machine"]["loadavg_1_5_15_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        doc["verdicts"] = verdicts
        doc["results"] = results
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(results, args.plot, title=f"{args.model}: {ids.numel()} tokens, chunk {args.chunk} "
                                       f"(KL and ppl vs the fp16 cache)")
    return results


if __name__ == "__main__":
    main()
