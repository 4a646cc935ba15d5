//! The sampling op (device_sampler.rs) against the host sampler (sampler.rs): both
//! draw through seeded_draw.rs, so the same seed gives the same tokens in every mode
//! (greedy, top-k, nuclei, min-p, penalties, banned EOS, plain temperature), the draws
//! follow the softmax (a chi-square test, fixed seed), and log-probs equal a float64
//! log-softmax. (tests/cuda_emulator_sample.rs holds the CUDA kernel to the op.)

use candle_core::{Device, Tensor};
use hearth_runtime::device_sampler::{sample_rows, SamplerState};
use hearth_runtime::sampler::Sampler;
use hearth_runtime::SamplingParams;
use rand::{Rng, SeedableRng};

fn logits(rng: &mut rand::rngs::StdRng, vocab: usize, spread: f32) -> Vec<f32> {
    (0..vocab)
        .map(|_| rng.random_range(-1.0f32..1.0) * spread)
        .collect()
}

/// Runs both samplers over the same rows, each keeping its own penalty state.
fn both(
    params: SamplingParams,
    prompt: &[u32],
    rows: &[Vec<f32>],
    eos: &[u32],
) -> (Vec<u32>, Vec<u32>) {
    let mut host = Sampler::new(params.clone(), prompt);
    let mut dev = SamplerState::new(params, prompt);
    let mut h = Vec::new();
    let mut d = Vec::new();
    for row in rows {
        h.push(host.sample(&mut row.clone(), eos));
        let t = Tensor::from_slice(row, (1, row.len()), &Device::Cpu).unwrap();
        let s = sample_rows(&t, &[dev.row(eos)]).unwrap();
        dev.record(s[0].token);
        d.push(s[0].token);
    }
    (h, d)
}

#[test]
fn same_seed_same_tokens_in_every_mode() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let vocab = 5000;
    let flat: Vec<Vec<f32>> = (0..200).map(|_| logits(&mut rng, vocab, 4.0)).collect();
    // Peaked rows: a few clear leaders, so nuclei are small.
    let peaked: Vec<Vec<f32>> = (0..200)
        .map(|_| {
            let mut r = logits(&mut rng, vocab, 2.0);
            for _ in 0..5 {
                let i = rng.random_range(0..vocab);
                r[i] += 9.0 + rng.random_range(0.0..2.0);
            }
            r
        })
        .collect();
    let base = SamplingParams {
        seed: Some(17),
        ..SamplingParams::greedy(1000)
    };
    let cases: Vec<(&str, SamplingParams, &Vec<Vec<f32>>)> = vec![
        ("greedy", base.clone(), &flat),
        (
            "top-k",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                ..base.clone()
            },
            &flat,
        ),
        (
            "top-k + top-p + min-p",
            SamplingParams {
                temperature: 1.3,
                top_k: 100,
                top_p: 0.7,
                min_p: 0.02,
                ..base.clone()
            },
            &flat,
        ),
        (
            "top-p alone",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                ..base.clone()
            },
            &peaked,
        ),
        (
            "min-p alone",
            SamplingParams {
                temperature: 0.7,
                min_p: 0.05,
                ..base.clone()
            },
            &peaked,
        ),
        (
            "penalties",
            SamplingParams {
                temperature: 0.9,
                top_k: 20,
                repetition_penalty: 1.3,
                presence_penalty: 0.5,
                frequency_penalty: 0.4,
                ..base.clone()
            },
            &peaked,
        ),
        (
            "plain temperature",
            SamplingParams {
                temperature: 1.1,
                ..base.clone()
            },
            &flat,
        ),
        (
            "greedy with penalties",
            SamplingParams {
                repetition_penalty: 1.5,
                frequency_penalty: 1.0,
                ..base.clone()
            },
            &peaked,
        ),
    ];
    let prompt: Vec<u32> = (0..300).map(|i| (i * 13 % vocab) as u32).collect();
    for (name, params, rows) in cases {
        let (h, d) = both(params, &prompt, rows, &[]);
        assert_eq!(h, d, "{name}");
        let distinct = h.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(
            distinct > 5 || name.starts_with("greedy"),
            "{name}: {distinct} distinct tokens"
        );
    }
}

