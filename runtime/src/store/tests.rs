//! Unit tests of the store in temporary folders: install, activate, rollback and remove; every
//! refusal leaves the store as it was; an install interrupted at any storage step is recovered;
//! the lock refuses a second writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::*;
use crate::compress::{compress_onnx, Options, Policy};
use crate::onnx::OnnxWeights;

fn model_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/species/{name}.onnx"))
}

/// A delta from `base` to `fine` (model names) for variant `name` at `sequence`.
fn delta(base: &str, fine: &str, name: &str, sequence: u64) -> Vec<u8> {
    let base = std::fs::read(model_path(base)).unwrap();
    let fine = std::fs::read(model_path(fine)).unwrap();
    let opts = Options {
        name,
        description: "",
        labels: "",
        sequence,
        policy: Policy::Auto,
    };
    let (bw, fw) = (
        OnnxWeights::scan(&base).unwrap(),
        OnnxWeights::scan(&fine).unwrap(),
    );
    compress_onnx(&base, &bw, &fine, &fw, &opts, |_, _| {}).unwrap()
}

/// A fresh folder for one test (removed on drop).
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("bitdelta-store-unit-{test}-"))
            .tempdir()
            .unwrap();
        Self(dir)
    }

    /// The folder.
    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `bytes` as `name` in the folder (outside the store) and returns its path.
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn store(&self) -> PathBuf {
        self.path().join("store")
    }
}

fn init(s: &Scratch, trusted: &[VerifyingKey]) -> Store {
    Store::init(
        &s.store(),
        &model_path("species-base"),
        None,
        &[],
        trusted,
        StoreIo::new(),
    )
    .unwrap()
}

