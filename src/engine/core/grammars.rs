//! Structured outputs in the engine's step: each constrained row's
//! allowed-token mask applied to its logits before sampling, the sampled
//! tokens taken by the grammars, and the next masks computed on the rayon
//! pool while the engine thread goes on with the step after.

use std::collections::HashMap;

use super::{EngineCore, SeqId};
use crate::engine::sampling::Sampled;
use crate::error::{Error, Result};
use crate::ops;
use crate::structured::Grammar;
use crate::tensor::Tensor;

/// What structured outputs have cost the engine thread so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrammarStats {
    /// Allowed-token masks computed (one per constrained row per step).
    pub masks: u64,
    /// CPU time of those masks, summed over the rayon threads.
    pub mask_cpu_s: f64,
    /// Wall time the engine thread spent on grammars: masks (while the
    /// device runs the forward pass), applying them, taking the tokens.
    pub wall_s: f64,
}

/// Grammars that computed their next mask ahead, and its CPU time.
pub(super) type Ahead = (Vec<(SeqId, Grammar)>, f64);

impl EngineCore {
    /// Sends every constrained sequence's grammar to the rayon pool to
    /// compute its next mask while this thread sends the step's events,
    /// schedules the next step and launches its forward pass (vLLM's
    /// scheduler computes its bitmasks beside the device the same way).
    /// `join_masks` takes them back.
    pub(super) fn start_masks(&mut self) {
        use rayon::prelude::*;
        self.join_masks();
        let mut items: Vec<(SeqId, Grammar)> = self
            .seqs
            .0
            .iter_mut()
            .filter(|(_, s)| s.grammar.as_ref().is_some_and(|g| !g.has_mask() && !g.finished()))
            .filter_map(|(&sid, s)| Some((sid, s.grammar.take()?)))
            .collect();
        if items.is_empty() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        rayon::spawn(move || {
            let cpu = items
                .par_iter_mut()
                .with_max_len(1)
                .map(|(_, g)| {
                    let t = std::time::Instant::now();
                    g.precompute();
                    t.elapsed().as_secs_f64()
                })
                .sum::<f64>();
            // The engine may have stopped waiting (shutting down): nothing to do then.
            let _ = tx.send((items, cpu));
        });
        self.ahead = Some(rx);
    }

    /// Whether any sequence is constrained (its grammar at home: call
    /// `join_masks` first). Unconstrained steps stop here, with nothing built.
    fn any_grammar(&self) -> bool {
        self.seqs.0.values().any(|s| s.grammar.is_some())
    }

    /// Puts the grammars `start_masks` sent out back on their sequences
    /// (those that ended meanwhile are dropped with their grammars).
    fn join_masks(&mut self) {
        let Some(rx) = self.ahead.take() else { return };
        let t0 = std::time::Instant::now();
        // llguidance catches its own panics, so the job always answers.
        let Ok((items, cpu)) = rx.recv() else { return };
        self.grammar_stats.wall_s += t0.elapsed().as_secs_f64();
        self.grammar_stats.masks += items.len() as u64;
        self.grammar_stats.mask_cpu_s += cpu;
        for (sid, g) in items {
            if let Some(s) = self.seqs.0.get_mut(&sid) {
                s.grammar = Some(g);
            }
        }
    }

