//! `bench`'s compression figures: the seconds to compress the dense model in-process (its load
//! and save excluded) with the seed's ratio rule, with `budget-macs` at the same fraction, and
//! with the run's policy when it is neither; and, with a python, the seed's `TuckerCompressor` on
//! the same weights and thread count. Every policy and the seed's compressor take one turn per
//! round, so all figures come from the same moments of a noisy machine.

use tch::Device;

use super::python::SeedCompressor;
use super::BenchConfig;
use crate::compress::compress_model;
use crate::compress::cost::Cost;
use crate::compress::policy::{CompressionPolicy, Fraction, RankPolicy};
use crate::error::{Error, Result};
use crate::model::ResNet18;
use crate::timing::{median, timed};

/// One compressor's median seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompressTime {
    /// The policy (`ratio:R`, `budget-macs:F`, …), or `seed TuckerCompressor ratio:R`.
    pub what: String,
    pub seconds: f64,
}

/// The seed's ratio (the run's, or 0.2 when its policy is not the ratio rule) and the policies
/// to time: the ratio rule, `budget-macs` at that fraction, and the run's policy.
fn policies(run_policy: &RankPolicy) -> (f64, Vec<RankPolicy>) {
    let ratio = match run_policy {
        RankPolicy::Ratio(r) => r.get(),
        _ => 0.2,
    };
    let fraction = Fraction::new("ratio", ratio).expect("a ratio is a fraction");
    let mut list = vec![
        RankPolicy::Ratio(fraction),
        RankPolicy::Budget {
            cost: Cost::Macs,
            fraction,
            cp: false,
        },
    ];
    if !list.contains(run_policy) {
        list.push(run_policy.clone());
    }
    (ratio, list)
}

/// Times each compressor `config.compress_repeats` times in rounds, after one untimed round.
pub(super) fn compress_times(
    config: &BenchConfig,
    original: &ResNet18,
) -> Result<Vec<CompressTime>> {
    let run = &config.run;
    let size = run.image_size;
    let (ratio, ranks) = policies(&run.policy.ranks);
    let policies: Vec<CompressionPolicy> = ranks
        .into_iter()
        .map(|ranks| {
            run.timed(&CompressionPolicy {
                ranks,
                input_size: [size, size],
                ..run.policy.clone()
            })
        })
        .collect();
    let files = tempfile::tempdir().map_err(|e| Error::file(std::env::temp_dir(), e))?;
    let mut seed = match &config.seed_python {
        Some(python) => {
            let file = files.path().join("original.safetensors");
            original.save(&file)?;
            Some(SeedCompressor::spawn(python, &file, ratio)?)
        }
        None => None,
    };
    let mut seconds = vec![Vec::new(); policies.len() + 1];
    for round in 0..=config.compress_repeats {
        for (policy, times) in policies.iter().zip(&mut seconds) {
            let mut model = original.deep_copy();
            let (done, s) = timed(Device::Cpu, || compress_model(&mut model, policy));
            done?;
            if round > 0 {
                times.push(s);
            }
        }
        if let Some(seed) = &mut seed {
            let s = seed.timed()?;
            if round > 0 {
                seconds[policies.len()].push(s);
            }
        }
    }
    let mut names: Vec<String> = policies.iter().map(|p| p.ranks.to_string()).collect();
    names.push(format!("seed TuckerCompressor ratio:{ratio}"));
    Ok(names
        .into_iter()
        .zip(seconds)
        .filter(|(_, s)| !s.is_empty())
        .map(|(what, s)| CompressTime {
            what,
            seconds: median(s),
        })
        .collect())
}

/// The table: each compressor's median seconds, and its time over the seed's rule's (ours) and
/// over the seed's compressor.
pub(super) fn print_compress_times(rows: &[CompressTime], repeats: usize) {
    println!("\n== compress the dense model ({repeats} rounds, medians, in-process) ==");
    println!(
        "{:<36} {:>9} {:>10} {:>10}",
        "compressor", "seconds", "/ ratio", "/ seed's"
    );
    let seed = rows
        .iter()
        .find(|r| r.what.starts_with("seed"))
        .map(|r| r.seconds);
    for r in rows {
        let over_seed = seed.map_or("-".into(), |s| format!("{:.2}", r.seconds / s));
        println!(
            "{:<36} {:>9.2} {:>10.2} {:>10}",
            r.what,
            r.seconds,
            r.seconds / rows[0].seconds,
            over_seed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_rule_and_a_budget_at_its_fraction_are_always_timed() {
        let (ratio, list) = policies(&RankPolicy::ratio(0.3).unwrap());
        assert_eq!(ratio, 0.3);
        let names: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["ratio:0.3", "budget-macs:0.3"]);
        let (ratio, list) = policies(&"budget-latency:0.5".parse().unwrap());
        assert_eq!(ratio, 0.2);
        let names: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            ["ratio:0.2", "budget-macs:0.2", "budget-latency:0.5"]
        );
    }
}
