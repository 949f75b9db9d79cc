//! The configuration file (`handoffd --config FILE`, `/etc/handoff/handoffd.toml` in the
//! packages): the services of one daemon, how their generations drain, and how their
//! promotes hand traffic over.
//!
//! ```toml
//! # Optional: drain and release settings for every service.
//! [defaults]
//! drain_signal = "SIGQUIT"      # sent when a generation starts draining; none by default
//! retire_signal = "SIGTERM"     # sent once it has drained; default SIGTERM
//! drain_timeout = "300s"        # retire anyway after this long; default 300s
//! kill_after = "30s"            # SIGKILL what is left this long after retiring; off by default
//! check = "http:/healthz"       # every promote's check unless it says otherwise; none by default
//! check_timeout = "5s"          # how long a check may take, retries included; default 5s
//! watch = "60s"                 # keep the previous generation ready after a promote; none by default
//!
//! # One table per service; at least one.
//! [[service]]
//! name = "web"                  # letters, digits, '-', '_'; 1-64 characters
//! listen = ["0.0.0.0:8080", "[::]:8080"]   # every address of the service, one port
//! drain_signal = "SIGQUIT"      # any of the seven settings, for this service only
//! user = "www-data"             # optional: the uid its processes run as, if not the
//!                               # promoted process's own (a name or a number)
//! notify_socket = "/run/handoff/web.notify"  # optional: an sd_notify socket; READY=1 promotes
//! notify_forward = "/run/systemd/notify"     # optional: where its messages are forwarded
//! ```
//!
//! Signals are names (`SIGQUIT`, `QUIT`, `quit`) or numbers 1-64 given as strings;
//! durations are a positive number with a unit `ms`, `s`, `m` or `h` (`500ms`, `90s`, `5m`,
//! `1h`), at most 30 days ([`config::MAX_DURATION`]); a `check_timeout` is 1 ms to 1 h
//! ([`config::MAX_CHECK_TIMEOUT`]), a `watch` window 1 ms to 24 h ([`config::MAX_WATCH`]).
//! A `check` is `tcp`, `http:/PATH[:STATUS]` or `https:/PATH[:STATUS]` (TLS, the
//! certificate not verified; STATUS 100-599, any 2xx if none), as `handoffctl promote
//! --check` takes it. `drain_signal`, `kill_after`, `check` and `watch` also take `"none"`
//! (or `"off"`), so a service can turn off what `[defaults]` turned on. A setting of a
//! service overrides the one in `[defaults]`, which overrides the built-in default.
//!
//! `notify_socket` and `notify_forward` belong to a `[[service]]` only. The socket is an
//! absolute path of at most 107 bytes (a unix socket's limit) that no other service has;
//! the forward is an absolute path or `@NAME` (an abstract socket), and needs the socket.
//!
//! Every refusal is one line that starts with `FILE:LINE:COLUMN:` (`FILE:` alone when
//! the file as a whole is wrong): TOML syntax and type errors, unknown keys, a bad
//! signal, duration, check, address or socket path, a service that [`config::service`]
//! refuses, two services with one name or one notify socket, and two services on one
//! port (the drain accounting and the probe know a service by its port, so two services
//! cannot steer the same one).

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{self, ConfigError, DrainSettings, ReleaseSettings, ServiceConfig, Sig};

mod error;
mod release;
#[cfg(test)]
mod release_tests;
#[cfg(test)]
mod tests;

pub use error::{ConfigFileError, Location};

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

/// Declares a table as written that holds the drain and release settings among its own
/// keys (toml lists a table's keys in this order when it refuses an unknown one). The
/// settings are listed here once, for `[defaults]` and `[[service]]`: serde cannot deny
/// unknown keys beside a flattened struct, and toml's `Spanned` does not survive
/// flattening.
macro_rules! raw_table {
    (
        $(#[$meta:meta])*
        struct $name:ident {
            $($before:ident: $before_ty:ty,)*
            ..settings,
            $($after:ident: $after_ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $($before: $before_ty,)*
            drain_signal: Option<Spanned<String>>,
            retire_signal: Option<Spanned<String>>,
            drain_timeout: Option<Spanned<String>>,
            kill_after: Option<Spanned<String>>,
            check: Option<Spanned<String>>,
            check_timeout: Option<Spanned<String>>,
            watch: Option<Spanned<String>>,
            $($after: $after_ty,)*
        }

        impl $name {
            /// The drain settings of this table.
            fn settings(&self) -> Settings<'_> {
                Settings {
                    drain_signal: self.drain_signal.as_ref(),
                    retire_signal: self.retire_signal.as_ref(),
                    drain_timeout: self.drain_timeout.as_ref(),
                    kill_after: self.kill_after.as_ref(),
                }
            }

            /// The release settings of this table.
            fn release(&self) -> release::ReleaseKeys<'_> {
                release::ReleaseKeys {
                    check: self.check.as_ref(),
                    check_timeout: self.check_timeout.as_ref(),
                    watch: self.watch.as_ref(),
                }
            }
        }
    };
}

