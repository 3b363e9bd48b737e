//! One module per subcommand: each parses its arguments, calls the library and prints.
//!
//! May depend on: the `bitdelta` library (every rule about deltas, models, cards, the store and
//! devices lives there), the CLI's own helpers (`crate::card` for which card a command uses,
//! `crate::files` for files and memory maps, `crate::data` for evaluation sets, `crate::synth`
//! for generated demo models), `anyhow`, `clap`, `indicatif`, `serde`/`serde_json`, `csv` and
//! `humantime` (for output), `std`. Nothing in the library depends on it; `checkpoint` and
//! `classify` are helpers shared by several subcommands.

pub(crate) mod apply;
pub(crate) mod bench;
pub(crate) mod board;
pub(crate) mod bundle;
pub(crate) mod checkpoint;
pub(crate) mod classify;
pub(crate) mod compress;
pub(crate) mod demo;
pub(crate) mod eval;
pub(crate) mod info;
pub(crate) mod inspect;
pub(crate) mod keys;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod store;
pub(crate) mod verify;

use std::path::Path;

use anyhow::{Context, Result};
use bitdelta::{DeltaFile, FormatError};

/// A format error with tensor indices replaced by names where the table is readable.
pub(crate) fn describe(err: &FormatError, file: Option<&DeltaFile<'_>>) -> String {
    let index = err.tensor_index();
    match (index, file) {
        (Some(i), Some(f)) => match f.tensor(i as usize) {
            Some(e) => format!("{err} (tensor {:?})", e.name),
            None => err.to_string(),
        },
        _ => err.to_string(),
    }
}

/// Parses a delta and checks every payload; errors name the file and the tensor.
pub(crate) fn parse_checked<'a>(path: &Path, bytes: &'a [u8]) -> Result<DeltaFile<'a>> {
    let file = DeltaFile::parse(bytes)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), describe(&e, None)))?;
    file.verify_payloads()
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), describe(&e, Some(&file))))?;
    Ok(file)
}

/// Writes JSON to stdout with a trailing newline.
pub(crate) fn print_json(v: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).context("writing JSON")?;
    writeln!(out).context("writing JSON")?;
    Ok(())
}
