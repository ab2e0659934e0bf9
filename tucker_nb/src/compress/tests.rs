use super::*;
use crate::compress::cost::Cost;
use crate::conv::ConvConfig;
use crate::conv::ConvGeometry;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

fn conv(c_out: i64, c_in: i64, k: i64, bias: bool) -> Conv2d {
    tch::manual_seed(0);
    Conv2d {
        weight: Tensor::randn([c_out, c_in, k, k], (Kind::Float, Device::Cpu)),
        bias: bias.then(|| Tensor::randn([c_out], (Kind::Float, Device::Cpu))),
        config: ConvConfig::new(2, k / 2),
    }
}

fn tucker(dense: &Conv2d, r_out: i64, r_in: i64) -> Result<ConvSlot> {
    factorise("t", dense, Form::Tucker2 { r_out, r_in }, Method::Hosvd)
}

/// A synthetic device: each conv costs a launch plus its MACs, each unfolded BN a pass over
/// its output, so that at high ranks a factorised slot (three launches) is slower than dense.
fn synthetic_ms(geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64 {
    let (macs, [h, w]) = form.macs(geometry, input);
    let convs = match form {
        Form::Dense => 1.0,
        Form::Tucker2 { .. } => 3.0,
        _ => 2.0,
    };
    0.02 * convs + macs as f64 * 2e-8 + (geometry.shape[0] * h * w) as f64 * 1e-6
}

/// A latency table at step 8 whose every entry `wanted` is priced by `ms`, and the dense model's
/// predicted time on it.
pub(super) fn synthetic_table(
    facts: &[LayerFacts],
    policy: &CompressionPolicy,
    outside_ms: f64,
    ms: fn(&ConvGeometry, [i64; 2], Form) -> f64,
) -> (LatencyTable, f64) {
    let wanted = latency_slots(facts, 8);
    let key = latency::TimingKey::current(&policy.timing, Device::Cpu, false);
    let mut table = LatencyTable::from_entries(key, 8, BTreeMap::new(), outside_ms);
    for (geometry, input, form) in table.missing(&wanted) {
        table.insert(&geometry, input, form, ms(&geometry, input, form));
    }
    table.check(&wanted).unwrap();
    let dense = table.outside_ms
        + facts
            .iter()
            .map(|f| table.slot_ms(&f.geometry, f.input, Form::Dense))
            .sum::<f64>();
    (table, dense)
}

/// The latency plan at `fraction` of the dense time on `table`, checked layer by layer (no layer
/// slower than it was, each priced at its own entry) and as a whole (within 3 % of its budget).
pub(super) fn checked_latency_plan(
    facts: &[LayerFacts],
    table: &LatencyTable,
    dense_ms: f64,
    fraction: f64,
) -> BTreeMap<String, LayerPlan> {
    let plan = plan_budget(facts, fraction, table, Some(8));
    let mut chosen = Vec::new();
    for f in facts {
        let p = &plan[&f.name];
        let [before, after] = p.predicted_ms.expect("a time budget predicts each layer");
        assert!(
            after <= before,
            "{}: {after} ms > dense {before} ms",
            f.name
        );
        let form = p.form.unwrap_or(f.current.form);
        assert_eq!(
            after,
            table.slot_ms(&f.geometry, f.input, form),
            "{}",
            f.name
        );
        chosen.push(after);
    }
    let achieved = table.predicted_ms(chosen) / dense_ms;
    assert!(
        (achieved - fraction).abs() <= 0.03 * fraction,
        "budget {fraction}: the plan takes {achieved:.4} of the dense time"
    );
    plan
}

#[test]
fn a_latency_plan_on_a_synthetic_table_slows_no_layer_and_meets_its_budget() {
    let model = crate::model::ResNet18::new(10, Device::Cpu);
    let mut policy = CompressionPolicy::new(RankPolicy::budget(Cost::Latency, 0.5).unwrap());
    policy.input_size = [64, 64];
    let slots = slots_at(&model, policy.input_size);
    let facts: Vec<LayerFacts> = slots.iter().map(|s| LayerFacts::new(s, None)).collect();
    let (table, dense) = synthetic_table(&facts, &policy, 0.2, synthetic_ms);
    for fraction in [0.4, 0.55, 0.7] {
        checked_latency_plan(&facts, &table, dense, fraction);
    }
    // Some factorisation on the grid is slower than dense: the plans must have avoided it.
    let slower_somewhere = facts.iter().any(|f| {
        let dense = table.slot_ms(&f.geometry, f.input, Form::Dense);
        f.budget_forms(Some(8))
            .iter()
            .any(|&g| table.slot_ms(&f.geometry, f.input, g) > dense)
    });
    assert!(slower_somewhere, "the synthetic table tests nothing");
}

#[test]
fn the_ratio_rule_rounds_its_ranks_up_only_when_asked() {
    let ranks = |round_to| {
        let model = crate::model::ResNet18::new(10, Device::Cpu);
        let policy = CompressionPolicy {
            round_to,
            ..CompressionPolicy::new(RankPolicy::ratio(0.2).unwrap())
        };
        let plans = plan_layers(&model, &policy, None).unwrap().layers;
        plans
            .into_iter()
            .map(|(layer, plan)| match plan.form {
                Some(Form::Tucker2 { r_out, r_in }) => (layer, (r_out, r_in)),
                other => panic!("{layer}: {other:?}"),
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (seed, rounded) = (ranks(None), ranks(Some(8)));
    assert_eq!(
        seed["layer1.0.conv1"],
        (12, 12),
        "the seed's ranks by default"
    );
    assert_eq!(seed["layer4.0.conv1"], (102, 51));
    assert_eq!(rounded["layer1.0.conv1"], (16, 16));
    assert_eq!(rounded["layer4.0.conv1"], (104, 56));
    assert_eq!(rounded["conv1"], (16, 3), "the RGB input stays whole");
    for (name, (r_out, r_in)) in &rounded {
        let (s_out, s_in) = seed[name];
        assert!(r_out % 8 == 0 && *r_out >= s_out, "{name}: {r_out}");
        assert!(
            (*r_in % 8 == 0 || *r_in == 3) && *r_in >= s_in,
            "{name}: {r_in}"
        );
    }
}

#[test]
fn full_rank_tucker_layer_computes_the_same_convolution() {
    for (c_out, c_in, k) in [(16, 8, 3), (32, 8, 1), (8, 3, 7)] {
        let dense = conv(c_out, c_in, k, true);
        let slot = tucker(&dense, c_out, c_in).unwrap();
        let x = Tensor::randn([2, c_in, 11, 11], (Kind::Float, Device::Cpu));
        let err = relative_error(&dense.forward(&x), &slot.forward(&x));
        assert!(err < 1e-5, "{c_out}x{c_in}x{k}: {err}");
    }
}

#[test]
fn bias_is_the_original_or_zero_never_random() {
    let with = conv(8, 8, 3, true);
    let slot = tucker(&with, 4, 4).unwrap();
    let ConvSlot::Tucker(t) = &slot else {
        panic!("not Tucker-2")
    };
    assert_eq!(t.last.bias.as_ref().unwrap(), with.bias.as_ref().unwrap());
    let without = conv(8, 8, 3, false);
    let ConvSlot::Tucker(t) = tucker(&without, 4, 4).unwrap() else {
        panic!("not Tucker-2")
    };
    let bias = t.last.bias.as_ref().unwrap();
    assert_eq!(bias.abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn bad_ranks_and_groups_name_the_layer() {
    let dense = conv(8, 4, 3, false);
    for (r_out, r_in) in [(0, 2), (9, 2), (2, 5)] {
        let err = factorise(
            "layer9.conv",
            &dense,
            Form::Tucker2 { r_out, r_in },
            Method::Hosvd,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("layer9.conv") && err.contains("outside"),
            "{err}"
        );
    }
    let mut grouped = conv(8, 4, 3, false);
    grouped.config.groups = 2;
    grouped.weight = Tensor::randn([8, 2, 3, 3], (Kind::Float, Device::Cpu));
    let err = tucker(&grouped, 2, 2).unwrap_err().to_string();
    assert!(err.contains("layer t") && err.contains("grouped"), "{err}");
}

#[test]
fn fitting_to_data_lowers_each_layers_output_error_on_the_calibration_set() {
    use crate::compress::calibrate::activation_moments;
    use crate::data::Dataset;
    use crate::loader::{Loader, Transform};
    tch::manual_seed(6);
    let eval = Transform::Eval { size: 32 };
    let calibration = Loader::new(&Dataset::random(16, 32), 8, eval, Device::Cpu, true);
    let model = ResNet18::new(3, Device::Cpu);
    let moments = activation_moments(&model, &calibration).unwrap();
    assert_eq!(moments.len(), 20);
    assert_eq!(moments["layer2.0.conv1"].input.size(), [64, 64]);
    assert_eq!(moments["layer2.0.conv1"].output.size(), [128, 128]);
    let ranks = [
        ("layer2.0.conv1".to_string(), (32, 16)),
        ("layer3.0.downsample.0".to_string(), (64, 32)),
    ];
    let policy = |fit| CompressionPolicy {
        ranks: RankPolicy::Explicit(ranks.iter().cloned().collect()),
        fit: Some(fit),
        input_size: [32, 32],
        ..Default::default()
    };
    let mut by_data = model.deep_copy();
    let data_report = compress_model_fitted(&mut by_data, &policy(Fit::Data), Some(&moments));
    let mut by_weights = model.deep_copy();
    compress_model_fitted(&mut by_weights, &policy(Fit::Weights), Some(&moments)).unwrap();
    let slots = |m: &ResNet18| -> BTreeMap<String, Tensor> {
        let pairs = m
            .conv_slots()
            .into_iter()
            .map(|(n, s)| (n, s.dense_weight()));
        pairs.collect()
    };
    let (original, data_fit, weight_fit) = (slots(&model), slots(&by_data), slots(&by_weights));
    for (layer, _) in &ranks {
        let sigma = &moments[layer].input;
        let data = relative_output_error(&original[layer], &data_fit[layer], sigma);
        let weights = relative_output_error(&original[layer], &weight_fit[layer], sigma);
        assert!(data < weights, "{layer}: data {data} vs weights {weights}");
        let reported = data_report
            .as_ref()
            .unwrap()
            .layers
            .iter()
            .find(|l| &l.layer == layer);
        assert!((reported.unwrap().rel_error - data).abs() < 1e-9, "{layer}");
    }
    // Fitting to data without data is refused, naming what is missing.
    let err = compress_model_fitted(&mut model.deep_copy(), &policy(Fit::Data), None);
    assert!(err.unwrap_err().to_string().contains("calibration data"));
}

#[test]
fn tucker1_layers_are_exact_at_full_rank_and_lose_what_the_planner_says() {
    use crate::decompose::rank_pair_energy;
    let dense = conv(12, 8, 3, true); // stride 2, padding 1
    let x = Tensor::randn([2, 8, 9, 9], (Kind::Float, Device::Cpu));
    let energy = rank_pair_energy(&dense.weight, None);
    for (full, cut, output) in [
        (
            Form::Tucker1Out { r_out: 12, c_in: 8 },
            Form::Tucker1Out { r_out: 5, c_in: 8 },
            true,
        ),
        (
            Form::Tucker1In { c_out: 12, r_in: 8 },
            Form::Tucker1In { c_out: 12, r_in: 3 },
            false,
        ),
    ] {
        let slot = factorise("layer2.0.conv1", &dense, full, Method::Hosvd).unwrap();
        assert_eq!(slot.form(), full);
        assert_eq!(slot.geometry(), dense.geometry());
        let err = relative_error(&dense.forward(&x), &slot.forward(&x));
        assert!(err < 1e-5, "{full:?}: {err}");
        let slot = factorise("layer2.0.conv1", &dense, cut, Method::Hosvd).unwrap();
        let ConvSlot::TwoLayer(two) = &slot else {
            panic!("{cut:?} is not two layers")
        };
        let spatial = if output { &two.first } else { &two.last };
        assert_eq!(spatial.kernel(), [3, 3], "{cut:?}");
        // What the planner prices it at is what it loses.
        let lost = relative_error(&dense.weight, &slot.dense_weight()).powi(2);
        let (r_out, r_in) = cut.ranks().unwrap();
        let priced = energy.tucker2_error(r_out, r_in);
        assert!((lost - priced).abs() < 1e-6, "{cut:?}: {lost} vs {priced}");
        // Each layer's MACs at its own input's resolution add up to the form's.
        let by_layer: i64 = slot
            .parts()
            .iter()
            .fold((0, [9, 9]), |(total, size), c| {
                let (macs, out) = Form::Dense.macs(&c.geometry(), size);
                (total + macs, out)
            })
            .0;
        assert_eq!(slot.macs([9, 9]).0, by_layer, "{cut:?}");
        assert_eq!(slot.num_params(), cut.params([12, 8, 3, 3]), "{cut:?}");
    }
    let err = factorise(
        "layer1.0.conv2",
        &dense,
        Form::Tucker1Out { r_out: 4, c_in: 7 },
        Method::Hosvd,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layer1.0.conv2") && err.contains("whole"),
        "{err}"
    );
}

#[test]
fn tucker1_slots_round_trip_through_a_model_file() {
    let mut model = ResNet18::new(10, Device::Cpu);
    let forms = [
        ("conv1", Form::Tucker1Out { r_out: 16, c_in: 3 }),
        (
            "layer2.0.conv1",
            Form::Tucker1In {
                c_out: 128,
                r_in: 24,
            },
        ),
        (
            "layer3.1.conv2",
            Form::Tucker1Out {
                r_out: 40,
                c_in: 256,
            },
        ),
    ];
    factorise_layers(&mut model, &forms, Method::Hosvd).unwrap();
    let err = factorise_layers(
        &mut model,
        &[("layer9.conv1", Form::Svd { rank: 1 })],
        Method::Hosvd,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layer9.conv1"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tucker1.safetensors");
    model.save(&file).unwrap();
    let loaded = ResNet18::load(&file, None, Device::Cpu).unwrap();
    let forms = |m: &ResNet18| {
        m.conv_slots()
            .into_iter()
            .map(|(n, s)| (n, s.form()))
            .collect::<Vec<_>>()
    };
    assert_eq!(forms(&model), forms(&loaded));
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (a, b) = (model.forward(&x, false), loaded.forward(&x, false));
    assert!(relative_error(&a, &b) < 1e-6);
}

#[test]
fn full_rank_svd_layer_computes_the_same_strided_convolution() {
    let mut dense = conv(12, 8, 1, true);
    dense.config = ConvConfig::new(2, 0);
    let svd = |rank| factorise("d", &dense, Form::Svd { rank }, Method::Hosvd);
    let x = Tensor::randn([2, 8, 9, 9], (Kind::Float, Device::Cpu));
    let err = relative_error(&dense.forward(&x), &svd(8).unwrap().forward(&x));
    assert!(err < 1e-5, "{err}");
    // Truncated, its error is exactly the discarded singular values'.
    let w = dense.weight.reshape([12, 8]).to_kind(Kind::Double);
    let (_, s, _) = w.svd(true, false);
    let s2 = &s * &s;
    let exact = (s2.narrow(0, 3, 5).sum(Kind::Double) / s2.sum(Kind::Double))
        .sqrt()
        .double_value(&[]);
    let err = relative_error(&dense.weight, &svd(3).unwrap().dense_weight());
    assert!((err - exact).abs() < 1e-6, "{err} vs {exact}");
    for (bad, rank) in [(conv(8, 8, 3, false), 2), (conv(12, 8, 1, false), 9)] {
        let err = factorise(
            "layer3.0.downsample.0",
            &bad,
            Form::Svd { rank },
            Method::Hosvd,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("layer3.0.downsample.0"), "{err}");
    }
}
