//! The engine outlives a faulty request: the supervisor (src/engine/supervisor.rs)
//! driven by the fault-injection markers (src/engine/fault.rs; this crate's tests run
//! with the `fault-injection` feature). One fault fails the requests of its step and
//! the rest complete with exactly the tokens they produce alone; a second in a row
//! fails everything in flight and rebuilds; faults that keep coming, a failed rebuild
//! or a CUDA error make the engine DEFUNCT. KV blocks always come back.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use hearth_runtime::{
    Completion, ConstraintSpec, EngineConfig, EngineHandle, FinishReason, GenerationEvent,
    GenerationRequest, ModelSpec, RequestStream, RuntimeError, SamplingParams,
};

/// The demo model (byte-level tokenizer: a marker's text survives encode and decode).
fn engine(max_num_seqs: usize) -> EngineHandle {
    let cfg = EngineConfig {
        kv_cache_memory: Some(4 << 20),
        max_num_seqs,
        ..Default::default()
    };
    hearth_runtime::load(&ModelSpec::new("demo"), &cfg)
        .unwrap()
        .engine
}

fn request(h: &EngineHandle, text: &str) -> GenerationRequest {
    GenerationRequest {
        prompt: h.tokenizer().encode(text, true).unwrap(),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(12)
        },
    }
}

/// Reads a stream to its end on a thread of its own, so a hang fails the test.
fn finish(s: RequestStream) -> mpsc::Receiver<(Vec<u32>, Completion)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = s;
        let mut ids = Vec::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                GenerationEvent::Token { id, .. } => ids.push(id),
                GenerationEvent::Finished(c) => {
                    let _ = tx.send((ids, c));
                    return;
                }
                GenerationEvent::Started { .. } => {}
            }
        }
    });
    rx
}

fn wait(rx: mpsc::Receiver<(Vec<u32>, Completion)>) -> (Vec<u32>, Completion) {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the request never finished")
}

fn run(h: &EngineHandle, text: &str) -> (Vec<u32>, Completion) {
    wait(finish(h.submit(request(h, text)).unwrap()))
}

const HEALTHY: [&str; 3] = [
    "The hearth is the heart of the house.",
    "Bread is baked, water is boiled",
    "A server answers requests",
];

fn alone(h: &EngineHandle) -> Vec<Vec<u32>> {
    HEALTHY.iter().map(|t| run(h, t).0).collect()
}

/// The error of a request a fault ended; asserts it names an internal fault and a log id.
fn fault_error(c: &Completion) -> &str {
    assert_eq!(c.reason, FinishReason::Error, "{c:?}");
    let e = c.error.as_deref().unwrap_or_default();
    assert!(e.contains("internal fault"), "{e}");
    assert!(e.contains("log id "), "{e}");
    e
}

fn blocks_back(h: &EngineHandle) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = h.stats();
        if s.kv_blocks_free == s.kv_blocks_total && s.num_running == 0 && s.num_waiting == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "KV blocks not returned: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_panicking_step_fails_its_request_and_the_queued_ones_complete_unchanged() {
    let h = engine(1); // one request per step: the others wait behind the faulty one
    let expected = alone(&h);
    let first = finish(h.submit(request(&h, HEALTHY[0])).unwrap());
    let faulty = finish(
        h.submit(request(&h, "Once upon a time hearth-fault:step-panic"))
            .unwrap(),
    );
    let rest: Vec<_> = HEALTHY[1..]
        .iter()
        .map(|t| finish(h.submit(request(&h, t)).unwrap()))
        .collect();
    let (_, c) = wait(faulty);
    let e = fault_error(&c);
    assert!(!e.contains("rebuilt"), "one fault is no rebuild: {e}");
    let got: Vec<Vec<u32>> = std::iter::once(first)
        .chain(rest)
        .map(|r| {
            let (ids, c) = wait(r);
            assert_eq!(c.reason, FinishReason::Length, "{c:?}");
            ids
        })
        .collect();
    assert_eq!(got, expected);
    blocks_back(&h);
    assert!(h.is_alive() && h.defunct_reason().is_none());
    assert_eq!(run(&h, HEALTHY[0]).0, expected[0]);
}

#[test]
fn a_panic_in_the_output_worker_fails_only_that_request_of_the_batch() {
    let h = engine(8);
    let expected = alone(&h);
    let faulty = finish(
        h.submit(request(&h, "Once upon a time hearth-fault:output-panic"))
            .unwrap(),
    );
    let healthy: Vec<_> = HEALTHY
        .iter()
        .map(|t| finish(h.submit(request(&h, t)).unwrap()))
        .collect();
    let (_, c) = wait(faulty);
    assert!(fault_error(&c).contains("output worker"), "{c:?}");
    let got: Vec<Vec<u32>> = healthy.into_iter().map(|r| wait(r).0).collect();
    assert_eq!(got, expected);
    blocks_back(&h);
    assert!(h.is_alive());
}

