//! SIGTERM and SIGINT: a graceful stop (`Server::shutdown`), as vLLM's
//! server does on either (uvicorn stops accepting, lets requests in flight
//! finish, then exits 0). A second signal exits at once, with status 1.
//!
//! A signal handler may only make async-signal-safe calls, so it writes one
//! byte to a pipe, and a thread blocked on the pipe's other end does the
//! work (the self-pipe trick). Hand-written on `libc` rather than a crate:
//! it is these few lines, and libc is already in the build.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{Error, Result};

/// The pipe's write end, for the handler (-1 before `install`).
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is one live byte.
        // A full pipe (signals nobody read yet) loses nothing that matters.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// SIGTERM and SIGINT, caught from `install` on.
pub struct Signals {
    read: File,
}

impl Signals {
    /// Routes SIGTERM and SIGINT to `wait` (instead of killing the process).
    pub fn install() -> Result<Signals> {
        let os_err = |what: &str| Error::Io { path: what.into(), source: std::io::Error::last_os_error() };
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os_err("creating the signal pipe"));
        }
        // SAFETY: fds[0] is a pipe end just opened and owned by nothing else.
        let read = unsafe { File::from_raw_fd(fds[0]) };
        PIPE_WRITE.store(fds[1], Ordering::Relaxed);
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: a zeroed sigaction is a valid value (empty mask, no
            // flags); the handler is an extern "C" fn(c_int) as sa_handler wants.
            let ok = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut()) == 0
            };
            if !ok {
                return Err(os_err("installing the SIGTERM/SIGINT handler"));
            }
        }
        Ok(Signals { read })
    }

    /// Blocks until the next SIGTERM or SIGINT.
    pub fn wait(&mut self) {
        let mut b = [0u8; 1];
        loop {
            match self.read.read(&mut b) {
                Ok(1) => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The write end never closes while the process runs.
                _ => return,
            }
        }
    }
}
