//! Iteration-level scheduling over the paged KV cache, vLLM V1 style: there is no
//! prefill phase and no decode phase. Each sequence tracks how many of its tokens have
//! keys and values in the cache; each step fills a token budget with every running
//! sequence first (a decode costs one token), then with chunks of waiting prompts in
//! arrival order. When blocks run out, the most recently admitted sequence is
//! preempted: its blocks are freed and it is recomputed later, its output kept.
//!
//! This file knows tokens and blocks, not tensors, so its policy is tested alone.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::block_allocator::{block_key, BlockAllocator, BlockId};

pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
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
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the back is the first to be preempted.
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

    /// Whether the bookkeeping agrees with itself: each sequence waits or runs exactly
    /// once, each block's reference count is the number of block tables that hold it,
    /// and exactly the unreferenced blocks are free. Checked after a fault, when a
    /// panic may have left a change half made.
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
        let waiting: HashSet<SeqId> = self.waiting.iter().copied().collect();
        let running: HashSet<SeqId> = self.running.iter().copied().collect();
        let placed = waiting.len() == self.waiting.len()
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

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn seq(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) {
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
            },
        );
        self.waiting.push_back(id);
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
        if let Some(mut s) = self.seqs.remove(&id) {
            self.free_blocks(&mut s);
            self.seqs.insert(id, s);
        }
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.num_preemptions += 1;
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
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(s) = self.seqs.get(&id) else {
                i += 1;
                continue;
            };
            let start = s.num_computed;
            let n = (s.tokens.len() - start).min(budget);
            let total = s.tokens.len();
            if n == 0 {
                i += 1;
                continue;
            }
            let mut fits = self.reserve(id, start + n);
            while !fits {
                // Free blocks by preempting the newest running sequence; it may be this one.
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
            plan.seqs.push(ScheduledSeq {
                id,
                start,
                len: n,
                wants_logits: start + n == total,
            });
            budget -= n;
            i += 1;
        }
        // New work only when nothing had to be preempted: admitting while evicting thrashes.
        if plan.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                if self.seqs.get(&id).is_some_and(|s| s.block_table.is_empty())
                    && self.cfg.enable_prefix_caching
                {
                    self.match_prefix(id);
                }
                let Some(s) = self.seqs.get(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                let start = s.num_computed;
                let total = s.tokens.len();
                let n = (total - start).min(budget);
                if !self.reserve(id, start + n) {
                    // Keep the shared prefix blocks only while it runs; give them back
                    // to the LRU list meanwhile so they can serve others.
                    if let Some(mut s) = self.seqs.remove(&id) {
                        self.free_blocks(&mut s);
                        self.seqs.insert(id, s);
                    }
                    break;
                }
                self.waiting.pop_front();
                self.running.push(id);
                plan.admitted.push(id);
                plan.seqs.push(ScheduledSeq {
                    id,
                    start,
                    len: n,
                    wants_logits: start + n == total,
                });
                budget -= n;
            }
        }
        plan
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
mod tests {
    use super::*;

