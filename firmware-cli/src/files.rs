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
    let mut out = Staged::create(path)?;
    out.file()
        .write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    out.commit()
}

/// A file written under a temporary name (`.NAME.tmp`) in the target's folder, renamed over
/// the target by [`Staged::commit`] (fsync, rename, folder fsync) and removed if dropped before.
pub(crate) struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<File>,
}

impl Staged {
    /// Stages a file readable as the umask allows.
    pub(crate) fn create(path: &Path) -> Result<Self> {
        Self::open(path, false)
    }

    /// Stages a file only its owner can read (mode 0600 on unix), for secrets. A stale temp file
    /// is removed first and the new one must not exist, so no looser file is ever reused.
    pub(crate) fn create_private(path: &Path) -> Result<Self> {
        Self::open(path, true)
    }

    fn open(path: &Path, private: bool) -> Result<Self> {
        let name = path
            .file_name()
            .with_context(|| format!("{}: not a file path", path.display()))?;
        let tmp = folder_of(path).join(format!(".{}.tmp", name.to_string_lossy()));
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true);
        if private {
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("{}: cannot remove", tmp.display()))
                }
                _ => {}
            }
            opts.create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
        } else {
            opts.create(true).truncate(true);
        }
        let file = opts
            .open(&tmp)
            .with_context(|| format!("{}: cannot write", tmp.display()))?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
            file: Some(file),
        })
    }

    pub(crate) fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until committed")
    }

    /// Syncs the data, renames over the target and syncs the folder.
    pub(crate) fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("open until committed");
        let res = file
            .sync_all()
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        if res.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        res.with_context(|| format!("{}: cannot write", self.path.display()))?;
        if let Ok(d) = File::open(folder_of(&self.path)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Lowercase hex of a fingerprint.
pub(crate) fn hex(fp: &[u8; 32]) -> String {
    bitdelta::fingerprint::hex(fp)
}
