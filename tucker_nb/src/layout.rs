//! Memory layouts of 4-D tensors: contiguous (NCHW, the seed's) or channels-last (NHWC). Convs,
//! the model and the optimiser's flat buffers all lay tensors out through these.

use tch::Tensor;

/// `t` (N × C × H × W) with NHWC strides: the same values, channels innermost.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-D tensor is laid out channels-last (and, with one channel or 1×1 pixels,
/// ambiguous layouts count as both).
pub fn is_channels_last(t: &Tensor) -> bool {
    t.dim() == 4 && t.permute([0, 2, 3, 1]).is_contiguous()
}

/// `t` laid out channels-last or contiguous (itself when it already is).
pub fn laid_out(t: &Tensor, channels_last: bool) -> Tensor {
    match channels_last {
        true if !is_channels_last(t) => to_channels_last(t),
        true => t.shallow_clone(),
        false => t.contiguous(),
    }
}

/// A 4-D `t` laid out as `like` is: channels-last when `like` is, else contiguous.
pub fn laid_out_like(t: &Tensor, like: &Tensor) -> Tensor {
    laid_out(t, is_channels_last(like))
}
