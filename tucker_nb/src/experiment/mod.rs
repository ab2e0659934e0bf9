//! The seed's whole experiment and its steps: [`loaders`], [`initial_model`], compression (in one
//! or more stages, [`compress_in_stages`]), fine-tuning and evaluation, and [`run`], which chains
//! them as the seed does (fine-tune the original → evaluate → compress → evaluate → fine-tune the
//! compressed model → evaluate), writing `metrics.csv`, `layers.csv`, `summary.json`, the models
//! and per-phase checkpoints into one output folder. The notebook calls the same steps cell by cell.

mod config;
mod stages;
mod summary;

pub use config::{
    check_fingerprint, prepare_run_folder, RunConfig, RunFingerprint, FINGERPRINT_FILE,
};
pub use stages::{compress_in_stages, Calibration, Evaluated, StageOutcome, Stages};
pub use summary::{StageFigures, Summary};

use std::path::Path;

use polars::prelude::DataFrame;
use tch::Device;

use crate::compress::policy::{CompressionPolicy, Fit};
use crate::data::{decode_cached, DataSource, Dataset, ImageFolder};
use crate::error::{Error, Result};
use crate::figures::ModelFigures;
use crate::frame::write_frame_csv;
use crate::io;
use crate::loader::{Loader, Transform};
use crate::lock::OutputLock;
use crate::model::ResNet18;
use crate::train::{
    evaluate, fine_tune, metrics_frame, EpochMetrics, EvalResult, FineTune, FineTuneConfig,
};

/// The run's training and validation loaders (train: the seed's augmentation, shuffled with the
/// run's seed; val: the eval transform). Fails when the data has more classes than the model.
pub fn loaders(config: &RunConfig) -> Result<(Loader, Loader)> {
    let (train, val) = datasets(config)?;
    Ok(loader_pair(config, &train, &val))
}

/// The run's training and validation sets, limited as the config says. Fails when the data has
/// more classes than the model.
pub fn datasets(config: &RunConfig) -> Result<(Dataset, Dataset)> {
    let source = DataSource::detect(&config.data)?;
    let (mut train, mut val) = source.load_both(config.storage)?;
    if let Some(n) = config.train_limit {
        train = train.take(n);
    }
    if let Some(n) = config.val_limit {
        val = val.take(n);
    }
    if (train.classes.len() as i64) > config.num_classes {
        return Err(Error::value(
            "num_classes",
            format!(
                "{} but {} has {} classes",
                config.num_classes,
                config.data.display(),
                train.classes.len()
            ),
        ));
    }
    Ok((train, val))
}

/// The loader pair for `train` and `val` with the run's sizes, device and seed: train with the
/// seed's augmentation, shuffled; val with the eval transform.
pub fn loader_pair(config: &RunConfig, train: &Dataset, val: &Dataset) -> (Loader, Loader) {
    let size = config.image_size;
    let loader = |data, batch_size, transform| {
        Loader::new(
            data,
            batch_size,
            transform,
            config.device,
            config.resident_data,
        )
    };
    (
        loader(train, config.batch_size, Transform::Train { size }).with_seed(config.seed),
        loader(val, config.eval_batch_size, Transform::Eval { size }),
    )
}

/// The images [`RunConfig::held_out_data`] names, when the recipe chooses epochs on them:
/// decoded (through the dataset cache) and checked to have the training set's `classes`.
pub fn held_out_folder(config: &RunConfig, classes: &[String]) -> Result<Option<Dataset>> {
    let Some(dir) = config
        .held_out_data
        .as_ref()
        .filter(|_| config.recipe.selects_on_held_out())
    else {
        return Ok(None);
    };
    let folder = ImageFolder::scan(dir)?;
    if folder.classes != classes {
        return Err(Error::file(
            dir,
            format!(
                "held-out data has classes {} but the training set {}",
                folder.classes.join(","),
                classes.join(",")
            ),
        ));
    }
    Ok(Some(decode_cached(&folder, dir, config.storage)?))
}

