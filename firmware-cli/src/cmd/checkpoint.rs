//! `compress` and `apply` on safetensors checkpoints.
//!
//! `bitdelta compress` and `bitdelta apply` hand over here when the base is a safetensors file
//! (by extension, or by its header when the extension says nothing). Both stream one tensor at a
//! time through [`bitdelta::checkpoint`], so a checkpoint larger than memory compresses and
//! rebuilds in a small fraction of its size; outputs are written to a temporary file next to the
//! target, synced and renamed only once every check passed.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bitdelta::checkpoint::{apply_checkpoint, compress_checkpoint, verify_delta, Checkpoint};

use crate::files::{hex, Staged};

/// Buffered writes of the outputs.
const WRITE_BUF: usize = 1 << 20;

/// True when `path` names a safetensors file: a `.safetensors` extension, or a header that reads
/// as one (a little-endian u64 length that fits the file, then `{`).
pub(crate) fn is_safetensors(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return true;
    }
    let mut head = [0u8; 9];
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    f.read_exact(&mut head).is_ok() && head[8] == b'{' && {
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        n >= 2 && n <= len - 8
    }
}

fn byte_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
        ))
        .expect("static template"),
    );
    bar
}

/// `bitdelta compress` with a safetensors base.
pub(crate) fn compress(a: &super::compress::Args) -> Result<ExitCode> {
    anyhow::ensure!(
        a.calib.is_none(),
        "{}: --calib runs the model on images, which needs ONNX models; a safetensors \
         checkpoint takes --codec auto, seed or budget (--max-bits)",
        a.base.display()
    );
    let base = Checkpoint::open(&a.base)?;
    let fine = Checkpoint::open(&a.fine)?;
    let name = a.variant_name()?;
    let opts = a.options(&name)?;
    let mut out = Staged::create(&a.output)?;
    let bar = byte_bar(base.weight_bytes(), "compress");
    let mut w = BufWriter::with_capacity(WRITE_BUF, out.file());
    let summary = compress_checkpoint(&base, &fine, &opts, &mut w, |done, _| {
        bar.set_position(done);
    })
    .with_context(|| a.doing())?;
    w.flush()
        .with_context(|| format!("{}: cannot write", a.output.display()))?;
    drop(w);
    bar.finish_and_clear();
    // Read the file back as a device would, front to back, before it replaces anything.
    let file = out.file();
    file.seek(SeekFrom::Start(0))
        .with_context(|| format!("{}: cannot read back", a.output.display()))?;
    verify_delta(file)
        .with_context(|| format!("{}: written delta does not read back", a.output.display()))?;
    out.commit()?;
    super::compress::print_written(
        &a.output,
        summary.tensors as usize,
        summary.params,
        summary.file_len,
    );
    Ok(ExitCode::SUCCESS)
}

/// `bitdelta apply` with a safetensors base: one delta at alpha 1.
pub(crate) fn apply(a: &super::apply::Args) -> Result<ExitCode> {
    let base = Checkpoint::open(&a.base)?;
    let [spec] = a.deltas.as_slice() else {
        anyhow::bail!(
            "{}: a safetensors base takes exactly one delta (composition is for ONNX bases)",
            a.base.display()
        );
    };
    let (path, alpha) = super::apply::parse_delta_arg(spec)?;
    anyhow::ensure!(
        alpha == 1.0,
        "{spec}: a safetensors base takes its delta at alpha 1 (composition is for ONNX bases)"
    );
    let mut delta =
        File::open(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = Staged::create(&a.output)?;
    let bar = byte_bar(base.weight_bytes() * 2, "apply");
    let mut w = BufWriter::with_capacity(WRITE_BUF, out.file());
    let fp = apply_checkpoint(&base, &mut delta, &mut w, |done, _| {
        bar.set_position(done);
    })
    .map_err(|e| anyhow::anyhow!("{}: {e} (base {})", path.display(), base.path().display()))?;
    w.flush()
        .with_context(|| format!("{}: cannot write", a.output.display()))?;
    drop(w);
    bar.finish_and_clear();
    out.commit()?;
    println!(
        "{}: {} bytes, weights fingerprint {}",
        a.output.display(),
        base.len(),
        hex(&fp)
    );
    Ok(ExitCode::SUCCESS)
}