/// Every file of a store except the journal and the lock, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), out);
            } else if name != JOURNAL_FILE && name != LOCK_FILE {
                let rel = e.path().strip_prefix(root).unwrap().to_owned();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The state as read from disk by a fresh open.
fn state_on_disk(dir: &Path) -> State {
    Store::open(dir).unwrap().state().clone()
}

fn pass(_: Option<&Checked>) -> Result<(), String> {
    Ok(())
}

fn slot_name(s: &Option<Slot>) -> Option<(&str, u64)> {
    s.as_ref().map(|s| (s.name.as_str(), s.sequence))
}

#[test]
fn init_records_the_base_and_an_empty_state() {
    let s = Scratch::new("init");
    let store = init(&s, &[]);
    let base = std::fs::read(model_path("species-base")).unwrap();
    let fp = OnnxWeights::scan(&base).unwrap().fingerprint(&base);
    assert_eq!(store.base_fingerprint(), fp);
    assert_eq!(
        store.config().base.fingerprint,
        crate::fingerprint::hex(&fp)
    );
    assert_eq!(store.config().base.bytes, base.len() as u64);
    assert_eq!(std::fs::read(store.base_path()).unwrap(), base);
    assert_eq!(
        state_on_disk(&s.store()),
        State {
            format: STORE_FORMAT,
            ..State::default()
        }
    );
    // A second init is refused and changes nothing.
    let before = snapshot(&s.store());
    let again = Store::init(
        &s.store(),
        &model_path("fog"),
        None,
        &[],
        &[],
        StoreIo::new(),
    );
    assert!(matches!(again, Err(StoreError::Invalid(_))), "{again:?}");
    assert_eq!(snapshot(&s.store()), before);
}

#[test]
fn install_activate_rollback_remove() {
    let s = Scratch::new("lifecycle");
    let mut store = init(&s, &[]);
    let night = s.file("night.bdelta", &delta("species-base", "night", "night", 1));
    let fog = s.file("fog.bdelta", &delta("species-base", "fog", "fog", 3));

    let o = store.install(&night).unwrap();
    assert!(matches!(o, InstallOutcome::Installed(_)), "{o:?}");
    assert_eq!((o.slot().name.as_str(), o.slot().sequence), ("night", 1));
    assert_eq!(
        std::fs::read(store.variant_path("night", 1)).unwrap(),
        std::fs::read(&night).unwrap()
    );
    // The recorded fingerprint is the one of the model the delta rebuilds, hashed anew.
    let base = std::fs::read(model_path("species-base")).unwrap();
    let bytes = std::fs::read(&night).unwrap();
    let file = crate::format::DeltaFile::parse(&bytes).unwrap();
    let weights = OnnxWeights::scan(&base).unwrap();
    let applied = crate::apply::apply_onnx(&base, &weights, &[(&file, 1.0)])
        .unwrap()
        .model;
    let fp = OnnxWeights::scan(&applied).unwrap().fingerprint(&applied);
    assert_eq!(o.slot().fingerprint, crate::fingerprint::hex(&fp));
    // Installing the same file again changes nothing.
    let again = store.install(&night).unwrap();
    assert_eq!(again, InstallOutcome::AlreadyInstalled(o.slot().clone()));
    store.install(&fog).unwrap();
    let st = state_on_disk(&s.store());
    assert_eq!(st.active, None);
    assert_eq!(
        st.high_water,
        BTreeMap::from([("fog".into(), 3), ("night".into(), 1)])
    );

    // Activation runs the self-test on the candidate, then moves the pointer.
    let mut seen = None;
    let active = store
        .activate("night", |c| {
            seen = c.map(|c| (c.name.clone(), c.sequence));
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, Some(("night".into(), 1)));
    assert_eq!(slot_name(&active), Some(("night", 1)));
    store.activate("fog", pass).unwrap();
    let st = state_on_disk(&s.store());
    assert_eq!(slot_name(&st.active), Some(("fog", 3)));
    assert_eq!(slot_name(&st.previous), Some(("night", 1)));
    assert_eq!(store.resolve().running(), "fog");

    // Rollback: the previous variant comes back, after its own self-test.
    let mut seen = None;
    let back = store
        .rollback(|c| {
            seen = c.map(|c| c.name.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(seen.as_deref(), Some("night"));
    assert_eq!(slot_name(&back), Some(("night", 1)));
    let st = state_on_disk(&s.store());
    assert_eq!(slot_name(&st.active), Some(("night", 1)));
    assert_eq!(slot_name(&st.previous), Some(("fog", 3)));

    // The base is a target too; then the variant that was previous can go.
    assert_eq!(store.activate("base", pass).unwrap(), None);
    assert_eq!(store.remove("fog").unwrap(), 1);
    assert!(!store.variant_path("fog", 3).exists());
    let names: Vec<String> = store
        .installed()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["night"]);

    // Every operation was journalled with its result.
    let actions: Vec<(String, bool)> = store
        .journal(usize::MAX)
        .into_iter()
        .map(|o| (o.action, o.ok))
        .collect();
    let want = [
        "install", "install", "install", "activate", "activate", "rollback", "activate", "remove",
    ];
    assert_eq!(actions, want.map(|a| (a.to_string(), true)));
}

/// Each refusal leaves every file of the store as it was and says why.
#[test]
fn refusals_leave_the_store_unchanged() {
    let s = Scratch::new("refusals");
    let mut store = init(&s, &[]);
    let night2 = s.file("night2.bdelta", &delta("species-base", "night", "night", 2));
    store.install(&night2).unwrap();
    store.activate("night", pass).unwrap();
    let before = snapshot(&s.store());

    let mut corrupt = std::fs::read(&night2).unwrap();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let other_base = delta("fog", "night", "night", 5);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "downgrade",
            delta("species-base", "night", "night", 1),
            "downgrade",
        ),
        (
            "replay",
            delta("species-base", "fog", "night", 2),
            "already installed with other content",
        ),
        ("corrupt", corrupt, "checksum"),
        ("other-base", other_base, "made for another base model"),
    ];
    for (file, bytes, why) in cases {
        let path = s.file(file, &bytes);
        let err = store.install(&path).unwrap_err();
        assert!(err.is_refusal(), "{file}: {err}");
        assert!(err.to_string().contains(why), "{file}: {err}");
        assert_eq!(snapshot(&s.store()), before, "{file}");
    }

    // A failed self-test keeps the active variant.
    let fog = s.file("fog.bdelta", &delta("species-base", "fog", "fog", 1));
    store.install(&fog).unwrap();
    let before = snapshot(&s.store());
    let err = store
        .activate("fog", |_| Err("wrong label".into()))
        .unwrap_err();
    assert!(matches!(err, StoreError::SelfTest { .. }), "{err}");
    assert!(err.to_string().contains("wrong label"), "{err}");
    assert_eq!(snapshot(&s.store()), before);
    // So does a failed rollback self-test, and removing the active variant is refused.
    assert!(store.rollback(|_| Err("no".into())).is_err());
    assert!(matches!(store.remove("night"), Err(StoreError::Invalid(_))));
    assert!(matches!(
        store.activate("owl", pass),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(snapshot(&s.store()), before);
    let last = store.journal(1).pop().unwrap();
    assert!(!last.ok, "{last:?}");
}

/// With trusted keys, only deltas signed by one of them install; the signer is recorded.
#[test]
fn trusted_keys_refuse_unsigned_and_foreign_signatures() {
    let s = Scratch::new("signed");
    let ours = SigningKey::from_bytes(&[3; 32]);
    let theirs = SigningKey::from_bytes(&[4; 32]);
    let mut store = init(&s, &[ours.verifying_key()]);
    let plain = delta("species-base", "night", "night", 1);
    let before = snapshot(&s.store());
    for (file, bytes) in [
        ("plain.bdelta", plain.clone()),
        ("theirs.bdelta", crate::sign::sign(&plain, &theirs)),
    ] {
        let err = store.install(&s.file(file, &bytes)).unwrap_err();
        assert!(err.to_string().contains("signature check"), "{file}: {err}");
        assert_eq!(snapshot(&s.store()), before, "{file}");
    }
    let signed = s.file("ours.bdelta", &crate::sign::sign(&plain, &ours));
    store.install(&signed).unwrap();
    let (slot, c) = store.newest("night").unwrap();
    assert_eq!(slot.sequence, 1);
    assert_eq!(
        c.signed_by,
        Some(crate::sign::key_id(&ours.verifying_key()))
    );
    assert_eq!(c.delta(), &plain[..]);
}

/// A crash at every storage step of an install: the store opens afterwards with the state it had
/// before or after, the next writing operation clears the temp files, and a retry installs.
#[test]
fn an_interrupted_install_is_recovered() {
    let s = Scratch::new("crash");
    init(&s, &[]);
    let night = s.file("night.bdelta", &delta("species-base", "night", "night", 1));
    let pristine = s.path().join("pristine");
    std::fs::rename(s.store(), &pristine).unwrap();
    let copy = |to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        std::fs::create_dir_all(to.join(VARIANTS_DIR)).unwrap();
        for (rel, bytes) in snapshot(&pristine) {
            std::fs::write(to.join(rel), bytes).unwrap();
        }
    };
    let (before, mut crashes) = (snapshot(&pristine), 0);
    for k in 0.. {
        copy(&s.store());
        let mut store = Store::open_with(&s.store(), StoreIo::with_fault(Fault::Crash(k))).unwrap();
        let res = store.install(&night);
        if k >= store.io().steps() {
            // The fault was never reached: the install ran to its end.
            res.unwrap();
            break;
        }
        crashes += 1;
        assert!(res.is_err(), "step {k}");
        drop(store);
        // The "rebooted" device: the store opens and reads either state.
        let mut store = Store::open(&s.store()).unwrap();
        let st = store.state().clone();
        assert!(st.active.is_none(), "step {k}");
        assert!(
            matches!(st.high_water.get("night"), None | Some(1)),
            "step {k}"
        );
        let installed = store.installed().unwrap();
        assert!(
            installed.iter().all(|i| i.check.is_ok()),
            "step {k}: {installed:?}"
        );
        // The retry completes the install and leaves no temp file behind.
        let o = store.install(&night).unwrap();
        assert_eq!(
            (o.slot().name.as_str(), o.slot().sequence),
            ("night", 1),
            "step {k}"
        );
        store.activate("night", pass).unwrap();
        let after = snapshot(&s.store());
        assert!(
            after.keys().all(|p| !p.to_string_lossy().contains(".tmp")),
            "step {k}: {after:?}"
        );
        assert_eq!(after.len(), before.len() + 1, "step {k}");
    }
    // Write, fsync, rename, folder fsync for the variant, then the same for state.json.
    assert_eq!(crashes, 8);
}

#[test]
fn the_lock_refuses_a_second_writer() {
    let s = Scratch::new("lock");
    let mut store = init(&s, &[]);
    let night = s.file("night.bdelta", &delta("species-base", "night", "night", 1));
    let held = Store::lock_dir(&s.store()).unwrap();
    let before = snapshot(&s.store());
    let err = store.install(&night).unwrap_err();
    assert!(matches!(err, StoreError::Busy(_)), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");
    let mut other = Store::open(&s.store()).unwrap();
    assert!(matches!(
        other.activate("base", pass),
        Err(StoreError::Busy(_))
    ));
    assert_eq!(snapshot(&s.store()), before);
    // Reading needs no lock.
    assert_eq!(other.resolve().running(), "base");
    drop(held);
    store.install(&night).unwrap();
}

#[test]
fn staged_writes_replace_the_target_only_on_commit() {
    let s = Scratch::new("staged");
    let target = s.file("out.bin", b"old");
    let tmp = s.path().join(".out.bin.tmp");
    let mut w = Staged::create(&target).unwrap();
    std::io::Write::write_all(w.file(), b"new bytes").unwrap();
    assert!(tmp.exists());
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    drop(w);
    assert!(!tmp.exists());
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    StoreIo::new().write_atomic(&target, b"new bytes").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"new bytes");
    assert!(!tmp.exists());

    let secret = s.path().join("key");
    std::fs::write(s.path().join(".key.tmp"), b"stale").unwrap();
    let mut w = Staged::create_private(&secret).unwrap();
    std::io::Write::write_all(w.file(), b"seed").unwrap();
    w.commit().unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"seed");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A failure at each step leaves the old target and no temp file.
    for k in 0..4 {
        let io = StoreIo::with_fault(Fault::Fail(k));
        assert!(io.write_atomic(&target, b"newer").is_err(), "step {k}");
        if k < 3 {
            assert_eq!(std::fs::read(&target).unwrap(), b"new bytes", "step {k}");
        }
        assert!(!tmp.exists(), "step {k}");
    }
}

#[cfg(all(feature = "tract", feature = "images"))]
mod selftest {
    use super::*;
    use crate::card::ModelCard;

    fn species(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/species")
            .join(rel)
    }

    /// A store of the species base with its card and golden images; with `wrong`, each golden
    /// label for `night` is changed to the card's next label.
    fn store_with_card(s: &Scratch, wrong: bool) -> Store {
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(species("model-card.json")).unwrap()).unwrap();
        let labels = card["labels"].as_array().unwrap().clone();
        let mut extras = Vec::new();
        for g in card["golden"].as_array_mut().unwrap() {
            let image = PathBuf::from(g["image"].as_str().unwrap());
            extras.push((species(image.to_str().unwrap()), image));
            if wrong
                && g["variants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v == "night")
            {
                let i = labels.iter().position(|l| *l == g["label"]).unwrap();
                g["label"] = labels[(i + 1) % labels.len()].clone();
            }
        }
        let card_path = s.file("card.json", card.to_string().as_bytes());
        let (base, dir) = (model_path("species-base"), s.store());
        Store::init(&dir, &base, Some(&card_path), &extras, &[], StoreIo::new()).unwrap()
    }

    #[test]
    fn test_patterns_are_black_grey_and_a_ramp() {
        let [black, grey, ramp] = test_patterns(4, 2);
        assert_eq!(black, [0; 8]);
        assert_eq!(grey, [128; 8]);
        assert_eq!(ramp, [0, 31, 63, 95, 127, 159, 191, 223]);
    }

    #[test]
    fn goldens_apply_to_the_variants_they_name() {
        let card = ModelCard::load(&species("model-card.json")).unwrap();
        let images = |name| -> Vec<String> {
            goldens_for(&card, name)
                .map(|g| g.image.display().to_string())
                .collect()
        };
        let night = images("night");
        assert!(!night.is_empty());
        assert!(
            night.iter().all(|i| i.starts_with("images/night-")),
            "{night:?}"
        );
        assert!(images("base")
            .iter()
            .all(|i| i.starts_with("images/clean-")));
        assert!(images("owl").is_empty());
    }

    #[test]
    fn the_self_test_passes_good_variants_and_refuses_wrong_golden_labels() {
        let s = Scratch::new("selftest");
        let mut store = store_with_card(&s, false);
        let night = s.file("night.bdelta", &delta("species-base", "night", "night", 1));
        store.install(&night).unwrap();
        let test = SelfTest::for_store(&store).unwrap();
        test.check(None).unwrap();
        let (_, c) = store.newest("night").unwrap();
        test.check(Some(&c)).unwrap();
        store
            .activate("night", |c| test.check(c).map_err(|e| e.to_string()))
            .unwrap();
        assert_eq!(
            slot_name(&state_on_disk(&s.store()).active),
            Some(("night", 1))
        );

        // The same variant, judged by a card that expects another label for its images.
        let s = Scratch::new("selftest-wrong");
        let mut store = store_with_card(&s, true);
        store.install(&night).unwrap();
        let test = SelfTest::for_store(&store).unwrap();
        test.check(None).unwrap();
        let (_, c) = store.newest("night").unwrap();
        let err = test.check(Some(&c)).unwrap_err();
        assert!(
            matches!(&err, SelfTestError::Golden { expected, found, .. } if expected != found),
            "{err}"
        );
        let before = snapshot(&s.store());
        let err = store
            .activate("night", |c| test.check(c).map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(
            err.to_string().contains("golden input images/night-"),
            "{err}"
        );
        assert_eq!(snapshot(&s.store()), before);
    }
}
