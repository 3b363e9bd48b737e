//! The variant store: `store init`, `install`, `activate`, `rollback`, `remove`, `list`, `status`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bitdelta::card::ModelCard;
use bitdelta::store::{
    Checked, InstallOutcome, Resolved, SelfTest, Slot, Store, StoreError, StoreIo,
};
use bitdelta::tract::BASE;
use serde_json::{json, Value};

use super::classify::Session;

/// Where the model comes from, for commands that run one: `--base FILE`, or a store.
#[derive(clap::Args, Clone)]
pub(crate) struct BaseOrStore {
    /// The base model (or use --store).
    #[arg(long, conflicts_with = "store")]
    pub(crate) base: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) store: StoreDir,
}

/// The store folder: `--store DIR`, else the `BITDELTA_STORE` environment variable.
#[derive(clap::Args, Clone)]
pub(crate) struct StoreDir {
    /// The store folder on the device's own storage (default: $BITDELTA_STORE).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

impl StoreDir {
    pub(crate) fn path(&self) -> Result<PathBuf> {
        match &self.store {
            Some(p) => Ok(p.clone()),
            None => match std::env::var_os("BITDELTA_STORE") {
                Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
                _ => bail!("no store: pass --store DIR or set BITDELTA_STORE"),
            },
        }
    }
    pub(crate) fn open(&self) -> Result<Store> {
        Ok(Store::open(&self.path()?)?)
    }
}

/// Manage a variant store (a folder on the device holding the base model and installed deltas).
#[derive(clap::Args)]
pub(crate) struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(clap::Subcommand)]
enum StoreCommand {
    Init(InitArgs),
}

/// Create a store: copy the base model (and its model card) in and record trusted keys.
///
/// The base is copied, fingerprinted and read back; deltas installed later must bind to it. With
/// --trust-key, only deltas signed by one of the keys install (see `bitdelta keygen`, `sign`).
/// The card defaults to model-card.json next to the base; golden images it lists are copied too.
///
/// Example: bitdelta store init --store /var/lib/bitdelta --base species-base.onnx --trust-key ranger.pub
#[derive(clap::Args)]
struct InitArgs {
    #[command(flatten)]
    store: StoreDir,
    /// The base model every delta applies to.
    #[arg(long)]
    base: PathBuf,
    /// Model card (labels, preprocessing, golden inputs); default: model-card.json next to the base.
    #[arg(long)]
    card: Option<PathBuf>,
    /// A trusted public key (`KEY.pub` from `bitdelta keygen`); repeatable.
    #[arg(long, value_name = "KEY.pub")]
    trust_key: Vec<PathBuf>,
}

/// Install deltas (e.g. from an SD card) into the store.
///
/// Each file is read once into memory (never mapped: the card may be pulled), then checked: the
/// signature when the store trusts keys (before anything else is parsed), structure, checksums,
/// binding to the store's base, the rebuilt weights' fingerprint, and that its sequence number
/// is above every one installed for that variant. Only then is it written (temp file, fsync,
/// rename, folder fsync) and read back. A file that fails changes nothing and says why.
/// Exit codes: 0 all installed, 1 a file was refused, 2 error.
///
/// Example: bitdelta install /media/sd/night.bdelta --store /var/lib/bitdelta --activate
#[derive(clap::Args)]
pub(crate) struct InstallArgs {
    /// Delta files (plain or signed).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    store: StoreDir,
    /// Activate the (last) installed variant after its self-test.
    #[arg(long)]
    activate: bool,
    /// Who asks, recorded in the journal (e.g. `mender artifact NAME`; `status` shows the last
    /// operation Mender asked for).
    #[arg(long, value_name = "WHO")]
    origin: Option<String>,
}

/// Activate an installed variant (or `base`): trial-load, self-test, then switch atomically.
///
/// The variant is built in memory as a running service would, its rebuilt weights are checked
/// against the fingerprint the producer recorded, and it must give finite outputs and pass the
/// model card's golden inputs. Only then does the active pointer move (one atomic rename); on
/// failure the active variant stays. A running `serve --store` picks the change up.
/// Exit codes: 0 activated, 1 self-test failed, 2 error.
///
/// Example: bitdelta activate night --store /var/lib/bitdelta
#[derive(clap::Args)]
pub(crate) struct ActivateArgs {
    /// Variant name, or `base`.
    name: String,
    #[command(flatten)]
    store: StoreDir,
    /// Who asks, recorded in the journal (e.g. `mender artifact NAME`; `status` shows the last
    /// operation Mender asked for).
    #[arg(long, value_name = "WHO")]
    origin: Option<String>,
}

