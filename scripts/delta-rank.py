#!/usr/bin/env python3
"""How well a low-rank delta (Delta-CoMe style) could stand in for sign codecs on a family.

For every weight tensor of at least MIN_ELEMENTS elements, the delta d = W_fine - W_base (rows =
output channels) is compared with what two encodings of the same size keep of it, as the
relative error ||d - d_hat|| / ||d||:

- signs with one scale per row (`sign-groups`, 1 bit per element, the scale being mean |d_row|);
- the best rank-r approximation (truncated SVD, factors kept exactly) with r chosen so that its
  two factors in 8 bits per value take at most the same bits: r = floor(B m n / (8 (m + n))) for
  B = 1 and 2 bits per element. Exact factors make this a lower bound on any quantised low-rank
  codec of that size.

Usage: scripts/delta-rank.py BASE.onnx FINE.onnx [MIN_ELEMENTS]   (numpy and onnx)
"""
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def weights(path):
    m = onnx.load(path)
    return {i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    base, fine = weights(sys.argv[1]), weights(sys.argv[2])
    min_elements = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    rows = []
    for name, b in base.items():
        f = fine.get(name)
        if f is None or f.shape != b.shape or b.ndim < 2 or b.size < min_elements:
            continue
        d = (f - b).reshape(b.shape[0], -1)
        norm = np.linalg.norm(d)
        if norm == 0:
            continue
        m, n = d.shape
        scale = np.abs(d).mean(axis=1, keepdims=True)
        sign = np.where(d >= 0, 1.0, -1.0)
        e_sign = np.linalg.norm(d - scale * sign) / norm
        s = np.linalg.svd(d, compute_uv=False)
        tail = np.cumsum((s**2)[::-1])[::-1]  # tail[r] = sum of s_i^2 for i >= r

        def low_rank(bits):
            r = int(bits * m * n // (8 * (m + n)))
            return (np.sqrt(tail[r]) / norm if r < len(s) else 0.0), r

        (e1, r1), (e2, r2) = low_rank(1), low_rank(2)
        rows.append((name, m, n, np.linalg.norm(d) / np.linalg.norm(f), e_sign, e1, r1, e2, r2))
    print("| tensor | rows x cols | ‖d‖/‖W‖ | signs per row (1 bit) | rank r, 1 bit | rank r, 2 bits |")
    print("|---|---|---:|---:|---:|---:|")
    for name, m, n, rel, es, e1, r1, e2, r2 in rows:
        print(f"| {name} | {m} x {n} | {rel:.3f} | {es:.3f} | {e1:.3f} (r={r1}) | {e2:.3f} (r={r2}) |")
    if rows:
        col = lambda k: np.median([r[k] for r in rows])
        print(f"\n{len(rows)} tensors; medians: signs {col(4):.3f}, rank at 1 bit {col(5):.3f}, "
              f"rank at 2 bits {col(7):.3f} (relative error, lower is better)")


if __name__ == "__main__":
    main()
