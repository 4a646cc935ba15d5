//! Iteration-level scheduling over the paged KV cache, vLLM V1 style: there is no
//! prefill phase and no decode phase. Each sequence tracks how many of its tokens have
//! keys and values in the cache; each step fills a token budget with every running
//! sequence first (a decode costs one token), then with chunks of waiting prompts in
//! arrival order. When blocks run out, the most recently admitted sequence is
//! preempted: its blocks are freed and it is recomputed later, its output kept.
//!
//! Two classes (`Priority`): callers' normal work and background work (shadow
//! copies). `running` keeps every normal sequence before every background one, so
//! "the newest running" is always a background sequence while one runs: background
//! work is preempted first, and never makes room for itself by preempting normal
//! work. A step serves running normal sequences, then waiting normal ones (preempting
//! background sequences for their blocks or batch slots), then running background
//! ones; a waiting background sequence is admitted only when no normal one waits,
//! nothing was preempted, and `background_reserve_blocks` stay free after it (unless
//! nothing else runs).
//!
//! This file knows tokens and blocks, not tensors, so its policy is tested alone.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::block_allocator::{block_key, BlockAllocator, BlockId};
use crate::request::Priority;

pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
    /// Blocks a background sequence must leave free when it is admitted, so a normal
    /// request arriving next can usually start without preempting anything.
    pub background_reserve_blocks: usize,
}

#[derive(Debug)]
pub struct SeqState {
    /// Prompt and output so far; the last one may not be computed yet.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<BlockId>,
    /// Prefix keys of the leading full blocks that are registered or shared.
    keys: Vec<u64>,
    /// Prompt tokens found in the prefix cache at admission.
    pub num_cached_prompt: usize,
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// First token of this step's chunk (= tokens computed before the step).
    pub start: usize,
    pub len: usize,
    /// The chunk ends at the last known token: the step samples a new one.
    pub wants_logits: bool,
}