#[test]
fn eos_is_banned_until_min_tokens_in_both() {
    let params = SamplingParams {
        min_tokens: 3,
        seed: Some(1),
        ..SamplingParams::greedy(10)
    };
    let rows = vec![vec![9.0, 1.0, 0.5]; 5];
    let (h, d) = both(params, &[], &rows, &[0]);
    assert_eq!(h, vec![1, 1, 1, 0, 0]);
    assert_eq!(d, h);
}

/// Pearson's chi-square of counts against probabilities.
fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn plain_temperature_draws_follow_the_softmax() {
    // 12 tokens, 30,000 draws, fixed seed; both samplers draw the very same tokens.
    let row: Vec<f32> = vec![
        2.0, 0.1, 1.5, -1.0, 0.7, 0.0, 1.9, -0.5, 0.3, 1.1, -2.0, 0.9,
    ];
    let temp = 0.8f32;
    let z: f64 = row.iter().map(|&l| ((l / temp) as f64).exp()).sum();
    let probs: Vec<f64> = row.iter().map(|&l| ((l / temp) as f64).exp() / z).collect();
    let params = SamplingParams {
        temperature: temp,
        seed: Some(99),
        ..SamplingParams::greedy(100_000)
    };
    let mut dev = SamplerState::new(params.clone(), &[]);
    let mut host = Sampler::new(params, &[]);
    let t = Tensor::from_slice(&row, (1, row.len()), &Device::Cpu).unwrap();
    let (mut dc, mut hc) = (vec![0usize; row.len()], vec![0usize; row.len()]);
    for _ in 0..30_000 {
        // Each draw is keyed by its position: record moves the request on.
        let token = sample_rows(&t, &[dev.row(&[])]).unwrap()[0].token;
        dev.record(token);
        dc[token as usize] += 1;
        hc[host.sample(&mut row.clone(), &[]) as usize] += 1;
    }
    // 11 degrees of freedom: P(chi² > 31.3) = 0.001.
    let (cd, ch) = (chi_square(&dc, &probs), chi_square(&hc, &probs));
    assert!(cd < 31.3, "op: chi² {cd}, counts {dc:?}");
    assert!(ch < 31.3, "host: chi² {ch}, counts {hc:?}");
    assert_eq!(dc, hc);
    // And a wrong distribution would be caught: the same counts against temperature 1.
    let z1: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
    let p1: Vec<f64> = row.iter().map(|&l| (l as f64).exp() / z1).collect();
    assert!(chi_square(&dc, &p1) > 31.3);
}

#[test]
fn logprobs_are_the_log_softmax_and_top_n_is_sorted() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let rows: Vec<Vec<f32>> = (0..3).map(|_| logits(&mut rng, 2000, 5.0)).collect();
    let flat: Vec<f32> = rows.concat();
    let t = Tensor::from_slice(&flat, (3, 2000), &Device::Cpu).unwrap();
    let mk = |logprobs, temperature| SamplingParams {
        logprobs,
        temperature,
        seed: Some(4),
        ..SamplingParams::greedy(10)
    };
    let mut states = [
        SamplerState::new(mk(Some(5), 0.0), &[]),
        SamplerState::new(mk(None, 0.0), &[]),
        SamplerState::new(mk(Some(0), 1.0), &[]),
    ];
    let [a, b, c] = &mut states;
    let out = sample_rows(&t, &[a.row(&[]), b.row(&[]), c.row(&[])]).unwrap();
    for (i, s) in out.iter().enumerate() {
        let row = &rows[i];
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        match (i, &s.logprobs) {
            (1, None) => {}
            (0 | 2, Some(lp)) => {
                let want = row[s.token as usize] as f64 - lse;
                assert!(
                    (lp.logprob as f64 - want).abs() < 1e-4,
                    "{} vs {want}",
                    lp.logprob
                );
                let n = if i == 0 { 5 } else { 0 };
                assert_eq!(lp.top.len(), n);
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
                for (k, &(id, l)) in lp.top.iter().enumerate() {
                    assert_eq!(id as usize, order[k]);
                    assert!((l as f64 - (row[id as usize] as f64 - lse)).abs() < 1e-4);
                }
            }
            other => panic!("row {i}: {other:?}"),
        }
    }
    // Greedy rows pick the argmax.
    let am = |r: &Vec<f32>| {
        (0..r.len())
            .max_by(|&x, &y| r[x].total_cmp(&r[y]).then(y.cmp(&x)))
            .unwrap()
    };
    assert_eq!(out[0].token as usize, am(&rows[0]));
    assert_eq!(out[1].token as usize, am(&rows[1]));
}
