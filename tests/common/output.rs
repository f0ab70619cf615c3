//! Collected output of a child process (a guest console, a passt log): reader threads append
//! to one shared text, and waiters block on a condition variable until what they look for
//! arrives, the sources close, or a deadline passes. No sleep polling anywhere.
//!
//! Carriage returns are dropped (a serial console writes `\r\n`), so the text has plain `\n`
//! line ends. Bytes are decoded as UTF-8 per read, lossily: the outputs we collect are ASCII.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

struct State {
    text: String,
    /// Readers still running; the output is complete when this drops to zero.
    open: usize,
    /// Everything read is also written here, so a log survives the test.
    log: Option<File>,
}

/// Shared, growing text of one or more output streams.
#[derive(Clone)]
pub struct Collector {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// Why a wait ended without a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The deadline passed.
    Timeout,
    /// Every source closed (the process exited) before a match.
    Closed,
}

impl Collector {
    /// An empty collector, optionally mirroring everything into `log`.
    pub fn new(log: Option<File>) -> Self {
        let state = State {
            text: String::new(),
            open: 0,
            log,
        };
        Collector {
            inner: Arc::new((Mutex::new(state), Condvar::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking waiter must not hide the output from the next one.
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a thread appending everything `source` yields until end of file.
    pub fn attach<R: Read + Send + 'static>(&self, mut source: R) {
        self.lock().open += 1;
        let this = self.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                let mut state = this.lock();
                if let Some(log) = state.log.as_mut() {
                    let _ = log.write_all(chunk.as_bytes());
                }
                state.text.push_str(&chunk);
                drop(state);
                this.inner.1.notify_all();
            }
            this.lock().open -= 1;
            this.inner.1.notify_all();
        });
    }

    /// A copy of everything collected so far.
    pub fn text(&self) -> String {
        self.lock().text.clone()
    }

    /// Length in bytes of the text collected so far: an offset for later waits.
    pub fn len(&self) -> usize {
        self.lock().text.len()
    }

    /// Whether every attached source has reached end of file.
    pub fn closed(&self) -> bool {
        self.lock().open == 0
    }

    /// Blocks until `check` finds something in the text starting at byte `from`, the sources
    /// close, or `deadline` passes. `check` sees the text from `from` on and is called again
    /// after every append.
    pub fn wait_until<T>(
        &self,
        from: usize,
        deadline: Instant,
        mut check: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, WaitError> {
        let mut state = self.lock();
        loop {
            let tail = state.text.get(from..).unwrap_or("");
            if let Some(found) = check(tail) {
                return Ok(found);
            }
            if state.open == 0 {
                return Err(WaitError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout);
            }
            state = self
                .inner
                .1
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `pattern` at or after byte `from`; returns the byte offset just past it.
    pub fn wait_for(
        &self,
        from: usize,
        pattern: &str,
        deadline: Instant,
    ) -> Result<usize, WaitError> {
        self.wait_until(from, deadline, |tail| {
            tail.find(pattern).map(|at| from + at + pattern.len())
        })
    }
}