/// Splits the run's training loader when its recipe chooses epochs on held-out images: the
/// held-out images and a training loader of the others, which every fine-tune of the run then
/// trains on (and the calibration set is drawn from). The held-out images are `folder`'s
/// ([`held_out_folder`]) when there is one, the training loader then untouched; else
/// [`RunConfig::held_out_count`] training images drawn with the run's seed. Both get the eval
/// transform. Otherwise the loader as it is, and `None`.
pub fn hold_out(
    config: &RunConfig,
    train: Loader,
    folder: Option<&Dataset>,
) -> Result<(Loader, Option<Loader>)> {
    if let Some(held_out) = folder {
        let size = config.image_size;
        let loader = Loader::new(
            held_out,
            config.eval_batch_size,
            Transform::Eval { size },
            config.device,
            config.resident_data,
        );
        return Ok((train, Some(loader)));
    }
    match config.held_out_count(train.len())? {
        Some(n) => {
            let (train, held_out) = train.hold_out(n, config.seed, config.eval_batch_size)?;
            Ok((train, Some(held_out)))
        }
        None => Ok((train, None)),
    }
}

/// The calibration set ([`Loader::calibration_set`]): `calib_images` training images after a
/// shuffle seeded with the run's seed, eval transform; says so when the data has fewer.
pub fn calibration(config: &RunConfig, train: &Loader) -> Result<Loader> {
    let calibration =
        train.calibration_set(config.calib_images, config.seed, config.eval_batch_size)?;
    if calibration.len() < config.calib_images {
        eprintln!(
            "calibration: {} asks for {} images, the training set has {}: using them all",
            config.data.display(),
            config.calib_images,
            calibration.len()
        );
    }
    Ok(calibration)
}

/// The starting model: the weights with a fresh `fc` for `num_classes` (as the seed), or random
/// weights; seeded with the run's seed, and laid out as the fine-tunes will train it.
pub fn initial_model(config: &RunConfig) -> Result<ResNet18> {
    tch::manual_seed(config.seed as i64);
    let mut model = match &config.weights {
        Some(w) => ResNet18::load(w, Some(config.num_classes), config.device)?,
        None => ResNet18::new(config.num_classes, config.device),
    };
    model.set_channels_last(config.fine_tune.channels_last);
    Ok(model)
}

/// The epochs' metrics of several fine-tunes as one table, in order.
pub fn concat_metrics(frames: &[&DataFrame]) -> Result<DataFrame> {
    let mut all = metrics_frame(&[]);
    for frame in frames {
        all.vstack_mut(frame)
            .map_err(|e| Error::value("metrics", e))?;
    }
    Ok(all)
}

/// What a run returns.
#[derive(Debug)]
pub struct RunResult {
    /// All fine-tunes' epochs, in order ([`crate::train::METRICS_COLUMNS`]).
    pub metrics: DataFrame,
    /// Each compression stage (a later stage's report's "before" is the previous stage's model).
    pub stages: Stages,
    pub summary: Summary,
}

/// The run's compression: every stage with short fine-tunes between (checkpointed in `out`, as
/// the recipe trains: [`RunConfig::stage_phase`], with `between`'s teacher and held-out images),
/// fitted to data and followed by BN recalibration as the config says; writes `layers.csv` (and
/// `layers-stageN.csv`).
fn compress_for_run(
    config: &RunConfig,
    model: &mut ResNet18,
    (train, val): (&Loader, &Loader),
    between: FineTune,
    outputs: &mut io::Outputs,
) -> Result<Stages> {
    let settings = config.stage_phase();
    let between = FineTune {
        teacher: between.teacher.filter(|_| settings.distill.is_some()),
        config: settings,
        held_out: between.held_out,
    };
    let policies = config.all_stages();
    let fits_data = policies.iter().any(|p| p.fit() == Fit::Data);
    let calibration_set = match config.recalibrate_bn || fits_data {
        true => Some(calibration(config, train)?),
        false => None,
    };
    let calibration = calibration_set.as_ref().map(|images| Calibration {
        images,
        recalibrate_bn: config.recalibrate_bn,
    });
    let stages = compress_in_stages(model, &policies, (train, val), calibration, between)?;
    for (i, stage) in stages.0.iter().enumerate() {
        let name = match i {
            0 => "layers.csv".to_string(),
            _ => format!("layers-stage{}.csv", i + 1),
        };
        outputs.write_with(&config.out.join(name), |tmp| stage.report.write_csv(tmp))?;
    }
    Ok(stages)
}

