//! The event loop: one epoll set for everything (signals, the listening socket, the guest
//! connection, host sockets), one clock read per batch, deferred work after the batch.
//!
//! Each registered fd carries a [`Token`] in its epoll data: a kind in the top byte and an
//! index (or nothing) below, so an event names its handler and flow without a lookup. TCP
//! flow tokens also carry their slot's generation (bits 32..56), so an event for a flow
//! closed earlier in the batch can't reach a new flow in the same slot.
//!
//! Timing: one timerfd, armed to the earliest TCP flow deadline (re-armed only when that
//! changes), wakes the loop exactly when some flow needs it; the epoll timeout keeps the
//! one-second housekeeping tick (ICMP and UDP expiry, announcements).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::conf::{Config, Mode};
use crate::engine::Engine;
use crate::flow::{FlowIdx, FlowRef};
use crate::tap::stream::{StreamEvent, StreamTap};
use crate::tap::{Discard, ToGuest};
use crate::udp::UdpConfig;
use crate::vhost_user::{Device, DeviceOptions, Outcome, Source, WATCHDOG_INTERVAL};
use crate::virtio::QueueIdx;

/// Housekeeping period: flow expiry, periodic announcements.
const PERIODIC: Duration = Duration::from_secs(1);
const MAX_EVENTS: usize = 128;

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Signal,
    Listener,
    TapConn,
    VhostCtrl,
    VhostKick(QueueIdx),
    IcmpSock(FlowIdx),
    TcpSock(FlowRef),
    UdpSock(FlowIdx),
    /// A listening socket of a forwarded TCP port, by its index.
    TcpListen(u32),
    /// A bound socket of a forwarded UDP port, by its index.
    UdpListen(u32),
    /// The flow timer's timerfd.
    Timer,
}

impl Token {
    const SHIFT: u32 = 56;
    const GEN_BITS: u32 = Self::SHIFT - 32;

    pub fn encode(self) -> u64 {
        let (kind, idx) = match self {
            Token::Signal => (1u64, 0u64),
            Token::Listener => (2, 0),
            Token::TapConn => (3, 0),
            Token::IcmpSock(i) => (4, u64::from(i.0)),
            Token::VhostCtrl => (5, 0),
            Token::VhostKick(q) => (6, u64::from(q.0)),
            Token::TcpSock(r) => (
                7,
                u64::from(r.gen & ((1 << Self::GEN_BITS) - 1)) << 32 | u64::from(r.idx.0),
            ),
            Token::UdpSock(i) => (8, u64::from(i.0)),
            Token::TcpListen(i) => (9, u64::from(i)),
            Token::UdpListen(i) => (10, u64::from(i)),
            Token::Timer => (11, 0),
        };
        kind << Self::SHIFT | idx
    }

