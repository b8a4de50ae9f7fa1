//! GBNF → Lark: exact output for small grammars, errors with their lines, and
//! the converted grammars run in llguidance against strings that GBNF
//! accepts or rejects.

use super::{gbnf_to_lark, is_gbnf, MAX_NESTING, MAX_REPEAT};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::ApproximateTokEnv;
use llguidance::{Matcher, ParserFactory};

/// vLLM's `guided_grammar` example (docs/features/structured_outputs.md).
const SQL: &str = r#"root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"#;

/// Arithmetic, llama.cpp style: left-recursive rules, classes with `+`,
/// a `ws` rule that may end in the newline the root then asks for.
const ARITHMETIC: &str = r#"# one equation a line
root   ::= (expr "=" ws term "\n")+
expr   ::= expr [-+] ws term | term
term   ::= term [*/] ws factor | factor
factor ::= ident | number | "(" ws expr ")" ws
ident  ::= [a-z] [a-z0-9_]* ws
number ::= "-"? [0-9]+ ("." [0-9]{1,6})? ws
ws     ::= [ \t\n]*
"#;

/// JSON, the shape of llama.cpp's grammars/json.gbnf: rules over several
/// lines, an empty alternative, `{m,n}`, escapes in classes.
const JSON: &str = r#"root ::= value
value ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
    member
    ("," ws member)*
  )? "}" ws
member ::= string ":" ws value

array ::= "[" ws (
    value ("," ws value)*
  )? "]" ws

string ::= "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,4})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;

fn lark(src: &str) -> String {
    gbnf_to_lark(src).unwrap_or_else(|e| panic!("{src:?} failed: {e}"))
}

fn err(src: &str) -> String {
    match gbnf_to_lark(src) {
        Ok(out) => panic!("{src:?} converted to {out:?}, expected an error"),
        Err(e) => e,
    }
}

/// A matcher for `lark` over a tokenizer of one token per byte (token id =
/// byte value), so a string's bytes are its tokens.
fn matcher(lark: &str) -> Matcher {
    let env = ApproximateTokEnv::single_byte_env();
    let mut factory = ParserFactory::new_simple(&env).expect("parser factory");
    factory.quiet();
    let grammar = TopLevelGrammar::from_lark(lark.to_string());
    Matcher::new(factory.create_parser(grammar))
}

/// Whether llguidance, running the conversion of `gbnf`, accepts all of `input`.
fn accepts(gbnf: &str, input: &str) -> bool {
    let lark = lark(gbnf);
    let mut m = matcher(&lark);
    assert!(!m.is_error(), "{lark:?} does not compile: {:?}", m.get_error());
    let tokens: Vec<u32> = input.bytes().map(u32::from).collect();
    // A rejected byte puts the matcher in its error state.
    let _ = m.consume_tokens(&tokens);
    !m.is_error() && m.is_accepting().unwrap_or(false)
}

fn check_strings(gbnf: &str, good: &[&str], bad: &[&str]) {
    for s in good {
        assert!(accepts(gbnf, s), "should accept {s:?}");
    }
    for s in bad {
        assert!(!accepts(gbnf, s), "should reject {s:?}");
    }
}

#[test]
fn sql_example_converts_rule_for_rule() {
    let want = r#"start: select_statement
select_statement: "SELECT " column " from " table " where " condition
column: "col_1 " | "col_2 "
table: "table_1 " | "table_2 "
condition: column "= " number
number: "1 " | "2 "
"#;
    assert_eq!(lark(SQL), want);
}

