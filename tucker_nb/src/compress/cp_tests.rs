//! CP slots: exact on kernels of CP rank R whatever the geometry, the cost model, bad requests,
//! the `cp:R` rule, files, BN folding and budgets that mix CP with Tucker.

use super::*;
use crate::compress::cost::Cost;
use crate::conv::ConvGeometry;
use crate::decompose::random_cp_kernel;
use crate::model::ResNet18;
use tch::{Device, Kind, Tensor};

fn cp_conv(shape: [i64; 4], rank: i64, config: ConvConfig) -> Conv2d {
    tch::manual_seed(3);
    Conv2d {
        weight: random_cp_kernel(shape, rank).to_kind(Kind::Float),
        bias: Some(Tensor::randn([shape[0]], (Kind::Float, Device::Cpu))),
        config,
    }
}

#[test]
fn cp_is_exact_on_a_rank_r_kernel_for_strides_padding_and_dilation() {
    let geometries = [
        ([1, 1], [1, 1], [1, 1]),
        ([2, 2], [1, 1], [1, 1]),
        ([1, 1], [2, 2], [2, 2]),
        ([2, 1], [1, 2], [1, 2]),
    ];
    for (stride, padding, dilation) in geometries {
        let config = ConvConfig {
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let dense = cp_conv([16, 12, 3, 3], 5, config);
        let slot = factorise(
            "layer1.0.conv1",
            &dense,
            Form::Cp { rank: 5 },
            Method::Hosvd,
        )
        .unwrap();
        assert_eq!(slot.form(), Form::Cp { rank: 5 });
        assert_eq!(slot.geometry(), dense.geometry());
        let x = Tensor::randn([2, 12, 15, 13], (Kind::Float, Device::Cpu));
        let (want, got) = (dense.forward(&x), slot.forward(&x));
        assert_eq!(want.size(), got.size());
        let err = relative_error(&want, &got);
        assert!(
            err < 1e-5,
            "stride {stride:?} padding {padding:?} dilation {dilation:?}: {err}"
        );
        // The slot's MACs are its four layers' own, each at the resolution it reads.
        let by_layer: i64 = slot
            .parts()
            .iter()
            .fold((0, [15, 13]), |(total, size), c| {
                let (macs, out) = Form::Dense.macs(&c.geometry(), size);
                (total + macs, out)
            })
            .0;
        assert_eq!(slot.macs([15, 13]).0, by_layer);
        assert_eq!(
            slot.num_params(),
            Form::Cp { rank: 5 }.params(dense.geometry().shape)
        );
    }
}

#[test]
fn cp_on_a_pointwise_or_grouped_conv_or_at_a_bad_rank_names_the_layer() {
    let ok = cp_conv([8, 6, 3, 3], 2, ConvConfig::new(1, 1));
    let pointwise = cp_conv([8, 6, 1, 1], 2, ConvConfig::default());
    let mut grouped = cp_conv([8, 3, 3, 3], 2, ConvConfig::new(1, 1));
    grouped.config.groups = 2;
    let cases = [
        (&pointwise, 2, "1×1"),
        (&grouped, 2, "grouped"),
        (&ok, 0, "outside 1..=6"),
        (&ok, 7, "outside 1..=6"),
    ];
    for (conv, rank, says) in cases {
        let err = factorise("layer2.1.conv2", conv, Form::Cp { rank }, Method::Hosvd)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer2.1.conv2") && err.contains(says),
            "{err}"
        );
    }
}

#[test]
fn the_cp_rule_takes_every_kxk_conv_but_the_stem_and_svds_the_pointwise_ones() {
    let policy = |spec: &str| CompressionPolicy {
        input_size: [32, 32],
        ..CompressionPolicy::new(spec.parse().unwrap())
    };
    let model = ResNet18::new(10, Device::Cpu);
    let plan = plan_layers(&model, &policy("cp:0.25"), None)
        .unwrap()
        .layers;
    for (name, slot) in model.conv_slots() {
        let [c_out, c_in, kh, _] = slot.dense_shape();
        let rank = (c_out.min(c_in) / 4).max(1);
        let want = match (name.as_str(), kh) {
            ("conv1", _) => None,
            (_, 1) => Some(Form::Svd { rank }),
            _ => Some(Form::Cp { rank }),
        };
        assert_eq!(plan[&name].form, want, "{name}");
    }
    assert!(
        plan["conv1"].note.contains("+stem"),
        "{}",
        plan["conv1"].note
    );
    let with_stem = plan_layers(&model, &policy("cp:0.5+stem"), None).unwrap();
    assert_eq!(with_stem.layers["conv1"].form, Some(Form::Cp { rank: 1 }));
    // A 1×1's SVD at rank min(C_in, C_out) costs more than the conv: it stays dense.
    let whole = plan_layers(&model, &policy("cp:1"), None).unwrap();
    let shortcut = &whole.layers["layer2.0.downsample.0"];
    assert_eq!(shortcut.form, None);
    assert!(shortcut.note.contains("would not cut"), "{}", shortcut.note);
    assert_eq!(
        whole.layers["layer4.1.conv2"].form,
        Some(Form::Cp { rank: 512 })
    );
    // A later stage needs a policy that reads the kernels.
    let err = policy("cp:0.25")
        .validate_as_stage()
        .unwrap_err()
        .to_string();
    assert!(err.contains("cp:0.25"), "{err}");
}

