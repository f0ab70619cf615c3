//! A TCG guest under QEMU, driven through its serial console.
//!
//! The image comes from `tests/guest/build.sh` (built once per test process, a no-op when up
//! to date). Its init prints [`READY_LINE`] and then reads commands from the console with
//! terminal echo off and no prompt, so the console carries command output only. [`Guest::run`]
//! follows each command with an `echo` of a numbered end marker and the exit status; the
//! marker is split by quotes in the command so that even an echoed command can't match it.
//!
//! QEMU gets a shared memfd memory backend (a vhost-user back-end maps guest memory from it)
//! and one `virtio-net-pci` device on netdev [`NETDEV_ID`], which the caller's `-netdev`
//! arguments define (no MSI-X, no option ROM: iPXE would only slow the boot). `-nic none`
//! keeps QEMU from adding a default (user-mode, real network) NIC whatever the caller passes.
//! The console is QEMU's stdio multiplexed with its monitor: never send Ctrl-A (0x01).
//!
//! Only one guest runs at a time per test binary (see [`super::serial`]): TCG on a shared
//! 2-core machine is slow enough already.

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::output::Collector;
use super::process::{die_with_parent, Pidfd};
use super::Serial;

/// Boot (QEMU start to [`READY_LINE`]) timeout: TCG on a loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default timeout of one console command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Printed by the guest's init when the console shell is ready.
pub const READY_LINE: &str = "GUEST-READY";
/// Printed by the guest's init when a setup step failed.
pub const ERROR_TAG: &str = "GUEST-ERROR";
/// Netdev id the guest's NIC attaches to: the caller's `-netdev` must use `id=n`.
pub const NETDEV_ID: &str = "n";
/// Default MAC address of the guest NIC.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Guest memory in MiB (also the size of the shared memory backend).
pub const MEM_MB: u32 = 512;

/// Kernel and initramfs of the test guest.
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Builds the guest image if needed (once per process) and returns its paths.
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build.sh");
        let out = Command::new("sh")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            panic!(
                "{} failed ({}):\n{stdout}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{} printed no {key}=: {stdout}", script.display()))
        };
        Image {
            kernel: field("kernel"),
            initramfs: field("initramfs"),
        }
    })
}

/// QEMU binary: `$QEMU` or `qemu-system-x86_64`.
fn qemu_binary() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// How to start a guest; [`Guest::boot`] covers the common case.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    netdev: Vec<String>,
    qemu_args: Vec<String>,
    device_opts: Vec<String>,
    append: Vec<String>,
    mac: String,
    boot_timeout: Duration,
    inherit: Vec<std::os::fd::RawFd>,
}

impl GuestBuilder {
    /// Lets QEMU inherit `fd` (a socket named in a `-netdev ...,addr.type=fd` argument).
    pub fn inherit_fd(mut self, fd: std::os::fd::RawFd) -> Self {
        self.inherit.push(fd);
        self
    }