/// `model`'s evaluation on `val` just after a fine-tune: the one its chosen epoch recorded (of
/// this very model, on the same loader) when it evaluated in fp32, else a fresh fp32 evaluation
/// (no epochs run, or bf16 epochs).
fn evaluated(
    rows: &[EpochMetrics],
    phase: &FineTuneConfig,
    model: &ResNet18,
    val: &Loader,
) -> Result<EvalResult> {
    let chosen = rows.iter().find(|r| r.epoch == r.chosen_epoch);
    match chosen {
        Some(row) if !phase.bf16 => Ok(EvalResult::of_epoch(row, val.len())),
        _ => evaluate(model, val),
    }
}

/// Runs the seed's flow. With `resume`, each phase continues from its checkpoint in `out`.
/// The run's results (models, metrics, reports, summary) are committed together at the end.
pub fn run(config: &RunConfig) -> Result<RunResult> {
    config.validate()?;
    let _lock = prepare_run_folder(config)?;
    let out = &config.out;
    let (train_data, val_data) = datasets(config)?;
    // Refused before anything is written into the folder.
    config.held_out_count(train_data.len())?;
    let held_out_data = held_out_folder(config, &train_data.classes)?;
    check_fingerprint(
        config,
        &RunFingerprint::new(config, &train_data, &val_data, held_out_data.as_ref())?,
    )?;
    let (train, val) = loader_pair(config, &train_data, &val_data);
    let (train, held_out) = hold_out(config, train, held_out_data.as_ref())?;
    let size = config.image_size;
    let mut model = initial_model(config)?;
    let mut outputs = io::Outputs::new();

    // 1) fine-tune the original: the seed trains fc only; 2) evaluate it.
    let original_phase = config.original_phase();
    let mut rows = fine_tune(&mut model, &train, &val, &original_phase)?.0;
    outputs.write_with(&out.join("original.safetensors"), |tmp| model.save(tmp))?;
    let original = ModelFigures::new(
        &model,
        &evaluated(&rows, &original_phase, &model, &val)?,
        size,
    );

    // 3) compress (in stages, with short fine-tunes between); 4) evaluate before fine-tuning.
    let compressed_phase = config.compressed_phase();
    let teacher = compressed_phase.distill.map(|_| model.deep_copy());
    let run = FineTune {
        config: compressed_phase.clone(),
        teacher: teacher.as_ref(),
        held_out: held_out.as_ref(),
    };
    let stages = compress_for_run(
        config,
        &mut model,
        (&train, &val),
        run.clone(),
        &mut outputs,
    )?;
    rows.extend(stages.metrics());

    // 5) fine-tune the compressed model: factorised convs and fc, as the recipe says;
    // 6) evaluate.
    let taught = fine_tune(&mut model, &train, &val, run)?.0;
    let chosen_epoch = taught.last().map(|r| r.chosen_epoch);
    // A fine-tune that kept the model it was given returns the (recalibrated) model just
    // evaluated, bit for bit.
    let start = stages.last();
    let start = start.recalibrated.as_ref().unwrap_or(&start.compressed);
    let fine_tuned = match chosen_epoch {
        Some(0) => start.figures.clone(),
        _ => ModelFigures::new(
            &model,
            &evaluated(&taught, &compressed_phase, &model, &val)?,
            size,
        ),
    };
    rows.extend(taught);
    outputs.write_with(&out.join("compressed.safetensors"), |tmp| model.save(tmp))?;

    let metrics = metrics_frame(&rows);
    outputs.write_with(&out.join("metrics.csv"), |tmp| {
        write_frame_csv(&metrics, tmp)
    })?;
    let summary = Summary {
        original,
        stages: stages
            .0
            .iter()
            .map(|s| StageFigures {
                compressed: s.compressed.figures.clone(),
                recalibrated: s.recalibrated.as_ref().map(|r| r.figures.clone()),
                latency: s.report.latency.clone(),
            })
            .collect(),
        fine_tuned,
        recipe: Some(config.recipe),
        chosen_epoch,
        image_size: size,
        device: format!("{:?}", config.device),
        train_images: train.len(),
        val_images: val.len(),
    };
    let json = serde_json::to_vec_pretty(&summary).expect("serialisable");
    outputs.write(&out.join("summary.json"), &json)?;
    outputs.commit()?;
    Ok(RunResult {
        metrics,
        stages,
        summary,
    })
}

