//! The vhost-user-net device: control plane (this module) over the data plane in
//! [`crate::virtio`].
//!
//! # Theory of operation
//!
//! A [`Device`] serves one front-end (VMM) connection at a time. The caller owns the
//! listening socket and the event loop: it [`Device::attach`]es an accepted connection,
//! watches the descriptors from [`Device::watched_fds`] and calls [`Device::handle`] with the
//! [`Source`] that became readable. When `handle` returns [`Outcome::FdsChanged`] the set of
//! descriptors changed (a kick eventfd was set, replaced or dropped; closed ones leave epoll by
//! themselves); after [`Outcome::Disconnected`] the device is back to its initial state and
//! ready for the next `attach`. Nothing the front-end or the guest sends makes `handle` fail
//! or panic: bad requests get an error reply (or are skipped with a log line when no reply
//! is expected), and only an unreadable message stream ends the connection.
//!
//! ## Message order
//!
//! Requests are handled one at a time, each in one `handle(Source::Control)` call, in a
//! single table-like `match` (`Device::dispatch`). The order is not enforced, because
//! front-ends differ. QEMU (7.2 and 10) sends, before the guest driver is up: GET_FEATURES,
//! GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_OWNER, SET_VRING_CALL/ERR,
//! and **SET_VRING_ENABLE(1) for both rings before any SET_FEATURES** (QEMU 10 with
//! NEED_REPLY). When the driver sets DRIVER_OK: SET_FEATURES, ADD_MEM_REG (or SET_MEM_TABLE),
//! then per ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
//! SET_VRING_CALL. cloud-hypervisor sends SET_FEATURES first and enables rings last. So
//! every request only records its part of the state, and after each request
//! `Device::sync_rings` starts whatever ring has become complete: kicked (SET_VRING_KICK),
//! addressed, and backed by memory. Ring addresses are front-end virtual addresses and are
//! translated through the region table when the ring starts.
//!
//! A ring is *enabled* if SET_VRING_ENABLE(1) was received or PROTOCOL_FEATURES was not
//! acked (the spec's rule for front-ends without it); the flag is kept whatever came first.
//! A started but disabled TX ring is drained and its frames discarded; a disabled RX ring
//! gets no frames.
//!
//! ## Ring ownership
//!
//! Between two `handle` calls no descriptor chain is held: TX chains are returned within
//! the drain that popped them, RX chains are filled or rewound within one
//! [`ToGuest::send`]. Used elements staged by `send` become visible on
//! [`ToGuest::flush`]; the device flushes RX itself after each TX drain and RX kick, and a
//! caller sending frames of its own (socket replies through [`Device::to_guest`]) flushes
//! after its batch.
//!
//! ## Stop, reset, disconnect
//!
//! GET_VRING_BASE stops a ring: staged used elements are published, frames pending for RX
//! are dropped (counted), the kick eventfd is closed, and the reply is the next available
//! index. The front-end restarts it with a new SET_VRING_KICK, on the same connection.
//! RESET_OWNER/RESET_DEVICE stop both rings the same way, keeping negotiated features and
//! memory. On disconnect everything goes: rings, eventfds, memory mappings, features.
//!
//! ## Features
//!
//! Offered: VERSION_1, MRG_RXBUF, RING_EVENT_IDX, RING_INDIRECT_DESC, PROTOCOL_FEATURES,
//! and NET_F_MTU only when [`DeviceOptions::mtu`] is set (QEMU's `host_mtu=` then tells the
//! guest; we never send bigger frames than [`crate::tap::MAX_FRAME`] anyway). Not offered:
//! GUEST_CSUM and offloads (we send complete checksums), CTRL_VQ, VIRTIO_NET_F_MQ (one
//! queue pair), LOG_ALL (no live migration), config space (QEMU 7.2 masks it for net). Protocol features: MQ (needed for QEMU to ask
//! GET_QUEUE_NUM, answered with 1 pair), REPLY_ACK, CONFIGURE_MEM_SLOTS.

pub mod mem;
pub mod msg;

use std::fs::File;
use std::io::{Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserMemory, VhostUserMemoryRegion, VhostUserMsgValidator,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVirtioFeatures,
    VhostUserVringAddr, VhostUserVringState, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::ByteValued;

use crate::tap::{FrameHandler, ToGuest};
use crate::virtio::rx::{DEFAULT_PENDING_BYTES, DEFAULT_PENDING_FRAMES};
use crate::virtio::{
    LogLimit, NetFeatures, QueueIdx, RingConfig, RxQueue, RxStats, TxQueue, TxStats,
    DEFAULT_MAX_QUEUE_SIZE,
};
use mem::{MemError, MemTable};

/// Answer to GET_MAX_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = mem::MAX_REGIONS as u64;
/// SET_VRING_KICK/CALL/ERR payload: ring index bits, and "no file descriptor" flag.
const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;
/// Bound on a blocking control read or write (see [`msg`]).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often [`Device::watchdog`] should run while there is traffic: a notification the
/// guest lost stalls that queue for one to two intervals.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_millis(100);

/// Device settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Largest ring size accepted from SET_VRING_NUM (power of two).
    pub max_queue_size: u16,
    /// Offer VIRTIO_NET_F_MTU. The value itself reaches the guest through the VMM.
    pub mtu: Option<u16>,
    /// Bytes of frames kept while the guest has no RX buffers.
    pub pending_bytes: usize,
    /// Frames kept while the guest has no RX buffers.
    pub pending_frames: usize,
    /// Never lend TX frames to the engine in place: copy short ones, and the headers of
    /// long ones, whose tail stays in guest memory (see [`crate::virtio::tx`]).
    pub tx_copy: bool,
    /// Most TX chains handled per kick before yielding to the event loop.
    pub tx_budget: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            mtu: None,
            pending_bytes: DEFAULT_PENDING_BYTES,
            pending_frames: DEFAULT_PENDING_FRAMES,
            tx_copy: false,
            tx_budget: 256,
        }
    }
}

/// What became readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The control socket.
    Control,
    /// A kick eventfd: the guest added buffers to this queue.
    Kick(QueueIdx),
}

/// What the caller should do after [`Device::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Nothing.
    Continue,
    /// Re-read [`Device::watched_fds`].
    FdsChanged,
    /// The connection is gone; the device waits for [`Device::attach`].
    Disconnected,
}

/// Control-plane counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlStats {
    /// Connections attached.
    pub connections: u64,
    /// Requests read.
    pub messages: u64,
    /// Requests with a malformed payload or missing descriptors.
    pub malformed: u64,
    /// Requests we don't implement, or unknown codes.
    pub unsupported: u64,
    /// Well-formed requests that failed (bad memory region, feature not offered...).
    pub failed: u64,
    /// Rings that could not start (addresses outside memory...).
    pub ring_start_failed: u64,
}

/// All counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rx: RxStats,
    pub tx: TxStats,
    pub ctrl: CtrlStats,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum ReqError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("unsupported request")]
    Unsupported,
    #[error("unknown request code")]
    Unknown,
    #[error("ring index {0} out of range")]
    Ring(u64),
    #[error("ring size {0} invalid")]
    RingSize(u32),
    #[error("features {0:#x} were not offered")]
    Features(u64),
    #[error("memory table")]
    Mem(#[from] MemError),
}

