//! What to compress and how: rank policies, parsed and validated once. A policy only describes;
//! the planner (`plan.rs`, `budget.rs` beside this file) turns it into per-layer choices.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use crate::compress::cost::Cost;
use crate::compress::latency::TimingSettings;
use crate::decompose::Method;
use crate::error::{Error, Result};

/// A number in (0, 1]: a ratio, an energy share or a budget. Only [`Fraction::new`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, serde::Serialize)]
#[serde(transparent)]
pub struct Fraction(f64);

impl Fraction {
    /// `value` must lie in (0, 1]; `what` names it in the error.
    pub fn new(what: &str, value: f64) -> Result<Self> {
        if value > 0.0 && value <= 1.0 {
            Ok(Self(value))
        } else {
            Err(Error::value(what, format!("{value} (must be in (0, 1])")))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl std::fmt::Display for Fraction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How the (r_out, r_in) of each conv are chosen. Build one with [`RankPolicy::ratio`],
/// [`str::parse`] (`"budget-macs:0.2"`) or [`RankPolicy::from_ranks_file`]: the fractions inside
/// are validated [`Fraction`]s.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RankPolicy {
    /// The seed's rule: `max(1, int(C · ratio))` for each mode, every conv compressed. One
    /// deliberate difference: a conv reading the RGB image keeps its full input rank; the seed
    /// squeezes conv1's colour input to rank 1.
    Ratio(Fraction),
    /// (r_out, r_in) for the named layers; the others stay dense.
    Explicit(BTreeMap<String, (i64, i64)>),
    /// Per mode, the smallest rank keeping this share of the unfolding's squared singular values.
    Energy(Fraction),
    /// Per mode, the rank EVBMF estimates (Kim et al. 2016); at least 1.
    Vbmf,
    /// One budget for the whole model: this fraction of its convs' cost, as the cost model counts
    /// it (MACs at the policy's input size, or parameters); with `cp` (`+cp`) the k×k convs may
    /// also take CP on a coarse rank grid, each rank priced by its fitted error.
    Budget {
        cost: Cost,
        fraction: Fraction,
        cp: bool,
    },
    /// CP of every k×k conv at rank max(1, ⌊R · min(C_in, C_out)⌋), a 1×1 conv's SVD at the same
    /// rule; the RGB stem stays dense unless `stem` (`+stem`).
    Cp { fraction: Fraction, stem: bool },
}

impl RankPolicy {
    /// The seed's rule; `ratio` must lie in (0, 1].
    pub fn ratio(ratio: f64) -> Result<Self> {
        Ok(RankPolicy::Ratio(Fraction::new("ratio", ratio)?))
    }

    /// A budget of `fraction` of the model's `cost`; `fraction` must lie in (0, 1].
    pub fn budget(cost: Cost, fraction: f64) -> Result<Self> {
        let what = format!("budget-{}", cost.name());
        Ok(RankPolicy::Budget {
            fraction: Fraction::new(&what, fraction)?,
            cost,
            cp: false,
        })
    }

    /// Reads a JSON object `{"layer1.0.conv1": [r_out, r_in], ...}`.
    pub fn from_ranks_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let ranks: BTreeMap<String, (i64, i64)> = serde_json::from_str(&text).map_err(|e| {
            Error::file(
                path,
                format!("expected {{\"layer\": [r_out, r_in], ...}}: {e}"),
            )
        })?;
        Ok(RankPolicy::Explicit(ranks))
    }

    /// Whether the policy applies a fixed rule to dense convs (ratio, explicit ranks, CP) rather
    /// than reading the kernels (energy, VBMF, budgets).
    pub fn is_rule_based(&self) -> bool {
        matches!(
            self,
            RankPolicy::Ratio(_) | RankPolicy::Explicit(_) | RankPolicy::Cp { .. }
        )
    }

    /// Whether the policy's plan may contain CP layers.
    pub fn uses_cp(&self) -> bool {
        matches!(
            self,
            RankPolicy::Cp { .. } | RankPolicy::Budget { cp: true, .. }
        )
    }

    /// HOSVD for the seed-compatible policies (ratio, explicit ranks), HOOI otherwise.
    pub fn default_method(&self) -> Method {
        if self.is_rule_based() {
            Method::Hosvd
        } else {
            Method::Hooi
        }
    }
}

/// `ratio:0.2`, `energy:0.9`, `vbmf`, `cp:0.25` (`cp:0.25+stem`), `budget-macs:0.33` or
/// `budget-params:0.25` (`+cp`: CP allowed).
impl FromStr for RankPolicy {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (kind, value) = spec.split_once(':').unwrap_or((spec, ""));
        let (value, option) = match value.split_once('+') {
            Some((v, o)) => (v, Some(o)),
            None => (value, None),
        };
        let bad_option = |o: &str| {
            Error::value(
                "policy",
                format!(
                    "`{spec}`: {kind} takes no `+{o}` (+cp goes with budget-…, +stem with cp:)"
                ),
            )
        };
        let no_option = |policy: RankPolicy| match option {
            None => Ok(policy),
            Some(o) => Err(bad_option(o)),
        };
        let fraction = || {
            let number = value.parse::<f64>().map_err(|_| {
                Error::value(
                    "policy",
                    format!("`{spec}`: {kind} needs a number, as {kind}:0.5"),
                )
            })?;
            Fraction::new(kind, number)
        };
        let unknown = || {
            let budgets: Vec<String> = Cost::ALL
                .iter()
                .map(|c| format!("budget-{}:F", c.name()))
                .collect();
            Error::value(
                "policy",
                format!(
                    "`{spec}` (expected ratio:R, energy:E, vbmf, cp:R, {}, a budget with +cp)",
                    budgets.join(" or ")
                ),
            )
        };
        match kind {
            "ratio" => no_option(RankPolicy::Ratio(fraction()?)),
            "energy" => no_option(RankPolicy::Energy(fraction()?)),
            "vbmf" if value.is_empty() => no_option(RankPolicy::Vbmf),
            "cp" if matches!(option, None | Some("stem")) => Ok(RankPolicy::Cp {
                fraction: fraction()?,
                stem: option.is_some(),
            }),
            "cp" => Err(bad_option(option.unwrap_or_default())),
            _ => match kind.strip_prefix("budget-").map(Cost::from_name) {
                Some(Ok(cost)) if matches!(option, None | Some("cp")) => Ok(RankPolicy::Budget {
                    cost,
                    fraction: fraction()?,
                    cp: option.is_some(),
                }),
                Some(Ok(_)) => Err(bad_option(option.unwrap_or_default())),
                _ => Err(unknown()),
            },
        }
    }
}

