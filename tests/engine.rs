//! The serving engine on the CPU backend, on the built-in tiny Qwen2-VL:
//! continuous batching must not change what a request gets (each row is
//! computed the same way whatever the batch), KV blocks always come back,
//! and the OpenAI/vLLM output rules hold (stop strings, stop ids,
//! min_tokens, n, logprobs, abort).
//!
//! The engine core is driven step by step here, so the batch composition is
//! under the test's control; the last tests go through the engine thread.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};

use kestrel::engine::core::{EngineCore, StepStats};
use kestrel::engine::engine::load;
use kestrel::engine::request::{Collector, FinishReason, StopReason};
use kestrel::engine::sampling::SamplingParams;
use kestrel::engine::{Engine, EngineConfig, Event, Frontend, Request, RequestOutput, RequestParams};
use kestrel::model::qwen2_vl::inputs::{Media, PreparedInput};
use kestrel::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/builtin/tiny-qwen2-vl")
}

fn config() -> EngineConfig {
    EngineConfig { model_dir: model_dir(), device: "cpu".into(), ..Default::default() }
}

fn image(name: &str) -> Media {
    let bytes =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2-vl/golden").join(name))
            .unwrap();
    Media::Image(decode_rgb8(&bytes, DEFAULT_MAX_PIXELS).unwrap())
}

/// A chat prompt of `words` words with `images` images before the text.
fn prompt(fe: &Frontend, words: usize, images: &[&str]) -> PreparedInput {
    let mut content: Vec<serde_json::Value> = images.iter().map(|_| serde_json::json!({"type": "image"})).collect();
    let text: Vec<String> =
        (0..words).map(|i| ["look", "at", "the", "red", "cat", "and", "sky"][i % 7].into()).collect();
    content.push(serde_json::json!({"type": "text", "text": text.join(" ")}));
    let media: Vec<Media> = images.iter().map(|n| image(n)).collect();
    fe.prepare_chat(&serde_json::json!([{"role": "user", "content": content}]), &media).unwrap()
}

fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams { sampling: SamplingParams::greedy(), max_tokens, ignore_eos: true, ..Default::default() }
}

/// Steps the core until every receiver's stream has ended; returns the
/// outputs in order and every step's stats.
fn run_all(core: &mut EngineCore, reqs: Vec<(u64, Request)>) -> (Vec<RequestOutput>, Vec<StepStats>) {
    let mut streams: Vec<(Collector, Receiver<Event>, bool)> = Vec::new();
    for (id, r) in reqs {
        let (tx, rx) = mpsc::channel();
        let c = Collector::new(&r.params);
        core.add(id, r, tx).unwrap();
        streams.push((c, rx, false));
    }
    let mut steps = Vec::new();
    while core.has_work() {
        steps.push(core.step().unwrap());
        drain(&mut streams);
    }
    drain(&mut streams);
    assert!(streams.iter().all(|s| s.2), "every stream ended");
    (streams.into_iter().map(|(c, _, _)| c.finish().unwrap()).collect(), steps)
}

fn drain(streams: &mut [(Collector, Receiver<Event>, bool)]) {
    for (c, rx, done) in streams.iter_mut() {
        while let Ok(ev) = rx.try_recv() {
            assert!(!*done, "no event after Done");
            *done |= c.push(ev);
        }
    }
}

/// 16 requests of mixed lengths, with no, one and two images.
fn mixed_batch(fe: &Frontend) -> Vec<Request> {
    let imgs: [&[&str]; 4] = [&[], &["one_image_img0.png"], &[], &["two_images_img0.png", "two_images_img1.png"]];
    (0..16)
        .map(|i| Request { input: prompt(fe, 1 + 5 * i % 23, imgs[i % 4]), params: greedy(4 + (i * 7) % 13) })
        .collect()
}

