//! The health check a promote asks for: `tcp`, `http:/PATH[:STATUS]` or
//! `https:/PATH[:STATUS]`.
//!
//! A check is written the same way everywhere (the `--check` flag, the config file, the
//! control protocol's JSON): as the string [`CheckSpec`]'s `Display` gives, parsed back by
//! its `FromStr`. The path is sent as it is in the request line, so it is held to visible
//! ASCII (no space, CR, LF or other control character: nothing that could end the line or
//! start a header) and at most [`MAX_PATH`] bytes.
//!
//! Where the path ends and the status begins: the status is the text after the last `:`
//! when that text is empty or all digits, and it must then be three digits from 100 to
//! 599. Otherwise the `:` belongs to the path. So `http:/a:b/c` is the path `/a:b/c`,
//! `http:/a:204` is the path `/a` with status 204, and `http:/a:20` is refused rather than
//! read as the path `/a:20`. A path that itself ends in `:` and digits can be checked only
//! with an explicit status: `http:/a:204:200` is the path `/a:204` with status 200.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest path a check accepts, in bytes.
pub const MAX_PATH: usize = 1024;

/// The lowest status a check may ask for.
pub const MIN_STATUS: u16 = 100;

/// The highest status a check may ask for.
pub const MAX_STATUS: u16 = 599;

/// What every [`CheckSpecError`] ends with: the forms accepted.
const ACCEPTED: &str = "a check is tcp, http:/PATH, http:/PATH:STATUS or https:/PATH[:STATUS] \
     (PATH visible ASCII, at most 1024 bytes; STATUS 100-599, default any 2xx)";

/// The most of a refused check's text an error repeats.
const SHOWN: usize = 40;

/// What a health check asks of each listener of a candidate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckSpec {
    /// The TCP handshake completes (the listener's accept queue takes it).
    Tcp,
    /// `GET PATH` answers STATUS (none: any 2xx).
    Http {
        /// The request target: starts with `/`, visible ASCII, at most [`MAX_PATH`] bytes.
        path: String,
        /// The status wanted; none takes any 2xx.
        status: Option<u16>,
    },
    /// A TLS handshake (certificate not verified), then the same request as Http.
    Https {
        /// The request target: starts with `/`, visible ASCII, at most [`MAX_PATH`] bytes.
        path: String,
        /// The status wanted; none takes any 2xx.
        status: Option<u16>,
    },
}

/// Why a check's text was refused. Each message ends with the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckSpecError {
    /// Not `tcp` and not `http:` or `https:` followed by something.
    #[error("unknown check {given:?}; {accepted}", accepted = ACCEPTED)]
    Kind {
        /// The start of the text given.
        given: String,
    },
    /// The path is empty or does not start with `/`.
    #[error("the check's path must start with '/'; {accepted}", accepted = ACCEPTED)]
    PathStart,
    /// The path is longer than [`MAX_PATH`].
    #[error("the check's path is {len} bytes, more than {MAX_PATH}; {accepted}", accepted = ACCEPTED)]
    PathLength {
        /// Its length in bytes.
        len: usize,
    },
    /// The path has a byte that is not visible ASCII.
    #[error(
        "the check's path has a space, control or non-ASCII character at byte {at}; {accepted}",
        accepted = ACCEPTED
    )]
    PathByte {
        /// Its offset in the path.
        at: usize,
    },
    /// The text after the last `:` is empty or digits, but not three of them.
    #[error("the check's status {given:?} is not three digits; {accepted}", accepted = ACCEPTED)]
    StatusDigits {
        /// The text after the last `:`.
        given: String,
    },
    /// A three-digit status outside [`MIN_STATUS`]..=[`MAX_STATUS`].
    #[error("the check's status {status} is outside 100-599; {accepted}", accepted = ACCEPTED)]
    StatusRange {
        /// The status given.
        status: u16,
    },
    /// A path ending in `:` and digits without a status after it, which would read back
    /// as a status (only a value built by hand can be so).
    #[error(
        "the check's path {path:?} ends like a status: give a status after it; {accepted}",
        accepted = ACCEPTED
    )]
    PathLikeStatus {
        /// The start of the path.
        path: String,
    },
}

impl CheckSpec {
    /// Whether a final status answers this check: the status asked for, or any 2xx when
    /// none was. Always true for [`CheckSpec::Tcp`], which reads no status.
    pub fn accepts(&self, got: u16) -> bool {
        match self {
            CheckSpec::Tcp => true,
            CheckSpec::Http { status, .. } | CheckSpec::Https { status, .. } => match status {
                Some(want) => got == *want,
                None => (200..=299).contains(&got),
            },
        }
    }

    /// The status wanted, as an error shows it: `204`, or `2xx` when none was given.
    pub fn wanted(&self) -> String {
        match self {
            CheckSpec::Http {
                status: Some(want), ..
            }
            | CheckSpec::Https {
                status: Some(want), ..
            } => want.to_string(),
            _ => "2xx".to_owned(),
        }
    }

