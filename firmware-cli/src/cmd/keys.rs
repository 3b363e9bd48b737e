//! `bitdelta keygen` and `bitdelta sign`, and reading key files for the other commands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use bitdelta::sign::{self, KeyKind, ENVELOPE_HEADER_LEN};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::files::{read_delta, write_atomic, Staged};

/// Generate an ed25519 key pair for signing deltas.
///
/// Writes the secret key to KEY, readable by its owner only (keep it on the signing
/// workstation, never on a device), and the public key to KEY.pub (give it to devices:
/// `bitdelta verify --trust-key KEY.pub`). Both are one line of text. Prints the key id, the first
/// 8 bytes of the public key in hex, as `verify` and `inspect` show it. Existing key files are
/// never replaced unless --force is given.
///
/// Example: bitdelta keygen -o field-2025.key
#[derive(clap::Args)]
pub(crate) struct KeygenArgs {
    /// Secret key file to write; the public key goes to the same path with `.pub` appended.
    #[arg(short, long, value_name = "KEY")]
    output: PathBuf,
    /// Replace existing key files (the old key is lost).
    #[arg(long)]
    force: bool,
}

/// Sign a delta with a secret key made by `bitdelta keygen`.
///
/// Checks that FILE is a valid unsigned delta (structure and every checksum), then writes it to
/// --output inside a signed envelope: a 112-byte header (magic, public key, signature, length)
/// followed by the delta unchanged (docs/FORMAT.md, "Signed envelope"). Devices check it with
/// `bitdelta verify --trust-key KEY.pub`. FILE is read into memory, never mapped.
///
/// Example: bitdelta sign night.bdelta --key field-2025.key -o night.signed.bdelta
#[derive(clap::Args)]
pub(crate) struct SignArgs {
    /// The delta to sign.
    file: PathBuf,
    /// Secret key file written by `bitdelta keygen`.
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Signed output file.
    #[arg(short, long, value_name = "SIGNED")]
    output: PathBuf,
}

pub(crate) fn keygen(a: KeygenArgs) -> Result<ExitCode> {
    let public_path = public_path(&a.output);
    if !a.force {
        for p in [&a.output, &public_path] {
            anyhow::ensure!(
                std::fs::symlink_metadata(p).is_err(),
                "{}: already exists (use --force to replace the key pair)",
                p.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| anyhow::anyhow!("cannot get random bytes from the operating system: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    wipe(&mut seed);
    let public = key.verifying_key();
    let mut secret = sign::secret_key_text(&key).into_bytes();
    let written = write_secret(&a.output, &secret);
    wipe(&mut secret);
    written?;
    write_atomic(&public_path, sign::public_key_text(&public).as_bytes())?;
    println!(
        "key id {}: secret key {} (keep it private), public key {}",
        sign::key_id(&public),
        a.output.display(),
        public_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn sign(a: SignArgs) -> Result<ExitCode> {
    let bytes = read_delta(&a.file)?;
    if sign::is_signed(&bytes) {
        let by = sign::open(&bytes)
            .map(|s| format!(" by key {}", s.key_id()))
            .unwrap_or_default();
        anyhow::bail!(
            "{}: already signed{by}: expected an unsigned delta",
            a.file.display()
        );
    }
    super::parse_checked(&a.file, &bytes)?;
    let key = read_secret_key(&a.key)?;
    let signed = sign::sign(&bytes, &key);
    write_atomic(&a.output, &signed)?;
    println!(
        "{}: signed with key {}: {} bytes ({} of delta, {} of envelope header)",
        a.output.display(),
        sign::key_id(&key.verifying_key()),
        signed.len(),
        bytes.len(),
        ENVELOPE_HEADER_LEN
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads a public key file (`KEY.pub`); errors name the file.
pub(crate) fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let mut text = read_key_text(path, KeyKind::Public)?;
    let key = sign::parse_public_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    wipe_string(&mut text);
    key
}

/// Reads a secret key file (`KEY`); errors name the file, never its content.
fn read_secret_key(path: &Path) -> Result<SigningKey> {
    let mut text = read_key_text(path, KeyKind::Secret)?;
    let key = sign::parse_secret_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    wipe_string(&mut text);
    #[cfg(unix)]
    if let (Ok(_), Ok(m)) = (&key, std::fs::metadata(path)) {
        use std::os::unix::fs::PermissionsExt;
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: {}: secret key readable by other users (mode {mode:o}); run chmod 600 on it",
                path.display()
            );
        }
    }
    key
}

/// A key file's text. Key files are one short line: anything large or binary is the wrong file.
fn read_key_text(path: &Path, kind: KeyKind) -> Result<String> {
    const MAX_KEY_FILE: u64 = 4096;
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .len();
    anyhow::ensure!(
        len <= MAX_KEY_FILE,
        "{}: expected a {kind} key file (one line of text), found {len} bytes",
        path.display()
    );
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let mut bytes = e.into_bytes();
        wipe(&mut bytes);
        anyhow::anyhow!(
            "{}: expected a {kind} key file (one line of text), found binary data",
            path.display()
        )
    })
}

/// `KEY` -> `KEY.pub`.
fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Writes the secret key file: a new temporary file created with mode 0600 (unix), fsync,
/// rename over `path`, fsync of the directory.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = Staged::create_private(path)?;
    out.file()
        .write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    out.commit()
}

/// Overwrites a buffer that held key material (best effort: the optimiser must not drop it).
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

fn wipe_string(s: &mut String) {
    let mut bytes = std::mem::take(s).into_bytes();
    wipe(&mut bytes);
}
