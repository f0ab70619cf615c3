//! Logging: standard error while in the foreground (and until we fork), the `-l` log file
//! always, syslog once we are a daemon without a log file. Also [`Limiter`], which keeps
//! per-packet complaints (a guest can send millions of bad frames) to a few lines.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
    to_stderr: AtomicBool,
    to_syslog: AtomicBool,
    file: Mutex<Option<File>>,
    level: LevelFilter,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        let prefix = match record.level() {
            Level::Error => "ERROR: ",
            Level::Warn => "WARNING: ",
            _ => "",
        };
        if self.to_stderr.load(Ordering::Relaxed) {
            // A failed write to stderr has nowhere else to be reported.
            let _ = if self.level >= LevelFilter::Debug {
                writeln!(
                    std::io::stderr(),
                    "{}.{:04}: {prefix}{}",
                    elapsed.as_secs(),
                    elapsed.subsec_micros() / 100,
                    record.args()
                )
            } else {
                writeln!(std::io::stderr(), "{prefix}{}", record.args())
            };
        }
        if let Ok(mut file) = self.file.lock() {
            if let Some(f) = file.as_mut() {
                let _ = writeln!(
                    f,
                    "{}.{:04}: {prefix}{}",
                    elapsed.as_secs(),
                    elapsed.subsec_micros() / 100,
                    record.args()
                );
            }
        }
        if self.to_syslog.load(Ordering::Relaxed) {
            let priority = match record.level() {
                Level::Error => libc::LOG_ERR,
                Level::Warn => libc::LOG_WARNING,
                Level::Info => libc::LOG_INFO,
                _ => libc::LOG_DEBUG,
            };
            if let Ok(msg) = CString::new(format!("{prefix}{}", record.args())) {
                // SAFETY: both strings are NUL-terminated and outlive the call; "%s" makes
                // the message data, not a format.
                unsafe { libc::syslog(priority, c"%s".as_ptr(), msg.as_ptr()) };
            }
        }
    }

    fn flush(&self) {
        if let Ok(mut file) = self.file.lock() {
            if let Some(f) = file.as_mut() {
                let _ = f.flush();
            }
        }
    }
}

/// Installs the logger. Call once, before anything logs.
pub fn init(level: LevelFilter, log_file: Option<&Path>) -> std::io::Result<()> {
    let file = match log_file {
        Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    let logger = LOGGER.get_or_init(|| Logger {
        start: Instant::now(),
        to_stderr: AtomicBool::new(true),
        to_syslog: AtomicBool::new(false),
        file: Mutex::new(file),
        level,
    });
    // Only fails if a logger is already set, which is then the one we want.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
    Ok(())
}

/// Called in the daemon after fork: standard error is gone; use syslog unless a log file
/// takes the messages.
pub fn daemonized() {
    if let Some(l) = LOGGER.get() {
        l.to_stderr.store(false, Ordering::Relaxed);
        let has_file = l.file.lock().map(|f| f.is_some()).unwrap_or(false);
        if !has_file {
            // SAFETY: the identity is a static NUL-terminated string, as openlog requires.
            unsafe { libc::openlog(c"passt".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            l.to_syslog.store(true, Ordering::Relaxed);
        }
    }
}

/// Allows a burst of messages per interval, then counts what it suppressed and reports the
/// count with the next allowed message.
#[derive(Debug)]
pub struct Limiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Limiter {
    pub const BURST: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(1);

    pub const fn new() -> Self {
        Limiter {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether a message may be logged now; if so, also how many were suppressed before it.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.window_start {
            Some(start) if now.duration_since(start) < Self::WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs through a [`Limiter`]: `limited!(limiter, now, warn, "format", args...)`.
#[macro_export]
macro_rules! limited {
    ($limiter:expr, $now:expr, $level:ident, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.allow($now) {
            if suppressed > 0 {
                log::$level!("{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::$level!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_counts() {
        let mut l = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..Limiter::BURST {
            assert_eq!(l.allow(t0), Some(0));
        }
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(500)), None);
        assert_eq!(l.allow(t0 + Limiter::WINDOW), Some(2));
        assert_eq!(l.allow(t0 + Limiter::WINDOW), Some(0));
    }
}
