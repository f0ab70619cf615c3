//! The `passt` binary: command line to [`Config`], socket, background, event loop.

use std::process::ExitCode;

use clap::Parser;
use passt::conf::{Args, Config, Mode};
use passt::{daemon, error_chain, event, logger};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if args.version {
        println!("passt (passt-rs) {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if args.print_capabilities {
        println!("{{\"type\": \"net\"}}");
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            log::logger().flush();
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    logger::init(args.log_level(), args.log_file.as_deref())
        .map_err(|e| format!("--log-file: {e}"))?;

    let host =
        passt::conf::netlink::host_info(args.interface.as_deref()).map_err(|e| error_chain(&e))?;
    let cfg = Config::from_args(args, &host).map_err(|e| e.to_string())?;
    for note in &cfg.notes {
        log::info!("{note}");
    }
    log_config(&cfg);
    if let Some(p) = &args.pcap {
        log::warn!(
            "--pcap {}: packet capture is not implemented yet, nothing is written",
            p.display()
        );
    }
    // Forwarded ports are bound before the socket is announced and before we go to the
    // background: a failure is fatal, and a client may connect once we say we're ready.
    let (forwards, fwd_notes) = passt::fwd::Bound::open(&cfg).map_err(|e| error_chain(&e))?;
    for note in &fwd_notes {
        log::info!("{note}");
    }

    let mut pid_file = match &cfg.pid_file {
        Some(p) => Some(daemon::PidFile::create(p).map_err(|e| error_chain(&e))?),
        None => None,
    };
    let socket =
        daemon::open_socket(cfg.socket_path.as_deref(), cfg.fd).map_err(|e| error_chain(&e))?;
    if let Some(p) = &socket.path {
        log::info!("UNIX domain socket bound at {}", p.display());
        match cfg.mode {
            Mode::Stream => log::info!(
                "You can now start qemu (>= 7.2):\n    qemu-system-x86_64 ... -device virtio-net-pci,netdev=s \
                 -netdev stream,id=s,server=off,addr.type=unix,addr.path={}",
                p.display()
            ),
            Mode::VhostUser => log::info!(
                "You can now start qemu:\n    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \
                 -numa node,memdev=mem -chardev socket,id=c,path={} -netdev vhost-user,id=n,chardev=c \
                 -device virtio-net-pci,netdev=n",
                p.display()
            ),
        }
    }
    let signals = event::signal_fd().map_err(|e| error_chain(&e))?;
    if cfg.foreground {
        if let Some(pf) = pid_file.as_mut() {
            pf.write(std::process::id() as i32)
                .map_err(|e| error_chain(&e))?;
        }
    } else {
        daemon::daemonize(pid_file.as_mut()).map_err(|e| error_chain(&e))?;
    }

    let result = event::run(&cfg, socket.guest, signals, forwards);
    if let Some(p) = &socket.path {
        let _ = std::fs::remove_file(p);
    }
    if let Some(pf) = &pid_file {
        let _ = std::fs::remove_file(&pf.path);
    }
    match result {
        Ok(exit) => {
            log::info!("exiting: {exit:?}");
            Ok(())
        }
        Err(e) => Err(error_chain(&e)),
    }
}

fn log_config(cfg: &Config) {
    let n = &cfg.net;
    if let Some(ip4) = &n.ip4 {
        log::info!(
            "IPv4: address {}/{} gateway {}",
            ip4.addr,
            ip4.prefix_len,
            ip4.gateway
        );
        if !ip4.dns.is_empty() {
            log::info!("    DNS: {:?}", ip4.dns);
        }
    }
    if let Some(ip6) = &n.ip6 {
        log::info!(
            "IPv6: address {}/{} gateway {} router link-local {}",
            ip6.addr,
            ip6.prefix_len,
            ip6.gateway,
            ip6.our_ll
        );
        if !ip6.dns.is_empty() {
            log::info!("    DNS: {:?}", ip6.dns);
        }
    }
    if !n.dns_search.is_empty() {
        log::info!("DNS search list: {}", n.dns_search.join(" "));
    }
}
