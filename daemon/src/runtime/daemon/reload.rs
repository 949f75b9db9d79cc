//! Where the configuration comes from, and reloading it.

use super::*;

/// Where the daemon's configuration comes from: the `--config` file, if any, and the
/// flags that override its service. A reload (SIGHUP or `handoffctl reload`) reads the
/// file again through [`reload`].
#[derive(Debug, Default)]
pub struct ConfigSource {
    /// `--config`; none: the flags alone, and nothing to reload.
    file: Option<PathBuf>,
    /// The flags, applied to the file's service as at start.
    overrides: Overrides,
    /// Held from reading the file to applying it: of two reloads at once (SIGHUP and a
    /// request), the one that read the file last applies last.
    reloading: Mutex<()>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The daemon was started without `--config`.
    #[error(
        "handoffd runs without --config: there is no configuration file to reload (restart it with --config FILE)"
    )]
    NoConfig,
    /// The file is refused; its own error names `FILE:LINE:COLUMN`.
    #[error("configuration refused, the running one stays: {}", one_line(.0))]
    File(#[source] ConfigFileError),
    /// The file is fine but the flags cannot apply to it.
    #[error("configuration refused, the running one stays: {}: {}", file.display(), one_line(source))]
    Overrides {
        /// The file.
        file: PathBuf,
        /// Why the flags do not fit it.
        #[source]
        source: ConfigError,
    },
    /// The file changes the addresses of a service that still has live generations.
    #[error(
        "configuration refused, the running one stays: service {service} has live generations, so its addresses cannot change (retire them first, or use a new service name)"
    )]
    AddressesInUse {
        /// The service.
        service: String,
    },
    /// Applying it failed inside the daemon; the table was rebuilt from its last
    /// consistent state (logged).
    #[error(
        "the reload failed inside handoffd (see its log); the table was rebuilt from its last consistent state"
    )]
    Internal,
}

impl ReloadError {
    /// The protocol kind of this refusal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReloadError::NoConfig => ErrorKind::NoConfig,
            ReloadError::File(_)
            | ReloadError::Overrides { .. }
            | ReloadError::AddressesInUse { .. } => ErrorKind::ConfigRefused,
            ReloadError::Internal => ErrorKind::Internal,
        }
    }
}

impl ConfigSource {
    /// The source of a daemon started with `file` (`--config`) and the flags.
    pub fn new(file: Option<PathBuf>, overrides: Overrides) -> Self {
        Self {
            file,
            overrides,
            reloading: Mutex::new(()),
        }
    }

    /// The services to run: the file's, if any, with the flags applied.
    pub fn load(&self) -> Result<Vec<ServiceConfig>, ReloadError> {
        let file = match &self.file {
            Some(path) => Some(config_file::load(path).map_err(ReloadError::File)?),
            None => None,
        };
        self.overrides
            .apply(file)
            .map_err(|source| ReloadError::Overrides {
                file: self.file.clone().unwrap_or_default(),
                source,
            })
    }
}

/// Reads the configuration file again and applies it: the one path of SIGHUP and of
/// `handoffctl reload`. The file is read and checked before the daemon is locked; a
/// refused file changes nothing. Blocking (it takes the daemon's lock): call it off the
/// async runtime's threads. The outcome is logged either way.
pub fn reload(daemon: &Mutex<Daemon>, source: &ConfigSource) -> Result<Reloaded, ReloadError> {
    let Some(path) = &source.file else {
        tracing::warn!("reload ignored: handoffd runs without --config");
        return Err(ReloadError::NoConfig);
    };
    // Not the daemon's lock: reading the file holds up no drain.
    let _one_at_a_time = source.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let services = source.load().inspect_err(|e| tracing::error!("{e}"))?;
    let names = services.iter().map(|s| s.name.clone()).collect();
    tracing::info!(file = %path.display(), "reloading the configuration");
    Daemon::lock(daemon)
        .reload(services)
        .inspect_err(|e| tracing::error!("{e}"))?;
    Ok(Reloaded {
        file: path.display().to_string(),
        services: names,
    })
}