    /// Arguments defining the netdev (`-netdev ...,id=n`, and e.g. the `-chardev` a
    /// vhost-user netdev refers to).
    pub fn netdev(mut self, args: &[&str]) -> Self {
        self.netdev.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Any further QEMU arguments, appended last.
    pub fn qemu_args(mut self, args: &[&str]) -> Self {
        self.qemu_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Extra `virtio-net-pci` properties, e.g. `mrg_rxbuf=off`.
    pub fn device_opt(mut self, opt: &str) -> Self {
        self.device_opts.push(opt.to_string());
        self
    }

    /// Extra kernel command line words.
    pub fn append(mut self, word: &str) -> Self {
        self.append.push(word.to_string());
        self
    }

    /// MAC address of the guest NIC.
    pub fn mac(mut self, mac: &str) -> Self {
        self.mac = mac.to_string();
        self
    }

    /// Boot timeout, instead of [`BOOT_TIMEOUT`].
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// The full QEMU argument list this builder produces.
    pub fn args(&self) -> Vec<String> {
        let image = image();
        let mut device = format!(
            "virtio-net-pci,netdev={NETDEV_ID},mac={},vectors=0,romfile=",
            self.mac
        );
        for opt in &self.device_opts {
            device.push(',');
            device.push_str(opt);
        }
        let mut append = String::from("console=ttyS0 quiet panic=-1");
        for word in &self.append {
            append.push(' ');
            append.push_str(word);
        }
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-m",
            &MEM_MB.to_string(),
            "-object",
            &format!("memory-backend-memfd,id=mem,size={MEM_MB}M,share=on"),
            "-numa",
            "node,memdev=mem",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-kernel",
            &image.kernel.to_string_lossy(),
            "-initrd",
            &image.initramfs.to_string_lossy(),
            "-append",
            &append,
            "-device",
            &device,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.netdev.iter().cloned());
        args.extend(self.qemu_args.iter().cloned());
        args
    }

    /// Starts QEMU and waits for [`READY_LINE`]. Takes the per-binary guest lock (released
    /// when the guest drops). Panics with the console transcript if the guest doesn't come up.
    pub fn boot(self) -> Guest {
        let serial = super::serial();
        let args = self.args();
        let mut cmd = Command::new(qemu_binary());
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        for &fd in &self.inherit {
            super::process::inherit_fd(&mut cmd, fd);
        }
        let command = format!("{cmd:?}");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command}: {e} (apt-get install qemu-system-x86)"));
        let pidfd = Pidfd::open(child.id()).expect("pidfd_open");
        let console = Collector::new(None);
        console.attach(child.stdout.take().expect("piped stdout"));
        let stderr = Collector::new(None);
        stderr.attach(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut guest = Guest {
            child,
            pidfd,
            stdin: Some(stdin),
            console,
            stderr,
            cursor: 0,
            marker: 0,
            mac: self.mac,
            command,
            boot_time: Duration::ZERO,
            reported: Cell::new(false),
            _serial: serial,
        };
        let deadline = started + self.boot_timeout;
        let found = guest.console.wait_until(0, deadline, |text| {
            if let Some(at) = text.find(ERROR_TAG) {
                return Some(Err(at));
            }
            text.find(READY_LINE).map(|at| Ok(at + READY_LINE.len()))
        });
        match found {
            Ok(Ok(end)) => {
                guest.cursor = end;
                // The shell prints a banner when it starts, possibly after the ready line:
                // one round trip consumes it, so the first command's output is its own.
                let (status, _) = guest.run("true", self.boot_timeout);
                if status != 0 {
                    guest.fail("console shell not working");
                }
            }
            Ok(Err(_)) => guest.fail("guest init reported an error"),
            Err(e) => guest.fail(&format!(
                "no {READY_LINE} ({e:?}) within {:?}",
                self.boot_timeout
            )),
        }
        guest.boot_time = started.elapsed();
        guest
    }
}

/// A running guest; QEMU is killed on drop.
pub struct Guest {
    child: Child,
    pidfd: Pidfd,
    stdin: Option<ChildStdin>,
    console: Collector,
    stderr: Collector,
    /// Console offset up to which output has been consumed by waits.
    cursor: usize,
    /// Number of the last end marker used.
    marker: u64,
    mac: String,
    command: String,
    boot_time: Duration,
    /// Whether a panic already printed the transcript (so drop doesn't repeat it).
    reported: Cell<bool>,
    _serial: Serial,
}

impl Guest {
    /// Boots a guest whose NIC uses the netdev defined by `netdev_args` (which must include
    /// `-netdev ...,id=n`), with defaults for everything else.
    pub fn boot(netdev_args: &[&str]) -> Guest {
        Guest::builder().netdev(netdev_args).boot()
    }

    /// A builder with the defaults, for extra QEMU arguments, device options, MAC.
    pub fn builder() -> GuestBuilder {
        GuestBuilder {
            netdev: Vec::new(),
            qemu_args: Vec::new(),
            device_opts: Vec::new(),
            append: Vec::new(),
            mac: GUEST_MAC.to_string(),
            boot_timeout: BOOT_TIMEOUT,
            inherit: Vec::new(),
        }
    }