/// Go back to the variant that was active before (the base when there is none).
///
/// The previous variant is re-verified and self-tested first, like `activate`.
#[derive(clap::Args)]
pub(crate) struct RollbackArgs {
    #[command(flatten)]
    store: StoreDir,
    /// Who asks, recorded in the journal (e.g. `mender artifact NAME`; `status` shows the last
    /// operation Mender asked for).
    #[arg(long, value_name = "WHO")]
    origin: Option<String>,
}

/// Remove an installed variant (every stored file of it). The active variant cannot be removed.
#[derive(clap::Args)]
pub(crate) struct RemoveArgs {
    /// Variant name.
    name: String,
    #[command(flatten)]
    store: StoreDir,
}

/// List installed variants with sequence, fingerprint, signer and whether they still verify.
#[derive(clap::Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    store: StoreDir,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// Show the store: base, active and previous variant, what actually runs, installed variants,
/// trusted keys and the last operation's result.
///
/// Everything is re-verified from storage: a corrupt active variant shows up here, with the
/// variant that runs instead. Exit code 0 when the store can run a model, 1 when the base is
/// corrupt, 2 on error.
#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    store: StoreDir,
    /// JSON output (`active`, `previous`, `running`, `problems`, `installed`, `last_result`,
    /// `mender` (the last install and operation its Update Module asked for), ...).
    #[arg(long)]
    json: bool,
}

/// Maps a store error to an exit code: refusals are 1, the rest 2.
fn fail(e: StoreError) -> Result<ExitCode> {
    eprintln!("error: {e}");
    Ok(ExitCode::from(if e.is_refusal() { 1 } else { 2 }))
}

pub(crate) fn store(a: StoreArgs) -> Result<ExitCode> {
    match a.command {
        StoreCommand::Init(a) => init(a),
    }
}

