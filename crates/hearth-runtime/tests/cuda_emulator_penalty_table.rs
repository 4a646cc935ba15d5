//! The penalty table kept on the (emulated) device across decode steps, as the engine
//! keeps it on a GPU: kernels/sample.cu reads each penalised row's counts from the
//! table, writes a row when its sequence samples for the first time after admission,
//! and adds the token it picks. Over many steps of random logits the kernel must pick
//! what the CPU sampler picks, token for token and log-prob for log-prob (seeded),
//! through: rows that share the table, a row that finds it full and lists its
//! penalties instead, a row whose counts could pass the saturation, a sequence
//! preempted (its row freed and scribbled over, then taken by another) and re-admitted
//! into another sequence's stale row. The kernel copy that leaves the table alone must
//! fail the same run.
#![cfg(hearth_cuda_emulator)]

use candle_core::{Device, Tensor};
use hearth_runtime::cuda_emulator::{DeviceBuffer, Emulator, Schedule, Source};
use hearth_runtime::device_sampler::{sample_rows, RowSampling, SamplerState};
use hearth_runtime::penalty_table::{PenaltyTable, MAX_COUNT};
use hearth_runtime::sample_kernel::{emulated_table, sample_emulated_with, upload_words};
use hearth_runtime::sampler::SamplingParams;
use rand::{rngs::StdRng, Rng, SeedableRng};

const VOCAB: usize = 300;
const TABLE_ROWS: usize = 3;
const STEPS: usize = 18;
const EOS: [u32; 1] = [7];
/// Tokens the logits favour, so that outputs repeat and the penalties decide.
const FAVOURED: [u32; 6] = [3, 7, 40, 41, 150, 299];

fn params(i: usize) -> SamplingParams {
    let p = SamplingParams {
        seed: Some(1000 + i as u64),
        max_tokens: 64,
        ..SamplingParams::default()
    };
    match i {
        // Repetition only, greedy.
        0 => SamplingParams {
            repetition_penalty: 1.3,
            ..p
        },
        // Presence and frequency, sampled, with log-probs.
        1 => SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            temperature: 0.8,
            top_p: 0.9,
            logprobs: Some(2),
            ..p
        },
        // All three, EOS banned for the first steps.
        2 => SamplingParams {
            repetition_penalty: 0.8,
            presence_penalty: -1.0,
            frequency_penalty: 2.0,
            temperature: 1.0,
            top_k: 20,
            min_tokens: 4,
            ..p
        },
        // Counts that could pass the table's saturation: lists its penalties.
        3 => SamplingParams {
            frequency_penalty: 0.5,
            temperature: 0.5,
            max_tokens: MAX_COUNT + 1,
            ..p
        },
        // No penalty: no row.
        4 => SamplingParams {
            temperature: 0.7,
            ..p
        },
        // Waits for a row (the table is full), then takes a preempted one's.
        _ => SamplingParams {
            repetition_penalty: 1.2,
            frequency_penalty: 1.0,
            logprobs: Some(0),
            ..p
        },
    }
}

struct Seq {
    /// The CPU sampler's state: the reference.
    cpu: SamplerState,
    /// The device path's: the same counts on the host, and a table row when it has one.
    dev: SamplerState,
    running: bool,
}

fn logits(rng: &mut StdRng, rows: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..rows * VOCAB)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    for r in 0..rows {
        for &t in &FAVOURED {
            v[r * VOCAB + t as usize] += rng.random_range(2.0f32..3.0);
        }
    }
    v
}

/// A row's result as words: token, then log-prob and alternatives when asked.
fn words(token: u32, lp: Option<(f32, Vec<(u32, f32)>)>) -> Vec<u32> {
    let mut w = vec![token];
    if let Some((l, top)) = lp {
        w.push(l.to_bits());
        for (id, v) in top {
            w.push(id);
            w.push(v.to_bits());
        }
    }
    w
}

fn scribble(table: &mut DeviceBuffer, slot: u32) {
    let at = slot as usize * VOCAB * 2;
    table.bytes_mut()[at..at + VOCAB * 2].fill(0xab);
}