raw_table! {
    /// The drain and release settings as written in `[defaults]`.
    #[derive(Default)]
    struct RawSettings {
        ..settings,
    }
}

raw_table! {
    /// One `[[service]]` table: its own keys and any of the drain and release settings.
    struct RawService {
        name: Spanned<String>,
        listen: Spanned<Vec<Spanned<String>>>,
        ..settings,
        user: Option<Spanned<String>>,
        notify_socket: Option<Spanned<String>>,
        notify_forward: Option<Spanned<String>>,
    }
}

/// The drain settings of a table, each with its place.
struct Settings<'a> {
    drain_signal: Option<&'a Spanned<String>>,
    retire_signal: Option<&'a Spanned<String>>,
    drain_timeout: Option<&'a Spanned<String>>,
    kill_after: Option<&'a Spanned<String>>,
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
        raw: Settings<'_>,
        base: DrainSettings,
    ) -> Result<DrainSettings, ConfigFileError> {
        let mut out = base;
        if let Some(v) = raw.drain_signal {
            out.drain_signal = if is_off(v) {
                None
            } else {
                Some(self.signal(v)?)
            };
        }
        if let Some(v) = raw.retire_signal {
            out.retire_signal = self.signal(v)?;
        }
        if let Some(v) = raw.drain_timeout {
            out.drain_timeout = self.duration(v)?;
        }
        if let Some(v) = raw.kill_after {
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
        release: ReleaseSettings,
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
        Ok(ServiceConfig {
            user,
            release,
            ..service
        })
    }
}

/// `"none"` or `"off"`: turns off an optional setting.
fn is_off(value: &Spanned<String>) -> bool {
    config::release::is_off(value.get_ref())
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
    let drain = src.settings(raw.defaults.settings(), DrainSettings::default())?;
    let release = src.release(raw.defaults.release(), ReleaseSettings::default())?;
    if raw.service.is_empty() {
        return Err(ConfigFileError::NoService {
            path: path.to_path_buf(),
        });
    }
    let mut services: Vec<(ServiceConfig, Places)> = Vec::with_capacity(raw.service.len());
    for table in &raw.service {
        let table = table.get_ref();
        let mut own = src.release(table.release(), release.clone())?;
        own.notify = src.notify(table)?;
        let service = src.service(table, src.settings(table.settings(), drain)?, own)?;
        let places = Places {
            name: src.span(table.name.span()),
            listen: src.span(table.listen.get_ref()[0].span()),
            notify: table.notify_socket.as_ref().map(|v| src.span(v.span())),
        };
        distinct(&service, &places, &services)?;
        services.push((service, places));
    }
    Ok(services.into_iter().map(|(s, _)| s).collect())
}

/// Where a service's name, first address and notify socket are written.
struct Places {
    name: Location,
    listen: Location,
    notify: Option<Location>,
}

/// Refuses `service` (written at `at`) if one `before` it has its name, its port or its
/// notify socket.
fn distinct(
    service: &ServiceConfig,
    at: &Places,
    before: &[(ServiceConfig, Places)],
) -> Result<(), ConfigFileError> {
    let socket = |s: &ServiceConfig| s.release.notify.as_ref().map(|n| n.socket.clone());
    for (other, other_at) in before {
        if other.name == service.name {
            return Err(ConfigFileError::DuplicateName {
                at: at.name.clone(),
                name: service.name.clone(),
                first_line: other_at.name.line,
            });
        }
        let port = service.listen[0].port();
        if other.listen[0].port() == port {
            return Err(ConfigFileError::DuplicatePort {
                at: at.listen.clone(),
                service: service.name.clone(),
                port,
                other: other.name.clone(),
                other_line: other_at.listen.line,
            });
        }
        if let (Some(path), Some(here), Some(there)) =
            (socket(service), &at.notify, &other_at.notify)
            && socket(other).is_some_and(|p| p.components().eq(path.components()))
        {
            return Err(ConfigFileError::DuplicateNotify {
                at: here.clone(),
                service: service.name.clone(),
                path,
                other: other.name.clone(),
                other_line: there.line,
            });
        }
    }
    Ok(())
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
