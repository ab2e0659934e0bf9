//! What a budget counts: cost models that price a conv slot as it is and each factorisation of it
//! (`budget-macs:F`, `budget-params:F`, `budget-latency:F`). The budget planner (`budget.rs`)
//! only adds and compares these prices, as `f64`, through [`Price`]: MACs and parameters are
//! counted here, time is measured on the device (`latency.rs`, a table that also implements it).

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
    /// Eval forward time measured on the device in use (`latency.rs`).
    Latency,
}

impl Cost {
    /// Every cost model, in the order the help lists them.
    pub const ALL: [Cost; 3] = [Cost::Macs, Cost::Params, Cost::Latency];

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
            Cost::Latency => "latency",
        }
    }

    /// What the report says the budget counts.
    pub fn label(&self) -> &'static str {
        match self {
            Cost::Macs => "MACs",
            Cost::Params => "params",
            Cost::Latency => "latency",
        }
    }

    /// The counted cost this is, `None` for one measured on the device.
    pub fn counted(&self) -> Option<Counted> {
        match self {
            Cost::Macs => Some(Counted::Macs),
            Cost::Params => Some(Counted::Params),
            Cost::Latency => None,
        }
    }
}

/// What a budget planner asks of a cost model: the price of a slot in a form, as it is now, and
/// what the model costs outside its slots.
pub trait Price {
    /// What the report says the budget counts.
    fn label(&self) -> &'static str;
    /// The cost of a conv of `geometry` reading `input` = [H, W], factorised as `form`
    /// (`Form::Dense` for the dense conv).
    fn of_form(&self, geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64;
    /// The cost of a slot as it is now (dense, or factorised by an earlier stage).
    fn of_current(&self, geometry: &ConvGeometry, input: [i64; 2], current: SlotCost) -> f64;
    /// The model's cost outside its conv slots (no plan changes it).
    fn fixed(&self) -> f64 {
        0.0
    }
    /// Whether the prices are times in milliseconds (the report then shows them per layer).
    fn is_time(&self) -> bool {
        false
    }
}

/// A cost counted from the shapes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Macs,
    Params,
}

impl Price for Counted {
    fn label(&self) -> &'static str {
        match self {
            Counted::Macs => "MACs",
            Counted::Params => "params",
        }
    }

    fn of_form(&self, geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64 {
        match self {
            Counted::Macs => form.macs(geometry, input).0 as f64,
            Counted::Params => form.params(geometry.shape) as f64,
        }
    }

    fn of_current(&self, _: &ConvGeometry, _: [i64; 2], current: SlotCost) -> f64 {
        match self {
            Counted::Macs => current.macs as f64,
            Counted::Params => current.params as f64,
        }
    }
}

/// The form, MACs (at the plan's input size) and parameters of a conv slot as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCost {
    pub form: Form,
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
            err.contains("`joules`") && err.contains("macs, params, latency"),
            "{err}"
        );
    }
}
