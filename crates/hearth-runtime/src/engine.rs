//! The engine: one thread that owns the model and the KV cache and runs the step loop.
//! Requests arrive through a channel; each gets its own event stream back. Nothing on
//! this thread waits for a batch to fill: a step runs as soon as there is work. A step
//! is: schedule, one forward pass over the flattened batch, one sampling op over the
//! logits that returns only token ids (and log-probs when asked); text, stop sequences
//! and events are the output worker's (output.rs), off this thread, as are constrained
//! rows' token masks (engine/masks.rs: computed while the next forward runs). The loop's work
//! runs under a supervisor (engine/supervisor.rs): a fault fails the requests it hit,
//! not the engine.

pub(crate) mod fault;
mod handle;
mod masks;
mod sample_step;
pub(crate) mod supervisor;

pub use handle::{EngineHandle, EngineLimits, RequestStream};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use crate::block_allocator::BlockAllocator;
use crate::constraint::{ConstraintCompiler, SeqConstraint};
use crate::device_sampler::SamplerState;
use crate::error::{Result, RuntimeError};
use crate::kv_cache::KvCacheTensors;
use crate::model::{ForwardBatch, Transformer};
use crate::output::OutputMsg;
use crate::penalty_table::PenaltyTable;
use crate::request::{FinishReason, GenerationEvent, GenerationRequest, Priority};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId};
use crate::tokenizer::TextTokenizer;
use masks::{MaskPool, Slot};
use supervisor::Supervision;

/// Background work is admitted only while a tenth of the KV cache stays free after
/// it, so a caller's request arriving next rarely has to preempt anything.
const BACKGROUND_RESERVE_DIVISOR: usize = 10;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    /// KV cache size; on CUDA, None means a fraction of free device memory.
    pub kv_cache_memory: Option<u64>,
    pub gpu_memory_utilization: f32,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// Requests accepted but not yet running; past it, `submit` fails with `QueueFull`.
    pub max_waiting: usize,
    /// The same bound for background requests (`Priority::Background`), counted
    /// apart: past it, `submit_at` fails with `BackgroundQueueFull`.
    pub max_waiting_background: usize,
    pub max_model_len: Option<usize>,
    pub enable_prefix_caching: bool,
    /// The KV cache's element type; None: the compute dtype. f16/bf16 under f32
    /// activations on the CPU halve the cache's bytes (llama.cpp's default is f16).
    pub kv_cache_dtype: Option<candle_core::DType>,
    /// Whose attention arithmetic to follow (`--attention-numerics`): llama.cpp's needs
    /// the CPU, f32 activations and an f16 or f32 cache, and is checked against those here.
    pub attention_numerics: crate::paged_attention::AttentionNumerics,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_memory: None,
            gpu_memory_utilization: 0.9,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_waiting: 1024,
            max_waiting_background: 64,
            max_model_len: None,
            enable_prefix_caching: true,
            kv_cache_dtype: None,
            attention_numerics: Default::default(),
        }
    }
}

/// A snapshot of the engine's state, refreshed every step, for metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    /// Of those, background sequences (`Priority::Background`).
    pub num_running_background: usize,
    pub num_waiting_background: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub num_preemptions: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub steps: u64,
    /// Token masks computed for constrained rows; the time the mask workers spent on
    /// them, and the engine thread's time on constraints: consuming the sampled
    /// tokens and waiting for masks (`hearth bench --json-schema` reports both per mask).
    pub constraint_masks: u64,
    pub constraint_mask_secs: f64,
    pub constraint_engine_secs: f64,
    /// hearth's own kernel launches (launch_count.rs; CUDA only, candle's not counted).
    pub kernel_launches: u64,
}

enum Command {
    Submit {
        id: SeqId,
        req: GenerationRequest,
        priority: Priority,
        events: tokio_mpsc::UnboundedSender<GenerationEvent>,
        arrived: Instant,
    },
    Cancel(SeqId),
}

struct Shared {
    stats: Mutex<EngineStats>,
    /// Submitted but not yet admitted to a first step, per class.
    pending: AtomicUsize,
    pending_background: AtomicUsize,
    alive: AtomicBool,
    /// Why the engine cannot serve again, once it cannot (supervisor.rs).
    defunct: tokio::sync::watch::Sender<Option<String>>,
}

impl Shared {
    fn pending(&self, p: Priority) -> &AtomicUsize {
        match p {
            Priority::Normal => &self.pending,
            Priority::Background => &self.pending_background,
        }
    }
}