/// The spec [`RankPolicy::from_str`] reads (`explicit` for per-layer ranks).
impl std::fmt::Display for RankPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankPolicy::Ratio(r) => write!(f, "ratio:{r}"),
            RankPolicy::Explicit(_) => write!(f, "explicit"),
            RankPolicy::Energy(e) => write!(f, "energy:{e}"),
            RankPolicy::Vbmf => write!(f, "vbmf"),
            RankPolicy::Budget { cost, fraction, cp } => {
                let option = if *cp { "+cp" } else { "" };
                write!(f, "budget-{}:{fraction}{option}", cost.name())
            }
            RankPolicy::Cp { fraction, stem } => {
                write!(f, "cp:{fraction}{}", if *stem { "+stem" } else { "" })
            }
        }
    }
}

/// What the factors are fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fit {
    /// The kernel: minimise ‖W − Ŵ‖ (the seed's HOSVD, or HOOI).
    Weights,
    /// The layer's outputs on calibration data: output-PCA for the output mode, the input mode
    /// whitened by the input covariance (`decompose::tucker2_whitened`).
    Data,
}

/// What to compress and how; defaults mirror the seed (ratio 0.2, costs counted at 224 px).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CompressionPolicy {
    pub ranks: RankPolicy,
    /// Image size [H, W] at which MACs are counted (and budgets measured).
    pub input_size: [i64; 2],
    /// `None`: the rank policy's default ([`RankPolicy::default_method`]).
    pub method: Option<Method>,
    /// Round automatically chosen ranks up to a multiple of this (8 suits tensor cores).
    pub round_to: Option<i64>,
    /// `None`: fit data-driven policies to data when calibration data is given, the rule-based
    /// ones (the seed's) to the weights.
    pub fit: Option<Fit>,
    /// What a latency budget is measured at (batch, dtype, BN folding, cache).
    #[serde(skip_serializing_if = "TimingSettings::is_default")]
    pub timing: TimingSettings,
}

