//! A `kestrel serve` on the CPU backend spoken to over HTTP (ureq): start it
//! with arguments, POST JSON, read a stream's events. Killed on drop.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

use serde_json::Value;

/// A test client: error statuses come back as responses, no proxy, 120 s
/// for a whole request.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// `kestrel serve ARGS` (the built-in tiny model unless ARGS name one),
    /// four workers unless ARGS say otherwise.
    pub fn start(args: &[&str]) -> Server {
        let workers: &[&str] = if args.contains(&"--workers") { &[] } else { &["--workers", "4"] };
        let (child, port, _) = super::spawn_serve(&[workers, args].concat(), &[]);
        Server { child, port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn agent() -> ureq::Agent {
        agent()
    }

    /// POSTs JSON; (status, body as JSON, or as a JSON string if it is not JSON).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut resp = Self::agent()
            .post(self.url(path))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .expect("a response");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A streamed request's `data:` payloads as JSON, without the final
    /// `[DONE]` (which must be there).
    pub fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let resp = Self::agent().post(self.url(path)).send(body.to_string()).expect("a response");
        assert_eq!(resp.status().as_u16(), 200);
        let reader = BufReader::new(resp.into_body().into_reader());
        let mut events: Vec<String> =
            reader.lines().map(Result::unwrap).filter_map(|l| l.strip_prefix("data: ").map(str::to_owned)).collect();
        assert_eq!(events.pop().as_deref(), Some("[DONE]"));
        events.iter().map(|e| serde_json::from_str(e).unwrap()).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
