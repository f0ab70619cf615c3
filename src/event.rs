//! The event loop: one epoll set for everything (signals, the listening socket, the guest
//! connection, host sockets), one clock read per batch, deferred work after the batch.
//!
//! Each registered fd carries a [`Token`] in its epoll data: a kind in the top byte and an
//! index (or nothing) below, so an event names its handler and flow without a lookup.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::conf::Config;
use crate::engine::Engine;
use crate::icmp::IcmpFlowIdx;
use crate::tap::stream::{StreamEvent, StreamTap};
use crate::udp::{UdpConfig, UdpFlowIdx};

/// Housekeeping period: flow expiry, periodic announcements.
const PERIODIC: Duration = Duration::from_secs(1);
const MAX_EVENTS: usize = 128;

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Signal,
    Listener,
    TapConn,
    IcmpSock(IcmpFlowIdx),
    UdpSock(UdpFlowIdx),
}

impl Token {
    const SHIFT: u32 = 56;

    pub fn encode(self) -> u64 {
        let (kind, idx) = match self {
            Token::Signal => (1u64, 0u64),
            Token::Listener => (2, 0),
            Token::TapConn => (3, 0),
            Token::IcmpSock(i) => (4, u64::from(i.0)),
            Token::UdpSock(i) => (5, u64::from(i.0)),
        };
        kind << Self::SHIFT | idx
    }

    pub fn decode(v: u64) -> Option<Token> {
        let idx = (v & ((1 << Self::SHIFT) - 1)) as u32;
        Some(match v >> Self::SHIFT {
            1 => Token::Signal,
            2 => Token::Listener,
            3 => Token::TapConn,
            4 => Token::IcmpSock(IcmpFlowIdx(idx)),
            5 => Token::UdpSock(UdpFlowIdx(idx)),
            _ => return None,
        })
    }
}

/// How layer-4 modules put their sockets in the loop's epoll set, without owning it (and
/// how tests run them without one).
pub trait Register {
    /// Starts watching `fd` for `events`, reported with `token`.
    fn add(&mut self, fd: RawFd, events: epoll::Events, token: Token) -> io::Result<()>;
    /// Changes what `fd` is watched for.
    fn modify(&mut self, fd: RawFd, events: epoll::Events, token: Token) -> io::Result<()>;
}

/// The loop's epoll set, lent to the engine by fd. Closing a socket removes it from the set.
pub struct EpollRegistrar {
    pub epoll_fd: RawFd,
}

impl Register for EpollRegistrar {
    fn add(&mut self, fd: RawFd, events: epoll::Events, token: Token) -> io::Result<()> {
        let ev = epoll::Event::new(events, token.encode());
        epoll::ctl(self.epoll_fd, epoll::ControlOptions::EPOLL_CTL_ADD, fd, ev)
    }

    fn modify(&mut self, fd: RawFd, events: epoll::Events, token: Token) -> io::Result<()> {
        let ev = epoll::Event::new(events, token.encode());
        epoll::ctl(self.epoll_fd, epoll::ControlOptions::EPOLL_CTL_MOD, fd, ev)
    }
}

/// Errors that stop the loop (setup and the loop's own machinery, never guest input).
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("creating the epoll instance")]
    EpollCreate(#[source] io::Error),
    #[error("adding a file descriptor to epoll")]
    EpollAdd(#[source] io::Error),
    #[error("waiting for events")]
    EpollWait(#[source] io::Error),
    #[error("setting up signal handling")]
    Signals(#[source] nix::Error),
    #[error("the vhost-user mode is not available in this build yet")]
    VhostUserUnavailable,
}

/// Where the guest comes from.
pub enum Guest {
    /// A listening socket: accept one client at a time.
    Listen(UnixListener),
    /// A single connected socket (`--fd`): when it closes, we are done.
    Connected(UnixStream),
}

/// Why the loop ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Signal(i32),
    ClientGone,
}

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> Result<Self, LoopError> {
        let fd = epoll::create(true).map_err(LoopError::EpollCreate)?;
        // SAFETY: epoll_create1 just returned this fd and nothing else owns it.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(
        &self,
        op: epoll::ControlOptions,
        fd: RawFd,
        events: epoll::Events,
        token: Token,
    ) -> io::Result<()> {
        epoll::ctl(
            self.0.as_raw_fd(),
            op,
            fd,
            epoll::Event::new(events, token.encode()),
        )
    }

    fn add(&self, fd: RawFd, events: epoll::Events, token: Token) -> Result<(), LoopError> {
        self.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, events, token)
            .map_err(LoopError::EpollAdd)
    }

    fn remove(&self, fd: RawFd) {
        // Closing the fd removes it too; a failure here changes nothing.
        let _ = epoll::ctl(
            self.0.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::empty(), 0),
        );
    }
}

