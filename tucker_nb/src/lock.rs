//! One writer per output: an exclusive advisory lock (`flock`) on the folder or file a command
//! writes, held for as long as it writes. A second writer is refused at once, naming the
//! output and the PID that holds it. The kernel drops a `flock` lock when its process dies, so a
//! killed writer leaves no stale lock (its lock file stays, and the next writer reuses it); a
//! writer that ends removes its lock file. Readers take no lock.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

/// The lock file inside a locked folder.
pub const FOLDER_LOCK: &str = ".tucker_nb.lock";

/// An exclusive lock on one output, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct OutputLock {
    _file: fs::File,
    /// The lock file, removed on release (a killed holder leaves it; the next writer reuses it).
    path: PathBuf,
    target: PathBuf,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then unlock by closing: a writer that opened the
        // old file meanwhile sees it is no longer at the path and takes a fresh one.
        let _ = fs::remove_file(&self.path);
    }
}

impl OutputLock {
    /// Locks `target`: an existing folder by [`FOLDER_LOCK`] inside it, anything else (a file, or
    /// a folder still to be made) by `.NAME.lock` beside it. Fails at once when another process
    /// holds it.
    pub fn acquire(target: &Path) -> Result<Self> {
        match Self::lock(target)? {
            Ok(lock) => Ok(lock),
            Err(held) => {
                let holder = holder_pid(&held).map_or("another process".to_string(), |pid| {
                    format!("another tucker-nb (pid {pid})")
                });
                Err(Error::file(
                    target,
                    format!(
                        "is being written by {holder}: wait for it to finish, or write elsewhere"
                    ),
                ))
            }
        }
    }

    /// As [`Self::acquire`], but `None` when another process holds the lock.
    pub fn try_acquire(target: &Path) -> Result<Option<Self>> {
        Ok(Self::lock(target)?.ok())
    }

    /// The lock on `target`, or the path of the lock file another process holds. That path is the
    /// one tried: a folder the holder has made since is locked by the file beside it, not inside.
    fn lock(target: &Path) -> Result<std::result::Result<Self, PathBuf>> {
        let lock_path = lock_path(target)?;
        loop {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
                .map_err(|e| cannot_write(target, &e))?;
            // SAFETY: flock on the descriptor `file` owns and keeps open; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    let why = format!("cannot lock it: {}", io_reason(&e));
                    return Err(Error::file(target, why));
                }
                return Ok(Err(lock_path));
            }
            // The holder before us may have removed the file between our open and our lock
            // (it unlinks, then unlocks): then we hold a lock on a file no one else can find.
            // Locked and still the file at that path, it is ours.
            let same = match (file.metadata(), fs::metadata(&lock_path)) {
                (Ok(ours), Ok(theirs)) => ours.ino() == theirs.ino() && ours.dev() == theirs.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            // Say who holds it (for the next writer's message).
            let said = file
                .set_len(0)
                .and_then(|()| (&file).write_all(std::process::id().to_string().as_bytes()));
            said.map_err(|e| Error::file(target, format!("cannot lock it: {}", io_reason(&e))))?;
            return Ok(Ok(Self {
                _file: file,
                path: lock_path,
                target: target.to_path_buf(),
            }));
        }
    }

    /// The output this lock covers.
    pub fn target(&self) -> &Path {
        &self.target
    }
}

/// Locks `target` for the rest of the process (the notebook's output folder, which its cells
/// write while the kernel lives); a second call for the same output reuses the lock.
pub fn hold_for_process(target: &Path) -> Result<Arc<OutputLock>> {
    static HELD: OnceLock<Mutex<BTreeMap<PathBuf, Arc<OutputLock>>>> = OnceLock::new();
    let key = fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let mut held = HELD
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    if let Some(lock) = held.get(&key) {
        return Ok(lock.clone());
    }
    let lock = Arc::new(OutputLock::acquire(target)?);
    held.insert(key, lock.clone());
    Ok(lock)
}

/// The PID written in a held lock file. A holder writes it just after it takes the lock, so a
/// writer refused in between finds the file empty: it reads again for up to 0.2 s.
fn holder_pid(lock_file: &Path) -> Option<u32> {
    for _ in 0..40 {
        let read = fs::read_to_string(lock_file).ok()?;
        if let Ok(pid) = read.trim().parse::<u32>() {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    None
}

fn lock_path(target: &Path) -> Result<PathBuf> {
    if target.is_dir() {
        return Ok(target.join(FOLDER_LOCK));
    }
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::file(target, "not a file or folder path"))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::file(
            target,
            format!("folder {} does not exist", parent.display()),
        ));
    }
    Ok(parent.join(format!(".{name}.lock")))
}

/// The one-line error of an output that cannot be written: what failed, in words, and what
/// became of the earlier file.
pub fn cannot_write(target: &Path, e: &std::io::Error) -> Error {
    Error::file(
        target,
        format!("cannot write it: {}; {}", io_reason(e), earlier(target)),
    )
}

/// What a failed write left: the earlier file (or folder) as it was, or nothing.
pub fn earlier(target: &Path) -> &'static str {
    match target.exists() {
        true => "the earlier file is unchanged",
        false => "nothing was written",
    }
}

/// What an I/O error says, in words, without Rust's debug format or the OS's error number.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => "no space left on device".into(),
        Some(libc::EROFS) => "read-only file system".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::EDQUOT) => "disk quota exceeded".into(),
        _ => {
            let text = e.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            text.to_lowercase()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_an_output_is_refused_naming_it_and_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(held.target(), dir.path());
        // Another open file description conflicts as another process's would.
        let err = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(
            err.contains("is being written by") && err.contains(&pid),
            "{err}"
        );
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(held);
        OutputLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_file_is_locked_beside_it_and_the_process_lock_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        let _lock = OutputLock::acquire(&file).unwrap();
        assert!(dir.path().join(".model.safetensors.lock").exists());
        let folder = dir.path().join("out");
        fs::create_dir(&folder).unwrap();
        let a = hold_for_process(&folder).unwrap();
        let b = hold_for_process(&folder).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_writer_refused_before_the_holder_wrote_its_pid_still_names_it() {
        // The holder has the lock but has not yet written its PID (CI saw "another process").
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".out.lock");
        fs::write(&file, "").unwrap();
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(30));
                fs::write(&file, "4242").unwrap();
            })
        };
        assert_eq!(holder_pid(&file), Some(4242));
        writer.join().unwrap();
        fs::write(&file, "").unwrap();
        assert_eq!(holder_pid(&file), None, "an empty file names no one");
        assert_eq!(holder_pid(&dir.path().join("gone.lock")), None);
    }

    #[test]
    fn io_errors_read_as_words() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(io_reason(&full), "no space left on device");
        let ro = std::io::Error::from_raw_os_error(libc::EROFS);
        assert_eq!(io_reason(&ro), "read-only file system");
    }
}
