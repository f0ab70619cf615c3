//! The guest's end of TCP connections, played with hand-built segments over any frame link
//! (the stream socket, the vhost-user rings): a minimal sender and receiver with go-back-N
//! retransmission, enough to move data through passt both ways and to close cleanly. Also
//! `socat` servers in the peer namespace, and test data.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::frames::{self, tcp_flag as F, StreamClient, TcpSeg};
use super::netns::Topology;
use super::output::Collector;

/// Frames to and from passt, whatever carries them.
pub trait FrameLink {
    fn send(&mut self, frame: &[u8]);
    /// The next frame within `timeout`, `None` if none came.
    fn try_recv(&mut self, timeout: Duration) -> Option<Vec<u8>>;
}

impl FrameLink for StreamClient {
    fn send(&mut self, frame: &[u8]) {
        StreamClient::send(self, frame);
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        StreamClient::try_recv(self, timeout)
    }
}

pub const T: Duration = Duration::from_secs(30);
/// How long the guest waits for an ACK before it sends again from the last one (its RTO).
pub const GUEST_RTO: Duration = Duration::from_millis(300);
/// Our MSS, as a 1500-byte MTU guest would announce it: exercises segmentation.
pub const GUEST_MSS: u16 = 1460;
pub const GUEST_WS: u8 = 7;
/// Raw window field: 512 << 7 = 64 KiB.
pub const GUEST_WND: u16 = 512;

/// `socat -d -d` with `args` in the peer namespace, once it listens.
pub fn socat(topo: &Topology, args: &[&str]) -> (Child, Collector) {
    socat_in(topo, false, args)
}

