//! The engine core: requests in, events out, one `step` at a time. It owns
//! the model runner (and so the device), the KV block pool, the scheduler and
//! every sequence's state; it has no threads of its own (the engine thread in
//! `engine.rs` drives it, and tests drive it directly). Mirrors vLLM v1's
//! `EngineCore` plus the output processing of its `OutputProcessor`
//! (detokenization, stop checks, finish reasons).
//!
//! A request with `n` choices becomes `n` sequences that share its prepared
//! prompt. Sequence i of a seeded request samples with seed + i, so n = 1
//! gives the seed's stream and each choice differs.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use super::blocks::BlockPool;
use super::pooling::PoolingConfig;
use super::request::{Event, FinishReason, Request, RequestId, RequestParams, StopReason, TokenLogprob, Usage};
use super::runner::{host_rows, Runner, SeqWork};
use super::sampling::{Sampled, Sampler};
use super::scheduler::{Plan, Scheduler, SchedulerConfig, SeqId, Tokens};
use crate::error::{Error, Result};
use crate::model::inputs::{MediaFeatures, PreparedInput};
use crate::ops::{self, sampling::SampleRow};
use crate::structured::Grammar;
use crate::tensor::{DType, Tensor};
use crate::text::detokenizer::{IncrementalDetokenizer, StopChecker};
use crate::text::tokenizer::Tokenizer;

struct Sequence {
    req: RequestId,
    index: usize,
    input: Arc<PreparedInput>,
    output: Vec<u32>,
    computed: usize,
    blocks: Vec<u32>,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stop: StopChecker,
    /// Media features, from the first prefill step until the prompt is in the cache.
    features: Option<MediaFeatures>,
    /// An embedding request: pooled after one whole-prompt step, never sampled.
    pool: Option<PoolingConfig>,
    /// The output's constraint and where this choice stands in it.
    grammar: Option<Grammar>,
}

impl Sequence {
    fn total(&self) -> usize {
        self.input.input_ids.len() + self.output.len()
    }
}

#[derive(Default)]
struct Seqs(HashMap<SeqId, Sequence>);

impl Tokens for Seqs {
    fn total(&self, id: SeqId) -> usize {
        self.0[&id].total()
    }
    fn computed(&self, id: SeqId) -> usize {
        self.0[&id].computed
    }
    fn blocks(&mut self, id: SeqId) -> &mut Vec<u32> {
        &mut self.0.get_mut(&id).expect("scheduled sequences exist").blocks
    }
    fn whole(&self, id: SeqId) -> bool {
        self.0[&id].pool.is_some()
    }
    fn preempted(&mut self, id: SeqId) {
        let s = self.0.get_mut(&id).expect("scheduled sequences exist");
        s.computed = 0;
        s.features = None;
    }
}

struct RequestState {
    params: RequestParams,
    sink: Sender<Event>,
    /// Choices not finished yet.
    live: Vec<SeqId>,
    usage: Usage,
}

/// What one step did (for logs, metrics and benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    pub seqs: usize,
    pub tokens: usize,
    pub sampled: usize,
    pub preempted: usize,
}

/// Engine-wide settings the core enforces.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub scheduler: SchedulerConfig,
    pub max_model_len: usize,
    /// Token ids that end a choice unless `ignore_eos` (config and tokenizer EOS).
    pub eos: Vec<u32>,
    /// Set in the embedding task: how prompts are pooled.
    pub pooling: Option<PoolingConfig>,
}

pub use grammars::GrammarStats;

mod grammars;

pub struct EngineCore {
    runner: Runner,
    tokenizer: Arc<Tokenizer>,
    cfg: CoreConfig,
    pool: BlockPool,
    sched: Scheduler,
    seqs: Seqs,
    reqs: HashMap<RequestId, RequestState>,
    next_seq: SeqId,
    grammar_stats: GrammarStats,
    /// Grammars out on the rayon pool computing their next masks, started
    /// at the end of a step (`start_masks`), back at the next (`join_masks`).
    ahead: Option<Receiver<grammars::Ahead>>,
}

