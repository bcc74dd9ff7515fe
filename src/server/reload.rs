//! Reload: on SIGHUP, and when a file the running configuration was read from changes (the config
//! file, the TLS certificate, key and client CA, secret files, PIN files; checked every 2 s, the
//! list kept from the last good configuration), the config is read and validated again. If it is
//! good, new handshakes get the new certificate, key and client CA, and new requests (on old
//! connections too) the new credentials, policies, quotas, key stores and limits; the log level
//! and IV-budget warning level change; key managers whose settings did not change stay open, and a
//! changed PKCS#11 key store on a token already logged in shares that login and session pool (a
//! new PIN or pool setting for it needs a restart, and the log says so); a token no key store
//! names any more closes after its last request, or at shutdown. If it is not good, the running
//! configuration stays and the error is logged. Limits apply to connections opened after the
//! reload (`max_connections` at once). `listen`, `[metrics] listen`, `iv_budget.ledger` and
//! `health_interval_ms` need a restart; a reload that changes them says so in the log.
//!
//! Start-up builds the first API the same way ([`build_api`] with no key manager open yet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Live, StartError};
use crate::api::{Api, ProxyKeystore};
use crate::audit::AuditLog;
use crate::auth::SigV4Verifier;
use crate::config::Config;
use crate::iv_budget::IvBudget;
use crate::keystore::health::HealthMonitor;
use crate::keystore::pkcs11::Pkcs11Tokens;
use crate::keystore::{self, BackendSettings, KeyStore};
use crate::metrics::{MeteredStore, Metrics};

/// How often the config and TLS files are checked for changes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How long changed files must stay unchanged before a reload reads them.
const FILE_SETTLE_TIME: Duration = Duration::from_millis(250);

/// A background deep health check that takes longer than this counts as UNAVAILABLE.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a reload cannot change.
#[derive(PartialEq)]
pub(super) struct FixedSettings {
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    ledger: Option<std::path::PathBuf>,
    /// Key managers kept across a reload keep the health check interval they started with.
    health_interval_ms: u64,
}

impl FixedSettings {
    pub(super) fn of(config: &Config) -> Self {
        Self {
            listen: config.server.listen,
            metrics: config.metrics,
            ledger: config.iv_budget.ledger.clone(),
            health_interval_ms: config.limits.health_interval_ms,
        }
    }

    /// The names of the settings that differ, for the log.
    fn changed(&self, other: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.listen != other.listen {
            changed.push("server.listen");
        }
        if self.metrics != other.metrics {
            changed.push("metrics.listen");
        }
        if self.ledger != other.ledger {
            changed.push("iv_budget.ledger");
        }
        if self.health_interval_ms != other.health_interval_ms {
            changed.push("limits.health_interval_ms");
        }
        changed
    }
}

/// An opened key manager, kept across reloads while its settings do not change.
#[derive(Clone)]
pub(super) struct OpenBackend {
    settings: BackendSettings,
    store: Arc<dyn KeyStore>,
    health: HealthMonitor,
}

impl OpenBackend {
    fn pkcs11(&self) -> Option<&crate::keystore::pkcs11::Pkcs11Settings> {
        self.settings.pkcs11()
    }
}

pub(super) fn tls_config(config: &Config) -> Result<Arc<rustls::ServerConfig>, StartError> {
    Ok(config.server.tls.server_config()?)
}

/// The API for `config` and the key managers it uses: those of `existing` whose settings are
/// unchanged are reused, the others opened (PKCS#11 tokens through `tokens`, so a token already
/// logged in is shared). `existing` is left as it is, so a failure changes nothing: a token this
/// attempt logged in to is retired again.
pub(super) async fn build_api(
    config: &Config,
    existing: &[OpenBackend],
    tokens: &Arc<std::sync::Mutex<Pkcs11Tokens>>,
    metrics: &Arc<Metrics>,
    iv_budget: &Arc<IvBudget>,
) -> Result<(Api, Vec<OpenBackend>), StartError> {
    let built = open_api(config, existing, tokens, metrics, iv_budget).await;
    let in_use = match &built {
        Ok((_, backends)) => backends.as_slice(),
        Err(_) => existing,
    };
    let in_use: Vec<_> = in_use.iter().filter_map(OpenBackend::pkcs11).collect();
    tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retire_unused(&in_use);
    built
}

async fn open_api(
    config: &Config,
    existing: &[OpenBackend],
    tokens: &Arc<std::sync::Mutex<Pkcs11Tokens>>,
    metrics: &Arc<Metrics>,
    iv_budget: &Arc<IvBudget>,
) -> Result<(Api, Vec<OpenBackend>), StartError> {
    let audit = AuditLog::open(&config.server.audit_log, config.server.audit_queue_lines)
        .map_err(|e| StartError::Audit(e.to_string()))?;
    let mut keystores = Vec::with_capacity(config.keystores.len());
    let mut backends: Vec<OpenBackend> = Vec::with_capacity(config.keystores.len());
    for settings in &config.keystores {
        let reused = existing
            .iter()
            .chain(&backends)
            .find(|b| b.settings == settings.backend)
            .cloned();
        let backend = match reused {
            Some(backend) => {
                if let Some(p) = settings.backend.pkcs11() {
                    tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .note_changes(p);
                }
                backend
            }
            None => {
                let store = keystore::open_async(settings.backend.clone(), Arc::clone(tokens))
                    .await
                    .map_err(|problem| StartError::Keystore {
                        uri_path: settings.uri_path.clone(),
                        problem,
                    })?;
                let health = HealthMonitor::start(
                    Arc::clone(&store),
                    config.limits.health_interval(),
                    HEALTH_CHECK_TIMEOUT,
                )
                .await;
                OpenBackend {
                    settings: settings.backend.clone(),
                    store,
                    health,
                }
            }
        };
        let store = Arc::new(MeteredStore {
            inner: Arc::clone(&backend.store),
            metrics: Arc::clone(metrics),
            keystore: settings.uri_path.clone(),
        });
        let keystore = ProxyKeystore::new(
            settings.uri_path.clone(),
            SigV4Verifier::new(&settings.region, &settings.credentials),
            store,
            backend.health.clone(),
            Arc::clone(iv_budget),
        )
        .with_policy(settings.policy.clone())
        .with_rate_limit(settings.rate_limit_rps);
        keystores.push(keystore);
        backends.push(backend);
    }
    let api = Api::new(
        keystores,
        config.limits.clone(),
        config.server.fleet_size,
        audit,
        Arc::clone(metrics),
    );
    Ok((api, backends))
}