/// `socat -d -d args` in the host (`host`) or peer namespace, once it listens.
pub fn socat_in(topo: &Topology, host: bool, args: &[&str]) -> (Child, Collector) {
    let mut cmd = Command::new("socat");
    cmd.args(["-d", "-d"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = if host {
        topo.spawn_host(cmd)
    } else {
        topo.spawn_peer(cmd)
    };
    let out = Collector::new(None);
    out.attach(child.stderr.take().expect("piped stderr"));
    out.wait_for(0, "listening on", Instant::now() + T)
        .unwrap_or_else(|e| panic!("socat didn't listen ({e:?}): {}", out.text()));
    (child, out)
}

pub fn wait_child(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + T;
    // Exit is an event we can't block on with a timeout through std; poll its pidfd.
    let pidfd = super::process::Pidfd::open(child.id()).expect("pidfd");
    assert!(
        pidfd.wait_exit(deadline.saturating_duration_since(Instant::now())),
        "{what} didn't exit"
    );
    child.wait().expect("wait")
}

pub fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The guest's end of one connection: a minimal TCP sender and receiver.
pub struct Guest<'a, L: FrameLink + ?Sized = StreamClient> {
    pub c: &'a mut L,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub snd_una: u32,
    pub snd_nxt: u32,
    pub rcv_nxt: u32,
    pub peer_wnd: u32,
    pub peer_ws: u8,
    pub peer_mss: usize,
    pub fin_rcvd: bool,
    pub rst_rcvd: bool,
    pub rx: Vec<u8>,
}

impl<'a, L: FrameLink + ?Sized> Guest<'a, L> {
    pub fn seg(&self, flags: u8, seq: u32, payload: &[u8]) -> TcpSeg {
        TcpSeg {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            seq,
            ack: if flags & F::ACK != 0 { self.rcv_nxt } else { 0 },
            flags,
            wnd: GUEST_WND,
            mss: None,
            ws: None,
            payload: payload.to_vec(),
        }
    }

    pub fn send(&mut self, s: &TcpSeg) {
        self.c.send(&frames::tcp_frame(s));
    }

    /// Connects; `Err(segment)` if passt answered with something other than a SYN-ACK.
    pub fn connect(
        c: &'a mut L,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
    ) -> Result<Guest<'a, L>, TcpSeg> {
        let isn = 0xfffff000u32; // wraps within a MiB
        let mut g = Guest {
            c,
            src,
            dst,
            sport,
            dport,
            snd_una: isn.wrapping_add(1),
            snd_nxt: isn.wrapping_add(1),
            rcv_nxt: 0,
            peer_wnd: 0,
            peer_ws: 0,
            peer_mss: 536,
            fin_rcvd: false,
            rst_rcvd: false,
            rx: Vec::new(),
        };
        let mut syn = g.seg(F::SYN, isn, &[]);
        syn.mss = Some(GUEST_MSS);
        syn.ws = Some(GUEST_WS);
        syn.wnd = 65535;
        g.send(&syn);
        let sa = g.next(T).expect("no answer to SYN");
        if sa.flags != F::SYN | F::ACK {
            return Err(sa);
        }
        assert_eq!(sa.ack, isn.wrapping_add(1));
        assert!(sa.mss.is_some(), "SYN-ACK without MSS: {sa:?}");
        g.peer_ws = sa.ws.expect("window scale answered");
        g.peer_mss = usize::from(sa.mss.unwrap());
        g.rcv_nxt = sa.seq.wrapping_add(1);
        g.peer_wnd = u32::from(sa.wnd);
        let ack = g.seg(F::ACK, g.snd_nxt, &[]);
        g.send(&ack);
        Ok(g)
    }

    /// Answers passt's SYN `syn` (an inbound connection) with a SYN-ACK; passt's ACK
    /// completes the handshake.
    pub fn accept(c: &'a mut L, syn: &TcpSeg) -> Guest<'a, L> {
        assert_eq!(syn.flags, F::SYN, "{syn:?}");
        assert!(
            syn.mss.is_some() && syn.ws.is_some(),
            "SYN options: {syn:?}"
        );
        let isn = 0x7fff_fff0u32;
        let mut g = Guest {
            c,
            src: syn.dst,
            dst: syn.src,
            sport: syn.dport,
            dport: syn.sport,
            snd_una: isn.wrapping_add(1),
            snd_nxt: isn.wrapping_add(1),
            rcv_nxt: syn.seq.wrapping_add(1),
            peer_wnd: u32::from(syn.wnd),
            peer_ws: syn.ws.unwrap_or(0),
            peer_mss: usize::from(syn.mss.unwrap_or(536)),
            fin_rcvd: false,
            rst_rcvd: false,
            rx: Vec::new(),
        };
        let mut sa = g.seg(F::SYN | F::ACK, isn, &[]);
        sa.mss = Some(GUEST_MSS);
        sa.ws = Some(GUEST_WS);
        sa.wnd = 65535;
        g.send(&sa);
        let ack = g.next(T).expect("no ACK for the SYN-ACK");
        assert_eq!(ack.flags & (F::SYN | F::RST), 0, "{ack:?}");
        assert_eq!(ack.ack, isn.wrapping_add(1));
        g.handle(&ack);
        g
    }

    /// The next segment of this connection within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<TcpSeg> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.c.try_recv(left)?;
            if let Some(s) = frames::parse_tcp(&f) {
                if s.dst == self.src && s.dport == self.sport && s.sport == self.dport {
                    return Some(s);
                }
            }
        }
    }

    /// Takes in a segment: acknowledgement, window, in-order data and FIN. Returns whether
    /// it occupies sequence space (needs an ACK).
    pub fn handle(&mut self, s: &TcpSeg) -> bool {
        if s.flags & F::RST != 0 {
            self.rst_rcvd = true;
            return false;
        }
        if s.flags & F::ACK != 0 {
            if seq_lt(self.snd_una, s.ack) {
                self.snd_una = s.ack;
            }
            if seq_lt(self.snd_nxt, self.snd_una) {
                self.snd_nxt = self.snd_una;
            }
            self.peer_wnd = u32::from(s.wnd) << self.peer_ws;
        }
        if s.seq == self.rcv_nxt && !self.fin_rcvd {
            self.rx.extend_from_slice(&s.payload);
            self.rcv_nxt = self.rcv_nxt.wrapping_add(s.payload.len() as u32);
            if s.flags & F::FIN != 0 {
                self.fin_rcvd = true;
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            }
        }
        !s.payload.is_empty() || s.flags & F::FIN != 0
    }

    pub fn ack(&mut self) {
        let a = self.seg(F::ACK, self.snd_nxt, &[]);
        self.send(&a);
    }

    /// Sends `data` until all of it is acknowledged, going back to the last ACK when none
    /// comes in time, probing a zero window.
    pub fn send_all(&mut self, data: &[u8]) {
        let base = self.snd_una;
        let deadline = Instant::now() + 4 * T;
        while (self.snd_una.wrapping_sub(base) as usize) < data.len() {
            assert!(Instant::now() < deadline, "sending stalled");
            assert!(!self.rst_rcvd, "reset while sending");
            loop {
                let off = self.snd_nxt.wrapping_sub(base) as usize;
                let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
                if off >= data.len() || in_flight >= self.peer_wnd {
                    break;
                }
                let n = (data.len() - off)
                    .min(self.peer_mss)
                    .min((self.peer_wnd - in_flight) as usize);
                let s = self.seg(F::ACK | F::PSH, self.snd_nxt, &data[off..off + n]);
                self.send(&s);
                self.snd_nxt = self.snd_nxt.wrapping_add(n as u32);
            }
            match self.next(GUEST_RTO) {
                Some(s) => {
                    if self.handle(&s) {
                        self.ack();
                    }
                }
                None => {
                    // Go back N; with a zero window, a probe asks for the window again.
                    self.snd_nxt = self.snd_una;
                    if self.peer_wnd == 0 {
                        let probe = self.seg(F::ACK, self.snd_una.wrapping_sub(1), &[]);
                        self.send(&probe);
                    }
                }
            }
        }
    }

    pub fn send_fin(&mut self) {
        let fin = self.seg(F::FIN | F::ACK, self.snd_nxt, &[]);
        self.send(&fin);
        self.snd_nxt = self.snd_nxt.wrapping_add(1);
    }

    /// Receives (and acknowledges) until the FIN, and, if `until_acked`, until everything
    /// we sent is acknowledged.
    pub fn recv_until_fin(&mut self, until_acked: bool) {
        while !self.fin_rcvd || (until_acked && self.snd_una != self.snd_nxt) {
            let s = self
                .next(T)
                .unwrap_or_else(|| panic!("stalled after {} bytes", self.rx.len()));
            assert!(s.flags & F::RST == 0, "reset: {s:?}");
            if self.handle(&s) {
                self.ack();
            }
        }
    }
}

pub fn pattern(len: usize, salt: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(salt);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
