//! The fused ops against candle's and against their scalar definitions.

use super::*;
use candle_core::Device;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn exp_is_close_to_libm_over_the_range_softmax_and_silu_use() {
    let mut worst = 0f32;
    let mut x = -80.0f32;
    while x < 80.0 {
        let (a, b) = (exp(x), x.exp());
        worst = worst.max(((a - b) / b).abs());
        x += 0.0137;
    }
    assert!(worst < 5e-7, "worst relative error {worst}");
    assert!(exp(-1e30) < 1e-37 && exp(-1e30) >= 0.0);
}

#[test]
fn fused_norms_and_silu_match_candle_unfused() {
    let dev = Device::Cpu;
    for rows in [1usize, 5, 40] {
        let x = Tensor::randn(0f32, 1.0, (rows, 96), &dev).unwrap();
        let d = Tensor::randn(0f32, 1.0, (rows, 96), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, 96, &dev).unwrap();
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &want) < 1e-5);
        let (sum, normed) = add_rms_norm(&x, &d, &w, 1e-5).unwrap();
        let want_sum = (&x + &d).unwrap();
        assert!(max_diff(&sum, &want_sum) < 1e-6);
        let want_norm = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
        assert!(max_diff(&normed, &want_norm) < 1e-5);
        let g = (x * 6.0).unwrap();
        let want = (candle_nn::ops::silu(&g).unwrap() * &d).unwrap();
        assert!(max_diff(&silu_mul(&g, &d).unwrap(), &want) < 1e-5);
    }
}

/// The joined op reads each row's halves in place: bit-identical to `silu_mul` on
/// the narrowed halves, on ragged widths, on both sides of the parallel row count,
/// for 2-D and 3-D inputs.
#[test]
fn silu_mul_joined_equals_silu_mul_on_the_halves() {
    let dev = Device::Cpu;
    for (dims, w) in [
        (vec![1usize], 1usize),
        (vec![3], 7),
        (vec![33], 96),
        (vec![70], 13),
        (vec![2, 20], 40),
    ] {
        let mut shape = dims.clone();
        shape.push(2 * w);
        let gu = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * 4.0).unwrap();
        let last = dims.len();
        let gate = gu.narrow(last, 0, w).unwrap();
        let up = gu.narrow(last, w, w).unwrap();
        let want = silu_mul(&gate, &up).unwrap();
        let got = silu_mul_joined(&gu, w).unwrap();
        assert_eq!(got.dims(), want.dims());
        let (a, b) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{dims:?} x 2*{w}: joined differs from silu_mul"
        );
    }
    let odd = Tensor::zeros((2, 9), DType::F32, &dev).unwrap();
    assert!(silu_mul_joined(&odd, 4).is_ok(), "falls back to the halves");
}

#[test]
fn rope_and_the_rotating_cache_write_match_candle_rope() {
    let dev = Device::Cpu;
    let (t, h, d, max_pos) = (7usize, 3usize, 16usize, 50usize);
    let half = d / 2;
    let cos: Vec<f32> = (0..max_pos * half)
        .map(|i| (i as f32 * 0.1).cos())
        .collect();
    let sin: Vec<f32> = (0..max_pos * half)
        .map(|i| (i as f32 * 0.1).sin())
        .collect();
    let positions: Vec<u32> = vec![3, 4, 5, 0, 49, 10, 11];
    let r = Rope {
        cos: &cos,
        sin: &sin,
        positions: &positions,
    };
    let x = Tensor::randn(0f32, 1.0, (t, h, d), &dev).unwrap();
    let pos = Tensor::from_slice(&positions, t, &dev).unwrap();
    let ct = Tensor::from_slice(&cos, (max_pos, half), &dev).unwrap();
    let st = Tensor::from_slice(&sin, (max_pos, half), &dev).unwrap();
    let c = ct.index_select(&pos, 0).unwrap();
    let s = st.index_select(&pos, 0).unwrap();
    let want = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0).unwrap(), &c, &s)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_diff(&rope(&x, r).unwrap(), &want) < 1e-6);

    // Slots scattered over a cache of 4 blocks of 4.
    let cache = Tensor::zeros((4, 4, h, d), DType::F32, &dev).unwrap();
    let slots: Vec<u32> = vec![13, 2, 7, 0, 15, 8, 9];
    write_cache(&cache, &x, &slots, Some(r), || unreachable!()).unwrap();
    let flat = cache.reshape((16, h, d)).unwrap();
    for (tok, &slot) in slots.iter().enumerate() {
        let got = flat.get(slot as usize).unwrap();
        assert!(
            max_diff(&got, &want.get(tok).unwrap()) < 1e-6,
            "token {tok}"
        );
    }
    let bad = write_cache(&cache, &x, &[99; 7], None, || unreachable!());
    assert!(bad.is_err());
}
