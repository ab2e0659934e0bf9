//! Reading and writing files: state_dicts by extension, and atomic, durable writes (a temporary
//! file in the same folder, fsynced, renamed into place), alone or as a set of outputs committed
//! together, so a failed command never leaves a half-written output or loses an existing one.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::error::{first_line, Error, Result};

/// Reads named tensors from `.safetensors`, or from a `torch.save` zip (`.pth`, `.pt`, `.bin`),
/// such as torchvision's `resnet18-f37072fd.pth`.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(Error::file(path, "no such file"));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tensors = match ext {
        "safetensors" => Tensor::read_safetensors(path),
        "pth" | "pt" | "bin" => return crate::torch_pickle::read_torch_zip(path),
        _ => {
            return Err(Error::file(
                path,
                "unknown weights format (expected .pth, .pt, .bin or .safetensors)",
            ))
        }
    };
    tensors.map_err(|e| {
        Error::file(
            path,
            format!("cannot read weights: {}", first_line(&e.to_string())),
        )
    })
}

/// A CSV field, quoted when it holds a comma, quote or newline.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes named tensors as safetensors, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_with(path, tensors, &BTreeMap::new())
}

/// Writes named tensors and `metadata` (the header's `__metadata__`) as safetensors, atomically.
pub fn write_safetensors_with(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic_with(path, |tmp| {
        crate::tensor_file::write(path, tmp, tensors, metadata)
    })
}

/// A failed write as the user sees it: the output asked for, what failed in words, and that the
/// earlier file (if any) is unchanged; never the temporary's name or a debug-formatted error.
fn write_failed(path: &Path, tmp: &Path, e: Error) -> Error {
    let text = e.to_string();
    let os_error = [
        libc::ENOSPC,
        libc::EROFS,
        libc::EACCES,
        libc::EPERM,
        libc::EDQUOT,
    ]
    .into_iter()
    .find(|code| {
        text.contains(&format!("os error {code})")) || text.contains(&format!("code: {code},"))
    });
    let reason = match os_error {
        Some(code) => crate::lock::io_reason(&std::io::Error::from_raw_os_error(code)),
        None => {
            let line =
                first_line(&text).replace(&tmp.display().to_string(), &path.display().to_string());
            let own = format!("{}: ", path.display());
            line.strip_prefix(&own).unwrap_or(&line).to_string()
        }
    };
    let earlier = crate::lock::earlier(path);
    Error::file(path, format!("cannot write it: {reason}; {earlier}"))
}

/// Writes `contents` to `path` atomically.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let mut outputs = Outputs::new();
    outputs.write(path, contents)?;
    outputs.commit()
}

/// Runs `write` on a temporary sibling of `path`, makes it durable (fsync), renames it into
/// place and makes the rename durable (fsync of the folder); on any failure the temporary file
/// is removed and `path` is left as it was.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut outputs = Outputs::new();
    outputs.write_with(path, write)?;
    outputs.commit()
}

/// The outputs of one command, committed together: each is written to a temporary sibling and
/// made durable; [`Outputs::commit`] renames them all into place once every one is written.
/// Dropped before that (an error, a panic), the temporaries are removed and every existing
/// output is untouched.
#[derive(Debug, Default)]
pub struct Outputs {
    /// (temporary, final path), in the order written.
    staged: Vec<(PathBuf, PathBuf)>,
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes one output to its temporary with `write`, which gets the temporary's path.
    pub fn write_with(
        &mut self,
        path: &Path,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        if path.is_dir() {
            return Err(Error::file(path, "is a folder, not a file to write"));
        }
        let tmp = temporary_sibling(path)?;
        let written = write(&tmp).and_then(|()| sync_path(&tmp).map_err(|e| Error::file(path, e)));
        if let Err(e) = written {
            remove_any(&tmp);
            return Err(write_failed(path, &tmp, e));
        }
        self.staged.push((tmp, path.to_path_buf()));
        Ok(())
    }

    /// Writes `contents` as one output.
    pub fn write(&mut self, path: &Path, contents: &[u8]) -> Result<()> {
        self.write_with(path, |tmp| {
            fs::write(tmp, contents).map_err(|e| Error::file(path, e))
        })
    }

    /// Renames every output into place, then makes the renames durable. Renames within one
    /// folder do not fail for want of space; should one fail all the same (the folder vanished),
    /// the outputs renamed before it stay, and the rest are removed.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        if let Some((_, target)) = staged.iter().find(|(_, target)| target.is_dir()) {
            self.staged = staged.clone();
            return Err(Error::file(target, "is a folder, not a file to write"));
        }
        for (i, (tmp, target)) in staged.iter().enumerate() {
            if let Err(e) = fs::rename(tmp, target) {
                self.staged = staged[i..].to_vec();
                return Err(Error::file(target, e));
            }
        }
        let folders: std::collections::BTreeSet<PathBuf> =
            staged.iter().map(|(_, target)| parent_of(target)).collect();
        for folder in folders {
            sync_path(&folder).map_err(|e| Error::file(&folder, e))?;
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            remove_any(tmp);
        }
    }
}