impl Default for CompressionPolicy {
    fn default() -> Self {
        Self {
            ranks: RankPolicy::Ratio(Fraction(0.2)),
            input_size: [224, 224],
            method: None,
            round_to: None,
            fit: None,
            timing: TimingSettings::default(),
        }
    }
}

impl CompressionPolicy {
    pub fn new(ranks: RankPolicy) -> Self {
        Self {
            ranks,
            ..Self::default()
        }
    }

    /// The fitting method in force.
    pub fn method(&self) -> Method {
        self.method.unwrap_or_else(|| self.ranks.default_method())
    }

    /// What the factors are fitted to: `fit`, else data for the data-driven policies and the
    /// weights for the rule-based ones (the seed's).
    pub fn fit(&self) -> Fit {
        match (self.fit, self.ranks.is_rule_based()) {
            (Some(fit), _) => fit,
            (None, true) => Fit::Weights,
            (None, false) => Fit::Data,
        }
    }

    /// Whether the policy is a latency budget (its plan is priced by times measured on the
    /// device, and its result is timed against the model before).
    pub fn is_timed(&self) -> bool {
        matches!(
            self.ranks,
            RankPolicy::Budget {
                cost: Cost::Latency,
                ..
            }
        )
    }

    /// This policy with other ranks (same input size, method and rounding).
    pub fn with_ranks(&self, ranks: RankPolicy) -> Self {
        Self {
            ranks,
            ..self.clone()
        }
    }

    /// Checks the settings that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = self.round_to {
            if m < 1 {
                return Err(Error::value("round_to", format!("{m} (must be ≥ 1)")));
            }
        }
        self.timing.validate()?;
        if self.input_size.iter().any(|&s| s < 1) {
            return Err(Error::value(
                "image size",
                format!("{:?} (must be ≥ 1)", self.input_size),
            ));
        }
        Ok(())
    }

    /// Checks that this policy can compress an already compressed model further: the rule-based
    /// ones only touch dense convs, so as a later stage they would silently do nothing.
    pub fn validate_as_stage(&self) -> Result<()> {
        self.validate()?;
        if self.ranks.is_rule_based() {
            return Err(Error::value(
                "stage policy",
                format!(
                    "`{}` (a further stage needs energy:, vbmf or a budget: the {} rule only \
                     compresses dense convs)",
                    self.ranks, self.ranks
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_outside_zero_one_are_refused_with_their_value() {
        assert!(RankPolicy::ratio(0.0).is_err() && RankPolicy::ratio(1.5).is_err());
        assert!(RankPolicy::ratio(f64::NAN)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        let err = "budget-macs:2".parse::<RankPolicy>().unwrap_err();
        assert!(err.to_string().contains("budget-macs") && err.to_string().contains('2'));
        assert!("energy:x".parse::<RankPolicy>().is_err());
        assert!("vbmf:3".parse::<RankPolicy>().is_err());
        for bad in [
            "cp:0",
            "cp:2",
            "cp:x",
            "cp:0.2+cp",
            "ratio:0.2+cp",
            "budget-macs:0.2+stem",
        ] {
            let err = bad.parse::<RankPolicy>().unwrap_err().to_string();
            assert!(
                err.contains(bad.split(['+', ':']).next().unwrap()),
                "{bad}: {err}"
            );
        }
        assert!("cp:0"
            .parse::<RankPolicy>()
            .unwrap_err()
            .to_string()
            .contains("(0, 1]"));
    }

    #[test]
    fn specs_round_trip_through_display() {
        for spec in [
            "ratio:0.2",
            "energy:0.9",
            "vbmf",
            "budget-macs:0.33",
            "budget-params:0.25",
            "budget-macs:0.1+cp",
            "cp:0.25",
            "cp:0.5+stem",
        ] {
            assert_eq!(spec.parse::<RankPolicy>().unwrap().to_string(), spec);
        }
    }

    #[test]
    fn rule_based_policies_are_refused_as_later_stages() {
        let stage = CompressionPolicy::new(RankPolicy::ratio(0.2).unwrap());
        let err = stage.validate_as_stage().unwrap_err().to_string();
        assert!(err.contains("ratio:0.2") && err.contains("stage"), "{err}");
        let budget = stage.with_ranks("budget-macs:0.2".parse().unwrap());
        assert!(budget.validate_as_stage().is_ok());
    }
}