#[test]
fn greedy_output_is_bit_identical_alone_and_in_a_batch_of_16() {
    let (fe, mut core) = load(&config()).unwrap();
    let alone: Vec<RequestOutput> = mixed_batch(&fe)
        .into_iter()
        .enumerate()
        .map(|(i, r)| run_all(&mut core, vec![(i as u64, r)]).0.remove(0))
        .collect();
    // All at once, with a small token budget so prefills are chunked and
    // share steps with other sequences' decodes.
    let small = EngineConfig { max_num_batched_tokens: 40, ..config() };
    let (_, mut batched_core) = load(&small).unwrap();
    let reqs = mixed_batch(&fe).into_iter().enumerate().map(|(i, r)| (i as u64, r)).collect();
    let (batched, steps) = run_all(&mut batched_core, reqs);
    assert!(
        steps.iter().any(|s| s.seqs >= 8 && s.tokens > s.seqs),
        "some step must mix prefill chunks with decodes: {steps:?}"
    );
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids, "request {i}");
        assert_eq!(a.choices[0].text, b.choices[0].text, "request {i}");
        assert_eq!(a.choices[0].token_ids.len(), 4 + (i * 7) % 13, "request {i} ran to max_tokens");
        assert_eq!(a.choices[0].finish_reason, FinishReason::Length);
    }
    // And the engine's greedy path is the model's own greedy decoding.
    let r = &mixed_batch(&fe)[3];
    let model = core.runner().model.as_ref();
    let direct = kestrel::model::seq::generate_greedy(model, &r.input, r.params.max_tokens, &[]).unwrap();
    assert_eq!(direct, alone[3].choices[0].token_ids);
    assert_eq!(batched_core.pool().num_free(), batched_core.pool().num_blocks());
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let (fe, mut core) = load(&config()).unwrap();
    let sampled = |seed: Option<u64>, words: usize| RequestParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 100,
            min_p: 0.01,
            repetition_penalty: 1.1,
            presence_penalty: 0.2,
            frequency_penalty: 0.1,
            seed,
            ..Default::default()
        },
        max_tokens: 6 + words % 5,
        ignore_eos: true,
        ..Default::default()
    };
    let seeded = |i: usize| Request {
        input: prompt(&fe, 3 + i, if i.is_multiple_of(2) { &["one_image_img0.png"] } else { &[] }),
        params: sampled(Some(1000 + i as u64), i),
    };
    let alone: Vec<Vec<u32>> = (0..4)
        .map(|i| run_all(&mut core, vec![(i as u64, seeded(i))]).0.remove(0).choices.remove(0).token_ids)
        .collect();
    // The same four among twelve unseeded neighbours, in another order.
    let (mut reqs, mut at) = (Vec::new(), [0usize; 4]);
    for i in 0..12 {
        reqs.push((100 + i as u64, Request { input: prompt(&fe, 2 + 3 * i, &[]), params: sampled(None, i) }));
        if i % 3 == 0 {
            let k = 3 - i / 3;
            at[k] = reqs.len();
            reqs.push((k as u64, seeded(k)));
        }
    }
    let (outs, _) = run_all(&mut core, reqs);
    for (k, a) in alone.iter().enumerate() {
        assert_eq!(&outs[at[k]].choices[0].token_ids, a, "seeded request {k}");
    }
    // A different seed gives another stream (the seed is used at all).
    let other = Request { input: seeded(0).input, params: sampled(Some(7), 0) };
    let o = run_all(&mut core, vec![(50, other)]).0.remove(0);
    assert_ne!(o.choices[0].token_ids, alone[0]);
}

