//! tucker_nb against PyTorch itself: torchvision's ResNet18 and the seed's TuckerCompressor, run
//! from the project venv, are the reference for logits, reconstructed kernels, saved files and
//! MAC counts.

mod common;

use std::collections::BTreeMap;

use common::*;
use tch::{Device, Kind, Tensor};
use tucker_nb::compress::factorise_layers;
use tucker_nb::conv::ConvSlot;
use tucker_nb::conv::Form;
use tucker_nb::{compress_model, runtime, CompressionPolicy, Method, RankPolicy, ResNet18};

fn logits(model: &ResNet18, input: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(input, false))
}

/// `{"layer": [r_out, r_in]}` for Tucker-2 layers, `[r]` for two-layer SVDs.
fn ranks_json(model: &ResNet18) -> String {
    let ranks: BTreeMap<String, Vec<i64>> = model
        .conv_slots()
        .into_iter()
        .filter_map(|(name, slot)| match slot {
            ConvSlot::Tucker(t) => Some((name, vec![t.ranks().0, t.ranks().1])),
            ConvSlot::TwoLayer(s) => Some((name, vec![s.rank()])),
            ConvSlot::Dense(_) => None,
            ConvSlot::Cp(_) => panic!("{name}: the seed's compressor has no CP form"),
        })
        .collect();
    serde_json::to_string(&ranks).unwrap()
}

#[test]
fn logits_equal_torchvisions_for_the_same_weights() {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 0);
    let reference = dir.path().join("ref.safetensors");
    oracle(&["reference", path_str(&weights), path_str(&reference)]);
    let reference = read(&reference);

    let model = ResNet18::load(&weights, None, Device::Cpu).unwrap();
    let err = rel_err(&logits(&model, &reference["input"]), &reference["logits"]);
    assert!(
        err < 1e-5,
        "logits differ from torchvision's: rel. err {err}"
    );

    // BN bookkeeping survives the load, and a safetensors round trip keeps everything.
    let tracked = model.bn1.num_batches_tracked.int64_value(&[]);
    assert_eq!(tracked, 7);
    let saved = dir.path().join("model.safetensors");
    model.save(&saved).unwrap();
    let original: BTreeMap<String, Tensor> = tucker_nb::read_state_dict(&weights)
        .unwrap()
        .into_iter()
        .collect();
    let resaved: BTreeMap<String, Tensor> = Tensor::read_safetensors(&saved)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        resaved.keys().collect::<Vec<_>>()
    );
    for (k, v) in &original {
        assert!(v.equal(&resaved[k]), "{k} changed in the round trip");
    }
    let reloaded = ResNet18::load(&saved, None, Device::Cpu).unwrap();
    assert!(logits(&reloaded, &reference["input"]).equal(&logits(&model, &reference["input"])));

    // The seed's classifier swap: a fresh fc of the asked-for size, everything else kept.
    let cifar = ResNet18::load(&weights, Some(100), Device::Cpu).unwrap();
    assert_eq!(cifar.fc.weight.size(), [100, 512]);
    assert_eq!(cifar.fc.bias.size(), [100]);
    assert!(cifar.layers[3][1]
        .bn2
        .running_var
        .equal(&model.layers[3][1].bn2.running_var));
    let bound = cifar.fc.weight.abs().max().double_value(&[]);
    assert!(
        bound <= 1.0 / 512f64.sqrt() + 1e-7 && bound > 0.0,
        "fc init bound {bound}"
    );
}

#[test]
fn full_rank_compression_keeps_the_logits() {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 1);
    let reference = dir.path().join("ref.safetensors");
    oracle(&["reference", path_str(&weights), path_str(&reference)]);
    let input = &read(&reference)["input"];

    let mut model = ResNet18::load(&weights, None, Device::Cpu).unwrap();
    let before = logits(&model, input);
    let full: BTreeMap<String, (i64, i64)> = model
        .conv_slots()
        .into_iter()
        .map(|(name, slot)| {
            let [c_out, c_in, _, _] = slot.dense_shape();
            (name, (c_out, c_in))
        })
        .collect();
    let report = compress_model(
        &mut model,
        &CompressionPolicy::new(RankPolicy::Explicit(full)),
    )
    .unwrap();
    assert!(report
        .layers
        .iter()
        .all(|l| l.ranks.is_some() && l.rel_error < 1e-5));
    let err = rel_err(&logits(&model, input), &before);
    assert!(
        err < 1e-4,
        "full-rank compressed logits differ: rel. err {err}"
    );
}

