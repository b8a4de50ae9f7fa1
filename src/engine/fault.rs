//! Fault injection for the server's hardening tests (tests/hardening.rs),
//! which run the debug binary: `KESTREL_FAULT=<kind>:<marker>[,...]` makes a
//! request whose prompt contains `<marker>` fail in the way `kind` names:
//!
//! - `engine-panic`  the engine thread panics while admitting it
//! - `engine-hang`   the engine thread stops answering while admitting it
//! - `worker-panic`  its HTTP worker panics before submitting it
//!
//! Release builds compile `hit` to `false`: nothing here can be triggered
//! in a build that serves.

/// Whether the fault `kind` is asked for `prompt`.
#[cfg(debug_assertions)]
pub fn hit(kind: &str, prompt: &str) -> bool {
    use std::sync::OnceLock;
    static SPEC: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("KESTREL_FAULT").unwrap_or_default();
        v.split(',')
            .filter_map(|f| f.split_once(':'))
            .filter(|(_, marker)| !marker.is_empty())
            .map(|(k, m)| (k.to_owned(), m.to_owned()))
            .collect()
    });
    spec.iter().any(|(k, m)| k == kind && prompt.contains(m.as_str()))
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_kind: &str, _prompt: &str) -> bool {
    false
}
