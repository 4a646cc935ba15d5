//! The output worker: detokenization, stop-sequence matching and event fan-out, on
//! their own thread so an engine step never waits on them. The engine sends one
//! message per step with every sampled token; the worker turns them into text and
//! events. A stop sequence is found here, so the worker finishes that request itself
//! and tells the engine to drop the sequence (the engine may have computed a token or
//! two more by then; they are discarded). A panic while handling one request's
//! message or token fails that request (with a log id, as engine/supervisor.rs does)
//! and the worker goes on with the others.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use crate::detokenizer::IncrementalDetokenizer;
use crate::engine::fault::OutputFault;
use crate::engine::supervisor::{new_log_id, panic_message};
use crate::request::{Completion, FinishReason, GenerationEvent, Timings, TokenLogprobs};
use crate::scheduler::SeqId;
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::TextTokenizer;

pub(crate) struct OutToken {
    pub id: SeqId,
    pub token: u32,
    /// An end-of-sequence token: no text, and the request ends with it.
    pub eos: bool,
    pub logprobs: Option<TokenLogprobs>,
}

pub(crate) enum OutputMsg {
    Open {
        id: SeqId,
        events: tokio_mpsc::UnboundedSender<GenerationEvent>,
        /// The prompt's last tokens: left context for the first pieces of text.
        prompt_tail: Vec<u32>,
        prompt_len: usize,
        stop: Vec<String>,
        arrived: Instant,
        fault: OutputFault,
    },
    Started {
        id: SeqId,
        cached_prompt_tokens: usize,
        at: Instant,
    },
    Preempted {
        id: SeqId,
    },
    /// One step's tokens, sampled at `at`.
    Tokens {
        at: Instant,
        tokens: Vec<OutToken>,
    },
    /// The engine ended the request (length, EOS, cancel, error).
    Finish {
        id: SeqId,
        reason: FinishReason,
        error: Option<String>,
    },
}

struct Stream {
    events: tokio_mpsc::UnboundedSender<GenerationEvent>,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    prompt_len: usize,
    arrived: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    output_tokens: usize,
    cached_prompt_tokens: usize,
    preemptions: u32,
    fault: OutputFault,
}

impl Stream {
    /// Ends the request for a reason other than a stop sequence. Bytes held back for
    /// a character the sequence never completed are output too (U+FFFD, as a whole
    /// decode shows them), through the stop matcher like any text; then what it held
    /// back for a stop sequence that never came.
    fn finish(mut self, tokenizer: &TextTokenizer, reason: FinishReason, error: Option<String>) {
        let tail = self.detok.flush(tokenizer.inner());
        match self.stop.push(&tail) {
            StopOutcome::Continue(text) => {
                let trailing = text + &self.stop.flush();
                self.end(reason, error, trailing)
            }
            StopOutcome::Stopped(text) => {
                let reason = match reason {
                    FinishReason::Length => FinishReason::Stop,
                    other => other,
                };
                self.end(reason, error, text)
            }
        }
    }

    fn end(self, reason: FinishReason, error: Option<String>, trailing_text: String) {
        let now = Instant::now();
        let completion = Completion {
            reason,
            prompt_tokens: self.prompt_len,
            output_tokens: self.output_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            preemptions: self.preemptions,
            timings: Timings {
                queued: self.started.unwrap_or(now) - self.arrived,
                time_to_first_token: self.first_token.map(|t| t - self.arrived),
                total: now - self.arrived,
            },
            error,
            trailing_text,
        };
        let _ = self.events.send(GenerationEvent::Finished(completion));
    }
}

/// Starts the worker. `stopped` carries the ids of requests a stop sequence ended,
/// back to the engine. The worker ends when the engine drops its sender.
pub(crate) fn spawn(
    tokenizer: Arc<TextTokenizer>,
    stopped: mpsc::Sender<SeqId>,
) -> std::io::Result<mpsc::Sender<OutputMsg>> {
    let (tx, rx) = mpsc::channel::<OutputMsg>();
    std::thread::Builder::new()
        .name("hearth-output".into())
        .spawn(move || run(rx, &tokenizer, &stopped))?;
    Ok(tx)
}

fn run(rx: mpsc::Receiver<OutputMsg>, tokenizer: &TextTokenizer, stopped: &mpsc::Sender<SeqId>) {
    let mut streams: HashMap<SeqId, Stream> = HashMap::new();
    while let Ok(msg) = rx.recv() {
        match msg {
            OutputMsg::Tokens { at, tokens } => {
                for t in tokens {
                    let id = t.id;
                    guarded(&mut streams, stopped, id, |streams| {
                        on_token(streams, tokenizer, stopped, at, t)
                    });
                }
            }
            other => {
                let id = other.id();
                guarded(&mut streams, stopped, id, |streams| {
                    on_message(streams, tokenizer, other)
                });
            }
        }
    }
    // The engine is gone: whatever is still open ends with an error, not silence.
    for (_, s) in streams.drain() {
        s.finish(
            tokenizer,
            FinishReason::Error,
            Some("the engine stopped".into()),
        );
    }
}

/// Runs one request's share of the work; a panic in it fails that request alone, and
/// the engine is told to drop its sequence.
fn guarded(
    streams: &mut HashMap<SeqId, Stream>,
    stopped: &mpsc::Sender<SeqId>,
    id: SeqId,
    work: impl FnOnce(&mut HashMap<SeqId, Stream>),
) {
    let Err(payload) = catch_unwind(AssertUnwindSafe(|| work(streams))) else {
        return;
    };
    let log_id = new_log_id();
    tracing::error!(log_id = %log_id, panic = %panic_message(&*payload), request = id, "output worker fault: failing the request");
    if let Some(s) = streams.remove(&id) {
        // No flush: the stop matcher may be what panicked.
        let msg =
            format!("internal fault in the output worker (log id {log_id}); see the server log");
        s.end(FinishReason::Error, Some(msg), String::new());
    }
    let _ = stopped.send(id);
}

