//! passt-rs: an unprivileged, user-mode network back-end for virtual machines.
//!
//! Module map:
//! - [`conf`]: command line, host discovery, the validated [`conf::Config`].
//! - [`daemon`]: start-up contract: socket, pid file, going to the background.
//! - [`event`]: the epoll loop.
//! - [`engine`]: what happens to each guest frame.
//! - [`l2`]: ARP, DHCP, NDP, DHCPv6: frames in, reply frames out.
//! - [`flow`]: the flow table shared by the layer-4 translations.
//! - [`fwd`]: port forwarding (`-t`/`-u`) and host-loopback address translation.
//! - [`tcp`]: TCP translation to host sockets.
//! - [`icmp`]: ICMP/ICMPv6 echo through ping sockets.
//! - [`udp`]: UDP flows through per-flow host sockets, host-loopback and DNS mapping.
//! - [`tap`]: frames to and from the guest, over vhost-user or the stream socket.
//! - [`vhost_user`]: the vhost-user-net device: control socket, memory table, rings.
//! - [`virtio`]: the virtio-net data plane: split virtqueues, TX drain, mergeable RX.
//! - [`sys`]: checked wrappers over socket system calls.
//! - [`wire`]: headers of frames we build.
//! - [`logger`]: log destinations and rate limiting.
pub mod conf;
pub mod daemon;
pub mod engine;
pub mod event;
pub mod flow;
pub mod fwd;
pub mod icmp;
pub mod l2;
pub mod logger;
pub mod sys;
pub mod tap;
pub mod tcp;
pub mod udp;
pub mod vhost_user;
pub mod virtio;
pub mod wire;

/// An error and its causes, one line: "what failed: why: deeper why".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
