//! The configuration file (`handoffd --config FILE`, `/etc/handoff/handoffd.toml` in the
//! packages): the services of one daemon and how their generations drain.
//!
//! ```toml
//! # Optional: drain settings for every service.
//! [defaults]
//! drain_signal = "SIGQUIT"      # sent when a generation starts draining; none by default
//! retire_signal = "SIGTERM"     # sent once it has drained; default SIGTERM
//! drain_timeout = "300s"        # retire anyway after this long; default 300s
//! kill_after = "30s"            # SIGKILL what is left this long after retiring; off by default
//!
//! # One table per service; at least one.
//! [[service]]
//! name = "web"                  # letters, digits, '-', '_'; 1-64 characters
//! listen = ["0.0.0.0:8080", "[::]:8080"]   # every address of the service, one port
//! drain_signal = "SIGQUIT"      # any of the four settings, for this service only
//! user = "www-data"             # optional: the uid its processes run as, if not the
//!                               # promoted process's own (a name or a number)
//! ```
//!
//! Signals are names (`SIGQUIT`, `QUIT`, `quit`) or numbers 1-64 given as strings;
//! durations are a positive number with a unit `ms`, `s`, `m` or `h` (`500ms`, `90s`, `5m`,
//! `1h`), at most 30 days ([`config::MAX_DURATION`]). `drain_signal` and `kill_after` also take `"none"` (or `"off"`), so a service
//! can turn off what `[defaults]` turned on. A setting of a service overrides the one in
//! `[defaults]`, which overrides the built-in default.
//!
//! Every refusal is one line that starts with `FILE:LINE:COLUMN:` (`FILE:` alone when
//! the file as a whole is wrong): TOML syntax and type errors, unknown keys, a bad
//! signal, duration or address, a service that [`config::service`] refuses, two services
//! with one name, and two services on one port (the drain accounting and the probe know
//! a service by its port, so two services cannot steer the same one).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{self, ConfigError, DrainSettings, Sig};
use crate::generation::ServiceConfig;

/// A place in a configuration file, shown as `FILE:LINE:COLUMN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// The line, from 1.
    pub line: usize,
    /// The column in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// A refused configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{}: cannot be read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not TOML, a value of the wrong type, an unknown key or a missing one.
    #[error("{at}: {message}")]
    Syntax {
        /// Where (the start of the file when toml gives no place).
        at: Location,
        /// toml's message, on one line.
        message: String,
    },
    /// A signal, a duration or a service that the daemon's own checks refuse.
    #[error("{at}: {reason}")]
    Invalid {
        /// The offending value.
        at: Location,
        /// What is wrong with it (boxed: it is large, and refusals are rare).
        reason: Box<ConfigError>,
    },
    /// A listen entry that is not an address with a port.
    #[error("{at}: {value:?} is not an address with a port (e.g. 0.0.0.0:8080 or [::]:8080)")]
    Address {
        /// The entry.
        at: Location,
        /// Its text.
        value: String,
    },
    /// A service without an address.
    #[error("{at}: service {service} has no address; list every address it listens on")]
    NoListen {
        /// Its `listen` value.
        at: Location,
        /// The service.
        service: String,
    },
    /// Two services with one name.
    #[error("{at}: service {name} is already defined on line {first_line}")]
    DuplicateName {
        /// The second name.
        at: Location,
        /// The name.
        name: String,
        /// The line of the first.
        first_line: usize,
    },
    /// Two services on one port.
    #[error(
        "{at}: service {service}: port {port} is already service {other}'s (line {other_line}); two services cannot steer one port"
    )]
    DuplicatePort {
        /// The second service's address on that port.
        at: Location,
        /// The second service.
        service: String,
        /// The port.
        port: u16,
        /// The first service.
        other: String,
        /// The line of the first service's address.
        other_line: usize,
    },
    /// A file without a service.
    #[error("{}: no [[service]]", path.display())]
    NoService {
        /// The file.
        path: PathBuf,
    },
}

/// The file as written. Strings stay strings here, with their places, so that every
/// check below can point at the value it refuses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

