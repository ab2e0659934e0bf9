//! Other processes' use of the CPU while a table is measured on it. A load that changes during
//! the measurement shows in the model's time before and after the entries (`table::unsteady`);
//! one that lasts the whole measurement does not, yet it slows every entry (spin-waiting OpenMP
//! threads on a core another process holds) and skews the plan. So the machine's busy time is read
//! before and after, less this process's own: what is left is the other processes' share.

/// How far the cores left to this process may fall short of its threads before a table is
/// called crowded: half a core, above what a shell, a notebook server or a test harness uses.
const CROWDED_SLACK: f64 = 0.5;

/// The machine's busy and total CPU time and this process's own, in clock ticks, at one moment
/// (Linux's `/proc/stat` and `/proc/self/stat`; the ticks cancel in [`CpuSample::others_cores`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuSample {
    busy: u64,
    total: u64,
    own: u64,
    cpus: usize,
}

impl CpuSample {
    /// Now, or `None` where `/proc` does not say (not Linux).
    pub(super) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let (busy, total, cpus) = parse_machine(&stat)?;
        Some(CpuSample {
            busy,
            total,
            own: parse_own(&own)?,
            cpus,
        })
    }

    /// The cores other processes kept busy on average from `self` to `later`.
    pub(super) fn others_cores(&self, later: &CpuSample) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        let busy = later.busy.saturating_sub(self.busy);
        let own = later.own.saturating_sub(self.own);
        busy.saturating_sub(own) as f64 / total as f64 * self.cpus as f64
    }

    /// The cores this process may run on: the machine's, or fewer where its affinity or quota
    /// says so.
    pub(super) fn cores(&self) -> f64 {
        let allowed = std::thread::available_parallelism().map_or(self.cpus, |n| n.get());
        allowed.min(self.cpus) as f64
    }
}

/// (busy, total, cpus) from `/proc/stat`: its first line sums every CPU's user, nice, system,
/// idle, iowait, irq, softirq and steal ticks (guest time is inside user's); idle and iowait are
/// not busy. `cpus` counts its `cpuN` lines.
fn parse_machine(stat: &str) -> Option<(u64, u64, usize)> {
    let first = stat.lines().next()?;
    let mut fields = first.split_whitespace();
    (fields.next()? == "cpu").then_some(())?;
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (ticks.len() >= 5).then_some(())?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks[3] + ticks[4];
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((total - idle, total, cpus.max(1)))
}

/// This process's user + system ticks (all its threads) from `/proc/self/stat`: fields 14 and 15,
/// counted after the command name's closing parenthesis (the name may hold spaces).
fn parse_own(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A warning when other processes kept so much of the `cores` busy (`others`, on average) that
/// the measurement's `threads` were left less than a core each (by more than [`CROWDED_SLACK`]);
/// `None` when they had room.
pub(super) fn crowded(others: f64, cores: f64, threads: f64, entries: usize) -> Option<String> {
    (cores - others < threads - CROWDED_SLACK).then(|| {
        format!(
            "other processes kept {others:.1} of the {cores:.0} cores busy while these {entries} \
             measurements ran on {threads:.0} threads, so they were timed slower than a quiet \
             machine runs them and the plan may be off; the table is not cached. Plan again on \
             a quiet machine, or with fewer threads (OMP_NUM_THREADS)."
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_measurement_is_crowded_only_when_its_threads_lack_a_core() {
        // 2 cores: 2 threads beside a shell, 1 thread beside another one-thread process (the test
        // harness's other test) have room; 2 threads beside a busy loop, or 1 beside two, do not.
        assert_eq!(crowded(0.1, 2.0, 2.0, 766), None);
        assert_eq!(crowded(1.0, 2.0, 1.0, 766), None);
        let warning = crowded(0.7, 2.0, 2.0, 766).expect("1.3 cores for 2 threads");
        for part in [
            "0.7 of the 2 cores",
            "766 measurements",
            "2 threads",
            "not cached",
        ] {
            assert!(warning.contains(part), "{part}: {warning}");
        }
        assert!(crowded(1.7, 2.0, 1.0, 766).is_some());
        assert!(crowded(1.0, 16.0, 16.0, 766).is_some());
    }

    #[test]
    fn proc_files_are_read_field_by_field() {
        let stat = "cpu  100 5 50 800 20 0 5 0 0 0\ncpu0 50 2 25 400 10 0 3 0 0 0\n\
                    cpu1 50 3 25 400 10 0 2 0 0 0\nintr 1 2 3\nctxt 9\n";
        assert_eq!(parse_machine(stat), Some((160, 980, 2)));
        assert_eq!(parse_machine("intr 1 2\n"), None);
        // A command name with spaces and a parenthesis: the fields count from the last ')'.
        let own = "4242 (tucker nb (x)) R 1 4242 4242 0 -1 4194304 100 0 0 0 37 5 0 0 20 0";
        assert_eq!(parse_own(own), Some(42));
        assert_eq!(parse_own("4242 (short) R 1"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_counts_as_its_own_not_as_another() {
        let before = CpuSample::now().expect("Linux has /proc");
        let start = Instant::now();
        let mut x = 0u64;
        // Spin until the kernel has counted some of this process's time (ticks of 10 ms).
        while CpuSample::now().unwrap().own < before.own + 5 && start.elapsed().as_secs() < 10 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = CpuSample::now().unwrap();
        assert!(
            after.own >= before.own + 5,
            "no time counted to this process"
        );
        // The two files count by different clocks: the machine's busy time covers this
        // process's to within a tick or so.
        assert!(4 * (after.busy - before.busy) >= 3 * (after.own - before.own));
        let others = before.others_cores(&after);
        assert!(others >= 0.0 && others <= before.cpus as f64, "{others}");
        assert!(before.cores() >= 1.0);
    }
}
