//! The sampling kernel (kernels/sample.cu), compiled for the CPU emulator and launched
//! as the CUDA path launches it, against the CPU sampler (device_sampler's CPU op, which
//! sampler.rs's draw shares) on random rows and parameters: vocabularies that are not
//! multiples of the block, ties, top_k 1 and above the vocabulary, tiny top_p, min_p,
//! every penalty, min_tokens bans, constraint masks that exclude most tokens, log-probs.
//! Tokens and log-probs must be equal bit for bit, under adversarial schedules; the
//! kernel's deliberately broken copies must not be.
#![cfg(hearth_cuda_emulator)]

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use hearth_runtime::cuda_emulator::{Emulator, Schedule, Source};
use hearth_runtime::device_sampler::{sample_rows, RowSampling, Sampled};
use hearth_runtime::sample_kernel::sample_emulated;
use hearth_runtime::sampler::SamplingParams;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// One random row: its parameters and the host-side state a RowSampling borrows.
struct Case {
    params: SamplingParams,
    seed: u64,
    position: u64,
    seen: Option<HashSet<u32>>,
    counts: Option<HashMap<u32, u32>>,
    banned: Vec<u32>,
    mask: Option<Vec<u32>>,
}

impl Case {
    fn row(&self) -> RowSampling<'_> {
        RowSampling {
            params: &self.params,
            seed: self.seed,
            position: self.position,
            seen: self.seen.as_ref(),
            output_counts: self.counts.as_ref(),
            banned: &self.banned,
            allowed: self.mask.as_deref(),
            table: None,
        }
    }
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

fn random_case(rng: &mut StdRng, vocab: usize) -> Case {
    let mut p = SamplingParams {
        temperature: pick(rng, &[0.0, 0.05, 0.7, 1.0, 2.5]),
        top_k: pick(rng, &[0, 0, 1, 2, 7, 64, vocab + 3]),
        top_p: pick(rng, &[1.0, 1.0, 0.9, 0.5, 1e-3]),
        min_p: pick(rng, &[0.0, 0.0, 0.05, 0.3]),
        logprobs: pick(rng, &[None, None, Some(0), Some(3), Some(20)]),
        ..SamplingParams::default()
    };
    let penalties = rng.random_bool(0.4);
    if penalties {
        p.repetition_penalty = pick(rng, &[1.0, 1.3, 0.8]);
        p.presence_penalty = pick(rng, &[0.0, 0.5, -1.0]);
        p.frequency_penalty = pick(rng, &[0.0, 0.25, 2.0]);
    }
    let some_tokens = |rng: &mut StdRng, n: usize| -> Vec<u32> {
        // A few ids past the vocabulary too: both sides ignore them.
        (0..n)
            .map(|_| rng.random_range(0..vocab as u32 + 2))
            .collect()
    };
    let seen = (p.repetition_penalty != 1.0).then(|| {
        let n = rng.random_range(0..40);
        some_tokens(rng, n).into_iter().collect()
    });
    let counts = (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0).then(|| {
        let n = rng.random_range(0..30);
        some_tokens(rng, n)
            .into_iter()
            .map(|t| (t, rng.random_range(1..5)))
            .collect()
    });
    let banned = if rng.random_bool(0.3) {
        let n = rng.random_range(1..4);
        some_tokens(rng, n)
    } else {
        Vec::new()
    };
    let mask = rng.random_bool(0.3).then(|| {
        // Most tokens excluded; sometimes all but one, sometimes a short mask.
        let keep = pick(rng, &[0.02, 0.1, 0.5]);
        let words = if rng.random_bool(0.2) {
            vocab.div_ceil(32) / 2
        } else {
            vocab.div_ceil(32)
        };
        let mut m = vec![0u32; words];
        for i in 0..vocab.min(words * 32) {
            if rng.random_bool(keep) {
                m[i / 32] |= 1 << (i % 32);
            }
        }
        m
    });
    Case {
        params: p,
        seed: rng.random(),
        position: rng.random_range(0..1u64 << 40),
        seen,
        counts,
        banned,
        mask,
    }
}

