//! The release settings of the configuration file: `check`, `check_timeout` and `watch`
//! (in `[defaults]` and in a `[[service]]`), `notify_socket` and `notify_forward` (in a
//! `[[service]]` only), each refused at its value.

use toml::Spanned;

use super::{ConfigFileError, RawService, Source};
use crate::config::{self, NotifySettings, ReleaseSettings};

/// The release settings of a table, each with its place.
pub(super) struct ReleaseKeys<'a> {
    pub check: Option<&'a Spanned<String>>,
    pub check_timeout: Option<&'a Spanned<String>>,
    pub watch: Option<&'a Spanned<String>>,
}

impl Source<'_> {
    /// Applies `raw` over `base`; `none` (or `off`) turns off a check or watch window of
    /// `base`.
    pub(super) fn release(
        &self,
        raw: ReleaseKeys<'_>,
        base: ReleaseSettings,
    ) -> Result<ReleaseSettings, ConfigFileError> {
        let mut out = base;
        if let Some(v) = raw.check {
            out.check = config::parse_check(v.get_ref())
                .map_err(|reason| self.invalid(v, reason))?
                .0;
        }
        if let Some(v) = raw.check_timeout {
            out.check_timeout = config::parse_check_timeout(v.get_ref())
                .map_err(|reason| self.invalid(v, reason))?;
        }
        if let Some(v) = raw.watch {
            out.watch = config::parse_watch(v.get_ref())
                .map_err(|reason| self.invalid(v, reason))?
                .0;
        }
        Ok(out)
    }

    /// A service's notify socket and where it forwards, refused at the value that is
    /// wrong (a forward without a socket: at the forward).
    pub(super) fn notify(
        &self,
        raw: &RawService,
    ) -> Result<Option<NotifySettings>, ConfigFileError> {
        let socket = raw
            .notify_socket
            .as_ref()
            .map(|v| config::parse_notify_socket(v.get_ref()).map_err(|e| self.invalid(v, e)))
            .transpose()?;
        let Some(forward_at) = &raw.notify_forward else {
            return Ok(socket.map(|socket| NotifySettings {
                socket,
                forward: None,
            }));
        };
        let forward = config::parse_notify_forward(forward_at.get_ref())
            .map_err(|e| self.invalid(forward_at, e))?;
        config::notify_settings(socket, Some(forward)).map_err(|e| self.invalid(forward_at, e))
    }
}