#[derive(Debug, Default)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
    /// Sequences admitted from the waiting queue in this step.
    pub admitted: Vec<SeqId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }

    fn push(&mut self, id: SeqId, start: usize, len: usize, total: usize) {
        self.seqs.push(ScheduledSeq {
            id,
            start,
            len,
            wants_logits: start + len == total,
        });
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, SeqState>,
    /// Normal sequences waiting, in arrival order (preempted ones at the front).
    waiting: VecDeque<SeqId>,
    /// Background sequences waiting: served only when `waiting` is empty.
    waiting_background: VecDeque<SeqId>,
    /// Normal sequences in admission order, then background ones in admission order:
    /// the back is the first to be preempted.
    running: Vec<SeqId>,
    pub num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, alloc: BlockAllocator) -> Self {
        Self {
            cfg,
            alloc,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_background: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// An empty scheduler with these settings over a fresh allocator of as many
    /// blocks: what a rebuild after repeated faults starts again from.
    pub fn emptied(&self) -> Scheduler {
        Scheduler::new(
            self.cfg.clone(),
            BlockAllocator::new(self.alloc.num_blocks(), self.alloc.block_size()),
        )
    }

    /// Whether the bookkeeping agrees with itself: each sequence waits (in its class's
    /// queue) or runs exactly once, normal sequences run ahead of background ones,
    /// each block's reference count is the number of block tables that hold it, and
    /// exactly the unreferenced blocks are free. Checked after a fault, when a panic
    /// may have left a change half made.
    pub fn is_consistent(&self) -> bool {
        let mut refs = vec![0u32; self.alloc.num_blocks()];
        for s in self.seqs.values() {
            for &b in &s.block_table {
                match refs.get_mut(b as usize) {
                    Some(r) => *r += 1,
                    None => return false,
                }
            }
        }
        let queued = self.waiting.len() + self.waiting_background.len();
        let waiting: HashSet<SeqId> = self
            .waiting
            .iter()
            .chain(&self.waiting_background)
            .copied()
            .collect();
        let running: HashSet<SeqId> = self.running.iter().copied().collect();
        let in_class =
            |q: &VecDeque<SeqId>, p: Priority| q.iter().all(|id| self.priority(*id) == p);
        let classes = in_class(&self.waiting, Priority::Normal)
            && in_class(&self.waiting_background, Priority::Background)
            && self
                .running
                .windows(2)
                .all(|w| self.priority(w[0]) <= self.priority(w[1]));
        let placed = waiting.len() == queued
            && classes
            && running.len() == self.running.len()
            && waiting.is_disjoint(&running)
            && waiting.len() + running.len() == self.seqs.len()
            && self
                .seqs
                .keys()
                .all(|id| waiting.contains(id) || running.contains(id));
        let counted = refs
            .iter()
            .enumerate()
            .all(|(b, &r)| self.alloc.ref_count(b as BlockId) == r);
        let unreferenced = refs.iter().filter(|&&r| r == 0).count();
        placed && counted && unreferenced == self.alloc.num_free()
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    pub fn block_size(&self) -> usize {
        self.alloc.block_size()
    }

    /// Tokens the whole cache can hold: no sequence may ever need more.
    pub fn capacity_tokens(&self) -> usize {
        self.alloc.num_blocks() * self.alloc.block_size()
    }

    /// Waiting sequences of both classes.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.waiting_background.len()
    }

    pub fn num_waiting_background(&self) -> usize {
        self.waiting_background.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_running_background(&self) -> usize {
        self.running
            .iter()
            .filter(|id| self.priority(**id) == Priority::Background)
            .count()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.waiting_background.is_empty() || !self.running.is_empty()
    }

    fn priority(&self, id: SeqId) -> Priority {
        self.seqs.get(&id).map(|s| s.priority).unwrap_or_default()
    }

    fn queue(&mut self, p: Priority) -> &mut VecDeque<SeqId> {
        match p {
            Priority::Normal => &mut self.waiting,
            Priority::Background => &mut self.waiting_background,
        }
    }

    pub fn seq(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    /// Queues a normal request.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) {
        self.add_at(id, prompt, Priority::Normal);
    }

    pub fn add_at(&mut self, id: SeqId, prompt: Vec<u32>, priority: Priority) {
        let prompt_len = prompt.len();
        self.seqs.insert(
            id,
            SeqState {
                tokens: prompt,
                prompt_len,
                num_computed: 0,
                block_table: Vec::new(),
                keys: Vec::new(),
                num_cached_prompt: 0,
                priority,
            },
        );
        self.queue(priority).push_back(id);
    }

    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Removes a sequence wherever it is (finished, cancelled) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.free_blocks(&mut s);
        }
        self.waiting.retain(|&w| w != id);
        self.waiting_background.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
    }

    fn free_blocks(&mut self, s: &mut SeqState) {
        // Released back to front: the tail of a prompt is evicted before its head,
        // which more requests share.
        for &b in s.block_table.iter().rev() {
            self.alloc.release(b);
        }
        s.block_table.clear();
        s.keys.clear();
        s.num_computed = 0;
    }

    fn preempt(&mut self, id: SeqId) {
        let priority = self.priority(id);
        if let Some(mut s) = self.seqs.remove(&id) {
            self.free_blocks(&mut s);
            self.seqs.insert(id, s);
        }
        self.running.retain(|&r| r != id);
        self.queue(priority).push_front(id);
        self.num_preemptions += 1;
    }

    /// Preempts the newest running background sequence, if one runs.
    fn preempt_background(&mut self, plan: &mut StepPlan) -> bool {
        match self.running.last() {
            Some(&victim) if self.priority(victim) == Priority::Background => {
                self.preempt(victim);
                plan.preempted.push(victim);
                true
            }
            _ => false,
        }
    }

    /// Gives back the prefix blocks a waiting sequence matched: kept only while it
    /// runs, they serve others from the LRU list meanwhile.
    fn unmatch(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.free_blocks(&mut s);
            self.seqs.insert(id, s);
        }
    }

    /// Ensures `id` has blocks for its first `upto` tokens. False if the cache is full.
    fn reserve(&mut self, id: SeqId, upto: usize) -> bool {
        let bs = self.alloc.block_size();
        let Some(s) = self.seqs.get_mut(&id) else {
            return false;
        };
        let need = upto.div_ceil(bs).saturating_sub(s.block_table.len());
        if need > self.alloc.num_free() {
            return false;
        }
        for _ in 0..need {
            match self.alloc.allocate() {
                Some(b) => s.block_table.push(b),
                None => return false,
            }
        }
        true
    }

    /// Shares the cached blocks of the longest cached prefix of a newly admitted
    /// sequence, always leaving at least one token to compute (its logits are needed).
    fn match_prefix(&mut self, id: SeqId) {
        let bs = self.alloc.block_size();
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let mut parent = None;
        let full = (s.tokens.len() - 1) / bs;
        for b in 0..full {
            let chunk = &s.tokens[b * bs..(b + 1) * bs];
            let key = block_key(parent, chunk);
            match self.alloc.lookup(key, chunk) {
                Some(block) => {
                    s.block_table.push(block);
                    s.keys.push(key);
                    parent = Some(key);
                }
                None => break,
            }
        }
        s.num_computed = s.block_table.len() * bs;
        s.num_cached_prompt = s.num_computed.min(s.prompt_len);
    }

    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.run_class(Priority::Normal, &mut plan, &mut budget);
        // New work only when no normal sequence had to be preempted: admitting while
        // evicting thrashes. Evicting background work for normal work is the point.
        let normal_preempted = plan
            .preempted
            .iter()
            .any(|id| self.priority(*id) == Priority::Normal);
        if !normal_preempted {
            self.admit_normal(&mut plan, &mut budget);
        }
        self.run_class(Priority::Background, &mut plan, &mut budget);
        if plan.preempted.is_empty() && self.waiting.is_empty() {
            self.admit_background(&mut plan, &mut budget);
        }
        plan
    }

    /// Schedules the running sequences of one class, preempting the newest running
    /// ones (background first: they are at the back) when blocks run out.
    fn run_class(&mut self, class: Priority, plan: &mut StepPlan, budget: &mut usize) {
        let mut i = self
            .running
            .iter()
            .position(|id| self.priority(*id) == class)
            .unwrap_or(self.running.len());
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let Some(s) = self.seqs.get(&id) else {
                i += 1;
                continue;
            };
            if s.priority != class {
                break;
            }
            let start = s.num_computed;
            let n = (s.tokens.len() - start).min(*budget);
            let total = s.tokens.len();
            if n == 0 {
                i += 1;
                continue;
            }
            let mut fits = self.reserve(id, start + n);
            while !fits {
                // The newest running sequence; it may be this one.
                let Some(&victim) = self.running.last() else {
                    break;
                };
                self.preempt(victim);
                plan.preempted.push(victim);
                if victim == id {
                    break;
                }
                fits = self.reserve(id, start + n);
            }
            if !fits {
                break;
            }
            plan.push(id, start, n, total);
            *budget -= n;
            i += 1;
        }
    }

    /// Admits waiting normal sequences in arrival order, preempting running
    /// background ones for their blocks and batch slots.
    fn admit_normal(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        while *budget > 0 {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            if self.running.len() >= self.cfg.max_num_seqs && !self.preempt_background(plan) {
                break;
            }
            let Some((start, n, total)) = self.chunk(id, *budget) else {
                self.waiting.pop_front();
                continue;
            };
            let mut fits = self.reserve(id, start + n);
            while !fits && self.preempt_background(plan) {
                fits = self.reserve(id, start + n);
            }
            if !fits {
                self.unmatch(id);
                break;
            }
            self.waiting.pop_front();
            let at = self
                .running
                .iter()
                .position(|r| self.priority(*r) == Priority::Background)
                .unwrap_or(self.running.len());
            self.running.insert(at, id);
            plan.admitted.push(id);
            plan.push(id, start, n, total);
            *budget -= n;
        }
    }

    /// Admits waiting background sequences into what normal work leaves: a free
    /// batch slot, and `background_reserve_blocks` still free after their chunk.
    fn admit_background(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting_background.front() else {
                break;
            };
            let Some((start, n, total)) = self.chunk(id, *budget) else {
                self.waiting_background.pop_front();
                continue;
            };
            let bs = self.alloc.block_size();
            let held = self.seqs.get(&id).map_or(0, |s| s.block_table.len());
            let need = (start + n).div_ceil(bs).saturating_sub(held);
            // Alone on the engine it needs no reserve (or one too large for the
            // reserve could never start).
            let room = self.running.is_empty()
                || self.alloc.num_free() >= need + self.cfg.background_reserve_blocks;
            if !room || !self.reserve(id, start + n) {
                self.unmatch(id);
                break;
            }
            self.waiting_background.pop_front();
            self.running.push(id);
            plan.admitted.push(id);
            plan.push(id, start, n, total);
            *budget -= n;
        }
    }

    /// A waiting sequence's next chunk (matching its cached prefix first): its start,
    /// length within `budget` and total length. None for an unknown id.
    fn chunk(&mut self, id: SeqId, budget: usize) -> Option<(usize, usize, usize)> {
        if self.seqs.get(&id).is_some_and(|s| s.block_table.is_empty())
            && self.cfg.enable_prefix_caching
        {
            self.match_prefix(id);
        }
        let s = self.seqs.get(&id)?;
        let (start, total) = (s.num_computed, s.tokens.len());
        Some((start, (total - start).min(budget), total))
    }

    /// Cache slots of tokens `0..upto` of a sequence.
    pub fn slots(&self, id: SeqId, upto: usize) -> Vec<u32> {
        let bs = self.alloc.block_size();
        let Some(s) = self.seqs.get(&id) else {
            return Vec::new();
        };
        (0..upto)
            .map(|p| s.block_table[p / bs] * bs as u32 + (p % bs) as u32)
            .collect()
    }

    /// Records that the plan ran: advances each sequence and offers its newly full
    /// blocks to the prefix cache.
    pub fn commit(&mut self, plan: &StepPlan) {
        let bs = self.alloc.block_size();
        for sched in &plan.seqs {
            let Some(s) = self.seqs.get_mut(&sched.id) else {
                continue;
            };
            s.num_computed = sched.start + sched.len;
            if !self.cfg.enable_prefix_caching {
                continue;
            }
            let full = s.num_computed / bs;
            while s.keys.len() < full {
                let b = s.keys.len();
                let chunk = &s.tokens[b * bs..(b + 1) * bs];
                let key = block_key(s.keys.last().copied(), chunk);
                self.alloc.register(s.block_table[b], key, chunk);
                s.keys.push(key);
            }
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
