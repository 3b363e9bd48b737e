#!/usr/bin/env python3
"""Multiply-adds of one image through an ONNX model's convolutions and fully connected layers,
and per weight: what one image costs a model evaluation, relative to its size.

Runs the model once in onnxruntime on a zero image (batch 1) to read every convolution's output
size; a convolution costs out_h * out_w * (weights of its kernel), a Gemm/MatMul its weights.

Usage: scripts/model-macs.py MODEL.onnx [...]   (numpy, onnx, onnxruntime)
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort


def macs(path):
    m = onnx.load(path)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    del m.graph.output[:]
    for n in convs:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    outs = s.run(None, {i.name: np.zeros(shape, np.float32)}) if convs else []
    total = sum(o.shape[2] * o.shape[3] * int(np.prod(inits[n.input[1]])) for n, o in zip(convs, outs))
    total += sum(int(np.prod(inits[n.input[1]])) for n in m.graph.node
                 if n.op_type in ("Gemm", "MatMul") and n.input[1] in inits)
    params = sum(int(np.prod(d)) for d in inits.values())
    return shape, total, params


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        shape, total, params = macs(path)
        print(f"{path}: input {shape}, {total / 1e6:.1f} M multiply-adds per image, "
              f"{params} parameters, {total / params:.1f} per weight")
