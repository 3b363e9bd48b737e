//! Reading models and deltas, writing outputs atomically.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bitdelta::onnx::OnnxWeights;
use bitdelta::store::StoreIo;
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

/// Writes `bytes` to `path` atomically ([`StoreIo::write_atomic`]: temp file, fsync, rename,
/// folder fsync).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    StoreIo::new()
        .write_atomic(path, bytes)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// A file written under a temporary name and renamed over its target on commit
/// ([`bitdelta::store::Staged`]), with the target named in errors.
pub(crate) struct Staged {
    inner: bitdelta::store::Staged<'static>,
    path: PathBuf,
}

impl Staged {
    /// Stages a file readable as the umask allows.
    pub(crate) fn create(path: &Path) -> Result<Self> {
        Self::wrap(path, bitdelta::store::Staged::create(path))
    }

    /// Stages a file only its owner can read (mode 0600 on unix), for secrets.
    pub(crate) fn create_private(path: &Path) -> Result<Self> {
        Self::wrap(path, bitdelta::store::Staged::create_private(path))
    }

    fn wrap(path: &Path, inner: std::io::Result<bitdelta::store::Staged<'static>>) -> Result<Self> {
        let inner = inner.with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(Self {
            inner,
            path: path.to_owned(),
        })
    }

    pub(crate) fn file(&mut self) -> &mut File {
        self.inner.file()
    }

    /// Syncs the data, renames over the target and syncs the folder.
    pub(crate) fn commit(self) -> Result<()> {
        let path = self.path;
        self.inner
            .commit()
            .with_context(|| format!("{}: cannot write", path.display()))
    }
}

/// Lowercase hex (fingerprints, keys).
pub(crate) use bitdelta::fingerprint::hex;
