//! The engine's public face: submitting requests (each in its class's bounded
//! queue) and reading their events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use super::EngineStats;
use super::{Command, Shared};
use crate::constraint::ConstraintCompiler;
use crate::error::{Result, RuntimeError};
use crate::request::{GenerationEvent, GenerationRequest, Priority};
use crate::scheduler::SeqId;
use crate::tokenizer::TextTokenizer;

/// The public face of a running engine: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) shared: Arc<Shared>,
    pub(super) next_id: Arc<AtomicU64>,
    pub(super) tokenizer: Arc<TextTokenizer>,
    pub(super) limits: EngineLimits,
    pub(super) constraints: Arc<ConstraintCompiler>,
}

/// What a request must fit in.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub kv_capacity_tokens: usize,
    pub vocab_size: usize,
    pub max_waiting: usize,
    pub max_waiting_background: usize,
}

/// One request's events. Dropping it cancels the request.
pub struct RequestStream {
    pub id: SeqId,
    rx: tokio_mpsc::UnboundedReceiver<GenerationEvent>,
    tx: mpsc::Sender<Command>,
    finished: bool,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        let ev = self.rx.recv().await;
        self.note(&ev);
        ev
    }

    /// For callers outside an async runtime (the CLI).
    pub fn blocking_next(&mut self) -> Option<GenerationEvent> {
        let ev = self.rx.blocking_recv();
        self.note(&ev);
        ev
    }

    fn note(&mut self, ev: &Option<GenerationEvent>) {
        if matches!(ev, Some(GenerationEvent::Finished(_)) | None) {
            self.finished = true;
        }
    }

    pub fn cancel(&self) {
        let _ = self.tx.send(Command::Cancel(self.id));
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel();
        }
    }
}

impl EngineHandle {
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// Compiles structured-output constraints for this model (blocking; off the engine).
    pub fn constraints(&self) -> &Arc<ConstraintCompiler> {
        &self.constraints
    }

    pub fn stats(&self) -> EngineStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Relaxed)
    }

    /// Checks a request against the model and the cache before it is queued, so a
    /// request that could never run (or whose sizes no allocation should take) is
    /// refused now rather than stuck or fatal later. The rules are `limits.rs`'s.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        self.limits.request().check(req)
    }

    /// Submits a caller's request (`Priority::Normal`).
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestStream> {
        self.submit_at(req, Priority::Normal)
    }

    /// Submits a request in a class; each class's queue of requests not yet started
    /// is bounded (`max_waiting`, `max_waiting_background`): past it, refused.
    pub fn submit_at(&self, req: GenerationRequest, priority: Priority) -> Result<RequestStream> {
        self.validate(&req)?;
        if let Some(reason) = self.defunct_reason() {
            return Err(RuntimeError::EngineDefunct(reason));
        }
        if !self.is_alive() {
            return Err(RuntimeError::EngineStopped);
        }
        let pending = self.shared.pending(priority);
        if pending.fetch_add(1, Ordering::SeqCst) >= self.limits.max_waiting_at(priority) {
            pending.fetch_sub(1, Ordering::SeqCst);
            return Err(match priority {
                Priority::Normal => RuntimeError::QueueFull(self.limits.max_waiting),
                Priority::Background => {
                    RuntimeError::BackgroundQueueFull(self.limits.max_waiting_background)
                }
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tokio_mpsc::unbounded_channel();
        self.tx
            .send(Command::Submit {
                id,
                req,
                priority,
                events,
                arrived: Instant::now(),
            })
            .map_err(|_| {
                pending.fetch_sub(1, Ordering::SeqCst);
                RuntimeError::EngineStopped
            })?;
        Ok(RequestStream {
            id,
            rx,
            tx: self.tx.clone(),
            finished: false,
        })
    }
}

impl EngineLimits {
    fn max_waiting_at(&self, p: Priority) -> usize {
        match p {
            Priority::Normal => self.max_waiting,
            Priority::Background => self.max_waiting_background,
        }
    }
}
