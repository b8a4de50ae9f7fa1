//! The grammar engine over the built-in tiny model's tokenizer (byte-level
//! BPE, 480 tokens plus 14 special ones; logits 494 wide): outputs drawn at
//! random among the allowed tokens always satisfy their constraint, the
//! mask never lets a special token through, and bad constraints are 400s.

use serde_json::{json, Value};

use super::*;
use crate::sampling::Rng;
use crate::structured::JsonOptions;

fn tokenizer() -> Arc<Tokenizer> {
    let dir = crate::model::builtin::materialize().expect("the built-in model");
    Arc::new(Tokenizer::from_dir(dir).expect("its tokenizer"))
}

/// <|endoftext|> and <|im_end|>, as the engine passes them (sorted).
const EOS: [u32; 2] = [480, 482];
const VOCAB: usize = 494;

fn grammars() -> Grammars {
    Grammars::new(tokenizer(), VOCAB, &EOS)
}

fn allowed_ids(mask: &[u32]) -> Vec<u32> {
    (0..VOCAB as u32).filter(|&t| mask[t as usize / 32] >> (t % 32) & 1 == 1).collect()
}

/// Draws tokens uniformly among those allowed until the grammar ends or an
/// EOS is drawn (EOS drawn with probability `p_eos` whenever it is allowed,
/// so bounded grammars end soon); the text, and whether it ended.
fn walk(g: &mut Grammar, tok: &Tokenizer, seed: u64, p_eos: f64, max: usize) -> (String, bool) {
    // Seeded, so a failing case is reproducible.
    let mut rng = Rng::from_seed(seed);
    let mut ids = Vec::new();
    for _ in 0..max {
        let mask = g.allowed().expect("a mask");
        assert_eq!(mask.len(), g.words());
        let allowed = allowed_ids(&mask);
        assert!(!allowed.is_empty(), "the grammar allows nothing after {ids:?}");
        for special in 481..VOCAB as u32 {
            if special != 482 {
                assert!(!allowed.contains(&special), "special token {special} allowed after {ids:?}");
            }
        }
        let eos_ok = allowed.contains(&482);
        assert_eq!(eos_ok, allowed.contains(&480), "every EOS id is allowed together");
        let t = if eos_ok && (rng.next_u64() % 1000) as f64 / 1000.0 < p_eos {
            482
        } else {
            let choices: Vec<u32> = allowed.iter().copied().filter(|t| !EOS.contains(t)).collect();
            if choices.is_empty() {
                482
            } else {
                choices[(rng.next_u64() % choices.len() as u64) as usize]
            }
        };
        if EOS.contains(&t) {
            return (tok.decode(&ids, true).unwrap(), true);
        }
        g.accept(t).expect("an allowed token is accepted");
        ids.push(t);
        if g.finished() {
            return (tok.decode(&ids, true).unwrap(), true);
        }
    }
    (tok.decode(&ids, true).unwrap(), false)
}

fn compact() -> JsonOptions {
    JsonOptions { any_whitespace: false, ..JsonOptions::default() }
}

#[test]
fn random_walks_through_a_json_schema_give_valid_json() {
    let tok = tokenizer();
    let gs = Grammars::new(tok.clone(), VOCAB, &EOS);
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["c", "f"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
            "ok": {"type": "boolean"}
        },
        "required": ["city", "unit", "days", "ok"],
        "additionalProperties": false
    });
    for any_whitespace in [false, true] {
        let c = Constraint::Json { schema: schema.clone(), options: JsonOptions { any_whitespace, ..compact() } };
        let g = gs.compile(&c).expect("compiles");
        for seed in 0..12 {
            let mut g = g.clone();
            let (text, ended) = walk(&mut g, &tok, seed, 0.5, 400);
            if !ended {
                // Flexible whitespace may wander; compact JSON of this schema always ends.
                assert!(any_whitespace, "compact output did not end: {text:?}");
                continue;
            }
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
            let o = v.as_object().expect("an object");
            assert_eq!(o.len(), 4, "{text}");
            assert!(o["city"].as_str().is_some_and(|s| s.chars().count() <= 6), "{text}");
            assert!(["c", "f"].contains(&o["unit"].as_str().unwrap()), "{text}");
            assert!((1..=9).contains(&o["days"].as_i64().unwrap()), "{text}");
            assert!(o["ok"].is_boolean(), "{text}");
            if !any_whitespace {
                assert!(!text.contains(' ') || o["city"].as_str().unwrap().contains(' '), "compact: {text:?}");
            }
        }
    }
}

