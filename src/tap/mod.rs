//! The guest side ("tap", as in passt): how Ethernet frames move between the guest and the
//! translation engine, whatever carries them. Two back-ends implement it: the vhost-user
//! virtqueues (frames in guest memory) and the stream socket (4-byte length + frame).
//!
//! Frames cross this boundary without the virtio-net header; back-ends add and strip it.

/// Frames towards the guest.
///
/// A frame is given as a list of parts (for example our headers, then payload read from a
/// host socket), so a back-end can gather them straight into guest buffers with one copy.
pub trait ToGuest {
    /// Queues one Ethernet frame for the guest. Back-ends pad frames shorter than 60 bytes.
    /// Returns `false` if the frame was dropped (no room even after queueing); the back-end
    /// counts such drops itself.
    fn send(&mut self, parts: &[&[u8]]) -> bool;

    /// Makes everything queued so far visible to the guest: one used-ring publication and
    /// at most one interrupt, or one socket write.
    fn flush(&mut self);
}

/// Whatever consumes frames from the guest: the L2 dispatcher.
pub trait FrameHandler {
    /// Handles one Ethernet frame from the guest (virtio header already stripped). Replies
    /// go to `to_guest`; the caller flushes after the batch.
    fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest);
}

/// Frames shorter than this (without FCS) are padded with zeroes on the way to the guest.
pub const ETH_MIN_FRAME: usize = 60;
/// Largest frame we carry: 64 KiB IP packet plus Ethernet header.
pub const MAX_FRAME: usize = 65535 + 14;

pub mod stream;

/// Frames with nowhere to go (no guest connected): dropped.
pub struct Discard;

impl ToGuest for Discard {
    fn send(&mut self, _parts: &[&[u8]]) -> bool {
        false
    }

    fn flush(&mut self) {}
}
