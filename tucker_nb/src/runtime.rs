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

/// [`select_device`], then cuDNN's autotuner on or off for it: with `benchmark`, cuDNN times its
/// algorithms for each new convolution shape once and keeps the fastest (the compressed model's
/// odd channel counts are where the default heuristics pick slow kernels). No effect on CPU.
pub fn prepare_device(choice: Option<&str>, cudnn_benchmark: bool) -> Result<Device> {
    let device = select_device(choice)?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(cudnn_benchmark);
        CUDNN_BENCHMARK.store(cudnn_benchmark, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(device)
}

/// libtorch's default (off) until [`prepare_device`] sets it.
static CUDNN_BENCHMARK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether cuDNN's autotuner is on, as [`prepare_device`] last set it.
pub fn cudnn_benchmark() -> bool {
    CUDNN_BENCHMARK.load(std::sync::atomic::Ordering::Relaxed)
}

/// Waits for `device`'s queued work (CPU work is already done when its calls return).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `f` under CUDA autocast to bfloat16 when `bf16` is set and CUDA is usable, else plainly,
/// saying so once per process when bf16 was asked for but cannot be had (never silently
/// different). See [`Bf16Autocast`].
pub fn autocast_bf16<T>(bf16: bool, f: impl FnOnce() -> T) -> T {
    let _guard = if bf16 {
        let guard = Bf16Autocast::enter();
        if guard.is_none() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("{BF16_UNAVAILABLE}"));
        }
        guard
    } else {
        None
    };
    f()
}

/// What [`autocast_bf16`] says when bf16 was asked for without CUDA.
pub const BF16_UNAVAILABLE: &str =
    "bf16: autocast to bfloat16 needs CUDA (none is usable here): computing in float32";

/// CUDA autocast to bfloat16 on the calling thread while the guard lives, as PyTorch's
/// `torch.autocast("cuda", torch.bfloat16)` context manager does it.
///
/// libtorch keeps autocast's switch and dtype per thread, and tch's own `autocast` calls the
/// deprecated device-less functions (a warning per call) and leaves the dtype at float16. This guard
/// calls libtorch 2.11's `at::autocast` functions directly: on entry it saves the thread's state,
/// enables autocast for CUDA with dtype bfloat16 and increments the nesting count; on drop it
/// decrements the count, clears the cast-weight cache when the outermost guard ends, and restores
/// the saved state.
pub struct Bf16Autocast {
    fns: &'static AutocastFns,
    was_enabled: bool,
    previous_dtype: i8,
}

// c10::DeviceType::CUDA and c10::ScalarType::BFloat16 (both int8_t-backed enums).
const CUDA: i8 = 1;
const BFLOAT16: i8 = 15;

struct AutocastFns {
    is_enabled: extern "C" fn(i8) -> bool,
    set_enabled: extern "C" fn(i8, bool),
    get_dtype: extern "C" fn(i8) -> i8,
    set_dtype: extern "C" fn(i8, i8),
    increment_nesting: extern "C" fn() -> i32,
    decrement_nesting: extern "C" fn() -> i32,
    clear_cache: extern "C" fn(),
}

impl Bf16Autocast {
    /// The guard, or `None` (nothing changed) when CUDA is not usable or libtorch lacks a symbol.
    pub fn enter() -> Option<Self> {
        let fns = autocast_fns()?;
        let guard = Self {
            fns,
            was_enabled: (fns.is_enabled)(CUDA),
            previous_dtype: (fns.get_dtype)(CUDA),
        };
        (fns.set_enabled)(CUDA, true);
        (fns.set_dtype)(CUDA, BFLOAT16);
        (fns.increment_nesting)();
        Some(guard)
    }
}

impl Drop for Bf16Autocast {
    fn drop(&mut self) {
        if (self.fns.decrement_nesting)() == 0 {
            (self.fns.clear_cache)();
        }
        (self.fns.set_enabled)(CUDA, self.was_enabled);
        (self.fns.set_dtype)(CUDA, self.previous_dtype);
    }
}

/// libtorch's autocast functions, looked up once; `None` without CUDA or when one is missing.
fn autocast_fns() -> Option<&'static AutocastFns> {
    static FNS: OnceLock<Option<AutocastFns>> = OnceLock::new();
    FNS.get_or_init(|| {
        if !init().cuda_available {
            return None;
        }
        // SAFETY: each symbol is the libtorch 2.11 function named in its mangled name, with the
        // signature given; DeviceType and ScalarType are int8_t enums, passed as integers.
        unsafe {
            Some(AutocastFns {
                is_enabled: std::mem::transmute::<*mut libc::c_void, extern "C" fn(i8) -> bool>(
                    symbol(b"_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE\0")?,
                ),
                set_enabled: std::mem::transmute::<*mut libc::c_void, extern "C" fn(i8, bool)>(
                    symbol(b"_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb\0")?,
                ),
                get_dtype: std::mem::transmute::<*mut libc::c_void, extern "C" fn(i8) -> i8>(
                    symbol(b"_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE\0")?,
                ),
                set_dtype: std::mem::transmute::<*mut libc::c_void, extern "C" fn(i8, i8)>(symbol(
                    b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0",
                )?),
                increment_nesting: std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> i32>(
                    symbol(b"_ZN2at8autocast17increment_nestingEv\0")?,
                ),
                decrement_nesting: std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> i32>(
                    symbol(b"_ZN2at8autocast17decrement_nestingEv\0")?,
                ),
                clear_cache: std::mem::transmute::<*mut libc::c_void, extern "C" fn()>(symbol(
                    b"_ZN2at8autocast11clear_cacheEv\0",
                )?),
            })
        }
    })
    .as_ref()
}

/// A symbol of the libraries this process has loaded (libtorch_cpu is linked in).
fn symbol(name: &[u8]) -> Option<*mut libc::c_void> {
    // SAFETY: `name` is a NUL-terminated C string.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr().cast()) };
    (!f.is_null()).then_some(f)
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
    use tch::Tensor;

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
    fn autocast_symbols_resolve_and_the_guard_restores_the_thread_state() {
        // The symbols exist in the CPU library whatever the machine, so a libtorch upgrade that
        // renames them fails here rather than silently running bf16 runs in float32.
        for name in [
            &b"_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE\0"[..],
            b"_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb\0",
            b"_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE\0",
            b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0",
            b"_ZN2at8autocast17increment_nestingEv\0",
            b"_ZN2at8autocast17decrement_nestingEv\0",
            b"_ZN2at8autocast11clear_cacheEv\0",
        ] {
            assert!(symbol(name).is_some(), "{}", String::from_utf8_lossy(name));
        }
        match autocast_fns() {
            None => assert!(!init().cuda_available),
            Some(fns) => {
                let before = ((fns.is_enabled)(CUDA), (fns.get_dtype)(CUDA));
                let x = Tensor::ones([4, 4], (tch::Kind::Float, Device::Cuda(0)));
                let y = autocast_bf16(true, || x.matmul(&x));
                assert_eq!(y.kind(), tch::Kind::BFloat16);
                assert_eq!(((fns.is_enabled)(CUDA), (fns.get_dtype)(CUDA)), before);
            }
        }
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