    /// Checks a value built by hand against the rules `FromStr` applies, so that its text
    /// parses back to it. A parsed value always passes.
    pub fn validate(&self) -> Result<(), CheckSpecError> {
        let (path, status) = match self {
            CheckSpec::Tcp => return Ok(()),
            CheckSpec::Http { path, status } | CheckSpec::Https { path, status } => (path, *status),
        };
        validate_path(path)?;
        match status {
            Some(status) => validate_status(status),
            None if status_suffix(path).is_some() => {
                Err(CheckSpecError::PathLikeStatus { path: shown(path) })
            }
            None => Ok(()),
        }
    }
}

impl FromStr for CheckSpec {
    type Err = CheckSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "tcp" {
            return Ok(CheckSpec::Tcp);
        }
        let (https, rest) = match s.split_once(':') {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err(CheckSpecError::Kind { given: shown(s) }),
        };
        let (path, status) = match status_suffix(rest) {
            Some((path, digits)) => (path, Some(parse_status(digits)?)),
            None => (rest, None),
        };
        validate_path(path)?;
        let path = path.to_owned();
        Ok(if https {
            CheckSpec::Https { path, status }
        } else {
            CheckSpec::Http { path, status }
        })
    }
}

impl fmt::Display for CheckSpec {
    /// The text `FromStr` reads back (for a value that passes [`CheckSpec::validate`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, path, status) = match self {
            CheckSpec::Tcp => return f.write_str("tcp"),
            CheckSpec::Http { path, status } => ("http", path, status),
            CheckSpec::Https { path, status } => ("https", path, status),
        };
        write!(f, "{scheme}:{path}")?;
        match status {
            Some(status) => write!(f, ":{status}"),
            None => Ok(()),
        }
    }
}

impl Serialize for CheckSpec {
    /// As its text; a value built by hand that would not parse back is refused.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.validate().map_err(serde::ser::Error::custom)?;
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CheckSpec {
    /// From its text, with the same checks as `FromStr`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits `rest` at its last `:` when the text after it is empty or all digits: that
/// text is a status (path, status digits). None when there is no status.
fn status_suffix(rest: &str) -> Option<(&str, &str)> {
    let (path, tail) = rest.rsplit_once(':')?;
    tail.bytes()
        .all(|b| b.is_ascii_digit())
        .then_some((path, tail))
}

/// A status: three digits, from [`MIN_STATUS`] to [`MAX_STATUS`].
fn parse_status(digits: &str) -> Result<u16, CheckSpecError> {
    let status = match digits.len() {
        3 => digits.parse::<u16>().ok(),
        _ => None,
    };
    let status = status.ok_or_else(|| CheckSpecError::StatusDigits {
        given: shown(digits),
    })?;
    validate_status(status)?;
    Ok(status)
}

/// Refuses a status outside [`MIN_STATUS`]..=[`MAX_STATUS`].
fn validate_status(status: u16) -> Result<(), CheckSpecError> {
    if (MIN_STATUS..=MAX_STATUS).contains(&status) {
        Ok(())
    } else {
        Err(CheckSpecError::StatusRange { status })
    }
}

/// A path starts with `/`, is at most [`MAX_PATH`] bytes and visible ASCII only.
fn validate_path(path: &str) -> Result<(), CheckSpecError> {
    if !path.starts_with('/') {
        return Err(CheckSpecError::PathStart);
    }
    if path.len() > MAX_PATH {
        return Err(CheckSpecError::PathLength { len: path.len() });
    }
    match path.bytes().position(|b| !b.is_ascii_graphic()) {
        Some(at) => Err(CheckSpecError::PathByte { at }),
        None => Ok(()),
    }
}

/// At most [`SHOWN`] characters of a refused text, for its error.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(path: &str, status: Option<u16>) -> CheckSpec {
        CheckSpec::Http {
            path: path.to_owned(),
            status,
        }
    }

    fn https(path: &str, status: Option<u16>) -> CheckSpec {
        CheckSpec::Https {
            path: path.to_owned(),
            status,
        }
    }

    fn parse(text: &str) -> Result<CheckSpec, CheckSpecError> {
        text.parse()
    }