/// The drain settings as written (`[defaults]`, or a service's own).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    drain_signal: Option<Spanned<String>>,
    retire_signal: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    kill_after: Option<Spanned<String>>,
}

/// One `[[service]]` table. The settings are repeated rather than flattened: serde
/// cannot deny unknown keys in a struct with a flattened one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    listen: Spanned<Vec<Spanned<String>>>,
    drain_signal: Option<Spanned<String>>,
    retire_signal: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    kill_after: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
}

impl RawService {
    fn settings(&self) -> RawSettings {
        RawSettings {
            drain_signal: self.drain_signal.clone(),
            retire_signal: self.retire_signal.clone(),
            drain_timeout: self.drain_timeout.clone(),
            kill_after: self.kill_after.clone(),
        }
    }
}

/// The text being checked, to turn byte offsets into places.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn at(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            path: self.path.to_path_buf(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn span(&self, span: Range<usize>) -> Location {
        self.at(span.start)
    }

    fn invalid<T>(&self, value: &Spanned<T>, reason: ConfigError) -> ConfigFileError {
        ConfigFileError::Invalid {
            at: self.span(value.span()),
            reason: Box::new(reason),
        }
    }

    fn signal(&self, value: &Spanned<String>) -> Result<Sig, ConfigFileError> {
        value
            .get_ref()
            .parse()
            .map_err(|reason| self.invalid(value, reason))
    }

    fn duration(&self, value: &Spanned<String>) -> Result<Duration, ConfigFileError> {
        config::parse_duration(value.get_ref()).map_err(|reason| self.invalid(value, reason))
    }

    /// Applies `raw` over `base`.
    fn settings(
        &self,
        raw: &RawSettings,
        base: DrainSettings,
    ) -> Result<DrainSettings, ConfigFileError> {
        let mut out = base;
        if let Some(v) = &raw.drain_signal {
            out.drain_signal = if is_off(v) {
                None
            } else {
                Some(self.signal(v)?)
            };
        }
        if let Some(v) = &raw.retire_signal {
            out.retire_signal = self.signal(v)?;
        }
        if let Some(v) = &raw.drain_timeout {
            out.drain_timeout = self.duration(v)?;
        }
        if let Some(v) = &raw.kill_after {
            out.kill_after = if is_off(v) {
                None
            } else {
                Some(self.duration(v)?)
            };
        }
        Ok(out)
    }

    /// Checks one service with [`config::service`], pointing at the value it refuses.
    fn service(
        &self,
        raw: &RawService,
        drain: DrainSettings,
    ) -> Result<ServiceConfig, ConfigFileError> {
        let mut listen = Vec::with_capacity(raw.listen.get_ref().len());
        for entry in raw.listen.get_ref() {
            let addr =
                entry
                    .get_ref()
                    .parse::<SocketAddr>()
                    .map_err(|_| ConfigFileError::Address {
                        at: self.span(entry.span()),
                        value: entry.get_ref().clone(),
                    })?;
            listen.push(addr);
        }
        if listen.is_empty() {
            // Checked here: config::service's message speaks of the command line.
            return Err(ConfigFileError::NoListen {
                at: self.span(raw.listen.span()),
                service: raw.name.get_ref().clone(),
            });
        }
        let user = raw
            .user
            .as_ref()
            .map(|u| config::resolve_user(u.get_ref()).map_err(|reason| self.invalid(u, reason)))
            .transpose()?;
        let service = config::service(raw.name.get_ref(), &listen, drain).map_err(|reason| {
            let entries = raw.listen.get_ref();
            let entry = |i: Option<usize>| i.and_then(|i| entries.get(i)).map(Spanned::span);
            let span = match &reason {
                ConfigError::Name(_) => Some(raw.name.span()),
                ConfigError::PortZero { addr, .. } => entry(listen.iter().position(|a| a == addr)),
                ConfigError::Ports { a, .. } => {
                    entry(listen.iter().position(|b| b.port() != a.port()))
                }
                ConfigError::Duplicate { addr, .. } => entry(
                    listen
                        .iter()
                        .enumerate()
                        .skip_while(|&(_, a)| a != addr)
                        .skip(1)
                        .find(|&(_, a)| a == addr)
                        .map(|(i, _)| i),
                ),
                _ => None,
            };
            ConfigFileError::Invalid {
                at: self.span(span.unwrap_or_else(|| raw.listen.span())),
                reason: Box::new(reason),
            }
        })?;
        Ok(ServiceConfig { user, ..service })
    }
}

