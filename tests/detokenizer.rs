//! Incremental detokenization and stop strings (src/text/detokenizer.rs).
//!
//! Expected values come from an independent path: the tokenizer's own full
//! `decode` of all ids, or text written by hand (`str::find` on it for stop
//! strings). Tokens are always fed one at a time, as the engine does.
//!
//! The tiny tokenizer (src/model/builtin/tiny-qwen2-vl, byte-level BPE with few
//! merges, so most non-ASCII characters span several tokens) is always used.
//! The real Qwen tokenizer is used when KESTREL_QWEN_TOKENIZER_DIR points to
//! it (`export KESTREL_QWEN_TOKENIZER_DIR=$(tools/fetch_qwen_tokenizer.sh)`);
//! without it those tests print SKIPPED, and with
//! KESTREL_REQUIRE_QWEN_TOKENIZER=1 a missing folder fails instead.

mod common;

use std::path::PathBuf;

use kestrel::text::detokenizer::{IncrementalDetokenizer, StopChecker};
use kestrel::text::tokenizer::Tokenizer;

const REPLACEMENT: char = '\u{fffd}';

/// Hand-written text with 2-, 3- and 4-byte characters, combining marks and
/// emoji sequences (ZWJ, skin tone, flag).
const TEXTS: &[&str] = &[
    "Hello, world!",
    "naïve café, señor — Ångström, Œuvre, façade",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "emoji 🦀🚀 👍🏽 👨‍👩‍👧 🇯🇵 done",
    "mixed: e\u{301} (combining) ∑x² ≤ π · €5 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{10348}",
    "  leading spaces\n\ttabs\nand newlines\n\n",
];

fn tiny() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/model/builtin/tiny-qwen2-vl");
    Tokenizer::from_dir(dir).expect("tiny tokenizer loads")
}

fn qwen() -> Option<Tokenizer> {
    let dir = common::qwen_tokenizer_dir("detokenizer: real Qwen tokenizer tests")?;
    Some(Tokenizer::from_dir(&dir).expect("Qwen tokenizer loads"))
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode_with(text, false).expect("encode")
}

/// Feed `ids` one at a time: the piece returned after each id, then the
/// piece `finish` returns.
fn pieces(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> (Vec<String>, String) {
    let mut d = IncrementalDetokenizer::new(skip_special_tokens);
    let per_id = ids.iter().map(|&id| d.push(tok, id).expect("push")).collect();
    (per_id, d.finish(tok).expect("finish"))
}

/// Detokenizer then stop checker, one id at a time, as the engine runs them:
/// the text sent to the client and whether a stop string ended it.
fn generate(tok: &Tokenizer, ids: &[u32], stops: &[&str]) -> (String, bool) {
    let mut d = IncrementalDetokenizer::new(true);
    let mut sc = StopChecker::new(stops);
    let mut out = String::new();
    for &id in ids {
        let (released, stopped) = sc.push(&d.push(tok, id).unwrap());
        assert!(stops.iter().all(|s| !released.contains(s)), "released {released:?} holds a stop string");
        out.push_str(&released);
        if stopped {
            return (out, true);
        }
    }
    let (released, stopped) = sc.push(&d.finish(tok).unwrap());
    out.push_str(&released);
    if stopped {
        return (out, true);
    }
    out.push_str(&sc.finish());
    (out, false)
}

/// Push `chunks` of text through a stop checker; released text and whether
/// it stopped. Asserts that no released piece contains a stop string.
fn stop_run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
    let mut sc = StopChecker::new(stops);
    let mut out = String::new();
    for c in chunks {
        let (released, stopped) = sc.push(c);
        out.push_str(&released);
        if stopped {
            assert_eq!(sc.finish(), "", "nothing to release after a stop");
            return (out, true);
        }
    }
    out.push_str(&sc.finish());
    (out, false)
}

/// What OpenAI returns for `text` with `stops`, by `str::find` on the whole
/// text: everything before the earliest stop string.
fn expected_stop(text: &str, stops: &[&str]) -> (String, bool) {
    match stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s)).min() {
        Some(at) => (text[..at].to_owned(), true),
        None => (text.to_owned(), false),
    }
}

fn check_round_trip(tok: &Tokenizer, which: &str) {
    for text in TEXTS {
        let ids = encode(tok, text);
        let full = tok.decode(&ids, true).unwrap();
        // The normalizer (NFC) composes "e\u{301}"; everything else survives.
        if !text.contains('\u{301}') {
            assert_eq!(&full, text, "{which}: decode(encode(text)) is the text");
        }
        let (per_id, tail) = pieces(tok, &ids, true);
        for (i, p) in per_id.iter().enumerate() {
            assert!(!p.contains(REPLACEMENT), "{which}: {text:?}: piece {i} {p:?} has U+FFFD");
        }
        assert_eq!(tail, "", "{which}: {text:?}: valid text leaves nothing held back");
        assert_eq!(per_id.concat(), full, "{which}: {text:?}: pieces concatenate to the full decode");
    }
}