/// Builds a folder atomically: `build` fills a temporary sibling of `path`, which is then renamed
/// into place; on failure the temporary folder is removed. `path` must not exist yet; it is
/// locked while it is built (another writer is refused).
pub fn create_dir_atomic<T>(path: &Path, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = parent_of(path);
    fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, e))?;
    let _lock = crate::lock::OutputLock::acquire(path)?;
    if path.exists() {
        return Err(Error::file(
            path,
            "already exists; remove it or choose another output folder",
        ));
    }
    let tmp = temporary_sibling(path)?;
    let result = build(&tmp).and_then(|v| {
        fs::rename(&tmp, path)
            .and_then(|()| sync_path(&parent))
            .map(|()| v)
            .map_err(|e| Error::file(path, e))
    });
    if result.is_err() {
        remove_any(&tmp);
    }
    result
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsync of a file, or of a folder (which makes the renames in it durable).
fn sync_path(path: &Path) -> std::io::Result<()> {
    fs::File::open(path)?.sync_all()
}

fn remove_any(path: &Path) {
    if path.is_dir() {
        let _ = fs::remove_dir_all(path);
    } else {
        let _ = fs::remove_file(path);
    }
}

const TMP_MARK: &str = ".tmp-";

/// `.NAME.tmp-PID` beside `path`, after removing the temporaries of `path` that killed
/// processes left behind (a PID no longer running).
fn temporary_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::file(path, "not a file path"))?;
    let dir = parent_of(path);
    if !dir.is_dir() {
        return Err(Error::file(
            path,
            format!("folder {} does not exist", dir.display()),
        ));
    }
    remove_stale_temporaries(&dir, name);
    Ok(dir.join(format!(".{name}{TMP_MARK}{}", std::process::id())))
}

fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}{TMP_MARK}");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 != std::process::id() && !process_alive(pid) {
            remove_any(&entry.path());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_atomic_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.csv");
        fs::write(&out, "old").unwrap();
        let err = write_atomic_with(&out, |tmp| {
            fs::write(tmp, "half").unwrap();
            Err(Error::value("test", "boom"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read_to_string(&out).unwrap(), "old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic(&out, b"new").unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "new");
    }

    #[test]
    fn outputs_commit_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        fs::write(&a, "old a").unwrap();
        let mut outputs = Outputs::new();
        outputs.write(&a, b"new a").unwrap();
        let folder = dir.path().join("folder");
        fs::create_dir(&folder).unwrap();
        assert!(outputs
            .write(&folder, b"x")
            .unwrap_err()
            .to_string()
            .contains("is a folder"));
        drop(outputs); // the command failed: nothing committed, no temporary left
        assert_eq!(fs::read_to_string(&a).unwrap(), "old a");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        let mut outputs = Outputs::new();
        outputs.write(&a, b"new a").unwrap();
        outputs.write(&b, b"new b").unwrap();
        assert_eq!(
            fs::read_to_string(&a).unwrap(),
            "old a",
            "not before commit"
        );
        outputs.commit().unwrap();
        assert_eq!(fs::read_to_string(&a).unwrap(), "new a");
        assert_eq!(fs::read_to_string(&b).unwrap(), "new b");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_on_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.csv");
        // A PID that is not running: a child that has exited and been reaped.
        let dead = std::process::Command::new("true").spawn().unwrap();
        let pid = dead.id();
        let mut dead = dead;
        dead.wait().unwrap();
        let stale = dir.path().join(format!(".out.csv.tmp-{pid}"));
        fs::write(&stale, "half").unwrap();
        let other = dir.path().join(".other.csv.tmp-1");
        fs::write(&other, "not ours").unwrap();
        write_atomic(&out, b"new").unwrap();
        assert!(!stale.exists(), "stale temporary left");
        assert!(other.exists(), "another file's temporary removed");
    }

    #[test]
    fn unknown_extension_and_missing_file_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("weights.h5");
        fs::write(&odd, "x").unwrap();
        let err = read_state_dict(&odd).unwrap_err().to_string();
        assert!(
            err.contains("weights.h5") && err.contains("unknown weights format"),
            "{err}"
        );
        let err = read_state_dict(&dir.path().join("nope.pth"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope.pth") && err.contains("no such file"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_weights_give_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["bad.pth", "bad.safetensors"] {
            let bad = dir.path().join(name);
            fs::write(&bad, b"not a checkpoint").unwrap();
            let err = read_state_dict(&bad).unwrap_err().to_string();
            assert!(err.contains(name) && !err.contains('\n'), "{err}");
        }
    }
}
