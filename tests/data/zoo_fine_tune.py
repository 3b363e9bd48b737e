#!/usr/bin/env python3
"""A seeded synthetic fine-tune of a model: every float initializer with more than one element
moves by 0.05 * mean(|w|) * N(0, 1) (f16 tensors stay f16; scalar constants such as a Pow
exponent or a clip bound stay as they are, as a real fine-tune leaves them).

Usage: zoo_fine_tune.py BASE.onnx OUT.onnx SEED
"""
import sys

import numpy as np
import onnx
from onnx import numpy_helper

base, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = onnx.load(base)
rng = np.random.default_rng(seed)
for init in m.graph.initializer:
    if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        continue
    w = numpy_helper.to_array(init)
    if w.size <= 1:
        continue
    w64 = w.astype(np.float64)
    moved = w64 + 0.05 * np.abs(w64).mean() * rng.standard_normal(w.shape)
    init.CopyFrom(numpy_helper.from_array(moved.astype(w.dtype), init.name))
onnx.save(m, out)
