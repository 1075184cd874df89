"""KVPayload: one prefilled sequence's KV cache, as it travels from prefill to decode.

    header   dict (msgpack-able): version, kv_dtype, model_fingerprint, num_layers,
             num_kv_heads (all ranks), head_dim, group_size, num_tokens,
             prompt_token_ids, first_token_id, first_token_logprob, frame, dtype,
             record_bytes, head_range, checksum
    records  uint8 [Hkv, L, nrec, RB]    KVarN records of blocks 1..nrec (empty for 'auto')
    sink     [Hkv, L, 2, ns, D]           block 0's tokens (ns = min(N, G)); [:, :, 0] = K
    tail     [Hkv, L, 2, nt, D]           the rest: KVarN: the partial last block (nt < G);
                                          'auto': every token after the sink

    KVarN (frame 'rotated', fp16):  N = ns + nrec*G + nt,  nrec = max(N//G - 1, 0)
    'auto' (frame 'model', the prefill engine's dtype; bfloat16 travels as raw uint16):
           nrec = 0, nt = N - ns

Head-major, so ``slice_heads(a, b)`` is a zero-copy view of one TP rank's heads. The
arrays are plain attributes: pickle protocol 5 (Ray) ships them out-of-band, zero-copy.
``to_bytes`` is a self-contained wire form: magic, msgpack header (with buffer
descriptors), then the raw buffers at 64-byte-aligned offsets.

The checksum is zlib.crc32 over the header (checksum field excluded, canonical
msgpack) and then every buffer, checked by ``validate``.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import msgpack
import numpy as np

PAYLOAD_VERSION = 1
_MAGIC = b"KVPL"
_BUFFERS = ("records", "sink", "tail")
_FP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


class PayloadError(ValueError):
    """A payload that must not be imported: wrong version, preset, model, shape or checksum."""


def _split(num_tokens: int, g: int, quantized: bool) -> tuple[int, int, int]:
    ns = min(num_tokens, g)
    nrec = max(num_tokens // g - 1, 0) if quantized else 0
    return ns, nrec, num_tokens - ns - nrec * g


def _raw(a: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 array (no copy when already contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


@dataclass
class KVPayload:
    header: dict
    records: np.ndarray
    sink: np.ndarray
    tail: np.ndarray
    _checksum_ok: bool = field(default=False, repr=False, compare=False)

    # --- build ---------------------------------------------------------------------
    @classmethod
    def build(cls, header: dict, records: np.ndarray, sink: np.ndarray, tail: np.ndarray) -> "KVPayload":
        h = dict(header)
        h.setdefault("version", PAYLOAD_VERSION)
        h.setdefault("head_range", [0, h["num_kv_heads"]])
        h["checksum"] = 0
        p = cls(h, np.ascontiguousarray(records), np.ascontiguousarray(sink), np.ascontiguousarray(tail))
        h["checksum"] = p.compute_checksum()
        return p

    # --- sizes ---------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.header["num_tokens"]

    @property
    def kv_dtype(self) -> str:
        return self.header["kv_dtype"]

    @property
    def first_token_id(self) -> int:
        return self.header["first_token_id"]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.header["prompt_token_ids"]

    @property
    def nbytes(self) -> int:
        return int(self.records.nbytes + self.sink.nbytes + self.tail.nbytes)

    @property
    def fp16_equivalent_nbytes(self) -> int:
        """Bytes of the same KV as an fp16 payload: 2 (K, V) * L * Hkv * N * D * 2."""
        h = self.header
        heads = h["head_range"][1] - h["head_range"][0]
        return 2 * h["num_layers"] * heads * h["num_tokens"] * h["head_dim"] * 2

    # --- views ---------------------------------------------------------------------
    def slice_heads(self, start: int, stop: int) -> "KVPayload":
        """This payload's KV heads [start, stop) (relative), zero-copy."""
        lo, hi = self.header["head_range"]
        if not 0 <= start < stop <= hi - lo:
            raise PayloadError(f"head slice [{start}, {stop}) outside the payload's {hi - lo} heads")
        h = dict(self.header, head_range=[lo + start, lo + stop])
        return KVPayload(h, self.records[start:stop], self.sink[start:stop], self.tail[start:stop], self._checksum_ok)

    def buffers(self) -> dict:
        return {"records": self.records, "sink": self.sink, "tail": self.tail}

    # --- checksum and validation ---------------------------------------------------
    def compute_checksum(self) -> int:
        h = {k: v for k, v in sorted(self.header.items()) if k != "checksum"}
        crc = zlib.crc32(msgpack.packb(h, use_bin_type=True))
        for name in _BUFFERS:
            a = getattr(self, name)
            crc = zlib.crc32(_raw(a), crc)
        return crc

    def validate(self, expected: dict) -> None:
        """Raise PayloadError unless this payload can be imported by an engine described by
        ``expected`` (keys: kv_cache_dtype, model_fingerprint, num_layers, num_kv_heads,
        head_dim, group_size, max_model_len, vocab_size; missing keys are not checked)."""
        h = self.header
        if not isinstance(h, dict):
            raise PayloadError(f"payload header must be a dict, got {type(h).__name__}")
        if h.get("version") != PAYLOAD_VERSION:
            raise PayloadError(f"payload version {h.get('version')!r} is not supported (this engine reads "
                               f"version {PAYLOAD_VERSION})")
        need = ("kv_dtype", "model_fingerprint", "num_layers", "num_kv_heads", "head_dim", "group_size",
                "num_tokens", "prompt_token_ids", "first_token_id", "frame", "dtype", "checksum", "head_range")
        missing = [k for k in need if k not in h]
        if missing:
            raise PayloadError(f"payload header lacks {', '.join(missing)}")
        want = expected.get("kv_cache_dtype")
        if want is not None and h["kv_dtype"] != want and not (h["kv_dtype"] == "auto" and want != "auto"):
            raise PayloadError(
                f"payload KV dtype {h['kv_dtype']!r} does not match this engine's kv_cache_dtype {want!r} "
                f"(an 'auto' payload can be imported into any engine; a KVarN payload only into the same preset)")
        fp = expected.get("model_fingerprint")
        if fp is not None and h["model_fingerprint"] != fp:
            raise PayloadError(f"payload was made by model {h['model_fingerprint']!r}, this engine runs {fp!r} "
                               f"(different model, config or dtype)")
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if key in expected and h[key] != expected[key]:
                raise PayloadError(f"payload {key}={h[key]} does not match this engine's {expected[key]}")
        quantized = h["kv_dtype"] != "auto"
        if quantized and "group_size" in expected and h["group_size"] != expected["group_size"]:
            raise PayloadError(f"payload group_size={h['group_size']} does not match this engine's "
                               f"{expected['group_size']}")
        n = h["num_tokens"]
        if not isinstance(n, int) or n < 1 or n != len(h["prompt_token_ids"]):
            raise PayloadError(f"payload num_tokens={n!r} does not match its {len(h['prompt_token_ids'])} "
                               f"prompt tokens (must be >= 1)")
        if "max_model_len" in expected and n + 1 > expected["max_model_len"]:
            raise PayloadError(f"payload of {n} tokens leaves no room under max_model_len={expected['max_model_len']}")
        if "vocab_size" in expected and not 0 <= h["first_token_id"] < expected["vocab_size"]:
            raise PayloadError(f"payload first_token_id={h['first_token_id']} outside the vocabulary")
        lo, hi = h["head_range"]
        hkv, nl, d, g = hi - lo, h["num_layers"], h["head_dim"], h["group_size"]
        ns, nrec, nt = _split(n, g, quantized)
        fp_dtype = np.float16 if quantized else _FP_DTYPES.get(h["dtype"])
        if fp_dtype is None:
            raise PayloadError(f"payload dtype {h['dtype']!r} is not one of {', '.join(_FP_DTYPES)}")
        rb = h.get("record_bytes", 0) if quantized else 0
        shapes = {"records": ((hkv, nl, nrec, rb), np.uint8), "sink": ((hkv, nl, 2, ns, d), fp_dtype),
                  "tail": ((hkv, nl, 2, nt, d), fp_dtype)}
        for name, (shape, dt) in shapes.items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dt:
                got = (a.shape, a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
                raise PayloadError(f"payload {name} is {got}, expected {shape} {np.dtype(dt)} for "
                                   f"{n} tokens of {h['kv_dtype']}")
        if not self._checksum_ok:
            if self.header["head_range"] != [0, h["num_kv_heads"]]:
                raise PayloadError("a head slice cannot be checksummed; validate the whole payload first")
            got = self.compute_checksum()
            if got != h["checksum"]:
                raise PayloadError(f"payload checksum mismatch (header {h['checksum']:#010x}, data {got:#010x}): "
                                   f"corrupted in transit")
            self._checksum_ok = True

    # --- wire form -----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        descs, offset, parts = [], 0, []
        for name in _BUFFERS:
            a = np.ascontiguousarray(getattr(self, name))
            pad = (-offset) % 64
            offset += pad
            parts.append((pad, a))
            descs.append([name, a.dtype.str, list(a.shape), offset, a.nbytes])
            offset += a.nbytes
        head = msgpack.packb({"header": self.header, "buffers": descs}, use_bin_type=True)
        out = bytearray(_MAGIC + struct.pack("<I", len(head)) + head)
        base = len(out)
        for (pad, a), desc in zip(parts, descs):
            out += b"\0" * (base + desc[3] - len(out))
            out += memoryview(_raw(a))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data) -> "KVPayload":
        """Parse ``to_bytes`` output; the arrays are read-only views into ``data``."""
        mv = memoryview(data)
        if len(mv) < 8 or bytes(mv[:4]) != _MAGIC:
            raise PayloadError("not a KV payload (bad magic)")
        (hlen,) = struct.unpack("<I", mv[4:8])
        try:
            meta = msgpack.unpackb(mv[8:8 + hlen], raw=False, strict_map_key=False)
            base = 8 + hlen
            arrays = {}
            for name, dt, shape, off, nbytes in meta["buffers"]:
                if base + off + nbytes > len(mv):
                    raise PayloadError(f"payload truncated: buffer {name} runs past the end")
                arrays[name] = np.frombuffer(mv, dtype=np.dtype(dt), count=int(np.prod(shape)),
                                             offset=base + off).reshape(shape)
            return cls(meta["header"], arrays["records"], arrays["sink"], arrays["tail"])
        except PayloadError:
            raise
        except Exception as e:
            raise PayloadError(f"malformed KV payload: {type(e).__name__}: {e}") from e

    def __getstate__(self):
        return {"header": self.header, "records": self.records, "sink": self.sink, "tail": self.tail}

    def __setstate__(self, state):
        self.__init__(state["header"], state["records"], state["sink"], state["tail"])