    /// MAC address of the guest NIC.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// PID of QEMU.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time from starting QEMU to [`READY_LINE`].
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Everything the console printed so far.
    pub fn transcript(&self) -> String {
        self.console.text()
    }

    /// Panics with `why`, the QEMU command, its stderr and the whole console transcript.
    pub fn fail(&self, why: &str) -> ! {
        self.reported.set(true);
        panic!(
            "guest: {why}\nqemu: {}\n--- qemu stderr:\n{}--- console:\n{}\n--- end of console",
            self.command,
            self.stderr.text(),
            self.console.text()
        )
    }

    /// Writes `text` to the console as is.
    pub fn send(&mut self, text: &str) {
        let ok = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(text.as_bytes())
                .and_then(|_| stdin.flush())
                .is_ok(),
            None => false,
        };
        if !ok {
            self.fail("console input closed (QEMU exited?)");
        }
    }

    /// Waits for `pattern` in console output not consumed by an earlier wait; returns that
    /// output up to and including the match. Panics with the transcript on timeout.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> String {
        let from = self.cursor;
        match self
            .console
            .wait_for(from, pattern, Instant::now() + timeout)
        {
            Ok(end) => {
                self.cursor = end;
                let text = self.console.text();
                text[from..end].to_string()
            }
            Err(e) => self.fail(&format!(
                "no {pattern:?} on the console ({e:?}) within {timeout:?}"
            )),
        }
    }

    /// Runs `cmd` in the guest shell; returns its exit status and its output (stdout and
    /// stderr interleaved, `\n` line ends). Panics with the transcript on timeout. `cmd` may
    /// span lines but must be complete (no open quote or block).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.try_run(cmd, timeout)
            .unwrap_or_else(|why| self.fail(&why))
    }

    /// [`Guest::run`], but a command that doesn't finish in time is the caller's to report
    /// (with what it knows of the other side): `Err` says what timed out.
    pub fn try_run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        self.marker += 1;
        let tag = format!("@@END-{} ", self.marker);
        let from = self.console.len();
        self.send(&format!("{cmd}\necho \"@@EN\"\"D-{} $?\"\n", self.marker));
        let found = self
            .console
            .wait_until(from, Instant::now() + timeout, |text| {
                let at = text.find(&tag)?;
                let rest = &text[at + tag.len()..];
                let eol = rest.find('\n')?;
                let status = rest[..eol].trim().parse::<i32>().unwrap_or(-1);
                Some((at, at + tag.len() + eol + 1, status))
            });
        match found {
            Ok((at, end, status)) => {
                self.cursor = from + end;
                let text = self.console.text();
                Ok((status, text[from..from + at].to_string()))
            }
            Err(e) => Err(format!(
                "command {cmd:?} did not finish ({e:?}) within {timeout:?}"
            )),
        }
    }

    /// Runs `cmd` with [`CMD_TIMEOUT`] and panics (with the transcript) unless it exits 0;
    /// returns its output.
    pub fn run_ok(&mut self, cmd: &str) -> String {
        let (status, out) = self.run(cmd, CMD_TIMEOUT);
        if status != 0 {
            self.fail(&format!("command {cmd:?} exited {status}:\n{out}"));
        }
        out
    }

    /// Powers the guest off and waits for QEMU to exit; returns false if it had to be killed.
    pub fn poweroff(&mut self, timeout: Duration) -> bool {
        self.send("poweroff -f\n");
        let exited = self.pidfd.wait_exit(timeout);
        if !exited {
            let _ = self.pidfd.kill();
        }
        let _ = self.child.wait();
        exited
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Closing stdin first is harmless; the kill is what ends QEMU.
        self.stdin = None;
        if !self.pidfd.kill_and_wait() {
            eprintln!(
                "harness: QEMU {} did not exit after SIGKILL",
                self.child.id()
            );
        }
        let _ = self.child.wait();
        if std::thread::panicking() && !self.reported.get() {
            eprintln!(
                "harness: guest console at failure:\n{}\n--- qemu stderr:\n{}",
                self.console.text(),
                self.stderr.text()
            );
        }
    }
}