/// Runs the scenario; Err on the first step where the kernel and the CPU differ.
fn scenario(emu: &Emulator) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(42);
    let mut seqs: Vec<Seq> = (0..6)
        .map(|i| {
            let prompt: Vec<u32> = (0..20)
                .map(|k| {
                    if k % 4 == 0 {
                        FAVOURED[(k / 4 + i) % FAVOURED.len()]
                    } else {
                        rng.random_range(0..VOCAB as u32)
                    }
                })
                .collect();
            Seq {
                cpu: SamplerState::new(params(i), &prompt),
                dev: SamplerState::new(params(i), &prompt),
                running: true,
            }
        })
        .collect();
    let mut table = PenaltyTable::new(VOCAB, TABLE_ROWS);
    let mut device_rows = emulated_table(TABLE_ROWS, VOCAB);
    let mut upload_of_2 = Vec::new();
    for step in 0..STEPS {
        // The scheduler's moves: seq 1 preempted at step 5, back at step 10 (after seq 0
        // left at step 9); freed rows are left dirty.
        let leave = |s: &mut Seq, table: &mut PenaltyTable, rows: &mut DeviceBuffer| {
            if let Some(t) = s.dev.table_slot() {
                table.detach(&mut s.dev);
                scribble(rows, t.slot);
            }
            s.running = false;
        };
        match step {
            5 => leave(&mut seqs[1], &mut table, &mut device_rows),
            9 => leave(&mut seqs[0], &mut table, &mut device_rows),
            10 => seqs[1].running = true,
            _ => {}
        }
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].running).collect();
        let x = logits(&mut rng, live.len());
        let t =
            Tensor::from_slice(&x, (live.len(), VOCAB), &Device::Cpu).map_err(|e| e.to_string())?;
        let want: Vec<Vec<u32>> = {
            let rows: Vec<RowSampling> = seqs
                .iter_mut()
                .filter(|s| s.running)
                .map(|s| s.cpu.row(&EOS))
                .collect();
            sample_rows(&t, &rows)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|s| words(s.token, s.logprobs.map(|l| (l.logprob, l.top))))
                .collect()
        };
        for &i in &live {
            table.attach(&mut seqs[i].dev);
        }
        let got = {
            let rows: Vec<RowSampling> = seqs
                .iter_mut()
                .filter(|s| s.running)
                .map(|s| s.dev.row(&EOS))
                .collect();
            let only_2: Vec<RowSampling> = rows
                .iter()
                .zip(&live)
                .filter(|(_, i)| **i == 2)
                .map(|(r, _)| RowSampling { ..*r })
                .collect();
            upload_of_2.push(upload_words(&only_2, VOCAB, TABLE_ROWS).map_err(|e| e.to_string())?);
            sample_emulated_with(&x, VOCAB, &rows, &mut device_rows, emu)
                .map_err(|e| e.to_string())?
        };
        for (k, &i) in live.iter().enumerate() {
            let n = want[k].len();
            if got[k][..n] != want[k][..] {
                return Err(format!(
                    "step {step}, seq {i} (table {:?}): kernel {:?}, CPU {:?}",
                    seqs[i].dev.table_slot(),
                    &got[k][..n],
                    want[k]
                ));
            }
            seqs[i].cpu.record(want[k][0]);
            seqs[i].dev.record(got[k][0]);
        }
        // Where the rows are, as the scenario means them to be.
        let slot = |i: usize| seqs[i].dev.table_slot().map(|t| t.slot);
        match step {
            0 => assert_eq!(
                (0..6).map(slot).collect::<Vec<_>>(),
                [Some(0), Some(1), Some(2), None, None, None],
                "rows 0-2 taken in order; 3 cannot, 4 need not, 5 finds none"
            ),
            5 => assert_eq!(slot(5), Some(1), "seq 5 takes the preempted row"),
            10 => assert_eq!(slot(1), Some(0), "seq 1 comes back into seq 0's old row"),
            _ => {}
        }
    }
    // Seq 2's share of the upload stayed the same once its row was filled (and its
    // min_tokens ban was over), however many tokens it counted.
    if upload_of_2[5..].iter().any(|&w| w != upload_of_2[5]) || upload_of_2[0] <= upload_of_2[5] {
        return Err(format!("seq 2's upload words by step: {upload_of_2:?}"));
    }
    Ok(())
}

#[test]
fn the_device_table_gives_the_cpu_samplers_tokens_step_after_step() {
    for schedule in [Schedule::InOrder, Schedule::Shuffled(0x5eed)] {
        let emu = Emulator {
            source: Source::Original,
            schedule,
        };
        scenario(&emu).unwrap_or_else(|e| panic!("{schedule:?}: {e}"));
    }
}

#[test]
fn a_kernel_that_does_not_count_its_picks_is_caught() {
    let emu = Emulator {
        source: Source::SampleTableNotUpdated,
        schedule: Schedule::InOrder,
    };
    let e = scenario(&emu).expect_err("the table was never updated, and nothing noticed");
    assert!(e.contains("kernel"), "{e}");
}