/// Blocks the termination signals and returns a signalfd that reports them. Must run before
/// any thread is started, so that no thread takes them the default way.
pub fn signal_fd() -> Result<SignalFd, LoopError> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        mask.add(s);
    }
    mask.thread_block().map_err(LoopError::Signals)?;
    // Writes to a closed guest connection must be an error, not our death.
    // SAFETY: setting SIGPIPE to ignored installs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }
        .map_err(LoopError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(LoopError::Signals)
}

/// Runs the loop until a termination signal, or until the client leaves when the
/// configuration says that ends the process.
pub fn run(cfg: &Config, guest: Guest, signals: SignalFd) -> Result<Exit, LoopError> {
    let epoll = Epoll::new()?;
    epoll.add(
        signals.as_fd().as_raw_fd(),
        epoll::Events::EPOLLIN,
        Token::Signal,
    )?;
    let mut engine = Engine::new(
        cfg.net.clone(),
        cfg.icmp,
        EpollRegistrar {
            epoll_fd: epoll.0.as_raw_fd(),
        },
    );
    if let Some(udp) = UdpConfig::from_config(cfg) {
        engine = engine.with_udp(udp);
    }
    let mut conn: Option<StreamTap> = None;
    let mut conn_out_watched = false;
    let (listener, single) = match guest {
        Guest::Listen(l) => {
            l.set_nonblocking(true).map_err(LoopError::EpollAdd)?;
            epoll.add(l.as_raw_fd(), epoll::Events::EPOLLIN, Token::Listener)?;
            (Some(l), false)
        }
        Guest::Connected(s) => {
            let mut tap = StreamTap::new(s).map_err(LoopError::EpollAdd)?;
            epoll.add(
                tap.socket().as_raw_fd(),
                epoll::Events::EPOLLIN,
                Token::TapConn,
            )?;
            engine.guest_attached(tap.to_guest());
            tap.to_guest().flush();
            conn = Some(tap);
            (None, true)
        }
    };
    let exit_when_gone = single || cfg.one_off;

    let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); MAX_EVENTS];
    let mut last_periodic = Instant::now();
    loop {
        let n = match epoll::wait(
            epoll.0.as_raw_fd(),
            PERIODIC.as_millis() as i32,
            &mut events,
        ) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LoopError::EpollWait(e)),
        };
        let now = Instant::now();
        engine.set_now(now);
        for ev in &events[..n] {
            let (ev_flags, ev_data) = (ev.events, ev.data);
            let flags = epoll::Events::from_bits_truncate(ev_flags);
            match Token::decode(ev_data) {
                Some(Token::Signal) => {
                    if let Ok(Some(info)) = signals.read_signal() {
                        log::info!("received signal {}, exiting", info.ssi_signo);
                        return Ok(Exit::Signal(info.ssi_signo as i32));
                    }
                }
                Some(Token::Listener) => {
                    let Some(l) = listener.as_ref() else { continue };
                    while let Ok((sock, _)) = l.accept() {
                        if conn.as_ref().is_some_and(StreamTap::hung_up) {
                            if let Some(old) = conn.take() {
                                if let Some(exit) =
                                    client_gone(&epoll, &engine, &old, exit_when_gone)
                                {
                                    return Ok(exit);
                                }
                            }
                        }
                        if conn.is_some() {
                            log::warn!("a client is already connected: rejecting another one");
                            drop(sock);
                            continue;
                        }
                        match StreamTap::new(sock) {
                            Ok(mut tap) => {
                                epoll.add(
                                    tap.socket().as_raw_fd(),
                                    epoll::Events::EPOLLIN,
                                    Token::TapConn,
                                )?;
                                log::info!("client connected");
                                engine.guest_attached(tap.to_guest());
                                tap.to_guest().flush();
                                conn = Some(tap);
                                conn_out_watched = false;
                            }
                            Err(e) => log::warn!("can't set up the client connection: {e}"),
                        }
                    }
                }
                Some(Token::TapConn) => {
                    let Some(tap) = conn.as_mut() else { continue };
                    let mut state = StreamEvent::Open;
                    if flags.contains(epoll::Events::EPOLLOUT) {
                        state = tap.handle_writable();
                    }
                    if state == StreamEvent::Open
                        && flags.intersects(
                            epoll::Events::EPOLLIN
                                | epoll::Events::EPOLLHUP
                                | epoll::Events::EPOLLERR,
                        )
                    {
                        state = tap.handle_readable(&mut engine);
                    }
                    if state == StreamEvent::Closed {
                        if let Some(exit) = client_gone(&epoll, &engine, tap, exit_when_gone) {
                            return Ok(exit);
                        }
                        conn = None;
                    }
                }
                Some(Token::IcmpSock(idx)) => {
                    if let Some(tap) = conn.as_mut() {
                        engine.icmp_sock_ready(idx, tap.to_guest());
                    } else {
                        engine.icmp_sock_ready(idx, &mut crate::tap::Discard);
                    }
                }
                Some(Token::UdpSock(idx)) => {
                    let err = flags.contains(epoll::Events::EPOLLERR);
                    if let Some(tap) = conn.as_mut() {
                        engine.udp_sock_ready(idx, err, tap.to_guest());
                    } else {
                        engine.udp_sock_ready(idx, err, &mut crate::tap::Discard);
                    }
                }
                None => log::debug!("event with an unknown token {ev_data:#x}"),
            }
        }

        // After the batch: one flush towards the guest, and output interest to match.
        if let Some(tap) = conn.as_mut() {
            tap.to_guest().flush();
            let want = tap.wants_write();
            if want != conn_out_watched {
                let ev = if want {
                    epoll::Events::EPOLLIN | epoll::Events::EPOLLOUT
                } else {
                    epoll::Events::EPOLLIN
                };
                if epoll
                    .ctl(
                        epoll::ControlOptions::EPOLL_CTL_MOD,
                        tap.socket().as_raw_fd(),
                        ev,
                        Token::TapConn,
                    )
                    .is_ok()
                {
                    conn_out_watched = want;
                }
            }
        }
        if now.duration_since(last_periodic) >= PERIODIC {
            last_periodic = now;
            engine.periodic(now);
        }
    }
}

/// The client left: forget its socket, log what it did; `Some` if that ends the process.
fn client_gone(
    epoll: &Epoll,
    engine: &Engine,
    tap: &StreamTap,
    exit_when_gone: bool,
) -> Option<Exit> {
    epoll.remove(tap.socket().as_raw_fd());
    log::debug!("stream counters: {:?}", tap.stats());
    log_stats(engine);
    if exit_when_gone {
        return Some(Exit::ClientGone);
    }
    log::info!("waiting for the next client");
    None
}

fn log_stats(engine: &Engine) {
    log::debug!("engine counters: {:?}", engine.stats());
    if let Some(icmp) = engine.icmp_stats() {
        log::debug!("icmp counters: {icmp:?}");
    }
    if let Some(udp) = engine.udp_stats() {
        log::debug!("udp counters: {udp:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Signal,
            Token::Listener,
            Token::TapConn,
            Token::IcmpSock(IcmpFlowIdx(1023)),
            Token::UdpSock(UdpFlowIdx(4095)),
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
    }
}
