"""KVarN presets and the byte layout of one record.

A *record* is one tile (G consecutive tokens of one paged block, one layer, one KV
head) quantized to codes plus fp16 scales. ``KVarNConfig`` answers every question of
layout arithmetic; nothing else in the project computes an offset by hand.

Record layout (uint8, little-endian, ../shared/KVARN_FORMAT.md):

    offset 0                                                          record_bytes
    | K codes      | k_scale | k_zero | k_tok | V codes      | v_chan | v_scale | v_zero | pad |
    | D*G*bK/8     | 2D      | 2D     | 2G    | G*D*bV/8     | 2D     | 2G      | 2G     | ->8 |
      channel-major: row d holds G token codes    token-major: row t holds D channel codes

Inside a code row the lowest index sits in the lowest bits of its byte.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

SUPPORTED_HEAD_DIMS = (64, 128, 256)

# name -> (k_bits, v_bits, tile size G)
PRESETS: dict[str, tuple[int, int, int]] = {
    "kvarn_k4v2_g128": (4, 2, 128),
    "kvarn_k4v4_g128": (4, 4, 128),
    "kvarn_k4v2_g64": (4, 2, 64),
    "kvarn_k4v4_g64": (4, 4, 64),
}
DEFAULT_PRESET = "kvarn_k4v2_g128"
# Every value the engine's ``kv_cache_dtype`` accepts: ``auto`` keeps the model's fp16.
KV_CACHE_DTYPES = ("auto", *PRESETS)


def is_kvarn(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype in PRESETS


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass(frozen=True)
class KVarNConfig:
    """One preset at one head_dim, plus the knobs of the quantizer.

    The defaults are the reference implementation's constants and give byte-exact
    records. ``rotate``/``normalize``/``log_clip``/``norm_iters`` exist for ablations
    and remedies; changing them changes the records' contents, never their layout.
    """

    name: str
    k_bits: int
    v_bits: int
    group_size: int
    head_dim: int
    norm_iters: int = 8
    rotate: bool = True
    normalize: bool = True
    log_clip: tuple[float, float] = (-0.3, 10.0)
    # derived layout, filled in __post_init__
    offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    record_bytes: int = field(init=False, compare=False)

    @classmethod
    def from_name(cls, name: str, head_dim: int, **overrides) -> "KVarNConfig":
        if name not in PRESETS:
            raise ValueError(
                f"unknown KVarN preset {name!r}; supported: {', '.join(PRESETS)}"
                " (or 'auto' for an unquantized fp16 cache, which has no KVarNConfig)"
            )
        k_bits, v_bits, g = PRESETS[name]
        return cls(name=name, k_bits=k_bits, v_bits=v_bits, group_size=g, head_dim=head_dim, **overrides)

    def __post_init__(self):
        d, g = self.head_dim, self.group_size
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"KVarN supports head_dim in {SUPPORTED_HEAD_DIMS} (a power of two), got {d}"
            )
        for bits in (self.k_bits, self.v_bits):
            if bits not in (2, 4):
                raise ValueError(f"KVarN code width must be 2 or 4 bits, got {bits}")
        if g not in (64, 128):
            raise ValueError(f"KVarN tile size G must be 64 or 128, got {g}")
        if self.norm_iters < 0:
            raise ValueError(f"norm_iters must be >= 0, got {self.norm_iters}")
        sizes = [
            ("k_codes", d * g * self.k_bits // 8),
            ("k_scale", 2 * d),
            ("k_zero", 2 * d),
            ("k_tok", 2 * g),
            ("v_codes", g * d * self.v_bits // 8),
            ("v_chan", 2 * d),
            ("v_scale", 2 * g),
            ("v_zero", 2 * g),
        ]
        offsets, pos = {}, 0
        for fname, nbytes in sizes:
            offsets[fname] = pos
            pos += nbytes
        offsets["end"] = pos
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "record_bytes", _pad8(pos))

    def with_options(self, **changes) -> "KVarNConfig":
        return replace(self, **changes)

    # --- layout -----------------------------------------------------------------
    @property
    def k_row_bytes(self) -> int:
        """Bytes of one channel's row of K codes (G tokens)."""
        return self.group_size * self.k_bits // 8

    @property
    def v_row_bytes(self) -> int:
        """Bytes of one token's row of V codes (D channels)."""
        return self.head_dim * self.v_bits // 8

    def field_slice(self, name: str) -> slice:
        keys = list(self.offsets)
        i = keys.index(name)
        return slice(self.offsets[name], self.offsets[keys[i + 1]])

    # --- sizes ------------------------------------------------------------------
    @property
    def bytes_per_token_per_head(self) -> float:
        return self.record_bytes / self.group_size

    @property
    def bits_per_element(self) -> float:
        """Bits per cached K or V element, scales and padding counted."""
        return self.record_bytes * 8 / (2 * self.group_size * self.head_dim)

    @property
    def compression_ratio(self) -> float:
        """fp16 K+V bytes of a tile over the record's bytes."""
        return 2 * 2 * self.group_size * self.head_dim / self.record_bytes
