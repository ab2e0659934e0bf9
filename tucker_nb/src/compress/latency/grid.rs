//! The rank grid a latency table measures, and how a form between grid points is priced.

use crate::conv::{ConvGeometry, Form};

/// The ranks measured for a mode of `dim` channels at `step`: s, 2s, 3s, 4s, 6s, 8s, 12s, …
/// below `dim`, then `dim` (only `dim` when it is at most one step).
pub fn measured_ranks(dim: i64, step: i64) -> Vec<i64> {
    let step = step.max(1);
    let mut ranks = Vec::new();
    let mut k = 1i64;
    while k * step < dim {
        ranks.push(k * step);
        if 3 * k * step / 2 < dim && k >= 2 {
            ranks.push(3 * k * step / 2);
        }
        k *= 2;
    }
    ranks.dedup();
    ranks.push(dim);
    ranks
}

/// The measured axes of `form`'s varying ranks on a conv of `shape`, and its point on them.
fn axes(form: Form, [c_out, c_in, _, _]: [i64; 4], step: i64) -> (Vec<Vec<i64>>, Vec<i64>) {
    let m = |dim| measured_ranks(dim, step);
    match form {
        Form::Dense => (vec![], vec![]),
        Form::Tucker2 { r_out, r_in } => {
            // A kept whole input (the RGB stem) is not a varying rank.
            let ins = if r_in == c_in { vec![c_in] } else { m(c_in) };
            (vec![m(c_out), ins], vec![r_out, r_in])
        }
        Form::Tucker1Out { r_out, .. } => (vec![m(c_out)], vec![r_out]),
        Form::Tucker1In { r_in, .. } => (vec![m(c_in)], vec![r_in]),
        Form::Svd { rank } | Form::Cp { rank } => (vec![m(c_out.min(c_in))], vec![rank]),
    }
}

/// `form` with its varying ranks set to `ranks`.
fn with_ranks(form: Form, ranks: &[i64]) -> Form {
    match form {
        Form::Dense => Form::Dense,
        Form::Tucker2 { .. } => Form::Tucker2 {
            r_out: ranks[0],
            r_in: ranks[1],
        },
        Form::Tucker1Out { c_in, .. } => Form::Tucker1Out {
            r_out: ranks[0],
            c_in,
        },
        Form::Tucker1In { c_out, .. } => Form::Tucker1In {
            c_out,
            r_in: ranks[0],
        },
        Form::Svd { .. } => Form::Svd { rank: ranks[0] },
        Form::Cp { .. } => Form::Cp { rank: ranks[0] },
    }
}

/// The grid neighbours of `r` on `axis` and the weight of the upper one.
fn bracket(axis: &[i64], r: i64) -> [(i64, f64); 2] {
    let last = *axis.last().expect("an axis has a point");
    if r <= axis[0] {
        return [(axis[0], 1.0), (axis[0], 0.0)];
    }
    if r >= last {
        return [(last, 1.0), (last, 0.0)];
    }
    let i = axis
        .iter()
        .rposition(|&a| a <= r)
        .expect("r is above the first point");
    let (lo, hi) = (axis[i], axis[i + 1]);
    let w = (r - lo) as f64 / (hi - lo) as f64;
    [(lo, 1.0 - w), (hi, w)]
}

/// The measured forms whose weighted sum prices `form`: its grid corners and their weights.
pub(super) fn corners(form: Form, shape: [i64; 4], step: i64) -> Vec<(Form, f64)> {
    let (axes, point) = axes(form, shape, step);
    let mut out: Vec<(Vec<i64>, f64)> = vec![(vec![], 1.0)];
    for (axis, &r) in axes.iter().zip(&point) {
        out = out
            .into_iter()
            .flat_map(|(ranks, w)| {
                bracket(axis, r).into_iter().map(move |(a, wa)| {
                    let mut ranks = ranks.clone();
                    ranks.push(a);
                    (ranks, w * wa)
                })
            })
            .filter(|(_, w)| *w > 0.0)
            .collect();
    }
    out.into_iter()
        .map(|(ranks, w)| (with_ranks(form, &ranks), w))
        .collect()
}

/// The key of one entry: the conv's geometry, its input size and the form.
pub fn entry_key(geometry: &ConvGeometry, input: [i64; 2], form: Form) -> String {
    let [o, i, kh, kw] = geometry.shape;
    let c = geometry.config;
    let ranks = form
        .ranks()
        .map_or(String::new(), |(a, b)| format!(" {a},{b}"));
    format!(
        "{o}x{i}x{kh}x{kw} s{:?} p{:?} d{:?} in {}x{} {}{ranks}",
        c.stride,
        c.padding,
        c.dilation,
        input[0],
        input[1],
        form.name()
    )
}

/// The key of the outside time of a model with `classes` outputs at `image` px.
pub(super) fn outside_key(classes: i64, image: [i64; 2]) -> String {
    format!(
        "outside the conv slots: {classes} classes, {}x{} px",
        image[0], image[1]
    )
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_ranks_are_multiples_of_the_step_about_one_and_a_half_apart() {
        assert_eq!(measured_ranks(64, 8), vec![8, 16, 24, 32, 48, 64]);
        assert_eq!(
            measured_ranks(512, 32),
            vec![32, 64, 96, 128, 192, 256, 384, 512]
        );
        assert_eq!(measured_ranks(3, 8), vec![3]);
        assert_eq!(measured_ranks(8, 8), vec![8]);
    }
}