/// `"none"` or `"off"`: turns off an optional setting.
fn is_off(value: &Spanned<String>) -> bool {
    matches!(value.get_ref().as_str(), "none" | "off")
}

/// Reads and checks the configuration file at `path`.
pub fn load(path: &Path) -> Result<Vec<ServiceConfig>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Checks the configuration `text`, read from `path` (used in messages only), and
/// returns its services in the order of the file.
pub fn parse(text: &str, path: &Path) -> Result<Vec<ServiceConfig>, ConfigFileError> {
    let src = Source { text, path };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        let mut message = one_line(e.message());
        if text
            .get(start..)
            .is_some_and(|t| t.starts_with("[service]"))
        {
            message.push_str("; write [[service]], one table per service");
        }
        ConfigFileError::Syntax {
            at: src.at(start),
            message,
        }
    })?;
    let defaults = src.settings(&raw.defaults, DrainSettings::default())?;
    if raw.service.is_empty() {
        return Err(ConfigFileError::NoService {
            path: path.to_path_buf(),
        });
    }
    let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.service.len());
    // Per service already checked: the line of its name and of its first address.
    let mut lines: Vec<(usize, usize)> = Vec::with_capacity(raw.service.len());
    for table in &raw.service {
        let table = table.get_ref();
        let drain = src.settings(&table.settings(), defaults)?;
        let service = src.service(table, drain)?;
        let name_at = src.span(table.name.span());
        let listen_at = src.span(table.listen.get_ref()[0].span());
        for (other, &(name_line, listen_line)) in services.iter().zip(&lines) {
            if other.name == service.name {
                return Err(ConfigFileError::DuplicateName {
                    at: name_at,
                    name: service.name,
                    first_line: name_line,
                });
            }
            let port = service.listen[0].port();
            if other.listen[0].port() == port {
                return Err(ConfigFileError::DuplicatePort {
                    at: listen_at,
                    service: service.name,
                    port,
                    other: other.name.clone(),
                    other_line: listen_line,
                });
            }
        }
        lines.push((name_at.line, listen_at.line));
        services.push(service);
    }
    Ok(services)
}

