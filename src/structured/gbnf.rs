//! GBNF, llama.cpp's grammar format, to the Lark dialect llguidance reads.
//!
//! vLLM documents `guided_grammar` (and `structured_outputs.grammar`) with
//! GBNF grammars, the format llama.cpp and xgrammar take; Kestrel's grammar
//! engine, llguidance, takes Lark. What a GBNF grammar means is pinned to
//! llama.cpp `src/llama-grammar.cpp` (`llama_grammar_parser::parse`,
//! `parse_sequence`, `parse_char`) and `grammars/README.md`; the output syntax
//! to llguidance 1.9 `src/lark/lexer.rs` (its tokens) and `docs/syntax.md`.
//!
//! | GBNF                         | Lark                                  |
//! |------------------------------|---------------------------------------|
//! | `root ::= a b`               | `start: a b`                          |
//! | `Check-Mate ::= ...`         | `check-mate: ...` (names lowercased)  |
//! | `1st ::= ...`                | `r_1st: ...` (a Lark name needs a letter first) |
//! | `"x\"\x41\u00e9"`            | `"x\"Aé"` (a JSON string)             |
//! | `[a-z_]`, `[^"\\\n]`         | `/[a-z_]/`, `/[^"\\\n]/`              |
//! | `.` (any code point)         | `/(?s:.)/` (Lark's `/./` stops at `\n`) |
//! | `( )`, `\|`, `* + ?`, `{m,n}`| the same (`x{0}` and `x{0,0}`: `""`)  |
//!
//! Also taken, though llama.cpp refuses them (so no grammar llama.cpp takes
//! changes meaning): a rule going on over several lines (llama.cpp: only
//! inside `( )` and after `|`), up to the next line that starts `name ::=`;
//! `_` in names (vLLM's and xgrammar's examples use it; llama.cpp's names are
//! `[a-zA-Z0-9-]`); `{,n}` for `{0,n}`; the escapes `\-`, `\^`, `\'`, `\/`.
//!
//! Where the result differs from GBNF:
//! - llguidance's lexer is greedy (`earley/lexer.rs`, `Lexer::advance`: a
//!   lexeme ends only where the next byte cannot extend it), and each string
//!   literal is one lexeme. Where a literal competes with a lexeme boundary
//!   inside it, the literal wins: `("a" | "ab") "bc"` rejects `abc`, and
//!   `[a-z]* "ing"` rejects `singing`, both of which GBNF accepts. Classes and
//!   `.` match one character, so they never cut anything short.
//! - Each class and `.` is a one-character lexeme inside a rule: exact, but
//!   llguidance is slower on long runs of them than on one regex lexeme
//!   (`docs/syntax.md`, "Terminals vs rules"). Folding `[0-9]+` into
//!   `/[0-9]+/` would be faster and, by the greedy lexer, wrong whenever what
//!   follows could start with a digit, so it is not done.
//!
//! Rejected, with the line and column: a rule defined twice (llama.cpp keeps
//! the last), two names that lowercase to the same Lark name, a missing
//! `root`, an undefined rule, an unterminated string or class, an empty or
//! reversed class range, a raw newline inside a string or class (llama.cpp
//! takes it as is), code points that are not Unicode scalar values (no text
//! can contain them), repetitions above [`MAX_REPEAT`], groups nested deeper
//! than [`MAX_NESTING`], and llama.cpp's token references (`<[id]>`,
//! `<think>`, `!<...>`), which have no Lark equivalent here.

use std::collections::HashMap;
use std::fmt::Write;

/// The largest count a `{m,n}` may name. llguidance builds `x{n}` from
/// O(log n) rules, so this bounds no memory; it keeps counts far below Lark's
/// `i32` range, whose top value llguidance reads as "unbounded".
pub const MAX_REPEAT: u32 = 1 << 20;

/// The deepest nesting of `( )` groups. The parser and the writer recurse
/// once per level, so an input of a million `(` must be an error, not a stack
/// overflow; real grammars nest a handful deep.
pub const MAX_NESTING: usize = 64;