    /// Moves each constrained sequence's grammar past its sampled token, all
    /// of them at once on the rayon pool (a grammar step is tens of
    /// microseconds; one after another they would lengthen every step).
    /// An EOS that ends the choice needs no step. Per sequence: whether its
    /// grammar is now finished, or why the token could not be taken.
    pub(super) fn advance_grammars(
        &mut self,
        seqs: &[SeqId],
        tokens: &[Result<Sampled>],
    ) -> HashMap<SeqId, Result<bool>> {
        use rayon::prelude::*;
        self.join_masks();
        if !self.any_grammar() {
            return HashMap::new();
        }
        let token_of: HashMap<SeqId, u32> =
            seqs.iter().zip(tokens).filter_map(|(&sid, t)| t.as_ref().ok().map(|t| (sid, t.token))).collect();
        let (eos, reqs) = (&self.cfg.eos, &self.reqs);
        let mut work: Vec<(SeqId, u32, &mut Grammar)> = self
            .seqs
            .0
            .iter_mut()
            .filter_map(|(sid, s)| {
                let tok = *token_of.get(sid)?;
                let ignore_eos = reqs.get(&s.req).is_some_and(|r| r.params.ignore_eos);
                let g = s.grammar.as_mut()?;
                (!eos.contains(&tok) || ignore_eos).then_some((*sid, tok, g))
            })
            .collect();
        if work.is_empty() {
            return HashMap::new();
        }
        let t0 = std::time::Instant::now();
        let out = work
            .par_iter_mut()
            .with_max_len(1)
            .map(|(sid, tok, g)| (*sid, g.accept(*tok).map(|()| g.finished())))
            .collect();
        self.grammar_stats.wall_s += t0.elapsed().as_secs_f64();
        out
    }

    /// Sets to -inf, in the logits' rows of constrained sequences, every
    /// token their grammar does not allow next (vLLM applies its grammar
    /// bitmask to the logits the same way, before sampling and logprobs).
    /// The masks were mostly computed ahead (`start_masks`); a sequence's
    /// first is computed here, on the rayon pool, while the device may still
    /// run the forward pass. A grammar that fails is returned as its row's
    /// error; the others go on.
    pub(super) fn apply_grammars(&mut self, seqs: &[SeqId], logits: &mut Tensor) -> Result<Vec<(usize, Error)>> {
        use rayon::prelude::*;
        self.join_masks();
        if !self.any_grammar() {
            return Ok(Vec::new());
        }
        let row_of: HashMap<SeqId, usize> = seqs.iter().enumerate().map(|(i, &sid)| (sid, i)).collect();
        let mut work: Vec<(usize, &mut Grammar)> =
            self.seqs.0.iter_mut().filter_map(|(sid, s)| Some((*row_of.get(sid)?, s.grammar.as_mut()?))).collect();
        if work.is_empty() {
            return Ok(Vec::new());
        }
        let t0 = std::time::Instant::now();
        work.sort_by_key(|w| w.0);
        let words = work[0].1.words();
        // Masks computed ahead are ready; the rest (a sequence's first) are
        // computed now, one task per row (a mask takes 20 us to a few ms by
        // the grammar's state), so idle threads steal.
        let results: Vec<(usize, Result<Vec<u32>>, Option<f64>)> = work
            .par_iter_mut()
            .with_max_len(1)
            .map(|(i, g)| {
                let ready = g.has_mask();
                let t = std::time::Instant::now();
                let m = g.allowed();
                (*i, m, (!ready).then(|| t.elapsed().as_secs_f64()))
            })
            .collect();
        let fresh: Vec<f64> = results.iter().filter_map(|r| r.2).collect();
        self.grammar_stats.masks += fresh.len() as u64;
        self.grammar_stats.mask_cpu_s += fresh.iter().sum::<f64>();
        let (mut rows, mut masks, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r, _) in results {
            match r {
                Ok(m) if m.len() == words => {
                    rows.push(i);
                    masks.extend(m);
                }
                Ok(m) => errors.push((i, Error::Shape { op: "grammar", msg: format!("{} mask words", m.len()) })),
                Err(e) => errors.push((i, e)),
            }
        }
        let applied = ops::bitmask::apply_token_bitmask(logits, &rows, &masks, words);
        self.grammar_stats.wall_s += t0.elapsed().as_secs_f64();
        applied?;
        Ok(errors)
    }

    /// Why a row had no token to give.
    pub(super) fn no_token(&self, sid: SeqId, vocab: usize) -> Error {
        match self.seqs.0.get(&sid).and_then(|s| s.grammar.as_ref()) {
            Some(g) => Error::InvalidInput(format!(
                "the {} allows no token here that the request's other settings permit \
                 (min_tokens, stop_token_ids or penalties rule out all it allows)",
                g.constraint().what()
            )),
            None => Error::Shape { op: "sample", msg: format!("every logit in a row of {vocab} is -inf or NaN") },
        }
    }
}
