"""Top stall sites of an ncu source page (``ncu -i REP --page source --print-source sass
--csv``): the SASS lines with the most warp-stall samples, and each one's largest stall
reasons, so that a profile's per-instruction view fits in a notes file.

    python benchmarks/ncu_summary.py ncu_b1_sass.csv [--top 30]
"""
import argparse
import csv


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    rows = list(csv.reader(open(args.csv, errors="replace")))
    head_i = next(i for i, r in enumerate(rows) if any("Source" == c.strip() or "Source" in c for c in r)
                  and any("Sampl" in c for c in r))
    head = rows[head_i]
    body = [r for r in rows[head_i + 1:] if len(r) == len(head)]
    src = next(i for i, c in enumerate(head) if "Source" in c)
    total = next(i for i, c in enumerate(head) if "Sampling (All" in c or "Warp Stall Sampling" in c)
    reasons = [i for i, c in enumerate(head) if c.startswith("stall_") or "stall" in c.lower() and i != total]
    all_samples = sum(_num(r[total]) for r in body) or 1.0
    print(f"{len(body)} SASS lines, {all_samples:.0f} stall samples ('{head[total]}')")
    sums = {head[i]: sum(_num(r[i]) for r in body) for i in reasons}
    print("by reason: " + ", ".join(f"{k} {v / all_samples:.1%}" for k, v in
                                     sorted(sums.items(), key=lambda kv: -kv[1])[:10] if v))
    for r in sorted(body, key=lambda r: -_num(r[total]))[:args.top]:
        top = sorted(((head[i], _num(r[i])) for i in reasons), key=lambda kv: -kv[1])[:3]
        print(f"{_num(r[total]) / all_samples:6.1%}  {r[src].strip()[:70]:70s}  "
              + ", ".join(f"{k} {v:.0f}" for k, v in top if v))


if __name__ == "__main__":
    main()
