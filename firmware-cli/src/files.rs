//! Reading models and deltas, writing outputs atomically.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bitdelta::onnx::OnnxWeights;
use memmap2::Mmap;

/// A memory-mapped ONNX model with its float initializers indexed.
pub(crate) struct Model {
    pub(crate) path: PathBuf,
    pub(crate) map: Mmap,
    pub(crate) weights: OnnxWeights,
}

impl Model {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let map = map_readonly(&file).with_context(|| format!("{}: cannot map", path.display()))?;
        let weights = OnnxWeights::scan(&map).with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            map,
            weights,
        })
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}

#[allow(unsafe_code)]
fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only; a file truncated by another process while mapped would
    // fault, which is why deltas from removable media are read into memory instead.
    unsafe { Mmap::map(file) }
}

/// Reads a delta fully into memory (never mapped: it may sit on a removable card).
pub(crate) fn read_delta(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<_, std::io::Error>(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("{}: cannot write", path.display()))
}

/// Lowercase hex of a fingerprint.
pub(crate) fn hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}