/// A successful request's reply.
enum Answer {
    /// None, beyond REPLY_ACK if asked for.
    Ack,
    U64(u64),
    /// A `VhostUserVringState`.
    State(u32, u32),
}

/// What the front-end told us about one ring.
#[derive(Debug, Default)]
struct RingSetup {
    /// SET_VRING_NUM (0 = not set: use our maximum).
    num: u16,
    /// SET_VRING_ADDR: descriptor table, avail ring, used ring (front-end addresses).
    addr: Option<(u64, u64, u64)>,
    /// SET_VRING_BASE.
    base: u16,
    /// SET_VRING_KICK eventfd (none in polling mode).
    kick: Option<File>,
    /// Kicked and not stopped since.
    started: bool,
    /// SET_VRING_ENABLE.
    enabled: bool,
}

/// One vhost-user-net device.
#[derive(Debug)]
pub struct Device {
    opts: DeviceOptions,
    conn: Option<UnixStream>,
    /// Acked virtio features.
    features: u64,
    /// Acked protocol features.
    protocol: u64,
    /// SET_STATUS value.
    status: u64,
    mem: MemTable,
    setup: [RingSetup; QueueIdx::COUNT],
    rx: RxQueue,
    tx: TxQueue,
    ctrl: CtrlStats,
    body: Box<[u8; MAX_MSG_SIZE]>,
    fds: Vec<File>,
    log: LogLimit,
    /// The watchdog's first find on this connection was logged.
    said_late: bool,
}

impl Device {
    /// A device with no connection. Out-of-range options are replaced by defaults.
    pub fn new(mut opts: DeviceOptions) -> Self {
        if !opts.max_queue_size.is_power_of_two()
            || opts.max_queue_size > crate::virtio::MAX_QUEUE_SIZE
        {
            opts.max_queue_size = DEFAULT_MAX_QUEUE_SIZE;
        }
        opts.tx_budget = opts.tx_budget.max(1);
        let rx = RxQueue::new(opts.max_queue_size, opts.pending_bytes, opts.pending_frames);
        let tx = TxQueue::new(opts.max_queue_size, opts.tx_copy);
        Device {
            opts,
            conn: None,
            features: 0,
            protocol: 0,
            status: 0,
            mem: MemTable::new(),
            setup: Default::default(),
            rx,
            tx,
            ctrl: CtrlStats::default(),
            body: Box::new([0u8; MAX_MSG_SIZE]),
            fds: Vec::with_capacity(MAX_ATTACHED_FD_ENTRIES),
            log: LogLimit::default(),
            said_late: false,
        }
    }

