#!/usr/bin/env python3
"""Softmax outputs of onnxruntime for images, the cross-check of `bitdelta serve`.

Usage: ort_probs.py MODEL.onnx IMAGE... ; prints one JSON list of probabilities per image.
Preprocessing follows models/species/model-card.json: grey x/255, minus 0.45, over 0.225,
replicated to 3 channels, NCHW.
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

model, images = sys.argv[1], sys.argv[2:]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
for path in images:
    g = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    x = (g * np.float32(1.0 / 255.0) - np.float32(0.45)) / np.float32(0.225)
    x = np.repeat(x[None, None], 3, axis=1).astype(np.float32)
    logits = sess.run(None, {name: x})[0][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    print(json.dumps((e / e.sum()).tolist()))