impl OutputMsg {
    fn id(&self) -> SeqId {
        match self {
            OutputMsg::Open { id, .. }
            | OutputMsg::Started { id, .. }
            | OutputMsg::Preempted { id }
            | OutputMsg::Finish { id, .. } => *id,
            // Split into tokens by `run`; the first one's request is as good as any.
            OutputMsg::Tokens { tokens, .. } => tokens.first().map(|t| t.id).unwrap_or(0),
        }
    }
}

fn on_message(streams: &mut HashMap<SeqId, Stream>, tokenizer: &TextTokenizer, msg: OutputMsg) {
    match msg {
        OutputMsg::Open {
            id,
            events,
            prompt_tail,
            prompt_len,
            stop,
            arrived,
            fault,
        } => {
            streams.insert(
                id,
                Stream {
                    events,
                    detok: IncrementalDetokenizer::new(&prompt_tail, true),
                    stop: StopMatcher::new(stop),
                    prompt_len,
                    arrived,
                    started: None,
                    first_token: None,
                    output_tokens: 0,
                    cached_prompt_tokens: 0,
                    preemptions: 0,
                    fault,
                },
            );
        }
        OutputMsg::Started {
            id,
            cached_prompt_tokens,
            at,
        } => {
            if let Some(s) = streams.get_mut(&id) {
                s.started = Some(at);
                s.cached_prompt_tokens = cached_prompt_tokens;
                let _ = s.events.send(GenerationEvent::Started {
                    cached_prompt_tokens,
                });
            }
        }
        OutputMsg::Preempted { id } => {
            if let Some(s) = streams.get_mut(&id) {
                s.preemptions += 1;
            }
        }
        OutputMsg::Tokens { .. } => {}
        OutputMsg::Finish { id, reason, error } => {
            if let Some(s) = streams.remove(&id) {
                s.finish(tokenizer, reason, error);
            }
        }
    }
}

fn on_token(
    streams: &mut HashMap<SeqId, Stream>,
    tokenizer: &TextTokenizer,
    stopped: &mpsc::Sender<SeqId>,
    at: Instant,
    t: OutToken,
) {
    let Some(s) = streams.get_mut(&t.id) else {
        return; // already ended by a stop sequence
    };
    s.fault.on_token();
    s.output_tokens += 1;
    s.first_token.get_or_insert(at);
    let piece = if t.eos {
        String::new()
    } else {
        s.detok.push(tokenizer.inner(), t.token)
    };
    let (text, hit) = match s.stop.push(&piece) {
        StopOutcome::Continue(text) => (text, false),
        StopOutcome::Stopped(text) => (text, true),
    };
    let _ = s.events.send(GenerationEvent::Token {
        id: t.token,
        text,
        logprobs: t.logprobs,
    });
    if hit {
        if let Some(s) = streams.remove(&t.id) {
            // After a match nothing is held back for output: what the detokenizer
            // holds comes after the stop.
            s.end(FinishReason::Stop, None, String::new());
        }
        let _ = stopped.send(t.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_tokenizer() -> Arc<TextTokenizer> {
        let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
        Arc::new(TextTokenizer::load(&dir.join("tokenizer.json"), None).unwrap())
    }

    /// Runs one request's tokens through the worker; returns its text (tokens' and
    /// trailing) and how it finished.
    fn generate(tok: &Arc<TextTokenizer>, ids: &[u32], stop: &[&str]) -> (String, FinishReason) {
        let (stopped_tx, _stopped) = mpsc::channel();
        let worker = spawn(tok.clone(), stopped_tx).unwrap();
        let (events, mut rx) = tokio_mpsc::unbounded_channel();
        let send = |m| worker.send(m).unwrap();
        send(OutputMsg::Open {
            id: 1,
            events,
            prompt_tail: Vec::new(),
            prompt_len: 1,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            arrived: Instant::now(),
            fault: OutputFault::default(),
        });
        let tokens = ids
            .iter()
            .map(|&token| OutToken {
                id: 1,
                token,
                eos: false,
                logprobs: None,
            })
            .collect();
        send(OutputMsg::Tokens {
            at: Instant::now(),
            tokens,
        });
        send(OutputMsg::Finish {
            id: 1,
            reason: FinishReason::Length,
            error: None,
        });
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenerationEvent::Token { text: t, .. } => text.push_str(&t),
                GenerationEvent::Finished(c) => {
                    text.push_str(&c.trailing_text);
                    return (text, c.reason);
                }
                GenerationEvent::Started { .. } => {}
            }
        }
        panic!("no Finished event");
    }

    /// A sequence that ends inside a character (max_tokens reached mid-character) shows
    /// its bytes as U+FFFD, as the whole decode does, on every route: they were lost.
    #[test]
    fn bytes_of_an_unfinished_character_are_output_at_the_end() {
        let tok = demo_tokenizer();
        let ids = tok.encode("ok 🔥", false).unwrap();
        let cut = &ids[..ids.len() - 1];
        let whole = tok.inner().decode(cut, true).unwrap();
        assert!(whole.ends_with('\u{FFFD}'), "{whole:?}");
        assert_eq!(
            generate(&tok, cut, &[]),
            (whole.clone(), FinishReason::Length)
        );
        // The flushed text still passes the stop matcher: held back, then released.
        assert_eq!(generate(&tok, cut, &["🔥"]), (whole, FinishReason::Length));
    }
}
