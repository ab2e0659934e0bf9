//! Reading and writing files: state_dicts by extension, and atomic writes (a temporary file in the
//! same folder renamed into place) so a failed run never leaves a half-written output.

use std::fs;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::error::{Error, Result};

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
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(tensors, tmp)
            .map_err(|e| Error::file(path, first_line(&e.to_string())))
    })
}

/// Writes `contents` to `path` atomically.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        fs::write(tmp, contents).map_err(|e| Error::file(path, e))
    })
}

/// Runs `write` on a temporary sibling of `path`, then renames it into place; on any failure the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_sibling(path)?;
    let result =
        write(&tmp).and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::file(path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Builds a folder atomically: `build` fills a temporary sibling of `path`, which is then renamed
/// into place; on failure the temporary folder is removed. `path` must not exist yet.
pub fn create_dir_atomic<T>(path: &Path, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if path.exists() {
        return Err(Error::file(
            path,
            "already exists; remove it or choose another output folder",
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, e))?;
    let tmp = temporary_sibling(path)?;
    let result = build(&tmp).and_then(|v| {
        fs::rename(&tmp, path)
            .map(|()| v)
            .map_err(|e| Error::file(path, e))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn temporary_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::file(path, "not a file path"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::file(
            path,
            format!("folder {} does not exist", dir.display()),
        ));
    }
    Ok(dir.join(format!(".{name}.tmp-{}", std::process::id())))
}

/// libtorch errors carry a C++ backtrace; the first line says what went wrong.
pub(crate) fn first_line(message: &str) -> &str {
    message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
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
