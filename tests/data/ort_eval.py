#!/usr/bin/env python3
"""Accuracy of onnxruntime on a labelled image folder, the reference for `bitdelta eval`.

Usage: ort_eval.py MODEL.onnx CARD.json DIR ; DIR holds <label>/<image>.{png,jpg,jpeg}.
Prints one JSON object: {"images": N, "correct": K, "predictions": [index, ...]} (files in name order).

Preprocessing is written here from the model card's keys alone (PIL decode with the EXIF
orientation applied, RGB/BGR/grey, resize, x*scale, minus mean, over std, NCHW/NHWC, f32/f16),
independently of bitdelta's code. Frames of the input's size are not resampled.
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def preprocess(path, card):
    i = card["input"]
    layout = i.get("layout", "NCHW").upper()
    shape = i["shape"]
    c, h, w = (shape[0], shape[1], shape[2]) if layout == "NCHW" else (shape[2], shape[0], shape[1])
    colour = i.get("colour", "grey")
    img = ImageOps.exif_transpose(Image.open(path))
    img = img.convert("L" if colour in ("grey", "gray") else "RGB")
    resize = i.get("resize", "stretch")
    if resize == "crop":
        r = i.get("resize_to", min(h, w))
        sw, sh = img.size
        k = r / min(sw, sh)
        rw, rh = round(sw * k), round(sh * k)
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), Image.BILINEAR)
        left, top = round((rw - w) / 2), round((rh - h) / 2)
        img = img.crop((left, top, left + w, top + h))
    elif img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], c, axis=2)
    if colour == "BGR":
        a = a[:, :, ::-1]
    scale = np.float32(i.get("scale", 1.0 / 255.0))
    mean = np.asarray(i.get("mean", [0.0]), dtype=np.float32)
    std = np.asarray(i.get("std", [1.0]), dtype=np.float32)
    if len(mean) == 1:
        mean = np.repeat(mean, c)
    if len(std) == 1:
        std = np.repeat(std, c)
    x = (a * scale - mean[:c]) / std[:c]
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = x[None].astype(np.float16 if i.get("dtype", "f32") == "f16" else np.float32)
    return x


def main():
    model, card_path, folder = sys.argv[1:4]
    card = json.load(open(card_path))
    labels = card["labels"]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds, correct, n = [], 0, 0
    for label in sorted(os.listdir(folder)):
        d = os.path.join(folder, label)
        if label.startswith(".") or not os.path.isdir(d):
            continue
        truth = labels.index(label)
        for f in sorted(os.listdir(d)):
            if f.startswith(".") or not f.lower().endswith((".png", ".jpg", ".jpeg")):
                continue
            out = sess.run(None, {name: preprocess(os.path.join(d, f), card)})[0][0]
            p = int(np.argmax(out.astype(np.float64)))
            preds.append(p)
            correct += int(p == truth)
            n += 1
    print(json.dumps({"images": n, "correct": correct, "predictions": preds}))


if __name__ == "__main__":
    main()
