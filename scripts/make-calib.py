#!/usr/bin/env python3
"""Generate the species calibration images: models/species/calib/{night,fog}/*.png.

Calibration images are unlabelled images from a variant's own domain that `bitdelta compress
--calib DIR` uses to choose codecs. They must be disjoint from the evaluation set
(models/species/eval.npz), so they are made from Animal-MNIST *training* silhouettes (PyPI
package `animal-mnist` 0.4, MIT, see models/species/LICENSE.animal-mnist) that are not among the
600 test silhouettes, with the night and fog transforms fitted here on the paired eval images
(x_clean[i] -> x_night[i], x_clean[i] -> x_fog[i]).

Transforms (x: clean grey image in 0..255, r2: squared distance to the image centre, 1 at the
corners, n: standard normal noise per pixel; the result is rounded and clipped to 0..255):

    night = (1 - k * r2) * (a * 255 * (x / 255) ** gamma + b) + sigma * n   (dark, IR gain curve,
                                                                             vignette, sensor noise)
    fog   = a * blur(x, s) + b + sigma * n                                   (haze, blur, noise)

blur is a separable Gaussian (7 taps, standard deviation s). The parameters are fitted by
least squares (fog: linear in a, b for each blur s on a grid) or by matching the mean and
standard deviation of the real images per (radius, brightness) cell (night: grid search,
because clipping at 0 biases a linear fit). The script prints the fitted values.

File names carry the training index and the species (`night-train-0123-zebra.png`) so that a
human can check the images; `bitdelta compress` never reads them.

Usage: python3 scripts/make-calib.py [--per-class 20] [--seed 7]
Needs numpy, pillow and animal-mnist==0.4.
"""
import argparse
import gzip
import json
import os
import pickle

import numpy as np
from PIL import Image

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SPECIES = os.path.join(ROOT, "models", "species")

yy, xx = np.mgrid[:32, :32]
R2 = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / (2 * 15.5**2)


def blur(x, s):
    if s <= 0:
        return x
    k = np.arange(-3, 4)
    w = np.exp(-(k**2) / (2 * s * s))
    w /= w.sum()
    p = np.pad(x, ((0, 0), (0, 0), (3, 3)), mode="edge")
    x = sum(w[i] * p[:, :, i : i + 32] for i in range(7))
    p = np.pad(x, ((0, 0), (3, 3), (0, 0)), mode="edge")
    return sum(w[i] * p[:, i : i + 32, :] for i in range(7))


def night(x, p, noise):
    v = 1 - p["k"] * R2
    y = v * (p["a"] * 255 * (x / 255) ** p["gamma"] + p["b"]) + p["sigma"] * noise
    return np.clip(np.round(y), 0, 255)


def fog(x, p, noise):
    y = p["a"] * blur(x, p["s"]) + p["b"] + p["sigma"] * noise
    return np.clip(np.round(y), 0, 255)


def cell_stats(z, cells):
    return np.array(
        [[z[cells == c].mean(), z[cells == c].std()] if (cells == c).sum() > 500 else [0, 0]
         for c in range(24)]
    )


def fit_night(xc, y):
    rb = np.minimum((np.sqrt(R2 * 2) * 15.5 / 4).astype(int), 5)
    cells = np.broadcast_to(rb, y.shape) * 4 + np.minimum((xc / 64).astype(int), 3)
    target = cell_stats(y, cells)
    noise = np.random.default_rng(0).standard_normal(xc.shape)
    best = None
    for k in [0.4, 0.5, 0.6, 0.7]:
        for gamma in [1.0, 1.2, 1.4, 1.6, 1.8]:
            for a in [0.28, 0.31, 0.34]:
                for b in [10, 14, 18]:
                    for sigma in [15, 18, 21]:
                        p = dict(k=k, gamma=gamma, a=a, b=b, sigma=sigma)
                        err = ((cell_stats(night(xc, p, noise), cells) - target) ** 2).sum()
                        if best is None or err < best[0]:
                            best = (err, p)
    return best[1]


def fit_fog(xc, y):
    m = (y > 3) & (y < 252)
    best = None
    for s in [0.0, 0.5, 0.75, 1.0, 1.25, 1.5]:
        bx = blur(xc, s)
        a_mat = np.stack([bx[m], np.ones(m.sum())], 1)
        (a, b), *_ = np.linalg.lstsq(a_mat, y[m], rcond=None)
        res = y[m] - a_mat @ np.array([a, b])
        if best is None or (res**2).mean() < best[0]:
            best = ((res**2).mean(), dict(s=s, a=round(float(a), 4), b=round(float(b), 2),
                                          sigma=round(float(res.std()), 2)))
    return best[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    import animal_mnist

    data_dir = os.path.join(os.path.dirname(animal_mnist.__file__), "data", "Animal_MNIST")
    with gzip.open(os.path.join(data_dir, "animal_data_version_3.gz"), "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(os.path.join(data_dir, "animal_label_version_3.gz"), "rb") as f:
        labels = np.asarray(pickle.load(f))
    with open(os.path.join(SPECIES, "model-card.json")) as f:
        names = json.load(f)["labels"]

    ev = np.load(os.path.join(SPECIES, "eval.npz"))
    xc = ev["x_clean"].astype(np.float64)
    # Exclude every silhouette of the evaluation set (they are zero-padded 28x28 images).
    test = {ev["x_clean"][i, 2:30, 2:30].tobytes() for i in range(len(xc))}
    train = [i for i in range(len(images)) if images[i].tobytes() not in test]
    assert len(images) - len(train) >= len(test), "every eval silhouette must be found"

    params = {"night": fit_night(xc, ev["x_night"].astype(np.float64)),
              "fog": fit_fog(xc, ev["x_fog"].astype(np.float64))}
    for cond, p in params.items():
        print(f"{cond}: {p}")

    rng = np.random.default_rng(args.seed)
    chosen = []
    for c in range(len(names)):
        pool = [i for i in train if labels[i] == c]
        chosen += sorted(rng.choice(pool, args.per_class, replace=False).tolist())
    clean = np.zeros((len(chosen), 32, 32))
    clean[:, 2:30, 2:30] = images[chosen]
    for cond, fn in [("night", night), ("fog", fog)]:
        out_dir = os.path.join(SPECIES, "calib", cond)
        os.makedirs(out_dir, exist_ok=True)
        for old in os.listdir(out_dir):
            if old.endswith(".png"):
                os.remove(os.path.join(out_dir, old))
        y = fn(clean, params[cond], rng.standard_normal(clean.shape)).astype(np.uint8)
        for j, i in enumerate(chosen):
            name = f"{cond}-train-{i:04d}-{names[labels[i]]}.png"
            Image.fromarray(y[j], mode="L").save(os.path.join(out_dir, name), optimize=True)
        print(f"{cond}: {len(chosen)} images in {os.path.relpath(out_dir, ROOT)}")


if __name__ == "__main__":
    main()