    pub fn decode(v: u64) -> Option<Token> {
        let idx = v as u32;
        let high = ((v >> 32) & ((1 << Self::GEN_BITS) - 1)) as u32;
        // Only TCP tokens use the bits above the index.
        if high != 0 && v >> Self::SHIFT != 7 {
            return None;
        }
        Some(match v >> Self::SHIFT {
            1 => Token::Signal,
            2 => Token::Listener,
            3 => Token::TapConn,
            4 => Token::IcmpSock(FlowIdx(idx)),
            5 => Token::VhostCtrl,
            6 => Token::VhostKick(QueueIdx(idx as u16)),
            7 => Token::TcpSock(FlowRef {
                idx: FlowIdx(idx),
                gen: high,
            }),
            8 => Token::UdpSock(FlowIdx(idx)),
            9 => Token::TcpListen(idx),
            10 => Token::UdpListen(idx),
            11 => Token::Timer,
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
    #[error("creating or arming the flow timer")]
    Timer(#[source] io::Error),
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

/// A one-shot CLOCK_MONOTONIC timerfd (the clock of [`Instant`]).
struct TimerFd(OwnedFd);

impl TimerFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd it returns is ours alone.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: timerfd_create just returned this fd and nothing else owns it.
        Ok(TimerFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once, `after` from now (at once if zero); `None` disarms.
    fn arm(&self, after: Option<Duration>) -> io::Result<()> {
        // A zero it_value disarms: "now" is the smallest wait there is.
        let d = after.map_or(Duration::ZERO, |d| d.max(Duration::from_nanos(1)));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: spec is a valid itimerspec; no old value is asked for.
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes the expiration count, so the fd stops being readable.
    fn clear(&self) {
        let mut n = [0u8; 8];
        // SAFETY: reads at most 8 bytes into n. EAGAIN (nothing expired) is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), n.as_mut_ptr().cast(), n.len()) };
    }
}

/// Blocks the termination signals (and SIGUSR1, which asks for a state dump) and returns a
/// signalfd that reports them. Must run before any thread is started, so that no thread
/// takes them the default way.
pub fn signal_fd() -> Result<SignalFd, LoopError> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
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

/// The guest's connection, of whichever kind the mode asks for.
enum Link {
    Stream {
        tap: Option<StreamTap>,
        out_watched: bool,
    },
    Vhost {
        dev: Box<Device>,
        /// Kick eventfds currently in the epoll set.
        kicks: Vec<RawFd>,
    },
}

impl Link {
    fn connected(&self) -> bool {
        match self {
            Link::Stream { tap, .. } => tap.is_some(),
            Link::Vhost { dev, .. } => dev.is_connected(),
        }
    }

    /// Where frames the engine originates go, while a guest is connected.
    fn guest_side(&mut self) -> Option<&mut dyn ToGuest> {
        match self {
            Link::Stream { tap: Some(t), .. } => Some(t.to_guest()),
            Link::Vhost { dev, .. } if dev.is_connected() => Some(dev.to_guest()),
            _ => None,
        }
    }
}

/// The loop's state: what [`run`] owns while it runs.
struct Loop {
    epoll: Epoll,
    engine: Engine,
    link: Link,
    listener: Option<UnixListener>,
    exit_when_gone: bool,
    watch: WatchSchedule,
}

/// When the vhost-user watchdog runs: every [`WATCHDOG_INTERVAL`] while there is traffic
/// and for [`WATCH_LINGER`] after it (a guest under TCG may answer that late, and a lost
/// kick for its answer stalls it until the next check), every [`PERIODIC`] otherwise, so an
/// idle process isn't woken more than it was.
struct WatchSchedule {
    /// Only vhost-user has a watchdog.
    enabled: bool,
    last_activity: Instant,
    last_run: Instant,
}

/// See [`WatchSchedule`].
const WATCH_LINGER: Duration = Duration::from_secs(2);

impl WatchSchedule {
    fn new(enabled: bool, now: Instant) -> Self {
        WatchSchedule {
            enabled,
            last_activity: now,
            last_run: now,
        }
    }

    fn interval(&self, now: Instant) -> Duration {
        if now.saturating_duration_since(self.last_activity) < WATCH_LINGER {
            WATCHDOG_INTERVAL
        } else {
            PERIODIC
        }
    }

    fn activity(&mut self, now: Instant) {
        self.last_activity = now;
    }

    fn due(&self, now: Instant) -> bool {
        self.enabled && now.saturating_duration_since(self.last_run) >= self.interval(now)
    }

    fn ran(&mut self, now: Instant) {
        self.last_run = now;
    }

    /// How long the loop may wait before the next run.
    fn next_in(&self, now: Instant) -> Duration {
        if !self.enabled {
            return Duration::MAX;
        }
        (self.last_run + self.interval(now)).saturating_duration_since(now)
    }
}

/// Runs the loop until a termination signal, or until the client leaves when the
/// configuration says that ends the process.
pub fn run(
    cfg: &Config,
    guest: Guest,
    signals: SignalFd,
    forwards: crate::fwd::Bound,
) -> Result<Exit, LoopError> {
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
        engine
            .udp_listen(forwards.udp)
            .map_err(LoopError::EpollAdd)?;
    }
    if cfg.tcp {
        engine.enable_tcp(crate::tcp::TcpConfig {
            mtu: cfg.net.mtu,
            outbound4: cfg.outbound4,
            outbound6: cfg.outbound6,
            outbound_if4: cfg.outbound_if4.clone(),
            outbound_if6: cfg.outbound_if6.clone(),
            max_flows: cfg.max_flows,
            nat: crate::fwd::Nat::from_config(cfg),
        });
        engine
            .tcp_listen(forwards.tcp)
            .map_err(LoopError::EpollAdd)?;
    }
    let link = match cfg.mode {
        Mode::Stream => Link::Stream {
            tap: None,
            out_watched: false,
        },
        Mode::VhostUser => Link::Vhost {
            dev: Box::new(Device::new(DeviceOptions {
                mtu: cfg.net.mtu,
                // The engine's packet views read a header field more than once (checked
                // length, then the payload range): a guest rewriting its TX buffer meanwhile
                // could turn a checked view inconsistent. So the views only ever see a
                // private copy: whole frames when short, the headers of long ones, whose
                // TCP payload goes from guest memory to `sendmsg` (see virtio::tx).
                tx_copy: true,
                ..DeviceOptions::default()
            })),
            kicks: Vec::new(),
        },
    };
    let mut lp = Loop {
        epoll,
        engine,
        link,
        listener: None,
        exit_when_gone: cfg.one_off,
        watch: WatchSchedule::new(cfg.mode == Mode::VhostUser, Instant::now()),
    };
    match guest {
        Guest::Listen(l) => {
            l.set_nonblocking(true).map_err(LoopError::EpollAdd)?;
            lp.epoll
                .add(l.as_raw_fd(), epoll::Events::EPOLLIN, Token::Listener)?;
            lp.listener = Some(l);
        }
        Guest::Connected(s) => {
            lp.exit_when_gone = true;
            lp.attach(s)?;
        }
    }

    let timer = TimerFd::new().map_err(LoopError::Timer)?;
    lp.epoll
        .add(timer.0.as_raw_fd(), epoll::Events::EPOLLIN, Token::Timer)?;
    // The deadline the timerfd is armed to.
    let mut armed: Option<Instant> = None;

    let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); MAX_EVENTS];
    let mut last_periodic = Instant::now();
    loop {
        let want = lp.engine.tcp_next_deadline();
        if want != armed {
            let after = want.map(|t| t.saturating_duration_since(Instant::now()));
            timer.arm(after).map_err(LoopError::Timer)?;
            armed = want;
        }
        let wait = lp
            .watch
            .next_in(Instant::now())
            .min(PERIODIC.saturating_sub(last_periodic.elapsed()));
        let n = match epoll::wait(
            lp.epoll.0.as_raw_fd(),
            // Rounded up: a wait that ends before the deadline would spin until it.
            wait.as_micros()
                .div_ceil(1000)
                .try_into()
                .unwrap_or(i32::MAX),
            &mut events,
        ) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LoopError::EpollWait(e)),
        };
        let now = Instant::now();
        lp.engine.set_now(now);
        for ev in &events[..n] {
            let (ev_flags, ev_data) = (ev.events, ev.data);
            let flags = epoll::Events::from_bits_truncate(ev_flags);
            let exit = match Token::decode(ev_data) {
                Some(Token::Signal) => match signals.read_signal() {
                    Ok(Some(info)) if info.ssi_signo == Signal::SIGUSR1 as u32 => {
                        lp.log_state();
                        None
                    }
                    Ok(Some(info)) => {
                        log::info!("received signal {}, exiting", info.ssi_signo);
                        Some(Exit::Signal(info.ssi_signo as i32))
                    }
                    _ => None,
                },
                Some(Token::Listener) => lp.accept()?,
                Some(Token::TapConn) => lp.stream_ready(flags),
                Some(Token::VhostCtrl) => lp.vhost_ready(Source::Control)?,
                Some(Token::VhostKick(q)) => lp.vhost_ready(Source::Kick(q))?,
                Some(Token::TcpListen(i)) => {
                    let to_guest = lp.link.guest_side();
                    lp.engine
                        .tcp_listener_ready(i, to_guest.unwrap_or(&mut Discard));
                    None
                }
                Some(Token::UdpListen(i)) => {
                    let to_guest = lp.link.guest_side();
                    lp.engine
                        .udp_listener_ready(i, to_guest.unwrap_or(&mut Discard));
                    None
                }
                Some(Token::TcpSock(r)) => {
                    let to_guest = lp.link.guest_side();
                    lp.engine
                        .tcp_sock_ready(r, flags, to_guest.unwrap_or(&mut Discard));
                    None
                }
                Some(Token::Timer) => {
                    // Fired: it is disarmed now. The due flows run after the batch.
                    timer.clear();
                    armed = None;
                    None
                }
                Some(Token::UdpSock(idx)) => {
                    let err = flags.contains(epoll::Events::EPOLLERR);
                    let to_guest = lp.link.guest_side();
                    lp.engine
                        .udp_sock_ready(idx, err, to_guest.unwrap_or(&mut Discard));
                    None
                }
                Some(Token::IcmpSock(idx)) => {
                    lp.engine
                        .icmp_sock_ready(idx, lp.link.guest_side().unwrap_or(&mut Discard));
                    None
                }
                None => {
                    log::debug!("event with an unknown token {ev_data:#x}");
                    None
                }
            };
            if let Some(exit) = exit {
                return Ok(exit);
            }
        }
        if n > 0 {
            lp.watch.activity(now);
        }
        if lp.watch.due(now) {
            lp.watchdog(now);
        }
        // Timers before the flush, so what they send leaves with this batch.
        if now.duration_since(last_periodic) >= PERIODIC {
            last_periodic = now;
            lp.engine.periodic(now);
        }
        // Only flows that are due: a heap peek when none is.
        lp.engine
            .tcp_timer(now, lp.link.guest_side().unwrap_or(&mut Discard));
        lp.after_batch();
    }
}

impl Loop {
    /// New connections on the listening socket: one client at a time.
    fn accept(&mut self) -> Result<Option<Exit>, LoopError> {
        loop {
            let Some(l) = self.listener.as_ref() else {
                return Ok(None);
            };
            let Ok((sock, _)) = l.accept() else {
                return Ok(None);
            };
            if let Link::Stream { tap: Some(t), .. } = &self.link {
                // Its hang-up may be waiting in this very batch.
                if t.hung_up() {
                    if let Some(exit) = self.client_gone() {
                        return Ok(Some(exit));
                    }
                }
            }
            if self.link.connected() {
                log::warn!("a client is already connected: rejecting another one");
                continue;
            }
            self.attach(sock)?;
        }
    }

