//! `passt-rr`: TCP request/response latency (TCP_RR), connect/request/close rate (TCP_CRR)
//! and many idle flows (scale), with a matching echo server: what netperf would measure,
//! for machines without netperf.
//!
//! The server is one epoll loop echoing whatever it reads, so it holds tens of thousands of
//! idle connections cheaply. Clients are blocking with timeouts: a back-end that cannot
//! carry TCP makes them fail within seconds, never hang.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "passt-rr")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server
    Server {
        #[arg(long, default_value = "[::]:12865")]
        listen: SocketAddr,
    },
    /// One connection, SIZE-byte request and response, for SECONDS
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        size: usize,
    },
    /// Connect, one 1-byte request and response, close; for SECONDS
    Crr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Print each transaction slower than this (µs) with its local port (debugging)
        #[arg(long)]
        slow_us: Option<f64>,
    },
    /// Open COUNT idle connections, report the setup rate, hold them HOLD seconds
    Flows {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
        /// Give up after this many seconds of setup
        #[arg(long, default_value_t = 60.0)]
        limit: f64,
    },
}

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    raise_nofile();
    let r = match Args::parse().cmd {
        Cmd::Server { listen } => server(listen),
        Cmd::Rr { to, seconds, size } => rr(to, seconds, size),
        Cmd::Crr {
            to,
            seconds,
            slow_us,
        } => crr(to, seconds, slow_us),
        Cmd::Flows {
            to,
            count,
            hold,
            limit,
        } => flows(to, count, hold, limit),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passt-rr: {e}");
            ExitCode::from(1)
        }
    }
}

fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn rr(to: SocketAddr, seconds: f64, size: usize) -> io::Result<()> {
    let mut s = connect(to)?;
    let req = vec![0x5au8; size.max(1)];
    let mut resp = vec![0u8; req.len()];
    let mut lat = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let el = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    println!(
        "rr transactions={} trans_per_s={:.1} mean_us={:.1} p50_us={:.1} p99_us={:.1} max_us={:.0}",
        lat.len(),
        lat.len() as f64 / el,
        mean,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

fn crr(to: SocketAddr, seconds: f64, slow_us: Option<f64>) -> io::Result<()> {
    let mut lat = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut b = [0u8; 1];
    while Instant::now() < end {
        let t = Instant::now();
        let mut s = connect(to)?;
        let t_conn = t.elapsed().as_secs_f64() * 1e6;
        s.write_all(&[1])?;
        s.read_exact(&mut b)?;
        let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
        drop(s);
        let us = t.elapsed().as_secs_f64() * 1e6;
        if slow_us.is_some_and(|l| us > l) {
            eprintln!(
                "slow: at {:.6} s port {port} total {us:.0} us (connect {t_conn:.0} us)",
                t.duration_since(start).as_secs_f64()
            );
        }
        lat.push(us);
    }
    let el = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    println!(
        "crr transactions={} trans_per_s={:.1} mean_us={:.1} p50_us={:.1} p99_us={:.1} max_us={:.0}",
        lat.len(),
        lat.len() as f64 / el,
        mean,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

fn flows(to: SocketAddr, count: usize, hold: f64, limit: f64) -> io::Result<()> {
    let mut conns = Vec::with_capacity(count);
    let start = Instant::now();
    let mut b = [0u8; 1];
    for i in 0..count {
        if start.elapsed().as_secs_f64() > limit {
            return Err(io::Error::other(format!(
                "only {i} of {count} flows in {limit} s"
            )));
        }
        let mut s = connect(to).map_err(|e| io::Error::other(format!("flow {i}: {e}")))?;
        // One round trip: the flow is established end to end, not just with the back-end.
        s.write_all(&[1])?;
        s.read_exact(&mut b)?;
        conns.push(s);
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "flows count={count} setup_s={el:.3} setup_per_s={:.1}",
        count as f64 / el
    );
    println!("held");
    io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs_f64(hold));
    // All still alive after the hold? Check a sample of them.
    let step = (count / 100).max(1);
    for s in conns.iter_mut().step_by(step) {
        s.write_all(&[2])?;
        s.read_exact(&mut b)?;
    }
    println!("flows alive_after_hold=ok");
    Ok(())
}

fn server(listen: SocketAddr) -> io::Result<()> {
    let l = TcpListener::bind(listen)?;
    l.set_nonblocking(true)?;
    // SAFETY: plain syscall; a larger backlog for the flow bursts.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let add = |fd: i32| {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: valid fds.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    };
    add(l.as_raw_fd());
    let mut conns: std::collections::HashMap<i32, TcpStream> = Default::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 65536];
    eprintln!("passt-rr: listening on {listen}");
    loop {
        // SAFETY: valid buffer.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as i32;
            if fd == l.as_raw_fd() {
                while let Ok((s, _)) = l.accept() {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_nonblocking(true);
                    add(s.as_raw_fd());
                    conns.insert(s.as_raw_fd(), s);
                }
                continue;
            }
            let Some(s) = conns.get_mut(&fd) else {
                continue;
            };
            let close = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(k) => {
                    // Requests are small; a short write on a full socket just drops the
                    // rest, which only an abusive client would cause.
                    s.set_nonblocking(false).ok();
                    let r = s.write_all(&buf[..k]).is_err();
                    s.set_nonblocking(true).ok();
                    r
                }
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            };
            if close {
                conns.remove(&fd);
            }
        }
    }
}