fn init(a: InitArgs) -> Result<ExitCode> {
    let dir = a.store.path()?;
    let card = match a.card {
        Some(c) => Some(c),
        None => Some(crate::card::card_path(&a.base, None)).filter(|p| p.exists()),
    };
    let mut extras = Vec::new();
    if let Some(c) = &card {
        let parsed = ModelCard::load(c)?;
        let base = crate::files::Model::open(&a.base)?;
        parsed.check_model(base.bytes(), c, &a.base)?;
        let folder = c.parent().unwrap_or(Path::new("."));
        for g in &parsed.golden {
            let src = folder.join(&g.image);
            anyhow::ensure!(
                src.is_file(),
                "{}: golden input {} not found",
                c.display(),
                src.display()
            );
            extras.push((src, g.image.clone()));
        }
    }
    let mut keys = Vec::new();
    for k in &a.trust_key {
        let text =
            std::fs::read_to_string(k).with_context(|| format!("{}: cannot read", k.display()))?;
        keys.push(
            bitdelta::sign::parse_public_key(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?,
        );
    }
    let s = match Store::init(
        &dir,
        &a.base,
        card.as_deref(),
        &extras,
        &keys,
        StoreIo::new(),
    ) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    println!(
        "{}: store created; base {} (fingerprint {}), card {}, {} trusted key(s)",
        dir.display(),
        a.base.display(),
        &s.config().base.fingerprint[..16],
        card.map(|c| c.display().to_string())
            .unwrap_or_else(|| "none".into()),
        keys.len()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn install(a: InstallArgs) -> Result<ExitCode> {
    let mut s = a.store.open()?;
    s.set_origin(a.origin);
    let mut last = None;
    let mut worst = 0u8;
    for f in &a.files {
        match s.install(f) {
            Ok(o) => {
                let slot = o.slot().clone();
                match o {
                    InstallOutcome::Installed(_) => println!(
                        "{}: installed variant {:?} sequence {} (fingerprint {})",
                        f.display(),
                        slot.name,
                        slot.sequence,
                        &slot.fingerprint[..16]
                    ),
                    InstallOutcome::AlreadyInstalled(_) => println!(
                        "{}: variant {:?} sequence {} was already installed",
                        f.display(),
                        slot.name,
                        slot.sequence
                    ),
                }
                last = Some(slot);
            }
            Err(e) => {
                eprintln!("error: {e}");
                worst = worst.max(if e.is_refusal() { 1 } else { 2 });
            }
        }
    }
    if a.activate {
        if let Some(slot) = last {
            let code = activate_in(&mut s, &slot.name)?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
        }
    }
    Ok(ExitCode::from(worst))
}

pub(crate) fn activate(a: ActivateArgs) -> Result<ExitCode> {
    let mut s = a.store.open()?;
    s.set_origin(a.origin);
    activate_in(&mut s, &a.name)
}

fn activate_in(s: &mut Store, name: &str) -> Result<ExitCode> {
    let (card, base) = (card_of(s)?, s.base_path());
    report_active(s.activate(name, |c| self_test(&base, &card, c)))
}

pub(crate) fn rollback(a: RollbackArgs) -> Result<ExitCode> {
    let mut s = a.store.open()?;
    s.set_origin(a.origin);
    let (card, base) = (card_of(&s)?, s.base_path());
    report_active(s.rollback(|c| self_test(&base, &card, c)))
}

/// Prints what is active after `activate` or `rollback`, or the error.
fn report_active(res: Result<Option<Slot>, StoreError>) -> Result<ExitCode> {
    match res {
        Ok(slot) => {
            println!("active: {}", describe(slot.as_ref()));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => fail(e),
    }
}

pub(crate) fn remove(a: RemoveArgs) -> Result<ExitCode> {
    let mut s = a.store.open()?;
    match s.remove(&a.name) {
        Ok(n) => {
            println!("removed variant {:?} ({n} file(s))", a.name);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => fail(e),
    }
}

fn describe(slot: Option<&Slot>) -> String {
    match slot {
        Some(s) => format!(
            "{} sequence {} (fingerprint {})",
            s.name,
            s.sequence,
            &s.fingerprint[..16.min(s.fingerprint.len())]
        ),
        None => "base".into(),
    }
}

fn slot_json(s: Option<&Slot>) -> Value {
    match s {
        Some(s) => json!({"name": s.name, "sequence": s.sequence, "fingerprint": s.fingerprint}),
        None => Value::Null,
    }
}

fn installed_json(s: &Store) -> Result<Vec<Value>> {
    let st = s.state();
    let is = |slot: &Option<Slot>, name: &str, seq: u64| {
        slot.as_ref()
            .is_some_and(|x| x.name == name && x.sequence == seq)
    };
    Ok(s.installed()?
        .into_iter()
        .map(|i| {
            let (ok, problem, fp, signer) = match &i.check {
                Ok(c) => (
                    true,
                    None,
                    Some(bitdelta::fingerprint::hex(&c.fingerprint)),
                    c.signed_by.clone(),
                ),
                Err(e) => (false, Some(e.clone()), None, None),
            };
            json!({
                "name": i.name, "sequence": i.sequence, "bytes": i.bytes, "fingerprint": fp,
                "signed_by": signer, "ok": ok, "problem": problem,
                "active": is(&st.active, &i.name, i.sequence),
                "previous": is(&st.previous, &i.name, i.sequence),
                "path": i.path,
            })
        })
        .collect())
}

pub(crate) fn list(a: ListArgs) -> Result<ExitCode> {
    let s = a.store.open()?;
    let rows = installed_json(&s)?;
    if a.json {
        super::print_json(&json!({"store": s.dir(), "installed": rows}))?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no variants installed in {}", s.dir().display());
    }
    for r in rows {
        let mark = if r["active"] == true {
            "*"
        } else if r["previous"] == true {
            "-"
        } else {
            " "
        };
        let state = match r["problem"].as_str() {
            Some(p) => format!("CORRUPT: {p}"),
            None => format!(
                "{}{}",
                &r["fingerprint"].as_str().unwrap_or("")[..16],
                r["signed_by"]
                    .as_str()
                    .map(|k| format!("  signed by {k}"))
                    .unwrap_or_default()
            ),
        };
        println!(
            "{mark} {:<20} seq {:<6} {:>9} B  {state}",
            r["name"].as_str().unwrap_or(""),
            r["sequence"],
            r["bytes"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn status(a: StatusArgs) -> Result<ExitCode> {
    let s = a.store.open()?;
    let base = s.read_base().map(drop);
    let resolved = s.resolve();
    let mut problems = resolved.problems.clone();
    if let Err(e) = &base {
        problems.insert(0, e.to_string());
    }
    let last = s.journal(1).pop();
    let keys: Vec<String> = s
        .trusted_keys()
        .iter()
        .map(bitdelta::sign::key_id)
        .collect();
    let v = json!({
        "store": s.dir(),
        "base": {"file": s.base_path(), "fingerprint": s.config().base.fingerprint, "ok": base.is_ok()},
        "card": s.card_path(),
        "active": slot_json(s.state().active.as_ref()),
        "previous": slot_json(s.state().previous.as_ref()),
        "running": if base.is_ok() { json!(resolved.running()) } else { Value::Null },
        "problems": problems,
        "installed": installed_json(&s)?,
        "trusted_keys": keys,
        "last_result": last,
        // What Mender's Update Module last did (boards/mender/bitdelta passes --origin).
        "mender": {
            "installed": s.last_from("mender", Some("install")),
            "last": s.last_from("mender", None),
        },
    });
    if a.json {
        super::print_json(&v)?;
    } else {
        println!("store:    {}", s.dir().display());
        println!(
            "base:     {} ({}{})",
            s.base_path().display(),
            &s.config().base.fingerprint[..16],
            if base.is_ok() { "" } else { ", CORRUPT" }
        );
        println!("active:   {}", describe(s.state().active.as_ref()));
        println!("previous: {}", describe(s.state().previous.as_ref()));
        println!("running:  {}", v["running"].as_str().unwrap_or("nothing"));
        for p in &problems {
            println!("problem:  {p}");
        }
        let n = v["installed"].as_array().map_or(0, Vec::len);
        println!("installed: {n} file(s) (see `bitdelta list`)");
        if !keys.is_empty() {
            println!("trusted keys: {}", keys.join(", "));
        }
        for (what, key) in [("mender installed", "installed"), ("mender last", "last")] {
            if let Some(o) = v["mender"][key].as_object() {
                println!(
                    "{what}: {} {}: {} ({})",
                    o["action"].as_str().unwrap_or(""),
                    if o["ok"] == true { "ok" } else { "FAILED" },
                    o["message"].as_str().unwrap_or(""),
                    o["origin"].as_str().unwrap_or("")
                );
            }
        }
        if let Some(l) = last {
            println!(
                "last result: {} {}: {}",
                l.action,
                if l.ok { "ok" } else { "FAILED" },
                l.message
            );
        }
    }
    Ok(if base.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The store's model card (required: the self-test and classification need labels).
pub(crate) fn card_of(s: &Store) -> Result<PathBuf> {
    s.card_path().with_context(|| {
        format!(
            "{}: the store has no model card (re-create it with `store init --card`)",
            s.dir().display()
        )
    })
}

/// The library's activation self-test ([`SelfTest`]) of `candidate` (None = the base), with the
/// base memory-mapped as `serve` maps it.
fn self_test(base: &Path, card_path: &Path, candidate: Option<&Checked>) -> Result<(), String> {
    let map = crate::files::Model::open(base)
        .map_err(|e| format!("{e:#}"))?
        .map;
    SelfTest::new(base, card_path)
        .check_with(Box::new(map), candidate)
        .map_err(|e| e.to_string())
}

/// Logs what [`Store::resolve`] had to skip (a corrupt active variant, ...) on stderr.
pub(crate) fn warn_problems(dir: &Path, resolved: &Resolved) {
    for p in &resolved.problems {
        eprintln!("warning: {}: {p}", dir.display());
    }
}

/// Opens a session on the store's base and what [`Store::resolve`] says should run, logging
/// what it had to skip.
pub(crate) fn open_session(s: &Store, card: Option<&Path>) -> Result<(Session, Resolved)> {
    let card = match card {
        Some(c) => c.to_owned(),
        None => card_of(s)?,
    };
    let mut session = Session::open(&s.base_path(), Some(&card))?;
    let found = session.engine.base_fingerprint();
    anyhow::ensure!(
        *found == s.base_fingerprint(),
        "{}: the store's base model is corrupt: expected fingerprint {}, found {}",
        s.base_path().display(),
        &s.config().base.fingerprint[..16],
        bitdelta::fingerprint::short_hex(found, 8)
    );
    let resolved = s.resolve();
    warn_problems(s.dir(), &resolved);
    let name = match &resolved.variant {
        Some((slot, c)) => {
            session.add_variant_bytes(&slot.name, c.delta().to_vec())?;
            slot.name.clone()
        }
        None => BASE.to_string(),
    };
    session.engine.switch(&name)?;
    Ok((session, resolved))
}
