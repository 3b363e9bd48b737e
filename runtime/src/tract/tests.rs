//! The engine's switches against tract running the applied ONNX of each variant.

use super::*;
use crate::apply::{apply_onnx, base_view};
use crate::compose;
use crate::compress::{compress_onnx, Options, Policy};

fn model(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/../models/species/{name}.onnx",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn delta(base: &[u8], fine: &[u8], policy: Policy) -> Vec<u8> {
    let (bw, fw) = (
        OnnxWeights::scan(base).unwrap(),
        OnnxWeights::scan(fine).unwrap(),
    );
    let opts = Options {
        name: "variant",
        description: "",
        labels: "",
        sequence: 1,
        policy,
    };
    compress_onnx(base, &bw, fine, &fw, &opts, |_, _| {}).unwrap()
}

/// Three deterministic inputs in [0, 1).
fn inputs() -> Vec<Vec<f32>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..3)
        .map(|_| {
            (0..3 * 32 * 32)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect()
        })
        .collect()
}

/// A variant's deltas with their alphas.
type Deltas = Vec<(Vec<u8>, f32)>;

struct Family {
    base: Vec<u8>,
    variants: Vec<(&'static str, Deltas)>,
}

fn family() -> Family {
    let base = model("species-base");
    let night = delta(&base, &model("night"), Policy::Auto);
    let fog = delta(&base, &model("fog"), Policy::Auto);
    let seed = delta(&base, &model("night"), Policy::Seed);
    let variants = vec![
        ("night", vec![(night.clone(), 1.0)]),
        ("fog", vec![(fog.clone(), 1.0)]),
        ("soup", vec![(night, 0.5), (fog, 0.5)]),
        ("seed", vec![(seed, 1.0)]),
    ];
    Family { base, variants }
}

/// tract's outputs on the applied ONNX of every variant (and the base), per input.
fn references(f: &Family) -> BTreeMap<String, Vec<Vec<f32>>> {
    let weights = OnnxWeights::scan(&f.base).unwrap();
    let run = |onnx: &[u8]| {
        let clf = Classifier::from_onnx_bytes(onnx, &[1, 3, 32, 32]).unwrap();
        inputs().iter().map(|x| clf.run(x).unwrap()).collect()
    };
    let mut out = BTreeMap::new();
    out.insert(BASE.to_string(), run(&f.base));
    for (name, deltas) in &f.variants {
        let files: Vec<_> = deltas
            .iter()
            .map(|(b, a)| (DeltaFile::parse(b).unwrap(), *a))
            .collect();
        let list: Vec<_> = files.iter().map(|(d, a)| (d, *a)).collect();
        let applied = apply_onnx(&f.base, &weights, &list).unwrap();
        out.insert(name.to_string(), run(&applied.model));
    }
    out
}

fn engine(f: &Family, in_place: bool) -> Engine {
    let mut e = Engine::new(Box::new(f.base.clone()), &[1, 3, 32, 32]).unwrap();
    e.set_in_place(in_place);
    for (name, deltas) in &f.variants {
        e.add_variant(name, deltas.clone()).unwrap();
    }
    e
}

const ORDER: [&str; 9] = [
    "night", "fog", BASE, "soup", "night", "seed", BASE, "fog", "soup",
];

fn check_switches(in_place: bool) {
    let f = family();
    let reference = references(&f);
    let mut e = engine(&f, in_place);
    for (k, name) in ORDER.iter().enumerate() {
        assert!(e.switch(name).unwrap(), "{name}: switched");
        let expected = if in_place && k > 0 {
            SwitchKind::InPlace
        } else {
            SwitchKind::Rebuild
        };
        assert_eq!(e.last_switch(), Some(expected), "switch {k} to {name}");
        for (x, want) in inputs().iter().zip(&reference[*name]) {
            let got = e.run(x).unwrap();
            assert!(
                got.iter()
                    .map(|v| v.to_bits())
                    .eq(want.iter().map(|v| v.to_bits())),
                "{name} after switch {k}: {got:?} != tract on the applied ONNX {want:?}"
            );
        }
    }
    // The active fingerprint is that of the applied weights.
    let (name, fp) = e.active();
    assert_eq!(name, "soup");
    let weights = OnnxWeights::scan(&f.base).unwrap();
    let soup = &f.variants[2].1;
    let files: Vec<_> = soup
        .iter()
        .map(|(b, a)| (DeltaFile::parse(b).unwrap(), *a))
        .collect();
    let list: Vec<_> = files.iter().map(|(d, a)| (d, *a)).collect();
    assert_eq!(
        *fp,
        apply_onnx(&f.base, &weights, &list).unwrap().fingerprint
    );
}

#[test]
fn in_place_switches_equal_tract_on_the_applied_onnx() {
    check_switches(true);
}

#[test]
fn rebuild_switches_equal_tract_on_the_applied_onnx() {
    check_switches(false);
}

#[test]
fn every_weight_of_the_species_model_is_located() {
    let f = family();
    let mut e = engine(&f, true);
    e.switch(BASE).unwrap();
    assert_eq!(e.located_weights(), None);
    e.switch("night").unwrap();
    let weights = OnnxWeights::scan(&f.base).unwrap();
    // Every float initializer of the species model has a unique site: the switches above never
    // need the rebuild.
    assert_eq!(e.located_weights(), Some(weights.initializers.len()));
}

#[test]
fn a_removed_or_replaced_running_variant_still_switches_in_place() {
    let f = family();
    let reference = references(&f);
    let x = &inputs()[0];
    let mut e = engine(&f, true);
    e.switch(BASE).unwrap();
    e.switch("night").unwrap();
    // The registration goes away while night runs: the engine still knows what it holds.
    assert!(e.remove_variant("night"));
    e.switch("fog").unwrap();
    assert_eq!(e.last_switch(), Some(SwitchKind::InPlace));
    assert_eq!(e.run(x).unwrap(), reference["fog"][0]);
    // "fog" is registered again with night's delta while fog runs: the running model stays fog.
    e.add_variant("fog", f.variants[0].1.clone()).unwrap();
    assert!(!e.switch("fog").unwrap());
    assert_eq!(e.run(x).unwrap(), reference["fog"][0]);
    e.switch(BASE).unwrap();
    assert_eq!(e.last_switch(), Some(SwitchKind::InPlace));
    assert_eq!(e.run(x).unwrap(), reference[BASE][0]);
    // Back to the name "fog": now its new deltas (night's).
    e.switch("fog").unwrap();
    assert_eq!(e.last_switch(), Some(SwitchKind::InPlace));
    assert_eq!(e.run(x).unwrap(), reference["night"][0]);
}

#[test]
fn a_shared_classifier_makes_the_switch_rebuild() {
    let f = family();
    let mut e = engine(&f, true);
    e.switch("night").unwrap();
    let held = e.classifier.clone().unwrap();
    let before = held.run(&inputs()[0]).unwrap();
    e.switch("fog").unwrap();
    assert_eq!(e.last_switch(), Some(SwitchKind::Rebuild));
    // The clone still runs the model it had.
    assert_eq!(held.run(&inputs()[0]).unwrap(), before);
}

#[test]
fn partial_reconstruction_equals_the_whole() {
    let f = family();
    let weights = OnnxWeights::scan(&f.base).unwrap();
    let night = DeltaFile::parse(&f.variants[0].1[0].0).unwrap();
    let fog = DeltaFile::parse(&f.variants[1].1[0].0).unwrap();
    let list = [(night, 0.7f32), (fog, -0.4)];
    for i in 0..weights.initializers.len() {
        let p = payloads(&weights, &list, i).unwrap();
        let n = weights.initializers[i].numel() as usize;
        let mut whole = vec![0f32; n];
        compose::reconstruct(base_view(&f.base, &weights.initializers[i]), &p, &mut whole).unwrap();
        for (first, len) in [
            (0, n),
            (1, n - 1),
            (n / 3, n / 2),
            (n - 1, 1),
            (7, n.min(4100) - 7),
        ] {
            let mut part = vec![0f32; len];
            reconstruct_at(&f.base, &weights, i, &p, first, &mut part).unwrap();
            assert!(
                part.iter()
                    .map(|v| v.to_bits())
                    .eq(whole[first..first + len].iter().map(|v| v.to_bits())),
                "tensor {i} elements {first}..{}",
                first + len
            );
        }
        let mut over = vec![0f32; 2];
        assert!(reconstruct_at(&f.base, &weights, i, &p, n - 1, &mut over).is_err());
    }
}

#[test]
fn the_stripped_model_is_the_base_with_each_weight_marked_external() {
    use tract_onnx::pb::tensor_proto::DataLocation;
    let base = model("species-base");
    let weights = OnnxWeights::scan(&base).unwrap();
    let stripped = crate::onnx::without_weights(&base, &weights).unwrap();
    assert!(stripped.len() + weights.data_bytes() <= base.len() + 64 * weights.initializers.len());
    let (mut full, mut thin) = (
        ModelProto::decode(&base[..]).unwrap(),
        ModelProto::decode(&stripped[..]).unwrap(),
    );
    let (fg, tg) = (full.graph.as_mut().unwrap(), thin.graph.as_mut().unwrap());
    assert_eq!(fg.initializer.len(), tg.initializer.len());
    for (f, t) in fg.initializer.iter_mut().zip(&mut tg.initializer) {
        let i = weights
            .initializers
            .iter()
            .position(|w| w.name == f.name)
            .unwrap();
        assert!(
            t.raw_data.is_empty() && t.float_data.is_empty(),
            "{}",
            t.name
        );
        assert_eq!(t.data_location, Some(DataLocation::External as i32));
        let kv: Vec<_> = t
            .external_data
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(kv, [("location", "."), ("offset", i.to_string().as_str())]);
        // Everything else is unchanged.
        f.raw_data.clear();
        t.external_data.clear();
        t.data_location = f.data_location;
        assert_eq!(f, t);
    }
    fg.initializer.clear();
    tg.initializer.clear();
    assert_eq!(full, thin);
}

#[test]
fn a_constant_stored_transposed_is_located_and_rewritten_in_its_order() {
    // A depthwise kernel (C=6, 1, 3, 3) as tract's channel-last depthwise holds it: tap-major
    // [1, 9, 6]. Plus one in order and one that matches neither way.
    let (c, k) = (6usize, 9usize);
    let w: Vec<f32> = (0..c * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let tap_major: Vec<f32> = (0..k * c).map(|j| w[(j % c) * k + j / c]).collect();
    let mut model = TypedModel::default();
    let t = model
        .add_const("t", Tensor::from_shape(&[1, k, c], &tap_major).unwrap())
        .unwrap();
    let s = model
        .add_const("s", Tensor::from_shape(&[c, k], &w).unwrap())
        .unwrap();
    let other: Vec<f32> = w.iter().map(|v| v + 1.0).collect();
    model
        .add_const("o", Tensor::from_shape(&[c * k], &other).unwrap())
        .unwrap();
    // Weight 0 is held transposed in `t`; weight 1 (same values, other name) would be ambiguous
    // with weight 0 in `s`, so give it the other values: it matches nothing.
    let weights = [w.clone(), w.iter().map(|v| v * 3.0).collect::<Vec<f32>>()];
    let shapes = [Some((c * k, c)), Some((c * k, c))];
    let sites = inplace::Sites::find(
        &model,
        &shapes,
        |_| false,
        |i, first, out| {
            out.copy_from_slice(&weights[i][first..first + out.len()]);
            Ok(())
        },
    )
    .unwrap();
    // Weight 0 is held twice, `t` transposed and `s` in order: both are its sites.
    assert_eq!(
        sites.get(0),
        Some(
            &[
                inplace::Site::Plain {
                    node: t.node,
                    transposed: Some(c)
                },
                inplace::Site::Plain {
                    node: s.node,
                    transposed: None
                }
            ][..]
        )
    );
    assert_eq!(sites.get(1), None);
    // Without `s`, weight 0 has exactly one place, transposed.
    let mut model = TypedModel::default();
    let t2 = model
        .add_const("t", Tensor::from_shape(&[1, k, c], &tap_major).unwrap())
        .unwrap();
    let sites = inplace::Sites::find(
        &model,
        &shapes[..1],
        |_| false,
        |_, first, out| {
            out.copy_from_slice(&w[first..first + out.len()]);
            Ok(())
        },
    )
    .unwrap();
    let site = sites.get(0).expect("located")[0];
    assert_eq!(sites.get(0).unwrap().len(), 1);
    assert_eq!(
        site,
        inplace::Site::Plain {
            node: t2.node,
            transposed: Some(c)
        }
    );
    let new: Vec<f32> = w.iter().map(|v| v * -2.0 + 0.5).collect();
    inplace::write(&mut model, site, c * k, |first, out| {
        out.copy_from_slice(&new[first..first + out.len()]);
        Ok(())
    })
    .unwrap();
    let held = model
        .node(t2.node)
        .op_as::<tract_onnx::tract_core::ops::konst::Const>()
        .unwrap()
        .val()
        .clone();
    assert_eq!(held.shape(), &[1, k, c]);
    let held = held.try_as_plain_ram().unwrap();
    let held = held.as_slice::<f32>().unwrap();
    for ch in 0..c {
        for tap in 0..k {
            assert_eq!(held[tap * c + ch].to_bits(), new[ch * k + tap].to_bits());
        }
    }
    // The output fact carries the new constant, not the old one.
    let fact = model.outlet_fact(t2).unwrap();
    assert_eq!(
        fact.konst
            .as_ref()
            .unwrap()
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap(),
        held
    );
}

/// The values of every float initializer of `onnx`, as f32.
fn values_of(onnx: &[u8], w: &OnnxWeights) -> Vec<Vec<f32>> {
    w.initializers
        .iter()
        .map(|i| bytemuck::pod_collect_to_vec(&onnx[i.data.clone()]))
        .collect()
}

/// The night model as a [`Tunable`] of batch 3 with its weights, and the base's.
struct Night {
    night: Vec<u8>,
    w: Arc<OnnxWeights>,
    /// The base's and night's values of every weight.
    bv: Vec<Vec<f32>>,
    nv: Vec<Vec<f32>>,
    shape: [usize; 4],
    t: Tunable,
    /// One input batch.
    x: Vec<f32>,
}

fn night_tunable() -> Night {
    let (base, night) = (model("species-base"), model("night"));
    let w = Arc::new(OnnxWeights::scan(&night).unwrap());
    let (bv, nv) = (values_of(&base, &w), values_of(&night, &w));
    let shape = [3, 3, 32, 32];
    let t = Tunable::new(&night, w.clone(), nv.clone(), &shape, InputType::F32).unwrap();
    let x: Vec<f32> = inputs().concat();
    Night {
        night,
        w,
        bv,
        nv,
        shape,
        t,
        x,
    }
}

#[test]
fn a_tunable_model_answers_as_tract_on_the_model_with_those_weights() {
    // Night's weights, then tensors set one by one and together to other values (the base's,
    // zeros for a bias, a weight scaled): every answer is tract's on an ONNX file holding those
    // values, bit for bit, and none needs a rebuild.
    let Night {
        night,
        w,
        bv,
        nv,
        shape,
        mut t,
        x,
    } = night_tunable();
    let mut bytes = night.clone();
    let check = |t: &Tunable, bytes: &[u8]| {
        let want = Classifier::from_onnx_bytes(bytes, &shape)
            .unwrap()
            .run(&x)
            .unwrap();
        assert_eq!(t.run(&x).unwrap(), want);
    };
    check(&t, &bytes);
    let n = w.initializers.len();
    let scaled: Vec<f32> = nv[n - 1].iter().map(|v| v * 1.5).collect();
    let zeros = vec![0f32; nv[0].len()];
    let steps: [Vec<(usize, &[f32])>; 4] = [
        vec![(0, &bv[0])],
        vec![(n / 2, &bv[n / 2]), (n - 1, &scaled)],
        vec![(0, &zeros)],
        vec![(0, &nv[0]), (n / 2, &nv[n / 2]), (n - 1, &nv[n - 1])],
    ];
    for changes in steps {
        t.set(&changes).unwrap();
        for &(i, v) in &changes {
            bytes[w.initializers[i].data.clone()].copy_from_slice(bytemuck::cast_slice(v));
        }
        check(&t, &bytes);
    }
    assert_eq!(t.rebuilds(), 0);
    assert_eq!(bytes, night);
    // Values that do not fit the weight are refused, and the model keeps its weights.
    let short = vec![0f32; nv[0].len() - 1];
    assert!(t.set(&[(0, &short)]).is_err());
    check(&t, &bytes);
}

#[test]
fn a_cut_run_answers_as_tract_on_the_model_with_those_weights() {
    // One cut advanced through the model in the order the model reads the weights; at each
    // weight's first step, the weight is set to the base's values and the rest of the model run
    // from the cut: the answer is tract's on an ONNX file holding those values, bit for bit.
    let Night {
        night,
        w,
        bv,
        nv,
        shape,
        mut t,
        x,
    } = night_tunable();
    let n = w.initializers.len();
    let mut picked: Vec<(usize, usize)> = (0..n)
        .step_by(7)
        .chain([n - 1])
        .map(|i| (t.first_step(&[i]).expect("every weight has a site"), i))
        .collect();
    picked.sort();
    let (first, last) = (picked[0].0, picked[picked.len() - 1].0);
    assert!(first < last, "weights read at steps {first} and {last}");
    let mut cut = t.start(&x).unwrap();
    for (step, i) in picked {
        cut = t.advance(cut, step).unwrap();
        assert_eq!(cut.step(), step);
        t.set(&[(i, &bv[i])]).unwrap();
        let mut bytes = night.clone();
        bytes[w.initializers[i].data.clone()].copy_from_slice(bytemuck::cast_slice(&bv[i]));
        let want = Classifier::from_onnx_bytes(&bytes, &shape)
            .unwrap()
            .run(&x)
            .unwrap();
        assert_eq!(t.finish(&cut).unwrap(), want, "weight {i} from step {step}");
        t.set(&[(i, &nv[i])]).unwrap();
    }
    // A cut cannot run backwards.
    assert!(t.advance(cut, first).is_err());
    assert_eq!(t.rebuilds(), 0);
}