impl Live {
    /// Re-reads the config file and swaps in the new settings; on any error the running
    /// configuration stays and the error is logged.
    pub(super) async fn reload(&self, why: &str) {
        match self.try_reload().await {
            Ok(()) => {
                tracing::info!(trigger = why, config = %self.source.display(), "configuration reloaded")
            }
            Err(error) => tracing::error!(
                trigger = why,
                %error,
                "configuration NOT reloaded; the running configuration stays"
            ),
        }
    }

    async fn try_reload(&self) -> Result<(), String> {
        let source = self.source.clone();
        let (config, tls) = tokio::task::spawn_blocking(move || {
            let config = Config::load(&source).map_err(|e| e.to_string())?;
            let tls = tls_config(&config).map_err(|e| e.to_string())?;
            Ok::<_, String>((config, tls))
        })
        .await
        .map_err(|e| format!("reading the configuration failed: {e}"))??;
        let mut backends = self.backends.lock().await;
        let (api, in_use) = build_api(
            &config,
            &backends,
            &self.tokens,
            &self.metrics,
            &self.iv_budget,
        )
        .await
        .map_err(|e| e.to_string())?;
        // Nothing below fails: the new configuration applies whole.
        *backends = in_use;
        if let Err(problem) = crate::telemetry::apply_level(config.server.log_level.as_deref()) {
            tracing::warn!(%problem, "server.log_level not applied");
        }
        self.resize_connection_slots(config.limits.max_connections);
        self.iv_budget
            .configure(config.iv_budget.warn_fraction, config.server.fleet_size);
        crate::tls::mark_served(&tls);
        self.tls.store(tls);
        self.api.store(Arc::new(api));
        if let Ok(mut watched) = self.watched.lock() {
            *watched = config.files();
        }
        for setting in self.fixed.changed(&FixedSettings::of(&config)) {
            tracing::warn!(setting, "changed; it takes effect at the next restart");
        }
        Ok(())
    }

    /// Closes every key manager (after the last request): those in use, and PKCS#11 tokens a
    /// reload retired; then finalizes the PKCS#11 modules.
    pub(super) async fn close_key_managers(&self) {
        let backends = std::mem::take(&mut *self.backends.lock().await);
        for backend in &backends {
            backend.store.close().await;
        }
        let tokens = Arc::clone(&self.tokens);
        let _ = tokio::task::spawn_blocking(move || {
            tokens.lock().unwrap_or_else(|p| p.into_inner()).close_all();
        })
        .await;
        crate::keystore::pkcs11::finalize_modules();
    }

    /// Makes `max_connections` slots: more at once; fewer as open connections close.
    fn resize_connection_slots(&self, wanted: usize) {
        let Ok(mut capacity) = self.connection_capacity.lock() else {
            return;
        };
        if wanted > *capacity {
            self.connection_slots.add_permits(wanted - *capacity);
        } else if wanted < *capacity {
            let surplus = u32::try_from(*capacity - wanted).unwrap_or(u32::MAX);
            let slots = Arc::clone(&self.connection_slots);
            tokio::spawn(async move {
                if let Ok(permits) = slots.acquire_many_owned(surplus).await {
                    permits.forget();
                }
            });
        }
        *capacity = wanted;
    }

    /// Modification times of the files the last good configuration was read from
    /// ([`Config::files`]), read off the runtime.
    async fn watched_files(&self) -> Vec<Option<std::time::SystemTime>> {
        let paths = match self.watched.lock() {
            Ok(paths) => paths.clone(),
            Err(_) => vec![self.source.clone()],
        };
        let stamps = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect()
        });
        stamps.await.unwrap_or_default()
    }

    /// Reloads on SIGHUP and when a file of the configuration changes (checked every 2 s).
    pub(super) async fn watch(self: Arc<Self>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "SIGHUP reload unavailable");
                None
            }
        };
        let mut seen = self.watched_files().await;
        let mut ticker = tokio::time::interval(FILE_CHECK_INTERVAL);
        loop {
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signalled => {
                    self.reload("SIGHUP").await;
                    seen = self.watched_files().await;
                }
                _ = ticker.tick() => {
                    let now = self.watched_files().await;
                    // Reload once the files hold still (a certificate and its key are written
                    // one after the other); while they change, the next check looks again.
                    if now != seen {
                        tokio::time::sleep(FILE_SETTLE_TIME).await;
                        if self.watched_files().await == now {
                            seen = now;
                            self.reload("file change").await;
                        }
                    }
                }
            }
        }
    }
}
