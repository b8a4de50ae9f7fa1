//! huggingface_hub's cache layout (src/huggingface_hub/file_download.py,
//! `hf_hub_download`), so the Python client and Kestrel share one cache:
//!
//! ```text
//! <cache>/models--org--name/
//!     blobs/<etag>                 file contents, named by ETag (LFS sha256 or git blob id)
//!     blobs/<etag>.incomplete      a download in progress, resumed from its length
//!     snapshots/<commit>/<file>    relative links to ../../blobs/<etag>
//!     refs/<revision>              the commit a branch or tag pointed at
//! <cache>/.locks/models--org--name/<etag>.lock   held (flock) while a blob downloads
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use super::RepoId;
use crate::error::{Error, Result};

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// A 40-digit lowercase hex commit id.
pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One repo's folder in the cache.
pub(crate) struct RepoCache {
    root: PathBuf,
    locks: PathBuf,
}

impl RepoCache {
    pub fn new(cache: &Path, repo: &RepoId) -> Self {
        RepoCache { root: cache.join(repo.folder_name()), locks: cache.join(".locks").join(repo.folder_name()) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// The snapshot folder `revision` names here (a commit, or a ref to
    /// one), if there is one.
    pub fn snapshot_for(&self, revision: &str) -> Option<PathBuf> {
        let commit = if is_commit(revision) {
            revision.to_owned()
        } else {
            let c = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
            Some(c.trim().to_owned()).filter(|c| is_commit(c))?
        };
        Some(self.snapshot_dir(&commit)).filter(|d| d.is_dir())
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    /// Takes the blob's lock, waiting (and saying so) while another process
    /// (Kestrel or huggingface_hub, which also uses flock) holds it. Held
    /// until the returned file is dropped.
    pub fn lock(&self, etag: &str) -> Result<File> {
        std::fs::create_dir_all(&self.locks).map_err(|e| io(&self.locks, e))?;
        let path = self.locks.join(format!("{etag}.lock"));
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| io(&path, e))?;
        if file.try_lock().is_err() {
            eprintln!("kestrel: waiting for another download of the same file to finish ({})", path.display());
            file.lock().map_err(|e| io(&path, e))?;
        }
        Ok(file)
    }

    /// Links `snapshots/<commit>/<name>` to the blob, replacing whatever
    /// was there (a link to a deleted blob).
    pub fn link(&self, commit: &str, name: &str, etag: &str) -> Result<()> {
        let pointer = self.snapshot_dir(commit).join(name);
        let parent = pointer.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        if pointer.symlink_metadata().is_ok() {
            std::fs::remove_file(&pointer).map_err(|e| io(&pointer, e))?;
        }
        // snapshots/<commit>/<dir/.../name> -> ../../(../ per dir)blobs/<etag>
        let up = "../".repeat(2 + name.matches('/').count());
        let target = PathBuf::from(format!("{up}blobs/{etag}"));
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        let linked = std::fs::copy(self.blob(etag), &pointer).map(|_| ());
        match linked {
            // Another process linked it first, to the same blob.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && pointer.exists() => Ok(()),
            other => other.map_err(|e| io(&pointer, e)),
        }
    }

    /// Writes `refs/<revision>` = `commit` (nothing for a commit itself),
    /// through a temporary file so a reader never sees half of it.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        let parent = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        let tmp = parent.join(format!(".ref.{}", std::process::id()));
        std::fs::write(&tmp, commit).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refs_and_links() {
        let cache = std::env::temp_dir().join(format!("kestrel-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let rc = RepoCache::new(&cache, &RepoId::parse("org/name").unwrap());
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(rc.root(), cache.join("models--org--name"));
        assert_eq!(rc.snapshot_for("main"), None);
        std::fs::create_dir_all(rc.blob("e").parent().unwrap()).unwrap();
        std::fs::write(rc.blob("e"), "hi").unwrap();
        rc.link(commit, "config.json", "e").unwrap();
        rc.link(commit, "config.json", "e").unwrap(); // replaces
        let pointer = rc.snapshot_dir(commit).join("config.json");
        assert_eq!(std::fs::read_to_string(&pointer).unwrap(), "hi");
        assert_eq!(std::fs::read_link(&pointer).unwrap(), PathBuf::from("../../blobs/e"));
        assert_eq!(rc.snapshot_for(commit), Some(rc.snapshot_dir(commit)));
        assert_eq!(rc.snapshot_for("main"), None);
        rc.write_ref("main", commit).unwrap();
        rc.write_ref("refs/pr/1", commit).unwrap();
        assert_eq!(std::fs::read_to_string(rc.root().join("refs/main")).unwrap(), commit);
        assert_eq!(rc.snapshot_for("main"), Some(rc.snapshot_dir(commit)));
        assert_eq!(rc.snapshot_for("refs/pr/1"), Some(rc.snapshot_dir(commit)));
        let _held = rc.lock("e").unwrap();
        assert!(cache.join(".locks/models--org--name/e.lock").is_file());
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
