//! tucker_nb: Tucker-2 compression of an ImageNet-pretrained ResNet18 on tch (libtorch).
//!
//! - [`runtime`]: process set-up (libtorch's CUDA backend) and device choice; call
//!   [`runtime::init`] first.
//! - [`model`]: ResNet18 as a plain struct tree with torchvision's names and swappable conv slots.
//! - [`conv`]: dense and Tucker-2 conv layers.
//! - [`compressor`]: HOSVD Tucker-2 factorisation, rank policies, `compress_model`.
//! - [`report`]: the per-layer compression report.
//! - [`io`]: state_dict files and atomic writes.

pub mod compressor;
pub mod conv;
pub mod error;
pub mod io;
pub mod model;
pub mod report;
pub mod runtime;
pub mod torch_pickle;

pub use compressor::{compress_model, CompressionPolicy, RankPolicy};
pub use error::{Error, Result};
pub use model::ResNet18;
pub use report::CompressionReport;
