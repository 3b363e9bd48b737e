//! `bitdelta serve`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::classify::{image, stats, Csv, Session};

/// Serve classifications as JSON Lines on stdin/stdout, switching variants per request.
///
/// Each input line is a request `{"image": PATH, "variant": NAME}` (`"base"` = the base model;
/// no variant = the current one, or the first --rule that matches the image). Each answer line
/// has `image`, `variant`, `fingerprint`, `label`, `top` (label + p), `switched`, `switch_ms`,
/// `infer_ms`, and the image's `brightness` and `contrast` (for tuning rules). A malformed request gets `{"error": ...}` and the loop goes on; exits 0 at EOF.
/// Only one model is held in memory: a switch drops the running one before building the next.
///
/// Example: bitdelta serve --base species-base.onnx --variant night=night.bdelta --variant fog=fog.bdelta
///   --rule fog:brightness>0.5 --rule night:contrast<0.16
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The base model.
    #[arg(long)]
    base: PathBuf,
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
    let mut s = Session::open(&a.base, a.card.as_deref())?;
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
    let mut csv = a.csv.as_deref().map(Csv::open).transpose()?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match handle(
            &mut s,
            &rules,
            a.default_variant.as_deref(),
            &line,
            a.top,
            csv.as_mut(),
        ) {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}"), "line": n + 1}),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
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
    let gray = image(&path, &s.card)?;
    let (brightness, contrast) = stats(&gray);
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
    let ans = s.classify(&path, &gray, top)?;
    if let Some(c) = csv {
        c.record(&ans)?;
    }
    let mut v = ans.json();
    v["switched"] = json!(switched);
    v["switch_ms"] = json!(if switched { switch_ms } else { 0.0 });
    v["brightness"] = json!(brightness);
    v["contrast"] = json!(contrast);
    Ok(v)
}