    fn attach(&mut self, sock: UnixStream) -> Result<(), LoopError> {
        match &mut self.link {
            Link::Stream { tap, out_watched } => match StreamTap::new(sock) {
                Ok(t) => {
                    self.epoll.add(
                        t.socket().as_raw_fd(),
                        epoll::Events::EPOLLIN,
                        Token::TapConn,
                    )?;
                    *tap = Some(t);
                    *out_watched = false;
                }
                Err(e) => {
                    log::warn!("can't set up the client connection: {e}");
                    return Ok(());
                }
            },
            Link::Vhost { dev, .. } => {
                dev.attach(sock);
                self.sync_vhost_fds()?;
            }
        }
        log::info!("client connected");
        if let Some(to_guest) = self.link.guest_side() {
            self.engine.guest_attached(to_guest);
            // Data held back while no guest was there (sockets kept it) goes now.
            self.engine.room_returned(to_guest);
            to_guest.flush();
        }
        Ok(())
    }

    /// The client left: forget its connection, log what it did; `Some` if that ends the
    /// process.
    fn client_gone(&mut self) -> Option<Exit> {
        match &mut self.link {
            Link::Stream { tap, .. } => {
                if let Some(t) = tap.take() {
                    self.epoll.remove(t.socket().as_raw_fd());
                    log::debug!("stream counters: {:?}", t.stats());
                }
            }
            Link::Vhost { dev, kicks } => {
                for fd in kicks.drain(..) {
                    self.epoll.remove(fd);
                }
                log::debug!("vhost-user counters: {:?}", dev.stats());
            }
        }
        self.log_engine_state(log::Level::Debug);
        if self.exit_when_gone {
            return Some(Exit::ClientGone);
        }
        log::info!("client disconnected, waiting for the next one");
        None
    }

