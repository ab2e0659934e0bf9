//! How a conv slot is factorised ([`Form`]), and what each form costs: the one cost model that
//! layers, reports and the planner count multiply-accumulates and parameters through.

use crate::conv::ConvGeometry;

/// How a conv slot is factorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    Dense,
    /// 1×1 → k×k core → 1×1, ranks (r_out, r_in).
    Tucker2 {
        r_out: i64,
        r_in: i64,
    },
    /// 1×1 → 1×1 (1×1 convs only), rank r.
    Svd {
        rank: i64,
    },
    /// k×k to r_out channels → 1×1: Tucker-1 on the output mode (the input kept whole, C_in).
    Tucker1Out {
        r_out: i64,
        c_in: i64,
    },
    /// 1×1 to r_in channels → k×k: Tucker-1 on the input mode (the output kept whole, C_out).
    Tucker1In {
        c_out: i64,
        r_in: i64,
    },
    /// 1×1 → depthwise kh×1 → depthwise 1×kw → 1×1 (k×k convs only): CP of rank `rank`.
    Cp {
        rank: i64,
    },
}

impl Form {
    /// `dense`, `tucker2`, `svd`, `tucker1-out`, `tucker1-in` or `cp`.
    pub fn name(&self) -> &'static str {
        match self {
            Form::Dense => "dense",
            Form::Tucker2 { .. } => "tucker2",
            Form::Svd { .. } => "svd",
            Form::Tucker1Out { .. } => "tucker1-out",
            Form::Tucker1In { .. } => "tucker1-in",
            Form::Cp { .. } => "cp",
        }
    }

    /// The form [`Self::name`] and [`Self::ranks`] describe, if any.
    pub fn from_name(name: &str, ranks: Option<(i64, i64)>) -> Option<Form> {
        Some(match (name, ranks) {
            ("dense", None) => Form::Dense,
            ("tucker2", Some((r_out, r_in))) => Form::Tucker2 { r_out, r_in },
            ("svd", Some((rank, other))) if rank == other => Form::Svd { rank },
            ("tucker1-out", Some((r_out, c_in))) => Form::Tucker1Out { r_out, c_in },
            ("tucker1-in", Some((c_out, r_in))) => Form::Tucker1In { c_out, r_in },
            ("cp", Some((rank, other))) if rank == other => Form::Cp { rank },
            _ => return None,
        })
    }

    /// (r_out, r_in); an SVD's or a CP's single rank is both, and Tucker-1 keeps one mode whole.
    pub fn ranks(&self) -> Option<(i64, i64)> {
        match *self {
            Form::Dense => None,
            Form::Tucker2 { r_out, r_in } => Some((r_out, r_in)),
            Form::Svd { rank } | Form::Cp { rank } => Some((rank, rank)),
            Form::Tucker1Out { r_out, c_in } => Some((r_out, c_in)),
            Form::Tucker1In { c_out, r_in } => Some((c_out, r_in)),
        }
    }

    /// (multiply-accumulates for one image, output [H, W]) of a conv of `geometry` in this form,
    /// for an input of [H, W]; each layer counted at the resolution it reads:
    ///
    /// - dense: C_out·(C_in/groups)·kh·kw·H_out·W_out;
    /// - Tucker-2: C_in·r_in·H_in·W_in + (r_out·r_in·kh·kw + C_out·r_out)·H_out·W_out;
    /// - SVD: (C_in + C_out)·r·H_out·W_out (a strided 1×1 samples first);
    /// - Tucker-1, output mode: (C_in·r_out·kh·kw + C_out·r_out)·H_out·W_out;
    /// - Tucker-1, input mode: C_in·r_in·H_in·W_in + C_out·r_in·kh·kw·H_out·W_out;
    /// - CP: C_in·R·H_in·W_in + R·kh·H_out·W_in + R·kw·H_out·W_out + C_out·R·H_out·W_out (the
    ///   height pass runs at the input's width).
    pub fn macs(&self, geometry: &ConvGeometry, input: [i64; 2]) -> (i64, [i64; 2]) {
        let [o, i, kh, kw] = geometry.shape;
        let output = geometry.config.output(input, geometry.kernel());
        let out = output[0] * output[1];
        let macs = match *self {
            Form::Dense => o * (i / geometry.config.groups) * kh * kw * out,
            Form::Tucker2 { r_out, r_in } => {
                i * r_in * input[0] * input[1] + (r_out * r_in * kh * kw + o * r_out) * out
            }
            Form::Svd { rank } => (i + o) * rank * out,
            Form::Tucker1Out { r_out, .. } => (i * r_out * kh * kw + o * r_out) * out,
            Form::Tucker1In { r_in, .. } => {
                i * r_in * input[0] * input[1] + o * r_in * kh * kw * out
            }
            Form::Cp { rank } => {
                rank * (i * input[0] * input[1] + kh * output[0] * input[1] + (kw + o) * out)
            }
        };
        (macs, output)
    }

    /// Parameters of a conv of dense shape `shape` in this form: the kernels, plus the last
    /// layer's bias for a factorisation (which always carries one).
    pub fn params(&self, [o, i, kh, kw]: [i64; 4]) -> i64 {
        match *self {
            Form::Dense => o * i * kh * kw,
            Form::Tucker2 { r_out, r_in } => i * r_in + r_out * r_in * kh * kw + o * r_out + o,
            Form::Svd { rank } => (i + o) * rank + o,
            Form::Tucker1Out { r_out, .. } => i * r_out * kh * kw + o * r_out + o,
            Form::Tucker1In { r_in, .. } => i * r_in + o * r_in * kh * kw + o,
            Form::Cp { rank } => rank * (i + kh + kw + o) + o,
        }
    }
}
