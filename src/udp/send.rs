//! Guest datagrams towards the host, sent in batches with `sendmmsg`.
//!
//! A guest datagram is checked and its flow found (or opened) as its frame is handled, but
//! it is not sent then: its payload is *queued*, as a raw pointer into the frame, and the
//! queue goes out when the frame batch ends ([`crate::tap::FrameHandler::end_batch`]: the
//! frames' bytes stay in place until then), or earlier when it holds [`SEND_BATCH`]
//! datagrams. Flushing groups the queue by socket (a stable sort: each flow's datagrams
//! keep their order; only different flows' datagrams are reordered against each other,
//! which UDP allows and nobody can observe apart from timing) and sends each flow's run
//! with one `sendmmsg`. Flow sockets are connected, so messages carry no address.
//!
//! Partial results: `sendmmsg` returns how many messages went out; an error on message k
//! after some were sent is not reported by that call but by the next one, which starts at
//! k. So after a short count we call again from there: an error then belongs to message k,
//! which is counted as dropped and skipped (`EAGAIN`, a full socket buffer, drops the rest
//! of the run: retrying at once would fail the same way). `ECONNREFUSED` is special: it
//! reports an ICMP error received for an *earlier* datagram (already relayed to the guest
//! from the error queue), and reporting it cleared it, so message k is sent again, once.

use std::os::fd::RawFd;

use nix::errno::Errno;

use crate::flow::FlowIdx;

/// Datagrams queued before the queue is flushed early.
pub const SEND_BATCH: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Queued {
    fd: RawFd,
    flow: FlowIdx,
    base: *const u8,
    len: usize,
}

/// What a flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams lost to errors (full socket buffers, unreachable destinations, ...).
    pub dropped: u64,
    /// The last error and the flow it hit, for the log.
    pub error: Option<(FlowIdx, Errno)>,
    /// `sendmmsg` calls made.
    pub calls: u64,
}

/// Datagrams waiting for the end of the frame batch, and the arrays `sendmmsg` takes, all
/// allocated once.
pub struct SendQueue {
    queued: Vec<Queued>,
    msgs: Box<[libc::mmsghdr]>,
    iov: Box<[libc::iovec]>,
}

impl Default for SendQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl SendQueue {
    pub fn new() -> Self {
        // SAFETY: all-zero mmsghdr and iovec are valid (null pointers, zero lengths).
        let zero_msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        SendQueue {
            queued: Vec::with_capacity(SEND_BATCH),
            msgs: vec![zero_msg; SEND_BATCH].into_boxed_slice(),
            iov: vec![zero_iov; SEND_BATCH].into_boxed_slice(),
        }
    }

    pub fn is_full(&self) -> bool {
        self.queued.len() == SEND_BATCH
    }

    /// Queues `payload` for flow `flow`'s connected socket `fd`. The caller flushes first if
    /// the queue [is full](Self::is_full); a push on a full queue is refused (`false`).
    ///
    /// # Safety
    /// `payload`'s bytes must stay allocated (not necessarily unchanged) until the next
    /// [`Self::flush`] returns.
    pub unsafe fn push(&mut self, fd: RawFd, flow: FlowIdx, payload: &[u8]) -> bool {
        if self.is_full() {
            return false;
        }
        self.queued.push(Queued {
            fd,
            flow,
            base: payload.as_ptr(),
            len: payload.len(),
        });
        true
    }

