//! The latency table: measured slot times, cached on disk, priced as a budget's cost.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Device;

use super::grid::{corners, entry_key, outside_key};
use super::load::{crowded, CpuSample};
use super::measure::{measure_slot, model_ms, outside_ms, plan_model, side_by_side, MeasuredSpeed};
use super::{TimingKey, TimingSettings};
use crate::compress::cost::{Price, SlotCost};
use crate::conv::{ConvGeometry, Form};
use crate::error::{Error, Result};
use crate::lock::OutputLock;
use crate::model::ResNet18;
use crate::progress::Progress;

const FORMAT: &str = "tucker_nb latency table 1";

/// What one slot is planned over: its name (for errors), geometry, input size and the forms the
/// planner may price (the one it has now among them).
#[derive(Debug, Clone)]
pub struct SlotForms {
    pub name: String,
    pub geometry: ConvGeometry,
    pub input: [i64; 2],
    pub forms: Vec<Form>,
}

/// Measured times in milliseconds, with the outside time of the model being planned.
#[derive(Debug, Clone)]
pub struct LatencyTable {
    pub key: TimingKey,
    pub step: i64,
    entries: BTreeMap<String, f64>,
    /// The model's time outside its conv slots (what the whole-model measurement leaves).
    pub outside_ms: f64,
    /// The cache file, when the table was read from or written to one.
    pub file: Option<PathBuf>,
    /// Entries read from the cache and measured now, for the log.
    pub from_cache: usize,
    pub measured: usize,
}

/// The on-disk form of a table.
#[derive(Serialize, Deserialize)]
struct TableFile {
    format: String,
    key: TimingKey,
    entries: BTreeMap<String, f64>,
}

impl LatencyTable {
    /// A table of given entries (tests, and tables built elsewhere): each must be a positive
    /// finite number of milliseconds.
    pub fn from_entries(
        key: TimingKey,
        step: i64,
        entries: BTreeMap<String, f64>,
        outside_ms: f64,
    ) -> Self {
        Self {
            key,
            step,
            entries,
            outside_ms,
            file: None,
            from_cache: 0,
            measured: 0,
        }
    }

    /// The predicted time of `form` on a slot of `geometry` reading `input`, interpolated on the
    /// grid ([`LatencyTable::check`] has made sure every corner is there).
    pub fn slot_ms(&self, geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64 {
        corners(form, geometry.shape, self.step)
            .into_iter()
            .map(|(corner, w)| {
                let key = entry_key(geometry, input, corner);
                w * self.entries.get(&key).copied().unwrap_or_else(|| {
                    panic!("latency table has no entry `{key}`: checked before planning")
                })
            })
            .sum()
    }

    /// Sets the time of `form` on a slot of `geometry` reading `input`.
    pub fn insert(&mut self, geometry: &ConvGeometry, input: [i64; 2], form: Form, ms: f64) {
        self.entries.insert(entry_key(geometry, input, form), ms);
    }

    /// The entries `slots` need that the table lacks (each once).
    pub fn missing(&self, slots: &[SlotForms]) -> Vec<(ConvGeometry, [i64; 2], Form)> {
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for slot in slots {
            for &form in &slot.forms {
                for (corner, _) in corners(form, slot.geometry.shape, self.step) {
                    let key = entry_key(&slot.geometry, slot.input, corner);
                    if !self.entries.contains_key(&key) && seen.insert(key) {
                        missing.push((slot.geometry, slot.input, corner));
                    }
                }
            }
        }
        missing
    }

    /// Checks that every entry `slots` need is there and a positive finite time; the error
    /// names the layer and the file.
    pub fn check(&self, slots: &[SlotForms]) -> Result<()> {
        let file = self
            .file
            .as_ref()
            .map_or("the latency table".to_string(), |f| f.display().to_string());
        for slot in slots {
            for &form in &slot.forms {
                for (corner, _) in corners(form, slot.geometry.shape, self.step) {
                    let key = entry_key(&slot.geometry, slot.input, corner);
                    match self.entries.get(&key) {
                        Some(ms) if ms.is_finite() && *ms > 0.0 => {}
                        Some(ms) => {
                            return Err(Error::layer(
                                &slot.name,
                                format!(
                                    "{file}: entry `{key}` is {ms} ms (a time must be a \
                                     positive finite number; delete the file to measure again)"
                                ),
                            ))
                        }
                        None => {
                            return Err(Error::layer(
                                &slot.name,
                                format!("{file} has no entry `{key}`"),
                            ))
                        }
                    }
                }
            }
        }
        if !(self.outside_ms.is_finite() && self.outside_ms >= 0.0) {
            return Err(Error::value(
                "latency table",
                format!(
                    "{file}: the time outside the conv slots is {} ms",
                    self.outside_ms
                ),
            ));
        }
        Ok(())
    }

    /// The predicted forward time of a plan whose slots take `chosen` ms: the outside time plus
    /// each slot's entry.
    pub fn predicted_ms(&self, chosen: impl IntoIterator<Item = f64>) -> f64 {
        self.outside_ms + chosen.into_iter().sum::<f64>()
    }
}

impl Price for LatencyTable {
    fn label(&self) -> &'static str {
        "latency"
    }

