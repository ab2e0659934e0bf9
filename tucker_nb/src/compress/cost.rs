//! What a budget counts: cost models that price a conv slot as it is and each factorisation of it
//! (`budget-macs:F`, `budget-params:F`). The budget planner (`budget.rs`) only adds and compares
//! these prices, as `f64`, so a new cost (time measured on a device, say) is a new variant here
//! and nothing else changes.

use crate::conv::{ConvGeometry, Form};
use crate::error::{Error, Result};

/// A budget's cost model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cost {
    /// Multiply-accumulates of the conv at the policy's input size.
    Macs,
    /// The conv's parameters.
    Params,
}

impl Cost {
    /// Every cost model, in the order the help lists them.
    pub const ALL: [Cost; 2] = [Cost::Macs, Cost::Params];

    /// The model named `name`, as spelled in `budget-NAME:F`.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(Cost::name).collect();
                Error::value(
                    "budget cost",
                    format!("`{name}` (expected one of {})", known.join(", ")),
                )
            })
    }

    /// The spelling in `budget-NAME:F`.
    pub fn name(&self) -> &'static str {
        match self {
            Cost::Macs => "macs",
            Cost::Params => "params",
        }
    }

    /// What the report says the budget counts.
    pub fn label(&self) -> &'static str {
        match self {
            Cost::Macs => "MACs",
            Cost::Params => "params",
        }
    }

    /// The cost of a conv of `geometry` reading `input` = [H, W], factorised as `form`
    /// (`Form::Dense` for the dense conv).
    pub fn of_form(&self, geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64 {
        match self {
            Cost::Macs => form.macs(geometry, input).0 as f64,
            Cost::Params => form.params(geometry.shape) as f64,
        }
    }

    /// The cost of a slot as it is now (dense, or factorised by an earlier stage).
    pub fn of_current(&self, current: SlotCost) -> f64 {
        match self {
            Cost::Macs => current.macs as f64,
            Cost::Params => current.params as f64,
        }
    }
}

/// The MACs (at the plan's input size) and parameters of a conv slot as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCost {
    pub macs: i64,
    pub params: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cost_is_found_by_its_spelling_and_an_unknown_one_is_named() {
        for cost in Cost::ALL {
            assert_eq!(Cost::from_name(cost.name()).unwrap(), cost);
        }
        let err = Cost::from_name("joules").unwrap_err().to_string();
        assert!(
            err.contains("`joules`") && err.contains("macs, params"),
            "{err}"
        );
    }
}
