//! `vllm serve`'s flags for tool calling and structured outputs
//! (vllm/entrypoints/openai/cli_args.py, vllm/engine/arg_utils.py), as
//! `kestrel serve` takes them.
//!
//! - `--tool-call-parser NAME`: how `tool_choice: "auto"` answers are read
//!   for calls. `hermes` (Qwen2/2.5 and Hermes models: `<tool_call>` JSON
//!   blocks) is implemented; other vLLM parser names are refused at start.
//!   Without the flag, the model family's own format is used when it has
//!   one (Qwen2-VL: hermes).
//! - `--enable-auto-tool-choice`: vLLM needs it for `"auto"`; here `"auto"`
//!   works whenever a parser is known, and the flag makes the start fail if
//!   none is (so it is never accepted and ignored).
//! - `--guided-decoding-backend`: `auto`, `guidance` or `llguidance` (the
//!   engine Kestrel has); `xgrammar`, `outlines` and `lm-format-enforcer`
//!   are refused with the reason.

use crate::error::{Error, Result};

/// Tool-call formats Kestrel reads.
pub const TOOL_PARSERS: [&str; 1] = ["hermes"];

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ToolFlags {
    /// Let `tool_choice: "auto"` requests call tools (on whenever a tool-call
    /// parser is known; with this flag, a start without one fails).
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// The tool-call format of the model's answers: hermes. Default: the
    /// model family's own (Qwen2-VL: hermes; others: none).
    #[arg(long, value_name = "NAME")]
    pub tool_call_parser: Option<String>,
    /// Refused: Kestrel loads no Python plugins.
    #[arg(long, value_name = "PATH")]
    pub tool_parser_plugin: Option<String>,
    /// The structured-outputs engine: auto, guidance or llguidance (all the
    /// same: llguidance); others are refused.
    #[arg(long, value_name = "NAME")]
    pub guided_decoding_backend: Option<String>,
}

impl ToolFlags {
    /// The tool-call parser to use: the flag's, else the family's; the
    /// flags' refusals with their reasons.
    pub fn parser(&self, family_default: Option<&'static str>) -> Result<Option<&'static str>> {
        let refuse = |msg: String| Err(Error::InvalidInput(msg));
        if self.tool_parser_plugin.is_some() {
            return refuse("--tool-parser-plugin is not supported: Kestrel runs no Python plugins".into());
        }
        match self.guided_decoding_backend.as_deref() {
            None | Some("auto" | "guidance" | "llguidance") => {}
            Some(b) => {
                return refuse(format!(
                    "--guided-decoding-backend {b} is not available: structured outputs run on llguidance \
                     (vLLM's guidance backend); use auto or guidance"
                ))
            }
        }
        let parser = match self.tool_call_parser.as_deref() {
            None => family_default,
            Some(p) => match TOOL_PARSERS.iter().find(|&&k| k == p) {
                Some(&k) => Some(k),
                None => {
                    return refuse(format!(
                        "--tool-call-parser {p} is not supported; Kestrel reads: {}",
                        TOOL_PARSERS.join(", ")
                    ))
                }
            },
        };
        if self.enable_auto_tool_choice && parser.is_none() {
            return refuse(
                "--enable-auto-tool-choice needs a tool-call format: this model family has none of its own; \
                 pass --tool-call-parser hermes if the model writes <tool_call> blocks"
                    .into(),
            );
        }
        Ok(parser)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        f: ToolFlags,
    }

    fn parse(args: &[&str]) -> ToolFlags {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().f
    }

    #[test]
    fn parser_from_the_flag_or_the_family() {
        assert_eq!(parse(&[]).parser(Some("hermes")).unwrap(), Some("hermes"));
        assert_eq!(parse(&[]).parser(None).unwrap(), None);
        let hermes = parse(&["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]);
        assert_eq!(hermes.parser(None).unwrap(), Some("hermes"));
        assert_eq!(parse(&["--enable-auto-tool-choice"]).parser(Some("hermes")).unwrap(), Some("hermes"));
        for b in ["auto", "guidance", "llguidance"] {
            parse(&["--guided-decoding-backend", b]).parser(None).unwrap();
        }
    }

    #[test]
    fn refusals_say_why() {
        let e = |args: &[&str], fam| parse(args).parser(fam).unwrap_err().to_string();
        assert!(e(&["--tool-call-parser", "mistral"], None).contains("Kestrel reads: hermes"));
        assert!(e(&["--enable-auto-tool-choice"], None).contains("--tool-call-parser hermes"));
        assert!(e(&["--tool-parser-plugin", "p.py"], None).contains("Python plugins"));
        assert!(e(&["--guided-decoding-backend", "xgrammar"], None).contains("llguidance"));
    }
}