#[test]
fn reconstructed_kernels_equal_the_seeds_at_ratio_0_2() {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 2);
    let mut model = ResNet18::load(&weights, None, Device::Cpu).unwrap();
    let originals: BTreeMap<String, Tensor> = model
        .conv_slots()
        .into_iter()
        .map(|(n, s)| (n, s.dense_weight().copy()))
        .collect();
    let report = compress_model(
        &mut model,
        &CompressionPolicy::new(RankPolicy::ratio(0.2).unwrap()),
    )
    .unwrap();
    assert_eq!(report.layers.len(), 20);

    let ranks = dir.path().join("ranks.json");
    std::fs::write(&ranks, ranks_json(&model)).unwrap();
    let seed = dir.path().join("seed.safetensors");
    oracle(&[
        "seed-reconstruct",
        path_str(&weights),
        path_str(&ranks),
        path_str(&seed),
    ]);
    let seed = read(&seed);
    assert_eq!(seed.len(), 20);
    for (name, slot) in model.conv_slots() {
        let ours = slot.dense_weight();
        let err = rel_err(&ours, &seed[&name]);
        assert!(err < 1e-4, "{name}: Ŵ differs from the seed's by {err}");
        let line = report.layers.iter().find(|l| l.layer == name).unwrap();
        let fit = rel_err(&ours, &originals[&name]);
        assert!(
            (fit - line.rel_error).abs() < 1e-5,
            "{name}: report says {} but ‖W−Ŵ‖/‖W‖ = {fit}",
            line.rel_error
        );
    }
    // The seed's ranks, except that the RGB input of conv1 is not squeezed to rank 1.
    let rank = |n: &str| {
        report
            .layers
            .iter()
            .find(|l| l.layer == n)
            .unwrap()
            .ranks
            .unwrap()
    };
    assert_eq!(rank("conv1"), (12, 3));
    assert_eq!(rank("layer2.0.conv1"), (25, 12));
    assert_eq!(rank("layer4.1.conv2"), (102, 102));
}

#[test]
fn compressed_file_loads_strictly_into_the_seeds_structure() {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 3);
    let out = dir.path().join("compressed.safetensors");
    let csv = dir.path().join("layers.csv");
    tucker_nb_ok(&[
        "compress",
        "--weights",
        path_str(&weights),
        "--num-classes",
        "100",
        "--ratio",
        "0.2",
        "--out",
        path_str(&out),
        "--report",
        path_str(&csv),
        "--device",
        "cpu",
    ]);

    // Loads back without being told the ranks, and the seed's PyTorch structure agrees.
    let model = ResNet18::load(&out, None, Device::Cpu).unwrap();
    assert_eq!(model.num_classes(), 100);
    let keys: Vec<String> = read(&out).into_keys().collect();
    for key in [
        "layer1.0.conv1.0.weight",
        "layer1.0.conv1.1.weight",
        "layer1.0.conv1.2.weight",
        "layer1.0.conv1.2.bias",
        "layer2.0.downsample.0.2.bias",
        "layer2.0.downsample.1.num_batches_tracked",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    torch_input_and_compare(&model, dir.path(), &out, &csv);
}

fn torch_input_and_compare(
    model: &ResNet18,
    dir: &std::path::Path,
    out: &std::path::Path,
    csv: &std::path::Path,
) {
    let weights_for_input = dir.join("input-source.pth");
    oracle(&[
        "make-weights",
        path_str(&weights_for_input),
        "--num-classes",
        "100",
    ]);
    let reference = dir.join("ref.safetensors");
    oracle(&[
        "reference",
        path_str(&weights_for_input),
        path_str(&reference),
    ]);
    let ranks = dir.join("ranks.json");
    std::fs::write(&ranks, ranks_json(model)).unwrap();
    let torch_out = dir.join("torch.safetensors");
    oracle(&[
        "seed-load",
        path_str(out),
        path_str(&ranks),
        path_str(&reference),
        path_str(&torch_out),
    ]);
    let torch_out = read(&torch_out);
    let reference = read(&reference);

    let ours = logits(model, &reference["input"]);
    let err = rel_err(&ours, &torch_out["logits"]);
    assert!(
        err < 1e-5,
        "compressed logits differ from PyTorch's: rel. err {err}"
    );

    // MACs: our report against forward hooks in PyTorch, dense and compressed, at 224 px.
    let report = Csv::read(csv);
    assert_eq!(report.rows.len(), 20);
    assert_eq!(
        report.total("macs_before"),
        reference["conv_macs"].int64_value(&[0])
    );
    assert_eq!(
        report.total("macs_after"),
        torch_out["conv_macs"].int64_value(&[0])
    );
    let params_after = report.total("params_after");
    let counted: i64 = model
        .named_tensors()
        .iter()
        .filter(|(n, t)| {
            n.contains("conv") || n.contains("downsample.0") && t.kind() == Kind::Float
        })
        .map(|(_, t)| t.numel() as i64)
        .sum();
    assert_eq!(params_after, counted);
}