/// toml's messages may span lines; a refusal is one.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/handoff/handoffd.toml";

    fn parse(text: &str) -> Result<Vec<ServiceConfig>, ConfigFileError> {
        super::parse(text, Path::new(PATH))
    }

    /// The message of a refusal, checked to be one line.
    fn refusal(text: &str) -> (ConfigFileError, String) {
        let err = parse(text).expect_err("accepted");
        let message = err.to_string();
        assert!(!message.contains('\n'), "not one line: {message:?}");
        (err, message)
    }

    /// The line of a refusal, checked against the `FILE:LINE:` prefix of its message.
    fn line_of(text: &str) -> (usize, String) {
        let (_, message) = refusal(text);
        let rest = message
            .strip_prefix(&format!("{PATH}:"))
            .unwrap_or_else(|| panic!("no file prefix: {message}"));
        let line = rest.split(':').next().unwrap().parse().expect("a line");
        (line, message)
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn two_services_with_defaults() {
        let services = parse(
            r#"
# comment
[defaults]
drain_signal = "SIGQUIT"
drain_timeout = "90s"
kill_after = "30s"

[[service]]
name = "web"
listen = ["0.0.0.0:8080", "[::]:8080"]

[[service]]
name = "api_2"
listen = ["127.0.0.1:9000"]
drain_signal = "none"
retire_signal = "USR2"
drain_timeout = "500ms"
kill_after = "off"
"#,
        )
        .expect("a good file");
        assert_eq!(
            services,
            vec![
                ServiceConfig {
                    name: "web".into(),
                    listen: addrs(&["0.0.0.0:8080", "[::]:8080"]),
                    drain: DrainSettings {
                        drain_signal: Some(Sig(libc::SIGQUIT)),
                        retire_signal: Sig(libc::SIGTERM),
                        drain_timeout: Duration::from_secs(90),
                        kill_after: Some(Duration::from_secs(30)),
                    },
                    user: None,
                },
                ServiceConfig {
                    name: "api_2".into(),
                    listen: addrs(&["127.0.0.1:9000"]),
                    drain: DrainSettings {
                        drain_signal: None,
                        retire_signal: Sig(libc::SIGUSR2),
                        drain_timeout: Duration::from_millis(500),
                        kill_after: None,
                    },
                    user: None,
                },
            ]
        );
    }

    #[test]
    fn a_service_may_name_its_user() {
        let base = "[[service]]\nname = \"web\"\nlisten = [\"[::1]:80\"]\n";
        let by_name = parse(&format!("{base}user = \"root\"\n")).unwrap();
        assert_eq!(by_name[0].user, Some(0));
        let by_uid = parse(&format!("{base}user = \"65534\"\n")).unwrap();
        assert_eq!(by_uid[0].user, Some(65534));
        let (line, message) = line_of(&format!("{base}user = \"no-such-user-here\"\n"));
        assert_eq!(line, 4, "{message}");
        assert!(message.contains("no-such-user-here"), "{message}");
    }

    #[test]
    fn built_in_defaults_without_a_defaults_table() {
        let services = parse("[[service]]\nname = \"web\"\nlisten = [\"[::1]:80\"]\n").unwrap();
        assert_eq!(services[0].drain, DrainSettings::default());
    }

    #[test]
    fn load_reads_the_file_or_names_it() {
        let dir = std::env::temp_dir().join(format!("handoff-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("handoffd.toml");
        std::fs::write(
            &file,
            "[[service]]\nname = \"a\"\nlisten = [\"0.0.0.0:1\"]\n",
        )
        .unwrap();
        assert_eq!(load(&file).unwrap()[0].name, "a");
        let missing = dir.join("missing.toml");
        let err = load(&missing).unwrap_err();
        assert!(matches!(err, ConfigFileError::Read { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{}: cannot be read", missing.display())
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_service_is_an_error() {
        for text in ["", "# nothing\n", "[defaults]\nretire_signal = \"TERM\"\n"] {
            let (err, message) = refusal(text);
            assert!(matches!(err, ConfigFileError::NoService { .. }), "{err:?}");
            assert_eq!(message, format!("{PATH}: no [[service]]"));
        }
    }

    #[test]
    fn syntax_errors_point_at_their_line() {
        let (line, message) = line_of("[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"\n");
        assert_eq!(line, 3, "{message}");
        let (line, message) = line_of("[defaults]\ndrain_timeout = 300\n");
        assert_eq!(line, 2, "{message}");
        assert!(message.contains("string"), "{message}");
        // `[service]` for `[[service]]`: a table where a list of tables belongs.
        let (line, message) = line_of("\n[service]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\n");
        assert_eq!(line, 2, "{message}");
        assert!(
            message.ends_with("write [[service]], one table per service"),
            "{message}"
        );
        let (line, message) = line_of("[[service]]\nname = \"a\"\nname = \"b\"\n");
        assert_eq!(line, 3, "{message}");
    }

    #[test]
    fn unknown_keys_are_refused_where_they_are() {
        let (line, message) = line_of("[defaults]\ndrain_timout = \"5s\"\n");
        assert_eq!(line, 2, "{message}");
        assert!(message.contains("drain_timout"), "{message}");
        let (line, message) =
            line_of("[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\nport = 80\n");
        assert_eq!(line, 4, "{message}");
        assert!(message.contains("port"), "{message}");
        let (line, message) =
            line_of("[[service]]\nname = \"a\"\nlisten = [\"0.0.0.0:80\"]\n[extra]\n");
        assert_eq!(line, 4, "{message}");
    }

    #[test]
    fn missing_keys_are_refused() {
        let (_, message) = refusal("[[service]]\nlisten = [\"0.0.0.0:80\"]\n");
        assert!(message.starts_with(&format!("{PATH}:1:")), "{message}");
        assert!(message.contains("name"), "{message}");
    }

    #[test]
    fn bad_signals_and_durations_point_at_the_value() {
        let cases = [
            ("[defaults]\n\nretire_signal = \"SIGNOPE\"\n", 3, "SIGNOPE"),
            (
                "[defaults]\ndrain_timeout = \"0s\"\n",
                2,
                "positive duration",
            ),
            (
                "[defaults]\nkill_after = \"5 minutes\"\n",
                2,
                "positive duration",
            ),
            (
                "[defaults]\n\ndrain_timeout = \"9300000000000000000s\"\n",
                3,
                "longer than 30 days",
            ),
            (
                "[[service]]\nname = \"a\"\nlisten = [\"0.0.0.0:80\"]\ndrain_signal = \"65\"\n",
                4,
                "not a signal",
            ),
        ];
        for (text, want, needle) in cases {
            let (err, message) = refusal(text);
            assert!(matches!(err, ConfigFileError::Invalid { .. }), "{err:?}");
            let (line, _) = line_of(text);
            assert_eq!(line, want, "{message}");
            assert!(message.contains(needle), "{message}");
        }
        let (_, message) = refusal("[defaults]\ndrain_timeout = \"0s\"\n");
        assert_eq!(
            message,
            format!("{PATH}:2:17: \"0s\" is not a positive duration (e.g. 500ms, 90s, 5m, 1h)")
        );
    }

    #[test]
    fn bad_services_point_at_the_value() {
        let service = |name: &str, listen: &str| {
            format!("[[service]]\nname = \"{name}\"\nlisten = [\n  {listen}\n]\n")
        };
        let cases = [
            (service("a/b", "\"0.0.0.0:80\""), 2, "service name"),
            (service("a", "\"0.0.0.0\""), 4, "not an address"),
            (service("a", "\"0.0.0.0:0\""), 4, "port 0"),
            (
                service("a", "\"0.0.0.0:80\",\n  \"[::]:81\""),
                5,
                "different ports",
            ),
            (
                service("a", "\"0.0.0.0:80\", \"[::]:80\",\n  \"0.0.0.0:80\""),
                5,
                "listed twice",
            ),
            (
                "[[service]]\nname = \"a\"\nlisten = []\n".to_string(),
                3,
                "no address",
            ),
        ];
        for (text, want, needle) in cases {
            let (line, message) = line_of(&text);
            assert_eq!(line, want, "{message}");
            assert!(message.contains(needle), "{message}");
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let text = "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\n\n\
                    [[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:81\"]\n";
        let (err, message) = refusal(text);
        assert!(
            matches!(&err, ConfigFileError::DuplicateName { first_line: 2, .. }),
            "{err:?}"
        );
        assert_eq!(
            message,
            format!("{PATH}:6:8: service web is already defined on line 2")
        );
    }

    #[test]
    fn duplicate_ports_are_refused() {
        let text = "[[service]]\nname = \"web\"\nlisten = [\"0.0.0.0:80\"]\n\n\
                    [[service]]\nname = \"api\"\nlisten = [\"127.0.0.1:80\"]\n";
        let (err, message) = refusal(text);
        assert!(
            matches!(
                &err,
                ConfigFileError::DuplicatePort {
                    port: 80,
                    other_line: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            message,
            format!(
                "{PATH}:7:11: service api: port 80 is already service web's (line 3); two services cannot steer one port"
            )
        );
    }

    #[test]
    fn columns_count_characters() {
        let src = Source {
            text: "é = 1\n  x",
            path: Path::new("f"),
        };
        assert_eq!(src.at(9).to_string(), "f:2:3");
        assert_eq!(src.at(2).to_string(), "f:1:2");
        assert_eq!(src.at(99).to_string(), "f:2:4");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../dist/handoffd.toml");
        let services = parse(text).expect("dist/handoffd.toml");
        assert!(!services.is_empty());
    }
}
