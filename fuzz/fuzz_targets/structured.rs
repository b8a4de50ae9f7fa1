//! Output constraints and tool calls from what a client sends: the body's
//! constraint fields and tools (parsed and validated as chat requests do),
//! the constraint compiled by llguidance over the tiny model's tokenizer
//! and followed for a few tokens (the lowest allowed id each step), GBNF
//! converted, and the input read as a model answer by the Hermes parsers,
//! whole and streamed. Every error must be the client's (4xx); nothing may
//! panic; whole and streamed answers must agree.
#![no_main]

use std::sync::{Arc, OnceLock};

use kestrel::openai::tools::{parse_hermes, parse_tool_choice, parse_tools, ToolMode, ToolStream};
use kestrel::structured::{gbnf, Constraint, ConstraintFields, Grammars};
use kestrel::text::tokenizer::Tokenizer;
use kestrel_fuzz::user_ok;
use libfuzzer_sys::fuzz_target;

/// The engine's grammar compiler for the tiny model (494 logits; EOS 480, 482).
fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/model/builtin/tiny-qwen2-vl");
        let tok = Tokenizer::from_dir(&dir).expect("the fuzz fixture's tokenizer");
        Grammars::new(Arc::new(tok), 494, &[480, 482])
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    answer(text);
    if gbnf::is_gbnf(text) {
        let _ = gbnf::gbnf_to_lark(text);
    }
    follow(&Constraint::Grammar(text.to_owned()));
    follow(&Constraint::Regex(text.to_owned()));
    let Ok(body) = serde_json::from_str::<serde_json::Value>(text) else { return };
    if let Ok(fields) = serde_json::from_value::<ConstraintFields>(body.clone()) {
        if let Some(Some(c)) = user_ok(fields.constraint(), "constraint") {
            follow(&c);
        }
    }
    if let Some(tools) = user_ok(parse_tools(body.get("tools").unwrap_or(&serde_json::Value::Null)), "tools") {
        let _ = user_ok(parse_tool_choice(body.get("tool_choice"), &tools), "tool_choice");
    }
});

/// Compiles `c` (a failure must be the client's) and follows it for a few tokens.
fn follow(c: &Constraint) {
    let Some(mut g) = user_ok(grammars().compile(c), "compile") else { return };
    for _ in 0..8 {
        let Some(mask) = user_ok(g.allowed(), "mask") else { return };
        assert_eq!(mask.len(), g.words(), "a mask covers the logits");
        let Some(t) = (0..mask.len() as u32 * 32).find(|&t| mask[t as usize / 32] >> (t % 32) & 1 == 1) else {
            return;
        };
        if [480, 482].contains(&t) || user_ok(g.accept(t), "accept").is_none() || g.finished() {
            return;
        }
    }
}

/// The text as a model's answer under "auto": the whole-answer and
/// streamed Hermes readings give the same content and calls.
fn answer(text: &str) {
    let (content, calls) = parse_hermes(text);
    let mode = ToolMode::Auto { parser: "hermes", parallel: true };
    let whole = mode.answer(text, "stop");
    assert_eq!(whole.calls.len(), calls.len());
    if calls.is_empty() {
        assert_eq!(whole.content.as_deref().unwrap_or(""), text);
    } else {
        assert_eq!(whole.content, content);
    }
    // Streamed in two pieces at a char boundary in the middle.
    let mid = (0..=text.len() / 2).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let mut s = ToolStream::new(&mode);
    let mut deltas = s.push(&text[..mid]);
    deltas.extend(s.push(&text[mid..]));
    let (last, reason) = s.finish("stop");
    deltas.extend(last);
    let n_calls = deltas.iter().filter(|d| d.get("tool_calls").is_some()).count();
    if reason == "tool_calls" {
        assert!(n_calls > 0, "tool_calls finish without calls");
    }
}