#[test]
fn the_cp_policy_at_a_tucker_reports_macs_costs_the_same() {
    let model = ResNet18::new(10, Device::Cpu);
    let size = [64, 64];
    let policy = |ranks| CompressionPolicy {
        input_size: size,
        ..CompressionPolicy::new(ranks)
    };
    let tucker_plan = plan_layers(&model, &policy("ratio:0.2".parse().unwrap()), None).unwrap();
    let slots = slots_at(&model, size);
    let kept = |plan: &Plan| {
        let (mut dense, mut after) = (0, 0);
        for (name, slot, input) in &slots {
            dense += slot.macs(*input).0;
            after += plan.layers[name]
                .form
                .map_or(slot.macs(*input).0, |f| f.macs(&slot.geometry(), *input).0);
        }
        after as f64 / dense as f64
    };
    let target = kept(&tucker_plan);
    let cp = cp_policy_at_macs(&model, target, size).unwrap();
    assert!(matches!(cp, RankPolicy::Cp { stem: false, .. }), "{cp}");
    let achieved = kept(&plan_layers(&model, &policy(cp.clone()), None).unwrap());
    assert!(
        (achieved - target).abs() < 0.01 * target,
        "{cp}: {achieved} vs {target}"
    );
}

#[test]
fn cp_slots_round_trip_through_a_file_and_fold_their_bn() {
    let mut model = ResNet18::new(10, Device::Cpu);
    let forms = [
        ("layer1.0.conv1", Form::Cp { rank: 24 }),
        ("layer2.0.conv1", Form::Cp { rank: 16 }), // stride 2
        ("layer3.1.conv2", Form::Cp { rank: 40 }),
    ];
    factorise_layers(&mut model, &forms, Method::Hosvd).unwrap();
    // Running statistics and affine terms that are not the identity, so folding has work to do.
    tch::manual_seed(4);
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let _ = model.forward(&x, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cp.safetensors");
    model.save(&file).unwrap();
    let loaded = ResNet18::load(&file, None, Device::Cpu).unwrap();
    for (name, form) in forms {
        let slot = loaded
            .conv_slots()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1;
        assert_eq!(slot.form(), form, "{name}");
    }
    let (a, b) = (model.forward(&x, false), loaded.forward(&x, false));
    assert!(relative_error(&a, &b) < 1e-6);
    let mut folded = loaded.deep_copy();
    assert_eq!(folded.fold_batch_norms().len(), 3);
    let c = folded.forward(&x, false);
    assert!(relative_error(&a, &c) < 1e-5, "{}", relative_error(&a, &c));
}

/// A kernel of CP rank `rank` whose factors are standard normal values from their own seeded
/// generator: tch's global one is shared with the tests running beside this one, whose draws and
/// reseeds would change it from run to run.
fn seeded_cp_kernel(shape: [i64; 4], rank: i64, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut factor = |n: i64| {
        let values: Vec<f64> = (0..n * rank)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() // Box–Muller
            })
            .collect();
        Tensor::from_slice(&values).reshape([n, rank])
    };
    let [o, c, kh, kw] = shape;
    CpFactors {
        a: factor(o),
        b: factor(c),
        k: factor(kh),
        l: factor(kw),
        relative_error: 0.0,
        iterations: 0,
    }
    .reconstruct()
}

/// A random model whose `layer3.0.conv2` kernel has CP rank 64 (a point of its CP grid): CP is
/// exact there, at half the MACs of the Tucker-2 (64, 64) that is also exact.
fn planted_model() -> ResNet18 {
    let mut model = ResNet18::new(10, Device::Cpu);
    for unit in model.units_mut() {
        if unit.conv_name == PLANTED {
            *unit.conv = ConvSlot::Dense(Conv2d {
                weight: seeded_cp_kernel([256, 256, 3, 3], 64, 3).to_kind(Kind::Float),
                bias: None,
                config: ConvConfig::new(1, 1),
            });
        }
    }
    model
}

