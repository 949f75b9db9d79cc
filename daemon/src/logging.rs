//! Where handoffd's log goes, and how it is written there: plain text without colour
//! unless stderr is a terminal, and under journald every line prefixed with its syslog
//! priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace), which
//! journald strips and keeps as the line's priority (`journalctl -p err`).
//!
//! journald is recognised as systemd documents it: `JOURNAL_STREAM` holds `DEV:INO` (both
//! decimal) of the stream it connected to the service's stderr. The variable is inherited
//! by every child, so it counts only when fd 2 is that very stream. The prefixes apply to
//! `--log-format json` too (one line per event, so one prefix each).

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Where stderr goes, as far as the format of the log is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// stderr is journald's stream: prefix every line with its priority.
    pub journald: bool,
    /// stderr is a terminal and `NO_COLOR` is unset or empty: colour is welcome.
    pub colour: bool,
}

impl Target {
    /// Looks at fd 2 and the environment.
    pub fn detect() -> Self {
        let stderr = std::io::stderr();
        let journald = std::env::var("JOURNAL_STREAM")
            .ok()
            .and_then(|v| parse_journal_stream(&v))
            .is_some_and(|stream| fd_dev_ino(stderr.as_fd()) == Some(stream));
        let no_colour = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            journald,
            colour: !journald && !no_colour && stderr.is_terminal(),
        }
    }
}

/// `DEV:INO` as systemd writes `JOURNAL_STREAM` (both decimal), or `None` if malformed.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((number(dev)?, number(ino)?))
}

/// The device and inode of what `fd` refers to (a duplicate is stat'ed, and closed).
fn fd_dev_ino(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u64, u64)> {
    let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
    let meta = file.metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The syslog priority of a tracing level, as journald reads it from a line's prefix.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `text` with `<priority>` before every line, the last one too when it has no newline;
/// nothing after a final newline. journald reads each line as its own record, so a
/// message of several lines keeps its priority on every one.
pub fn prefix_lines(priority: u8, text: &str) -> String {
    let prefix = format!("<{priority}>");
    let mut out = String::with_capacity(text.len() + prefix.len());
    for line in text.split_inclusive('\n') {
        out.push_str(&prefix);
        out.push_str(line);
    }
    out
}

/// Writes `text` (a line or more) to stderr, prefixed with `priority` if `target` is
/// journald: for what is printed outside tracing, like main()'s `Error: ...` line.
pub fn write_stderr(target: Target, priority: u8, text: &str) {
    let text = if target.journald {
        prefix_lines(priority, text)
    } else {
        text.to_owned()
    };
    // Nowhere left to report a failed write to stderr.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Installs the global subscriber: `json` or text, coloured only on a terminal,
/// priority-prefixed and without timestamps under journald. `RUST_LOG` overrides
/// `default_filter`.
pub fn init(target: Target, json: bool, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(target.colour)
        .with_writer(Prefixed {
            inner: std::io::stderr,
            journald: target.journald,
        });
    // journald stamps each record itself.
    match (json, target.journald) {
        (true, false) => logs.json().init(),
        (true, true) => logs.json().without_time().init(),
        (false, false) => logs.init(),
        (false, true) => logs.without_time().init(),
    }
}

/// Makes the writer of one event, knowing its level: the event's text goes to `inner`
/// in one write, every line prefixed with the level's priority under journald.
#[derive(Debug, Clone, Copy)]
struct Prefixed<M> {
    inner: M,
    journald: bool,
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Prefixed<M> {
    type Writer = Event<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        // Only used without an event at hand, which fmt does not do: info, as journald
        // would default to.
        Event {
            priority: self.journald.then_some(6),
            buf: Vec::new(),
            out: self.inner.make_writer(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Event {
            priority: self.journald.then(|| priority(*meta.level())),
            buf: Vec::new(),
            out: self.inner.make_writer_for(meta),
        }
    }
}

/// One event's text, collected and written out in one piece when dropped (so that every
/// line can be prefixed, and lines of events from several threads do not mix).
struct Event<W: Write> {
    /// The prefix of each line, under journald.
    priority: Option<u8>,
    buf: Vec<u8>,
    out: W,
}

impl<W: Write> Write for Event<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for Event<W> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let out = match self.priority {
            Some(p) => prefix_lines(p, &text),
            None => text.into_owned(),
        };
        // Nowhere left to report a failed write to stderr.
        let _ = self.out.write_all(out.as_bytes());
    }
}

/// An error and its chain of causes as one line (`what: why: root cause`).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_a_message_is_prefixed() {
        assert_eq!(prefix_lines(3, "Error: bad\n"), "<3>Error: bad\n");
        assert_eq!(
            prefix_lines(4, "first\nsecond\n\nfourth\n"),
            "<4>first\n<4>second\n<4>\n<4>fourth\n"
        );
        // An unterminated last line is prefixed too; nothing follows a final newline.
        assert_eq!(prefix_lines(6, "a\nb"), "<6>a\n<6>b");
        assert_eq!(prefix_lines(7, ""), "");
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_is_two_decimal_numbers() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("0:1"), Some((0, 1)));
        for bad in [
            "", ":", "8:", ":5", "8", "8:5:1", "0x8:5", "8: 5", "-1:5", "8:5\n",
        ] {
            assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
        }
    }

    /// A buffer the test reads back, shared with the subscriber's writer.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a text subscriber writes for a few events.
    fn logged(journald: bool) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .with_writer(Prefixed {
                inner: move || out.clone(),
                journald,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("refused:\nthe verifier said\n  line 2");
            tracing::warn!(error = %"two\nlines", "cannot do it");
            tracing::info!("ready");
            tracing::debug!("details");
        });
        let bytes = buf.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn under_journald_every_line_of_every_event_carries_its_priority() {
        let text = logged(true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        let prefixes = ["<3>", "<3>", "<3>", "<4>", "<4>", "<6>", "<7>"];
        for (line, prefix) in lines.iter().zip(prefixes) {
            assert!(
                line.starts_with(prefix),
                "{line:?} should start with {prefix}: {text}"
            );
        }
        assert!(lines[2].ends_with("  line 2"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }

    #[test]
    fn elsewhere_no_line_is_prefixed() {
        let text = logged(false);
        assert_eq!(text.lines().count(), 7, "{text}");
        assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
    }

    #[test]
    fn stderr_of_a_test_is_not_this_journal_stream() {
        // fd 2 of the test runner is whatever it is; a made-up stream never matches it.
        let fd2 = fd_dev_ino(std::io::stderr().as_fd()).expect("fd 2 is open");
        assert_ne!(fd2, (u64::MAX, u64::MAX));
    }
}
