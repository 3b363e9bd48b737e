//! Fleet updates through Mender: the real Debian `mender-client` in standalone mode (`mender
//! install`, `commit`, `rollback`) drives the bitdelta Update Module (`boards/mender/bitdelta`)
//! against a store in a temp folder, with artifacts from `bitdelta bundle mender`.
//!
//! Mender 3.4 runs v3 Update Modules only from /usr/share/mender/modules/v3/ (its ModulesPath is
//! not read from the configuration file), and the first install reads /etc/mender/artifact_info:
//! the tests install both idempotently, which needs root (CI runs as root). They skip with a
//! message when mender, mender-artifact or root is missing, unless BITDELTA_REQUIRE_MENDER=1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::reference::{bitdelta, compress_models, model, ok, p, scratch, species};
use crate::store::snapshot;

const MODULE_DIR: &str = "/usr/share/mender/modules/v3";
const DEVICE: &str = "camera-trap";

/// Installs the module and the factory artifact_info once; `Err` says why the tests cannot run.
fn ready() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let res = READY.get_or_init(|| {
        for tool in ["mender", "mender-artifact"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!(
                    "{tool} not installed (apt-get install mender-client mender-artifact)"
                ));
            }
        }
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!(
                "not root: cannot install the module into {MODULE_DIR}"
            ));
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/mender/bitdelta");
        let module = std::fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let dst = Path::new(MODULE_DIR).join("bitdelta");
        if std::fs::read(&dst).ok().as_deref() != Some(&module[..]) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(MODULE_DIR).map_err(|e| e.to_string())?;
            let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &module).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &dst).map_err(|e| e.to_string())?;
        }
        let info = Path::new("/etc/mender/artifact_info");
        if !info.exists() {
            std::fs::create_dir_all("/etc/mender").map_err(|e| e.to_string())?;
            std::fs::write(info, "artifact_name=factory\n").map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    match res {
        Ok(()) => true,
        Err(why) if std::env::var("BITDELTA_REQUIRE_MENDER").as_deref() == Ok("1") => {
            panic!("BITDELTA_REQUIRE_MENDER=1 but {why}")
        }
        Err(why) => {
            eprintln!("skipping the Mender test: {why}");
            false
        }
    }
}

/// A device: a bitdelta store trusting `ranger.pub`, and Mender's data folder.
struct Device {
    dir: PathBuf,
    store: PathBuf,
    data: PathBuf,
    key: PathBuf,
}

fn device(test: &str, card: Option<&Path>) -> Device {
    let dir = scratch(test);
    let key = dir.join("ranger");
    ok(&["keygen", "-o", p(&key)]);
    let store = dir.join("store");
    let base = model("species-base");
    let mut args = vec!["store", "init", "--store", p(&store)];
    args.extend(["--base", p(&base)]);
    let trust = format!("{}.pub", p(&key));
    args.extend(["--trust-key", &trust]);
    if let Some(c) = card {
        args.extend(["--card", p(c)]);
    }
    ok(&args);
    let data = dir.join("mender");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("device_type"), format!("device_type={DEVICE}\n")).unwrap();
    Device {
        dir,
        store,
        data,
        key,
    }
}