fn random_logits(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<f32> {
    let style = rng.random_range(0..5);
    (0..rows * vocab)
        .map(|_| match style {
            // Coarse values: many ties.
            0 => rng.random_range(-4..=4) as f32 * 0.5,
            // A peaked row: one or two big logits over a flat floor.
            1 => {
                if rng.random_bool(0.01) {
                    rng.random_range(5.0..15.0)
                } else {
                    rng.random_range(-1.0..1.0)
                }
            }
            2 => rng.random_range(-30.0..30.0),
            // Flat: every token tied, the draw decided by the noise alone.
            3 => 1.5,
            _ => rng.random_range(-3.0f32..3.0) * rng.random_range(0.0f32..1.0),
        })
        .collect()
}

fn cpu(logits: &[f32], vocab: usize, rows: &[RowSampling]) -> Vec<Sampled> {
    let t = Tensor::from_slice(logits, (rows.len(), vocab), &Device::Cpu).unwrap();
    sample_rows(&t, rows).unwrap()
}

/// The kernel's packed rows read as the CPU op's results.
fn unpack(packed: &[Vec<u32>], rows: &[RowSampling]) -> Vec<(u32, Option<Vec<u32>>)> {
    packed
        .iter()
        .zip(rows)
        .map(|(p, r)| {
            let lp = r.params.logprobs.map(|n| p[1..2 + 2 * n].to_vec());
            (p[0], lp)
        })
        .collect()
}

fn as_words(s: &[Sampled]) -> Vec<(u32, Option<Vec<u32>>)> {
    s.iter()
        .map(|x| {
            let lp = x.logprobs.as_ref().map(|l| {
                let mut w = vec![l.logprob.to_bits()];
                for &(id, v) in &l.top {
                    w.push(id);
                    w.push(v.to_bits());
                }
                w
            });
            (x.token, lp)
        })
        .collect()
}

fn run_cases(emu: &Emulator, cases: usize, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    for case in 0..cases {
        let vocab = pick(&mut rng, &[1, 2, 31, 255, 257, 1000, 3001]);
        let s = rng.random_range(1..4);
        let logits = random_logits(&mut rng, s, vocab);
        let cases: Vec<Case> = (0..s).map(|_| random_case(&mut rng, vocab)).collect();
        let rows: Vec<RowSampling> = cases.iter().map(Case::row).collect();
        let want = as_words(&cpu(&logits, vocab, &rows));
        let got = sample_emulated(&logits, vocab, &rows, emu).map_err(|e| e.to_string())?;
        let got = unpack(&got, &rows);
        if got != want {
            return Err(format!(
                "case {case} (vocab {vocab}, {s} rows, params {:?}): kernel {got:?}, CPU {want:?}",
                cases.iter().map(|c| &c.params).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

#[test]
fn kernel_matches_the_cpu_sampler_bit_for_bit() {
    for (i, schedule) in Schedule::ADVERSARIAL.into_iter().enumerate() {
        let emu = Emulator {
            source: Source::Original,
            schedule,
        };
        run_cases(&emu, 40, 100 + i as u64).unwrap_or_else(|e| panic!("{schedule:?}: {e}"));
    }
}

#[test]
fn seeded_draws_agree_over_a_long_run_of_positions() {
    // One request's worth of steps at temperature 1 over a 1000-token vocabulary: the
    // kernel and the CPU draw the same token at every position.
    let mut rng = StdRng::seed_from_u64(9);
    let vocab = 1000;
    let logits = random_logits(&mut rng, 1, vocab);
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(1234),
        ..SamplingParams::default()
    };
    let emu = Emulator::default();
    let mut distinct = HashSet::new();
    for position in 0..64 {
        let row = RowSampling {
            params: &params,
            seed: 1234,
            position,
            seen: None,
            output_counts: None,
            banned: &[],
            allowed: None,
            table: None,
        };
        let want = cpu(&logits, vocab, std::slice::from_ref(&row))[0].token;
        let got = sample_emulated(&logits, vocab, std::slice::from_ref(&row), &emu).unwrap()[0][0];
        assert_eq!(got, want, "position {position}");
        distinct.insert(got);
    }
    assert!(distinct.len() > 5, "the draw hardly varies: {distinct:?}");
}

/// Top-p over a vocabulary of 5000 on its two paths: rows whose nucleus is small (the
/// bisection over the head in shared memory) and a flat one whose candidates are too
/// many for the head (the bisection over the row). `flat` picks which; 16 positions
/// each, every token compared with the CPU's.
fn run_top_p_paths(emu: &Emulator, flat: bool) -> Result<(), String> {
    let vocab = 5000;
    let mut rng = StdRng::seed_from_u64(if flat { 31 } else { 37 });
    let (temperature, top_p) = if flat { (1.0, 0.7) } else { (0.7, 0.9) };
    let params = SamplingParams {
        temperature,
        top_p,
        seed: Some(77),
        ..SamplingParams::default()
    };
    let positions = 16;
    let mut logits = Vec::with_capacity(positions * vocab);
    for _ in 0..positions {
        logits.extend((0..vocab).map(|_| {
            if flat {
                // Nearly flat: 70% of the mass takes about 60% of the tokens, more
                // than the head holds.
                rng.random_range(-0.5f32..0.5)
            } else {
                // A nucleus of a few hundred tokens out of 5000.
                rng.random_range(-30.0f32..30.0)
            }
        }));
    }
    let rows: Vec<RowSampling> = (0..positions as u64)
        .map(|position| RowSampling {
            params: &params,
            seed: 77,
            position,
            seen: None,
            output_counts: None,
            banned: &[],
            allowed: None,
            table: None,
        })
        .collect();
    let want = as_words(&cpu(&logits, vocab, &rows));
    let got = sample_emulated(&logits, vocab, &rows, emu).map_err(|e| e.to_string())?;
    let got = unpack(&got, &rows);
    if got != want {
        return Err(format!("flat {flat}: kernel {got:?}, CPU {want:?}"));
    }
    let distinct: HashSet<u32> = got.iter().map(|g| g.0).collect();
    assert!(distinct.len() > 8, "the draw hardly varies: {distinct:?}");
    Ok(())
}

#[test]
fn top_p_agrees_over_the_head_and_over_the_whole_row() {
    for schedule in [Schedule::InOrder, Schedule::Shuffled(0x51ed)] {
        let emu = Emulator {
            source: Source::Original,
            schedule,
        };
        for flat in [false, true] {
            run_top_p_paths(&emu, flat).unwrap_or_else(|e| panic!("{schedule:?}: {e}"));
        }
    }
}

/// Replicate's defaults (temperature 0.6, top_p 0.9) over Llama-3's vocabulary of
/// 128256, with logits shaped like a model's (a broad bell around 0 and a few tokens far
/// above it): 8 positions, bit-equal to the CPU sampler.
fn run_llama_vocabulary(emu: &Emulator) -> Result<(), String> {
    let vocab = 128_256;
    let mut rng = StdRng::seed_from_u64(41);
    let params = SamplingParams {
        temperature: 0.6,
        top_p: 0.9,
        seed: Some(5),
        ..SamplingParams::default()
    };
    let positions = 8;
    let mut logits = Vec::with_capacity(positions * vocab);
    for _ in 0..positions {
        let row: Vec<f32> = (0..vocab)
            .map(|_| (0..4).map(|_| rng.random_range(-2.5f32..2.5)).sum::<f32>())
            .collect();
        logits.extend(row);
        let at = logits.len() - vocab;
        for _ in 0..30 {
            let i = rng.random_range(0..vocab);
            logits[at + i] = rng.random_range(12.0f32..14.0);
        }
    }
    let rows: Vec<RowSampling> = (0..positions as u64)
        .map(|position| RowSampling {
            params: &params,
            seed: 5,
            position,
            seen: None,
            output_counts: None,
            banned: &[],
            allowed: None,
            table: None,
        })
        .collect();
    let want = as_words(&cpu(&logits, vocab, &rows));
    let got = sample_emulated(&logits, vocab, &rows, emu).map_err(|e| e.to_string())?;
    let got = unpack(&got, &rows);
    if got != want {
        return Err(format!("kernel {got:?}, CPU {want:?}"));
    }
    Ok(())
}

#[test]
fn replicate_defaults_over_a_llama_vocabulary_take_the_head() {
    run_llama_vocabulary(&Emulator::default()).unwrap();
    // The head's sums decide these rows: doubling them changes the tokens.
    let emu = Emulator {
        source: Source::SampleHeadMassDoubled,
        schedule: Schedule::InOrder,
    };
    assert!(run_llama_vocabulary(&emu).is_err(), "the head was not used");
}

#[test]
fn broken_copies_of_the_kernel_are_caught() {
    for (source, flat) in [
        (Source::SampleHeadMassDoubled, false),
        (Source::SampleRowBisectionHalfMass, true),
    ] {
        let emu = Emulator {
            source,
            schedule: Schedule::InOrder,
        };
        assert!(
            run_top_p_paths(&emu, flat).is_err(),
            "{source:?} passed the comparison"
        );
    }
    for source in [Source::SampleNoSyncthreads, Source::SampleGumbelBoundTooLow] {
        let emu = Emulator {
            source,
            schedule: Schedule::InOrder,
        };
        assert!(
            run_cases(&emu, 40, 7).is_err(),
            "{source:?} passed the comparison"
        );
    }
}
