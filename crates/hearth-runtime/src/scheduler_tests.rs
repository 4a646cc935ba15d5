use super::*;

fn sched(blocks: usize, bs: usize, budget: usize, max_seqs: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: max_seqs,
            enable_prefix_caching: true,
            background_reserve_blocks: 0,
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

fn bg(s: &mut Scheduler, id: SeqId, prompt: Vec<u32>) {
    s.add_at(id, prompt, Priority::Background);
}

#[test]
fn a_normal_request_is_admitted_at_once_by_preempting_background_work_that_fills_the_cache() {
    // 4 blocks of 2: two background sequences of 4 prompt tokens fill the cache.
    let mut s = sched(4, 2, 100, 8);
    bg(&mut s, 1, vec![1; 4]);
    bg(&mut s, 2, vec![2; 4]);
    run(&mut s);
    assert_eq!(s.allocator().num_free(), 0);
    assert_eq!(s.num_running_background(), 2);
    s.add(3, vec![3; 2]);
    let p = run(&mut s);
    // The newest background sequence made room; the normal one runs in this step.
    assert_eq!(p.preempted, vec![2]);
    assert_eq!(p.admitted, vec![3]);
    assert_eq!(lens(&p), vec![(3, 0, 2), (1, 4, 1)]);
    assert_eq!(s.num_waiting_background(), 1);
    assert!(s.is_consistent());
    // The preempted one comes back (recomputing its output) once there is room.
    s.remove(3);
    s.remove(1);
    let p = run(&mut s);
    assert_eq!(p.admitted, vec![2]);
    let x = &p.seqs[0];
    assert_eq!(
        (x.id, x.start + x.len),
        (2, 5),
        "recomputed with its output"
    );
    assert!(x.wants_logits);
}

#[test]
fn a_normal_request_takes_a_background_sequence_s_batch_slot() {
    let mut s = sched(64, 4, 100, 1);
    bg(&mut s, 1, vec![1; 3]);
    run(&mut s);
    s.add(2, vec![2; 3]);
    let p = run(&mut s);
    assert_eq!(p.preempted, vec![1]);
    assert_eq!(lens(&p), vec![(2, 0, 3)]);
    // While the normal one runs, the background one waits.
    for _ in 0..3 {
        let p = run(&mut s);
        assert_eq!(lens(&p).len(), 1);
        assert_eq!(p.seqs[0].id, 2);
    }
    s.remove(2);
    let p = run(&mut s);
    assert_eq!(p.admitted, vec![1]);
}

#[test]
fn waiting_background_work_never_goes_ahead_of_normal_work() {
    // Queued first, the background sequences still start after the normal ones.
    let mut s = sched(64, 4, 100, 1);
    bg(&mut s, 1, vec![1; 3]);
    bg(&mut s, 2, vec![2; 3]);
    s.add(3, vec![3; 3]);
    s.add(4, vec![4; 3]);
    let mut order = Vec::new();
    for _ in 0..4 {
        let p = run(&mut s);
        order.extend(p.admitted.iter().copied());
        if let Some(x) = p.seqs.first() {
            s.remove(x.id);
        }
    }
    assert_eq!(order, vec![3, 4, 1, 2]);
    // A normal prompt that fills the step's budget leaves none to background work.
    let mut s = sched(64, 4, 8, 8);
    bg(&mut s, 1, vec![1; 4]);
    s.add(2, vec![2; 10]);
    let p = run(&mut s);
    assert_eq!(lens(&p), vec![(2, 0, 8)]);
    let p = run(&mut s);
    assert_eq!(lens(&p), vec![(2, 8, 2), (1, 0, 4)]);
}

#[test]
fn background_work_never_preempts_normal_work() {
    // The background sequence is admitted first; the normal one joins and both grow.
    let mut s = sched(4, 2, 100, 8);
    bg(&mut s, 1, vec![1; 4]);
    run(&mut s);
    s.add(2, vec![2; 4]);
    let p = run(&mut s);
    // The normal one is admitted and fills the cache; the older background one then
    // needs a block and gives up its own, never the newer normal one's.
    assert_eq!(p.admitted, vec![2]);
    assert_eq!(p.preempted, vec![1]);
    assert_eq!(lens(&p), vec![(2, 0, 4)]);
    for _ in 0..3 {
        let p = run(&mut s);
        assert!(p.preempted.is_empty());
        assert_eq!(p.seqs.len(), 1);
        assert_eq!(p.seqs[0].id, 2, "the normal sequence runs every step");
    }
    assert!(s.is_consistent());
}

#[test]
fn background_admission_leaves_the_reserve_free_for_normal_work() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 100,
            max_num_seqs: 8,
            enable_prefix_caching: false,
            background_reserve_blocks: 2,
        },
        BlockAllocator::new(8, 2),
    );
    bg(&mut s, 1, vec![1; 3]); // 2 blocks: 6 free after
    bg(&mut s, 2, vec![2; 7]); // 4 blocks: 2 free after
    bg(&mut s, 3, vec![3; 2]); // 1 block: would leave 1
    let p = run(&mut s);
    assert_eq!(p.admitted, vec![1, 2]);
    assert_eq!(s.num_waiting_background(), 1);
    // A normal request arriving now starts without preempting anything.
    s.add(4, vec![4; 3]);
    let p = run(&mut s);
    assert_eq!(p.admitted, vec![4]);
    assert!(p.preempted.is_empty());
}

#[test]
fn the_consistency_check_knows_the_classes() {
    let mut s = sched(16, 4, 100, 8);
    bg(&mut s, 1, vec![1; 4]);
    s.add(2, vec![2; 4]);
    bg(&mut s, 3, vec![3; 4]);
    run(&mut s);
    assert!(s.is_consistent());
    // A background sequence running ahead of a normal one breaks the order.
    s.running.reverse();
    assert!(!s.is_consistent());
    s.running.reverse();
    // A normal sequence in the background queue is misplaced.
    s.add(4, vec![4; 4]);
    s.waiting.retain(|&w| w != 4);
    s.waiting_background.push_back(4);
    assert!(!s.is_consistent());
}
