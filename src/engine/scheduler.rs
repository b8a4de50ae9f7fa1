//! Continuous batching: which sequences run in the next step and how many of
//! their tokens. Mirrors the v1 scheduler of vLLM
//! (`vllm/v1/core/sched/scheduler.py`, `Scheduler.schedule`):
//!
//! - one token budget per step (`max_num_batched_tokens`) shared by decodes
//!   and prefills, so both run in the same forward pass;
//! - running sequences first, in admission order: a decode takes one token, a
//!   prefill in progress the rest of its prompt up to the budget (chunked
//!   prefill);
//! - a running sequence that cannot get the KV blocks it needs preempts the
//!   most recently admitted running sequence (possibly itself): its blocks go
//!   back to the pool and it returns to the front of the queue, to be
//!   recomputed from its prompt and the tokens it already generated;
//! - then, if nothing was preempted, waiting sequences in arrival order while
//!   the budget, `max_num_seqs` and the free blocks allow.
//!
//! The scheduler only moves ids and blocks; the sequences' state lives in
//! the engine core, which it reads through `Tokens`.

use std::collections::VecDeque;

use super::blocks::BlockPool;

pub type SeqId = u64;

/// What the scheduler needs to know about a sequence.
pub trait Tokens {
    /// Tokens the sequence has (prompt + generated).
    fn total(&self, id: SeqId) -> usize;
    /// Tokens whose keys and values are in its blocks.
    fn computed(&self, id: SeqId) -> usize;
    /// Its block table.
    fn blocks(&mut self, id: SeqId) -> &mut Vec<u32>;
    /// Whether its prompt must run in one step (embedding requests).
    fn whole(&self, id: SeqId) -> bool {
        let _ = id;
        false
    }
    /// It lost its blocks and will be recomputed.
    fn preempted(&mut self, id: SeqId);
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// One step's work: (sequence, tokens to compute), running order.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub work: Vec<(SeqId, usize)>,
    pub preempted: Vec<SeqId>,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn add(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    /// Forgets `id` (finished or aborted); the caller releases its blocks.
    pub fn remove(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        self.waiting.retain(|&s| s != id);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn first_waiting(&self) -> Option<SeqId> {
        self.waiting.front().copied()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn schedule(&mut self, cfg: &SchedulerConfig, seqs: &mut dyn Tokens, pool: &mut BlockPool) -> Plan {
        let mut plan = Plan::default();
        let mut budget = cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (total, done) = (seqs.total(id), seqs.computed(id));
            let n = total.saturating_sub(done).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            loop {
                if pool.grow(seqs.blocks(id), done + n) {
                    plan.work.push((id, n));
                    budget -= n;
                    i += 1;
                    break;
                }
                // Out of blocks: preempt the newest running sequence.
                let victim = self.running.pop().expect("running holds `id`");
                pool.release(seqs.blocks(victim));
                seqs.preempted(victim);
                self.waiting.push_front(victim);
                plan.preempted.push(victim);
                self.preemptions += 1;
                if victim == id {
                    break;
                }
            }
        }
        if !plan.preempted.is_empty() {
            return plan;
        }
        while budget > 0 && self.running.len() < cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let (total, done) = (seqs.total(id), seqs.computed(id));
            let n = total.saturating_sub(done).min(budget);
            let chunked = n < total.saturating_sub(done);
            if n == 0 || (chunked && seqs.whole(id)) || !pool.grow(seqs.blocks(id), done + n) {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            plan.work.push((id, n));
            budget -= n;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Sequences as (total, computed, blocks).
    #[derive(Default)]
    struct Fake(HashMap<SeqId, (usize, usize, Vec<u32>)>);

    impl Tokens for Fake {
        fn total(&self, id: SeqId) -> usize {
            self.0[&id].0
        }
        fn computed(&self, id: SeqId) -> usize {
            self.0[&id].1
        }
        fn blocks(&mut self, id: SeqId) -> &mut Vec<u32> {
            &mut self.0.get_mut(&id).unwrap().2
        }
        fn preempted(&mut self, id: SeqId) {
            self.0.get_mut(&id).unwrap().1 = 0;
        }
    }

    impl Fake {
        /// Applies a plan: computes the planned tokens, then each sequence
        /// that finished its prefill or decoded gains one new token.
        fn run(&mut self, plan: &Plan) {
            for &(id, n) in &plan.work {
                let s = self.0.get_mut(&id).unwrap();
                s.1 += n;
                if s.1 == s.0 {
                    s.0 += 1;
                }
            }
        }
    }

    fn cfg(seqs: usize, tokens: usize) -> SchedulerConfig {
        SchedulerConfig { max_num_seqs: seqs, max_num_batched_tokens: tokens }
    }

    #[test]
    fn prefills_and_decodes_share_a_step_within_the_budget() {
        let (mut s, mut f, mut pool) = (Scheduler::default(), Fake::default(), BlockPool::new(100, 4));
        f.0.insert(1, (10, 0, vec![]));
        s.add(1);
        let p = s.schedule(&cfg(8, 16), &mut f, &mut pool);
        assert_eq!(p.work, vec![(1, 10)]);
        f.run(&p);
        f.0.insert(2, (30, 0, vec![]));
        s.add(2);
        // Seq 1 decodes (1 token), seq 2 gets the remaining 15 of the budget.
        let p = s.schedule(&cfg(8, 16), &mut f, &mut pool);
        assert_eq!(p.work, vec![(1, 1), (2, 15)]);
        f.run(&p);
        let p = s.schedule(&cfg(8, 16), &mut f, &mut pool);
        assert_eq!(p.work, vec![(1, 1), (2, 15)], "chunked prefill goes on");
        f.run(&p);
        let p = s.schedule(&cfg(8, 16), &mut f, &mut pool);
        assert_eq!(p.work, vec![(1, 1), (2, 1)], "both decode");
    }

    #[test]
    fn max_num_seqs_caps_admission() {
        let (mut s, mut f, mut pool) = (Scheduler::default(), Fake::default(), BlockPool::new(100, 4));
        for id in 0..5 {
            f.0.insert(id, (3, 0, vec![]));
            s.add(id);
        }
        let p = s.schedule(&cfg(2, 100), &mut f, &mut pool);
        assert_eq!(p.work, vec![(0, 3), (1, 3)]);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 3));
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_blocks_come_back() {
        // 4 blocks of 4 tokens; two sequences of 8 tokens fill them.
        let (mut s, mut f, mut pool) = (Scheduler::default(), Fake::default(), BlockPool::new(4, 4));
        f.0.insert(1, (8, 0, vec![]));
        f.0.insert(2, (8, 0, vec![]));
        s.add(1);
        s.add(2);
        let p = s.schedule(&cfg(8, 64), &mut f, &mut pool);
        assert_eq!(p.work, vec![(1, 8), (2, 8)]);
        f.run(&p);
        assert_eq!(pool.num_free(), 0);
        // Both need a 3rd block to decode: seq 2 (newest) is preempted.
        let p = s.schedule(&cfg(8, 64), &mut f, &mut pool);
        assert_eq!(p.work, vec![(1, 1)]);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(f.0[&2].1, 0, "preempted sequences restart");
        assert!(f.0[&2].2.is_empty(), "its blocks went back");
        f.run(&p);
        assert_eq!(s.num_waiting(), 1);
        // Seq 1 finishes: its blocks free up and seq 2 is recomputed (9 tokens).
        s.remove(1);
        pool.release(f.blocks(1));
        assert_eq!(pool.num_free(), 4);
        let p = s.schedule(&cfg(8, 64), &mut f, &mut pool);
        assert_eq!(p.work, vec![(2, 9)]);
        f.run(&p);
        s.remove(2);
        pool.release(f.blocks(2));
        assert_eq!(pool.num_free(), 4);
        assert!(s.is_idle());
        assert_eq!(s.preemptions, 1);
    }

    #[test]
    fn a_sequence_alone_that_cannot_grow_preempts_itself() {
        let (mut s, mut f, mut pool) = (Scheduler::default(), Fake::default(), BlockPool::new(2, 4));
        f.0.insert(1, (8, 0, vec![]));
        s.add(1);
        let p = s.schedule(&cfg(8, 64), &mut f, &mut pool);
        f.run(&p);
        let p = s.schedule(&cfg(8, 64), &mut f, &mut pool);
        assert_eq!(p.work, vec![]);
        assert_eq!(p.preempted, vec![1]);
        assert_eq!(pool.num_free(), 2);
        // It cannot be admitted again either: the core must fail it.
        let p = s.schedule(&cfg(8, 64), &mut f, &mut pool);
        assert_eq!(p, Plan::default());
        assert_eq!(s.num_waiting(), 1);
    }
}
