//! Signed deltas through the binary: `keygen`, `sign`, and `verify`/`inspect` of signed files.
//! The envelope layout and signature are checked here with ed25519-dalek directly, from the
//! text of docs/FORMAT.md, not with the crate's own envelope code.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};

use crate::reference::{bitdelta, compress, model, ok, p, scratch};

/// A key pair made by `bitdelta keygen` in `dir`.
struct Keys {
    secret: PathBuf,
    public: PathBuf,
}

impl Keys {
    fn new(dir: &Path, name: &str) -> Self {
        let secret = dir.join(name);
        let out = ok(&["keygen", "-o", p(&secret)]);
        let keys = Self {
            public: dir.join(format!("{name}.pub")),
            secret,
        };
        assert!(out.contains(&keys.id()), "keygen prints the key id: {out}");
        keys
    }

    /// The 64 hex digits of the public key file.
    fn public_hex(&self) -> String {
        let text = std::fs::read_to_string(&self.public).unwrap();
        let hex = text
            .strip_prefix("bitdelta-ed25519-public ")
            .expect("public label");
        let hex = hex.strip_suffix('\n').expect("one line");
        assert_eq!(hex.len(), 64);
        assert!(hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        hex.to_owned()
    }

    fn public_bytes(&self) -> [u8; 32] {
        let hex = self.public_hex();
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// The key id users see: the first 8 bytes of the public key in hex.
    fn id(&self) -> String {
        self.public_hex()[..16].to_owned()
    }
}

/// `night` compressed into `dir`, signed with `keys`; returns (delta, signed) paths.
fn signed_night(dir: &Path, keys: &Keys) -> (PathBuf, PathBuf) {
    let delta = dir.join("night.bdelta");
    compress("night", &delta, "auto");
    let signed = dir.join("night.signed.bdelta");
    let out = ok(&[
        "sign",
        p(&delta),
        "--key",
        p(&keys.secret),
        "-o",
        p(&signed),
    ]);
    assert!(out.contains(&keys.id()), "sign prints the key id: {out}");
    (delta, signed)
}

/// `verify` expected to fail with exit 1; returns stderr.
fn refused(args: &[&str]) -> String {
    let (code, out, err) = bitdelta(args);
    assert_eq!(
        code, 1,
        "bitdelta {args:?}: expected exit 1, stdout {out}, stderr {err}"
    );
    assert!(err.contains("verify failed:"), "{err}");
    err
}

#[test]
fn keygen_sign_verify_round_trip() {
    let d = scratch("sign_round_trip");
    let keys = Keys::new(&d, "field.key");
    let secret = std::fs::read_to_string(&keys.secret).unwrap();
    let hex = secret.strip_prefix("bitdelta-ed25519-secret ").unwrap();
    assert_eq!(hex.strip_suffix('\n').unwrap().len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys.secret)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "secret key mode {mode:o}");
    }

    let (delta, signed) = signed_night(&d, &keys);
    let delta_bytes = std::fs::read(&delta).unwrap();
    let signed_bytes = std::fs::read(&signed).unwrap();

    // Layout and signature as docs/FORMAT.md states them.
    assert_eq!(signed_bytes.len(), 112 + delta_bytes.len());
    assert_eq!(&signed_bytes[..8], b"BDSIGN\0\x01");
    assert_eq!(signed_bytes[8..40], keys.public_bytes());
    assert_eq!(
        signed_bytes[104..112],
        (delta_bytes.len() as u64).to_le_bytes()
    );
    assert_eq!(signed_bytes[112..], delta_bytes[..]);
    let mut message = b"bitdelta-signed-delta-v1\0".to_vec();
    message.extend_from_slice(&signed_bytes[8..40]);
    message.extend_from_slice(&signed_bytes[104..]);
    let key = VerifyingKey::from_bytes(&keys.public_bytes()).unwrap();
    let signature = Signature::from_bytes(&signed_bytes[40..104].try_into().unwrap());
    key.verify_strict(&message, &signature).unwrap();