/// Postfix operators allowed on one item (`x*?` is llama.cpp's `(x*)?`).
const MAX_POSTFIX: usize = 4;

/// Whether `src` is a GBNF grammar: some line starts (after blanks) with a
/// rule definition `name ::=`. Lark has no `::=`, so a Lark grammar is never
/// taken for GBNF; a `::=` inside a string or after `#` is not at a line's
/// start.
pub fn is_gbnf(src: &str) -> bool {
    // Strings and classes end on their line and comments at its end, so only
    // a line's start can hold a definition.
    src.split('\n').any(starts_rule)
}

/// Whether `s`, after blanks, starts with a rule definition `name ::=`.
fn starts_rule(s: &str) -> bool {
    let s = s.trim_start_matches([' ', '\t', '\r']);
    let name_len = s.find(|c| !is_name_char(c)).unwrap_or(s.len());
    name_len > 0 && s[name_len..].trim_start_matches([' ', '\t']).starts_with("::=")
}

/// Converts a llama.cpp GBNF grammar to llguidance Lark: one line per rule,
/// in the order of the source, `root` renamed `start`. Errors name the line
/// and column; no input panics.
pub fn gbnf_to_lark(src: &str) -> Result<String, String> {
    let rules = Parser::new(src).grammar()?;
    let names = lark_names(src, &rules)?;
    let mut out = String::new();
    for rule in &rules {
        out.push_str(&names[rule.name.as_str()]);
        out.push_str(": ");
        write_expr(&mut out, &rule.body, &names, Prec::Alt);
        out.push('\n');
    }
    Ok(out)
}

/// One GBNF expression, after parsing (escapes decoded, groups resolved).
#[derive(Debug)]
enum Expr {
    /// `a | b | ...`, two or more alternatives.
    Alt(Vec<Expr>),
    /// `a b ...`: two or more items, or none (the empty string).
    Seq(Vec<Expr>),
    /// `"..."`, decoded.
    Lit(String),
    /// `[...]` as inclusive code point ranges; `[^...]` is `negated`.
    Class { negated: bool, ranges: Vec<(char, char)> },
    /// `.`: any one code point, newline included.
    Any,
    /// A rule name; `pos` is its byte offset in the source (for errors).
    Ref { name: String, pos: usize },
    /// `x*`, `x+`, `x?`, `x{m}`, `x{m,}`, `x{m,n}`; `max` None is unbounded.
    Repeat { inner: Box<Expr>, min: u32, max: Option<u32> },
}

/// `name ::= body`; `pos` is the byte offset of `name`.
#[derive(Debug)]
struct Rule {
    name: String,
    pos: usize,
    body: Expr,
}

/// llama.cpp's `is_word_char`, plus `_`.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// `c` in backquotes for an error message, control chars escaped.
fn shown(c: char) -> String {
    if c.is_control() {
        format!("`{}`", c.escape_debug())
    } else {
        format!("`{c}`")
    }
}

/// "line L, column C: msg" for byte offset `pos` of `src`.
fn error_at(src: &str, pos: usize, msg: impl std::fmt::Display) -> String {
    let (line, column) = line_col(src, pos);
    format!("line {line}, column {column}: {msg}")
}

/// 1-based line and column (in chars) of byte offset `pos`, which the parser
/// only ever leaves on a char boundary.
fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let before = src.get(..pos.min(src.len())).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Recursive descent over the source, one byte offset at a time (always on a
/// char boundary).
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    /// Whether `pos` is the first non-blank of its line: only there may a
    /// new rule start.
    fresh_line: bool,
}