#[test]
fn literals_are_decoded_and_json_escaped() {
    assert_eq!(
        lark(r#"root ::= "a\"b\\c\n\r\t" "\x41\u00e9\U0001F600" "\x01\x7f\u0085" """#),
        "start: \"a\\\"b\\\\c\\n\\r\\t\" \"Aé😀\" \"\\u0001\\u007f\\u0085\" \"\"\n"
    );
    // Raw UTF-8 and llama.cpp's `\[ \]`, and the extra `\' \/`.
    assert_eq!(lark(r#"root ::= "ぁ[]\[\]\'\/""#), "start: \"ぁ[][]'/\"\n");
}

#[test]
fn classes_become_one_char_regexes() {
    assert_eq!(lark("root ::= [a-z0-9_]"), "start: /[a-z0-9_]/\n");
    assert_eq!(lark(r#"root ::= [^"\\\n]"#), "start: /[^\"\\\\\\n]/\n");
    // `-` first or last is a char; class syntax and `/` are escaped.
    assert_eq!(lark("root ::= [-a] [a-] [/^&~]"), "start: /[\\-a]/ /[a\\-]/ /[\\/\\^\\&\\~]/\n");
    assert_eq!(lark(r"root ::= [\[\]\\]"), "start: /[\\[\\]\\\\]/\n");
    assert_eq!(lark(r"root ::= [\x00-\x1F\x7F ]"), "start: /[\\x{0}-\\x{1f}\\x{7f} ]/\n");
    assert_eq!(lark("root ::= [ぁ-ゟ]"), "start: /[ぁ-ゟ]/\n");
    assert_eq!(lark("root ::= ."), "start: /(?s:.)/\n");
}

#[test]
fn repetitions_keep_their_bounds() {
    assert_eq!(
        lark(r#"root ::= "a"* "b"+ "c"? "d"{3} "e"{2,} "f"{2,5} "g"{,4} "h"{ 1 , 2 }"#),
        "start: \"a\"* \"b\"+ \"c\"? \"d\"{3} \"e\"{2,} \"f\"{2,5} \"g\"{0,4} \"h\"{1,2}\n"
    );
    // llguidance refuses `x{0}`; it matches only the empty string.
    assert_eq!(lark(r#"root ::= "a"{0} "b"{0,0}"#), "start: \"\" \"\"\n");
    // Groups and stacked operators get parentheses.
    assert_eq!(
        lark("root ::= (\"a\" \"b\")* (\"c\" | \"d\")+ \"e\"*? x{2}\nx ::= \"x\"").lines().next(),
        Some("start: (\"a\" \"b\")* (\"c\" | \"d\")+ (\"e\"*)? x{2}")
    );
}

#[test]
fn grouping_and_alternation() {
    assert_eq!(
        lark(r#"root ::= "a" | "b" "c" | ("d" | "e") "f" | () | ("g" "h") "i" | ("j")"#),
        "start: \"a\" | \"b\" \"c\" | (\"d\" | \"e\") \"f\" | \"\" | (\"g\" \"h\") \"i\" | \"j\"\n"
    );
    // An empty alternative, first or last (llama.cpp's json-schema `space`).
    assert_eq!(lark(r#"root ::= | " " |"#), "start: \"\" | \" \" | \"\"\n");
}

#[test]
fn names_map_to_lowercase_lark_names() {
    let src = "root ::= Foo-Bar x_1 2nd\nFoo-Bar ::= \"a\"\nx_1 ::= \"b\"\n2nd::=\"c\"\n";
    assert_eq!(lark(src), "start: foo-bar x_1 r_2nd\nfoo-bar: \"a\"\nx_1: \"b\"\nr_2nd: \"c\"\n");
}

#[test]
fn rules_span_lines_comments_and_crlf() {
    let src = "# header\r\n\r\nroot ::= (\r\n  \"a\" # first\r\n  | \"b\"\r\n)\r\n  move\r\n  | \"c\"\r\n\
               move ::=\r\n  \"m\"\r\n";
    assert_eq!(lark(src), "start: (\"a\" | \"b\") move | \"c\"\nmove: \"m\"\n");
    // A postfix operator may sit on the next line, as inside llama.cpp groups.
    assert_eq!(lark("root ::= (\"a\"\n  )\n  *\n"), "start: \"a\"*\n");
}

#[test]
fn errors_name_the_line() {
    let cases: &[(&str, &str)] = &[
        ("root ::= \"abc", "line 1, column 10: string literal is not closed"),
        ("root ::= \"a\"\nx ::= \"b\nc\"", "line 2, column 7: string literal is not closed"),
        ("root ::= [a-z", "line 1, column 10: character class is not closed"),
        ("root ::= []", "line 1, column 10: empty character class"),
        ("root ::= [^]", "line 1, column 10: empty character class"),
        ("root ::= [z-a]", "line 1, column 11: class range `z-a` is reversed"),
        ("root ::= \"a\"\n\nfoo ::= bar", "line 3, column 9: rule `bar` is not defined"),
        ("main ::= \"a\"", "no `root` rule"),
        ("", "no `root` rule"),
        ("root ::= \"a\"{3,2}", "line 1, column 13: repetition `{3,2}` has min above max"),
        ("root ::= \"a\"{}", "line 1, column 13: expected `{m}`"),
        ("root ::= \"a\"{,}", "line 1, column 13: expected `{m}`"),
        ("root ::= \"a\"{2", "line 1, column 13: expected `{m}`"),
        ("root ::= \"a\"{x}", "line 1, column 13: expected `{m}`"),
        ("root ::= \"a\"{99999999999}", "line 1, column 14: repetition count above the limit"),
        ("root ::= *", "line 1, column 10: `*` must follow"),
        ("root ::= (\"a\"", "line 1, column 10: `(` is never closed"),
        ("root ::= (\"a\"\nx ::= \"b\")", "line 1, column 10: `(` is never closed"),
        ("root ::= \"a\")", "line 1, column 13: `)` without a matching `(`"),
        ("root ::= \"a\"\nroot ::= \"b\"", "line 2, column 1: rule `root` is already defined on line 1"),
        ("root ::= x\nx ::= \"a\"\nX ::= \"b\"", "line 3, column 1: rule names `x` (line 2) and `X`"),
        ("root ::= start\nstart ::= \"a\"", "line 2, column 1: rule names `root` (line 1) and `start`"),
        ("root ::= \"\\q\"", "line 1, column 11: unknown escape `\\q`"),
        ("root ::= \"\\x4\"", "line 1, column 11: `\\x` needs 2 hex digits"),
        ("root ::= \"\\uD800\"", "line 1, column 11: `\\uD800` is not a Unicode scalar value"),
        ("root ::= [\\U00110000]", "line 1, column 11: `\\U00110000` is not a Unicode scalar"),
        ("root ::= <[1000]>", "line 1, column 10: token references"),
        ("root ::= \"a\" b ::= \"c\"", "line 1, column 16: `::=` must follow a rule name"),
        ("\"a\"\nroot ::= \"b\"", "line 1, column 1: expected a rule `name ::= ...`, found `\"`"),
        ("root ::= \"a\" ; \"b\"", "line 1, column 14: unexpected `;`"),
    ];
    for (src, want) in cases {
        let got = err(src);
        assert!(got.contains(want), "{src:?}: got {got:?}, want {want:?}");
    }
    // The postfix chain and the nesting are bounded, not a stack overflow.
    assert!(err(&format!("root ::= \"a\"{}", "*".repeat(1000))).contains("too many repetition"));
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(100_000), ")".repeat(100_000));
    assert!(err(&deep).contains(&format!("deeper than {MAX_NESTING}")));
    let ok = format!("root ::= {}\"a\"{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
    assert_eq!(lark(&ok), "start: \"a\"\n");
}

#[test]
fn detects_gbnf_but_not_lark() {
    for src in [SQL, ARITHMETIC, JSON, "root::=\"a\"", "  # c\n\n  my-rule ::= x"] {
        assert!(is_gbnf(src), "{src:?}");
    }
    let lark_like = [
        "start: \"a\" | b\nb: /[a-z]+/",
        "%llguidance {}\nstart: x\nx: \"::=\"",
        "# root ::= \"a\"\nstart: x", // a comment
        "start: x ::= y",             // not at the start of a line
        "",
    ];
    for src in lark_like {
        assert!(!is_gbnf(src), "{src:?}");
    }
}

#[test]
fn sql_example_runs_in_llguidance() {
    check_strings(
        SQL,
        &["SELECT col_1  from table_2  where col_2 = 1 "],
        &[
            "SELECT col_1 from table_2 where col_2 = 1 ",
            "SELECT col_3  from table_2  where col_2 = 1 ",
            "SELECT col_1  from table_2  where col_2 = 1",
            "SELECT col_1  from table_2  where col_2 = 1 x",
            "",
        ],
    );
}

#[test]
fn arithmetic_runs_in_llguidance() {
    check_strings(
        ARITHMETIC,
        &[
            "x=1\n",
            "a1 + b_2*(c - 3.5)= -7\n",
            "x = 2\ny=(1+2)*3\n",
            // ws may take the newline; the root then needs another.
            "x=1 \n\n",
        ],
        &["", "x=1", "x==1\n", "1x=1\n", "x=1.1234567\n", "x=(1\n", "X=1\n"],
    );
}

#[test]
fn json_grammar_runs_in_llguidance() {
    check_strings(
        JSON,
        &[
            "{}",
            "[]",
            "{\"a\": [1, -2.5e3, true, null, \"x\\\"y\\u00e9\"]}",
            "[\n  {\"k\":\"v\"},\n\t\"é\"]",
            "0",
            "\"\"",
        ],
        &["{", "{\"a\" 1}", "[1,]", "01", "\"a\nb\"", "\"\\q\"", "\"\\u12\"", "[1]  ", "tru"],
    );
}

#[test]
fn dot_classes_and_bounds_match_as_in_gbnf() {
    // `.` is any code point, newline included; `[^...]` too.
    check_strings("root ::= . . .", &["a\nb", "é😀\t"], &["ab", "abcd"]);
    check_strings("root ::= [^a]", &["\n", "b", "😀"], &["a", ""]);
    check_strings(r"root ::= [\x00-\x1F]", &["\u{0}", "\n", "\u{1f}"], &[" "]);
    check_strings("root ::= [ぁ-ゟ]+", &["ぁゟ"], &["ア", ""]);
    check_strings(r#"root ::= "ab"{2,3} "c"{,1}"#, &["abab", "ababab", "ababc"], &["ab", "abababab"]);
    check_strings(r#"root ::= ("x" | "yz"){2}"#, &["xx", "xyz", "yzyz"], &["x", "xxx"]);
    check_strings(r#"root ::= "a"{0} "b""#, &["b"], &["ab"]);
    check_strings(r#"root ::= [a-z]+ "!""#, &["hi!"], &["hi", "!"]);
    check_strings(r#"root ::= [/\]\[-] "\"\\""#, &["/\"\\", "]\"\\", "-\"\\"], &["a\"\\"]);
}

/// The known difference (module docs): a string literal is one greedy lexeme,
/// so it wins over a shorter path that would end a lexeme inside it.
#[test]
fn a_literal_is_one_greedy_lexeme() {
    let g = r#"root ::= ("a" | "ab") "bc""#;
    assert!(accepts(g, "abbc"));
    assert!(!accepts(g, "abc"), "GBNF accepts this; llguidance would now too");
    let g = r#"root ::= [a-z]* "ing""#;
    assert!(accepts(g, "running"));
    assert!(!accepts(g, "singing"), "GBNF accepts this; llguidance would now too");
}

#[test]
fn degenerate_grammars_compile() {
    // An unused rule, one that only `x{0}` names, a rule that never ends.
    check_strings("root ::= \"a\"\nunused ::= \"b\"", &["a"], &["b"]);
    check_strings("root ::= x{0} \"b\"\nx ::= \"a\"", &["b"], &["ab"]);
    check_strings("root ::= a\na ::= a", &[], &["", "a"]);
    check_strings("root ::= a | \"x\"\na ::= a \"y\"", &["x"], &["xy", "y"]);
    // Loops over what may match nothing.
    check_strings("root ::= (\"\")*", &[""], &["a"]);
    check_strings("root ::= (\"a\"?)+ \"b\"", &["b", "aab"], &["a"]);
    check_strings("root ::= (\"a\"*)* \"b\"", &["b", "aaab"], &["ba"]);
    // The largest counts still compile (llguidance builds O(log n) rules).
    let max = format!("root ::= (\"a\"{{{MAX_REPEAT}}}){{0,{MAX_REPEAT}}}");
    check_strings(&max, &[""], &["a"]);
}

/// xorshift64*: a fixed, dependency-free stream for the fuzz-ish tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Bytes drawn mostly from GBNF's own syntax, so the parser gets deep.
    let alphabet = b"root ::=\"[]()|*+?{},.-^\\xuU0123456789abcXYZ_#\n\r\t <>!:";
    for _ in 0..4000 {
        let len = rng.below(64);
        let bytes: Vec<u8> = (0..len)
            .map(|_| match rng.below(8) {
                0 => rng.next() as u8,
                _ => alphabet[rng.below(alphabet.len())],
            })
            .collect();
        let src = String::from_utf8_lossy(&bytes);
        let _ = is_gbnf(&src);
        if let Ok(out) = gbnf_to_lark(&src) {
            compiles(&src, &out);
        }
    }
}

#[test]
fn mutated_grammars_never_panic_and_compile_when_accepted() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let pieces = [
        "\"", "[", "]", "(", ")", "|", "*", "+", "?", "{2,3}", "{,", "}", "\\", "\\x4", "\\u00e9", "::=", "\n", "#",
        ".", "-", "^", "root", "ws", "é", "\r\n", " ",
    ];
    let (mut converted, mut total) = (0, 0);
    for sample in [SQL, ARITHMETIC, JSON] {
        for _ in 0..300 {
            let mut chars: Vec<char> = sample.chars().collect();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(chars.len() + 1);
                match rng.below(3) {
                    0 if at < chars.len() => {
                        let n = (1 + rng.below(4)).min(chars.len() - at);
                        chars.drain(at..at + n);
                    }
                    1 => {
                        let piece = pieces[rng.below(pieces.len())];
                        chars.splice(at..at, piece.chars());
                    }
                    _ if at < chars.len() => chars[at] = char::from(rng.below(128) as u8),
                    _ => {}
                }
            }
            let src: String = chars.into_iter().collect();
            total += 1;
            if let Ok(out) = gbnf_to_lark(&src) {
                converted += 1;
                compiles(&src, &out);
            }
        }
    }
    // The mutations are small: many grammars survive them.
    assert!(converted >= total / 20, "{converted} of {total} converted");
}

/// Whatever the converter accepts, llguidance compiles.
fn compiles(src: &str, out: &str) {
    let m = matcher(out);
    assert!(!m.is_error(), "{src:?} gave {out:?}, which llguidance rejects: {:?}", m.get_error());
}
