//! The HTTP side of a request: reading the body under a cap, error bodies,
//! plain replies, and the server-sent-events writer (vLLM streams with
//! FastAPI's `StreamingResponse(media_type="text/event-stream")`).

use std::io::{Read, Write};

use serde::Serialize;

use crate::error::Error;
use crate::openai::protocol::ErrorResponse;

/// An error answer: status, OpenAI error body, extra headers.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub message: String,
    pub code: Option<&'static str>,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>, code: Option<&'static str>) -> Self {
        ApiError { status, message: message.into(), code, headers: Vec::new() }
    }

    pub fn bad_request(message: String) -> Self {
        ApiError::new(400, message, None)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, body) = ErrorResponse::from_error(&e);
        if status >= 500 {
            eprintln!("kestrel: request failed: {e}");
        }
        let code = matches!(e, Error::MediaFetch(_)).then_some("media_fetch_failed");
        ApiError::new(status, body.error.message, code)
    }
}

/// A stream of server-sent events, produced as the engine's events arrive.
pub(crate) trait EventStream {
    /// Blocks for the next events' `data:` payloads (JSON text, or
    /// `[DONE]`); None once the stream is over.
    fn next(&mut self) -> Option<Vec<String>>;
    /// The client went away: stop the work behind the stream.
    fn client_gone(&mut self);
}

/// What a route answers.
pub(crate) enum Reply<'a> {
    Full { status: u16, content_type: &'static str, headers: Vec<(&'static str, String)>, body: Vec<u8> },
    Stream(Box<dyn EventStream + 'a>),
}

impl<'a> Reply<'a> {
    pub fn json<T: Serialize>(status: u16, v: &T) -> Reply<'a> {
        match serde_json::to_vec(v) {
            Ok(body) => Reply::Full { status, content_type: "application/json", headers: Vec::new(), body },
            Err(e) => Reply::error(ApiError::new(500, format!("could not write the response: {e}"), None)),
        }
    }

    pub fn empty(status: u16) -> Reply<'a> {
        Reply::Full { status, content_type: "text/plain; charset=utf-8", headers: Vec::new(), body: Vec::new() }
    }

    pub fn text(content_type: &'static str, text: String) -> Reply<'a> {
        Reply::Full { status: 200, content_type, headers: Vec::new(), body: text.into_bytes() }
    }

    pub fn error(e: ApiError) -> Reply<'a> {
        let body = ErrorResponse::new(e.status, e.message, e.code);
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        Reply::Full { status: e.status, content_type: "application/json", headers: e.headers, body }
    }
}

/// The request body, at most `cap` bytes: 413 when Content-Length says more
/// (before reading) or when more arrives; 408 when it does not arrive within
/// `timeout` (the connection's deadline, armed by tiny_http).
pub(crate) fn read_body(
    rq: &mut tiny_http::Request,
    cap: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    // The rest of the body stays unread: the connection cannot be reused.
    let too_large = || {
        ApiError::new(
            413,
            format!("the request body is larger than the {} MiB allowed", cap >> 20),
            Some("request_too_large"),
        )
        .with_header("Connection", "close")
    };
    if rq.body_length().is_some_and(|n| n > cap) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(rq.body_length().unwrap_or(0));
    rq.as_reader().take(cap as u64 + 1).read_to_end(&mut body).map_err(|e| {
        let e = if e.kind() == std::io::ErrorKind::TimedOut {
            ApiError::new(
                408,
                format!("the request body did not arrive within {} s", timeout.as_secs_f64()),
                Some("request_timeout"),
            )
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        };
        e.with_header("Connection", "close")
    })?;
    if body.len() > cap {
        return Err(too_large());
    }
    Ok(body)
}

/// The body as text (JSON must be UTF-8).
pub(crate) fn body_text(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|e| ApiError::bad_request(format!("the request body is not UTF-8: {e}")))
}

/// Sends a full reply; returns its status. A reply carrying `Connection:
/// close` (one that leaves the request body unread) is written on the raw
/// connection, since tiny_http drops that header from its responses.
pub(crate) fn send_full(
    rq: tiny_http::Request,
    status: u16,
    content_type: &str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
) -> u16 {
    let close = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("connection") && v == "close");
    if close {
        let reason = tiny_http::StatusCode(status).default_reason_phrase();
        let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n");
        for (name, value) in &headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut w = rq.into_writer();
        let _ = w.write_all(head.as_bytes()).and_then(|()| w.write_all(&body)).and_then(|()| w.flush());
        return status;
    }
    let mut resp = tiny_http::Response::from_data(body).with_status_code(status);
    let all = std::iter::once(("Content-Type", content_type.to_owned())).chain(headers);
    for (name, value) in all {
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            resp.add_header(h);
        }
    }
    // A client that left before its answer is no error of ours.
    let _ = rq.respond(resp);
    status
}

/// Writes `stream` as server-sent events, one flush per batch of events,
/// chunked on HTTP/1.1 so the connection can be reused. A failed write means
/// the client went away: the stream is told and writing stops.
pub(crate) fn send_stream(rq: tiny_http::Request, mut stream: Box<dyn EventStream + '_>) -> u16 {
    let chunked = *rq.http_version() != tiny_http::HTTPVersion(1, 0);
    let mut w = rq.into_writer();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n{}\r\n",
        if chunked { "Transfer-Encoding: chunked\r\n" } else { "Connection: close\r\n" }
    );
    let mut ok = w.write_all(head.as_bytes()).and_then(|()| w.flush()).is_ok();
    while ok {
        let Some(events) = stream.next() else { break };
        if events.is_empty() {
            continue;
        }
        let mut data = String::new();
        for e in &events {
            data.push_str("data: ");
            data.push_str(e);
            data.push_str("\n\n");
        }
        ok = write_piece(&mut w, data.as_bytes(), chunked).and_then(|()| w.flush()).is_ok();
    }
    if ok && chunked {
        ok = w.write_all(b"0\r\n\r\n").and_then(|()| w.flush()).is_ok();
    }
    if !ok {
        stream.client_gone();
    }
    200
}

fn write_piece(w: &mut dyn Write, data: &[u8], chunked: bool) -> std::io::Result<()> {
    if chunked {
        write!(w, "{:x}\r\n", data.len())?;
        w.write_all(data)?;
        w.write_all(b"\r\n")
    } else {
        w.write_all(data)
    }
}