    #[test]
    fn accepted_forms_parse_and_round_trip() {
        let long = format!("/{}", "a".repeat(MAX_PATH - 1));
        let cases = [
            ("tcp", CheckSpec::Tcp),
            ("http:/", http("/", None)),
            ("http:/healthz", http("/healthz", None)),
            ("http:/healthz:204", http("/healthz", Some(204))),
            ("http:/healthz:100", http("/healthz", Some(100))),
            ("http:/healthz:599", http("/healthz", Some(599))),
            ("http:/a?b=c&d=%20", http("/a?b=c&d=%20", None)),
            ("https:/healthz", https("/healthz", None)),
            ("https:/healthz:503", https("/healthz", Some(503))),
            // The `:` belongs to the path unless digits (a status) follow the last one.
            ("http:/a:b/c", http("/a:b/c", None)),
            ("http:/a:b/c:200", http("/a:b/c", Some(200))),
            ("http:/a:200/c", http("/a:200/c", None)),
            ("http:/a:x", http("/a:x", None)),
            ("http:/a:204:200", http("/a:204", Some(200))),
            ("https:/v1:2xx", https("/v1:2xx", None)),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text, "{text} displays as itself");
            assert_eq!(got.validate(), Ok(()), "{text}");
        }
        let got = parse(&format!("http:{long}:200")).expect("a path of MAX_PATH bytes");
        assert_eq!(got, http(&long, Some(200)));
    }

    #[test]
    fn refused_forms_say_what_is_wrong_and_what_is_accepted() {
        let long = format!("http:/{}", "a".repeat(MAX_PATH));
        let cases: [(&str, CheckSpecError); 24] = [
            ("", kind("")),
            ("udp", kind("udp")),
            ("TCP", kind("TCP")),
            ("tcp:80", kind("tcp:80")),
            ("tcp ", kind("tcp ")),
            ("http", kind("http")),
            ("HTTP:/a", kind("HTTP:/a")),
            ("ftp:/a", kind("ftp:/a")),
            ("http:", CheckSpecError::PathStart),
            ("http:healthz", CheckSpecError::PathStart),
            ("http::200", CheckSpecError::PathStart),
            ("https:", CheckSpecError::PathStart),
            (&long, CheckSpecError::PathLength { len: MAX_PATH + 1 }),
            ("http:/a b", CheckSpecError::PathByte { at: 2 }),
            ("http:/a\r\nX: y", CheckSpecError::PathByte { at: 2 }),
            ("http:/a\n", CheckSpecError::PathByte { at: 2 }),
            ("http:/\t", CheckSpecError::PathByte { at: 1 }),
            ("http:/\u{7f}", CheckSpecError::PathByte { at: 1 }),
            ("http:/é", CheckSpecError::PathByte { at: 1 }),
            ("http:/a:", digits("")),
            ("http:/a:20", digits("20")),
            ("https:/a:2000", digits("2000")),
            ("http:/a:099", CheckSpecError::StatusRange { status: 99 }),
            ("http:/a:600", CheckSpecError::StatusRange { status: 600 }),
        ];
        for (text, want) in cases {
            let got = parse(text).expect_err(text);
            assert_eq!(got, want, "{text:?}");
            let line = got.to_string();
            assert!(!line.contains('\n'), "{text:?}: one line: {line}");
            assert!(line.ends_with("default any 2xx)"), "{line}");
            assert!(
                line.contains("tcp, http:/PATH, http:/PATH:STATUS"),
                "{line}"
            );
        }
    }

    fn kind(given: &str) -> CheckSpecError {
        CheckSpecError::Kind {
            given: given.to_owned(),
        }
    }

    fn digits(given: &str) -> CheckSpecError {
        CheckSpecError::StatusDigits {
            given: given.to_owned(),
        }
    }

    #[test]
    fn a_refused_text_is_shown_shortened() {
        let text = format!("gopher:{}", "x".repeat(10_000));
        let line = parse(&text).expect_err("unknown").to_string();
        assert!(line.len() < 300, "{line}");
        assert!(line.starts_with("unknown check \"gopher:xxx"), "{line}");
    }

    #[test]
    fn status_wanted_and_accepted() {
        let any = http("/", None);
        assert!(any.accepts(200) && any.accepts(204) && any.accepts(299));
        assert!(!any.accepts(199) && !any.accepts(300) && !any.accepts(503));
        assert_eq!(any.wanted(), "2xx");
        let exact = https("/", Some(204));
        assert!(exact.accepts(204) && !exact.accepts(200));
        assert_eq!(exact.wanted(), "204");
        assert!(CheckSpec::Tcp.accepts(500));
    }

    #[test]
    fn serde_is_the_text() {
        let spec = https("/a:b", Some(204));
        let json = serde_json::to_string(&spec).expect("serialize");
        assert_eq!(json, r#""https:/a:b:204""#);
        assert_eq!(
            serde_json::from_str::<CheckSpec>(&json).expect("back"),
            spec
        );
        let err = serde_json::from_str::<CheckSpec>(r#""http:/a b""#).expect_err("space");
        assert!(err.to_string().contains("at byte 2"), "{err}");
        assert!(serde_json::from_str::<CheckSpec>("7").is_err());
    }

    #[test]
    fn a_value_built_by_hand_that_would_not_read_back_is_refused() {
        for spec in [
            http("/a:204", None),
            http("/a:", None),
            http("a", None),
            http("/a", Some(42)),
            https("/a\nb", Some(200)),
        ] {
            let err = spec.validate().expect_err(&format!("{spec:?}"));
            assert!(serde_json::to_string(&spec).is_err(), "{spec:?}: {err}");
        }
    }
}
