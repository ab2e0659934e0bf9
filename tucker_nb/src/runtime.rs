//! Process set-up that must happen before the first tch call: loading libtorch's CUDA half, and
//! choosing the device.
//!
//! Binaries linked against the PyPI wheel lose `libtorch_cuda.so` to the linker's `--as-needed`
//! (nothing in our code references its symbols), so `tch::Cuda::is_available()` would say false
//! even on a GPU machine. Loading it ourselves with `RTLD_GLOBAL` registers the CUDA backend with
//! the dispatcher. It loads fine on machines without a GPU.

use std::ffi::CString;
use std::sync::OnceLock;

use tch::Device;

use crate::error::{Error, Result};

/// What [`init`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Path of the `libtorch_cuda.so` that was loaded, if any.
    pub cuda_library: Option<String>,
    /// Whether a CUDA device is usable after loading.
    pub cuda_available: bool,
}

static RUNTIME: OnceLock<RuntimeInfo> = OnceLock::new();

/// Loads libtorch's CUDA backend (once per process) and reports whether CUDA is usable.
///
/// Call it before any other tch call; the CLI and the notebooks do.
pub fn init() -> &'static RuntimeInfo {
    RUNTIME.get_or_init(|| {
        let cuda_library = load_torch_cuda();
        RuntimeInfo {
            cuda_library,
            cuda_available: tch::Cuda::is_available(),
        }
    })
}

/// The device to run on: `choice` when given (`"cpu"`, `"cuda"`, `"cuda:1"`), else the
/// `TUCKER_NB_DEVICE` environment variable, else CUDA when available, else CPU.
pub fn select_device(choice: Option<&str>) -> Result<Device> {
    let info = init();
    let env_choice = std::env::var("TUCKER_NB_DEVICE").ok();
    let choice = choice.or(env_choice.as_deref()).map(str::trim);
    match choice {
        None | Some("") | Some("auto") => Ok(if info.cuda_available {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        Some("cpu") => Ok(Device::Cpu),
        Some(cuda) if cuda.starts_with("cuda") => {
            let index = match cuda.strip_prefix("cuda").unwrap() {
                "" => 0,
                rest => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::value("device", format!("`{cuda}` is not cuda or cuda:N"))
                    })?,
            };
            if !info.cuda_available {
                return Err(Error::value(
                    "device",
                    format!("`{cuda}` was asked for but no CUDA device is available"),
                ));
            }
            Ok(Device::Cuda(index))
        }
        Some(other) => Err(Error::value(
            "device",
            format!("`{other}` (expected cpu, cuda, cuda:N or auto)"),
        )),
    }
}

/// Makes tch's CUDA autocast run in bfloat16 (its default is float16); true when CUDA is usable
/// and the switch worked. libtch exposes no setter, so this calls libtorch's
/// `at::autocast::set_autocast_dtype(DeviceType, ScalarType)` through its C++ symbol.
pub fn use_bf16_autocast() -> bool {
    static SET: OnceLock<bool> = OnceLock::new();
    *SET.get_or_init(|| {
        if !init().cuda_available {
            return false;
        }
        const SYMBOL: &[u8] =
            b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0";
        // SAFETY: the symbol is libtorch's `void set_autocast_dtype(DeviceType, ScalarType)`; both
        // enums are int8_t-backed, passed as integers. CUDA is DeviceType 1, BFloat16 ScalarType 15.
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, SYMBOL.as_ptr().cast());
            if f.is_null() {
                return false;
            }
            let set: extern "C" fn(i8, i8) = std::mem::transmute(f);
            set(1, 15);
        }
        true
    })
}

/// Loads `libtorch_cuda.so` globally: first by name (LD_LIBRARY_PATH and our RUNPATH), then next
/// to the `libtorch_cpu.so` this process already mapped. Returns the path loaded, if any.
fn load_torch_cuda() -> Option<String> {
    let mut candidates = vec!["libtorch_cuda.so".to_string()];
    if let Some(dir) = mapped_library_dir("libtorch_cpu.so") {
        candidates.push(format!("{dir}/libtorch_cuda.so"));
    }
    for candidate in candidates {
        let name = CString::new(candidate.clone()).ok()?;
        // SAFETY: dlopen with a valid C string; the handle is deliberately never closed.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return Some(mapped_library_path("libtorch_cuda.so").unwrap_or(candidate));
        }
    }
    None
}

/// Full path of a shared library mapped into this process, read from `/proc/self/maps`.
pub fn mapped_library_path(file_name: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next() == Some(file_name))
        .map(str::to_string)
}

fn mapped_library_dir(file_name: &str) -> Option<String> {
    let path = mapped_library_path(file_name)?;
    path.rsplit_once('/').map(|(dir, _)| dir.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_maps_libtorch_cuda_into_the_process() {
        let info = init();
        // The PyPI wheel is the CUDA build, so the library exists even on a machine without a GPU.
        let loaded = info
            .cuda_library
            .as_deref()
            .expect("libtorch_cuda.so was not loaded");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            maps.contains("libtorch_cuda.so"),
            "not mapped; loaded {loaded}"
        );
        assert_eq!(info.cuda_available, tch::Cuda::is_available());
    }

    #[test]
    fn device_choice_parses_and_rejects() {
        assert_eq!(select_device(Some("cpu")).unwrap(), Device::Cpu);
        let err = select_device(Some("tpu")).unwrap_err().to_string();
        assert!(err.contains("`tpu`"), "{err}");
        if !init().cuda_available {
            let err = select_device(Some("cuda")).unwrap_err().to_string();
            assert!(err.contains("no CUDA device"), "{err}");
            assert_eq!(select_device(Some("auto")).unwrap(), Device::Cpu);
        }
    }
}
