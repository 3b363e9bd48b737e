#!/usr/bin/env python3
"""Class scores of onnxruntime for images, the reference for `bitdelta run` and `serve`.

Usage: ort_scores.py MODEL.onnx CARD.json IMAGE... ; prints one JSON list of scores per image:
the softmax of the output for `output.kind` "logits", the output itself for "probabilities"
(computed in float64 from the model's output). Preprocessing: `ort_eval.preprocess`.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

from ort_eval import preprocess

model, card_path, images = sys.argv[1], sys.argv[2], sys.argv[3:]
card = json.load(open(card_path))
kind = card.get("output", {}).get("kind", "logits")
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = card["input"].get("name") or sess.get_inputs()[0].name
for path in images:
    out = sess.run(None, {name: preprocess(path, card)})[0][0].astype(np.float64)
    if kind == "logits":
        e = np.exp(out - out.max())
        out = e / e.sum()
    print(json.dumps(out.tolist()))
