//! What the fuzz targets share: the tiny Qwen2-VL's frontend (config,
//! tokenizer, chat template, image processor; no weights) and the rule that
//! every error user input can cause is the user's (a 4xx), never a 500.

use std::path::Path;
use std::sync::OnceLock;

use kestrel::model::config::Qwen2VlConfig;
use kestrel::model::qwen2_vl::inputs::Processors;
use kestrel::openai::protocol::ErrorResponse;
use kestrel::text::chat_template::ChatTemplate;
use kestrel::text::tokenizer::Tokenizer;
use kestrel::Error;

/// The built-in model's files, as the server loads them.
pub struct Frontend {
    pub config: Qwen2VlConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub processors: Processors,
}

/// Loaded once per fuzzing process from src/model/builtin/tiny-qwen2-vl.
pub fn frontend() -> &'static Frontend {
    static F: OnceLock<Frontend> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/model/builtin/tiny-qwen2-vl");
        fn load<T>(r: kestrel::Result<T>, dir: &Path) -> T {
            r.unwrap_or_else(|e| panic!("the fuzz fixture {}: {e}", dir.display()))
        }
        Frontend {
            config: load(Qwen2VlConfig::from_dir(&dir), &dir),
            tokenizer: load(Tokenizer::from_dir(&dir), &dir),
            template: load(ChatTemplate::from_dir(&dir), &dir),
            processors: load(Processors::from_dir(&dir), &dir),
        }
    })
}

/// Fails (a crash the fuzzer records) unless the server would answer `e`
/// with a 4xx: anything else is a 500 caused by what a client sent.
pub fn assert_user_error(e: &Error, stage: &str) {
    let (status, _) = ErrorResponse::from_error(e);
    assert!((400..500).contains(&status), "{stage}: user input caused a {status}: {e}");
}

/// `r`'s value, or None after checking that its error is the user's.
pub fn user_ok<T>(r: kestrel::Result<T>, stage: &str) -> Option<T> {
    r.map_err(|e| assert_user_error(&e, stage)).ok()
}
