//! How every subcommand names its model: `--model` (a folder or a Hugging
//! Face id) and `--revision`, resolved by `model_dir` through
//! `hub::resolve_model`, the one path for `generate`, `serve` and `bench`.

use std::path::PathBuf;

use crate::error::Result;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// Model folder, or a Hugging Face id (org/name) taken from the local
    /// Hugging Face cache or downloaded into it (default: the built-in tiny model).
    #[arg(long)]
    pub model: Option<String>,
    /// Branch, tag or commit of a Hugging Face --model (default: main).
    #[arg(long)]
    pub revision: Option<String>,
}

impl ModelArgs {
    /// The model folder (`model_dir`); a note when --revision cannot apply.
    pub fn dir(&self) -> Result<PathBuf> {
        let folder = self.model.as_deref().is_none_or(|m| std::path::Path::new(m).is_dir());
        if self.revision.is_some() && folder {
            eprintln!("kestrel: note: --revision has no effect: the model is a local folder, used as it is");
        }
        model_dir(self.model.as_deref(), self.revision.as_deref())
    }
}

/// The model folder for MODEL at `revision`: a folder as given, a Hub id
/// from the cache (downloaded first if missing), or without MODEL the
/// built-in model.
pub fn model_dir(model: Option<&str>, revision: Option<&str>) -> Result<PathBuf> {
    match model {
        Some(m) => crate::hub::resolve_model(m, revision),
        None => crate::model::builtin::materialize(),
    }
}
