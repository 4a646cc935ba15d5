//! The engine under load: batching must not change what a request generates, and
//! every way a request can end must give its KV blocks back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth_runtime::{
    EngineConfig, EngineHandle, FinishReason, GenerationEvent, GenerationRequest, ModelSpec,
    RequestStream, RuntimeError, SamplingParams,
};

fn llama_fixture() -> ModelSpec {
    // HEARTH_FIXTURES: see goldens.rs.
    let path = std::env::var_os("HEARTH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures"))
        .join("llama");
    let mut s = ModelSpec::new(path.to_string_lossy().into_owned());
    // scripts/gpu-tests.sh runs these same tests on CUDA.
    s.device = std::env::var("HEARTH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    s.dtype = std::env::var("HEARTH_TEST_DTYPE").unwrap_or_else(|_| "f32".into());
    s
}

fn engine(cfg: EngineConfig) -> EngineHandle {
    hearth_runtime::load(&llama_fixture(), &cfg).unwrap().engine
}

/// Reads a stream to its end: the token ids and how it finished.
fn drain(mut s: RequestStream) -> (Vec<u32>, FinishReason) {
    let mut ids = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token { id, .. } => ids.push(id),
            GenerationEvent::Finished(c) => return (ids, c.reason),
            GenerationEvent::Started { .. } => {}
        }
    }
    panic!("stream ended without Finished");
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Prompts of many lengths; some share long prefixes (whole KV blocks) with others.
fn prompts() -> Vec<Vec<u32>> {
    let base: Vec<u32> = (0..40).map(|i| (i * 37 % 390) as u32).collect();
    let mut out = Vec::new();
    for (i, len) in [3usize, 9, 17, 33, 40, 25, 12, 6].into_iter().enumerate() {
        let mut p: Vec<u32> = (0..len)
            .map(|j| ((i * 101 + j * 13) % 390) as u32)
            .collect();
        if i % 2 == 0 {
            // Shared prefix of 16 tokens (4 full blocks of 4) then its own tail.
            p = base[..16].iter().copied().chain(p).collect();
        }
        out.push(p);
    }
    out
}

fn greedy(prompt: &[u32], n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(n)
        },
    }
}

#[test]
fn batched_preempted_and_prefix_shared_requests_generate_what_they_generate_alone() {
    let max_tokens = 24;
    // Alone: one request at a time, a cache too large to ever preempt.
    let alone = engine(EngineConfig {
        block_size: 4,
        kv_cache_memory: Some(8 << 20),
        ..Default::default()
    });
    let expected: Vec<Vec<u32>> = prompts()
        .iter()
        .map(|p| drain(alone.submit(greedy(p, max_tokens)).unwrap()).0)
        .collect();

    // Together: 256 bytes a token in the default f16 cache, so 40 KiB is 160 tokens:
    // well under the ~420 the eight requests need at once, so some must be preempted and
    // recomputed. A small step budget forces chunked prefill too.
    let together = engine(EngineConfig {
        block_size: 4,
        kv_cache_memory: Some(40 << 10),
        max_num_batched_tokens: 16,
        ..Default::default()
    });
    let total_blocks = together.stats().kv_blocks_total;
    let ps = prompts();
    // Half arrive first; the rest once the first have produced tokens.
    let mut first: Vec<RequestStream> = ps[..4]
        .iter()
        .map(|p| together.submit(greedy(p, max_tokens)).unwrap())
        .collect();
    let mut early = Vec::new();
    for s in first.iter_mut() {
        loop {
            match s.blocking_next() {
                Some(GenerationEvent::Token { id, .. }) => {
                    early.push(vec![id]);
                    break;
                }
                Some(_) => continue,
                None => panic!("stream ended"),
            }
        }
    }
    let second: Vec<RequestStream> = ps[4..]
        .iter()
        .map(|p| together.submit(greedy(p, max_tokens)).unwrap())
        .collect();
    let mut got = Vec::new();
    for (s, mut head) in first.into_iter().zip(early) {
        let (rest, reason) = drain(s);
        assert_eq!(reason, FinishReason::Length);
        head.extend(rest);
        got.push(head);
    }
    for s in second {
        got.push(drain(s).0);
    }
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g,
            e,
            "request {i} (prompt of {} tokens) changed when batched",
            ps[i].len()
        );
    }
    let stats = together.stats();
    assert!(
        stats.num_preemptions > 0,
        "the test meant to force preemption: {stats:?}"
    );
    assert!(
        stats.prefix_cache_hits > 0,
        "the shared prefixes should have hit the cache: {stats:?}"
    );
    assert!(total_blocks > 0);
    wait_for("all blocks free", || {
        together.stats().kv_blocks_free == total_blocks
    });
}