impl EngineCore {
    pub fn new(runner: Runner, tokenizer: Arc<Tokenizer>, cfg: CoreConfig) -> Self {
        let pool = BlockPool::new(runner.num_blocks(), runner.block_size());
        EngineCore {
            runner,
            tokenizer,
            cfg,
            pool,
            sched: Scheduler::default(),
            seqs: Seqs::default(),
            reqs: HashMap::new(),
            next_seq: 0,
            grammar_stats: GrammarStats::default(),
            ahead: None,
        }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    pub fn num_running(&self) -> usize {
        self.sched.num_running()
    }

    pub fn num_waiting(&self) -> usize {
        self.sched.num_waiting()
    }

    pub fn num_requests(&self) -> usize {
        self.reqs.len()
    }

    pub fn grammar_stats(&self) -> GrammarStats {
        self.grammar_stats
    }

    pub fn preemptions(&self) -> u64 {
        self.sched.preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.sched.is_idle()
    }

    /// Admits a request: checks it fits the context, then queues its choices.
    pub fn add(&mut self, id: RequestId, req: Request, sink: Sender<Event>) -> Result<()> {
        check_fits(&req, self.cfg.max_model_len)?;
        if self.reqs.contains_key(&id) {
            return Err(Error::InvalidInput(format!("request id {id} is already running")));
        }
        let Request { mut input, mut params } = req;
        self.fix_rope_table(&mut input, params.max_tokens);
        // Each choice follows its own copy; the request keeps none.
        let grammar = params.grammar.take();
        let input = Arc::new(input);
        let mut live = Vec::with_capacity(params.n);
        for index in 0..params.n {
            let mut sampling = params.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
            let seq = Sequence {
                req: id,
                index,
                input: input.clone(),
                output: Vec::new(),
                computed: 0,
                blocks: Vec::new(),
                sampler: Sampler::new(sampling)?,
                detok: IncrementalDetokenizer::with_context(&input.input_ids, params.skip_special_tokens),
                stop: StopChecker::new(&params.stop),
                features: None,
                pool: None,
                grammar: grammar.clone(),
            };
            let sid = self.next_seq;
            self.next_seq += 1;
            self.seqs.0.insert(sid, seq);
            self.sched.add(sid);
            live.push(sid);
        }
        let usage = Usage { prompt_tokens: input.input_ids.len(), completion_tokens: 0 };
        self.reqs.insert(id, RequestState { params, sink, live, usage });
        Ok(())
    }

    /// Admits an embedding request: its prompt runs in one step (no chunking:
    /// `max_num_batched_tokens` bounds it) and leaves the cache at once.
    pub fn add_embed(&mut self, id: RequestId, input: PreparedInput, sink: Sender<Event>) -> Result<()> {
        let pool = self.cfg.pooling.ok_or_else(|| {
            Error::InvalidInput("this model serves text generation; embeddings need --task embedding".into())
        })?;
        check_embed_fits(input.input_ids.len(), self.cfg.max_model_len, self.cfg.scheduler.max_num_batched_tokens)?;
        if self.reqs.contains_key(&id) {
            return Err(Error::InvalidInput(format!("request id {id} is already running")));
        }
        let mut input = input;
        self.fix_rope_table(&mut input, 0);
        let input = Arc::new(input);
        let sid = self.next_seq;
        self.next_seq += 1;
        let seq = Sequence {
            req: id,
            index: 0,
            detok: IncrementalDetokenizer::new(true),
            output: Vec::new(),
            computed: 0,
            blocks: Vec::new(),
            sampler: Sampler::new(super::sampling::SamplingParams::greedy())?,
            stop: StopChecker::new::<&str>(&[]),
            features: None,
            pool: Some(pool),
            input: input.clone(),
            grammar: None,
        };
        self.seqs.0.insert(sid, seq);
        self.sched.add(sid);
        let usage = Usage { prompt_tokens: input.input_ids.len(), completion_tokens: 0 };
        let params = RequestParams { max_tokens: 1, ..Default::default() };
        self.reqs.insert(id, RequestState { params, sink, live: vec![sid], usage });
        Ok(())
    }

    /// Fixes a longrope decoder's table for a sequence of this prompt and up
    /// to `max_tokens` more (nothing for other decoders).
    fn fix_rope_table(&self, input: &mut PreparedInput, max_tokens: usize) {
        let dims = &self.runner().model.decoder().dims;
        if let Some(table) = dims.rope_table_for(input.input_ids.len() + max_tokens) {
            input.set_rope_table(table);
        }
    }

    /// Ends a request now: its blocks go back to the pool at once and its
    /// unfinished choices end with `abort`.
    pub fn abort(&mut self, id: RequestId) {
        let Some(r) = self.reqs.get(&id) else { return };
        for sid in r.live.clone() {
            let index = self.seqs.0.get(&sid).map_or(0, |s| s.index);
            self.send(id, Event::Finished { index, reason: FinishReason::Abort, stop_reason: None });
            self.drop_seq(sid);
        }
        if let Some(r) = self.reqs.remove(&id) {
            let _ = r.sink.send(Event::Done { usage: r.usage });
        }
    }

    /// Fails a request with a message for its caller and frees everything it held.
    pub fn fail(&mut self, id: RequestId, message: String) {
        if let Some(r) = self.reqs.remove(&id) {
            for sid in r.live {
                self.drop_seq(sid);
            }
            let _ = r.sink.send(Event::Error { message });
        }
    }

    /// Fails every request (the device is gone, the engine is stopping).
    pub fn fail_all(&mut self, message: &str) {
        let ids: Vec<RequestId> = self.reqs.keys().copied().collect();
        for id in ids {
            self.fail(id, message.to_owned());
        }
    }

    fn drop_seq(&mut self, sid: SeqId) {
        self.sched.remove(sid);
        if let Some(mut s) = self.seqs.0.remove(&sid) {
            self.pool.release(&mut s.blocks);
        }
    }

    /// Sends to a request's caller; a caller that went away aborts it later.
    fn send(&self, id: RequestId, ev: Event) -> bool {
        self.reqs.get(&id).is_some_and(|r| r.sink.send(ev).is_ok())
    }

    /// Schedules and runs one forward pass, samples, and sends the events.
    pub fn step(&mut self) -> Result<StepStats> {
        let Plan { work, preempted } = self.sched.schedule(&self.cfg.scheduler, &mut self.seqs, &mut self.pool);
        let mut stats = StepStats { preempted: preempted.len(), ..Default::default() };
        if work.is_empty() {
            // Nothing runs and the head of the queue cannot get its blocks
            // even from an empty pool: it never will.
            if self.sched.num_running() == 0 {
                if let Some(req) = self.first_waiting_request() {
                    self.fail(req, "the request needs more KV cache than the engine has".into());
                }
            }
            return Ok(stats);
        }
        // Media features for prefills that need them; a failure fails its request only.
        let mut work = work;
        for &(sid, _) in &work {
            let Some(s) = self.seqs.0.get(&sid) else { continue };
            if s.features.is_some() || s.computed >= s.input.input_ids.len() || !s.input.has_media() {
                continue;
            }
            match self.runner.encode(&s.input) {
                Ok(f) => self.seqs.0.get_mut(&sid).expect("present").features = Some(f),
                Err(e) => {
                    let req = s.req;
                    self.fail(req, format!("could not encode the request's media: {e}"));
                }
            }
        }
        work.retain(|(sid, _)| self.seqs.0.contains_key(sid));
        if work.is_empty() {
            return Ok(stats);
        }
        let finishing = |sid: &SeqId, n: usize| self.seqs.0[sid].computed + n == self.seqs.0[sid].total();
        let pooling = |sid: &SeqId| self.seqs.0[sid].pool.is_some();
        let sampled: Vec<SeqId> =
            work.iter().filter(|&&(sid, n)| finishing(&sid, n) && !pooling(&sid)).map(|w| w.0).collect();
        let pooled: Vec<SeqId> =
            work.iter().filter(|&&(sid, n)| finishing(&sid, n) && pooling(&sid)).map(|w| w.0).collect();
        let logits = {
            let items: Vec<SeqWork> = work
                .iter()
                .map(|&(sid, n)| {
                    let s = &self.seqs.0[&sid];
                    SeqWork {
                        input: &s.input,
                        output: &s.output,
                        blocks: &s.blocks,
                        past: s.computed,
                        new: n,
                        features: s.features.as_ref(),
                        sample: s.computed + n == s.total() && s.pool.is_none(),
                        pool: s.pool.filter(|_| s.computed + n == s.total()).map(|p| p.pooling),
                    }
                })
                .collect();
            self.runner.forward(&items)
        };
        let out = match logits {
            Ok(l) => l,
            Err(e) => {
                let reqs: Vec<RequestId> = work.iter().map(|(sid, _)| self.seqs.0[sid].req).collect();
                for r in reqs {
                    self.fail(r, format!("internal error while running the model: {e}"));
                }
                return Err(e);
            }
        };
        stats.seqs = work.len();
        for &(sid, n) in &work {
            stats.tokens += n;
            let s = self.seqs.0.get_mut(&sid).expect("present");
            s.computed += n;
            if s.computed >= s.input.input_ids.len() {
                s.features = None;
            }
        }
        for (sid, rows) in pooled.into_iter().zip(out.pooled) {
            let s = &self.seqs.0[&sid];
            let values = s.pool.expect("pooled sequences pool").pool(&rows, self.runner.model.decoder().dims.hidden);
            let req = s.req;
            self.send(req, Event::Embedding { values });
            self.drop_seq(sid);
            if let Some(r) = self.reqs.remove(&req) {
                let _ = r.sink.send(Event::Done { usage: r.usage });
            }
        }
        let Some(logits) = out.logits else { return Ok(stats) };
        stats.sampled = sampled.len();
        let tokens = match self.sample(&sampled, logits) {
            Ok(t) => t,
            Err(e) => {
                // The logits could not be read back: nothing of this step can be trusted.
                for sid in &sampled {
                    if let Some(req) = self.seqs.0.get(sid).map(|s| s.req) {
                        self.fail(req, format!("internal error while sampling: {e}"));
                    }
                }
                return Err(e);
            }
        };
        let mut advanced = self.advance_grammars(&sampled, &tokens);
        for (sid, sample) in sampled.into_iter().zip(tokens) {
            // A sequence whose request failed earlier in this loop is gone.
            let Some(req) = self.seqs.0.get(&sid).map(|s| s.req) else { continue };
            let grammar = advanced.remove(&sid).unwrap_or(Ok(false));
            if let Err(e) = sample.and_then(|smp| grammar.and_then(|done| self.emit(sid, smp, done))) {
                self.fail(req, format!("could not continue the request: {e}"));
            }
        }
        self.start_masks();
        Ok(stats)
    }

    fn first_waiting_request(&self) -> Option<RequestId> {
        self.sched.first_waiting().and_then(|sid| self.seqs.0.get(&sid)).map(|s| s.req)
    }

    /// The next token of each sampled sequence (row i of `logits` is `seqs[i]`).
    /// Rows that want logprobs download their logits to the CPU sampler (raw
    /// logprobs need the whole distribution on the host). Every other row goes
    /// through `ops::sampling::sample` on the logits' device in one call: on
    /// the GPU one launch and one download of the token ids, the host only
    /// drawing each row's uniform from its request's stream, so seeded
    /// streams are the same on both backends.
    /// A row's own failure (every logit NaN, say) fails only its request.
    fn sample(&mut self, seqs: &[SeqId], mut logits: Tensor) -> Result<Vec<Result<Sampled>>> {
        let vocab = logits.shape()[1];
        let mask_errors = self.apply_grammars(seqs, &mut logits)?;
        let on_host: Vec<bool> = seqs.iter().map(|sid| self.seqs.0[sid].sampler.params().logprobs.is_some()).collect();
        let host: Vec<usize> = (0..seqs.len()).filter(|&i| on_host[i]).collect();
        let device: Vec<usize> = (0..seqs.len()).filter(|&i| !on_host[i]).collect();
        // Downloaded before the op below edits its rows in place.
        let mut host_logits = if host.is_empty() { Vec::new() } else { host_rows(&logits, &host)? }.into_iter();
        let mut tokens = Vec::new();
        if !device.is_empty() {
            let mut u = Vec::with_capacity(device.len());
            for &i in &device {
                let sampler = &mut self.seqs.0.get_mut(&seqs[i]).expect("present").sampler;
                u.push(if sampler.params().is_greedy() { 0.0 } else { sampler.next_uniform() });
            }
            let rows: Vec<SampleRow> = device
                .iter()
                .zip(u)
                .map(|(&i, u)| {
                    let s = &self.seqs.0[&seqs[i]];
                    SampleRow {
                        row: i,
                        params: s.sampler.params(),
                        u,
                        prompt: &s.input.input_ids,
                        output: &s.output,
                        banned: self.banned(s),
                    }
                })
                .collect();
            let mut out = Tensor::empty(&logits.device(), &[rows.len()], DType::I32)?;
            ops::sampling::sample(&mut out, &mut logits, &rows)?;
            tokens = out.to_i32_vec()?;
        }
        let mut tokens = tokens.into_iter();
        let mut out = Vec::with_capacity(seqs.len());
        for (i, sid) in seqs.iter().enumerate() {
            if !on_host[i] {
                let t = tokens.next().expect("one token per device row");
                out.push(if t == ops::sampling::NO_TOKEN {
                    Err(self.no_token(*sid, vocab))
                } else {
                    Ok(Sampled { token: t as u32, logprob: 0.0, top: Vec::new() })
                });
                continue;
            }
            let mut row = host_logits.next().expect("one row per host sequence");
            for t in self.banned(&self.seqs.0[sid]) {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            let s = self.seqs.0.get_mut(sid).expect("present");
            out.push(s.sampler.sample(&mut row, &s.input.input_ids, &s.output));
        }
        // A row whose grammar failed was sampled unconstrained: its token is void.
        for (i, e) in mask_errors {
            out[i] = Err(e);
        }
        Ok(out)
    }

    /// vLLM's min_tokens processor: no EOS or stop id before min_tokens.
    /// The ids to set to -inf in the sequence's row (ids past the vocabulary
    /// are skipped where they are applied).
    fn banned(&self, s: &Sequence) -> Vec<u32> {
        let p = &self.reqs[&s.req].params;
        if s.output.len() >= p.min_tokens {
            return Vec::new();
        }
        self.cfg.eos.iter().chain(&p.stop_token_ids).copied().collect()
    }

    /// Appends a sampled token to its sequence, checks the stop conditions in
    /// vLLM's order (min_tokens, EOS, stop ids, stop strings, length; a
    /// finished grammar, `grammar_done`, before length), and sends the delta
    /// and any finish.
    fn emit(&mut self, sid: SeqId, sample: Sampled, grammar_done: bool) -> Result<()> {
        let tok = sample.token;
        let s = self.seqs.0.get_mut(&sid).expect("present");
        let r = self.reqs.get_mut(&s.req).expect("a sequence's request exists");
        let p = &r.params;
        s.output.push(tok);
        r.usage.completion_tokens += 1;
        let n_out = s.output.len();
        let may_stop = n_out >= p.min_tokens;
        let is_eos = self.cfg.eos.contains(&tok);
        let mut finish = None;
        if may_stop && !p.ignore_eos && is_eos {
            finish = Some((FinishReason::Stop, None));
        } else if may_stop && p.stop_token_ids.contains(&tok) {
            finish = Some((FinishReason::Stop, Some(StopReason::Token(tok))));
        }
        let mut text = String::new();
        if finish.is_none() {
            let piece = s.detok.push(&self.tokenizer, tok)?;
            if may_stop {
                let (released, stopped) = s.stop.push(&piece);
                text = released;
                if stopped {
                    let m = s.stop.matched().unwrap_or_default().to_owned();
                    finish = Some((FinishReason::Stop, Some(StopReason::String(m))));
                }
            } else {
                text = piece;
            }
        }
        if finish.is_none() && grammar_done {
            // The constrained output is complete: nothing else could follow.
            finish = Some((FinishReason::Stop, None));
        }
        if finish.is_none() && (n_out >= p.max_tokens || s.total() >= self.cfg.max_model_len) {
            finish = Some((FinishReason::Length, None));
        }
        // Finished other than by a stop string: flush what the detokenizer and
        // the stop check still hold (a stop string may still complete in it).
        if finish.as_ref().is_some_and(|(_, r)| !matches!(r, Some(StopReason::String(_)))) {
            let tail = std::mem::replace(&mut s.detok, IncrementalDetokenizer::new(true)).finish(&self.tokenizer)?;
            let mut stop = std::mem::replace(&mut s.stop, StopChecker::new::<&str>(&[]));
            let (released, stopped) = stop.push(&tail);
            text.push_str(&released);
            if stopped {
                let m = stop.matched().unwrap_or_default().to_owned();
                finish = Some((FinishReason::Stop, Some(StopReason::String(m))));
            } else {
                text.push_str(&stop.finish());
            }
        }
        let logprobs = if p.sampling.logprobs.is_some() {
            vec![TokenLogprob { token: tok, logprob: sample.logprob, top: sample.top }]
        } else {
            Vec::new()
        };
        let (req, index) = (s.req, s.index);
        let mut alive = self.send(req, Event::Delta { index, text, token_ids: vec![tok], logprobs });
        if let Some((reason, stop_reason)) = finish {
            alive &= self.send(req, Event::Finished { index, reason, stop_reason });
            self.drop_seq(sid);
            let r = self.reqs.get_mut(&req).expect("present");
            r.live.retain(|&x| x != sid);
            if r.live.is_empty() {
                let r = self.reqs.remove(&req).expect("present");
                let _ = r.sink.send(Event::Done { usage: r.usage });
                return Ok(());
            }
        }
        if !alive {
            self.abort(req);
        }
        Ok(())
    }
}

/// An embedding prompt must fit the context and one step's token budget.
pub fn check_embed_fits(prompt: usize, max_model_len: usize, max_num_batched_tokens: usize) -> Result<()> {
    if prompt == 0 {
        return Err(Error::InvalidInput("the input is empty".into()));
    }
    let limit = max_model_len.min(max_num_batched_tokens);
    if prompt > limit {
        return Err(Error::InvalidInput(format!(
            "this model's maximum context length for embeddings is {limit} tokens, but the input has {prompt} \
             (counting image tokens); shorten it or send smaller images"
        )));
    }
    Ok(())
}

/// The vLLM context check: prompt plus max_tokens within max_model_len.
pub fn check_fits(req: &Request, max_model_len: usize) -> Result<()> {
    req.params.validate()?;
    let prompt = req.input.input_ids.len();
    if prompt == 0 {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    if prompt + req.params.max_tokens > max_model_len {
        return Err(Error::InvalidInput(format!(
            "this model's maximum context length is {max_model_len} tokens, but {} were requested \
             ({prompt} in the prompt, counting image tokens, and {} for the completion); \
             shorten the prompt, send fewer or smaller images, or lower max_tokens",
            prompt + req.params.max_tokens,
            req.params.max_tokens
        )));
    }
    Ok(())
}