type PResult<T> = Result<T, String>;

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser { src, pos: 0, fresh_line: true }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    /// The char after the next one.
    fn peek2(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        self.fresh_line = false;
        Some(c)
    }

    fn err<T>(&self, pos: usize, msg: impl std::fmt::Display) -> PResult<T> {
        Err(error_at(self.src, pos, msg))
    }

    /// Skips blanks, newlines and `#` comments.
    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                '\n' => {
                    self.pos += 1;
                    self.fresh_line = true;
                }
                ' ' | '\t' | '\r' => self.pos += 1,
                '#' => {
                    let n = self.rest().find('\n').unwrap_or(self.rest().len());
                    self.pos += n;
                }
                _ => break,
            }
        }
    }

    /// Whether a rule definition `name ::=` starts here, on a fresh line.
    fn at_rule_start(&self) -> bool {
        self.fresh_line && starts_rule(self.rest())
    }

    fn grammar(&mut self) -> PResult<Vec<Rule>> {
        let mut rules = Vec::new();
        self.skip_blank();
        while self.peek().is_some() {
            rules.push(self.rule()?);
        }
        Ok(rules)
    }

    /// `name ::= alternates`, up to the next rule or the end.
    fn rule(&mut self) -> PResult<Rule> {
        let pos = self.pos;
        if !self.at_rule_start() {
            let found = self.peek().map(shown).unwrap_or_default();
            return self.err(pos, format!("expected a rule `name ::= ...`, found {found}"));
        }
        let name = self.name();
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.bump();
        }
        // at_rule_start saw the `::=`.
        self.pos += 3;
        let body = self.alternates(0)?;
        match self.peek() {
            None => {}
            Some(_) if self.at_rule_start() => {}
            Some(')') => return self.err(self.pos, "`)` without a matching `(`"),
            Some(c) => return self.err(self.pos, format!("unexpected {}", shown(c))),
        }
        Ok(Rule { name, pos, body })
    }

    fn name(&mut self) -> String {
        let rest = self.rest();
        let n = rest.find(|c| !is_name_char(c)).unwrap_or(rest.len());
        self.pos += n;
        self.fresh_line = false;
        rest[..n].to_string()
    }

    /// `sequence ('|' sequence)*`; `depth` counts the enclosing groups.
    fn alternates(&mut self, depth: usize) -> PResult<Expr> {
        let mut alts = vec![self.sequence(depth)?];
        while self.peek() == Some('|') {
            self.bump();
            alts.push(self.sequence(depth)?);
        }
        Ok(if alts.len() == 1 { alts.remove(0) } else { Expr::Alt(alts) })
    }

    /// Items with their postfix operators, up to `|`, `)`, the end, or the
    /// next rule.
    fn sequence(&mut self, depth: usize) -> PResult<Expr> {
        let mut items = Vec::new();
        loop {
            self.skip_blank();
            let Some(c) = self.peek() else { break };
            if c == '|' || c == ')' || self.at_rule_start() {
                break;
            }
            let mut item = self.item(c, depth)?;
            loop {
                self.skip_blank();
                let at = self.pos;
                let (min, max) = match self.peek() {
                    Some('{') => self.braces()?,
                    Some(op @ ('*' | '+' | '?')) => {
                        self.bump();
                        match op {
                            '*' => (0, None),
                            '+' => (1, None),
                            _ => (0, Some(1)),
                        }
                    }
                    _ => break,
                };
                if postfix_depth(&item) >= MAX_POSTFIX {
                    return self.err(at, "too many repetition operators in a row");
                }
                item = Expr::Repeat { inner: Box::new(item), min, max };
            }
            items.push(item);
        }
        Ok(if items.len() == 1 { items.remove(0) } else { Expr::Seq(items) })
    }

    /// One symbol: a literal, a class, `.`, a rule name or a group.
    fn item(&mut self, c: char, depth: usize) -> PResult<Expr> {
        let at = self.pos;
        match c {
            '"' => self.literal(),
            '[' => self.class(),
            '.' => {
                self.bump();
                Ok(Expr::Any)
            }
            '(' => {
                if depth >= MAX_NESTING {
                    return self.err(at, format!("groups nest deeper than {MAX_NESTING}"));
                }
                self.bump();
                let inner = self.alternates(depth + 1)?;
                if self.peek() != Some(')') {
                    return self.err(at, "`(` is never closed");
                }
                self.bump();
                Ok(inner)
            }
            c if is_name_char(c) => Ok(Expr::Ref { name: self.name(), pos: at }),
            '*' | '+' | '?' | '{' => self.err(at, format!("`{c}` must follow a string, class, name or group")),
            '<' | '!' => self.err(at, "token references (`<...>`, `!<...>`) are not supported"),
            ':' if self.rest().starts_with("::=") => {
                self.err(at, "`::=` must follow a rule name at the start of a line")
            }
            c => self.err(at, format!("unexpected {}", shown(c))),
        }
    }

    /// `"..."` with its escapes decoded.
    fn literal(&mut self) -> PResult<Expr> {
        let open = self.pos;
        self.bump();
        let mut s = String::new();
        loop {
            match self.peek() {
                None | Some('\n' | '\r') => {
                    return self.err(open, "string literal is not closed on its line (write a newline as \\n)");
                }
                Some('"') => {
                    self.bump();
                    return Ok(Expr::Lit(s));
                }
                Some('\\') => s.push(self.escape()?),
                Some(c) => {
                    self.bump();
                    s.push(c);
                }
            }
        }
    }

    /// `[...]` or `[^...]`: chars and `a-z` ranges, up to an unescaped `]`.
    fn class(&mut self) -> PResult<Expr> {
        let open = self.pos;
        self.bump();
        let negated = self.peek() == Some('^');
        if negated {
            self.bump();
        }
        let mut ranges = Vec::new();
        loop {
            let at = self.pos;
            let lo = match self.class_char(open)? {
                None => break,
                Some(c) => c,
            };
            // `-` makes a range unless it comes last (`[a-]`), as in llama.cpp.
            let hi = if self.peek() == Some('-') && self.peek2() != Some(']') {
                self.bump();
                match self.class_char(open)? {
                    Some(c) => c,
                    None => return self.err(open, "character class is not closed on its line"),
                }
            } else {
                lo
            };
            if hi < lo {
                let (lo, hi) = (lo.escape_debug(), hi.escape_debug());
                return self.err(at, format!("class range `{lo}-{hi}` is reversed"));
            }
            ranges.push((lo, hi));
        }
        if ranges.is_empty() {
            return self.err(open, "empty character class");
        }
        Ok(Expr::Class { negated, ranges })
    }

    /// One char of a class, None at its closing `]`.
    fn class_char(&mut self, open: usize) -> PResult<Option<char>> {
        match self.peek() {
            None | Some('\n' | '\r') => {
                self.err(open, "character class is not closed on its line (write a newline as \\n)")
            }
            Some(']') => {
                self.bump();
                Ok(None)
            }
            Some('\\') => self.escape().map(Some),
            Some(c) => {
                self.bump();
                Ok(Some(c))
            }
        }
    }

    /// A backslash escape (llama.cpp `parse_char`), at the `\`.
    fn escape(&mut self) -> PResult<char> {
        let at = self.pos;
        self.bump();
        let Some(c) = self.bump() else {
            return self.err(at, "`\\` at the end of the grammar");
        };
        let digits = match c {
            'n' => return Ok('\n'),
            'r' => return Ok('\r'),
            't' => return Ok('\t'),
            '\\' | '"' | '[' | ']' | '-' | '^' | '\'' | '/' => return Ok(c),
            'x' => 2,
            'u' => 4,
            'U' => 8,
            c => return self.err(at, format!("unknown escape `\\{}`", c.escape_debug())),
        };
        let hex = self.rest().as_bytes().iter().take(digits);
        if hex.len() < digits || !hex.clone().all(u8::is_ascii_hexdigit) {
            return self.err(at, format!("`\\{c}` needs {digits} hex digits"));
        }
        let text = &self.rest()[..digits];
        self.pos += digits;
        // Eight hex digits fit a u32.
        let code = u32::from_str_radix(text, 16).unwrap_or(u32::MAX);
        match char::from_u32(code) {
            Some(ch) => Ok(ch),
            None => self.err(at, format!("`\\{c}{text}` is not a Unicode scalar value (no text contains it)")),
        }
    }

    /// `{m}`, `{m,}`, `{m,n}` or `{,n}`, at the `{`.
    fn braces(&mut self) -> PResult<(u32, Option<u32>)> {
        let open = self.pos;
        self.bump();
        self.skip_blank();
        let min = self.count()?;
        self.skip_blank();
        let (min, max) = match (self.bump(), min) {
            (Some('}'), Some(m)) => (m, Some(m)),
            (Some(','), _) => {
                self.skip_blank();
                let max = self.count()?;
                self.skip_blank();
                if self.bump() != Some('}') || (min.is_none() && max.is_none()) {
                    return self.err(open, "expected `{m}`, `{m,}`, `{m,n}` or `{,n}`");
                }
                (min.unwrap_or(0), max)
            }
            _ => return self.err(open, "expected `{m}`, `{m,}`, `{m,n}` or `{,n}`"),
        };
        if let Some(max) = max {
            if min > max {
                return self.err(open, format!("repetition `{{{min},{max}}}` has min above max"));
            }
        }
        Ok((min, max))
    }

    /// A decimal count up to MAX_REPEAT, or None if no digit is here.
    fn count(&mut self) -> PResult<Option<u32>> {
        let at = self.pos;
        let rest = self.rest();
        let n = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if n == 0 {
            return Ok(None);
        }
        self.pos += n;
        self.fresh_line = false;
        match rest[..n].parse::<u32>() {
            Ok(v) if v <= MAX_REPEAT => Ok(Some(v)),
            _ => self.err(at, format!("repetition count above the limit of {MAX_REPEAT}")),
        }
    }
}