/// Per-request state that is not the scheduler's: sampling and counts.
struct Active {
    /// Kept to notice a caller that went away; events go through the output worker.
    events: tokio_mpsc::UnboundedSender<GenerationEvent>,
    sampler: SamplerState,
    /// The structured-output matcher, when the request has a constraint (masks.rs).
    constraint: Option<Slot>,
    prompt_len: usize,
    output_tokens: usize,
    admitted: bool,
    priority: Priority,
}

pub struct Engine {
    model: Transformer,
    cache: KvCacheTensors,
    /// Penalty counts on the device, a row per penalised sequence (CUDA; none on the CPU).
    penalties: PenaltyTable,
    scheduler: Scheduler,
    eos_ids: Vec<u32>,
    active: HashMap<SeqId, Active>,
    rx: mpsc::Receiver<Command>,
    output: mpsc::Sender<OutputMsg>,
    /// Requests the output worker ended on a stop sequence.
    stopped: mpsc::Receiver<SeqId>,
    shared: Arc<Shared>,
    max_model_len: usize,
    stats: EngineStats,
    sup: Supervision,
    masks: MaskPool,
    numerics: crate::paged_attention::AttentionNumerics,
}

impl Engine {
    /// Sizes the KV cache, starts the engine thread and returns its handle.
    pub fn start(
        mut model: Transformer,
        tokenizer: Arc<TextTokenizer>,
        eos_ids: Vec<u32>,
        cfg: &EngineConfig,
    ) -> Result<EngineHandle> {
        crate::threads::init();
        let mcfg = model.config().clone();
        let max_model_len = cfg
            .max_model_len
            .unwrap_or(mcfg.max_position_embeddings)
            .min(mcfg.max_position_embeddings);
        let kv_dtype =
            crate::kv_cache::resolve_dtype(cfg.kv_cache_dtype, model.dtype(), model.device())
                .map_err(RuntimeError::Device)?;
        cfg.attention_numerics
            .check(model.dtype(), kv_dtype, model.device())
            .map_err(RuntimeError::Device)?;
        if cfg.attention_numerics == crate::paged_attention::AttentionNumerics::LlamaCpp {
            model.use_llama_cpp_rope()?;
        }
        let per_token = crate::kv_cache::bytes_per_token(&mcfg, kv_dtype);
        let budget = match cfg.kv_cache_memory {
            Some(b) => b,
            None => {
                let measured = crate::device::default_kv_budget(
                    model.device(),
                    cfg.gpu_memory_utilization,
                    per_token,
                    max_model_len,
                    cfg.max_num_seqs,
                )?;
                // On CUDA the budget is the free memory, and the penalty table comes out
                // of it after the cache (on the CPU the table has no device rows).
                let table = if model.device().is_cuda() {
                    PenaltyTable::device_bytes(mcfg.vocab_size, cfg.max_num_seqs.max(1))
                } else {
                    0
                };
                crate::device::kv_budget_after(measured, table)?
            }
        };
        let bs = cfg.block_size.max(1);
        let num_blocks = (budget as usize / (per_token * bs)).max(1);
        if num_blocks * bs < 2 * bs {
            return Err(RuntimeError::Device(format!(
                "the KV cache budget of {budget} bytes holds fewer than two blocks ({} bytes each)",
                per_token * bs
            )));
        }
        let cache = KvCacheTensors::new(&mcfg, num_blocks, bs, kv_dtype, model.device())?;
        let penalties =
            PenaltyTable::for_device(model.device(), mcfg.vocab_size, cfg.max_num_seqs.max(1))?;
        // The weights were uploaded and the cache zeroed on this (the loader's) thread's
        // CUDA stream; the engine thread works on its own. Wait for this thread's work
        // before the engine can run a step that reads it (a no-op on the CPU).
        model
            .device()
            .synchronize()
            .map_err(|e| RuntimeError::Device(format!("waiting for the model upload: {e}")))?;
        tracing::info!(
            num_blocks,
            block_size = bs,
            kv_tokens = num_blocks * bs,
            kv_bytes = num_blocks * bs * per_token,
            penalty_rows = penalties.rows(),
            penalty_bytes = penalties.bytes(),
            "KV cache and penalty table allocated"
        );
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
                max_num_seqs: cfg.max_num_seqs.max(1),
                enable_prefix_caching: cfg.enable_prefix_caching,
                background_reserve_blocks: num_blocks / BACKGROUND_RESERVE_DIVISOR,
            },
            BlockAllocator::new(num_blocks, bs),
        );
        let (tx, rx) = mpsc::channel();
        let initial_stats = EngineStats {
            kv_blocks_total: num_blocks,
            kv_blocks_free: num_blocks,
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            stats: Mutex::new(initial_stats.clone()),
            pending: AtomicUsize::new(0),
            pending_background: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            defunct: tokio::sync::watch::Sender::new(None),
        });
        let limits = EngineLimits {
            max_model_len,
            kv_capacity_tokens: num_blocks * bs,
            vocab_size: mcfg.vocab_size,
            max_waiting: cfg.max_waiting,
            max_waiting_background: cfg.max_waiting_background,
        };
        let constraints = Arc::new(ConstraintCompiler::new(
            tokenizer.clone(),
            mcfg.vocab_size,
            &eos_ids,
        ));
        let (stopped_tx, stopped) = mpsc::channel();
        let output = crate::output::spawn(tokenizer.clone(), stopped_tx)
            .map_err(|e| RuntimeError::Device(format!("cannot start the output thread: {e}")))?;
        let masks = MaskPool::start(&eos_ids)
            .map_err(|e| RuntimeError::Device(format!("cannot start the mask workers: {e}")))?;
        let mut engine = Engine {
            model,
            cache,
            penalties,
            scheduler,
            eos_ids,
            active: HashMap::new(),
            rx,
            output,
            stopped,
            shared: shared.clone(),
            max_model_len,
            stats: initial_stats,
            sup: Supervision::new(fault::Faults::new(tokenizer.clone())),
            masks,
            numerics: cfg.attention_numerics,
        };
        std::thread::Builder::new()
            .name("hearth-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| RuntimeError::Device(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            tx,
            shared,
            next_id: Arc::new(AtomicU64::new(1)),
            tokenizer,
            limits,
            constraints,
        })
    }

    fn run(&mut self) {
        let _guard = supervisor::AliveGuard(self.shared.clone());
        if self.serve().is_err() {
            self.refuse_all();
        }
    }

    /// The loop, until every handle is gone (Ok) or the engine is DEFUNCT (Err).
    fn serve(&mut self) -> std::result::Result<(), supervisor::Defunct> {
        loop {
            // Idle: sleep until a command comes.
            if !self.scheduler.has_work() {
                match self.rx.recv() {
                    Ok(cmd) => self.supervise(|e| {
                        e.handle(cmd);
                        Ok(())
                    })?,
                    Err(_) => return Ok(()),
                }
            }
            self.supervise(|e| {
                while let Ok(cmd) = e.rx.try_recv() {
                    e.handle(cmd);
                }
                while let Ok(id) = e.stopped.try_recv() {
                    e.drop_seq(id);
                }
                e.reap_dropped();
                e.step()
            })?;
            self.publish_stats();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                id,
                req,
                priority,
                events,
                arrived,
            } => {
                let prompt_len = req.prompt.len();
                self.sup.submitting = Some(id);
                self.sup.submitting_class = priority;
                let fault = self.sup.faults.on_submit(id, &req.prompt);
                self.open_output(id, &req, events.clone(), arrived, fault);
                let constraint = match req.params.constraint.as_ref() {
                    // Its first mask is computed while the prompt waits and prefills.
                    Some(c) => match SeqConstraint::new(c, &self.eos_ids) {
                        Ok(sc) => {
                            let panic = self.sup.faults.mask_panics(id);
                            Some(self.masks.send(id, Box::new(sc), panic))
                        }
                        Err(e) => {
                            self.shared.pending(priority).fetch_sub(1, Ordering::SeqCst);
                            self.sup.submitting = None;
                            let _ = self.output.send(OutputMsg::Finish {
                                id,
                                reason: FinishReason::Error,
                                error: Some(e),
                            });
                            return;
                        }
                    },
                    None => None,
                };
                let sampler = SamplerState::new(req.params, &req.prompt);
                self.scheduler.add_at(id, req.prompt, priority);
                self.active.insert(
                    id,
                    Active {
                        events,
                        sampler,
                        constraint,
                        prompt_len,
                        output_tokens: 0,
                        admitted: false,
                        priority,
                    },
                );
                self.sup.submitting = None;
            }
            Command::Cancel(id) => {
                if self.active.contains_key(&id) {
                    self.finish(id, FinishReason::Canceled, None);
                }
            }
        }
    }

    fn open_output(
        &self,
        id: SeqId,
        req: &GenerationRequest,
        events: tokio_mpsc::UnboundedSender<GenerationEvent>,
        arrived: Instant,
        fault: fault::OutputFault,
    ) {
        let prompt_len = req.prompt.len();
        let _ = self.output.send(OutputMsg::Open {
            id,
            events,
            prompt_tail: req.prompt[prompt_len.saturating_sub(8)..].to_vec(),
            prompt_len,
            stop: req.params.stop.clone(),
            arrived,
            fault,
        });
    }

    /// A caller that dropped its stream without cancelling still frees its blocks.
    fn reap_dropped(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish(id, FinishReason::Canceled, None);
        }
    }

    fn step(&mut self) -> Result<()> {
        let plan = self.scheduler.schedule();
        for id in &plan.preempted {
            let _ = self.output.send(OutputMsg::Preempted { id: *id });
            // Recomputed later: its table row is filled again when it samples next.
            if let Some(a) = self.active.get_mut(id) {
                self.penalties.detach(&mut a.sampler);
            }
        }
        for id in &plan.admitted {
            self.on_admitted(*id);
        }
        if plan.is_empty() {
            return Ok(());
        }
        self.sup.current = plan.seqs.iter().map(|s| s.id).collect();
        let mut batch = ForwardBatch::new(self.scheduler.block_size());
        batch.attention.numerics = self.numerics;
        let mut sampled_ids = Vec::new();
        for s in &plan.seqs {
            let Some(state) = self.scheduler.seq(s.id) else {
                continue;
            };
            let tokens = &state.tokens[s.start..s.start + s.len];
            batch.push(tokens, s.start, &state.block_table, s.wants_logits);
            if s.wants_logits {
                sampled_ids.push(s.id);
            }
        }
        // Meanwhile the mask workers compute the constrained rows' masks (masks.rs).
        let logits = self.model.forward(&batch, &self.cache)?;
        self.scheduler.commit(&plan);
        self.stats.steps += 1;
        self.sup.faults.in_step(&self.sup.current)?;
        let sampled = self.sample(&logits, &sampled_ids)?;
        self.stats.kernel_launches += crate::launch_count::take();
        self.emit(sampled_ids, sampled);
        Ok(())
    }

    fn on_admitted(&mut self, id: SeqId) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        if a.admitted {
            return; // back from preemption
        }
        a.admitted = true;
        self.shared
            .pending(a.priority)
            .fetch_sub(1, Ordering::SeqCst);
        self.stats.prompt_tokens_total += a.prompt_len as u64;
        let cached = self
            .scheduler
            .seq(id)
            .map(|s| s.num_cached_prompt)
            .unwrap_or(0);
        let _ = self.output.send(OutputMsg::Started {
            id,
            cached_prompt_tokens: cached,
            at: Instant::now(),
        });
    }

    /// Forgets a request: its blocks go back, its pending slot too if it never ran.
    fn drop_seq(&mut self, id: SeqId) -> bool {
        self.scheduler.remove(id);
        let Some(mut a) = self.active.remove(&id) else {
            return false;
        };
        self.penalties.detach(&mut a.sampler);
        if !a.admitted {
            self.shared
                .pending(a.priority)
                .fetch_sub(1, Ordering::SeqCst);
        }
        true
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason, error: Option<String>) {
        if self.drop_seq(id) {
            let _ = self.output.send(OutputMsg::Finish { id, reason, error });
        }
    }

    fn publish_stats(&mut self) {
        let alloc = self.scheduler.allocator();
        self.stats.num_running = self.scheduler.num_running();
        self.stats.num_waiting = self.scheduler.num_waiting();
        self.stats.num_running_background = self.scheduler.num_running_background();
        self.stats.num_waiting_background = self.scheduler.num_waiting_background();
        self.stats.kv_blocks_free = alloc.num_free();
        self.stats.prefix_cache_queries = alloc.prefix_queries;
        self.stats.prefix_cache_hits = alloc.prefix_hits;
        self.stats.num_preemptions = self.scheduler.num_preemptions;
        self.stats.constraint_masks = self.masks.masks;
        self.stats.constraint_mask_secs = self.masks.work_secs;
        self.stats.constraint_engine_secs = self.masks.engine_secs;
        if let Ok(mut s) = self.shared.stats.lock() {
            *s = self.stats.clone();
        }
    }
}
