//! One request from accept to answer: which route, 503 while shutting down,
//! the API key, the bound on requests in flight, then the route's handler under catch_unwind (a
//! panic is a 500, never a dead worker), then the reply and its count in
//! /metrics. vLLM's routes (vllm/entrypoints/openai/api_server.py) and its
//! API-key middleware: the key guards /v1 paths only.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::http::{body_text, read_body, send_full, send_stream, ApiError, Reply};
use super::{embed, generate, info, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
    Health,
    Version,
    Tokenize,
    Detokenize,
    Metrics,
}

const ROUTES: [Route; 9] = [
    Route::ChatCompletions,
    Route::Completions,
    Route::Embeddings,
    Route::Models,
    Route::Health,
    Route::Version,
    Route::Tokenize,
    Route::Detokenize,
    Route::Metrics,
];

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Models => "/v1/models",
            Route::Health => "/health",
            Route::Version => "/version",
            Route::Tokenize => "/tokenize",
            Route::Detokenize => "/detokenize",
            Route::Metrics => "/metrics",
        }
    }

    fn method(self) -> &'static str {
        match self {
            Route::ChatCompletions | Route::Completions | Route::Embeddings | Route::Tokenize | Route::Detokenize => {
                "POST"
            }
            Route::Models | Route::Health | Route::Version | Route::Metrics => "GET",
        }
    }

    /// Requests that reach the engine: bounded by --max-queue.
    fn is_work(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Completions | Route::Embeddings)
    }

    fn parse(path: &str) -> Option<Route> {
        let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
        ROUTES.into_iter().find(|r| r.path() == path)
    }
}

/// Counts a request in flight while alive.
struct InFlight<'a>(&'a State);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Handles one request and answers it.
pub(crate) fn handle(state: &State, mut rq: tiny_http::Request) {
    let arrival = Instant::now();
    super::take_note();
    let method = rq.method().as_str().to_owned();
    let path = rq.url().split(['?', '#']).next().unwrap_or("").to_owned();
    let route = Route::parse(&path);
    let label = route.map_or("other", Route::path);

    let mut _guard = None;
    let early = match route {
        None => Some(ApiError::new(404, format!("Not Found: no route {path}"), Some("not_found"))),
        Some(r) if method != r.method() => Some(
            ApiError::new(405, format!("Method Not Allowed: {path} takes {}", r.method()), Some("method_not_allowed"))
                .with_header("Allow", r.method()),
        ),
        Some(_) if state.draining.load(Ordering::SeqCst) => Some(
            ApiError::new(
                503,
                "The server is shutting down; send the request to another replica",
                Some("shutting_down"),
            )
            .with_header("Retry-After", "1"),
        ),
        Some(r) => check_api_key(state, &rq, r).err().or_else(|| {
            if !r.is_work() {
                return None;
            }
            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            _guard = Some(InFlight(state));
            match state.cfg.max_queue {
                Some(max) if now > max => Some(
                    ApiError::new(
                        429,
                        format!("The server is overloaded: {max} requests are in flight (--max-queue); retry shortly"),
                        Some("server_overloaded"),
                    )
                    .with_header("Retry-After", "1"),
                ),
                _ => None,
            }
        }),
    };

    let reply = match (early, route) {
        // The body is left unread: the connection cannot be reused.
        (Some(e), _) => Reply::error(e.with_header("Connection", "close")),
        (None, Some(r)) => catch_unwind(AssertUnwindSafe(|| dispatch(state, r, &mut rq, arrival)))
            .unwrap_or_else(|_| {
                Err(ApiError::new(500, "internal error while handling the request (see the server log)", None))
            })
            .unwrap_or_else(Reply::error),
        (None, None) => Reply::error(ApiError::new(404, "Not Found", Some("not_found"))),
    };
    // A whole reply is counted before it is sent, so a client that reads
    // it and then asks /metrics finds it there; a stream's status is known
    // only once it has been sent.
    let status = match reply {
        Reply::Full { status, content_type, headers, body } => {
            state.metrics.http_request(label, &method, status);
            send_full(rq, status, content_type, headers, body)
        }
        Reply::Stream(stream) => {
            let status = send_stream(rq, stream);
            state.metrics.http_request(label, &method, status);
            status
        }
    };
    let log = state.cfg.request_log;
    if log == super::RequestLog::All || (log == super::RequestLog::Failures && status >= 400) {
        eprintln!("{}", log_line(&super::take_note(), &method, label, status, arrival.elapsed()));
    }
}

/// The request log's line: no prompt text, only counts and times.
fn log_line(n: &super::LogNote, method: &str, route: &str, status: u16, total: std::time::Duration) -> String {
    let opt = |v: Option<usize>| v.map_or("-".to_owned(), |v| v.to_string());
    let ttft = n.ttft.map_or("-".to_owned(), |t| format!("{:.1}", t.as_secs_f64() * 1e3));
    format!(
        "kestrel: request id={} {method} {route} status={status} prompt_tokens={} output_tokens={} media={} \
         ttft_ms={ttft} total_ms={:.1}",
        n.id.as_deref().unwrap_or("-"),
        opt(n.prompt_tokens),
        opt(n.output_tokens),
        n.media,
        total.as_secs_f64() * 1e3
    )
}

/// 401 unless the route is open or the request carries the key.
fn check_api_key(state: &State, rq: &tiny_http::Request, route: Route) -> Result<(), ApiError> {
    let Some(key) = &state.cfg.api_key else { return Ok(()) };
    if !route.path().starts_with("/v1") {
        return Ok(());
    }
    let given = rq
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            401,
            "Unauthorized: a valid API key is required (header `Authorization: Bearer <key>`)",
            Some("invalid_api_key"),
        )),
    }
}

/// Equality whose time does not depend on where the inputs first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn dispatch<'a>(
    state: &'a State,
    route: Route,
    rq: &mut tiny_http::Request,
    arrival: Instant,
) -> Result<Reply<'a>, ApiError> {
    match route {
        Route::Models => return Ok(info::models(state)),
        Route::Health => return Ok(info::health(state)),
        Route::Version => return Ok(info::version()),
        Route::Metrics => return Ok(info::metrics(state)),
        _ => {}
    }
    let body = read_body(rq, state.cfg.max_body_bytes, state.cfg.connection.body_timeout)?;
    let text = body_text(&body)?;
    let rq = &*rq;
    let gone = || rq.peer_closed();
    match route {
        Route::ChatCompletions => generate::chat(state, text, arrival, &gone),
        Route::Completions => generate::completions(state, text, arrival, &gone),
        Route::Embeddings => embed::embeddings(state, text),
        Route::Tokenize => info::tokenize(state, text),
        Route::Detokenize => info::detokenize(state, text),
        Route::Models | Route::Health | Route::Version | Route::Metrics => Err(ApiError::new(500, "unrouted", None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_with_or_without_a_trailing_slash() {
        assert_eq!(Route::parse("/v1/chat/completions"), Some(Route::ChatCompletions));
        assert_eq!(Route::parse("/v1/models/"), Some(Route::Models));
        assert_eq!(Route::parse("/v1/chat"), None);
        assert_eq!(Route::parse("/"), None);
        assert!(ROUTES.iter().all(|r| Route::parse(r.path()) == Some(*r)));
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