#[test]
fn json_object_outputs_are_objects() {
    let tok = tokenizer();
    let gs = Grammars::new(tok.clone(), VOCAB, &EOS);
    let g = gs.compile(&Constraint::json_object(compact())).unwrap();
    let mut complete = 0;
    for seed in 0..20 {
        let mut g = g.clone();
        let (text, ended) = walk(&mut g, &tok, seed, 0.9, 300);
        if ended {
            // JSON allows any exponent (`2E31530`), which serde_json will not
            // turn into an f64: check the syntax without converting numbers.
            serde_json::from_str::<serde::de::IgnoredAny>(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(text.starts_with('{') && text.ends_with('}'), "{text}");
            complete += 1;
        } else {
            assert!(text.starts_with('{'), "{text:?}");
        }
    }
    assert!(complete > 0, "no walk ended");
}

#[test]
fn regex_and_choice_outputs_match() {
    let tok = tokenizer();
    let gs = Grammars::new(tok.clone(), VOCAB, &EOS);
    let g = gs.compile(&Constraint::Regex(r"[a-c]{2,4}-[0-9]".into())).unwrap();
    for seed in 0..20 {
        let (text, ended) = walk(&mut g.clone(), &tok, seed, 0.3, 50);
        assert!(ended, "{text:?}");
        let (head, digit) = text.split_once('-').expect("a dash");
        assert!((2..=4).contains(&head.len()) && head.chars().all(|c| ('a'..='c').contains(&c)), "{text}");
        assert!(digit.len() == 1 && digit.chars().all(|c| c.is_ascii_digit()), "{text}");
    }
    let choices = vec!["yes".to_string(), "no".into(), "not \"sure\"\n".into(), "the end".into()];
    let g = gs.compile(&Constraint::Choice(choices.clone())).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let (text, ended) = walk(&mut g.clone(), &tok, seed, 0.0, 50);
        assert!(ended && choices.contains(&text), "{text:?}");
        seen.insert(text);
    }
    assert!(seen.len() >= 3, "only {seen:?} drawn");
}

#[test]
fn lark_grammars_constrain_the_output() {
    let tok = tokenizer();
    let gs = Grammars::new(tok.clone(), VOCAB, &EOS);
    let lark = "start: greeting \" \" name\ngreeting: \"hi\" | \"hello\"\nname: /[A-Z][a-z]{1,3}/";
    let g = gs.compile(&Constraint::Grammar(lark.into())).unwrap();
    for seed in 0..20 {
        let (text, ended) = walk(&mut g.clone(), &tok, seed, 0.5, 50);
        assert!(ended, "{text:?}");
        let (greet, name) = text.split_once(' ').expect("a space");
        assert!(greet == "hi" || greet == "hello", "{text}");
        assert!(name.len() >= 2 && name.chars().next().unwrap().is_ascii_uppercase(), "{text}");
    }
}

#[test]
fn bad_constraints_are_the_requests_fault() {
    let gs = grammars();
    let cases = [
        Constraint::Json { schema: json!({"type": "no-such-type"}), options: compact() },
        Constraint::Json { schema: json!([1, 2]), options: compact() },
        Constraint::Regex("(unclosed".into()),
        Constraint::Grammar("start: undefined_rule".into()),
        Constraint::Grammar("this is not a grammar".into()),
    ];
    for c in cases {
        match gs.compile(&c) {
            Err(Error::InvalidInput(m)) => assert!(m.contains(c.what()), "{m}"),
            other => panic!("{c:?} gave {other:?}"),
        }
    }
}

#[test]
fn a_finished_grammar_allows_only_eos_and_copies_are_independent() {
    let tok = tokenizer();
    let gs = Grammars::new(tok.clone(), VOCAB, &EOS);
    let g = gs.compile(&Constraint::Choice(vec!["ab".into()])).unwrap();
    let mut a = g.clone();
    let ids = tok.encode_with("ab", false).unwrap();
    for &t in &ids {
        a.accept(t).unwrap();
    }
    assert!(a.finished());
    assert_eq!(allowed_ids(&a.allowed().unwrap()), vec![480, 482]);
    // The original is untouched: "ab" is still ahead of it.
    let mut b = g.clone();
    assert!(!b.finished());
    assert!(!allowed_ids(&b.allowed().unwrap()).contains(&482));
    // A token the grammar does not allow is an error, not a panic.
    let z = tok.encode_with("z", false).unwrap()[0];
    assert!(matches!(b.accept(z), Err(Error::InvalidInput(_))));
}
