//! Kestrel (PATCHED.md): deadlines on a connection's reads, and a look at
//! whether its peer has gone. Upstream tiny_http reads with no timeout at
//! all, so a client that sends its head or its body slowly holds a thread
//! (for a body, the handler's) for as long as it likes.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
enum Deadline {
    /// Reads wait as long as it takes.
    Never,
    /// The clock starts at the next read of the socket (a body's first read,
    /// which may come long after its head, once a handler is free).
    After(Duration),
    At(Instant),
}

/// Shared by a connection's read half, its `ClientConnection` (which arms
/// the deadlines) and its requests (which peek).
#[derive(Clone)]
pub(crate) struct ReadControl(Arc<Inner>);

struct Inner {
    deadline: Mutex<Deadline>,
    /// A second handle on the socket, for peeking; None for Unix sockets.
    peer: Option<TcpStream>,
}

impl ReadControl {
    pub(crate) fn new(peer: Option<TcpStream>) -> ReadControl {
        ReadControl(Arc::new(Inner { deadline: Mutex::new(Deadline::Never), peer }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Deadline> {
        self.0.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads must be done within `d` from now.
    pub(crate) fn within(&self, d: Duration) {
        *self.lock() = Deadline::At(Instant::now() + d);
    }

    /// Reads must be done within `d` of the next read.
    pub(crate) fn within_from_next_read(&self, d: Duration) {
        *self.lock() = Deadline::After(d);
    }

    /// The timeout for the next socket read: None for none, Err(TimedOut)
    /// once the deadline has passed.
    pub(crate) fn arm(&self) -> std::io::Result<Option<Duration>> {
        let mut d = self.lock();
        let now = Instant::now();
        let at = match *d {
            Deadline::Never => return Ok(None),
            Deadline::After(t) => {
                *d = Deadline::At(now + t);
                now + t
            }
            Deadline::At(at) => at,
        };
        let left = at.saturating_duration_since(now);
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "the client took too long to send its request"));
        }
        Ok(Some(left))
    }

    /// Whether the peer has closed its side (or reset the connection):
    /// a non-blocking peek reads end-of-stream. Only meaningful while no one
    /// else reads the socket, which holds while a request is being handled
    /// (the connection reads its next request only once this one is
    /// answered). A client that half-closes after sending its request counts
    /// as gone, as it does for uvicorn.
    pub(crate) fn peer_closed(&self) -> bool {
        let Some(s) = &self.0.peer else { return false };
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let closed = match s.peek(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
        };
        let _ = s.set_nonblocking(false);
        closed
    }
}

/// Reads `inner` under `control`'s deadlines, setting the socket's read
/// timeout to the time left before each read.
pub(crate) fn read_with_deadline<R: Read>(
    control: &ReadControl,
    inner: &mut R,
    set_timeout: impl Fn(&mut R, Option<Duration>) -> std::io::Result<()>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        let timeout = control.arm()?;
        set_timeout(inner, timeout)?;
        match inner.read(buf) {
            // The socket's timeout ran out: arm() says whether the deadline did.
            Err(e) if timeout.is_some() && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            r => return r,
        }
    }
}