#[test]
fn cancel_and_drop_return_blocks_whether_queued_prefilling_or_decoding() {
    let e = engine(EngineConfig {
        block_size: 4,
        kv_cache_memory: Some(256 << 10),
        max_num_batched_tokens: 8,
        max_num_seqs: 2,
        ..Default::default()
    });
    let total = e.stats().kv_blocks_total;
    assert!(total > 0);
    let long: Vec<u32> = (0..60).map(|i| (i * 7 % 390) as u32).collect();
    // Decoding: wait for a token, then cancel. It may run to the fixture's whole context
    // (512): a step takes well under a millisecond, and 200 tokens ran out on a loaded
    // machine before the others were admitted.
    let mut decoding = e.submit(greedy(&long[..5], 500)).unwrap();
    while !matches!(
        decoding.blocking_next(),
        Some(GenerationEvent::Token { .. })
    ) {}
    // Mid-prefill: 60 tokens at 8 a step take several steps.
    let prefilling = e.submit(greedy(&long, 200)).unwrap();
    // Queued: max_num_seqs is 2, so this one waits.
    let queued = e.submit(greedy(&long[..10], 200)).unwrap();
    wait_for("prefill started", || e.stats().num_running == 2);
    decoding.cancel();
    let (_, reason) = drain(decoding);
    assert_eq!(reason, FinishReason::Canceled);
    drop(prefilling);
    queued.cancel();
    let (_, reason) = drain(queued);
    assert_eq!(reason, FinishReason::Canceled);
    wait_for("blocks back to baseline", || {
        let s = e.stats();
        s.kv_blocks_free == total && s.num_running == 0 && s.num_waiting == 0
    });
}

#[test]
fn a_full_queue_refuses_at_once_and_bad_requests_name_the_field() {
    let e = engine(EngineConfig {
        max_num_seqs: 1,
        max_waiting: 2,
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    });
    let p: Vec<u32> = (1..20).collect();
    // One runs, at most two wait: four submissions in a row cannot all be taken.
    let results: Vec<_> = (0..4).map(|_| e.submit(greedy(&p, 400))).collect();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(RuntimeError::QueueFull(2))))
        .count();
    assert!(
        refused >= 1,
        "expected a QueueFull among {:?}",
        results.iter().map(|r| r.is_ok()).collect::<Vec<_>>()
    );
    drop(results);

    let too_long = e
        .submit(greedy(&p, 10_000))
        .err()
        .expect("over the context");
    assert!(
        matches!(
            too_long,
            RuntimeError::InvalidRequest {
                field: "max_tokens",
                ..
            }
        ),
        "{too_long}"
    );
    let bad_token = e
        .submit(greedy(&[1, 999_999], 4))
        .err()
        .expect("bad token id");
    assert!(
        matches!(
            bad_token,
            RuntimeError::InvalidRequest {
                field: "prompt",
                ..
            }
        ),
        "{bad_token}"
    );
    let empty = e.submit(greedy(&[], 4)).err().expect("empty prompt");
    assert!(
        matches!(
            empty,
            RuntimeError::InvalidRequest {
                field: "prompt",
                ..
            }
        ),
        "{empty}"
    );
}

/// `top_k` past the vocabulary reached the sampler, which reserves 2 × top_k entries
/// on the engine thread: 2^61 panicked it ("capacity overflow"), 10^17 aborted the
/// process. Refused at submit now, naming the field, and the engine serves on.
#[test]
fn top_k_past_the_vocabulary_is_refused_and_the_engine_serves_on() {
    let e = engine(EngineConfig {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    });
    let vocab = e.limits().vocab_size;
    let sampled = |top_k: usize| GenerationRequest {
        prompt: vec![1, 2, 3],
        params: SamplingParams {
            temperature: 1.0,
            top_k,
            seed: Some(1),
            ignore_eos: true,
            ..SamplingParams::greedy(3)
        },
    };
    for top_k in [vocab + 1, 1 << 61] {
        match e.submit(sampled(top_k)) {
            Err(RuntimeError::InvalidRequest { field, reason }) => {
                assert_eq!(field, "top_k");
                assert!(reason.contains(&vocab.to_string()), "{reason}");
            }
            Err(other) => panic!("top_k {top_k}: {other}"),
            Ok(s) => {
                drain(s);
                panic!("top_k {top_k} was accepted");
            }
        }
    }
    let (ids, reason) = drain(e.submit(sampled(vocab)).unwrap());
    assert_eq!((ids.len(), reason), (3, FinishReason::Length));
    assert!(e.is_alive());
}

#[test]
fn stop_sequences_end_generation_and_are_not_emitted_and_seeds_repeat() {
    let e = engine(EngineConfig {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    });
    let prompt: Vec<u32> = vec![395, 39, 68, 269, 78];
    let text_of = |params: SamplingParams| {
        let mut s = e
            .submit(GenerationRequest {
                prompt: prompt.clone(),
                params,
            })
            .unwrap();
        let mut text = String::new();
        loop {
            match s.blocking_next().unwrap() {
                GenerationEvent::Token { text: t, .. } => text.push_str(&t),
                GenerationEvent::Finished(c) => {
                    text.push_str(&c.trailing_text);
                    return (text, c.reason);
                }
                GenerationEvent::Started { .. } => {}
            }
        }
    };
    let (full, _) = text_of(SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(30)
    });
    assert!(full.chars().count() > 6, "{full:?}");
    // Stop on a piece from the middle of the greedy text, spanning characters.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[3..5].iter().collect();
    let (cut, reason) = text_of(SamplingParams {
        ignore_eos: true,
        stop: vec![stop.clone()],
        ..SamplingParams::greedy(30)
    });
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(cut, full[..full.find(&stop).unwrap()], "stop {stop:?}");

    let sampled = |seed| {
        text_of(SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ignore_eos: true,
            ..SamplingParams::greedy(20)
        })
        .0
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));
}