#[test]
fn tiny_round_trip_multibyte() {
    let tok = tiny();
    check_round_trip(&tok, "tiny");

    // The tiny tokenizer splits characters into byte tokens, so the hold-back
    // path really runs: some single id decodes to U+FFFD on its own and its
    // push returns nothing.
    let ids = encode(&tok, "日本語 🦀");
    assert!(ids.iter().any(|&id| tok.decode(&[id], true).unwrap().contains(REPLACEMENT)));
    let (per_id, _) = pieces(&tok, &ids, true);
    assert!(per_id.iter().any(String::is_empty), "some id completes no character");
}

#[test]
fn qwen_round_trip_multibyte() {
    let Some(tok) = qwen() else { return };
    check_round_trip(&tok, "qwen");
    let long: String = TEXTS.concat().repeat(3);
    let ids = encode(&tok, &long);
    let (per_id, tail) = pieces(&tok, &ids, true);
    assert_eq!(per_id.concat() + &tail, tok.decode(&ids, true).unwrap());
}

#[test]
fn special_tokens_skipped_or_kept() {
    for tok in std::iter::once(tiny()).chain(qwen()) {
        let im_start = tok.token_id("<|im_start|>").expect("<|im_start|>");
        let im_end = tok.token_id("<|im_end|>").expect("<|im_end|>");
        assert!(tok.is_special(im_start) && tok.is_special(im_end));
        let mut ids = vec![im_start];
        ids.extend(encode(&tok, "assistant\nこんにちは 👋"));
        ids.push(im_end);
        ids.extend(encode(&tok, "après"));
        ids.push(im_end);
        for skip in [true, false] {
            let (per_id, tail) = pieces(&tok, &ids, skip);
            assert_eq!(per_id.concat() + &tail, tok.decode(&ids, skip).unwrap(), "skip_special_tokens={skip}");
        }
        let (per_id, _) = pieces(&tok, &ids, true);
        assert_eq!(per_id.concat(), "assistant\nこんにちは 👋après");
        let (per_id, _) = pieces(&tok, &ids, false);
        assert_eq!(per_id.concat(), "<|im_start|>assistant\nこんにちは 👋<|im_end|>après<|im_end|>");
    }
}

#[test]
fn incomplete_character_is_flushed_by_finish() {
    let tok = tiny();
    let ids = encode(&tok, "ok 🦀");
    // Drop the last byte token: the crab is cut, so the full decode ends in
    // U+FFFD, which only `finish` may emit.
    let cut = &ids[..ids.len() - 1];
    let full = tok.decode(cut, true).unwrap();
    assert!(full.ends_with(REPLACEMENT), "{full:?}");
    let (per_id, tail) = pieces(&tok, cut, true);
    assert!(per_id.iter().all(|p| !p.contains(REPLACEMENT)));
    assert!(tail.contains(REPLACEMENT));
    assert_eq!(per_id.concat() + &tail, full);
    assert_eq!(per_id.concat(), "ok ");
}

/// Random ids from the tiny vocabulary (arbitrary bytes, so invalid UTF-8 and
/// cut characters everywhere, plus special tokens): the pieces still
/// concatenate to the full decode.
#[test]
fn random_ids_concatenate_to_full_decode() {
    let tok = tiny();
    let vocab = tok.vocab_size() as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    for case in 0..200 {
        let len = 1 + (next() % 40) as usize;
        let ids: Vec<u32> = (0..len).map(|_| (next() % vocab) as u32).collect();
        for skip in [true, false] {
            let (per_id, tail) = pieces(&tok, &ids, skip);
            assert_eq!(per_id.concat() + &tail, tok.decode(&ids, skip).unwrap(), "case {case} ids {ids:?} skip {skip}");
        }
    }
}

#[test]
fn context_is_not_emitted() {
    for tok in std::iter::once(tiny()).chain(qwen()) {
        let prompt = encode(&tok, "<|im_start|>assistant\nRéponse : ");
        let gen = encode(&tok, "déjà vu 🦀 日本");
        let mut d = IncrementalDetokenizer::with_context(&prompt, true);
        let mut out = String::new();
        for &id in &gen {
            out.push_str(&d.push(&tok, id).unwrap());
        }
        out.push_str(&d.finish(&tok).unwrap());
        assert_eq!(out, "déjà vu 🦀 日本");
        assert_eq!(out, tok.decode(&gen, true).unwrap());
    }
}

