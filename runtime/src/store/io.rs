//! The storage layer: atomic writes (temp file, fsync, rename, folder fsync), fault injection for
//! crash-safety tests, and the store's lock.

use std::fs::{self, File, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{io_err, Store, StoreError, LOCK_FILE, STATE_FILE, VARIANTS_DIR};

/// A storage failure to inject, for tests of crash safety.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Storage step `k` (0-based) fails with an I/O error; later steps work again (the caller's
    /// clean-up runs).
    Fail(usize),
    /// The process "dies" at storage step `k`: a write at that step leaves half its bytes, and
    /// no later step reaches the disk (no clean-up either).
    Crash(usize),
}

/// The storage layer every store write goes through: counts steps and can inject a [`Fault`].
///
/// Steps are: create+write a temp file, fsync it, rename it, fsync the directory, remove a file.
#[derive(Debug, Default)]
pub struct StoreIo {
    fault: Option<Fault>,
    steps: AtomicUsize,
}

/// Real storage for writes outside a store ([`Staged::create`]): its step count is not read.
static REAL: StoreIo = StoreIo {
    fault: None,
    steps: AtomicUsize::new(0),
};

impl StoreIo {
    /// Real storage, no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage that injects `fault`.
    pub fn with_fault(fault: Fault) -> Self {
        Self {
            fault: Some(fault),
            steps: AtomicUsize::new(0),
        }
    }

    /// How many storage steps ran (or were attempted).
    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::SeqCst)
    }

    pub(super) fn crashed(&self) -> bool {
        matches!(self.fault, Some(Fault::Crash(k)) if self.steps() > k)
    }

    /// Counts a step; `Err` when a fault fires here. `partial` is set when a crash happens at
    /// this step (a write then leaves half of its bytes).
    fn step(&self, what: &str, path: &Path) -> io::Result<bool> {
        let k = self.steps.fetch_add(1, Ordering::SeqCst);
        let fired = |kind| {
            io::Error::other(format!(
                "injected {kind} at storage step {k} ({what} {})",
                path.display()
            ))
        };
        match self.fault {
            Some(Fault::Fail(n)) if n == k => Err(fired("failure")),
            Some(Fault::Crash(n)) if n == k => Ok(true),
            Some(Fault::Crash(n)) if k > n => Err(fired("crash")),
            _ => Ok(false),
        }
    }

    /// Starts an atomic write of `path`: a temp file `.NAME.tmp` in the same folder, readable
    /// and writable, that [`Staged::commit`] renames over `path`. With `private`, the temp file
    /// is created new with mode 0600 (unix), after removing a stale one, for secrets.
    pub fn stage(&self, path: &Path, private: bool) -> io::Result<Staged<'_>> {
        let tmp = temp_path(path);
        let partial = self.step("write", &tmp)?;
        let mut opts = fs::OpenOptions::new();
        opts.read(true).write(true);
        if private {
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
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
        let file = opts.open(&tmp)?;
        Ok(Staged {
            io: self,
            tmp,
            path: path.to_owned(),
            file: Some(file),
            partial,
        })
    }

    /// Writes `bytes` to `path` via `.NAME.tmp` in the same folder, fsync, rename, folder fsync.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut out = self.stage(path, false)?;
        out.file().write_all(bytes)?;
        out.commit()
    }

    /// Copies `src` to `path` atomically, streaming (for large base models).
    pub fn copy_atomic(&self, src: &Path, path: &Path) -> io::Result<()> {
        let mut out = self.stage(path, false)?;
        io::copy(&mut File::open(src)?, out.file())?;
        out.commit()
    }

    /// Removes `path` and fsyncs its folder.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        if self.step("remove", path)? {
            return Err(io::Error::other("injected crash before remove"));
        }
        fs::remove_file(path)?;
        self.sync_dir(parent(path))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.step("fsync dir", dir)? {
            return Err(io::Error::other("injected crash before directory fsync"));
        }
        File::open(dir)?.sync_all()
    }
}

/// A file written under a temporary name (`.NAME.tmp`) in its target's folder, renamed over the
/// target by [`Staged::commit`] (fsync, rename, folder fsync) and removed if dropped before.
///
/// A crash at any step leaves the previous target in place. [`StoreIo::stage`] makes one that
/// counts its steps and can inject faults; [`Staged::create`] writes to real storage.
#[derive(Debug)]
pub struct Staged<'a> {
    io: &'a StoreIo,
    tmp: PathBuf,
    path: PathBuf,
    file: Option<File>,
    /// A crash was injected at the write step: commit leaves half the bytes and stops.
    partial: bool,
}

impl Staged<'static> {
    /// Stages `path` on real storage, readable as the umask allows.
    pub fn create(path: &Path) -> io::Result<Self> {
        REAL.stage(path, false)
    }

    /// Stages `path` on real storage, readable by its owner only (mode 0600 on unix), for
    /// secrets: a stale temp file is removed first and the new one must not exist, so no looser
    /// file is ever reused.
    pub fn create_private(path: &Path) -> io::Result<Self> {
        REAL.stage(path, true)
    }
}

impl Staged<'_> {
    /// The temp file, open for reading and writing.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until committed")
    }

    /// Syncs the data, renames the temp file over the target and syncs the folder.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("open until committed");
        let res = self.finish(file);
        if res.is_err() && !self.io.crashed() {
            let _ = fs::remove_file(&self.tmp);
        }
        res
    }

    fn finish(&self, file: File) -> io::Result<()> {
        if self.partial {
            let len = file.metadata()?.len();
            file.set_len(len / 2)?;
            return Err(io::Error::other("injected crash while writing"));
        }
        if self.io.step("fsync", &self.tmp)? {
            return Err(io::Error::other("injected crash before fsync"));
        }
        file.sync_all()?;
        drop(file);
        if self.io.step("rename", &self.path)? {
            return Err(io::Error::other("injected crash before rename"));
        }
        fs::rename(&self.tmp, &self.path)?;
        self.io.sync_dir(parent(&self.path))
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if self.file.take().is_some() && !self.io.crashed() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The folder of `path` (`.` for a bare file name).
pub(super) fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(path).join(format!(".{name}.tmp"))
}

/// An exclusive lock on a store, released on drop (and by the kernel if the process dies).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// Takes the exclusive lock of the store in `dir` without waiting: [`StoreError::Busy`]
    /// when another process (or another open [`Store`]) holds it.
    pub(super) fn lock_dir(dir: &Path) -> Result<StoreLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open the lock file"))?;
        match file.try_lock() {
            Ok(()) => Ok(StoreLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(StoreError::Busy(dir.to_owned())),
            Err(TryLockError::Error(e)) => Err(io_err(&path, "lock")(e)),
        }
    }

    /// Takes the store's exclusive lock, re-reads the state and removes stray temp files.
    pub(super) fn begin(&mut self) -> Result<StoreLock, StoreError> {
        let lock = Self::lock_dir(&self.dir)?;
        let state_path = self.dir.join(STATE_FILE);
        let text = fs::read(&state_path).map_err(io_err(&state_path, "read"))?;
        self.state = serde_json::from_slice(&text).map_err(|e| StoreError::NotAStore {
            dir: self.dir.clone(),
            reason: format!("{STATE_FILE}: {e}"),
        })?;
        for d in [self.dir.clone(), self.dir.join(VARIANTS_DIR)] {
            if let Ok(entries) = fs::read_dir(&d) {
                for e in entries.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with('.') && n.ends_with(".tmp") {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(lock)
    }
}
