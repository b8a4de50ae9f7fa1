//! `kestrel bench startup`: how long `kestrel serve` takes from process
//! start to serving. Each run spawns this binary's `serve` on a free port of
//! 127.0.0.1, times the ready line, the first 200 from `/health` and the
//! first answered one-token chat request, then kills the server and waits
//! for it before the next run. Also the server that `bench serve --launch`
//! starts.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::cli::bench::stats;
use crate::cli::bench_serve::agent;
use crate::error::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct StartupArgs {
    /// Model folder or Hugging Face id, passed to `kestrel serve` (default:
    /// the built-in tiny model).
    #[arg(long)]
    pub model: Option<String>,
    /// Server starts to time.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Seconds a start may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Write every run's times as JSON.
    #[arg(long)]
    pub result_json: Option<PathBuf>,
    /// Flags for `kestrel serve` (after `--`), e.g. `-- --device cuda`.
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

/// A `kestrel serve` child on 127.0.0.1; killed and reaped on drop.
pub struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    /// Starts `kestrel serve [MODEL] --host 127.0.0.1 --port 0 ARGS` (this
    /// binary) and waits up to `timeout` for its ready line, which names the port.
    pub fn launch(model: Option<&str>, serve_args: &[String], timeout: Duration) -> Result<ServerProcess> {
        let exe = std::env::current_exe().map_err(|source| Error::Io { path: "the kestrel binary".into(), source })?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve");
        if let Some(m) = model {
            cmd.arg(m);
        }
        cmd.args(["--host", "127.0.0.1", "--port", "0"]).args(serve_args).stdout(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| Error::Io { path: "kestrel serve".into(), source })?;
        let Some(stdout) = child.stdout.take() else {
            return Err(Error::Engine("kestrel serve: no stdout".into()));
        };
        let (tx, rx) = mpsc::channel();
        // Reads every line, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::io::Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = ServerProcess { child, port: 0 };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(port) = ready_port(&line) {
                        server.port = port;
                        return Ok(server);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::Engine(format!("kestrel serve was not ready in {} s", timeout.as_secs())))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.child.wait().map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Err(Error::Engine(format!("kestrel serve exited before it was ready ({status})")));
                }
            }
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in `kestrel: serving NAME on http://HOST:PORT (device D)`.
fn ready_port(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("kestrel: serving ")?;
    let addr = rest.split(" on http://").nth(1)?.split(' ').next()?;
    addr.rsplit_once(':')?.1.parse().ok()
}

/// One start, in milliseconds from spawning the process.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Start {
    pub ready_line_ms: f64,
    pub health_ms: f64,
    pub first_token_ms: f64,
}

/// Starts the server, polls /health every 2 ms until it answers 200, then
/// sends one chat request for one token.
fn time_start(args: &StartupArgs) -> Result<Start> {
    let timeout = Duration::from_secs(args.timeout);
    let t0 = Instant::now();
    let server = ServerProcess::launch(args.model.as_deref(), &args.serve_args, timeout)?;
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let ready_line_ms = ms(Instant::now());
    let (agent, base) = (agent(timeout, 1), server.base_url());
    loop {
        match agent.get(format!("{base}/health")).call() {
            Ok(r) if r.status().as_u16() == 200 => break,
            _ if t0.elapsed() > timeout => {
                return Err(Error::Engine(format!("/health did not answer 200 in {} s", args.timeout)))
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let health_ms = ms(Instant::now());
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "temperature": 0.0});
    let mut resp = agent
        .post(format!("{base}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| Error::Engine(format!("the first request: {e}")))?;
    if resp.status().as_u16() != 200 {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        return Err(Error::Engine(format!("the first request: HTTP {}: {text:.300}", resp.status())));
    }
    let first_token_ms = ms(Instant::now());
    drop(server);
    Ok(Start { ready_line_ms, health_ms, first_token_ms })
}

/// Every run's times and their medians, as `--result-json` writes them.
#[derive(Debug, Serialize)]
pub struct StartupSummary {
    pub runs: Vec<Start>,
    pub median_health_ms: f64,
    pub median_first_token_ms: f64,
}

pub fn startup(args: &StartupArgs) -> Result<(String, StartupSummary)> {
    if args.repeat == 0 {
        return Err(Error::InvalidInput("--repeat must be positive".into()));
    }
    let mut report = String::from("run  ready line ms  /health 200 ms  first token ms\n");
    let mut runs = Vec::new();
    for i in 0..args.repeat {
        let s = time_start(args)?;
        report +=
            &format!("{:>3}  {:>13.1}  {:>14.1}  {:>14.1}\n", i + 1, s.ready_line_ms, s.health_ms, s.first_token_ms);
        runs.push(s);
    }
    let median = |f: fn(&Start) -> f64| stats(&runs.iter().map(f).collect::<Vec<_>>()).1;
    let summary = StartupSummary {
        median_health_ms: median(|s| s.health_ms),
        median_first_token_ms: median(|s| s.first_token_ms),
        runs,
    };
    report += &format!(
        "median of {}: /health 200 at {:.1} ms, first token at {:.1} ms after process start\n",
        args.repeat, summary.median_health_ms, summary.median_first_token_ms
    );
    if let Some(p) = &args.result_json {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Engine(e.to_string()))?;
        std::fs::write(p, text + "\n").map_err(|source| Error::Io { path: p.display().to_string(), source })?;
    }
    Ok((report, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_names_the_port() {
        assert_eq!(ready_port("kestrel: serving tiny on http://127.0.0.1:41234 (device cpu)"), Some(41234));
        assert_eq!(ready_port("kestrel: serving a b on http://[::1]:80 (device H100)"), Some(80));
        assert_eq!(ready_port("loading weights"), None);
    }
}