    /// Sends everything queued, one `sendmmsg` per socket's run.
    pub fn flush(&mut self) -> Flushed {
        let mut out = Flushed::default();
        let n = self.queued.len();
        if n == 0 {
            return out;
        }
        group_by_fd(&mut self.queued);
        for (i, q) in self.queued.iter().enumerate() {
            self.iov[i] = libc::iovec {
                iov_base: q.base.cast_mut().cast(),
                iov_len: q.len,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
        }
        let mut start = 0;
        while start < n {
            let fd = self.queued[start].fd;
            let end = start
                + self.queued[start..]
                    .iter()
                    .take_while(|q| q.fd == fd)
                    .count();
            let msgs = &mut self.msgs[start..end];
            send_run(&mut out, msgs, |k| self.queued[start + k].flow, fd);
            start = end;
        }
        self.queued.clear();
        out
    }
}

/// Stable sort by socket, in place and without allocating: insertion sort, linear on the
/// usual input (each flow's datagrams already consecutive).
fn group_by_fd(q: &mut [Queued]) {
    for i in 1..q.len() {
        let mut j = i;
        while j > 0 && q[j - 1].fd > q[j].fd {
            q.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// Sends `msgs` on `fd` (see the module documentation for partial results).
fn send_run(
    out: &mut Flushed,
    msgs: &mut [libc::mmsghdr],
    flow_of: impl Fn(usize) -> FlowIdx,
    fd: RawFd,
) {
    let mut k = 0;
    let mut resent = false;
    while k < msgs.len() {
        out.calls += 1;
        match sendmmsg(fd, &mut msgs[k..]) {
            Ok(0) => {
                // Not seen from Linux; don't spin on it.
                out.dropped += (msgs.len() - k) as u64;
                return;
            }
            Ok(sent) => {
                out.sent += sent as u64;
                k += sent;
                resent = false;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECONNREFUSED) if !resent => resent = true,
            Err(e @ (Errno::EAGAIN | Errno::ENOBUFS)) => {
                out.dropped += (msgs.len() - k) as u64;
                out.error = Some((flow_of(k), e));
                return;
            }
            Err(e) => {
                out.dropped += 1;
                out.error = Some((flow_of(k), e));
                k += 1;
                resent = false;
            }
        }
    }
}

fn sendmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> Result<usize, Errno> {
    let vlen = msgs.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
    // SAFETY: `msgs` are valid headers, each with one iovec in `SendQueue::iov` pointing at
    // a queued payload, which `push`'s contract keeps allocated until the flush ends. The
    // kernel only reads the payloads and writes `msg_len`.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), vlen, libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    fn q(fd: RawFd, tag: u32) -> Queued {
        Queued {
            fd,
            flow: FlowIdx(tag),
            base: std::ptr::null(),
            len: 0,
        }
    }

    #[test]
    fn grouping_is_stable_per_socket() {
        let mut v = vec![q(5, 0), q(3, 1), q(5, 2), q(4, 3), q(3, 4), q(5, 5)];
        group_by_fd(&mut v);
        let got: Vec<(RawFd, u32)> = v.iter().map(|q| (q.fd, q.flow.0)).collect();
        assert_eq!(got, vec![(3, 1), (3, 4), (4, 3), (5, 0), (5, 2), (5, 5)]);
    }

    /// A connected pair: (sender, receiver).
    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        rx.set_nonblocking(true).unwrap();
        (tx, rx)
    }

    fn drain(rx: &UdpSocket) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut b = [0u8; 2048];
        while let Ok(n) = rx.recv(&mut b) {
            out.push(b[..n].to_vec());
        }
        out
    }

    /// Interleaved datagrams of two flows: each flow's arrive in order, one call per flow.
    #[test]
    fn runs_per_socket_keep_order() {
        let (a_tx, a_rx) = pair();
        let (b_tx, b_rx) = pair();
        let data: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let mut s = SendQueue::new();
        for (i, d) in data.iter().enumerate() {
            let (fd, flow) = if i % 3 == 0 {
                (b_tx.as_raw_fd(), FlowIdx(1))
            } else {
                (a_tx.as_raw_fd(), FlowIdx(0))
            };
            // SAFETY: `data` outlives the flush below.
            assert!(unsafe { s.push(fd, flow, d) });
        }
        let f = s.flush();
        assert_eq!((f.sent, f.dropped, f.calls), (10, 0, 2));
        assert!(s.queued.is_empty());
        let want = |m: usize, r: bool| -> Vec<Vec<u8>> {
            data.iter()
                .enumerate()
                .filter(|(i, _)| (i % 3 == m) == r)
                .map(|(_, d)| d.clone())
                .collect()
        };
        assert_eq!(drain(&b_rx), want(0, true));
        assert_eq!(drain(&a_rx), want(0, false));
    }

    /// A datagram the kernel refuses (too long for UDP) in the middle of a run: counted,
    /// skipped, and the ones after it still go out.
    #[test]
    fn error_mid_run_skips_one_datagram() {
        let (tx, rx) = pair();
        let big = vec![0u8; 70000];
        let small: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 5]).collect();
        let mut s = SendQueue::new();
        let fd = tx.as_raw_fd();
        // SAFETY: the buffers outlive the flush.
        unsafe {
            assert!(s.push(fd, FlowIdx(7), &small[0]));
            assert!(s.push(fd, FlowIdx(7), &small[1]));
            assert!(s.push(fd, FlowIdx(7), &big));
            assert!(s.push(fd, FlowIdx(7), &small[2]));
            assert!(s.push(fd, FlowIdx(7), &big));
            assert!(s.push(fd, FlowIdx(7), &small[3]));
        }
        let f = s.flush();
        assert_eq!((f.sent, f.dropped), (4, 2));
        assert_eq!(f.error, Some((FlowIdx(7), Errno::EMSGSIZE)));
        assert_eq!(drain(&rx), small);
    }

    /// A refusal pending from an earlier datagram (the peer's port was closed) is reported
    /// by the next send, which is then made again: nothing of the batch is lost to it.
    #[test]
    fn pending_refusal_resends() {
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(closed.local_addr().unwrap()).unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        tx.send(b"x").unwrap();
        // The port unreachable comes back on loopback before this returns, or shortly:
        // wait for the error to be pending.
        let mut pfd = libc::pollfd {
            fd: tx.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        // Someone listens again: the resent datagram must arrive.
        let rx = UdpSocket::bind(addr).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut s = SendQueue::new();
        let d = [b"one".to_vec(), b"two".to_vec()];
        // SAFETY: `d` outlives the flush.
        unsafe {
            assert!(s.push(tx.as_raw_fd(), FlowIdx(0), &d[0]));
            assert!(s.push(tx.as_raw_fd(), FlowIdx(0), &d[1]));
        }
        let f = s.flush();
        assert_eq!((f.sent, f.dropped), (2, 0));
        assert_eq!(drain(&rx), d.to_vec());
    }

    #[test]
    fn a_full_queue_refuses() {
        let (tx, _rx) = pair();
        let mut s = SendQueue::new();
        let d = [0u8; 1];
        for _ in 0..SEND_BATCH {
            // SAFETY: `d` outlives the flush.
            assert!(unsafe { s.push(tx.as_raw_fd(), FlowIdx(0), &d) });
        }
        assert!(s.is_full());
        // SAFETY: as above.
        assert!(!unsafe { s.push(tx.as_raw_fd(), FlowIdx(0), &d) });
        assert_eq!(s.flush().sent, SEND_BATCH as u64);
    }
}