/// The budget sweep on the run's data and weights: each of `policies` compresses a copy of the
/// model, which is fine-tuned for `config.compressed_epochs` (factorised convs and fc) and
/// evaluated, and timed beside the dense model at the run's eval batch size (and dtype). Writes
/// `sweep.csv`, `sweep-metrics.csv` (every point's fine-tune epochs, phase = policy), `pareto.png`
/// and `pareto-speed.png` into `config.out`; returns the sweep's frame
/// ([`crate::sweep::SWEEP_COLUMNS`]).
pub fn run_sweep(config: &RunConfig, policies: &[CompressionPolicy]) -> Result<DataFrame> {
    config.validate()?;
    for policy in policies {
        policy.validate()?;
    }
    let out = &config.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let _lock = OutputLock::acquire(out)?;
    let (train_data, val_data) = datasets(config)?;
    let held_out_data = held_out_folder(config, &train_data.classes)?;
    let (train, val) = loader_pair(config, &train_data, &val_data);
    let (train, held_out) = hold_out(config, train, held_out_data.as_ref())?;
    let calibration = calibration(config, &train)?;
    let model = initial_model(config)?;
    let fine_tune = config.recipe.apply(FineTuneConfig {
        epochs: config.compressed_epochs,
        ..config.fine_tune.clone()
    });
    let loaders = (&train, &val, &calibration);
    let policies: Vec<CompressionPolicy> = policies.iter().map(|p| config.timed(p)).collect();
    let run = FineTune::from(fine_tune).selecting_on(held_out.as_ref());
    let (frame, history) = crate::sweep::sweep_with_history(&model, &policies, loaders, run)?;
    let mut outputs = io::Outputs::new();
    outputs.write_with(&out.join("sweep.csv"), |tmp| write_frame_csv(&frame, tmp))?;
    let epochs = history.frame();
    outputs.write_with(&out.join("sweep-metrics.csv"), |tmp| {
        write_frame_csv(&epochs, tmp)
    })?;
    let chart = crate::plots::pareto_chart(&frame)?;
    outputs.write_with(&out.join("pareto.png"), |tmp| chart.save_png(tmp))?;
    let chart = crate::plots::pareto_speed_chart(&frame)?;
    outputs.write_with(&out.join("pareto-speed.png"), |tmp| chart.save_png(tmp))?;
    outputs.commit()?;
    Ok(frame)
}

/// Loads the model in `path` to evaluate it on `dataset`: its classifier must have `num_classes`
/// outputs (never a fresh, random one) and at least as many as the data has classes.
pub fn load_for_evaluation(
    path: &Path,
    num_classes: i64,
    dataset: &Dataset,
    device: Device,
) -> Result<ResNet18> {
    let model = ResNet18::load(path, None, device)?;
    let has = model.num_classes();
    if has != num_classes {
        return Err(Error::file(
            path,
            format!("the model has {has} classes, not the {num_classes} asked for (--num-classes)"),
        ));
    }
    let data_classes = dataset.classes.len() as i64;
    if data_classes > has {
        return Err(Error::file(
            path,
            format!("the model has {has} classes, the data {data_classes}"),
        ));
    }
    Ok(model)
}

/// Writes `path,true,predicted` for every image of an evaluation, atomically.
pub fn write_predictions(
    path: &Path,
    names: &[String],
    labels: &[i64],
    predictions: &[i64],
) -> Result<()> {
    let mut csv = String::from("path,true,predicted\n");
    for ((name, truth), pred) in names.iter().zip(labels).zip(predictions) {
        csv.push_str(&format!("{},{truth},{pred}\n", io::csv_field(name)));
    }
    io::write_atomic(path, csv.as_bytes())
}