/// Constrained requests' masks are computed on the mask workers (src/engine/masks.rs):
/// a matcher that panics there fails its own request; the others of the batch, held
/// to the same grammar, generate what they generate alone.
#[test]
fn a_panicking_mask_worker_fails_only_its_constrained_request() {
    let h = engine(8);
    let grammar = h
        .constraints()
        .compile(&ConstraintSpec::Regex("[a-z][a-z ]{0,30}".into()), "regex")
        .unwrap();
    let constrained = |text: &str| {
        let mut r = request(&h, text);
        r.params.constraint = Some(grammar.clone());
        h.submit(r).unwrap()
    };
    let expected: Vec<Vec<u32>> = HEALTHY
        .iter()
        .map(|t| wait(finish(constrained(t))).0)
        .collect();
    let faulty = finish(constrained("Once upon a time hearth-fault:mask-panic"));
    let healthy: Vec<_> = HEALTHY.iter().map(|t| finish(constrained(t))).collect();
    let (_, c) = wait(faulty);
    assert_eq!(c.reason, FinishReason::Error, "{c:?}");
    let e = c.error.as_deref().unwrap_or_default();
    assert!(
        e.contains("output constraint failed") && e.contains("mask-panic"),
        "{e}"
    );
    let got: Vec<Vec<u32>> = healthy.into_iter().map(|r| wait(r).0).collect();
    assert_eq!(got, expected);
    for ids in &got {
        let text = h.tokenizer().decode(ids).unwrap();
        assert!(
            !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase() || b == b' '),
            "{text:?}"
        );
    }
    blocks_back(&h);
    assert!(h.is_alive());
}

#[test]
fn a_second_fault_in_a_row_fails_everything_in_flight_and_rebuilds_the_engine() {
    let h = engine(1);
    let expected = alone(&h);
    let faulty = finish(
        h.submit(request(
            &h,
            "Once upon a time hearth-fault:step-panic-twice",
        ))
        .unwrap(),
    );
    let victims: Vec<_> = HEALTHY
        .iter()
        .map(|t| finish(h.submit(request(&h, t)).unwrap()))
        .collect();
    assert!(!fault_error(&wait(faulty).1).contains("rebuilt"));
    for v in victims {
        let (_, c) = wait(v);
        assert!(fault_error(&c).contains("rebuilt"), "{c:?}");
    }
    blocks_back(&h);
    assert!(h.is_alive() && h.defunct_reason().is_none());
    // The rebuilt engine serves, with the same results.
    let got: Vec<Vec<u32>> = alone(&h);
    assert_eq!(got, expected);
    blocks_back(&h);
}

fn assert_defunct(h: &EngineHandle, reason_has: &str) {
    assert!(!h.is_alive());
    let reason = h.defunct_reason().expect("DEFUNCT");
    assert!(reason.contains(reason_has), "{reason}");
    assert!(reason.contains("log id "), "{reason}");
    match h.submit(request(h, HEALTHY[0])) {
        Err(RuntimeError::EngineDefunct(r)) => assert_eq!(r, reason),
        Err(e) => panic!("expected EngineDefunct, got {e}"),
        Ok(_) => panic!("a DEFUNCT engine took a request"),
    }
}

#[test]
fn faults_that_keep_coming_make_the_engine_defunct_after_one_rebuild() {
    let h = engine(4);
    let (_, c) = run(&h, "hearth-fault:step-panic-forever");
    assert!(!fault_error(&c).contains("DEFUNCT"));
    let (_, c) = run(&h, HEALTHY[0]);
    assert!(fault_error(&c).contains("rebuilt"), "{c:?}");
    assert!(h.is_alive());
    let (_, c) = run(&h, HEALTHY[1]);
    assert!(fault_error(&c).contains("DEFUNCT"), "{c:?}");
    assert_defunct(&h, "3 faults in a row");
}

#[test]
fn a_failed_rebuild_makes_the_engine_defunct() {
    let h = engine(1);
    let faulty = finish(h.submit(request(&h, "hearth-fault:rebuild-fails")).unwrap());
    let victim = finish(h.submit(request(&h, HEALTHY[0])).unwrap());
    fault_error(&wait(faulty).1);
    assert!(fault_error(&wait(victim).1).contains("DEFUNCT"));
    assert_defunct(&h, "the rebuild failed");
}

#[test]
fn a_cuda_error_is_sticky_and_makes_the_engine_defunct_at_once() {
    let h = engine(4);
    let (_, c) = run(&h, "hearth-fault:cuda-error");
    assert!(fault_error(&c).contains("DEFUNCT"), "{c:?}");
    assert_defunct(&h, "CUDA_ERROR_ILLEGAL_ADDRESS");
}
