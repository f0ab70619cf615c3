//! The command line, spelled as upstream passt spells it: libvirt and scripts that spawn
//! passt pass these options to us unchanged. Parsing only; meaning and validation are in
//! [`super::Config::from_args`].

use std::path::PathBuf;

use clap::Parser;

/// passt-rs: user-mode networking for virtual machines, without privileges.
///
/// Translates the guest's Layer-2 frames to native Layer-4 sockets on the host, and answers
/// ARP, DHCP, NDP and DHCPv6 itself, so that the guest gets the host's own address and routes.
#[derive(Debug, Default, Parser)]
#[command(
    name = "passt",
    disable_version_flag = true,
    after_help = "Signals: SIGTERM, SIGINT, SIGHUP and SIGQUIT end it; SIGUSR1 logs its \
                  counters and, in vhost-user mode, the state of both rings."
)]
pub struct Args {
    /// UNIX domain socket path to listen on (default: first free /tmp/passt_N.socket)
    #[arg(
        short = 's',
        long = "socket",
        visible_alias = "socket-path",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,

    /// Use an already connected (stream mode) or listening socket, passed as this file descriptor
    #[arg(short = 'F', long = "fd", value_name = "FD")]
    pub fd: Option<i32>,

    /// Quit when the first client disconnects
    #[arg(short = '1', long = "one-off")]
    pub one_off: bool,

    /// Stay in the foreground: don't fork to the background
    #[arg(short = 'f', long = "foreground")]
    pub foreground: bool,

    /// Print debugging messages
    #[arg(short = 'd', long = "debug")]
    pub debug: bool,

    /// Print debugging and per-packet trace messages (implies --debug)
    #[arg(long = "trace")]
    pub trace: bool,

    /// Print only warnings and errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,

    /// Log to this file (in addition to standard error while in the foreground)
    #[arg(short = 'l', long = "log-file", value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Maximum log file size (accepted for compatibility; the log file is not rotated)
    #[arg(long = "log-size", value_name = "SIZE", hide = true)]
    pub log_size: Option<u64>,

    /// Write the process id of the running daemon to this file
    #[arg(short = 'P', long = "pid", value_name = "FILE")]
    pub pid: Option<PathBuf>,

    /// MTU to advertise to the guest (DHCP, NDP); 0: don't advertise one [default: 65520]
    #[arg(short = 'm', long = "mtu", value_name = "MTU")]
    pub mtu: Option<u32>,

    /// Address to assign to the guest, IPv4 and/or IPv6, prefix length allowed
    /// [default: the host's address on the outbound interface]
    #[arg(short = 'a', long = "address", value_name = "ADDR")]
    pub address: Vec<String>,

    /// IPv4 netmask, dotted or as prefix length [default: the host's]
    #[arg(short = 'n', long = "netmask", value_name = "MASK")]
    pub netmask: Option<String>,

    /// Our MAC address, as the guest sees it
    #[arg(short = 'M', long = "mac-addr", value_name = "ADDR")]
    pub mac_addr: Option<String>,

    /// Gateway address for the guest, IPv4 and/or IPv6 [default: the host's]
    #[arg(short = 'g', long = "gateway", value_name = "ADDR")]
    pub gateway: Vec<String>,

    /// Host interface for addresses and routes [default: the one with the default route]
    #[arg(short = 'i', long = "interface", value_name = "NAME")]
    pub interface: Option<String>,

    /// Source address for outbound connections, IPv4 and/or IPv6
    #[arg(short = 'o', long = "outbound", value_name = "ADDR")]
    pub outbound: Vec<String>,

    /// Bind outbound IPv4 sockets to this interface
    #[arg(long = "outbound-if4", value_name = "NAME")]
    pub outbound_if4: Option<String>,

    /// Bind outbound IPv6 sockets to this interface
    #[arg(long = "outbound-if6", value_name = "NAME")]
    pub outbound_if6: Option<String>,

    /// DNS server to advertise to the guest ("none": no DNS) [default: from /etc/resolv.conf]
    #[arg(short = 'D', long = "dns", value_name = "ADDR")]
    pub dns: Vec<String>,

    /// Search domains to advertise ("none": no search list) [default: from /etc/resolv.conf]
    #[arg(short = 'S', long = "search", value_name = "LIST")]
    pub search: Vec<String>,

    /// Don't send DNS servers in DHCP, NDP and DHCPv6 replies
    #[arg(long = "no-dhcp-dns")]
    pub no_dhcp_dns: bool,

    /// Don't send the search list in DHCP, NDP and DHCPv6 replies
    #[arg(long = "no-dhcp-search")]
    pub no_dhcp_search: bool,