/// How many Repeat wrappers `e` has on top.
fn postfix_depth(e: &Expr) -> usize {
    match e {
        Expr::Repeat { inner, .. } => 1 + postfix_depth(inner),
        _ => 0,
    }
}

/// The Lark name of each GBNF rule name: `root` is `start`, the rest
/// lowercased, with `r_` before a name that does not start with a letter.
/// Also checks that every rule is defined once, that `root` is there, that
/// no two names meet in one Lark name, and that every reference is defined.
fn lark_names<'r>(src: &str, rules: &'r [Rule]) -> Result<HashMap<&'r str, String>, String> {
    let mut names: HashMap<&str, String> = HashMap::new();
    let mut owner: HashMap<String, &Rule> = HashMap::new();
    for rule in rules {
        let lark = lark_name(&rule.name);
        if let Some(prev) = owner.get(&lark) {
            let (line, _) = line_col(src, prev.pos);
            let msg = if prev.name == rule.name {
                format!("rule `{}` is already defined on line {line}", rule.name)
            } else {
                format!(
                    "rule names `{}` (line {line}) and `{}` both become `{lark}` in Lark; rename one",
                    prev.name, rule.name
                )
            };
            return Err(error_at(src, rule.pos, msg));
        }
        owner.insert(lark.clone(), rule);
        names.insert(&rule.name, lark);
    }
    if !names.contains_key("root") {
        return Err("the grammar has no `root` rule (GBNF starts at `root ::= ...`)".into());
    }
    for rule in rules {
        check_refs(src, &rule.body, &names)?;
    }
    Ok(names)
}

