use super::*;
use crate::data::Dataset;
use crate::loader::Transform;
use tch::Device;

/// 12 random 32 px images as a calibration loader (batches of 4, no shuffle).
fn calibration() -> Loader {
    tch::manual_seed(5);
    let eval = Transform::Eval { size: 32 };
    Loader::new(&Dataset::random(12, 32), 4, eval, Device::Cpu, true)
}

#[test]
fn recalibration_estimates_the_statistics_of_the_calibration_batches() {
    let mut model = ResNet18::new(3, Device::Cpu);
    let calibration = calibration();
    assert_eq!(recalibrate_bn(&mut model, &calibration).unwrap(), 12);
    // The stem BN sees conv1's output: its mean over all images and pixels (equal batches),
    // and the mean of the per-batch unbiased variances.
    let (mut mean, mut var) = (Vec::new(), Vec::new());
    tch::no_grad(|| {
        for batch in calibration.epoch(0) {
            let y = model.conv1.forward(&batch.images).to_kind(Kind::Double);
            mean.push(y.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Double));
            var.push(y.var_dim([0i64, 2, 3].as_slice(), true, false));
        }
    });
    let expected_mean = Tensor::stack(&mean, 0).mean_dim(0, false, Kind::Double);
    let expected_var = Tensor::stack(&var, 0).mean_dim(0, false, Kind::Double);
    let close = |a: &Tensor, b: &Tensor| {
        let diff = (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "differs by {diff}");
    };
    close(&model.bn1.running_mean, &expected_mean);
    close(&model.bn1.running_var, &expected_var);
    assert_eq!(model.bn1.momentum, 0.1, "momentum restored");
}

#[test]
fn recalibration_restores_eval_outputs_after_scrambled_statistics() {
    let mut model = ResNet18::new(3, Device::Cpu);
    let calibration = calibration();
    recalibrate_bn(&mut model, &calibration).unwrap();
    let x = calibration.epoch(0).next().unwrap().images;
    let reference = tch::no_grad(|| model.forward(&x, false));
    tch::no_grad(|| {
        for (name, mut t) in model.named_tensors() {
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                let _ = t.uniform_(0.5, 3.0);
            }
        }
    });
    let scrambled = tch::no_grad(|| model.forward(&x, false));
    assert!(crate::decompose::relative_error(&reference, &scrambled) > 0.1);
    recalibrate_bn(&mut model, &calibration).unwrap();
    let restored = tch::no_grad(|| model.forward(&x, false));
    let err = crate::decompose::relative_error(&reference, &restored);
    assert!(err < 1e-5, "rel. error {err}");
    model.fold_batch_norms(); // nothing factorised: nothing folded, still recalibratable
    assert!(recalibrate_bn(&mut model, &calibration).is_ok());
}

#[test]
fn distillation_loss_is_cross_entropy_plus_the_scaled_kl_to_the_teacher() {
    tch::manual_seed(2);
    let opts = (Kind::Float, Device::Cpu);
    let student = Tensor::randn([6, 5], opts) * 2.0;
    let teacher = Tensor::randn([6, 5], opts) * 2.0;
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let value = |t: &Tensor| t.double_value(&[]);
    let loss = |s: &Tensor, t: &Tensor, temp, alpha| {
        value(&distillation_loss(
            s,
            t,
            &labels,
            Distillation::new(temp, alpha).unwrap(),
        ))
    };
    let ce = value(&student.cross_entropy_for_logits(&labels));
    // α = 1 is plain cross-entropy, whatever the teacher says.
    assert!((loss(&student, &teacher, 4.0, 1.0) - ce).abs() < 1e-6);
    // A teacher that agrees with the student adds nothing.
    assert!((loss(&student, &student, 3.0, 0.25) - 0.25 * ce).abs() < 1e-6);
    // At T = 1, α = 0: KL(p_t ‖ p_s) = H(p_t, p_s) − H(p_t), via soft-target cross-entropy.
    let p_t = teacher.softmax(-1, Kind::Float);
    let soft_ce = |logits: &Tensor| {
        let ce = logits.cross_entropy_loss::<Tensor>(&p_t, None, tch::Reduction::Mean, -100, 0.0);
        value(&ce)
    };
    let kl = soft_ce(&student) - soft_ce(&teacher);
    assert!((loss(&student, &teacher, 1.0, 0.0) - kl).abs() < 1e-5);
    // T² keeps the soft term's gradient scale: at T = 2 the KL of the softened
    // distributions, times 4.
    let kl2 = {
        let (s2, t2) = (&student / 2.0, &teacher / 2.0);
        let p = t2.softmax(-1, Kind::Float);
        let ce = |l: &Tensor| {
            value(&l.cross_entropy_loss::<Tensor>(&p, None, tch::Reduction::Mean, -100, 0.0))
        };
        ce(&s2) - ce(&t2)
    };
    assert!((loss(&student, &teacher, 2.0, 0.0) - 4.0 * kl2).abs() < 1e-5);
    for bad in ["4", "0,0.5", "4,1.5", "x,y"] {
        assert!(bad.parse::<Distillation>().is_err(), "{bad}");
    }
    assert_eq!(
        "4, 0.5".parse::<Distillation>().unwrap(),
        Distillation::default()
    );
}

#[test]
fn folded_models_and_empty_calibration_sets_are_refused() {
    let mut model = ResNet18::new(3, Device::Cpu);
    let stem = [("conv1".to_string(), (8, 3))].into_iter().collect();
    let policy = crate::CompressionPolicy::new(crate::RankPolicy::Explicit(stem));
    crate::compress_model(&mut model, &policy).unwrap();
    model.fold_batch_norms();
    let err = recalibrate_bn(&mut model, &calibration()).unwrap_err();
    assert!(
        err.to_string().contains("bn1") && err.to_string().contains("folded"),
        "{err}"
    );
    let err = calibration()
        .calibration_set(0, 1, 4)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("calibration images") && err.contains('0'),
        "{err}"
    );
    // More than there are: all of them, each once.
    let all = calibration().calibration_set(100, 1, 5).unwrap();
    assert_eq!((all.len(), all.num_batches()), (12, 3));
}

#[test]
fn the_warm_up_raises_the_lr_linearly_then_steplr_takes_over() {
    let config = FineTuneConfig {
        lr: 0.01,
        step_size: 2,
        gamma: 0.1,
        warmup_epochs: 1.5,
        ..Default::default()
    };
    // 4 batches an epoch: 6 warm-up steps, each a sixth more of the lr.
    let lrs: Vec<f64> = (0..3)
        .flat_map(|epoch| (0..4).map(move |b| (epoch, b)))
        .map(|(epoch, b)| config.lr_at_step(epoch, b, 4))
        .collect();
    let expected = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0]
        .map(|k| 0.01 * k / 6.0)
        .into_iter()
        .chain([0.001; 4]);
    for (i, (got, want)) in lrs.iter().zip(expected).enumerate() {
        assert!((got - want).abs() < 1e-15, "step {i}: {got} vs {want}");
    }
    let seed = FineTuneConfig::default();
    assert_eq!(seed.lr_at_step(0, 0, 4), seed.lr, "no warm-up in the seed");
    let bad = FineTuneConfig {
        warmup_epochs: -1.0,
        ..Default::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("warm-up epochs") && err.contains("-1"),
        "{err}"
    );
}