    let pubkey = p(&keys.public);
    let out = ok(&["verify", p(&signed), "--trust-key", pubkey]);
    assert!(
        out.contains(&format!("signed by key {}, signature verified", keys.id())),
        "{out}"
    );
    let base = model("species-base");
    let out = ok(&[
        "verify",
        p(&signed),
        "--trust-key",
        pubkey,
        "--base",
        p(&base),
    ]);
    assert!(
        out.contains("signature verified") && out.contains("against"),
        "{out}"
    );
    // Without a trusted key: structure only, and the output says the signature was not checked.
    let out = ok(&["verify", p(&signed), "--base", p(&base)]);
    assert!(
        out.contains(&format!("signed by key {}", keys.id())),
        "{out}"
    );
    assert!(out.contains("signature not checked"), "{out}");
    // Several trusted keys: one of them is enough.
    let other = Keys::new(&d, "other.key");
    ok(&[
        "verify",
        p(&signed),
        "--trust-key",
        p(&other.public),
        "--trust-key",
        pubkey,
    ]);

    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "verify",
        p(&signed),
        "--json",
        "--trust-key",
        pubkey,
    ]))
    .unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["signed"], true);
    assert_eq!(j["key_id"], keys.id());
    assert_eq!(j["signature_verified"], true);
    assert_eq!(j["variant"], "night");
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["verify", p(&signed), "--json"])).unwrap();
    assert_eq!(
        (j["signed"].clone(), j["signature_verified"].clone()),
        (true.into(), false.into())
    );
    let j: serde_json::Value = serde_json::from_str(&ok(&["verify", p(&delta), "--json"])).unwrap();
    assert_eq!(j["signed"], false);
    assert!(j["key_id"].is_null());

    let out = ok(&["inspect", p(&signed)]);
    assert!(
        out.contains(&format!("signed by key {}", keys.id())),
        "{out}"
    );
    let plain: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p(&delta), "--json"])).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p(&signed), "--json"])).unwrap();
    assert_eq!(
        (j["signed"].clone(), j["key_id"].clone()),
        (true.into(), keys.id().into())
    );
    assert_eq!(plain["signed"], false);
    assert_eq!(j["tensors"], plain["tensors"]);
    assert_eq!(j["result_fingerprint"], plain["result_fingerprint"]);
    assert_eq!(j["file_bytes"], signed_bytes.len());
}

#[test]
fn unsigned_file_with_trust_key_is_refused() {
    let d = scratch("sign_unsigned_refused");
    let keys = Keys::new(&d, "field.key");
    let delta = d.join("night.bdelta");
    compress("night", &delta, "auto");
    let err = refused(&["verify", p(&delta), "--trust-key", p(&keys.public)]);
    assert!(
        err.contains("night.bdelta") && err.contains("not a signed delta"),
        "{err}"
    );
    let out = ok(&["verify", p(&delta)]);
    assert!(
        out.contains("OK") && !out.contains("signed by key"),
        "{out}"
    );
}

