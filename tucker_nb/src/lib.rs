//! tucker_nb: Tucker-2 compression of an ImageNet-pretrained ResNet18 on tch (libtorch).
//!
//! - [`runtime`]: process set-up (libtorch's CUDA backend) and device choice; call
//!   [`runtime::init`] first.
//! - [`model`]: ResNet18 as a plain struct tree with torchvision's names and swappable conv slots.
//! - [`conv`]: dense, Tucker-2 and two-layer SVD conv layers.
//! - [`compressor`]: Tucker-2 (HOSVD, HOOI) and SVD factorisation, rank policies, `compress_model`.
//! - [`report`]: the per-layer compression report.
//! - [`io`]: state_dict files and atomic writes.
//! - [`data`]: ImageFolder and CIFAR-100 datasets, decoded once and cached.
//! - [`loader`]: batches and torchvision's transforms on the model's device.
//! - [`train`]: `fine_tune` and `evaluate`, metrics as a polars DataFrame, checkpoints.
//! - [`experiment`]: the seed's whole flow as one call (`tucker-nb run`).
//! - [`sweep`]: accuracy, MACs and parameters over compression budgets (Pareto front).
//! - [`synthetic`]: generated learnable datasets for tests, smoke runs and benchmarks.
//! - [`bench`]: throughput figures (`tucker-nb bench`).
//! - [`plots`]: accuracy and loss charts (plotters), PNG export.
//! - [`display`]: HTML tables and evcxr display hooks.
//! - [`notebook`]: the notebook's configuration, profiles and summary.
//! - [`progress`]: progress bars that also show when output is piped.

pub mod bench;
pub mod compressor;
pub mod conv;
pub mod data;
pub mod display;
pub mod error;
pub mod experiment;
pub mod io;
pub mod loader;
pub mod model;
pub mod notebook;
pub mod plots;
pub mod progress;
pub mod ranks;
pub mod report;
pub mod runtime;
pub mod sweep;
pub mod synthetic;
pub mod torch_pickle;
pub mod train;

pub use compressor::{compress_model, CompressionPolicy, RankPolicy};
pub use data::{DataSource, Dataset, Split, StorageOptions};
pub use error::{Error, Result};
pub use loader::{Loader, Transform};
pub use model::ResNet18;
pub use polars::prelude::DataFrame;
pub use report::CompressionReport;
pub use train::{evaluate, fine_tune, BnMode, EvalResult, FineTuneConfig, Trainable};
