//! What a latency table was measured at: the key its cache file is named by.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Device;

use super::TimingSettings;

/// Everything that changes a timing, besides the layer and form (which key each entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingKey {
    /// `cpu <model name>` or `cuda:N <GPU model>`.
    pub device: String,
    pub libtorch: String,
    pub threads: i64,
    pub batch: i64,
    /// `fp32` or `bf16`.
    pub dtype: String,
    pub channels_last: bool,
    pub cudnn_benchmark: bool,
    pub fold_bn: bool,
}

impl TimingKey {
    /// The key for `settings` on `device` with `channels_last` layout, on this machine now.
    pub fn current(settings: &TimingSettings, device: Device, channels_last: bool) -> Self {
        let bf16 = settings.bf16 && device.is_cuda();
        Self {
            device: device_name(device),
            libtorch: libtorch_version(),
            threads: i64::from(tch::get_num_threads()),
            batch: settings.batch_size,
            dtype: if bf16 { "bf16" } else { "fp32" }.into(),
            channels_last,
            cudnn_benchmark: device.is_cuda() && crate::runtime::cudnn_benchmark(),
            fold_bn: settings.fold_bn,
        }
    }

    /// The table's file name: a hash of the key.
    pub fn file_name(&self) -> String {
        let json = serde_json::to_string(self).expect("a key serialises");
        let digest = Sha256::digest(json.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}.json")
    }

    /// What a measurement was taken at, in words: `cpu AMD EPYC fp32 channels-last, batch 32,
    /// 2 threads`.
    pub fn describe(&self) -> String {
        let layout = if self.channels_last {
            "channels-last"
        } else {
            "NCHW"
        };
        format!(
            "{} {} {layout}, batch {}, {} threads",
            self.device, self.dtype, self.batch, self.threads
        )
    }

    pub(super) fn is_bf16(&self) -> bool {
        self.dtype == "bf16"
    }
}

fn device_name(device: Device) -> String {
    let first_line_with = |file: &str, field: &str| -> Option<String> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    match device {
        Device::Cuda(i) => {
            let gpu = std::fs::read_dir("/proc/driver/nvidia/gpus")
                .ok()
                .and_then(|dirs| {
                    let mut dirs: Vec<PathBuf> = dirs.flatten().map(|d| d.path()).collect();
                    dirs.sort();
                    dirs.get(i).cloned()
                })
                .and_then(|d| first_line_with(d.join("information").to_str()?, "Model"));
            format!("cuda:{i} {}", gpu.unwrap_or_else(|| "unknown GPU".into()))
        }
        _ => format!(
            "cpu {}",
            first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into())
        ),
    }
}

/// The torch version beside the libtorch this process mapped (the wheel's `torch/version.py`).
fn libtorch_version() -> String {
    crate::runtime::mapped_library_path("libtorch_cpu.so")
        .map(PathBuf::from)
        .and_then(|lib| {
            let version = lib.parent()?.parent()?.join("version.py");
            let text = std::fs::read_to_string(version).ok()?;
            let line = text.lines().find(|l| l.starts_with("__version__"))?;
            Some(line.split('\'').nth(1)?.to_string())
        })
        .unwrap_or_else(|| "unknown (tch 0.24.0)".into())
}

#[cfg(test)]
pub(crate) fn test_key() -> TimingKey {
    TimingKey {
        device: "cpu test".into(),
        libtorch: "2.11.0".into(),
        threads: 2,
        batch: 32,
        dtype: "fp32".into(),
        channels_last: true,
        cudnn_benchmark: false,
        fold_bn: false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn each_field_of_the_key_changes_the_file() {
        let base = test_key();
        let variants: Vec<TimingKey> = vec![
            TimingKey {
                device: "cuda:0 H200".into(),
                ..base.clone()
            },
            TimingKey {
                libtorch: "2.12.0".into(),
                ..base.clone()
            },
            TimingKey {
                threads: 4,
                ..base.clone()
            },
            TimingKey {
                batch: 64,
                ..base.clone()
            },
            TimingKey {
                dtype: "bf16".into(),
                ..base.clone()
            },
            TimingKey {
                channels_last: false,
                ..base.clone()
            },
            TimingKey {
                cudnn_benchmark: true,
                ..base.clone()
            },
            TimingKey {
                fold_bn: true,
                ..base.clone()
            },
        ];
        let mut names: BTreeSet<String> = variants.iter().map(TimingKey::file_name).collect();
        names.insert(base.file_name());
        assert_eq!(names.len(), variants.len() + 1);
        assert_eq!(
            base.file_name(),
            test_key().file_name(),
            "the same key, the same file"
        );
    }
}