    fn of_form(&self, geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64 {
        self.slot_ms(geometry, input, form)
    }

    fn of_current(&self, geometry: &ConvGeometry, input: [i64; 2], current: SlotCost) -> f64 {
        self.slot_ms(geometry, input, current.form)
    }

    fn fixed(&self) -> f64 {
        self.outside_ms
    }

    fn is_time(&self) -> bool {
        true
    }
}

/// The table for planning `model` (on its device, in its layout) over `slots` at `image` px:
/// read from the cache, with what it lacks measured now and added to it. A cache that cannot be
/// written is an error before anything is measured.
pub fn table_for(
    model: &ResNet18,
    settings: &TimingSettings,
    step: i64,
    image: [i64; 2],
    slots: &[SlotForms],
) -> Result<LatencyTable> {
    settings.validate()?;
    let device = model.device();
    let key = TimingKey::current(settings, device, model.is_channels_last());
    let dir = settings.cache_dir();
    let file = dir.join(key.file_name());
    let mut table = read_table(&file, &key, step)?;
    let outside = outside_key(model.num_classes(), image);
    let complete =
        |t: &LatencyTable| t.missing(slots).is_empty() && t.entries.contains_key(&outside);
    if !complete(&table) {
        std::fs::create_dir_all(&dir).map_err(|e| crate::lock::cannot_write(&dir, &e))?;
        let _lock = wait_for_lock(&file)?;
        table = read_table(&file, &key, step)?; // another process may have added entries
        let missing = table.missing(slots);
        let start = Instant::now();
        let progress = Progress::new(missing.len() + 2, "latency table");
        progress.set_message("the model as it is, before the entries".to_string());
        let cpu_before = CpuSample::now().filter(|_| device == Device::Cpu);
        let dense_before = model_ms(model, image, &key);
        progress.inc(1);
        for (geometry, input, form) in &missing {
            progress.set_message(entry_key(geometry, *input, *form));
            let ms = measure_slot(geometry, *input, *form, &key, device);
            table.entries.insert(entry_key(geometry, *input, *form), ms);
            progress.inc(1);
        }
        progress.set_message("the model as it is, after the entries".to_string());
        let dense_after = model_ms(model, image, &key);
        let cpu_after = CpuSample::now();
        if !table.entries.contains_key(&outside) {
            let ms = outside_ms(model, &table, image, dense_after);
            table.entries.insert(outside.clone(), ms);
        }
        progress.inc(1);
        table.measured = missing.len() + 1;
        table.from_cache = table.entries.len() - table.measured;
        progress.finish(format!(
            "{} entries measured in {:.1} s",
            table.measured,
            start.elapsed().as_secs_f64()
        ));
        let warning = unsteady(dense_before, dense_after, table.measured).or_else(|| {
            let (before, after) = (cpu_before?, cpu_after?);
            let others = before.others_cores(&after);
            crowded(others, before.cores(), key.threads as f64, table.measured)
        });
        keep_measured(&mut table, &file, warning)?;
    } else {
        table.from_cache = table.entries.len();
    }
    table.outside_ms = table.entries[&outside];
    table.check(slots)?;
    eprintln!(
        "latency table {}{}: {} entries from the cache, {} measured ({}, batch {}, {}, {} threads)",
        file.display(),
        if table.file.is_some() {
            ""
        } else {
            " (not cached)"
        },
        table.from_cache,
        table.measured,
        key.device,
        key.batch,
        key.dtype,
        key.threads
    );
    Ok(table)
}

/// Writes `table`, measured now, to `file`, unless a `warning` says its measurement was disturbed
/// (the model's time moved, [`unsteady`], or other processes crowded the cores, [`crowded`]):
/// then it warns, and the table keeps no file, so neither it nor the whole plans timed by it are
/// cached and a later plan measures again rather than inherit them.
fn keep_measured(table: &mut LatencyTable, file: &Path, warning: Option<String>) -> Result<()> {
    match warning {
        Some(warning) => {
            eprintln!("latency table {}: {warning}", file.display());
            table.file = None;
            Ok(())
        }
        None => write_table(file, table),
    }
}

/// How far the model's time may move between the start and the end of a table's measurement: a
/// factor beyond this says the device's load changed while the entries were timed (another
/// process on the cores or the GPU), so they were timed under different conditions and a plan
/// priced by them may be off.
const STEADY_LIMIT: f64 = 1.5;

/// A warning when the model's median times before and after `entries` measurements differ by
/// more than [`STEADY_LIMIT`]; `None` when they agree.
fn unsteady(before_ms: f64, after_ms: f64, entries: usize) -> Option<String> {
    let ratio = before_ms.max(after_ms) / before_ms.min(after_ms);
    (ratio > STEADY_LIMIT || !ratio.is_finite()).then(|| {
        format!(
            "the model as it is took {before_ms:.2} ms before these {entries} measurements and \
             {after_ms:.2} ms after ({ratio:.1}×): the device's load changed while they ran, so \
             the plan may be off and the table is not cached. Plan again on a quiet device."
        )
    })
}

impl LatencyTable {
    /// The eval forward time of `model` as it is and with its slots in `forms` (random factors,
    /// [`plan_model`]) at `image` px, timed side by side: from the cache when this plan was
    /// timed before, else measured now and added to it.
    pub fn plan_speed(
        &mut self,
        model: &ResNet18,
        forms: &BTreeMap<String, Form>,
        image: [i64; 2],
    ) -> Result<MeasuredSpeed> {
        let key = plan_key(model.num_classes(), image, forms);
        let before_key = format!("{key}, the model as it is beside it");
        if let (Some(&after_ms), Some(&before_ms)) =
            (self.entries.get(&key), self.entries.get(&before_key))
        {
            return Ok(MeasuredSpeed {
                before_ms,
                after_ms,
            });
        }
        let plan = plan_model(model, forms, &self.key);
        let speed = side_by_side(model, &plan, image, &self.key, PLAN_TURNS);
        let new = [(key, speed.after_ms), (before_key, speed.before_ms)];
        self.entries.extend(new.clone());
        self.measured += 1;
        if let Some(file) = self.file.clone() {
            let _lock = wait_for_lock(&file)?;
            let mut on_disk = read_table(&file, &self.key, self.step)?;
            on_disk.entries.extend(new);
            write_table(&file, &on_disk)?;
        }
        Ok(speed)
    }
}

/// Timed calls of each model when a whole plan is timed beside the model.
const PLAN_TURNS: usize = 15;

/// The key of a whole plan's measured time: a hash of every slot's form, with the model's
/// classes and image size.
fn plan_key(classes: i64, image: [i64; 2], forms: &BTreeMap<String, Form>) -> String {
    let text: String = forms
        .iter()
        .map(|(name, form)| format!("{name} {form:?};"))
        .collect();
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "whole plan {hex}: {classes} classes, {}x{} px",
        image[0], image[1]
    )
}

