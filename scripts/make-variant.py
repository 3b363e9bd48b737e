#!/usr/bin/env python3
"""Make a third species variant for a field condition the compressor was never tuned on: rain.

Writes models/species/unseen/:

    rain.onnx           species-base.onnx fine-tuned on rain images (every weight trained; same
                        graph, initializer names, shapes and order as the base)
    eval.npz            x_rain uint8 [600,32,32], y_rain int64 [600]: the 600 test silhouettes of
                        models/species/eval.npz (x_clean / y_clean) under rain, same labels
    calib/rain/*.png    200 unlabelled calibration images (20 per species) made from Animal-MNIST
                        *training* silhouettes, none of which is a test silhouette

Rain (x: clean grey image in 0..255, the result rounded and clipped to 0..255):

    rain = a * x + b + streaks + sigma * n

a = 0.55, b = 60 (overcast, washed-out contrast); streaks: Poisson(25) thin bright lines per image,
5..12 px long, +40..90 grey levels, all falling at one angle per image (N(15, 5) degrees from
vertical, wind), drawn with a max so overlapping streaks do not add up; n: standard normal
sensor noise, sigma = 8.

Fine-tuning: there is no PyTorch here, so the ONNX graph (Conv incl. depthwise via group, Clip as
ReLU6, Add, Pad whose pads come from Slice/Concat/Reshape arithmetic on constants, ReduceMean, Gemm;
BatchNorm already folded) is rebuilt as a Keras model whose weights are the ONNX initializers. The
constant sub-graphs (the pads) are evaluated once with numpy: the input is a fixed 1x3x32x32 image,
so every pad is static. Before training, the Keras logits must match onnxruntime's on the 600 rain
test images within 1e-4. Training: Adam, every weight, fresh rain on every epoch, on all training
silhouettes. The tuned weights are written into a copy of the base (raw data of each initializer
replaced, nothing else touched) and checked with onnxruntime against the Keras model.

Preprocessing as models/species/model-card.json: x/255, minus 0.45, divided by 0.225, grey
replicated to 3 channels.

Deterministic: numpy and TensorFlow seeds, TensorFlow op determinism, 2 threads.

Usage: python3 scripts/make-variant.py [--epochs 4] [--lr 3e-4] [--seed 11] [--out DIR]
Needs numpy, onnx, onnxruntime, tensorflow (2.x, Keras 3), pillow and animal-mnist==0.4.
"""
import argparse
import gzip
import hashlib
import json
import os
import pickle
import re
import time

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SPECIES = os.path.join(ROOT, "models", "species")
OUT = os.path.join(SPECIES, "unseen")
COND = "rain"

RAIN = dict(a=0.55, b=60.0, streaks=25, length=(5.0, 12.0), amp=(40.0, 90.0), angle=(15.0, 5.0),
            sigma=8.0)


# ---------------------------------------------------------------------------------------------
# The condition


def rain(x, rng, p=RAIN):
    """Rain on clean grey images x [n,32,32] in 0..255 (float); uint8 out."""
    n, h, w = x.shape
    t = np.linspace(0.0, 1.0, 24)
    streaks = np.zeros((n, h, w))
    for i in range(n):
        th = np.deg2rad(rng.normal(*p["angle"]))
        k = rng.poisson(p["streaks"])
        r0 = rng.uniform(-6, h, k)
        c0 = rng.uniform(-6, w + 6, k)
        length = rng.uniform(*p["length"], k)
        amp = rng.uniform(*p["amp"], k)
        rr = np.round(r0[:, None] + t[None] * length[:, None] * np.cos(th)).astype(int)
        cc = np.round(c0[:, None] - t[None] * length[:, None] * np.sin(th)).astype(int)
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        vals = np.broadcast_to(amp[:, None], rr.shape)
        np.maximum.at(streaks[i], (rr[inside], cc[inside]), vals[inside])
    y = p["a"] * x + p["b"] + streaks + p["sigma"] * rng.standard_normal(x.shape)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Data