impl Device {
    fn mender_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("mender");
        c.args([
            "--no-syslog",
            "--log-level",
            "info",
            "--data",
            p(&self.data),
        ])
        .args(args)
        .env("BITDELTA_STORE", &self.store)
        .env("BITDELTA_BIN", env!("CARGO_BIN_EXE_bitdelta"))
        .env("BITDELTA_MENDER_CONF", self.dir.join("no-such.conf"));
        c
    }

    /// Runs the client; (exit code, stdout + stderr).
    fn mender(&self, args: &[&str]) -> (i32, String) {
        let out = self.mender_cmd(args).output().expect("mender runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("panicked"), "mender {args:?}: {text}");
        (out.status.code().unwrap_or(-1), text)
    }

    fn mender_ok(&self, args: &[&str]) -> String {
        let (code, out) = self.mender(args);
        assert_eq!(code, 0, "mender {args:?}: {out}");
        out
    }

    fn artifact_name(&self) -> String {
        let (_, out) = self.mender(&["show-artifact"]);
        out.lines().next().unwrap_or("").to_owned()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&["status", "--store", p(&self.store), "--json"])).unwrap()
    }

    fn journal_lines(&self) -> usize {
        std::fs::read_to_string(self.store.join("journal.jsonl"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// `compress` of the species variant `fine` against `base` with `--sequence seq`, signed
    /// with the device's key.
    fn signed_delta(&self, base: &str, fine: &str, seq: u64) -> PathBuf {
        let plain = self.dir.join(format!("{fine}-on-{base}-{seq}.bdelta"));
        let s = seq.to_string();
        compress_models(&model(base), &model(fine), &plain, &["--sequence", &s]);
        let signed = plain.with_extension("signed");
        ok(&["sign", p(&plain), "--key", p(&self.key), "-o", p(&signed)]);
        signed
    }

    fn bundle(&self, delta: &Path, out: &str, extra: &[&str]) -> PathBuf {
        let art = self.dir.join(out);
        let mut args = vec!["bundle", "mender", p(delta), "--device-type", DEVICE];
        args.extend(["-o", p(&art)]);
        args.extend(extra);
        ok(&args);
        art
    }

    fn active(&self) -> (String, u64) {
        let st = self.status();
        (
            st["active"]["name"].as_str().unwrap_or("base").to_owned(),
            st["active"]["sequence"].as_u64().unwrap_or(0),
        )
    }
}

/// A device, the signed night delta (sequence 1) and its artifact, built for a device's first
/// bitdelta install (without the `bitdelta.base` dependency).
fn first_night(test: &str, card: Option<&Path>) -> (Device, PathBuf, PathBuf) {
    let dev = device(test, card);
    let night = dev.signed_delta("species-base", "night", 1);
    let art = dev.bundle(&night, "night-1.mender", &["--no-depends"]);
    (dev, night, art)
}

/// `mender install` of an artifact that must fail, leaving the store byte-identical and the
/// device on `bitdelta-night-1`; the output must contain `needle`.
fn refused(dev: &Device, art: &Path, needle: &str) -> String {
    let before = snapshot(&dev.store);
    let (code, out) = dev.mender(&["install", p(art)]);
    assert_ne!(code, 0, "{}: installed: {out}", art.display());
    assert!(out.contains(needle), "{}: {out}", art.display());
    assert_eq!(snapshot(&dev.store), before, "{}", art.display());
    assert_eq!(dev.artifact_name(), "bitdelta-night-1");
    assert_eq!(dev.active(), ("night".to_owned(), 1));
    out
}

/// A good artifact installs (staged, not active) and commits (active); Mender then provides the
/// base. A wrong-base artifact is refused by Mender before the module runs (artifact_depends),
/// and without the dependency by the module's Download state; a tampered signed delta and an
/// older sequence are refused by `bitdelta install`. Each leaves the store as it was. Rollback
/// before commit keeps the previous variant; `status` names what Mender last installed.
#[test]
fn mender_installs_commits_and_refuses_wrong_base_tampered_and_older_artifacts() {
    if !ready() {
        return;
    }
    let t0 = Instant::now();
    let (dev, night, art) = first_night("mender_flow", None);
    let out = dev.mender_ok(&["install", p(&art)]);
    assert!(out.contains("commit"), "{out}");
    let st = dev.status();
    assert_eq!(
        st["active"],
        serde_json::Value::Null,
        "installed, not yet active: {st}"
    );
    assert_eq!(st["installed"][0]["name"], "night", "{st}");
    dev.mender_ok(&["commit"]);
    assert_eq!(dev.active(), ("night".to_owned(), 1));
    assert_eq!(dev.artifact_name(), "bitdelta-night-1");
    let fp = st["base"]["fingerprint"].as_str().unwrap().to_owned();
    // Size: the artifact against the delta plus Mender's fixed overhead (an artifact of the same
    // kind, meta-data and provides around a 1-byte payload), and against the fine-tuned ONNX.
    let one = dev.dir.join("one-byte");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::write(one.join("x.bdelta"), b"x").unwrap();
    let meta = one.join("meta.json");
    let m = format!(
        r#"{{"bitdelta":{{"format":1,"base_fingerprint":"{fp}","activate":"night","variants":[{{"name":"night","sequence":1,"fingerprint":"{fp}","file":"night.1.bdelta","signed_by":"0123456789abcdef"}}]}}}}"#
    );
    std::fs::write(&meta, m).unwrap();
    let empty = one.join("overhead.mender");
    let status = Command::new("mender-artifact")
        .args([
            "write",
            "module-image",
            "-T",
            "bitdelta",
            "-n",
            "bitdelta-night-1",
        ])
        .args(["-t", DEVICE, "-f", p(&one.join("x.bdelta")), "-m", p(&meta)])
        .args(["--provides", "bitdelta.variant.night:1", "--provides"])
        .arg(format!("bitdelta.base:{fp}"))
        .args(["--compression", "none", "-o", p(&empty)])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let size = |f: &Path| std::fs::metadata(f).unwrap().len();
    let (artifact, delta, overhead) = (size(&art), size(&night), size(&empty) - 1);
    let onnx = size(&model("night"));
    eprintln!(
        "night artifact {artifact} B = {:.3} x (signed delta {delta} B + Mender overhead {overhead} B); fine-tuned ONNX {onnx} B ({:.1} % of it)",
        artifact as f64 / (delta + overhead) as f64,
        100.0 * artifact as f64 / onnx as f64
    );
    assert!(
        artifact * 10 < (delta + overhead) * 11,
        "{artifact} vs {delta} + {overhead}"
    );
    assert!(artifact * 10 < onnx, "{artifact} vs ONNX {onnx}");
    let (_, provides) = dev.mender(&["show-provides"]);
    assert!(
        provides.contains(&format!("bitdelta.base={fp}")),
        "{provides}"
    );
    assert!(provides.contains("bitdelta.variant.night=1"), "{provides}");
    // `status` shows what Mender installed, from the journal.
    let st = dev.status();
    let m = &st["mender"]["installed"];
    assert_eq!(m["ok"], true, "{st}");
    assert_eq!(m["origin"], "mender artifact bitdelta-night-1", "{st}");
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("\"night\" sequence 1"),
        "{st}"
    );
    assert_eq!(st["mender"]["last"]["action"], "activate", "{st}");
    let text = ok(&["status", "--store", p(&dev.store)]);
    assert!(
        text.contains("mender installed: install ok: installed \"night\" sequence 1"),
        "{text}"
    );

    // Another base: Mender itself refuses (artifact_depends), the module never runs.
    let wrong = dev.signed_delta("night", "fog", 9);
    let art = dev.bundle(&wrong, "wrong-base.mender", &[]);
    let journal = dev.journal_lines();
    refused(&dev, &art, "bitdelta.base");
    assert_eq!(dev.journal_lines(), journal, "the module ran");
    // Without the dependency, the module's Download state refuses it before the payload.
    let art = dev.bundle(&wrong, "wrong-base-nodep.mender", &["--no-depends"]);
    refused(&dev, &art, "made for another base model");
    assert_eq!(dev.journal_lines(), journal, "bitdelta install ran");

    // A signed delta changed after signing, packed by mender-artifact directly (the bundle
    // command refuses it): the store's signature check refuses it at ArtifactInstall.
    let fog = dev.signed_delta("species-base", "fog", 3);
    let mut bytes = std::fs::read(&fog).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    let tampered_dir = dev.dir.join("tampered");
    std::fs::create_dir_all(&tampered_dir).unwrap();
    let tampered = tampered_dir.join("fog.3.bdelta");
    std::fs::write(&tampered, &bytes).unwrap();
    let meta = tampered_dir.join("meta.json");
    std::fs::write(
        &meta,
        format!(r#"{{"bitdelta":{{"base_fingerprint":"{fp}","activate":"fog"}}}}"#),
    )
    .unwrap();
    let art = dev.dir.join("tampered.mender");
    let status = Command::new("mender-artifact")
        .args(["write", "module-image", "-T", "bitdelta", "-n", "tampered"])
        .args([
            "-t",
            DEVICE,
            "-f",
            p(&tampered),
            "-m",
            p(&meta),
            "-o",
            p(&art),
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let out = refused(&dev, &art, "signature");
    assert!(out.contains("fog.3.bdelta"), "{out}");

    // An older sequence of the installed variant.
    let old = dev.signed_delta("species-base", "night", 0);
    let art = dev.bundle(&old, "night-0.mender", &[]);
    refused(&dev, &art, "downgrade");
    assert_eq!(dev.status()["mender"]["installed"]["ok"], false);

    // A good fog artifact, rolled back before commit: night stays active.
    let art = dev.bundle(&fog, "fog-3.mender", &[]);
    dev.mender_ok(&["install", p(&art)]);
    dev.mender_ok(&["rollback"]);
    assert_eq!(dev.active(), ("night".to_owned(), 1));
    assert_eq!(dev.artifact_name(), "bitdelta-night-1");
    // Installed again and committed: fog runs, night is the previous variant.
    dev.mender_ok(&["install", p(&art)]);
    dev.mender_ok(&["commit"]);
    let st = dev.status();
    assert_eq!(st["active"]["name"], "fog", "{st}");
    assert_eq!(st["previous"]["name"], "night", "{st}");
    assert_eq!(dev.artifact_name(), "bitdelta-fog-3");

    // The module's ArtifactRollback after its commit activated the variant (a state Mender
    // enters when a later step of the update fails) returns to night.
    let tree = dev.dir.join("tree");
    std::fs::create_dir_all(tree.join("header")).unwrap();
    std::fs::create_dir_all(tree.join("tmp")).unwrap();
    std::fs::write(tree.join("header/artifact_name"), "bitdelta-fog-3").unwrap();
    std::fs::write(tree.join("header/meta-data"), std::fs::read(&meta).unwrap()).unwrap();
    std::fs::write(tree.join("tmp/bitdelta-activated"), "").unwrap();
    let module = Path::new(MODULE_DIR).join("bitdelta");
    let out = Command::new(&module)
        .args(["ArtifactRollback", p(&tree)])
        .env("BITDELTA_STORE", &dev.store)
        .env("BITDELTA_BIN", env!("CARGO_BIN_EXE_bitdelta"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dev.active(), ("night".to_owned(), 1));
    eprintln!("mender flow: {:.1} s", t0.elapsed().as_secs_f64());
}

/// A variant whose golden-input self-test fails makes `mender commit` fail; Mender rolls back
/// and the previous variant stays active.
#[test]
fn mender_rolls_back_when_the_self_test_fails() {
    if !ready() {
        return;
    }
    let t0 = Instant::now();
    // A model card whose fog golden input expects a label the fog variant does not give.
    let dir = scratch("mender_selftest_card");
    let mut card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(species().join("model-card.json")).unwrap()).unwrap();
    for g in card["golden"].as_array_mut().unwrap() {
        let img = g["image"].as_str().unwrap().to_owned();
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::copy(species().join(&img), dir.join(&img)).unwrap();
        if img == "images/fog-0001-zebra.png" {
            g["label"] = "bear".into();
        }
    }
    let card_path = dir.join("model-card.json");
    std::fs::write(&card_path, serde_json::to_vec_pretty(&card).unwrap()).unwrap();
    let (dev, _, art) = first_night("mender_selftest", Some(&card_path));
    dev.mender_ok(&["install", p(&art)]);
    dev.mender_ok(&["commit"]);
    let fog = dev.signed_delta("species-base", "fog", 3);
    let art = dev.bundle(&fog, "fog-3.mender", &[]);
    dev.mender_ok(&["install", p(&art)]);
    let (code, out) = dev.mender(&["commit"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("Rolling back"), "{out}");
    assert_eq!(dev.active(), ("night".to_owned(), 1));
    assert_eq!(dev.artifact_name(), "bitdelta-night-1");
    let st = dev.status();
    let last = &st["mender"]["last"];
    assert_eq!(last["action"], "activate", "{st}");
    assert_eq!(last["ok"], false, "{st}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("expected \"bear\""),
        "{st}"
    );
    eprintln!(
        "mender self-test rollback: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// SIGKILL of the client (and the module it runs) during install, at several moments: the
/// store stays usable (status succeeds, night or the base runs) and the next install succeeds.
#[test]
fn sigkill_of_mender_during_install_leaves_the_store_usable() {
    if !ready() {
        return;
    }
    let t0 = Instant::now();
    let (dev, _, art) = first_night("mender_sigkill", None);
    for delay_ms in [50u64, 150, 300, 600] {
        use std::os::unix::process::CommandExt;
        let mut child = dev
            .mender_cmd(&["install", p(&art)])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: signals the process group of a child this test started.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-(child.id() as i32), libc::SIGKILL);
        }
        let _ = child.wait();
        // The store is usable: status answers and something runs.
        let st = dev.status();
        assert!(
            st["problems"].as_array().unwrap().is_empty(),
            "{delay_ms} ms: {st}"
        );
        let running = st["running"].as_str().unwrap();
        assert!(running == "base" || running.starts_with("night"), "{st}");
        // Mender may consider the interrupted update in progress: roll it back.
        let _ = dev.mender(&["rollback"]);
    }
    let (code, out) = dev.mender(&["install", p(&art)]);
    assert_eq!(code, 0, "{out}");
    dev.mender_ok(&["commit"]);
    assert_eq!(dev.active(), ("night".to_owned(), 1));
    let (code, _, err) = bitdelta(&["status", "--store", p(&dev.store)]);
    assert_eq!(code, 0, "{err}");
    eprintln!("mender sigkill: {:.1} s", t0.elapsed().as_secs_f64());
}
