//! Timing, one way for the notebook's latency and `bench`'s throughput: untimed warm-up calls,
//! each timed call ended by a sync of the device (CUDA runs asynchronously), medians.

use std::time::Instant;

use tch::Device;

use crate::runtime::synchronize;

/// The median of `values` (the upper middle one of an even count). `values` must not be empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "the median of no values");
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// `f`'s result and the seconds from its start to the end of the work it queued on `device`.
pub fn timed<T>(device: Device, f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = f();
    synchronize(device);
    (value, start.elapsed().as_secs_f64())
}

/// The median seconds of `runs` (at least 1) timed calls of `f` on `device`, after `warmups`
/// untimed ones (autotuning, allocator, caches).
pub fn median_seconds(device: Device, warmups: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmups {
        f();
    }
    synchronize(device);
    median((0..runs.max(1)).map(|_| timed(device, &mut f).1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value_whatever_the_order() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(vec![7.0]), 7.0);
    }

    #[test]
    fn median_seconds_runs_the_warm_ups_untimed_and_times_each_run() {
        let mut calls = 0;
        let seconds = median_seconds(Device::Cpu, 2, 3, || {
            calls += 1;
            std::thread::sleep(std::time::Duration::from_millis(5));
        });
        assert_eq!(calls, 5);
        assert!((0.004..1.0).contains(&seconds), "{seconds}");
    }
}