def load_data():
    import animal_mnist

    data_dir = os.path.join(os.path.dirname(animal_mnist.__file__), "data", "Animal_MNIST")
    with gzip.open(os.path.join(data_dir, "animal_data_version_3.gz"), "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(os.path.join(data_dir, "animal_label_version_3.gz"), "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(np.int64)
    ev = np.load(os.path.join(SPECIES, "eval.npz"))
    x_test, y_test = ev["x_clean"], ev["y_clean"]
    # Every silhouette of the evaluation set is excluded (they are zero-padded 28x28 images).
    test = {x_test[i, 2:30, 2:30].tobytes() for i in range(len(x_test))}
    train = np.array([i for i in range(len(images)) if images[i].tobytes() not in test])
    assert len(images) - len(train) >= len(test), "every eval silhouette must be found"
    x_train = np.zeros((len(train), 32, 32), np.uint8)
    x_train[:, 2:30, 2:30] = images[train]
    return train, x_train, labels[train], x_test, y_test


def preprocess(x):
    """uint8 grey [n,32,32] -> float32 NCHW [n,3,32,32] as the model card says."""
    with open(os.path.join(SPECIES, "model-card.json")) as f:
        card = json.load(f)["input"]
    z = (x.astype(np.float32) * np.float32(card["scale"]) - np.float32(card["mean"][0])) / np.float32(
        card["std"][0]
    )
    return np.repeat(z[:, None], 3, axis=1)


# ---------------------------------------------------------------------------------------------
# ONNX graph -> Keras


def fold_constants(graph, initializers):
    """Evaluates the constant-only nodes (the pad arithmetic) with numpy: name -> array."""
    from onnx import helper, numpy_helper

    known = {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            known[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        if not node.input or not all(i in known for i in node.input if i):
            continue
        ins = [known[i] for i in node.input]
        op = node.op_type
        if op == "ConstantOfShape":
            value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
            out = np.full(tuple(ins[0]), value[0], dtype=value.dtype)
        elif op == "Concat":
            out = np.concatenate(ins, axis=attrs["axis"])
        elif op == "Reshape":
            out = ins[0].reshape(tuple(int(d) for d in ins[1]))
        elif op == "Transpose":
            out = np.transpose(ins[0], attrs.get("perm"))
        elif op == "Cast":
            out = ins[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif op == "Slice":
            data, starts, ends = ins[0], ins[1], ins[2]
            axes = ins[3] if len(ins) > 3 else np.arange(len(starts))
            steps = ins[4] if len(ins) > 4 else np.ones(len(starts), np.int64)
            index = [slice(None)] * data.ndim
            for s, e, a, st in zip(starts, ends, axes, steps):
                index[int(a)] = slice(int(s), int(e), int(st))
            out = data[tuple(index)]
        else:
            raise ValueError(f"constant {op} node {node.name} not supported")
        known[node.output[0]] = out
    assert not set(known) & set(initializers)
    return known


def build_keras(onnx_model):
    """A Keras model computing the ONNX graph on NHWC input, weights = the initializers."""
    import keras
    import tensorflow as tf
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = fold_constants(graph, inits)

    # Layout of each weight in TensorFlow: conv [O,I,kh,kw] -> [kh,kw,I,O], depthwise
    # [C,1,kh,kw] -> [kh,kw,C,1]; Gemm B stays [out,in] (transB=1).
    layout = {}
    steps = []
    for node in graph.node:
        if node.output[0] in consts:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "Conv":
            w = inits[node.input[1]]
            group = attrs.get("group", 1)
            assert list(attrs.get("dilations", [1, 1])) == [1, 1]
            assert not any(attrs.get("pads", [0, 0, 0, 0])), "explicit Pad nodes only"
            if group == 1:
                layout[node.input[1]] = "conv"
            elif w.shape[1] == 1 and group == w.shape[0]:
                layout[node.input[1]] = "depthwise"
            else:
                raise ValueError(f"grouped conv {node.name} not supported")
            attrs["kind"] = layout[node.input[1]]
        elif op == "Pad":
            assert attrs.get("mode", b"constant") == b"constant"
            pads = [int(v) for v in consts[node.input[1]]]
            assert float(consts[node.input[2]]) == 0.0 and len(pads) == 8
            # NCHW begins/ends -> NHWC pairs.
            attrs["paddings"] = [[pads[0], pads[4]], [pads[2], pads[6]], [pads[3], pads[7]],
                                 [pads[1], pads[5]]]
            assert attrs["paddings"][0] == [0, 0] and attrs["paddings"][3] == [0, 0]
        elif op == "Clip":
            attrs["lo"], attrs["hi"] = float(consts[node.input[1]]), float(consts[node.input[2]])
        elif op == "ReduceMean":
            assert list(attrs["axes"]) == [2, 3] and attrs.get("keepdims", 1) == 0
        elif op == "Gemm":
            assert attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0
            assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
            layout[node.input[1]] = "gemm"
        elif op != "Add":
            raise ValueError(f"{op} node {node.name} not supported")
        steps.append((op, list(node.input), node.output[0], attrs))

    def to_tf(name, a):
        kind = layout.get(name)
        if kind == "conv":
            return a.transpose(2, 3, 1, 0)
        if kind == "depthwise":
            return a.transpose(2, 3, 0, 1)
        return a

    def from_tf(name, a):
        kind = layout.get(name)
        if kind == "conv":
            return a.transpose(3, 2, 0, 1)
        if kind == "depthwise":
            return a.transpose(2, 3, 0, 1)
        return a

    input_name = graph.input[0].name
    output_name = graph.output[0].name

    class OnnxNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.order = [t.name for t in graph.initializer]
            self.w = {}
            for name in self.order:
                value = to_tf(name, inits[name]).astype(np.float32)
                self.w[name] = self.add_weight(
                    shape=value.shape,
                    initializer=keras.initializers.Constant(value),
                    trainable=True,
                    name=re.sub(r"[^A-Za-z0-9_]", "_", name),
                )

        def call(self, x):
            env = {input_name: x}
            for op, ins, out, a in steps:
                if op == "Conv":
                    w = self.w[ins[1]]
                    s = [1, a["strides"][0], a["strides"][1], 1]
                    if a["kind"] == "conv":
                        y = tf.nn.conv2d(env[ins[0]], w, s, "VALID")
                    else:
                        y = tf.nn.depthwise_conv2d(env[ins[0]], w, s, "VALID")
                    env[out] = y + self.w[ins[2]] if len(ins) > 2 else y
                elif op == "Pad":
                    env[out] = tf.pad(env[ins[0]], a["paddings"])
                elif op == "Clip":
                    if (a["lo"], a["hi"]) == (0.0, 6.0):
                        env[out] = tf.nn.relu6(env[ins[0]])
                    else:
                        env[out] = tf.clip_by_value(env[ins[0]], a["lo"], a["hi"])
                elif op == "Add":
                    env[out] = env[ins[0]] + env[ins[1]]
                elif op == "ReduceMean":
                    env[out] = tf.reduce_mean(env[ins[0]], axis=[1, 2])
                elif op == "Gemm":
                    env[out] = tf.matmul(env[ins[0]], self.w[ins[1]], transpose_b=True) + self.w[ins[2]]
            return env[output_name]

        def onnx_weights(self):
            """name -> float32 array in the ONNX layout, in initializer order."""
            return {n: from_tf(n, np.asarray(self.w[n].numpy())) for n in self.order}

    return OnnxNet()


def nhwc(x_nchw):
    return np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------


def ort_logits(path, x_nchw):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x_nchw})[0]


def accuracy(path, x, y):
    return float((ort_logits(path, preprocess(x)).argmax(1) == y).mean())


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=20, help="calibration images per species")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=OUT, help="output folder (default models/species/unseen)")
    args = ap.parse_args()
    out = args.out

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    import keras
    import onnx
    import tensorflow as tf
    from onnx import numpy_helper
    from PIL import Image

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    with open(os.path.join(SPECIES, "model-card.json")) as f:
        names = json.load(f)["labels"]
    train_idx, x_train, y_train, x_test, y_test = load_data()
    print(f"{len(x_train)} training silhouettes (test silhouettes excluded), {len(x_test)} test")

    # Test images: the eval set's clean silhouettes under rain, one fixed draw.
    x_rain = rain(x_test.astype(np.float64), np.random.default_rng([args.seed, 1]))

    base_path = os.path.join(SPECIES, "species-base.onnx")
    base = onnx.load(base_path)
    model = build_keras(base)
    x_check = preprocess(x_rain)
    ref = ort_logits(base_path, x_check)
    got = model(nhwc(x_check)).numpy()
    diff = float(np.abs(got - ref).max())
    print(f"keras vs onnxruntime, base logits on {len(x_check)} rain images: max |diff| {diff:.2e}")
    assert diff < 1e-4, "the Keras rebuild must reproduce the ONNX model"
    got = model(nhwc(preprocess(x_test))).numpy()
    diff_clean = float(np.abs(got - ort_logits(base_path, preprocess(x_test))).max())
    print(f"keras vs onnxruntime, base logits on the clean images: max |diff| {diff_clean:.2e}")
    assert diff_clean < 1e-4

    # Fine-tune every weight on rain: fresh rain on every epoch.
    opt = keras.optimizers.Adam(learning_rate=args.lr)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = model.trainable_variables
    assert len(weights) == len(base.graph.initializer)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return loss

    rng = np.random.default_rng([args.seed, 2])
    started = time.time()
    for epoch in range(args.epochs):
        xe = nhwc(preprocess(rain(x_train.astype(np.float64), rng)))
        order = rng.permutation(len(xe))
        losses = []
        for s in range(0, len(order), args.batch):
            b = order[s : s + args.batch]
            losses.append(float(step(tf.constant(xe[b]), tf.constant(y_train[b]))))
        test_acc = float((model(nhwc(x_check)).numpy().argmax(1) == y_test).mean())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, rain test accuracy "
              f"{test_acc:.3f} ({time.time() - started:.0f} s)")

    # Write the tuned weights into a copy of the base: same initializers, same order.
    os.makedirs(out, exist_ok=True)
    tuned = model.onnx_weights()
    fine = onnx.load(base_path)
    for t in fine.graph.initializer:
        old = numpy_helper.to_array(t)
        new = tuned[t.name].astype("<f4")
        assert new.shape == old.shape and t.data_type == onnx.TensorProto.FLOAT
        assert not t.float_data, "weights are stored as raw data"
        t.raw_data = new.tobytes()
    onnx.checker.check_model(fine)
    fine_path = os.path.join(out, f"{COND}.onnx")
    onnx.save(fine, fine_path)

    # Checks on the written file: structure identical to the base, every weight changed, and
    # onnxruntime reproduces the trained Keras model.
    written = onnx.load(fine_path)
    b_inits = [(t.name, list(t.dims), t.data_type) for t in base.graph.initializer]
    f_inits = [(t.name, list(t.dims), t.data_type) for t in written.graph.initializer]
    assert b_inits == f_inits
    for t in written.graph.initializer:
        t.ClearField("raw_data")
    skeleton = onnx.load(base_path)
    for t in skeleton.graph.initializer:
        t.ClearField("raw_data")
    assert skeleton.SerializeToString() == written.SerializeToString(), "only weights differ"
    b_w = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    f_w = {t.name: numpy_helper.to_array(t) for t in onnx.load(fine_path).graph.initializer}
    unchanged = [n for n in b_w if np.array_equal(b_w[n], f_w[n])]
    assert not unchanged, f"unchanged tensors: {unchanged}"
    rel = np.sqrt(sum(((f_w[n] - b_w[n]) ** 2).sum() for n in b_w) / sum((b_w[n] ** 2).sum() for n in b_w))
    print(f"{len(f_w)} initializers, all changed; ||fine - base|| / ||base|| = {rel:.3f}")
    diff = float(np.abs(ort_logits(fine_path, x_check) - model(nhwc(x_check)).numpy()).max())
    print(f"onnxruntime on {COND}.onnx vs keras: max |diff| {diff:.2e}")
    assert diff < 1e-4

    # Evaluation set, same layout as models/species/eval.npz.
    eval_path = os.path.join(out, "eval.npz")
    np.savez_compressed(eval_path, **{f"x_{COND}": x_rain, f"y_{COND}": y_test.astype(np.int64)})

    # Calibration images: training silhouettes (never test ones), no labels used by bitdelta.
    crng = np.random.default_rng([args.seed, 3])
    chosen = []
    for c in range(len(names)):
        pool = np.flatnonzero(y_train == c)
        chosen += sorted(crng.choice(pool, args.per_class, replace=False).tolist())
    calib = rain(x_train[chosen].astype(np.float64), crng)
    test_set = {x_test[i].tobytes() for i in range(len(x_test))}
    assert not any(x_train[j].tobytes() in test_set for j in chosen)
    calib_dir = os.path.join(out, "calib", COND)
    os.makedirs(calib_dir, exist_ok=True)
    for old in os.listdir(calib_dir):
        if old.endswith(".png"):
            os.remove(os.path.join(calib_dir, old))
    for k, j in enumerate(chosen):
        name = f"{COND}-train-{train_idx[j]:04d}-{names[y_train[j]]}.png"
        Image.fromarray(calib[k], mode="L").save(os.path.join(calib_dir, name), optimize=True)
    print(f"{len(chosen)} calibration images in {calib_dir}")

    # Accuracies with onnxruntime.
    ev = np.load(os.path.join(SPECIES, "eval.npz"))
    sets = {"clean": (ev["x_clean"], ev["y_clean"]), "night": (ev["x_night"], ev["y_night"]),
            "fog": (ev["x_fog"], ev["y_fog"]), COND: (x_rain, y_test)}
    models = {"species-base": base_path, "night": os.path.join(SPECIES, "night.onnx"),
              "fog": os.path.join(SPECIES, "fog.onnx"), COND: fine_path}
    print("accuracy (onnxruntime, 600 test images each)")
    print("model          " + "".join(f"{s:>8}" for s in sets))
    for m, path in models.items():
        print(f"{m:<15}" + "".join(f"{accuracy(path, *sets[s]):8.3f}" for s in sets))
    calib_y = y_train[chosen]
    print(f"calib/{COND} (file-name labels): base {accuracy(base_path, calib, calib_y):.3f}, "
          f"{COND} {accuracy(fine_path, calib, calib_y):.3f}")
    for path in [fine_path, eval_path]:
        print(f"{sha256(path)}  {os.path.basename(path)}")


if __name__ == "__main__":
    main()
