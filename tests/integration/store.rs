//! The variant store: installs, activation, rollback, signatures, crash safety (a storage fault at
//! every step, and SIGKILL at random moments), corruption at rest, and `serve --store` following
//! activations.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bitdelta::store::{Checked, Fault, Store, StoreIo};
use bitdelta::tract::Engine;

use crate::reference::{
    bitdelta, command, compress, compress_models, model, ok, p, scratch, species,
};

const NIGHT_IMAGE: &str = "images/night-0001-zebra.png";

/// A store with night (sequence 1) installed and active, and fog (sequence 3) ready to install.
struct Fixture {
    dir: PathBuf,
    store: PathBuf,
    night: PathBuf,
    fog: PathBuf,
}

fn fixture(test: &str) -> Fixture {
    let dir = scratch(test);
    let (night, fog) = (dir.join("night.bdelta"), dir.join("fog.bdelta"));
    compress("night", &night, "auto");
    compress_models(
        &model("species-base"),
        &model("fog"),
        &fog,
        &["--sequence", "3"],
    );
    let store = dir.join("prepared");
    ok(&[
        "store",
        "init",
        "--store",
        p(&store),
        "--base",
        p(&model("species-base")),
    ]);
    ok(&["install", p(&night), "--store", p(&store), "--activate"]);
    Fixture {
        dir,
        store,
        night,
        fog,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Every file of a store except the journal and lock: the installed state.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else if name != "journal.jsonl" && name != "lock" {
                out.insert(
                    path.strip_prefix(root).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn status(store: &Path) -> serde_json::Value {
    let out = ok(&["status", "--store", p(store), "--json"]);
    serde_json::from_str(&out).unwrap()
}

/// `run --store` on a night image: the variant that answered and the label.
fn run_store(store: &Path) -> (String, String) {
    let img = species().join(NIGHT_IMAGE);
    let out = ok(&["run", "--store", p(store), "--json", p(&img)]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    (
        v["variant"].as_str().unwrap().to_owned(),
        v["label"].as_str().unwrap().to_owned(),
    )
}

/// The library-level self-test: build the candidate with tract and check finite outputs.
fn self_test(store: &Path) -> impl Fn(Option<&Checked>) -> Result<(), String> + '_ {
    move |c| {
        let base = std::fs::read(store.join("base.onnx")).map_err(|e| e.to_string())?;
        let mut e = Engine::new(Box::new(base), &[1, 3, 32, 32]).map_err(|e| e.to_string())?;
        let name = match c {
            Some(c) => {
                e.add_variant(&c.name, vec![(c.delta().to_vec(), 1.0)])
                    .map_err(|e| e.to_string())?;
                c.name.clone()
            }
            None => "base".into(),
        };
        e.switch(&name).map_err(|e| e.to_string())?;
        let out = e.run(&[0.5; 3 * 32 * 32]).map_err(|e| e.to_string())?;
        if out.iter().all(|x| x.is_finite()) {
            Ok(())
        } else {
            Err("outputs are not finite".into())
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Install,
    InstallActivate,
    Activate,
    Rollback,
    Remove,
}

/// Runs `op` on an open store.
fn apply_op(s: &mut Store, op: Op, dir: &Path, fog: &Path) -> Result<(), String> {
    let test = self_test(dir);
    match op {
        Op::Install => s.install(fog).map(drop),
        Op::InstallActivate => s
            .install(fog)
            .and_then(|_| s.activate("fog", &test).map(drop)),
        Op::Activate => s.activate("fog", &test).map(drop),
        Op::Rollback => s.rollback(&test).map(drop),
        Op::Remove => s.remove("fog").map(drop),
    }
    .map_err(|e| e.to_string())
}

/// Runs `op` on the store in `dir` through `io`.
fn run_op(op: Op, dir: &Path, fog: &Path, io: StoreIo) -> Result<(), String> {
    let mut s = Store::open_with(dir, io).map_err(|e| e.to_string())?;
    apply_op(&mut s, op, dir, fog)
}

/// What the store must look like after `op` succeeded.
fn check_done(op: Op, dir: &Path) {
    let st = status(dir);
    let names: Vec<&str> = st["installed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    match op {
        Op::Install => {
            assert_eq!(names, ["fog", "night"]);
            assert_eq!(st["active"]["name"], "night");
        }
        Op::InstallActivate | Op::Activate => {
            assert_eq!(st["active"]["name"], "fog");
            assert_eq!(st["previous"]["name"], "night");
        }
        Op::Rollback => {
            assert_eq!(st["active"]["name"], "night");
            assert_eq!(st["previous"]["name"], "fog");
        }
        Op::Remove => {
            assert_eq!(names, ["night"]);
            assert_eq!(st["active"]["name"], "night");
        }
    }
    assert_eq!(st["problems"].as_array().unwrap().len(), 0, "{st}");
}

/// A storage fault (an I/O error, or a crash that stops every later write) at every storage
/// step of install, activate, rollback and remove: afterwards the store opens, `status` works,
/// the active variant loads and classifies, no temp file is mistaken for a variant, and a retry
/// succeeds.
#[test]
fn a_fault_at_every_storage_step_never_breaks_the_store() {
    let fx = fixture("store_faults");
    // Starting points: night active (fog not installed); night active with fog installed; fog
    // active after night (for rollback).
    let with_fog = fx.dir.join("with-fog");
    copy_dir(&fx.store, &with_fog);
    run_op(Op::Install, &with_fog, &fx.fog, StoreIo::new()).unwrap();
    let fog_active = fx.dir.join("fog-active");
    copy_dir(&with_fog, &fog_active);
    run_op(Op::Activate, &fog_active, &fx.fog, StoreIo::new()).unwrap();
    let cases = [
        (Op::Install, &fx.store),
        (Op::InstallActivate, &fx.store),
        (Op::Activate, &with_fog),
        (Op::Rollback, &fog_active),
        (Op::Remove, &with_fog),
    ];
    let work = fx.dir.join("work");
    let mut total = 0;
    for (op, start) in cases {
        let steps = count_steps(op, start, &work, &fx.fog);
        assert!(steps >= 2, "{op:?}: {steps} storage steps");
        for k in 0..steps {
            for fault in [Fault::Fail(k), Fault::Crash(k)] {
                copy_dir(start, &work);
                let before = snapshot(&work);
                let res = run_op(op, &work, &fx.fog, StoreIo::with_fault(fault));
                assert!(res.is_err(), "{op:?} {fault:?}: the fault did not surface");
                // The store still opens, reports, and runs a model.
                Store::open(&work).unwrap_or_else(|e| panic!("{op:?} {fault:?}: {e}"));
                let st = status(&work);
                assert_eq!(st["base"]["ok"], true, "{op:?} {fault:?}: {st}");
                let (variant, label) = run_store(&work);
                assert!(
                    ["night", "fog"].contains(&variant.as_str()),
                    "{op:?} {fault:?}: ran {variant}"
                );
                assert!(!label.is_empty());
                // An operation that failed before its commit point left the state as it was.
                if snapshot(&work).get(Path::new("state.json"))
                    == before.get(Path::new("state.json"))
                {
                    assert_eq!(st["active"], status(start)["active"], "{op:?} {fault:?}");
                }
                // A retry succeeds and leaves no temp files behind. Install and activate are
                // idempotent; rollback and remove are retried only when they did not take
                // effect (the fault hit after their commit point).
                let done = match op {
                    Op::Rollback => st["active"]["name"] == "night",
                    Op::Remove => !st["installed"].to_string().contains("\"fog\""),
                    _ => false,
                };
                if !done {
                    run_op(op, &work, &fx.fog, StoreIo::new())
                        .unwrap_or_else(|e| panic!("{op:?} {fault:?}: retry failed: {e}"));
                }
                check_done(op, &work);
                let stray: Vec<_> = snapshot(&work)
                    .into_keys()
                    .filter(|k| k.to_string_lossy().ends_with(".tmp"))
                    .collect();
                assert!(stray.is_empty(), "{op:?} {fault:?}: {stray:?}");
                total += 1;
            }
        }
    }
    assert!(total >= 40, "only {total} fault cases");
}

/// The number of storage steps of a clean run of `op` from `start`.
fn count_steps(op: Op, start: &Path, work: &Path, fog: &Path) -> usize {
    copy_dir(start, work);
    let mut s = Store::open(work).unwrap();
    apply_op(&mut s, op, work, fog).unwrap();
    check_done(op, work);
    s.io().steps()
}

/// `install --activate` killed with SIGKILL at random moments: the store always stays usable,
/// and a clean install afterwards succeeds and activates.
#[test]
fn installs_killed_at_random_moments_leave_a_usable_store() {
    let fx = fixture("store_sigkill");
    let work = fx.dir.join("work");
    // How long a full install + activation takes here (qemu or debug builds are slow).
    copy_dir(&fx.store, &work);
    let t = Instant::now();
    ok(&["install", p(&fx.fog), "--store", p(&work), "--activate"]);
    let full = t.elapsed();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut killed = 0;
    for round in 0..30 {
        copy_dir(&fx.store, &work);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = full.mul_f64((rng % 1000) as f64 / 1000.0 * 1.1);
        let mut child = command()
            .args(["install", p(&fx.fog), "--store", p(&work), "--activate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let st = status(&work);
        assert_eq!(st["base"]["ok"], true, "round {round}: {st}");
        let active = st["active"]["name"].as_str().unwrap_or("base").to_owned();
        assert!(
            ["night", "fog"].contains(&active.as_str()),
            "round {round}: {st}"
        );
        let (variant, _) = run_store(&work);
        assert_eq!(variant, active, "round {round}");
        ok(&["install", p(&fx.fog), "--store", p(&work), "--activate"]);
        assert_eq!(status(&work)["active"]["name"], "fog", "round {round}");
    }
    assert!(
        killed >= 10,
        "only {killed} of 30 installs were killed mid-way"
    );
}

/// Refusals change nothing: wrong base, truncation, corruption, downgrade and replay.
#[test]
fn refused_deltas_leave_the_store_exactly_as_it_was() {
    let fx = fixture("store_refusals");
    let bytes = std::fs::read(&fx.fog).unwrap();
    let wrong = fx.dir.join("wrong.bdelta");
    compress_models(&model("night"), &model("fog"), &wrong, &["--sequence", "9"]);
    let truncated = fx.dir.join("truncated.bdelta");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let flipped = fx.dir.join("flipped.bdelta");
    let mut f = bytes.clone();
    let at = f.len() - 100;
    f[at] ^= 0x10;
    std::fs::write(&flipped, &f).unwrap();
    let old = fx.dir.join("old-night.bdelta");
    compress_models(
        &model("species-base"),
        &model("night"),
        &old,
        &["--sequence", "0"],
    );
    let other = fx.dir.join("other-night-1.bdelta");
    ok(&[
        "compress",
        "--base",
        p(&model("species-base")),
        "--fine",
        p(&model("night")),
        "--codec",
        "seed",
        "-o",
        p(&other),
    ]);
    let before = snapshot(&fx.store);
    for (file, needle) in [
        (&wrong, "another base model"),
        (&truncated, "truncated.bdelta"),
        (&flipped, "flipped.bdelta"),
        (&old, "downgrade"),
        (&other, "already installed with other content"),
        (&fx.dir.join("missing.bdelta"), "missing.bdelta"),
    ] {
        let (code, _, err) = bitdelta(&["install", p(file), "--store", p(&fx.store)]);
        assert_ne!(code, 0, "{}: accepted", file.display());
        assert!(err.contains(needle), "{}: {err}", file.display());
        assert_eq!(snapshot(&fx.store), before, "{}", file.display());
    }
    // A failed install is journalled.
    let st = status(&fx.store);
    assert_eq!(st["last_result"]["ok"], false, "{st}");
    // The same file again is a no-op, not an error.
    let out = ok(&["install", p(&fx.night), "--store", p(&fx.store)]);
    assert!(out.contains("already installed"), "{out}");
}

/// A store with a trust key installs only deltas signed by it, refusing before parsing.
#[test]
fn a_store_with_a_trust_key_refuses_unsigned_and_tampered_deltas() {
    let fx = fixture("store_signed");
    let (key, other) = (fx.dir.join("ranger"), fx.dir.join("intruder"));
    ok(&["keygen", "-o", p(&key)]);
    ok(&["keygen", "-o", p(&other)]);
    let store = fx.dir.join("signed-store");
    ok(&[
        "store",
        "init",
        "--store",
        p(&store),
        "--base",
        p(&model("species-base")),
        "--trust-key",
        &format!("{}.pub", p(&key)),
    ]);
    let signed = fx.dir.join("fog.signed");
    ok(&["sign", p(&fx.fog), "--key", p(&key), "-o", p(&signed)]);
    let wrong_key = fx.dir.join("fog.intruder");
    ok(&["sign", p(&fx.fog), "--key", p(&other), "-o", p(&wrong_key)]);
    let mut t = std::fs::read(&signed).unwrap();
    let at = t.len() - 10;
    t[at] ^= 1;
    let tampered = fx.dir.join("fog.tampered");
    std::fs::write(&tampered, &t).unwrap();
    let before = snapshot(&store);
    for (file, needle) in [
        (&fx.fog, "signature"),
        (&wrong_key, "signature"),
        (&tampered, "signature"),
    ] {
        let (code, _, err) = bitdelta(&["install", p(file), "--store", p(&store)]);
        assert_eq!(code, 1, "{}: {err}", file.display());
        assert!(
            err.contains(needle) && err.contains(p(file)),
            "{}: {err}",
            file.display()
        );
        assert_eq!(snapshot(&store), before);
    }
    ok(&["install", p(&signed), "--store", p(&store), "--activate"]);
    let st = status(&store);
    assert_eq!(st["active"]["name"], "fog");
    assert!(st["installed"][0]["signed_by"].is_string(), "{st}");
    assert_eq!(run_store(&store).0, "fog");
}

/// SD cards rot: a corrupt active variant falls back to the previous one (or the base), and
/// status and run say so.
#[test]
fn a_corrupt_active_variant_falls_back_and_says_so() {
    let fx = fixture("store_rot");
    ok(&["install", p(&fx.fog), "--store", p(&fx.store), "--activate"]);
    assert_eq!(run_store(&fx.store).0, "fog");
    let file = fx.store.join("variants/fog.3.bdelta");
    let mut b = std::fs::read(&file).unwrap();
    let at = b.len() - 1000;
    b[at] ^= 0x40;
    std::fs::write(&file, &b).unwrap();
    let st = status(&fx.store);
    assert_eq!(st["active"]["name"], "fog");
    assert_eq!(st["running"], "night", "{st}");
    let problems = st["problems"].to_string();
    assert!(
        problems.contains("fog") && problems.contains("checksum"),
        "{st}"
    );
    let img = species().join(NIGHT_IMAGE);
    let (code, out, err) = bitdelta(&["run", "--store", p(&fx.store), "--json", p(&img)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"variant\":\"night\""), "{out}");
    assert!(err.contains("warning") && err.contains("fog"), "{err}");
    // The corrupt previous as well: the base runs.
    let night = fx.store.join("variants/night.1.bdelta");
    std::fs::write(&night, b"garbage").unwrap();
    assert_eq!(status(&fx.store)["running"], "base");
    assert_eq!(run_store(&fx.store).0, "base");
    // A corrupt base is reported, exit 1.
    let base = fx.store.join("base.onnx");
    let mut m = std::fs::read(&base).unwrap();
    let at = m.len() / 2;
    m[at] ^= 1;
    std::fs::write(&base, &m).unwrap();
    let (code, out, _) = bitdelta(&["status", "--store", p(&fx.store), "--json"]);
    assert_eq!(code, 1);
    assert!(out.contains("corrupt"), "{out}");
}

/// `serve --store` picks up a new activation between requests, without a restart.
#[test]
fn serve_follows_activations_without_restarting() {
    let fx = fixture("store_serve");
    ok(&["install", p(&fx.fog), "--store", p(&fx.store)]);
    let mut child = command()
        .args(["serve", "--store", p(&fx.store)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let img = species().join(NIGHT_IMAGE);
    let mut ask = |req: String| -> serde_json::Value {
        writeln!(stdin, "{req}").unwrap();
        stdin.flush().unwrap();
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
    };
    let req = serde_json::json!({"image": img}).to_string();
    assert_eq!(ask(req.clone())["variant"], "night");
    ok(&["activate", "fog", "--store", p(&fx.store)]);
    let a = ask(req.clone());
    assert_eq!(a["variant"], "fog", "{a}");
    assert_eq!(a["switched"], true, "{a}");
    // Installed variants can be named per request.
    let a = ask(serde_json::json!({"image": img, "variant": "night"}).to_string());
    assert_eq!(a["variant"], "night", "{a}");
    ok(&["rollback", "--store", p(&fx.store)]);
    assert_eq!(ask(req)["variant"], "night");
    drop(stdin);
    let status = child.wait_timeout(Duration::from_secs(30));
    assert!(status, "serve did not exit at EOF");
}

trait WaitTimeout {
    fn wait_timeout(&mut self, d: Duration) -> bool;
}

impl WaitTimeout for std::process::Child {
    fn wait_timeout(&mut self, d: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < d {
            if let Some(s) = self.try_wait().unwrap() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.kill();
        false
    }
}

/// Activation is a trial: a variant that verifies but fails the model card's golden inputs (the
/// seed recipe on this family) is refused and the active variant stays.
#[test]
fn activation_refuses_a_variant_that_fails_the_golden_inputs() {
    let fx = fixture("store_golden");
    let seed = fx.dir.join("night-seed.bdelta");
    ok(&[
        "compress",
        "--base",
        p(&model("species-base")),
        "--fine",
        p(&model("night")),
        "--codec",
        "seed",
        "--sequence",
        "2",
        "-o",
        p(&seed),
    ]);
    let (code, out, err) = bitdelta(&["install", p(&seed), "--store", p(&fx.store), "--activate"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("installed variant \"night\" sequence 2"),
        "{out}"
    );
    assert!(err.contains("golden input images/night-"), "{err}");
    let st = status(&fx.store);
    assert_eq!(st["active"]["name"], "night");
    assert_eq!(st["active"]["sequence"], 1, "{st}");
    assert_eq!(st["last_result"]["ok"], false);
    assert_eq!(run_store(&fx.store), ("night".into(), "zebra".into()));
}