    /// Hostname to give the guest (DHCP option 12) [default: the host's]
    #[arg(short = 'H', long = "hostname", value_name = "NAME")]
    pub hostname: Option<String>,

    /// Fully qualified domain name to give the guest (DHCP option 81, DHCPv6 option 39)
    #[arg(long = "fqdn", value_name = "NAME")]
    pub fqdn: Option<String>,

    /// Guest-visible address that stands for the host's loopback: traffic from the guest to
    /// it goes to 127.0.0.1 or ::1 ("none": no mapping) [default: the gateway address]
    #[arg(long = "map-host-loopback", value_name = "ADDR")]
    pub map_host_loopback: Vec<String>,

    /// Guest-visible address that stands for the guest's own address on the host (which the
    /// guest's address otherwise shadows): traffic to it goes to the host's address the
    /// guest was given ("none": no mapping) [default: none]
    #[arg(long = "map-guest-addr", value_name = "ADDR")]
    pub map_guest_addr: Vec<String>,

    /// Most flows per protocol (TCP connections) at once; new ones beyond are refused
    /// [default: 131072]
    #[arg(long = "max-flows", value_name = "N")]
    pub max_flows: Option<usize>,

    /// Don't map the gateway address to the host's loopback (as --map-host-loopback none)
    #[arg(long = "no-map-gw")]
    pub no_map_gw: bool,

    /// Forward the guest's DNS queries (UDP port 53) to this address to the host's resolver,
    /// answers coming back from it; advertised to the guest as its DNS server
    #[arg(long = "dns-forward", value_name = "ADDR")]
    pub dns_forward: Vec<String>,

    /// Resolver that --dns-forward queries go to [default: the first nameserver of the
    /// family in /etc/resolv.conf]
    #[arg(long = "dns-host", value_name = "ADDR")]
    pub dns_host: Vec<String>,

    /// Seconds of inactivity after which a UDP flow is closed [default: 180]
    #[arg(long = "udp-timeout", value_name = "SECONDS")]
    pub udp_timeout: Option<u64>,

    /// Disable TCP
    #[arg(long = "no-tcp")]
    pub no_tcp: bool,

    /// Disable UDP
    #[arg(long = "no-udp")]
    pub no_udp: bool,

    /// Disable ICMP and ICMPv6 echo
    #[arg(long = "no-icmp")]
    pub no_icmp: bool,

    /// Disable the DHCP server
    #[arg(long = "no-dhcp")]
    pub no_dhcp: bool,

    /// Disable NDP (router and neighbour advertisements, SLAAC)
    #[arg(long = "no-ndp")]
    pub no_ndp: bool,

    /// Disable the DHCPv6 server
    #[arg(long = "no-dhcpv6")]
    pub no_dhcpv6: bool,

    /// Disable router advertisements (neighbour advertisements stay)
    #[arg(long = "no-ra")]
    pub no_ra: bool,

    /// IPv4 only
    #[arg(short = '4', long = "ipv4-only", conflicts_with = "ipv6_only")]
    pub ipv4_only: bool,

    /// IPv6 only
    #[arg(short = '6', long = "ipv6-only")]
    pub ipv6_only: bool,

    /// Serve a vhost-user-net back-end on the socket instead of the stream protocol
    #[arg(long = "vhost-user")]
    pub vhost_user: bool,

    /// Print the vhost-user back-end capabilities as JSON and exit
    #[arg(long = "print-capabilities")]
    pub print_capabilities: bool,

    /// TCP ports to forward from the host to the guest (SPEC: none, all, ports, ranges, ...)
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC")]
    pub tcp_ports: Vec<String>,

    /// UDP ports to forward from the host to the guest (same SPEC as -t)
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC")]
    pub udp_ports: Vec<String>,

    /// Write a packet capture of guest traffic to this file (not implemented yet)
    #[arg(short = 'p', long = "pcap", value_name = "FILE", hide = true)]
    pub pcap: Option<PathBuf>,

    /// Run as this user after setup (accepted for compatibility)
    #[arg(long = "runas", value_name = "UID[:GID]", hide = true)]
    pub runas: Option<String>,

    /// Print the version and exit
    #[arg(long = "version")]
    pub version: bool,
}

impl Args {
    /// The log level the options ask for; known before anything else is validated, so
    /// that validation itself can log.
    pub fn log_level(&self) -> log::LevelFilter {
        if self.trace {
            log::LevelFilter::Trace
        } else if self.debug {
            log::LevelFilter::Debug
        } else if self.quiet {
            log::LevelFilter::Warn
        } else {
            log::LevelFilter::Info
        }
    }
}
