"""Bar chart of a raw_codes.py result: each variant's speed-up over SDPA fp16 per shape.

    python benchmarks/plot_raw_codes.py benchmarks/results/raw_codes_h100_s15.json
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = ("centered", "raw", "kall", "raw_kall", "raw_qmma", "raw_qmma_kall", "raw_qmma_cap0")


def main():
    path = Path(sys.argv[1])
    res = json.load(open(path))
    rows = res["rows"]
    names = [n for n in NAMES if n in rows[0]]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * w for j in range(len(rows))], [r["sdpa"] / r[n] for r in rows], w, label=n)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(rows))], [r["shape"] for r in rows])
    ax.axhline(2.5, color="gray", ls="--", lw=1)
    ax.set_ylabel("speed-up over SDPA fp16 (graph replay)")
    ax.set_title(f"Gluon record loop variants, {res['device']['name']}, {res['git_commit'][:7]}")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