    /// Virtio features we offer.
    pub fn offered_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.opts.mtu.is_some() {
            f |= 1u64 << VIRTIO_NET_F_MTU;
        }
        f
    }

    /// vhost-user protocol features we offer.
    pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    /// Takes a freshly accepted front-end connection. An existing one is dropped first.
    pub fn attach(&mut self, conn: UnixStream) {
        if self.conn.is_some() {
            log::warn!("vhost-user: new connection replaces the current one");
            self.detach();
        }
        // Control reads are blocking (see `msg`), bounded by a timeout.
        let setup = conn
            .set_nonblocking(false)
            .and_then(|_| conn.set_read_timeout(Some(CONTROL_TIMEOUT)))
            .and_then(|_| conn.set_write_timeout(Some(CONTROL_TIMEOUT)));
        if let Err(e) = setup {
            log::warn!("vhost-user: configuring control socket: {e}");
        }
        self.ctrl.connections += 1;
        self.conn = Some(conn);
        self.said_late = false;
    }

    /// Whether a front-end is attached.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Drops the connection and all its state. Called on disconnect; callers may use it to
    /// kick a front-end out.
    pub fn detach(&mut self) {
        self.conn = None;
        self.rx.stop();
        self.tx.stop();
        for q in [self.rx.ring(), self.tx.ring()] {
            q.set_call(None);
            q.set_err(None);
        }
        self.rx.set_enabled(false);
        self.tx.set_enabled(false);
        self.setup = Default::default();
        self.mem.clear();
        self.features = 0;
        self.protocol = 0;
        self.status = 0;
    }

    /// Descriptors to watch for readability, and what each one is.
    pub fn watched_fds(&self) -> impl Iterator<Item = (RawFd, Source)> + '_ {
        let ctrl = self.conn.as_ref().map(|c| (c.as_raw_fd(), Source::Control));
        let kicks = self.setup.iter().enumerate().filter_map(|(i, s)| {
            s.kick
                .as_ref()
                .map(|k| (k.as_raw_fd(), Source::Kick(QueueIdx(i as u16))))
        });
        ctrl.into_iter().chain(kicks)
    }

    /// Handles readiness of `src`. TX frames go to `engine`, with this device's RX side as
    /// their [`ToGuest`]; RX is flushed before returning.
    ///
    /// Each call does a bounded amount of work (one control message, or one TX drain of at
    /// most [`DeviceOptions::tx_budget`] chains, re-kicking itself if more wait), so the
    /// descriptors are meant for level-triggered polling.
    pub fn handle(&mut self, src: Source, engine: &mut dyn FrameHandler) -> Outcome {
        match src {
            Source::Control => self.handle_control(),
            Source::Kick(q) => {
                self.handle_kick(q, engine);
                Outcome::Continue
            }
        }
    }

    /// Frames originated by the engine (socket data, timers) go here; flush after a batch.
    pub fn to_guest(&mut self) -> &mut dyn ToGuest {
        &mut self.rx
    }

    /// Whether frames wait for guest RX buffers (a reason to stop reading sockets).
    pub fn rx_backlogged(&self) -> bool {
        self.rx.has_pending()
    }

    /// Acked virtio features (0 before SET_FEATURES).
    pub fn acked_features(&self) -> u64 {
        self.features
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            rx: *self.rx.stats(),
            tx: *self.tx.stats(),
            ctrl: self.ctrl,
        }
    }

    /// Both queues as they stand, for a state dump.
    pub fn snapshot(&self) -> (crate::virtio::RxSnapshot, crate::virtio::RingSnapshot) {
        (self.rx.snapshot(), self.tx.snapshot())
    }

    fn handle_kick(&mut self, q: QueueIdx, engine: &mut dyn FrameHandler) {
        let Some(kick) = self
            .setup
            .get(usize::from(q.0))
            .and_then(|s| s.kick.as_ref())
        else {
            return;
        };
        // Consume the event; nothing to do if it was already consumed (EAGAIN).
        let _ = (&*kick).read(&mut [0u8; 8]);
        match q {
            QueueIdx::TX => self.drain_tx(engine),
            QueueIdx::RX => self.rx.handle_kick(),
            _ => {}
        }
    }

    fn drain_tx(&mut self, engine: &mut dyn FrameHandler) {
        if !self.tx.is_running() {
            return;
        }
        let more = self.tx.drain(&mut self.rx, engine, self.opts.tx_budget);
        self.rx.flush();
        if more {
            // Come back after the rest of the event loop had its turn.
            if let Some(kick) = self.setup[usize::from(QueueIdx::TX.0)].kick.as_ref() {
                let _ = (&*kick).write(&1u64.to_ne_bytes());
            }
        }
    }

    /// Acts on notifications the guest missed or didn't send (see "Lost notifications" in
    /// [`crate::virtio`]); meant to run every [`WATCHDOG_INTERVAL`] while there is traffic.
    /// Returns whether to keep running it: something found now must be confirmed (or ruled
    /// out) at the next call.
    pub fn watchdog(&mut self, engine: &mut dyn FrameHandler) -> bool {
        let before = self.late_notifications();
        let mut watching = self.rx.watchdog();
        if self.tx.watchdog() {
            self.drain_tx(engine);
        }
        watching |= self.tx.watching();
        let late = self.late_notifications();
        if late != before {
            let (rx, tx) = (self.rx.stats(), self.tx.stats());
            let counts = format_args!(
                "RX: {} kicks, {} interrupts; TX: {} kicks, {} interrupts",
                rx.late_kicks, rx.late_interrupts, tx.late_kicks, tx.late_interrupts
            );
            if !std::mem::replace(&mut self.said_late, true) {
                log::info!(
                    "vhost-user: the guest missed a notification and the watchdog made up \
                     for it; if this repeats, its memory barriers don't order against ours \
                     (QEMU before 8.1 elides them under TCG with one vCPU). So far {counts}"
                );
            } else if self.log.allow() {
                log::debug!("vhost-user: late notifications so far: {counts}");
            }
        }
        watching
    }

    fn late_notifications(&self) -> u64 {
        let (rx, tx) = (self.rx.stats(), self.tx.stats());
        rx.late_kicks + rx.late_interrupts + tx.late_kicks + tx.late_interrupts
    }

    fn fd_signature(&self) -> [Option<RawFd>; 1 + QueueIdx::COUNT] {
        let mut sig = [None; 1 + QueueIdx::COUNT];
        sig[0] = self.conn.as_ref().map(|c| c.as_raw_fd());
        for (i, s) in self.setup.iter().enumerate() {
            sig[1 + i] = s.kick.as_ref().map(|k| k.as_raw_fd());
        }
        sig
    }

    fn handle_control(&mut self) -> Outcome {
        let Some(conn) = self.conn.as_ref() else {
            return Outcome::Disconnected;
        };
        self.fds.clear();
        let (hdr, size) = match msg::recv(conn, &mut self.body, &mut self.fds) {
            Ok(m) => m,
            Err(msg::RecvError::Closed) => {
                log::info!("vhost-user: front-end disconnected");
                self.detach();
                return Outcome::Disconnected;
            }
            Err(e) => {
                log::warn!("vhost-user: {e}, dropping connection");
                self.detach();
                return Outcome::Disconnected;
            }
        };
        self.ctrl.messages += 1;
        let before = self.fd_signature();
        let fds = std::mem::take(&mut self.fds);
        let req = FrontendReq::try_from(hdr.request).ok();
        log::trace!(
            "vhost-user: request {:?} ({}), {size} bytes, {} fds",
            req,
            hdr.request,
            fds.len()
        );
        let res = match req {
            Some(r) => self.dispatch(r, size, fds),
            None => Err(ReqError::Unknown),
        };
        self.sync_rings();

        let inherent = req.is_some_and(has_reply);
        let ack =
            hdr.need_reply() && self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        let mut payload = [0u8; 8];
        let reply = match res {
            Ok(Answer::U64(v)) => {
                payload = v.to_ne_bytes();
                true
            }
            Ok(Answer::State(index, num)) => {
                payload = VhostUserVringState::new(index, num)
                    .as_slice()
                    .try_into()
                    .expect("VhostUserVringState is 8 bytes");
                true
            }
            Ok(Answer::Ack) => ack,
            Err(e) => {
                match e {
                    ReqError::Unknown | ReqError::Unsupported => self.ctrl.unsupported += 1,
                    ReqError::Malformed(_) => self.ctrl.malformed += 1,
                    _ => self.ctrl.failed += 1,
                }
                if self.log.allow() {
                    log::warn!(
                        "vhost-user: request {} ({:?}): {}",
                        hdr.request,
                        req,
                        error_chain(&e)
                    );
                }
                payload = 1u64.to_ne_bytes();
                inherent || ack
            }
        };
        if reply {
            if let Some(conn) = self.conn.as_ref() {
                if let Err(e) = msg::send_reply(conn, hdr.request, &payload) {
                    log::warn!("vhost-user: sending reply: {e}, dropping connection");
                    self.detach();
                    return Outcome::Disconnected;
                }
            }
        }
        if self.fd_signature() != before {
            Outcome::FdsChanged
        } else {
            Outcome::Continue
        }
    }

    /// One request: records state, answers. No I/O on the socket.
    fn dispatch(
        &mut self,
        req: FrontendReq,
        size: usize,
        fds: Vec<File>,
    ) -> Result<Answer, ReqError> {
        use FrontendReq as R;
        match req {
            R::GET_FEATURES => Ok(Answer::U64(self.offered_features())),
            R::SET_FEATURES => {
                let v = self.body::<VhostUserU64>(size)?.value;
                if v & !self.offered_features() != 0 {
                    return Err(ReqError::Features(v & !self.offered_features()));
                }
                self.set_features(v);
                Ok(Answer::Ack)
            }
            R::SET_OWNER => Ok(Answer::Ack),
            R::RESET_OWNER | R::RESET_DEVICE => {
                for i in 0..QueueIdx::COUNT {
                    self.stop_ring(i);
                }
                Ok(Answer::Ack)
            }
            R::GET_PROTOCOL_FEATURES => Ok(Answer::U64(Self::offered_protocol_features().bits())),
            R::SET_PROTOCOL_FEATURES => {
                let v = self.body::<VhostUserU64>(size)?.value;
                let offered = Self::offered_protocol_features().bits();
                if v & !offered != 0 {
                    return Err(ReqError::Features(v & !offered));
                }
                self.protocol = v;
                Ok(Answer::Ack)
            }
            R::GET_QUEUE_NUM => Ok(Answer::U64(1)),
            R::GET_MAX_MEM_SLOTS => Ok(Answer::U64(MAX_MEM_SLOTS)),
            R::SET_MEM_TABLE => {
                self.set_mem_table(size, fds)?;
                Ok(Answer::Ack)
            }
            R::ADD_MEM_REG => {
                let r = self.body::<VhostUserSingleMemoryRegion>(size)?;
                let mut fds = fds.into_iter();
                let (Some(f), None) = (fds.next(), fds.next()) else {
                    return Err(ReqError::Malformed("ADD_MEM_REG needs exactly one fd"));
                };
                self.mem.add(&r, f)?;
                self.memory_changed();
                Ok(Answer::Ack)
            }
            R::REM_MEM_REG => {
                let r = self.body::<VhostUserSingleMemoryRegion>(size)?;
                self.mem.remove(&r)?;
                self.memory_changed();
                Ok(Answer::Ack)
            }
            R::SET_VRING_NUM => {
                let s = self.body::<VhostUserVringState>(size)?;
                let i = ring_index(u64::from(s.index))?;
                let num = s.num;
                if num == 0 || !num.is_power_of_two() || num > u32::from(self.opts.max_queue_size) {
                    return Err(ReqError::RingSize(num));
                }
                self.setup[i].num = num as u16;
                Ok(Answer::Ack)
            }
            R::SET_VRING_ADDR => {
                let a = self.body::<VhostUserVringAddr>(size)?;
                if !a.is_valid() {
                    return Err(ReqError::Malformed("misaligned ring or unknown flags"));
                }
                let i = ring_index(u64::from(a.index))?;
                let addr = Some((a.descriptor, a.available, a.used));
                if self.setup[i].addr != addr {
                    // Moving a running ring: restart it at the same position.
                    if self.ring_started(i) {
                        self.setup[i].base = self.stop_data_ring(i);
                    }
                    self.setup[i].addr = addr;
                }
                Ok(Answer::Ack)
            }
            R::SET_VRING_BASE => {
                let s = self.body::<VhostUserVringState>(size)?;
                let i = ring_index(u64::from(s.index))?;
                let base = u16::try_from(s.num).map_err(|_| ReqError::Malformed("base"))?;
                self.setup[i].base = base;
                Ok(Answer::Ack)
            }
            R::GET_VRING_BASE => {
                let s = self.body::<VhostUserVringState>(size)?;
                let i = ring_index(u64::from(s.index))?;
                let base = self.stop_ring(i);
                Ok(Answer::State(i as u32, u32::from(base)))
            }
            R::SET_VRING_KICK => {
                let (i, fd) = self.vring_fd(size, fds)?;
                if let Some(f) = fd.as_ref() {
                    set_nonblocking(f);
                } else {
                    log::warn!("vhost-user: ring {i} in polling mode is not supported");
                }
                self.setup[i].kick = fd;
                self.setup[i].started = true;
                Ok(Answer::Ack)
            }
            R::SET_VRING_CALL => {
                let (i, fd) = self.vring_fd(size, fds)?;
                self.ring(i).set_call(fd);
                Ok(Answer::Ack)
            }
            R::SET_VRING_ERR => {
                let (i, fd) = self.vring_fd(size, fds)?;
                self.ring(i).set_err(fd);
                Ok(Answer::Ack)
            }
            R::SET_VRING_ENABLE => {
                let s = self.body::<VhostUserVringState>(size)?;
                let i = ring_index(u64::from(s.index))?;
                if s.num > 1 {
                    return Err(ReqError::Malformed("enable is 0 or 1"));
                }
                self.setup[i].enabled = s.num == 1;
                Ok(Answer::Ack)
            }
            R::SEND_RARP => {
                // Only useful after migration, which we don't support; nothing to announce.
                self.body::<VhostUserU64>(size)?;
                Ok(Answer::Ack)
            }
            R::NET_SET_MTU => {
                let mtu = self.body::<VhostUserU64>(size)?.value;
                log::info!("vhost-user: front-end MTU {mtu}");
                Ok(Answer::Ack)
            }
            R::SET_LOG_BASE | R::SET_LOG_FD => {
                // Dirty logging is only used for migration (LOG_ALL, not offered): accept and
                // ignore, closing any descriptor.
                Ok(Answer::Ack)
            }
            R::SET_STATUS => {
                self.status = self.body::<VhostUserU64>(size)?.value;
                Ok(Answer::Ack)
            }
            R::GET_STATUS => Ok(Answer::U64(self.status)),
            _ => Err(ReqError::Unsupported),
        }
    }

    /// Copies a fixed-size payload out of the message buffer, whatever its alignment.
    fn body<T: ByteValued + Default>(&self, size: usize) -> Result<T, ReqError> {
        if size != size_of::<T>() {
            return Err(ReqError::Malformed("payload size"));
        }
        let mut v = T::default();
        v.as_mut_slice().copy_from_slice(&self.body[..size]);
        Ok(v)
    }

    fn set_features(&mut self, v: u64) {
        let old = NetFeatures::from_acked(self.features);
        let new = NetFeatures::from_acked(v);
        if old != new && (0..QueueIdx::COUNT).any(|i| self.ring_started(i)) {
            log::warn!("vhost-user: features changed on running rings, applied at restart");
        }
        self.features = v;
    }

    fn set_mem_table(&mut self, size: usize, fds: Vec<File>) -> Result<(), ReqError> {
        const HDR: usize = size_of::<VhostUserMemory>();
        const REGION: usize = size_of::<VhostUserMemoryRegion>();
        if size < HDR {
            return Err(ReqError::Malformed("payload size"));
        }
        let mut h = VhostUserMemory::default();
        h.as_mut_slice().copy_from_slice(&self.body[..HDR]);
        let n = h.num_regions as usize;
        if !h.is_valid() || size != HDR + n * REGION {
            return Err(ReqError::Malformed("region count"));
        }
        let mut regions = [VhostUserMemoryRegion::default(); MAX_ATTACHED_FD_ENTRIES];
        for (k, r) in regions[..n].iter_mut().enumerate() {
            let off = HDR + k * REGION;
            r.as_mut_slice()
                .copy_from_slice(&self.body[off..off + REGION]);
        }
        self.mem.set(&regions[..n], fds)?;
        self.memory_changed();
        Ok(())
    }

    fn memory_changed(&mut self) {
        let mem = self.mem.guest_memory().cloned();
        self.rx.ring().set_mem(mem.clone());
        self.tx.ring().set_mem(mem);
    }

    fn vring_fd(&self, size: usize, fds: Vec<File>) -> Result<(usize, Option<File>), ReqError> {
        let v = self.body::<VhostUserU64>(size)?.value;
        if v & !(VRING_IDX_MASK | VRING_NOFD) != 0 {
            return Err(ReqError::Malformed("reserved bits in ring fd payload"));
        }
        let i = ring_index(v & VRING_IDX_MASK)?;
        let mut fds = fds.into_iter();
        match (v & VRING_NOFD != 0, fds.next(), fds.next()) {
            (true, _, _) => Ok((i, None)),
            (false, Some(f), None) => Ok((i, Some(f))),
            (false, None, _) => Err(ReqError::Malformed("missing fd")),
            (false, Some(_), Some(_)) => Err(ReqError::Malformed("more than one fd")),
        }
    }

    fn ring(&mut self, i: usize) -> &mut crate::virtio::Vring {
        if i == usize::from(QueueIdx::RX.0) {
            self.rx.ring()
        } else {
            self.tx.ring()
        }
    }

    fn ring_started(&mut self, i: usize) -> bool {
        self.ring(i).is_started()
    }

    /// Stops the data-plane ring, returning where to resume.
    fn stop_data_ring(&mut self, i: usize) -> u16 {
        if i == usize::from(QueueIdx::RX.0) {
            self.rx.stop()
        } else {
            self.tx.stop()
        }
    }

    /// GET_VRING_BASE: stops the ring and forgets its kick. Returns the next avail index.
    fn stop_ring(&mut self, i: usize) -> u16 {
        let base = if self.ring_started(i) {
            self.stop_data_ring(i)
        } else {
            self.setup[i].base
        };
        let s = &mut self.setup[i];
        s.base = base;
        s.started = false;
        s.kick = None;
        base
    }

    /// Applies enable flags, and starts every ring whose setup became complete.
    fn sync_rings(&mut self) {
        let proto = self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        self.rx
            .set_enabled(!proto || self.setup[usize::from(QueueIdx::RX.0)].enabled);
        self.tx
            .set_enabled(!proto || self.setup[usize::from(QueueIdx::TX.0)].enabled);
        let feat = NetFeatures::from_acked(self.features);
        for i in 0..QueueIdx::COUNT {
            if !self.setup[i].started || self.ring_started(i) {
                continue;
            }
            let s = &self.setup[i];
            let (Some(mem), Some((d, a, u))) = (self.mem.guest_memory(), s.addr) else {
                continue;
            };
            let tr = |x| self.mem.user_to_gpa(x);
            let (Some(desc), Some(avail), Some(used)) = (tr(d), tr(a), tr(u)) else {
                self.ctrl.ring_start_failed += 1;
                if self.log.allow() {
                    log::warn!("vhost-user: ring {i} addresses outside guest memory");
                }
                continue;
            };
            let cfg = RingConfig {
                size: if s.num == 0 {
                    self.opts.max_queue_size
                } else {
                    s.num
                },
                desc,
                avail,
                used,
                next_avail: s.base,
            };
            let mem = mem.clone();
            let res = if i == usize::from(QueueIdx::RX.0) {
                self.rx.start(mem, &cfg, feat)
            } else {
                self.tx.start(mem, &cfg, feat)
            };
            match res {
                Ok(()) => {
                    log::debug!("vhost-user: ring {i} started: {cfg:?}");
                    // Frames queued before we started get no kick of their own.
                    if i == usize::from(QueueIdx::TX.0) {
                        if let Some(k) = self.setup[i].kick.as_ref() {
                            let _ = (&*k).write(&1u64.to_ne_bytes());
                        }
                    }
                }
                Err(e) => {
                    self.ctrl.ring_start_failed += 1;
                    if self.log.allow() {
                        log::warn!("vhost-user: ring {i} can't start: {}", error_chain(&e));
                    }
                }
            }
        }
    }
}