fn lark_name(gbnf: &str) -> String {
    if gbnf == "root" {
        return "start".into();
    }
    let lower = gbnf.to_ascii_lowercase();
    if lower.starts_with(|c: char| c.is_ascii_lowercase()) {
        lower
    } else {
        format!("r_{lower}")
    }
}

fn check_refs(src: &str, e: &Expr, names: &HashMap<&str, String>) -> Result<(), String> {
    match e {
        Expr::Alt(v) | Expr::Seq(v) => v.iter().try_for_each(|e| check_refs(src, e, names)),
        Expr::Repeat { inner, .. } => check_refs(src, inner, names),
        Expr::Ref { name, pos } if !names.contains_key(name.as_str()) => {
            Err(error_at(src, *pos, format!("rule `{name}` is not defined")))
        }
        Expr::Ref { .. } | Expr::Lit(_) | Expr::Class { .. } | Expr::Any => Ok(()),
    }
}

/// Where an expression is written, loosest first: as a rule body or inside
/// `( )` (Alt), as one alternative (Seq), as one item of a sequence (Item),
/// or under a postfix operator (Atom). A compound expression looser than its
/// place gets parentheses.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Prec {
    Alt,
    Seq,
    Item,
    Atom,
}

fn write_expr(out: &mut String, e: &Expr, names: &HashMap<&str, String>, prec: Prec) {
    match e {
        Expr::Alt(alts) => {
            let paren = prec > Prec::Alt;
            out.push_str(if paren { "(" } else { "" });
            for (i, alt) in alts.iter().enumerate() {
                out.push_str(if i > 0 { " | " } else { "" });
                write_expr(out, alt, names, Prec::Seq);
            }
            out.push_str(if paren { ")" } else { "" });
        }
        Expr::Seq(items) if items.is_empty() => out.push_str("\"\""),
        Expr::Seq(items) => {
            let paren = prec > Prec::Seq;
            out.push_str(if paren { "(" } else { "" });
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i > 0 { " " } else { "" });
                write_expr(out, item, names, Prec::Item);
            }
            out.push_str(if paren { ")" } else { "" });
        }
        Expr::Lit(s) => write_lark_string(out, s),
        Expr::Class { negated, ranges } => {
            out.push_str(if *negated { "/[^" } else { "/[" });
            for &(lo, hi) in ranges {
                write_class_char(out, lo);
                if hi != lo {
                    out.push('-');
                    write_class_char(out, hi);
                }
            }
            out.push_str("]/");
        }
        Expr::Any => out.push_str("/(?s:.)/"),
        // Checked by lark_names: every reference has a name.
        Expr::Ref { name, .. } => out.push_str(names.get(name.as_str()).map_or("", |s| s)),
        // llguidance rejects `x{0}` ("End number in range cannot be 0").
        Expr::Repeat { max: Some(0), .. } => out.push_str("\"\""),
        Expr::Repeat { inner, min, max } => {
            let paren = prec > Prec::Item;
            out.push_str(if paren { "(" } else { "" });
            write_expr(out, inner, names, Prec::Atom);
            let _ = match (min, max) {
                (0, None) => write!(out, "*"),
                (1, None) => write!(out, "+"),
                (0, Some(1)) => write!(out, "?"),
                (m, None) => write!(out, "{{{m},}}"),
                (m, Some(n)) if m == n => write!(out, "{{{m}}}"),
                (m, Some(n)) => write!(out, "{{{m},{n}}}"),
            };
            out.push_str(if paren { ")" } else { "" });
        }
    }
}

/// A Lark string literal: JSON syntax, as llguidance's lexer takes it
/// (`"(\\([\"\\/bfnrt]|u[a-fA-F0-9]{4}|x..)|[^\"\\\x00-\x1F\x7F])*"`). Control
/// characters (C0, DEL and C1) are escaped; everything else is written as is.
fn write_lark_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One char inside a `/[...]/` regex class (Rust `regex` syntax, which
/// llguidance's derivre parses). `\ [ ] ^ - & ~` are class syntax there and
/// `/` ends the Lark regex, so they are escaped; so are `\n \r \t`, and
/// other controls and invisible whitespace as `\x{..}`.
fn write_class_char(out: &mut String, c: char) {
    match c {
        '\\' | '[' | ']' | '^' | '-' | '&' | '~' | '/' => {
            out.push('\\');
            out.push(c);
        }
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        ' ' => out.push(' '),
        c if c.is_control() || c.is_whitespace() => {
            let _ = write!(out, "\\x{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests;