    /// Runs the vhost-user device's watchdog (see [`crate::virtio`], "Lost notifications").
    fn watchdog(&mut self, now: Instant) {
        let Link::Vhost { dev, .. } = &mut self.link else {
            return;
        };
        if dev.is_connected() && dev.watchdog(&mut self.engine) {
            // Something to confirm at the next check: keep checking often.
            self.watch.activity(now);
        }
        self.watch.ran(now);
    }

    /// The engine's counters, at `level`.
    fn log_engine_state(&self, level: log::Level) {
        log::log!(level, "engine counters: {:?}", self.engine.stats());
        if let Some(icmp) = self.engine.icmp_stats() {
            log::log!(level, "icmp counters: {icmp:?}");
        }
        if let Some(tcp) = self.engine.tcp_stats() {
            log::log!(level, "tcp counters: {tcp:?}");
        }
        if let Some(udp) = self.engine.udp_stats() {
            let muted = self.engine.udp_muted_flows().unwrap_or(0);
            log::log!(
                level,
                "udp counters: {udp:?}, {muted} flows waiting for room"
            );
        }
    }

    /// SIGUSR1: everything we count and where the guest link stands, logged without
    /// changing anything, to see why traffic stalls while it stalls.
    fn log_state(&self) {
        match &self.link {
            Link::Stream { tap: Some(t), .. } => {
                log::info!("stream counters: {:?}", t.stats());
            }
            Link::Stream { tap: None, .. } => log::info!("no client connected"),
            Link::Vhost { dev, .. } => {
                log::info!("vhost-user counters: {:?}", dev.stats());
                let (rx, tx) = dev.snapshot();
                log::info!("vhost-user RX queue: {rx:?}");
                log::info!("vhost-user TX ring: {tx:?}");
            }
        }
        self.log_engine_state(log::Level::Info);
        // A marker for whoever waits on the log (the end-to-end tests do).
        log::info!("end of state dump");
    }