#[test]
fn svd_layers_and_folded_bns_load_strictly_into_pytorch_with_the_same_logits() {
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 5);
    let out = dir.path().join("energy.safetensors");
    let csv = dir.path().join("layers.csv");
    let run = tucker_nb_ok(&[
        "compress",
        "--weights",
        path_str(&weights),
        "--num-classes",
        "100",
        "--policy",
        "energy:0.5",
        "--method",
        "hosvd",
        "--fold-bn",
        "--out",
        path_str(&out),
        "--report",
        path_str(&csv),
        "--device",
        "cpu",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("folded 20 BNs"), "{stdout}");
    let model = ResNet18::load(&out, None, Device::Cpu).unwrap();
    let svd = model
        .conv_slots()
        .iter()
        .filter(|(_, s)| matches!(s, ConvSlot::TwoLayer(_)))
        .count();
    assert_eq!(svd, 3, "the three projection shortcuts are two-layer SVDs");
    let keys: Vec<String> = read(&out).into_keys().collect();
    for key in [
        "layer2.0.downsample.0.0.weight",
        "layer2.0.downsample.0.1.bias",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    torch_input_and_compare(&model, dir.path(), &out, &csv);
}

#[test]
fn every_slot_form_rebuilds_in_pytorch_from_the_files_keys_alone() {
    // scripts/torch_resnet.py (the benchmarks' and scaling-out scripts' model) reads only the
    // keys: dense, Tucker-2, SVD, both Tucker-1 forms and CP, strided and not, give our logits and
    // MACs (counted by forward hooks).
    runtime::init();
    let dir = tempfile::tempdir().unwrap();
    let weights = torchvision_weights(dir.path(), 3);
    let mut model = ResNet18::load(&weights, Some(100), Device::Cpu).unwrap();
    let forms = [
        ("conv1", Form::Tucker1Out { r_out: 24, c_in: 3 }),
        (
            "layer1.0.conv1",
            Form::Tucker2 {
                r_out: 16,
                r_in: 24,
            },
        ),
        (
            "layer2.0.conv1",
            Form::Tucker1In {
                c_out: 128,
                r_in: 40,
            },
        ),
        ("layer2.0.downsample.0", Form::Svd { rank: 32 }),
        (
            "layer3.0.conv1",
            Form::Tucker1Out {
                r_out: 64,
                c_in: 128,
            },
        ),
        (
            "layer4.1.conv2",
            Form::Tucker1In {
                c_out: 512,
                r_in: 96,
            },
        ),
        ("layer1.1.conv2", Form::Cp { rank: 20 }),
        ("layer4.0.conv1", Form::Cp { rank: 48 }), // stride 2
    ];
    factorise_layers(&mut model, &forms, Method::Hosvd).unwrap();
    let out = dir.path().join("mixed.safetensors");
    model.save(&out).unwrap();
    let input_source = dir.path().join("input-source.pth");
    oracle(&[
        "make-weights",
        path_str(&input_source),
        "--num-classes",
        "100",
    ]);
    let reference = dir.path().join("ref.safetensors");
    oracle(&["reference", path_str(&input_source), path_str(&reference)]);
    let torch_out = dir.path().join("torch.safetensors");
    oracle(&[
        "keys-load",
        path_str(&out),
        path_str(&reference),
        path_str(&torch_out),
    ]);
    let (torch_out, reference) = (read(&torch_out), read(&reference));
    let err = rel_err(&logits(&model, &reference["input"]), &torch_out["logits"]);
    assert!(err < 1e-5, "logits differ from PyTorch's: rel. err {err}");
    let theirs = torch_out["conv_macs"].int64_value(&[0]);
    assert_eq!(model.conv_macs([224, 224]), theirs);
}
