//! `bitdelta serve`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::classify::{Csv, Session};

/// Serve classifications as JSON Lines on stdin/stdout, switching variants per request.
///
/// Each input line is a request `{"image": PATH, "variant": NAME}` (`"base"` = the base model;
/// no variant = the current one, or the first --rule that matches the image). Each answer line
/// has `image`, `variant`, `fingerprint`, `label`, `top` (label + p), `switched`, `switch_ms`,
/// `infer_ms`, and the image's `brightness` and `contrast` (for tuning rules); after a switch,
/// `switch` says how it was made (`in-place`, or `rebuild` for the first load and the fallback). A malformed request gets `{"error": ...}` and the loop goes on; exits 0 at EOF.
/// Only one model is held in memory: a switch drops the running one before building the next.
///
/// With --store (or $BITDELTA_STORE and no --base), every installed variant can be named, and
/// requests that name none (and match no rule) use the store's active variant. A new
/// activation (`bitdelta activate`, `install --activate`, `rollback`) is picked up before the
/// next request, without a restart; a corrupt active variant falls back to the previous one or
/// the base, with a warning on stderr.
///
/// Example: bitdelta serve --base species-base.onnx --variant night=night.bdelta --variant fog=fog.bdelta
///   --rule fog:brightness>0.5 --rule night:contrast<0.16
///          bitdelta serve --store /var/lib/bitdelta
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    model: super::store::BaseOrStore,
    /// A variant NAME=DELTA[@ALPHA][+DELTA[@ALPHA]...] (a '+' list is a soup).
    #[arg(long, value_name = "NAME=DELTA")]
    variant: Vec<String>,
    /// Model card (labels, preprocessing).
    #[arg(long)]
    card: Option<PathBuf>,
    /// Choose a variant from image statistics when a request names none, e.g.
    /// `night:brightness<0.25` or `fog:contrast<0.1` (brightness, contrast in [0, 1]). First match wins.
    #[arg(long, value_name = "NAME:STAT<VALUE")]
    rule: Vec<String>,
    /// Variant when no rule matches (default: keep the current one).
    #[arg(long)]
    default_variant: Option<String>,
    /// How many species to list per answer.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Append detections to this CSV (Camtrap DP-friendly columns).
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// A per-frame rule: use `variant` when `stat` compares to `value`.
pub(crate) struct Rule {
    variant: String,
    stat: Stat,
    less: bool,
    value: f64,
}

#[derive(Clone, Copy)]
enum Stat {
    Brightness,
    Contrast,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stat = match self.stat {
            Stat::Brightness => "brightness",
            Stat::Contrast => "contrast",
        };
        let op = if self.less { '<' } else { '>' };
        write!(f, "{}:{stat}{op}{}", self.variant, self.value)
    }
}