    fn stream_ready(&mut self, flags: epoll::Events) -> Option<Exit> {
        let Link::Stream { tap: Some(tap), .. } = &mut self.link else {
            return None;
        };
        let mut state = StreamEvent::Open;
        if flags.contains(epoll::Events::EPOLLOUT) {
            state = tap.handle_writable();
        }
        if state == StreamEvent::Open
            && flags.intersects(
                epoll::Events::EPOLLIN | epoll::Events::EPOLLHUP | epoll::Events::EPOLLERR,
            )
        {
            state = tap.handle_readable(&mut self.engine);
        }
        match state {
            StreamEvent::Closed => self.client_gone(),
            StreamEvent::Open => None,
        }
    }

    fn vhost_ready(&mut self, src: Source) -> Result<Option<Exit>, LoopError> {
        let Link::Vhost { dev, .. } = &mut self.link else {
            return Ok(None);
        };
        match dev.handle(src, &mut self.engine) {
            Outcome::Continue => Ok(None),
            Outcome::FdsChanged => {
                self.sync_vhost_fds()?;
                Ok(None)
            }
            Outcome::Disconnected => {
                // The control socket closed with the connection; the kicks are gone too.
                Ok(self.client_gone())
            }
        }
    }

    /// Makes the epoll set match the device's descriptors: the control socket, and the
    /// kick eventfds, which change as the front-end sets up and stops rings.
    fn sync_vhost_fds(&mut self) -> Result<(), LoopError> {
        let Link::Vhost { dev, kicks } = &mut self.link else {
            return Ok(());
        };
        // An fd number may now name a new eventfd: drop every old registration first.
        for fd in kicks.drain(..) {
            self.epoll.remove(fd);
        }
        for (fd, src) in dev.watched_fds() {
            let token = match src {
                Source::Control => Token::VhostCtrl,
                Source::Kick(q) => Token::VhostKick(q),
            };
            match self.epoll.ctl(
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Events::EPOLLIN,
                token,
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(LoopError::EpollAdd(e)),
            }
            if matches!(src, Source::Kick(_)) {
                kicks.push(fd);
            }
        }
        Ok(())
    }

