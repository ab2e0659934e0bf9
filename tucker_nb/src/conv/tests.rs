use super::*;
use tch::Device;

#[test]
fn the_cost_model_counts_each_layer_at_the_resolution_it_reads() {
    let geometry = ConvGeometry {
        shape: [128, 64, 3, 3],
        config: ConvConfig::new(2, 1),
    };
    let (dense, out) = Form::Dense.macs(&geometry, [56, 56]);
    assert_eq!(out, [28, 28]);
    assert_eq!(dense, 128 * 64 * 9 * 28 * 28);
    let (tucker, _) = Form::Tucker2 {
        r_out: 25,
        r_in: 12,
    }
    .macs(&geometry, [56, 56]);
    assert_eq!(
        tucker,
        64 * 12 * 56 * 56 + (25 * 12 * 9 + 128 * 25) * 28 * 28
    );
    // A slot's MACs are its layers' own, each at its input's resolution.
    let opts = (Kind::Float, Device::Cpu);
    let slot = ConvSlot::Tucker(TuckerConv::new(
        Tensor::zeros([12, 64, 1, 1], opts),
        Tensor::zeros([25, 12, 3, 3], opts),
        Tensor::zeros([128, 25, 1, 1], opts),
        None,
        ConvConfig::new(2, 1),
    ));
    let by_layer: i64 = slot
        .parts()
        .iter()
        .fold((0, [56, 56]), |(total, size), c| {
            let (macs, out) = Form::Dense.macs(&c.geometry(), size);
            (total + macs, out)
        })
        .0;
    assert_eq!(slot.macs([56, 56]).0, by_layer);
    assert_eq!(by_layer, tucker);
}

/// Values and gradients of `conv` on `x` against libtorch's strided conv in float64 NCHW
/// (no oneDNN), as the largest error relative to each reference's largest magnitude.
fn strided_conv_error(conv: &Conv2d, x: &Tensor) -> f64 {
    let x = x.set_requires_grad(true);
    let weight = conv.weight.shallow_clone().set_requires_grad(true);
    let layer = Conv2d {
        weight: weight.shallow_clone(),
        bias: conv.bias.as_ref().map(|b| b.shallow_clone()),
        config: conv.config,
    };
    let y = layer.forward(&x);
    let grad = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
    let (gx, gw) = match &Tensor::run_backward(
        &[(&y * &grad).sum(Kind::Float)],
        &[&x, &weight],
        false,
        false,
    )[..]
    {
        [gx, gw] => (gx.shallow_clone(), gw.shallow_clone()),
        _ => unreachable!("two inputs"),
    };
    let f64_of = |t: &Tensor| {
        t.detach()
            .to_kind(Kind::Double)
            .contiguous()
            .set_requires_grad(true)
    };
    let (xd, wd) = (f64_of(&x), f64_of(&weight));
    let c = &conv.config;
    let bias = conv.bias.as_ref().map(|b| b.to_kind(Kind::Double));
    let yd = xd.conv2d(
        &wd,
        bias.as_ref(),
        c.stride,
        c.padding,
        c.dilation,
        c.groups,
    );
    let loss = (&yd * grad.to_kind(Kind::Double)).sum(Kind::Double);
    let reference = Tensor::run_backward(&[loss], &[&xd, &wd], false, false);
    let rel = |a: &Tensor, b: &Tensor| {
        let b = b.detach();
        (a.detach().to_kind(Kind::Double) - &b)
            .abs()
            .max()
            .double_value(&[])
            / b.abs().max().double_value(&[])
    };
    rel(&y, &yd)
        .max(rel(&gx, &reference[0]))
        .max(rel(&gw, &reference[1]))
}

#[test]
fn a_strided_pointwise_conv_trains_where_libtorchs_own_kernel_corrupts_the_heap() {
    // A Tucker-2 downsample's 1×1 core at ratio 0.2 (12 → 25, stride 2) on an epoch's odd
    // last batch, channels-last on 2+ CPU threads: libtorch 2.11's strided 1×1 backward
    // writes past its buffers here (scripts/onednn_strided_1x1.py). The test binary
    // crashing is this test failing.
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    for (batch, c_in, c_out) in [
        (25, 12, 25),
        (29, 12, 25),
        (33, 8, 51),
        (25, 13, 12),
        (64, 12, 25),
    ] {
        let conv = Conv2d {
            weight: crate::layout::to_channels_last(&Tensor::randn([c_out, c_in, 1, 1], opts)),
            bias: None,
            config: ConvConfig::new(2, 0),
        };
        let x = crate::layout::to_channels_last(&Tensor::randn([batch, c_in, 16, 16], opts));
        for _ in 0..3 {
            let error = strided_conv_error(&conv, &x);
            assert!(error < 1e-5, "batch {batch}, {c_in} → {c_out}: {error:e}");
        }
    }
}

#[test]
fn a_sampled_pointwise_conv_equals_the_strided_one_with_padding_bias_and_odd_sides() {
    tch::manual_seed(1);
    let opts = (Kind::Float, Device::Cpu);
    for (stride, padding, side) in [(2, 0, 15), (2, 1, 16), (3, 1, 17), (2, 0, 1)] {
        let conv = Conv2d {
            weight: Tensor::randn([6, 4, 1, 1], opts),
            bias: Some(Tensor::randn([6], opts)),
            config: ConvConfig::new(stride, padding),
        };
        let x = Tensor::randn([3, 4, side, side], opts);
        let expected = conv.geometry().config.output([side, side], [1, 1]);
        assert_eq!(conv.forward(&x).size()[2..], expected);
        let error = strided_conv_error(&conv, &x);
        assert!(
            error < 1e-5,
            "stride {stride}, padding {padding}, side {side}: {error:e}"
        );
    }
}