impl Rule {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        let bad = || {
            format!("--rule {s:?}: expected NAME:STAT<VALUE or NAME:STAT>VALUE (STAT: brightness, contrast)")
        };
        let (variant, cond) = s.split_once(':').with_context(bad)?;
        let (less, (stat, value)) = match (cond.split_once('<'), cond.split_once('>')) {
            (Some(p), None) => (true, p),
            (None, Some(p)) => (false, p),
            _ => bail!(bad()),
        };
        let stat = match stat.trim() {
            "brightness" => Stat::Brightness,
            "contrast" => Stat::Contrast,
            _ => bail!(bad()),
        };
        let value: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .with_context(bad)?;
        Ok(Self {
            variant: variant.to_owned(),
            stat,
            less,
            value,
        })
    }

    /// The variant this rule selects.
    pub(crate) fn variant(&self) -> &str {
        &self.variant
    }

    pub(crate) fn matches(&self, brightness: f64, contrast: f64) -> bool {
        let x = match self.stat {
            Stat::Brightness => brightness,
            Stat::Contrast => contrast,
        };
        if self.less {
            x < self.value
        } else {
            x > self.value
        }
    }
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let mut watch = None;
    let mut s = match &a.model.base {
        Some(base) => Session::open(base, a.card.as_deref())?,
        None => {
            anyhow::ensure!(
                a.variant.is_empty(),
                "--variant: not with a store (installed variants are served by name)"
            );
            let (s, w) = StoreWatch::open(&a.model.store, a.card.as_deref())?;
            watch = Some(w);
            s
        }
    };
    for v in &a.variant {
        let (name, specs) = v
            .split_once('=')
            .with_context(|| format!("--variant {v:?}: expected NAME=DELTA"))?;
        anyhow::ensure!(
            bitdelta::format::is_valid_variant_name(name),
            "--variant {v:?}: bad name {name:?}"
        );
        let specs: Vec<String> = specs.split('+').map(str::to_owned).collect();
        s.add_variant(name, &specs)?;
    }
    let rules = a
        .rule
        .iter()
        .map(|r| Rule::parse(r))
        .collect::<Result<Vec<_>>>()?;
    if watch.is_none() {
        for r in &rules {
            anyhow::ensure!(
                r.variant == bitdelta::tract::BASE || s.engine.variants().any(|v| v == r.variant),
                "--rule: unknown variant {:?}",
                r.variant
            );
        }
        let start = a
            .default_variant
            .clone()
            .unwrap_or_else(|| bitdelta::tract::BASE.to_owned());
        s.engine.switch(&start)?;
    }
    let mut csv = a.csv.as_deref().map(Csv::open).transpose()?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let mut reloaded = false;
        if let Some(w) = watch.as_mut() {
            match w.refresh(&mut s) {
                Ok(r) => reloaded = r,
                Err(e) => eprintln!("warning: {}: reloading the store: {e:#}", w.dir.display()),
            }
        }
        let default = match &watch {
            Some(w) => a.default_variant.as_deref().or(Some(w.running.as_str())),
            None => a.default_variant.as_deref(),
        };
        let reply = match handle(&mut s, &rules, default, &line, a.top, csv.as_mut()) {
            Ok(mut v) => {
                if reloaded {
                    v["switched"] = json!(true);
                }
                v
            }
            Err(e) => json!({"error": format!("{e:#}"), "line": n + 1}),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows a store: its installed variants are registered by name, and the active one is the
/// default. `state.json` and the variants folder are checked before each request.
struct StoreWatch {
    dir: PathBuf,
    stamp: Option<Stamp>,
    /// What the store says should run (the active variant, or a fallback).
    running: String,
}

type Stamp = Vec<(std::time::SystemTime, u64, u64)>;

impl StoreWatch {
    fn open(
        dir: &super::store::StoreDir,
        card: Option<&std::path::Path>,
    ) -> Result<(Session, Self)> {
        let store = dir.open()?;
        let (mut s, resolved) = super::store::open_session(&store, card)?;
        let mut w = Self {
            dir: store.dir().to_owned(),
            stamp: stamp(store.dir()),
            running: resolved.running().to_owned(),
        };
        w.register(&store, &mut s);
        Ok((s, w))
    }

    /// Registers every installed variant that verifies (newest sequence per name).
    fn register(&mut self, store: &bitdelta::store::Store, s: &mut Session) {
        let running = s.engine.active().0.to_owned();
        let names: Vec<String> = s.engine.variants().map(str::to_owned).collect();
        for n in names {
            if n != running {
                s.engine.remove_variant(&n);
            }
        }
        let Ok(installed) = store.installed() else {
            return;
        };
        let mut newest: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        for i in installed {
            match i.check {
                Ok(c) => {
                    newest.insert(i.name, c.delta().to_vec());
                }
                Err(e) => eprintln!("warning: {}: {e}", self.dir.display()),
            }
        }
        for (name, bytes) in newest {
            if name == running && s.engine.variants().any(|v| v == name) {
                continue;
            }
            if let Err(e) = s.add_variant_bytes(&name, bytes) {
                eprintln!("warning: {}: {e:#}", self.dir.display());
            }
        }
    }

    /// Re-reads the store when it changed; returns whether the running model changed.
    fn refresh(&mut self, s: &mut Session) -> Result<bool> {
        let now = stamp(&self.dir);
        if now == self.stamp {
            return Ok(false);
        }
        self.stamp = now;
        let store = bitdelta::store::Store::open(&self.dir)?;
        let resolved = store.resolve();
        super::store::warn_problems(&self.dir, &resolved);
        let before = s.engine.active().0.to_owned();
        // Drop the running model's registration when it is replaced, so the new files load.
        let target = resolved.running().to_owned();
        if let Some((slot, c)) = &resolved.variant {
            let fp = bitdelta::fingerprint::hex(s.engine.active().1);
            if !(before == slot.name && fp == slot.fingerprint) {
                s.engine.switch(bitdelta::tract::BASE)?;
                s.engine.remove_variant(&slot.name);
                s.add_variant_bytes(&slot.name, c.delta().to_vec())?;
            }
        }
        self.register(&store, s);
        s.engine.switch(&target)?;
        self.running = target;
        Ok(s.engine.active().0 != before)
    }
}

/// Modification times, lengths and inodes of `state.json` and the variants folder.
fn stamp(dir: &std::path::Path) -> Option<Stamp> {
    use bitdelta::store::{STATE_FILE, VARIANTS_DIR};
    use std::os::unix::fs::MetadataExt;
    [dir.join(STATE_FILE), dir.join(VARIANTS_DIR)]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

fn handle(
    s: &mut Session,
    rules: &[Rule],
    default: Option<&str>,
    line: &str,
    top: usize,
    csv: Option<&mut Csv>,
) -> Result<Value> {
    let req: Value = serde_json::from_str(line).context("request is not JSON")?;
    let path = req
        .get("image")
        .and_then(Value::as_str)
        .context("request has no \"image\" string")?;
    let path = PathBuf::from(path);
    let frame = crate::card::frame(&path, &s.card)?;
    let (brightness, contrast) = frame.stats();
    let wanted = match req.get("variant") {
        Some(Value::String(v)) => Some(v.clone()),
        Some(Value::Null) | None => rules
            .iter()
            .find(|r| r.matches(brightness, contrast))
            .map(|r| r.variant.clone())
            .or(default.map(str::to_owned)),
        Some(_) => bail!("\"variant\" must be a string"),
    };
    let t = Instant::now();
    let switched = match &wanted {
        Some(v) => s.engine.switch(v)?,
        None => false,
    };
    let switch_ms = t.elapsed().as_secs_f64() * 1e3;
    let ans = s.classify(&path, &frame, top)?;
    if let Some(c) = csv {
        c.record(&ans)?;
    }
    let mut v = ans.json();
    v["switched"] = json!(switched);
    v["switch_ms"] = json!(if switched { switch_ms } else { 0.0 });
    if switched {
        // "in-place" (weights rewritten in the running model) or "rebuild".
        v["switch"] = json!(s.engine.last_switch().map(|k| k.name()));
        if let Some(why) = s.engine.fallback_reason() {
            eprintln!("note: switch to {} rebuilt the model: {why}", v["variant"]);
        }
    }
    v["brightness"] = json!(brightness);
    v["contrast"] = json!(contrast);
    Ok(v)
}