const PLANTED: &str = "layer3.0.conv2";

#[test]
fn a_macs_budget_that_allows_cp_mixes_forms_and_lands_on_its_target() {
    let model = planted_model();
    let slots = slots_at(&model, [32, 32]);
    let mut facts: Vec<LayerFacts> = slots.iter().map(|s| LayerFacts::new(s, None)).collect();
    // Fitting every layer's grid takes a minute; the planted layer and the first stage show the
    // mix (the other layers price Tucker alone).
    for f in facts
        .iter_mut()
        .filter(|f| f.takes_cp() && f.shape()[0] <= 256)
    {
        let [c_out, c_in, _, _] = f.shape();
        f.fit_cp(&budget::cp_rank_grid(c_out.min(c_in), None), None);
    }
    let counted = Cost::Macs.counted().unwrap();
    for target in [0.1, 0.33] {
        let plan = budget::plan_budget(&facts, target, &counted, None);
        let form = |f: &LayerFacts| plan[&f.name].form.unwrap_or(f.current.form);
        let macs = |pick: &dyn Fn(&LayerFacts) -> Form| -> f64 {
            facts.iter().map(|f| f.macs(pick(f)) as f64).sum()
        };
        let achieved = macs(&form) / macs(&|_| Form::Dense);
        assert!(
            (achieved - target).abs() <= 0.02 * target,
            "budget {target}: {achieved}"
        );
        let names: Vec<&str> = facts.iter().map(|f| form(f).name()).collect();
        assert!(names.iter().any(|n| n.starts_with("tucker")), "{names:?}");
        let planted = &plan[PLANTED];
        assert!(
            matches!(planted.form, Some(Form::Cp { .. })),
            "budget {target}: the planted layer took {:?}",
            planted.form
        );
        assert!(planted.note.contains("CP"), "{}", planted.note);
    }
    let planted = facts.iter().find(|f| f.name == PLANTED).unwrap();
    // Its planning fit (a quarter of the sweeps) is already close; the random layers' are not.
    let error = planted.error(Form::Cp { rank: 64 });
    assert!(error < 0.01, "the planted layer's CP fit: {error}");
    let random = facts.iter().find(|f| f.name == "layer3.1.conv1").unwrap();
    assert!(random.error(Form::Cp { rank: 64 }) > 0.5);
}

/// A device where a launch is cheap next to the arithmetic (a CPU, say): each conv costs a little
/// per launch and per MAC, each unfolded BN a pass over its output.
fn launch_light_ms(geometry: &ConvGeometry, input: [i64; 2], form: Form) -> f64 {
    let (macs, [h, w]) = form.macs(geometry, input);
    let convs = match form {
        Form::Dense => 1.0,
        Form::Tucker2 { .. } => 3.0,
        Form::Cp { .. } => 4.0,
        _ => 2.0,
    };
    0.002 * convs + macs as f64 * 2e-8 + (geometry.shape[0] * h * w) as f64 * 1e-6
}

#[test]
fn a_latency_budget_that_allows_cp_mixes_forms_slows_no_layer_and_meets_its_budget() {
    let model = planted_model();
    let mut policy = CompressionPolicy::new("budget-latency:0.5+cp".parse().unwrap());
    policy.input_size = [64, 64];
    let slots = slots_at(&model, policy.input_size);
    let mut facts: Vec<LayerFacts> = slots.iter().map(|s| LayerFacts::new(s, None)).collect();
    // The planted layer's CP grid is fitted (every layer's takes minutes); the others price Tucker.
    let planted = facts.iter_mut().find(|f| f.name == PLANTED).unwrap();
    planted.fit_cp(&budget::cp_rank_grid(256, None), None);
    let wanted = latency_slots(&facts, 8);
    assert!(
        wanted
            .iter()
            .any(|s| s.forms.iter().any(|f| matches!(f, Form::Cp { .. }))),
        "the latency table is not asked for CP"
    );
    let (table, dense) = super::tests::synthetic_table(&facts, &policy, 0.1, launch_light_ms);
    for fraction in [0.3, 0.5] {
        let plan = super::tests::checked_latency_plan(&facts, &table, dense, fraction);
        let names: Vec<&str> = facts
            .iter()
            .map(|f| plan[&f.name].form.unwrap_or(f.current.form).name())
            .collect();
        assert!(names.iter().any(|n| n.starts_with("tucker")), "{names:?}");
        let planted = &plan[PLANTED];
        assert!(
            matches!(planted.form, Some(Form::Cp { .. })),
            "budget {fraction}: the planted layer took {:?}",
            planted.form
        );
        assert!(planted.note.contains("CP"), "{}", planted.note);
    }
}