#[test]
fn kv_blocks_return_after_finishes_aborts_and_preemptions() {
    let (fe, probe) = load(&config()).unwrap();
    let per_block = probe.runner().bytes_per_block();
    drop(probe);
    // 24 blocks of 16 tokens: a few requests at a time, so decodes preempt.
    let tight = EngineConfig { cpu_kv_cache_bytes: 24 * per_block, max_model_len: Some(200), ..config() };
    let (_, mut core) = load(&tight).unwrap();
    assert_eq!(core.pool().num_blocks(), 24);
    let make = |i: usize| Request {
        input: prompt(&fe, 20 + 9 * (i % 5), if i.is_multiple_of(3) { &["one_image_img0.png"] } else { &[] }),
        params: greedy(30 + 5 * (i % 4)),
    };
    // Reference outputs, one request at a time (no preemption).
    let (_, mut roomy) = load(&config()).unwrap();
    let reference: Vec<Vec<u32>> = (0..10)
        .map(|i| run_all(&mut roomy, vec![(i as u64, make(i))]).0.remove(0).choices.remove(0).token_ids)
        .collect();

    let mut streams = Vec::new();
    for i in 0..10 {
        let (tx, rx) = mpsc::channel();
        let r = make(i);
        let c = Collector::new(&r.params);
        core.add(i as u64, r, tx).unwrap();
        streams.push((c, rx, false));
    }
    let mut step = 0;
    while core.has_work() {
        core.step().unwrap();
        step += 1;
        if step == 7 {
            core.abort(4); // mid-decode or mid-prefill, whichever it is
            core.abort(8); // probably still waiting
        }
        drain(&mut streams);
        assert!(core.pool().num_free() <= core.pool().num_blocks());
    }
    drain(&mut streams);
    assert!(core.preemptions() > 0, "the tight cache must have forced preemption");
    assert_eq!(core.pool().num_free(), core.pool().num_blocks(), "every block came back");
    assert_eq!(core.num_requests(), 0);
    for (i, (c, _, done)) in streams.into_iter().enumerate() {
        assert!(done, "request {i} ended");
        let out = c.finish().unwrap();
        if i == 4 || i == 8 {
            assert_eq!(out.choices[0].finish_reason, FinishReason::Abort, "request {i}");
            assert!(reference[i].starts_with(&out.choices[0].token_ids), "request {i}: aborted output is a prefix");
        } else {
            // Recomputed after preemption, the answer is unchanged.
            assert_eq!(out.choices[0].token_ids, reference[i], "request {i}");
        }
    }
}

#[test]
fn stop_strings_spanning_tokens_end_the_output_before_them() {
    let (fe, mut core) = load(&config()).unwrap();
    let input = || prompt(&fe, 9, &["one_image_img0.png"]);
    let full = run_all(&mut core, vec![(0, Request { input: input(), params: greedy(40) })]).0.remove(0);
    let ids = &full.choices[0].token_ids;
    let text = &full.choices[0].text;
    assert_eq!(text, &fe.tokenizer.decode(ids, true).unwrap(), "the streamed text is the decode of the ids");
    // A stop string made of the last character of token k's text and the
    // first of token k+1's, k chosen where both tokens decode to text.
    let pieces: Vec<String> = ids.iter().map(|&t| fe.tokenizer.decode(&[t], true).unwrap()).collect();
    let k = (4..ids.len() - 1)
        .find(|&k| {
            let (a, b) = (&pieces[k], &pieces[k + 1]);
            !a.is_empty() && !b.is_empty() && !a.contains('\u{FFFD}') && !b.contains('\u{FFFD}')
        })
        .expect("two adjacent text tokens");
    let stop: String = pieces[k].chars().last().into_iter().chain(pieces[k + 1].chars().next()).collect();
    let at = text.find(&stop).expect("the stop string is in the text");
    let params = RequestParams { stop: vec!["never-there".into(), stop.clone()], ..greedy(40) };
    let (tx, rx) = mpsc::channel();
    core.add(1, Request { input: input(), params }, tx).unwrap();
    while core.has_work() {
        core.step().unwrap();
    }
    let events: Vec<Event> = rx.try_iter().collect();
    let mut streamed = String::new();
    for ev in &events {
        if let Event::Delta { text, .. } = ev {
            streamed.push_str(text);
            assert!(text.is_char_boundary(text.len()));
            assert!(!streamed.contains(&stop), "the stop string never leaks into a chunk");
        }
    }
    assert_eq!(streamed, text[..at]);
    let fin = events.iter().find_map(|e| match e {
        Event::Finished { reason, stop_reason, .. } => Some((*reason, stop_reason.clone())),
        _ => None,
    });
    assert_eq!(fin, Some((FinishReason::Stop, Some(StopReason::String(stop)))));
}

