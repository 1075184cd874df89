"""CPU emulation of the Gluon record kernel's score / value arithmetic in each unpack
variant, to compare their rounding error before a GPU run (NOTES.md attempts 50-53).

    python benchmarks/raw_numerics.py [--d 64] [--qh 1] [--records 60] [--seeds 5]

Records are quantized from the tests' K / V (per-channel offsets and spreads, like real
K). Per variant, scores and the probability-weighted values of the records alone are
computed in float64 from the operands the kernel rounds to fp16 (the MMA's products are
exact and its fp32 sums are far finer than one fp16 rounding), and compared with the
exact float64 attention over the same records: relative error of the output.

    centered  codes c - 8 / c - 2, B = fp16(q s ks) and fp16(p vs), zero terms in fp32
    raw       codes c (attempt 50): the same B operands times uncentered codes
    qmma      raw + q rounded to fp16 once per program, B = fp16(q16 ks), sum q16 kz
    qmma_c    qmma with the centering restored exactly (attempt 53): minus 8 sum_d B by
              one more MMA, and sum_d q16 fp16(kz + 8 ks); values likewise with 2
"""
import argparse

import torch

from kvarn.format import KVarNConfig
from kvarn.quant.records import quantize_rotated_blocks, unpack_record_fields

F16 = lambda x: x.to(torch.float16).to(torch.float64)


def records(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    d = cfg.head_dim
    chan_scale = torch.rand(d, generator=g) * 2 + 0.2
    chan_bias = torch.randn(d, generator=g)
    k = (torch.randn(n, cfg.group_size, 1, d, generator=g) * chan_scale + chan_bias).half()
    v = torch.randn(n, cfg.group_size, 1, d, generator=g).half()
    return unpack_record_fields(quantize_rotated_blocks(k, v, cfg)[:, 0], cfg)


def attend(f, q, variant, scale):
    """q [H, D] fp16 -> o [H, D] float64 over all records of f (one softmax)."""
    ck, ks, kz, kt = f["k_codes"].double(), f["k_scale"].double(), f["k_zero"].double(), f["k_tok"].double()
    cv, vs, vz, vch = f["v_codes"].double(), f["v_scale"].double(), f["v_zero"].double(), f["v_chan"].double()
    qf = q.double() * scale                                            # [H, D]; the kernel's fp32 q
    if variant == "exact":
        s = torch.einsum("hd,ndt->hnt", qf, ck * ks[:, :, None] + kz[:, :, None]) * kt[None]
    else:
        q_use = F16(qf) if variant.startswith("qmma") else qf
        b = F16(q_use[:, None, :] * ks[None])                          # [H, N, D]: fp16 B
        if variant == "centered":
            s = torch.einsum("hnd,ndt->hnt", b, ck - 8) + torch.einsum("hd,nd->hn", qf, kz + 8 * ks)[..., None]
        elif variant in ("raw", "qmma"):
            s = torch.einsum("hnd,ndt->hnt", b, ck) + torch.einsum("hd,nd->hn", q_use, kz)[..., None]
        else:  # qmma_c
            kzc = F16(kz + 8 * ks)
            s = (torch.einsum("hnd,ndt->hnt", b, ck) - 8 * b.sum(-1)[..., None]
                 + torch.einsum("hd,nd->hn", q_use, kzc)[..., None])
        s = s * kt[None]
    h = s.shape[0]
    s = s.reshape(h, -1)
    p = torch.softmax(s, dim=-1).reshape(h, *ck.shape[::2])           # [H, N, G]
    if variant == "exact":
        return torch.einsum("hnt,ntd->hd", p, (cv * vs[:, :, None] + vz[:, :, None]) * vch[:, None, :])
    pv = F16(p * vs[None])                                             # fp16 B of the PV MMA
    if variant == "centered":
        o = torch.einsum("hnt,ntd->hnd", pv, cv - 2) + torch.einsum("hnt,nt->hn", p, vz + 2 * vs)[..., None]
    elif variant in ("raw", "qmma"):
        o = torch.einsum("hnt,ntd->hnd", pv, cv) + torch.einsum("hnt,nt->hn", p, vz)[..., None]
    else:
        o = (torch.einsum("hnt,ntd->hnd", pv, cv) - 2 * pv.sum(-1)[..., None]
             + torch.einsum("hnt,nt->hn", p, vz + 2 * vs)[..., None])
    return (o * vch[None]).sum(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--qh", type=int, default=1)
    ap.add_argument("--records", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", args.d)
    variants = ("centered", "raw", "qmma", "qmma_c")
    errs = {v: [] for v in variants}
    for seed in range(args.seeds):
        f = records(cfg, args.records, seed)
        q = torch.randn(args.qh, args.d, generator=torch.Generator().manual_seed(100 + seed)).half()
        ref = attend(f, q, "exact", args.d ** -0.5)
        for v in variants:
            errs[v].append(((attend(f, q, v, args.d ** -0.5) - ref).norm() / ref.norm()).item())
    print(f"D {args.d}, {args.qh} query heads, {args.records} records, {args.seeds} seeds: relative error of o")
    for v in variants:
        e = torch.tensor(errs[v])
        ratio = (e / torch.tensor(errs["centered"])).mean()
        print(f"  {v:9s} mean {e.mean():.2e}  max {e.max():.2e}  (x{ratio:.2f} centered)")


if __name__ == "__main__":
    main()