/// Requests whose protocol reply exists whatever REPLY_ACK says.
fn has_reply(r: FrontendReq) -> bool {
    use FrontendReq as R;
    matches!(
        r,
        R::GET_FEATURES
            | R::GET_PROTOCOL_FEATURES
            | R::GET_QUEUE_NUM
            | R::GET_VRING_BASE
            | R::GET_CONFIG
            | R::GET_MAX_MEM_SLOTS
            | R::GET_STATUS
            | R::GET_INFLIGHT_FD
            | R::GET_SHARED_OBJECT
            | R::SET_DEVICE_STATE_FD
            | R::CHECK_DEVICE_STATE
            | R::GET_SHMEM_CONFIG
            | R::POSTCOPY_ADVISE
    )
}

fn ring_index(i: u64) -> Result<usize, ReqError> {
    if i < QueueIdx::COUNT as u64 {
        Ok(i as usize)
    } else {
        Err(ReqError::Ring(i))
    }
}

fn set_nonblocking(f: &File) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let res = fcntl(f, FcntlArg::F_GETFL).and_then(|fl| {
        let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
        fcntl(f, FcntlArg::F_SETFL(fl))
    });
    if let Err(e) = res {
        log::warn!("vhost-user: making kick eventfd non-blocking: {e}");
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::msg::{Header, HDR_SIZE};
    use super::*;
    use crate::virtio::testutil::{self, Driver, MEM_SIZE};
    use std::io::ErrorKind;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    use FrontendReq as R;

    const NEED: bool = true;
    const NO: bool = false;
    /// Where the "VMM" pretends guest memory is mapped (user addresses).
    const USER_BASE: u64 = 0x7f00_0000_0000;

    /// Records frames and echoes each one back.
    #[derive(Default)]
    struct Echo(Vec<Vec<u8>>);
    impl FrameHandler for Echo {
        fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest) {
            self.0.push(frame.to_vec());
            to_guest.send(&[frame]);
        }
    }

    /// The front-end side of a socketpair, driving a device in the same thread.
    struct Vmm {
        sock: UnixStream,
        dev: Device,
        eng: Echo,
    }

    impl Vmm {
        fn new() -> Self {
            let (a, b) = UnixStream::pair().expect("socketpair");
            a.set_nonblocking(true).expect("nonblocking");
            let mut dev = Device::new(DeviceOptions::default());
            dev.attach(b);
            Vmm {
                sock: a,
                dev,
                eng: Echo::default(),
            }
        }

        /// Sends one request and lets the device handle it.
        fn req(&mut self, req: R, need_reply: bool, body: &[u8], fds: &[RawFd]) -> Outcome {
            let code: u32 = req.into();
            self.raw(
                Header::request(code, body.len() as u32, need_reply),
                body,
                fds,
            )
        }

        fn raw(&mut self, h: Header, body: &[u8], fds: &[RawFd]) -> Outcome {
            let mut m = h.to_bytes().to_vec();
            m.extend_from_slice(body);
            self.sock.send_with_fds(&[&m[..]], fds).expect("send");
            self.dev.handle(Source::Control, &mut self.eng)
        }

        /// The reply waiting on the socket, if any.
        fn reply(&mut self) -> Option<(Header, Vec<u8>)> {
            let mut h = [0u8; HDR_SIZE];
            match self.sock.read(&mut h) {
                Ok(HDR_SIZE) => {}
                Ok(n) => panic!("short reply header: {n}"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) => panic!("read: {e}"),
            }
            let h = Header::from_bytes(&h);
            let mut body = vec![0u8; h.size as usize];
            self.sock.read_exact(&mut body).expect("reply body");
            assert!(h.is_reply());
            Some((h, body))
        }

        fn reply_u64(&mut self) -> u64 {
            let (_, b) = self.reply().expect("a reply");
            assert_eq!(b.len(), 8);
            u64::from_ne_bytes(b.try_into().expect("8 bytes"))
        }

        /// Request answered with a u64 (GET_* or REPLY_ACK).
        fn ask(&mut self, req: R, need_reply: bool, body: &[u8], fds: &[RawFd]) -> u64 {
            assert_eq!(self.req(req, need_reply, body, fds), Outcome::Continue);
            self.reply_u64()
        }

        fn negotiate(&mut self, reply_ack: bool) {
            assert_eq!(
                self.ask(R::GET_FEATURES, NO, &[], &[]),
                self.dev.offered_features()
            );
            let mut p =
                VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            if reply_ack {
                p |= VhostUserProtocolFeatures::REPLY_ACK;
            }
            let _ = self.req(R::SET_PROTOCOL_FEATURES, NO, &u64b(p.bits()), &[]);
            assert!(self.reply().is_none());
        }
    }

    fn u64b(v: u64) -> [u8; 8] {
        v.to_ne_bytes()
    }

    fn state(i: u32, n: u32) -> Vec<u8> {
        VhostUserVringState::new(i, n).as_slice().to_vec()
    }

    fn memfd(len: u64) -> File {
        // SAFETY: valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"passt-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh descriptor.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).expect("set_len");
        f
    }

    fn single_region(gpa: u64, size: u64, user: u64) -> Vec<u8> {
        VhostUserSingleMemoryRegion::new(gpa, size, user, 0)
            .as_slice()
            .to_vec()
    }

    /// Guest memory shared with the device through a memfd, announced with ADD_MEM_REG.
    fn shared_memory(v: &mut Vmm) -> GuestMemoryMmap {
        let f = memfd(MEM_SIZE as u64);
        let body = single_region(0, MEM_SIZE as u64, USER_BASE);
        assert_eq!(v.ask(R::ADD_MEM_REG, NEED, &body, &[f.as_raw_fd()]), 0);
        GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(f, 0)),
        )])
        .expect("guest view")
    }

    /// Sets up ring `i` from the driver's layout, QEMU style, and returns its kick and call.
    fn setup_ring(v: &mut Vmm, d: &Driver, i: u32) -> (File, File) {
        let c = d.config();
        assert_eq!(
            v.ask(R::SET_VRING_NUM, NEED, &state(i, c.size.into()), &[]),
            0
        );
        assert_eq!(v.ask(R::SET_VRING_BASE, NEED, &state(i, 0), &[]), 0);
        let addr = VhostUserVringAddr::new(
            i,
            vhost::vhost_user::message::VhostUserVringAddrFlags::empty(),
            USER_BASE + c.desc,
            USER_BASE + c.used,
            USER_BASE + c.avail,
            0,
        );
        assert_eq!(v.ask(R::SET_VRING_ADDR, NEED, addr.as_slice(), &[]), 0);
        let (kick, kick_dev) = testutil::eventfd();
        let (call_dev, call) = testutil::eventfd();
        assert_eq!(
            v.req(
                R::SET_VRING_KICK,
                NEED,
                &u64b(i.into()),
                &[kick_dev.as_raw_fd()]
            ),
            Outcome::FdsChanged
        );
        assert_eq!(v.reply_u64(), 0);
        assert_eq!(
            v.ask(
                R::SET_VRING_CALL,
                NEED,
                &u64b(i.into()),
                &[call_dev.as_raw_fd()]
            ),
            0
        );
        (kick, call)
    }

    #[test]
    fn answers_queries() {
        let mut v = Vmm::new();
        let f = v.ask(R::GET_FEATURES, NO, &[], &[]);
        assert_eq!(f, v.dev.offered_features());
        for bit in [32, 15, 29, 28, 30] {
            assert!(f & (1 << bit) != 0, "feature bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_NET_F_MTU), 0, "MTU only when configured");
        assert_eq!(f & (1 << 1), 0, "no GUEST_CSUM");
        assert_eq!(v.ask(R::GET_PROTOCOL_FEATURES, NO, &[], &[]), 0x8009);
        v.negotiate(true);
        assert_eq!(v.ask(R::GET_QUEUE_NUM, NO, &[], &[]), 1, "queue pairs");
        assert_eq!(v.ask(R::GET_MAX_MEM_SLOTS, NO, &[], &[]), MAX_MEM_SLOTS);
        // GET_* requests have their own reply: NEED_REPLY adds nothing.
        assert_eq!(v.ask(R::GET_QUEUE_NUM, NEED, &[], &[]), 1);
        assert!(v.reply().is_none());
        assert_eq!(v.ask(R::SET_STATUS, NEED, &u64b(0xf), &[]), 0);
        assert_eq!(v.ask(R::GET_STATUS, NO, &[], &[]), 0xf);

        let mut with_mtu = Device::new(DeviceOptions {
            mtu: Some(9000),
            ..Default::default()
        });
        assert!(with_mtu.offered_features() & (1 << VIRTIO_NET_F_MTU) != 0);
        with_mtu.detach();
    }

    #[test]
    fn need_reply_is_honoured_only_with_reply_ack() {
        let mut v = Vmm::new();
        v.negotiate(false);
        let _ = v.req(R::SET_OWNER, NEED, &[], &[]);
        assert!(v.reply().is_none(), "REPLY_ACK not negotiated");
        let mut v = Vmm::new();
        v.negotiate(true);
        assert_eq!(v.ask(R::SET_OWNER, NEED, &[], &[]), 0);
        let _ = v.req(R::SET_OWNER, NO, &[], &[]);
        assert!(v.reply().is_none(), "no NEED_REPLY, no ack");
        // SET_PROTOCOL_FEATURES enabling REPLY_ACK with NEED_REPLY is acked itself.
        let mut v = Vmm::new();
        let p = VhostUserProtocolFeatures::REPLY_ACK.bits();
        assert_eq!(v.ask(R::SET_PROTOCOL_FEATURES, NEED, &u64b(p), &[]), 0);
    }

    #[test]
    fn unknown_unsupported_and_malformed_requests_keep_the_connection() {
        let mut v = Vmm::new();
        v.negotiate(true);
        // Unknown code, with a payload to skip.
        assert_eq!(
            v.raw(Header::request(999, 4, NEED), &[1, 2, 3, 4], &[]),
            Outcome::Continue
        );
        assert_eq!(v.reply_u64(), 1);
        let _ = v.raw(Header::request(999, 0, NO), &[], &[]);
        assert!(v.reply().is_none());
        // Unsupported request that always has a reply: answered with an error anyway.
        assert_eq!(v.ask(R::GET_INFLIGHT_FD, NO, &[0; 24], &[]), 1);
        // Unsupported without reply.
        let _ = v.req(R::SET_BACKEND_REQ_FD, NO, &[], &[]);
        assert!(v.reply().is_none());
        // Wrong payload sizes.
        assert_eq!(v.ask(R::SET_FEATURES, NEED, &[0; 4], &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_NUM, NEED, &[0; 12], &[]), 1);
        assert_eq!(v.ask(R::GET_VRING_BASE, NO, &[0; 4], &[]), 1);
        // Features we didn't offer.
        assert_eq!(v.ask(R::SET_FEATURES, NEED, &u64b(1 << 1), &[]), 1);
        assert_eq!(v.ask(R::SET_PROTOCOL_FEATURES, NEED, &u64b(1 << 9), &[]), 1);
        // Ring index, size and alignment.
        assert_eq!(v.ask(R::SET_VRING_NUM, NEED, &state(2, 256), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_NUM, NEED, &state(0, 100), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_NUM, NEED, &state(0, 2048), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_NUM, NEED, &state(0, 0), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_BASE, NEED, &state(0, 70000), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_ENABLE, NEED, &state(0, 2), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_ENABLE, NEED, &state(5, 1), &[]), 1);
        let bad = VhostUserVringAddr::new(
            0,
            vhost::vhost_user::message::VhostUserVringAddrFlags::empty(),
            0x1008,
            0x2000,
            0x3000,
            0,
        );
        assert_eq!(v.ask(R::SET_VRING_ADDR, NEED, bad.as_slice(), &[]), 1);
        // Ring fds: missing fd, reserved bits, bad index.
        assert_eq!(v.ask(R::SET_VRING_CALL, NEED, &u64b(0), &[]), 1);
        assert_eq!(v.ask(R::SET_VRING_CALL, NEED, &u64b(0x200), &[]), 1);
        let (a, _b) = testutil::eventfd();
        assert_eq!(
            v.ask(R::SET_VRING_KICK, NEED, &u64b(7), &[a.as_raw_fd()]),
            1
        );
        // Memory: fd count mismatch, bad region.
        let f = memfd(0x1000);
        let body = single_region(0, 0x1000, 0);
        assert_eq!(v.ask(R::ADD_MEM_REG, NEED, &body, &[]), 1);
        assert_eq!(
            v.ask(
                R::ADD_MEM_REG,
                NEED,
                &single_region(0, 0x2000, 0),
                &[f.as_raw_fd()]
            ),
            1
        );
        assert_eq!(v.ask(R::REM_MEM_REG, NEED, &body, &[]), 1);
        let mut table = VhostUserMemory::new(2).as_slice().to_vec();
        table.extend_from_slice(VhostUserMemoryRegion::new(0, 0x1000, 0, 0).as_slice());
        assert_eq!(v.ask(R::SET_MEM_TABLE, NEED, &table, &[f.as_raw_fd()]), 1);
        assert_eq!(v.ask(R::SET_MEM_TABLE, NEED, &[0; 4], &[]), 1);

        let s = v.dev.stats().ctrl;
        assert_eq!(s.unsupported, 4);
        assert!(s.malformed >= 10, "{s:?}");
        assert!(s.failed >= 5, "{s:?}");
        // Still alive.
        assert_eq!(v.ask(R::GET_QUEUE_NUM, NO, &[], &[]), 1);
        assert!(v.dev.is_connected());
    }

    #[test]
    fn broken_stream_disconnects_and_device_takes_the_next_one() {
        let mut v = Vmm::new();
        let bad = Header {
            request: 1,
            flags: 0x2,
            size: 0,
        };
        assert_eq!(v.raw(bad, &[], &[]), Outcome::Disconnected);
        assert!(!v.dev.is_connected());
        assert_eq!(v.dev.watched_fds().count(), 0);
        let mut v2 = Vmm::new();
        v2.dev = v.dev;
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        v2.sock = a;
        v2.dev.attach(b);
        assert_eq!(v2.ask(R::GET_QUEUE_NUM, NO, &[], &[]), 1);
        assert_eq!(v2.dev.stats().ctrl.connections, 2);
        // Oversized message.
        assert_eq!(
            v2.raw(Header::request(1, 0x10000, NO), &[], &[]),
            Outcome::Disconnected
        );
        // Plain close.
        let mut v3 = Vmm::new();
        let (a, b) = UnixStream::pair().expect("pair");
        drop(a);
        v3.dev.attach(b);
        assert_eq!(
            v3.dev.handle(Source::Control, &mut v3.eng),
            Outcome::Disconnected
        );
    }

    #[test]
    fn kick_and_nofd_flag() {
        let mut v = Vmm::new();
        v.negotiate(true);
        assert_eq!(
            v.req(R::SET_VRING_KICK, NEED, &u64b(0x100), &[]),
            Outcome::Continue
        );
        assert_eq!(v.reply_u64(), 0);
        assert_eq!(v.dev.watched_fds().count(), 1, "only the control socket");
        // The no-fd flag wins over a stray descriptor (which is closed).
        let (a, _b) = testutil::eventfd();
        let _ = v.req(R::SET_VRING_CALL, NEED, &u64b(0x101), &[a.as_raw_fd()]);
        assert_eq!(v.reply_u64(), 0);
        let (k, _k2) = testutil::eventfd();
        assert_eq!(
            v.req(R::SET_VRING_KICK, NEED, &u64b(1), &[k.as_raw_fd()]),
            Outcome::FdsChanged
        );
        assert_eq!(v.reply_u64(), 0);
        let watched: Vec<_> = v.dev.watched_fds().map(|(_, s)| s).collect();
        assert_eq!(watched, vec![Source::Control, Source::Kick(QueueIdx::TX)]);
        // GET_VRING_BASE drops the kick.
        assert_eq!(
            v.req(R::GET_VRING_BASE, NO, &state(1, 0), &[]),
            Outcome::FdsChanged
        );
        let (_, b) = v.reply().expect("reply");
        assert_eq!(b, state(1, 0));
        assert_eq!(v.dev.watched_fds().count(), 1);
    }

    #[test]
    fn vring_base_round_trip_without_start() {
        let mut v = Vmm::new();
        assert!(v.req(R::SET_VRING_BASE, NO, &state(0, 42), &[]) == Outcome::Continue);
        let _ = v.req(R::GET_VRING_BASE, NO, &state(0, 0), &[]);
        assert_eq!(v.reply().expect("reply").1, state(0, 42));
    }

    /// QEMU's order: ring enables (with NEED_REPLY, as QEMU 10) before SET_FEATURES, memory
    /// and rings afterwards; then traffic both ways, a stop, a restart on the same connection.
    #[test]
    fn qemu_order_start_traffic_stop_restart() {
        let mut v = Vmm::new();
        v.negotiate(true);
        assert_eq!(v.ask(R::GET_QUEUE_NUM, NO, &[], &[]), 1);
        assert_eq!(v.ask(R::SET_OWNER, NEED, &[], &[]), 0);
        for i in 0..2 {
            let (c, _c) = testutil::eventfd();
            assert_eq!(
                v.ask(R::SET_VRING_CALL, NEED, &u64b(i), &[c.as_raw_fd()]),
                0
            );
            let (e, _e) = testutil::eventfd();
            assert_eq!(v.ask(R::SET_VRING_ERR, NEED, &u64b(i), &[e.as_raw_fd()]), 0);
        }
        for i in 0..2 {
            assert_eq!(v.ask(R::SET_VRING_ENABLE, NEED, &state(i, 1), &[]), 0);
        }
        let feats = v.dev.offered_features();
        assert_eq!(v.ask(R::SET_FEATURES, NEED, &u64b(feats), &[]), 0);
        let mem = shared_memory(&mut v);

        // Two drivers over the same memory: RX ring at 0x1000, TX ring further up.
        let mut rxd = Driver::new(&mem);
        let mut txd = Driver::at(&mem, 0x8000, 0x18_0000, 0x30_0000);
        let (_rx_kick, mut rx_call) = setup_ring(&mut v, &rxd, 0);
        let (tx_kick, mut tx_call) = setup_ring(&mut v, &txd, 1);
        assert_eq!(v.dev.watched_fds().count(), 3);

        let rx_buf = rxd.rx_buf(2048);
        let frame: Vec<u8> = (0..100u8).collect();
        txd.tx(&frame, &[crate::virtio::NET_HDR_LEN]);
        (&tx_kick).write_all(&1u64.to_ne_bytes()).expect("kick");
        assert_eq!(
            v.dev.handle(Source::Kick(QueueIdx::TX), &mut v.eng),
            Outcome::Continue
        );
        assert_eq!(v.eng.0, vec![frame.clone()]);
        assert_eq!(txd.used_idx(), 1);
        assert_eq!(testutil::take(&mut tx_call), 1);
        // The echo went to RX and was flushed.
        assert_eq!(rxd.used_idx(), 1);
        assert_eq!(testutil::take(&mut rx_call), 1);
        let (id, len) = rxd.used_elem(0);
        assert_eq!((id, len as usize), (u32::from(rx_buf.0), 12 + 100));
        let mut got = vec![0u8; 100];
        use vm_memory::Bytes;
        mem.read_slice(&mut got, GuestAddress(rx_buf.1 + 12))
            .expect("read");
        assert_eq!(got, frame);

        // Driver reset: GET_VRING_BASE answers the next avail index and stops the rings.
        let _ = v.req(R::GET_VRING_BASE, NO, &state(1, 0), &[]);
        assert_eq!(v.reply().expect("reply").1, state(1, 1));
        let _ = v.req(R::GET_VRING_BASE, NO, &state(0, 0), &[]);
        assert_eq!(v.reply().expect("reply").1, state(0, 1));
        assert_eq!(v.dev.watched_fds().count(), 1);
        assert!(!v.dev.to_guest().send(&[&frame]), "RX stopped");

        // Restart on the same connection, from the saved base.
        assert_eq!(v.ask(R::SET_VRING_BASE, NEED, &state(1, 1), &[]), 0);
        let (tx_kick, _tx_call) = testutil::eventfd();
        assert_eq!(
            v.req(R::SET_VRING_KICK, NEED, &u64b(1), &[tx_kick.as_raw_fd()]),
            Outcome::FdsChanged
        );
        assert_eq!(v.reply_u64(), 0);
        assert!(v
            .dev
            .watched_fds()
            .any(|(_, s)| s == Source::Kick(QueueIdx::TX)));
        txd.tx(&frame, &[]);
        assert_eq!(
            v.dev.handle(Source::Kick(QueueIdx::TX), &mut v.eng),
            Outcome::Continue
        );
        assert_eq!(v.eng.0.len(), 2);
        assert_eq!(txd.used_idx(), 2);
    }

    /// cloud-hypervisor's order: features first, SET_MEM_TABLE, rings, enables last.
    #[test]
    fn features_first_order_waits_for_enable() {
        let mut v = Vmm::new();
        let feats = v.dev.offered_features();
        assert_eq!(
            v.req(R::SET_FEATURES, NO, &u64b(feats), &[]),
            Outcome::Continue
        );
        v.negotiate(true);
        let f = memfd(MEM_SIZE as u64);
        let mut table = VhostUserMemory::new(1).as_slice().to_vec();
        table.extend_from_slice(
            VhostUserMemoryRegion::new(0, MEM_SIZE as u64, USER_BASE, 0).as_slice(),
        );
        assert_eq!(v.ask(R::SET_MEM_TABLE, NEED, &table, &[f.as_raw_fd()]), 0);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(f, 0)),
        )])
        .expect("view");
        let mut txd = Driver::at(&mem, 0x8000, 0x18_0000, 0x30_0000);
        let (tx_kick, _call) = setup_ring(&mut v, &txd, 1);
        txd.tx(&[7u8; 60], &[]);
        (&tx_kick).write_all(&1u64.to_ne_bytes()).expect("kick");
        let _ = v.dev.handle(Source::Kick(QueueIdx::TX), &mut v.eng);
        assert!(v.eng.0.is_empty(), "ring not enabled yet: frame discarded");
        assert_eq!(v.dev.stats().tx.discarded, 1);
        assert_eq!(v.ask(R::SET_VRING_ENABLE, NEED, &state(1, 1), &[]), 0);
        txd.tx(&[8u8; 60], &[]);
        let _ = v.dev.handle(Source::Kick(QueueIdx::TX), &mut v.eng);
        assert_eq!(v.eng.0, vec![vec![8u8; 60]]);
    }

    #[test]
    fn ring_addresses_outside_memory_do_not_start() {
        let mut v = Vmm::new();
        v.negotiate(true);
        let mem = shared_memory(&mut v);
        let d = Driver::new(&mem);
        let addr = VhostUserVringAddr::new(
            0,
            vhost::vhost_user::message::VhostUserVringAddrFlags::empty(),
            0x1000, // not a user address of any region
            0x2000,
            0x3000,
            0,
        );
        assert_eq!(v.ask(R::SET_VRING_ADDR, NEED, addr.as_slice(), &[]), 0);
        let (_k, kd) = testutil::eventfd();
        let _ = v.req(R::SET_VRING_KICK, NEED, &u64b(0), &[kd.as_raw_fd()]);
        assert_eq!(v.reply_u64(), 0);
        assert!(v.dev.stats().ctrl.ring_start_failed >= 1);
        assert!(!v.dev.to_guest().send(&[&[0u8; 60]]));
        // Fixing the address starts it.
        let _ = setup_ring(&mut v, &d, 0);
        assert!(v.dev.rx.is_ready());
    }

    #[test]
    fn reset_owner_stops_rings_and_keeps_memory() {
        let mut v = Vmm::new();
        v.negotiate(true);
        let feats = v.dev.offered_features();
        v.ask(R::SET_FEATURES, NEED, &u64b(feats), &[]);
        let mem = shared_memory(&mut v);
        let d = Driver::new(&mem);
        setup_ring(&mut v, &d, 0);
        assert_eq!(v.ask(R::SET_VRING_ENABLE, NEED, &state(0, 1), &[]), 0);
        assert!(v.dev.rx.is_ready());
        assert_eq!(v.req(R::RESET_OWNER, NEED, &[], &[]), Outcome::FdsChanged);
        assert_eq!(v.reply_u64(), 0);
        assert!(!v.dev.rx.is_ready());
        assert_eq!(v.dev.mem.len(), 1);
        // Memory removal.
        let body = single_region(0, MEM_SIZE as u64, USER_BASE);
        assert_eq!(v.ask(R::REM_MEM_REG, NEED, &body, &[]), 0);
        assert!(v.dev.mem.is_empty());
    }

    #[test]
    fn log_requests_are_accepted() {
        let mut v = Vmm::new();
        v.negotiate(true);
        let f = memfd(0x1000);
        assert_eq!(v.ask(R::SET_LOG_FD, NEED, &[], &[f.as_raw_fd()]), 0);
        assert_eq!(v.ask(R::SET_LOG_BASE, NEED, &u64b(0), &[]), 0);
        assert_eq!(v.ask(R::SEND_RARP, NEED, &u64b(0x0102_0304_0506), &[]), 0);
        assert_eq!(v.ask(R::NET_SET_MTU, NEED, &u64b(1500), &[]), 0);
    }
}