#[test]
fn multibyte_text_is_whole_characters_and_stops_cut_on_boundaries() {
    // Random sampling on the tiny byte-level vocabulary produces multi-byte
    // and incomplete UTF-8 sequences; streamed text must still be whole
    // characters, equal to the decode of the ids, and a non-ASCII stop
    // string must cut there.
    let (fe, mut core) = load(&config()).unwrap();
    let params = |seed, stop: Vec<String>| RequestParams {
        sampling: SamplingParams { temperature: 1.5, seed: Some(seed), ..Default::default() },
        max_tokens: 48,
        ignore_eos: true,
        stop,
        ..Default::default()
    };
    let mut checked = 0;
    for seed in 0..12u64 {
        let out =
            run_all(&mut core, vec![(seed, Request { input: prompt(&fe, 5, &[]), params: params(seed, vec![]) })])
                .0
                .remove(0);
        let c = &out.choices[0];
        assert_eq!(c.text, fe.tokenizer.decode(&c.token_ids, true).unwrap(), "seed {seed}");
        // The first non-ASCII character, where it first occurs (not at the start).
        let Some((at, ch)) =
            c.text.char_indices().find(|&(i, ch)| !ch.is_ascii() && c.text.find(ch) == Some(i) && i > 0)
        else {
            continue;
        };
        let stop = ch.to_string();
        let again = run_all(
            &mut core,
            vec![(100 + seed, Request { input: prompt(&fe, 5, &[]), params: params(seed, vec![stop.clone()]) })],
        )
        .0
        .remove(0);
        assert_eq!(again.choices[0].text, c.text[..at], "seed {seed}: cut before {stop:?}");
        assert_eq!(again.choices[0].stop_reason, Some(StopReason::String(stop)));
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} samples had non-ASCII text");
}

#[test]
fn stop_ids_min_tokens_n_and_logprobs() {
    let (fe, mut core) = load(&config()).unwrap();
    let input = || prompt(&fe, 7, &[]);
    let first = run_all(&mut core, vec![(0, Request { input: input(), params: greedy(8) })]).0.remove(0);
    let t0 = first.choices[0].token_ids[0];
    // A stop id ends the choice with that id kept and no text for it.
    let p = RequestParams { stop_token_ids: vec![t0], ..greedy(8) };
    let out = run_all(&mut core, vec![(1, Request { input: input(), params: p })]).0.remove(0);
    assert_eq!(out.choices[0].token_ids, vec![t0]);
    assert_eq!(out.choices[0].text, "");
    assert_eq!(out.choices[0].stop_reason, Some(StopReason::Token(t0)));
    // Before min_tokens the stop id cannot be sampled at all.
    let p = RequestParams { stop_token_ids: vec![t0], min_tokens: 3, ..greedy(8) };
    let out = run_all(&mut core, vec![(2, Request { input: input(), params: p })]).0.remove(0);
    assert!(out.choices[0].token_ids.len() >= 3);
    assert!(!out.choices[0].token_ids[..3].contains(&t0));
    // n = 3 seeded choices: three streams, usage counts them all.
    let p = RequestParams {
        n: 3,
        sampling: SamplingParams { temperature: 1.0, seed: Some(5), logprobs: Some(3), ..Default::default() },
        ..greedy(6)
    };
    let out = run_all(&mut core, vec![(3, Request { input: input(), params: p })]).0.remove(0);
    assert_eq!(out.choices.len(), 3);
    assert_eq!(out.usage.completion_tokens, 18);
    assert_eq!(out.usage.prompt_tokens, input().input_ids.len());
    assert!(
        out.choices[0].token_ids != out.choices[1].token_ids || out.choices[1].token_ids != out.choices[2].token_ids
    );
    for c in &out.choices {
        let lps = c.logprobs.as_ref().unwrap();
        assert_eq!(lps.len(), 6);
        for (lp, &t) in lps.iter().zip(&c.token_ids) {
            assert_eq!(lp.token, t);
            assert!(lp.logprob <= 0.0);
            assert_eq!(lp.top.len(), 3);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "top logprobs sorted");
            assert!(lp.logprob <= lp.top[0].1 + 1e-6);
        }
    }
}

#[test]
fn precomputed_image_embeddings_give_the_same_answer_as_pixels() {
    let (fe, mut core) = load(&config()).unwrap();
    let px = prompt(&fe, 7, &["one_image_img0.png"]);
    let feats = core.runner().model.encode_media(&px, &mut |_, _| {}).unwrap().image.unwrap();
    let values = feats.to_f32_vec().unwrap();
    let grid = px.images.grids[0];
    let messages = serde_json::json!([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "look at the red cat and sky"}]}]);
    let embeds = fe.prepare_chat(&messages, &[Media::ImageEmbeds { values, grid }]).unwrap();
    assert_eq!(embeds.input_ids, px.input_ids);
    assert_eq!(embeds.positions, px.positions);
    let a = run_all(&mut core, vec![(0, Request { input: px, params: greedy(10) })]).0.remove(0);
    let b = run_all(&mut core, vec![(1, Request { input: embeds, params: greedy(10) })]).0.remove(0);
    assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids);
    // Wrong shapes are the user's error.
    let e = fe.prepare_chat(&messages, &[Media::ImageEmbeds { values: vec![0.0; 7], grid }]).err().unwrap();
    assert!(e.to_string().contains("image_embeds for grid"), "{e}");
}