#[test]
fn a_seed_gives_the_same_tokens_alone_and_in_a_batch() {
    let e = engine(EngineConfig {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    });
    let seeded = |prompt: &[u32]| GenerationRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            seed: Some(11),
            ignore_eos: true,
            ..SamplingParams::greedy(20)
        },
    };
    let prompt: Vec<u32> = (5..25).collect();
    let alone = drain(e.submit(seeded(&prompt)).unwrap()).0;
    let others: Vec<RequestStream> = prompts()
        .iter()
        .map(|p| e.submit(greedy(p, 30)).unwrap())
        .collect();
    let batched = drain(e.submit(seeded(&prompt)).unwrap()).0;
    for o in others {
        drain(o);
    }
    assert_eq!(alone, batched);
}

#[test]
fn an_unreachable_hub_id_is_a_one_line_error_that_says_how_to_pass_a_folder() {
    let home = std::env::temp_dir().join(format!("hearth-hf-{}", std::process::id()));
    // Only this test touches these variables.
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let mut spec = ModelSpec::new("some-org/some-model");
    spec.cache_dir = home.join("hearth");
    let err = hearth_runtime::load(&spec, &EngineConfig::default())
        .err()
        .expect("offline");
    let msg = err.to_string();
    assert!(
        msg.contains("some-org/some-model") && msg.contains("--model DIR"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn logprobs_come_with_each_token_when_asked_and_only_then() {
    let e = engine(EngineConfig {
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    });
    let prompt: Vec<u32> = (7..19).collect();
    let run = |logprobs| {
        let mut s = e
            .submit(GenerationRequest {
                prompt: prompt.clone(),
                params: SamplingParams {
                    ignore_eos: true,
                    logprobs,
                    ..SamplingParams::greedy(6)
                },
            })
            .unwrap();
        let mut out = Vec::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                GenerationEvent::Token { id, logprobs, .. } => out.push((id, logprobs)),
                GenerationEvent::Finished(_) => break,
                GenerationEvent::Started { .. } => {}
            }
        }
        out
    };
    let with = run(Some(3));
    assert_eq!(with.len(), 6);
    for (id, lp) in &with {
        let lp = lp.as_ref().expect("asked for logprobs");
        assert_eq!(lp.top.len(), 3);
        // Greedy: the sampled token is the most likely one.
        assert_eq!(lp.top[0].0, *id);
        assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
        assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
    }
    let without = run(None);
    assert!(without.iter().all(|(_, lp)| lp.is_none()));
    let ids = |v: &[(u32, Option<hearth_runtime::TokenLogprobs>)]| {
        v.iter().map(|x| x.0).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&with),
        ids(&without),
        "asking for logprobs must not change the tokens"
    );
    let too_many = e.submit(GenerationRequest {
        prompt: prompt.clone(),
        params: SamplingParams {
            logprobs: Some(21),
            ..SamplingParams::greedy(2)
        },
    });
    assert!(
        matches!(
            too_many,
            Err(RuntimeError::InvalidRequest {
                field: "logprobs",
                ..
            })
        ),
        "{:?}",
        too_many.err()
    );
}

#[test]
fn a_stop_sequence_found_off_the_engine_thread_still_frees_the_blocks() {
    let e = engine(EngineConfig {
        block_size: 4,
        kv_cache_memory: Some(1 << 20),
        ..Default::default()
    });
    let total = e.stats().kv_blocks_total;
    let prompt: Vec<u32> = vec![395, 39, 68, 269, 78];
    let text = |stop: Vec<String>| {
        let mut s = e
            .submit(GenerationRequest {
                prompt: prompt.clone(),
                params: SamplingParams {
                    ignore_eos: true,
                    stop,
                    ..SamplingParams::greedy(200)
                },
            })
            .unwrap();
        let (mut out, mut n) = (String::new(), 0);
        loop {
            match s.blocking_next().unwrap() {
                GenerationEvent::Token { text, .. } => {
                    out.push_str(&text);
                    n += 1;
                }
                GenerationEvent::Finished(c) => return (out, n, c),
                GenerationEvent::Started { .. } => {}
            }
        }
    };
    let (full, _, _) = text(vec![]);
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[10..13].iter().collect();
    let (cut, n, c) = text(vec![stop.clone()]);
    assert_eq!(c.reason, FinishReason::Stop);
    assert!(
        n < 200 && c.output_tokens == n,
        "{n} tokens, completion says {}",
        c.output_tokens
    );
    assert_eq!(cut, full[..full.find(&stop).unwrap()]);
    wait_for("the stopped sequence's blocks", || {
        let s = e.stats();
        s.kv_blocks_free == total && s.num_running == 0
    });
}