#[test]
fn stop_string_spanning_two_tokens() {
    let tok = tiny();
    let text = "The answer is 42. Observation: done";
    let stop = "Observation";
    let ids = encode(&tok, text);
    // Precondition: no single token's text holds the stop string.
    let (per_id, _) = pieces(&tok, &ids, true);
    assert!(per_id.iter().all(|p| !p.contains(stop)), "{per_id:?}");
    assert_eq!(generate(&tok, &ids, &[stop]), ("The answer is 42. ".to_owned(), true));

    // By hand: the stop string split over two pushes.
    assert_eq!(stop_run(&["END"], &["foo E", "ND bar"]), ("foo ".to_owned(), true));
    assert_eq!(stop_run(&["END"], &["foo EN", "D"]), ("foo ".to_owned(), true));
    assert_eq!(stop_run(&["END"], &["foo E", "N", "D"]), ("foo ".to_owned(), true));
}

#[test]
fn stop_string_prefix_of_later_text() {
    // "a" is held (could start "ab"), then "aa" shows the first "a" cannot.
    let mut sc = StopChecker::new(&["ab"]);
    assert_eq!(sc.push("a"), (String::new(), false));
    assert_eq!(sc.push("a"), ("a".to_owned(), false));
    assert_eq!(sc.push("b"), (String::new(), true));
    assert_eq!(sc.matched(), Some("ab"));

    assert_eq!(stop_run(&["ab"], &["aab", "cd"]), ("a".to_owned(), true));
    assert_eq!(stop_run(&["aab"], &["aa", "aab"]), ("aa".to_owned(), true));
    assert_eq!(stop_run(&["abab"], &["aba", "bab"]), ("".to_owned(), true));
    assert_eq!(stop_run(&["abac"], &["ab", "ab", "ac!"]), ("ab".to_owned(), true));
}

#[test]
fn multiple_stop_strings_earliest_wins() {
    assert_eq!(stop_run(&["world", "lo"], &["hel", "lo wor", "ld"]), ("hel".to_owned(), true));
    assert_eq!(stop_run(&["lo", "world"], &["hello world"]), ("hel".to_owned(), true));
    assert_eq!(stop_run(&["xyz", "b", "a"], &["cab"]), ("c".to_owned(), true));
    let mut sc = StopChecker::new(&["zz", "b", "a"]);
    assert_eq!(sc.push("cab"), ("c".to_owned(), true));
    assert_eq!(sc.matched(), Some("a"), "the earliest in the text, not in the list");
}

/// Every split of the text into three chunks, every stop set: output equals
/// the text before the earliest stop string, and no released piece holds one.
#[test]
fn stop_string_never_leaks_for_any_chunking() {
    let text = "xaab ab日本語 🦀 END abcab";
    let stop_sets: &[&[&str]] = &[
        &["ab"],
        &["aab"],
        &["日本"],
        &["本語 🦀"],
        &["🦀 E"],
        &["END", "cab"],
        &["abcab"],
        &["q", "語"],
        &["never here", "日本人"],
        &["b ab日", "🦀"],
    ];
    let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
    for stops in stop_sets {
        let want = expected_stop(text, stops);
        for (a, &i) in bounds.iter().enumerate() {
            for &j in &bounds[a..] {
                let chunks = [&text[..i], &text[i..j], &text[j..]];
                assert_eq!(stop_run(stops, &chunks), want, "stops {stops:?} chunks {chunks:?}");
            }
        }
    }
}

#[test]
fn held_back_text_released_at_finish() {
    let mut sc = StopChecker::new(&["abc", "日本語"]);
    assert_eq!(sc.push("xxab"), ("xx".to_owned(), false));
    assert_eq!(sc.push(" 日本"), ("ab ".to_owned(), false));
    assert_eq!(sc.finish(), "日本");

    // Through the tokenizer: the text ends in a prefix of the stop string.
    let tok = tiny();
    let text = "total: 3 日本";
    let ids = encode(&tok, text);
    assert_eq!(generate(&tok, &ids, &["日本語"]), (text.to_owned(), false));
    assert_eq!(generate(&tok, &ids, &[" 日本語", "xyz"]), (text.to_owned(), false));
}

#[test]
fn multibyte_stop_strings() {
    let mut tokenizers = vec![("tiny", tiny())];
    tokenizers.extend(qwen().map(|t| ("qwen", t)));
    let text = "こんにちは日本語の世界 🦀🚀 café olé";
    let stop_sets: &[&[&str]] = &[&["日本"], &["🦀🚀"], &["é o"], &["界 🦀", "こんにちは日"], &["🚀 c", "ñ"]];
    for (which, tok) in &tokenizers {
        let ids = encode(tok, text);
        for stops in stop_sets {
            assert_eq!(generate(tok, &ids, stops), expected_stop(text, stops), "{which}: stops {stops:?}");
        }
    }
}