#[test]
fn the_engine_thread_serves_batches_aborts_and_refuses_what_cannot_fit() {
    let engine = Engine::start(EngineConfig { max_model_len: Some(256), ..config() }).unwrap();
    let fe = engine.frontend().clone();
    assert_eq!(fe.max_model_len, 256);
    let reqs: Vec<Request> = (0..5)
        .map(|i| Request { input: prompt(&fe, 3 + 4 * i, &["one_image_img0.png"]), params: greedy(5 + i) })
        .collect();
    let outs = engine.generate(reqs);
    for (i, o) in outs.iter().enumerate() {
        let o = o.as_ref().unwrap();
        assert_eq!(o.choices[0].token_ids.len(), 5 + i);
        assert_eq!(o.usage.completion_tokens, 5 + i);
    }
    // Too long: refused at submit, naming both numbers.
    let long = Request { input: prompt(&fe, 20, &[]), params: greedy(250) };
    let e = engine.submit(long).err().unwrap().to_string();
    assert!(e.contains("256") && e.contains("250"), "{e}");
    // Abort: the stream ends with finish_reason abort and the blocks come back.
    let (id, rx) = engine.submit(Request { input: prompt(&fe, 5, &[]), params: greedy(200) }).unwrap();
    let first = rx.recv().unwrap();
    assert!(matches!(first, Event::Delta { .. }), "{first:?}");
    engine.abort(id);
    let rest: Vec<Event> = rx.iter().collect();
    assert!(rest.iter().any(|e| matches!(e, Event::Finished { reason: FinishReason::Abort, .. })), "{rest:?}");
    assert!(matches!(rest.last(), Some(Event::Done { .. })));
    let s = settled(&engine, fe.num_blocks);
    assert_eq!(s.free_blocks, fe.num_blocks, "{s:?}");
}

/// The engine's stats once every block is free again (they are refreshed
/// after each step, a moment after the last event is sent), or after 2 s.
fn settled(engine: &Engine, blocks: usize) -> kestrel::engine::EngineStats {
    let mut s = engine.stats();
    for _ in 0..200 {
        if s.running == 0 && s.waiting == 0 && s.free_blocks == blocks {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        s = engine.stats();
    }
    s
}

#[test]
fn the_embedding_task_embeds_batches_and_refuses_generation() {
    use kestrel::engine::Task;
    let cfg = EngineConfig { task: Task::Embed, max_num_batched_tokens: 64, ..config() };
    let engine = Engine::start(cfg).unwrap();
    let fe = engine.frontend().clone();
    let inputs: Vec<PreparedInput> = (0..6).map(|i| prompt(&fe, 2 + i, &[])).collect();
    let alone = engine.embed(vec![prompt(&fe, 4, &[])]).remove(0).unwrap();
    let outs = engine.embed(inputs);
    for (i, o) in outs.iter().enumerate() {
        let v = o.as_ref().unwrap();
        assert_eq!(v.len(), fe.spec().hidden_size());
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "request {i}: norm {norm}");
    }
    assert_eq!(outs[2].as_ref().unwrap(), &alone, "batched embedding equals the one alone");
    assert_ne!(outs[0].as_ref().unwrap(), &alone);
    // Longer than one step's budget: refused with both numbers.
    let e = engine.embed(vec![prompt(&fe, 80, &[])]).remove(0).unwrap_err().to_string();
    assert!(e.contains("64") && e.contains("input has"), "{e}");
    let e = engine.submit(Request { input: prompt(&fe, 3, &[]), params: greedy(2) }).err().unwrap().to_string();
    assert!(e.contains("embedding task"), "{e}");
    assert_eq!(settled(&engine, fe.num_blocks).free_blocks, fe.num_blocks);
}