    fn sched(blocks: usize, bs: usize, budget: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: budget,
                max_num_seqs: max_seqs,
                enable_prefix_caching: true,
            },
            BlockAllocator::new(blocks, bs),
        )
    }

    /// Runs a plan as the engine would, sampling token 7 where logits are wanted.
    fn run(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        s.commit(&plan);
        for x in &plan.seqs {
            if x.wants_logits {
                s.append_token(x.id, 7);
            }
        }
        plan
    }

    fn lens(p: &StepPlan) -> Vec<(SeqId, usize, usize)> {
        p.seqs.iter().map(|x| (x.id, x.start, x.len)).collect()
    }

    #[test]
    fn decodes_go_first_then_prompts_are_chunked_into_the_budget() {
        let mut s = sched(64, 4, 8, 16);
        s.add(1, vec![1; 5]);
        assert_eq!(lens(&run(&mut s)), vec![(1, 0, 5)]);
        s.add(2, vec![2; 20]);
        // Seq 1 decodes (1 token), seq 2 gets the remaining 7 of the budget.
        assert_eq!(lens(&run(&mut s)), vec![(1, 5, 1), (2, 0, 7)]);
        let p = run(&mut s);
        assert_eq!(lens(&p), vec![(1, 6, 1), (2, 7, 7)]);
        assert!(!p.seqs[1].wants_logits);
        let p = run(&mut s);
        assert_eq!(lens(&p), vec![(1, 7, 1), (2, 14, 6)]);
        assert!(p.seqs[1].wants_logits, "last chunk samples");
    }

    #[test]
    fn waiting_is_first_come_first_served_and_capped_by_max_num_seqs() {
        let mut s = sched(64, 4, 100, 2);
        for id in 1..=3 {
            s.add(id, vec![id as u32; 3]);
        }
        assert_eq!(lens(&run(&mut s)), vec![(1, 0, 3), (2, 0, 3)]);
        assert_eq!(s.num_waiting(), 1);
        s.remove(1);
        assert_eq!(lens(&run(&mut s)), vec![(2, 3, 1), (3, 0, 3)]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_with_its_output() {
        // 4 blocks of 2 tokens: two sequences of 4 prompt tokens each take 2 blocks.
        let mut s = sched(4, 2, 100, 8);
        s.add(1, vec![1; 4]);
        s.add(2, vec![2; 4]);
        run(&mut s); // both prefilled; each appends a token that needs a third block
        let before = s.allocator().num_free();
        assert_eq!(before, 0);
        // Next decode needs a third block for each: seq 2 (newest) is preempted.
        let p = run(&mut s);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(lens(&p), vec![(1, 4, 1)]);
        let s2 = s.seq(2).unwrap();
        assert_eq!(s2.num_computed, 0);
        assert_eq!(s2.tokens, vec![2, 2, 2, 2, 7], "output kept for recompute");
        // Once seq 1 finishes, seq 2 comes back and recomputes everything it had.
        s.remove(1);
        let p = run(&mut s);
        assert_eq!(p.admitted, vec![2]);
        let x = &p.seqs[0];
        assert_eq!(x.start + x.len, 5);
        assert!(x.wants_logits);
    }

    #[test]
    fn shared_prefix_blocks_are_reused_and_the_last_token_is_always_computed() {
        let mut s = sched(16, 4, 100, 8);
        let prompt: Vec<u32> = (0..10).collect();
        s.add(1, prompt.clone());
        run(&mut s);
        s.remove(1);
        let free_after_first = s.allocator().num_free();
        assert_eq!(free_after_first, 16);
        // Same 8-token prefix: two full blocks come from the cache.
        let mut p2 = prompt[..8].to_vec();
        p2.extend([99, 98]);
        s.add(2, p2);
        let p = run(&mut s);
        assert_eq!(lens(&p), vec![(2, 8, 2)]);
        assert_eq!(s.seq(2).unwrap().num_cached_prompt, 8);
        // A prompt that is exactly cached still computes its last block.
        s.add(3, prompt[..8].to_vec());
        let p = run(&mut s);
        assert_eq!(lens(&p)[1], (3, 4, 4));
    }

    #[test]
    fn removing_returns_every_block_from_any_state() {
        let mut s = sched(8, 4, 6, 8);
        s.add(1, vec![1; 12]);
        s.add(2, vec![2; 4]);
        run(&mut s); // seq 1 mid-prefill
        s.add(3, vec![3; 4]); // still waiting
        s.remove(1);
        s.remove(2);
        s.remove(3);
        assert_eq!(s.allocator().num_free(), 8);
        assert!(!s.has_work());
    }

    #[test]
    fn consistency_check_holds_through_a_run_and_catches_a_leaked_block() {
        let mut s = sched(8, 4, 6, 8);
        s.add(1, vec![1; 12]);
        s.add(2, vec![2; 4]);
        assert!(s.is_consistent());
        run(&mut s);
        s.add(3, vec![3; 4]);
        assert!(s.is_consistent());
        // A sequence dropped from the maps without freeing its blocks: a half-made change.
        s.seqs.remove(&1);
        s.waiting.retain(|&w| w != 1);
        s.running.retain(|&r| r != 1);
        assert!(!s.is_consistent());
        assert!(s.emptied().is_consistent());
        assert_eq!(s.emptied().allocator().num_free(), 8);
    }
}
