//! A booted guest's console under qemu: its lines logged, its `@@handoff` markers handed out.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::children::check_interrupted;

/// qemu, killed and reaped when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A booted guest's console: qemu (killed when this is dropped), every line of its
/// output written to a log file, and the guest's `@@handoff` markers handed out.
pub(super) struct Console {
    _qemu: Qemu,
    rx: mpsc::Receiver<String>,
    log: std::fs::File,
}

/// What the console gave before a deadline.
pub(super) enum Next {
    /// A `@@handoff` line: what follows the marker.
    Marker(String),
    /// qemu exited (the guest powered off) and both pipes are closed.
    Exited,
    /// The deadline passed.
    Deadline,
}

impl Console {
    /// Starts qemu (TCG: no KVM here; 2 CPUs, 2 GB) on `image` and `initrd` with the
    /// kernel command line `append`, logging its console (stdout and stderr) to `log`.
    pub(super) fn boot(image: &Path, initrd: &Path, append: &str, log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel", "tcg", "-M", "q35", "-cpu", "max", "-smp", "2", "-m", "2G",
            ])
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(image)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start qemu-system-x86_64")?;
        let stdout = child.stdout.take().context("qemu has no stdout")?;
        let stderr = child.stderr.take().context("qemu has no stderr")?;
        let qemu = Qemu(child);
        let (tx, rx) = mpsc::channel::<String>();
        let tx_err = tx.clone();
        // Console bytes are not always UTF-8 (firmware escapes): read lines as bytes.
        std::thread::spawn(move || forward_lines(stdout, &tx));
        std::thread::spawn(move || forward_lines(stderr, &tx_err));
        Ok(Self {
            _qemu: qemu,
            rx,
            log,
        })
    }

    /// Reads (and logs) lines until the next marker, qemu's exit or `end`; an interrupt
    /// (Ctrl-C) is noticed within 200 ms.
    pub(super) fn next_marker(&mut self, end: Instant) -> Result<Next> {
        loop {
            check_interrupted()?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Next::Deadline);
            }
            let line = match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(Next::Exited),
            };
            let _ = writeln!(self.log, "{line}");
            if let Some(at) = line.find("@@handoff ") {
                return Ok(Next::Marker(line[at + 10..].to_owned()));
            }
        }
    }
}

/// Sends each line of `reader` (lossily decoded, without "\r\n") until EOF.
fn forward_lines(reader: impl std::io::Read, tx: &mpsc::Sender<String>) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\r', '\n']);
                if tx.send(line.to_owned()).is_err() {
                    return;
                }
            }
        }
    }
}

/// Prints the last `n` lines of `path`.
pub(super) fn print_tail(path: &Path, n: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    println!(
        "--- last {} lines of {} ---",
        n.min(lines.len()),
        path.display()
    );
    for line in &lines[lines.len().saturating_sub(n)..] {
        println!("{line}");
    }
    println!("---");
}
