//! tucker_nb: Tucker-2 compression of an ImageNet-pretrained ResNet18 on tch (libtorch).
//!
//! The names a notebook or program needs are re-exported here; the modules hold the rest:
//!
//! - [`runtime`]: process set-up (libtorch's CUDA backend) and device choice; call
//!   [`runtime::init`] first.
//! - [`model`]: ResNet18 as a plain struct tree with torchvision's names and swappable conv slots.
//! - [`conv`]: dense, Tucker-2 and two-layer conv layers (an SVD, or a Tucker-1 form), and the
//!   one cost model.
//! - [`compress`]: decompositions, rank policies, per-layer plans, budgets, `compress_model`.
//! - [`report`]: the per-layer compression report.
//! - [`data`]: ImageFolder and CIFAR-100 datasets, decoded once and cached.
//! - [`loader`]: batches and torchvision's transforms on the model's device.
//! - [`train`]: `fine_tune` and `evaluate`, metrics as a polars DataFrame, checkpoints.
//! - [`experiment`]: the seed's flow as steps (`loaders`, `initial_model`, `compress_in_stages`,
//!   …) and as one call (`tucker-nb run`).
//! - [`export`]: ONNX and TorchScript exports, checked against our logits.
//! - [`sweep`]: accuracy, MACs and parameters over compression budgets (Pareto front).
//! - [`plots`], [`display`]: charts (plotters, PNG export) and HTML tables for evcxr.
//! - [`notebook`]: the notebook's configuration, profiles and summary table.
//! - [`synthetic`]: generated learnable datasets for tests, smoke runs and benchmarks.
//! - [`bench`]: throughput figures (`tucker-nb bench`).

pub mod bench;
pub mod cache;
pub mod compress;
pub mod conv;
pub mod data;
pub mod decompose;
pub mod display;
pub mod error;
pub mod experiment;
pub mod export;
pub mod figures;
pub(crate) mod frame;
pub(crate) mod io;
pub mod layout;
pub mod loader;
pub mod lock;
pub mod model;
pub mod notebook;
pub mod plots;
pub(crate) mod progress;
pub mod report;
pub mod runtime;
pub mod sweep;
pub mod synthetic;
pub(crate) mod tensor_file;
pub mod timing;
pub mod torch_pickle;
pub mod train;

pub use compress::cost::Cost;
pub use compress::policy::{CompressionPolicy, Fit, Fraction, RankPolicy};
pub use compress::{compress_model, factorise};
pub use data::{DataSource, Dataset, Split, StorageOptions};
pub use decompose::Method;
pub use display::Html;
pub use error::{Error, Result};
pub use experiment::{Calibration, RunConfig, Stages};
pub use figures::ModelFigures;
pub use frame::write_frame_csv;
pub use io::{read_state_dict, Outputs};
pub use loader::{Loader, Transform};
pub use model::ResNet18;
pub use notebook::{ModelSummary, NotebookConfig};
pub use plots::Chart;
pub use polars::prelude::DataFrame;
pub use report::CompressionReport;
pub use train::{
    evaluate, evaluate_as, fine_tune, recalibrate_bn, BnMode, EvalResult, FineTune, FineTuneConfig,
    History, Recipe, Trainable,
};