    /// After a batch of events: retries held back for room, one flush towards the guest, and
    /// output interest to match.
    fn after_batch(&mut self) {
        if let Some(to_guest) = self.link.guest_side() {
            // The guest added RX buffers (or the stream socket drained) after frames were
            // refused for lack of room: what waits in sockets goes out in this batch.
            if to_guest.room_returned() {
                self.engine.room_returned(to_guest);
            }
            to_guest.flush();
            // The flush itself may have made the room (the stream socket took it all): no
            // EPOLLOUT would come to say so, and muted flows would wait for the next event.
            if to_guest.room_returned() {
                self.engine.room_returned(to_guest);
                to_guest.flush();
            }
        }
        if let Link::Stream {
            tap: Some(tap),
            out_watched,
        } = &mut self.link
        {
            let want = tap.wants_write();
            if want != *out_watched {
                let ev = if want {
                    epoll::Events::EPOLLIN | epoll::Events::EPOLLOUT
                } else {
                    epoll::Events::EPOLLIN
                };
                let fd = tap.socket().as_raw_fd();
                if self
                    .epoll
                    .ctl(epoll::ControlOptions::EPOLL_CTL_MOD, fd, ev, Token::TapConn)
                    .is_ok()
                {
                    *out_watched = want;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_runs_often_only_around_traffic() {
        let t0 = Instant::now();
        let mut w = WatchSchedule::new(true, t0);
        assert!(!w.due(t0));
        assert_eq!(w.next_in(t0), WATCHDOG_INTERVAL);
        let t1 = t0 + WATCHDOG_INTERVAL;
        assert!(w.due(t1));
        w.ran(t1);
        // Quiet for longer than the linger: back to the housekeeping period.
        let t2 = t0 + WATCH_LINGER;
        assert_eq!(w.next_in(t2), Duration::ZERO, "overdue at the old pace");
        w.ran(t2);
        assert_eq!(w.next_in(t2), PERIODIC);
        assert!(!w.due(t2 + WATCHDOG_INTERVAL));
        w.activity(t2 + WATCHDOG_INTERVAL);
        assert!(w.due(t2 + WATCHDOG_INTERVAL));
        // Stream mode: never.
        let s = WatchSchedule::new(false, t0);
        assert!(!s.due(t0 + PERIODIC * 10));
        assert_eq!(s.next_in(t0), Duration::MAX);
    }

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Signal,
            Token::Listener,
            Token::TapConn,
            Token::IcmpSock(FlowIdx(1023)),
            Token::VhostCtrl,
            Token::VhostKick(QueueIdx(1)),
            Token::TcpSock(FlowRef {
                idx: FlowIdx((1 << 24) - 1),
                gen: (1 << 24) - 1,
            }),
            Token::TcpSock(FlowRef {
                idx: FlowIdx(u32::MAX),
                gen: 0,
            }),
            Token::Timer,
            Token::UdpSock(FlowIdx(4095)),
            Token::TcpListen(65535),
            Token::UdpListen(65535),
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
        // A generation only where a TCP token carries one.
        assert_eq!(Token::decode(8 << 56 | 1 << 32), None);
    }
}