/// The cached table at `file` for `key`, or an empty one when there is none.
fn read_table(file: &Path, key: &TimingKey, step: i64) -> Result<LatencyTable> {
    let mut table = LatencyTable::from_entries(key.clone(), step, BTreeMap::new(), 0.0);
    table.file = Some(file.to_path_buf());
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(table),
        Err(e) => return Err(Error::file(file, crate::lock::io_reason(&e))),
    };
    let parsed: TableFile = serde_json::from_slice(&bytes).map_err(|e| {
        Error::file(
            file,
            format!("is not a latency table ({e}); delete it to measure again"),
        )
    })?;
    if parsed.format != FORMAT || &parsed.key != key {
        return Err(Error::file(
            file,
            format!(
                "holds a table for another setting (format `{}`); delete it to measure again",
                parsed.format
            ),
        ));
    }
    table.entries = parsed.entries;
    Ok(table)
}

fn write_table(file: &Path, table: &LatencyTable) -> Result<()> {
    let contents = TableFile {
        format: FORMAT.into(),
        key: table.key.clone(),
        entries: table.entries.clone(),
    };
    let json = serde_json::to_vec_pretty(&contents).expect("a table serialises");
    crate::io::write_atomic(file, &json)
}

/// The table file's lock, waiting while another process adds entries to it.
fn wait_for_lock(file: &Path) -> Result<OutputLock> {
    let start = Instant::now();
    loop {
        if let Some(lock) = OutputLock::try_acquire(file)? {
            return Ok(lock);
        }
        if start.elapsed().as_secs() > 600 {
            return OutputLock::acquire(file); // says who holds it
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::latency::grid::measured_ranks;
    use crate::compress::latency::key::test_key as key;
    use crate::conv::ConvConfig;

    fn geometry() -> ConvGeometry {
        ConvGeometry {
            shape: [64, 32, 3, 3],
            config: ConvConfig::new(1, 1),
        }
    }

    /// A table whose Tucker-2 times are a + b·r_out + c·r_in + d·r_out·r_in: bilinear, so
    /// interpolation between grid points must be exact.
    fn bilinear_table() -> (LatencyTable, SlotForms) {
        let g = geometry();
        let f = |r_out: i64, r_in: i64| {
            0.5 + 0.01 * r_out as f64 + 0.02 * r_in as f64 + 1e-4 * (r_out * r_in) as f64
        };
        let mut entries = BTreeMap::new();
        for r_out in measured_ranks(64, 8) {
            for r_in in measured_ranks(32, 8) {
                entries.insert(
                    entry_key(&g, [8, 8], Form::Tucker2 { r_out, r_in }),
                    f(r_out, r_in),
                );
            }
        }
        entries.insert(entry_key(&g, [8, 8], Form::Dense), 3.0);
        let slot = SlotForms {
            name: "layer1.0.conv1".into(),
            geometry: g,
            input: [8, 8],
            forms: vec![
                Form::Dense,
                Form::Tucker2 {
                    r_out: 40,
                    r_in: 20,
                },
            ],
        };
        let table = LatencyTable::from_entries(key(), 8, entries, 1.0);
        assert!(table.check(std::slice::from_ref(&slot)).is_ok());
        assert!(
            (table.slot_ms(
                &g,
                [8, 8],
                Form::Tucker2 {
                    r_out: 40,
                    r_in: 20
                }
            ) - f(40, 20))
            .abs()
                < 1e-12
        );
        (table, slot)
    }

    #[test]
    fn interpolation_is_exact_on_a_bilinear_cost_and_a_plan_costs_its_entries() {
        let (table, _) = bilinear_table();
        let g = geometry();
        let chosen = [
            table.slot_ms(&g, [8, 8], Form::Dense),
            table.slot_ms(&g, [8, 8], Form::Tucker2 { r_out: 16, r_in: 8 }),
        ];
        assert_eq!(chosen[0], 3.0);
        assert!((table.predicted_ms(chosen) - (1.0 + chosen[0] + chosen[1])).abs() < 1e-12);
    }

    #[test]
    fn a_table_measured_while_the_model_time_moved_is_named_and_not_cached() {
        assert_eq!(unsteady(10.0, 12.0, 766), None);
        assert_eq!(unsteady(12.0, 10.0, 766), None);
        let warning = unsteady(9.1, 20.3, 766).expect("2.2x apart");
        for part in [
            "9.10 ms",
            "766 measurements",
            "20.30 ms",
            "(2.2×)",
            "not cached",
        ] {
            assert!(warning.contains(part), "{part}: {warning}");
        }
        assert!(unsteady(20.3, 9.1, 766).is_some() && unsteady(0.0, 1.0, 1).is_some());

        let dir = tempfile::tempdir().unwrap();
        let (mut table, _) = bilinear_table();
        table.measured = 3;
        let unsteady_file = dir.path().join("unsteady.json");
        table.file = Some(unsteady_file.clone());
        keep_measured(&mut table, &unsteady_file, unsteady(9.1, 20.3, 3)).unwrap();
        assert!(table.file.is_none() && !unsteady_file.exists());
        let steady_file = dir.path().join("steady.json");
        table.file = Some(steady_file.clone());
        keep_measured(&mut table, &steady_file, unsteady(10.0, 11.0, 3)).unwrap();
        assert!(table.file.is_some());
        let read = read_table(&steady_file, &table.key, table.step).unwrap();
        // Bit for bit (serde_json's float_roundtrip): a plan from the cache equals the first.
        assert_eq!(read.entries, table.entries);
    }

    #[test]
    fn a_nan_zero_or_negative_entry_is_refused_naming_the_layer() {
        let (table, slot) = bilinear_table();
        for bad in [f64::NAN, 0.0, -1.0] {
            let mut t = table.clone();
            t.entries
                .insert(entry_key(&slot.geometry, slot.input, Form::Dense), bad);
            let err = t
                .check(std::slice::from_ref(&slot))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("layer1.0.conv1") && err.contains("positive finite"),
                "{err}"
            );
        }
    }
}