#[test]
fn tampered_signed_files_are_refused() {
    let d = scratch("sign_tampered");
    let keys = Keys::new(&d, "field.key");
    let (_, signed) = signed_night(&d, &keys);
    let bytes = std::fs::read(&signed).unwrap();
    let pubkey = p(&keys.public);
    let last = bytes.len() - 1;
    // (offset, what the message must say)
    let cases = [
        (112, "bad signature"),             // first payload byte (the delta's magic)
        (112 + 70, "bad signature"),        // inside the delta's header
        (bytes.len() / 2, "bad signature"), // a tensor payload
        (last, "bad signature"),            // last payload byte
        (50, "bad signature"),              // the signature
        (104, "length mismatch"),           // the payload length
        (7, "unsupported signed-envelope version"),
        (0, "not a signed delta"),
    ];
    for (offset, says) in cases {
        let mut t = bytes.clone();
        t[offset] ^= 0x01;
        let f = d.join(format!("flip-{offset}.bdelta"));
        std::fs::write(&f, &t).unwrap();
        let err = refused(&["verify", p(&f), "--trust-key", pubkey]);
        assert!(
            err.contains(&format!("flip-{offset}.bdelta")) && err.contains(says),
            "{err}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&bitdelta(&["verify", p(&f), "--json", "--trust-key", pubkey]).1)
                .unwrap();
        assert_eq!(
            (j["ok"].clone(), j["signature_verified"].clone()),
            (false.into(), false.into())
        );
        assert!(j["error"].as_str().unwrap().contains(says), "{j}");
    }
    // A flipped key byte: another key (untrusted) or no key at all.
    let mut t = bytes.clone();
    t[8] ^= 0x01;
    let f = d.join("flip-key.bdelta");
    std::fs::write(&f, &t).unwrap();
    let err = refused(&["verify", p(&f), "--trust-key", pubkey]);
    assert!(
        err.contains("untrusted signer") || err.contains("bad key"),
        "{err}"
    );
    // Truncated and extended files.
    for (name, t) in [
        ("short.bdelta", &bytes[..bytes.len() - 1]),
        ("header-only.bdelta", &bytes[..100]),
        ("long.bdelta", &[&bytes[..], &[0]].concat()[..]),
    ] {
        let f = d.join(name);
        std::fs::write(&f, t).unwrap();
        let err = refused(&["verify", p(&f), "--trust-key", pubkey]);
        assert!(
            err.contains("length mismatch") || err.contains("truncated"),
            "{err}"
        );
        // Without a key the envelope structure is still checked.
        refused(&["verify", p(&f)]);
        let (code, _, err) = bitdelta(&["inspect", p(&f)]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn file_signed_by_another_key_is_refused_naming_it() {
    let d = scratch("sign_other_key");
    let trusted = Keys::new(&d, "trusted.key");
    let stranger = Keys::new(&d, "stranger.key");
    let (_, signed) = signed_night(&d, &stranger);
    let err = refused(&["verify", p(&signed), "--trust-key", p(&trusted.public)]);
    assert!(err.contains("untrusted signer"), "{err}");
    assert!(
        err.contains(&stranger.id()),
        "names the signer's key id: {err}"
    );
    // The stranger's key in the header with the trusted key's bytes swapped in is no better.
    let mut t = std::fs::read(&signed).unwrap();
    t[8..40].copy_from_slice(&trusted.public_bytes());
    let f = d.join("swapped-key.bdelta");
    std::fs::write(&f, &t).unwrap();
    let err = refused(&["verify", p(&f), "--trust-key", p(&trusted.public)]);
    assert!(err.contains("bad signature"), "{err}");
}

#[test]
fn sign_refuses_signed_files_non_deltas_and_wrong_keys() {
    let d = scratch("sign_refusals");
    let keys = Keys::new(&d, "field.key");
    let (delta, signed) = signed_night(&d, &keys);
    let out = d.join("out.bdelta");
    let cases: [(&Path, &Path, &str); 4] = [
        (&signed, &keys.secret, "already signed by key"),
        (&model("night"), &keys.secret, "not a bitdelta file"),
        (&delta, &keys.public, "expected a secret key file"),
        (&delta, &d.join("missing.key"), "cannot read"),
    ];
    for (file, key, says) in cases {
        let (code, _, err) = bitdelta(&["sign", p(file), "--key", p(key), "-o", p(&out)]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!out.exists(), "nothing written on refusal");
    }
    // The public key file given as a secret key: the message never shows key material.
    let (_, _, err) = bitdelta(&["sign", p(&delta), "--key", p(&keys.public), "-o", p(&out)]);
    assert!(
        err.contains("field.key.pub") && !err.contains(&keys.public_hex()),
        "{err}"
    );
    // A secret key given as a trusted key is an error (2), not a verification failure.
    let (code, _, err) = bitdelta(&["verify", p(&signed), "--trust-key", p(&keys.secret)]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("field.key: bad key: expected a public key file"),
        "{err}"
    );
    assert!(err.contains("found a secret key file"), "{err}");
    let secret = std::fs::read_to_string(&keys.secret).unwrap();
    assert!(!err.contains(&secret[24..40]), "secret material in {err}");
}

#[test]
fn keygen_refuses_to_overwrite() {
    let d = scratch("sign_keygen_overwrite");
    let keys = Keys::new(&d, "field.key");
    let before = (
        std::fs::read(&keys.secret).unwrap(),
        std::fs::read(&keys.public).unwrap(),
    );
    let (code, _, err) = bitdelta(&["keygen", "-o", p(&keys.secret)]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        (
            std::fs::read(&keys.secret).unwrap(),
            std::fs::read(&keys.public).unwrap()
        ),
        before
    );
    // A leftover public key alone is protected as well.
    std::fs::remove_file(&keys.secret).unwrap();
    let (code, _, err) = bitdelta(&["keygen", "-o", p(&keys.secret)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("field.key.pub"), "{err}");
    assert!(!keys.secret.exists());

    ok(&["keygen", "-o", p(&keys.secret), "--force"]);
    let after = (
        std::fs::read(&keys.secret).unwrap(),
        std::fs::read(&keys.public).unwrap(),
    );
    assert_ne!(after.0, before.0, "a new secret key");
    assert_ne!(after.1, before.1, "a new public key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys.secret)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "secret key mode {mode:o}");
    }
}

#[test]
fn keygen_and_sign_have_help_with_an_example() {
    for c in ["keygen", "sign"] {
        let out = ok(&[c, "--help"]);
        assert!(
            out.contains("Usage: bitdelta") && out.contains("Example: bitdelta"),
            "{c}: {out}"
        );
    }
    let out = ok(&["verify", "--help"]);
    assert!(out.contains("--trust-key"), "{out}");
}
