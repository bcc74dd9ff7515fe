//! `xks-proxy config check`: everything `serve` would need, without binding the port. The config
//! parses and validates; TLS files load and their certificates are not expired; the IV-budget
//! ledger reads; each key store's key manager opens, reports its set-up, passes its deep health
//! check and holds the keys the config lists. Each check is one [`Finding`].

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::iv_budget::IvBudget;
use crate::keystore::{self, EkmHealth, pkcs11::Pkcs11Tokens};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Serves, but needs attention.
    Warn,
    /// Would not serve, or not correctly.
    Fail,
}

/// One check's outcome: `ok   tls: certificate and key load`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    /// What was checked and what was found, e.g. `keystore /x/kms/xks/v1: keys foo, bar`.
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        write!(f, "{status} {}", self.text)
    }
}

/// Every finding, in the order the checks ran.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, status: Status, text: impl Into<String>) {
        self.findings.push(Finding {
            status,
            text: text.into(),
        });
    }

    /// How many checks failed; none means the configuration is ready to serve.
    pub fn failures(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count()
    }
}

/// Runs every check on the config file at `path`.
pub async fn run(path: &Path) -> Report {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            report.add(Status::Fail, format!("config: {e}"));
            return report;
        }
    };
    report.add(
        Status::Ok,
        format!("config: {} key store(s)", config.keystores.len()),
    );
    if let Some(warning) = config.server.tls.any_subject_warning() {
        report.add(Status::Warn, format!("mtls: {warning}"));
    }
    for readable in config.readable_secrets() {
        report.add(Status::Warn, format!("file: {readable}"));
    }
    check_tls(&config, &mut report);
    check_iv_budget(&config, &mut report);
    check_keystores(&config, &mut report).await;
    report
}

fn check_tls(config: &Config, report: &mut Report) {
    let tls = &config.server.tls;
    match tls.server_config() {
        Ok(_) => report.add(
            Status::Ok,
            format!(
                "tls: certificate and key load{}",
                if tls.client_ca.is_some() {
                    ", mTLS client CA loads"
                } else {
                    ""
                }
            ),
        ),
        Err(e) => report.add(Status::Fail, format!("tls: {e}")),
    }
    // Certificate expiry: WARN under 30 days (the proxy warns daily then), FAIL once expired.
    if let Ok(dates) = crate::tls::certificate_expiry(&tls.cert, tls.client_ca.as_deref()) {
        for date in &dates {
            let days_left = date.days_left();
            let status = if days_left < 0 {
                Status::Fail
            } else if days_left < crate::tls::EXPIRY_WARNING_DAYS {
                Status::Warn
            } else {
                Status::Ok
            };
            report.add(
                status,
                format!(
                    "tls: {} certificate {} expires {} ({days_left} days left)",
                    date.role,
                    date.subject,
                    date.not_after_text()
                ),
            );
        }
    }
}

fn check_iv_budget(config: &Config, report: &mut Report) {
    let budget = match IvBudget::open(&config.iv_budget, config.server.fleet_size) {
        Ok(budget) => budget,
        Err(e) => return report.add(Status::Fail, e),
    };
    let usage = budget.usage();
    let highest = usage.iter().max_by(|a, b| a.used.total_cmp(&b.used));
    match (budget.ledger(), highest) {
        (None, _) => report.add(
            Status::Ok,
            "iv_budget: no ledger; counts start at zero each run",
        ),
        (Some(ledger), None) => report.add(
            Status::Ok,
            format!("iv_budget: ledger {} (no counts yet)", ledger.display()),
        ),
        (Some(ledger), Some(top)) => report.add(
            if top.used >= config.iv_budget.warn_fraction {
                Status::Warn
            } else {
                Status::Ok
            },
            format!(
                "iv_budget: ledger {}: {} key(s); most used {} {} at {:.3e} of its share",
                ledger.display(),
                usage.len(),
                top.keystore,
                top.key,
                top.used
            ),
        ),
    }
}

async fn check_keystores(config: &Config, report: &mut Report) {
    let tokens = Arc::new(Mutex::new(Pkcs11Tokens::default()));
    for settings in &config.keystores {
        let name = &settings.uri_path;
        let store = match keystore::open_async(settings.backend.clone(), Arc::clone(&tokens)).await
        {
            Ok(store) => store,
            Err(e) => {
                report.add(Status::Fail, format!("keystore {name}: {e}"));
                continue;
            }
        };
        report.add(
            Status::Ok,
            format!(
                "keystore {name}: {} key manager opened",
                store.describe().kind
            ),
        );
        for note in store.setup_report().await {
            let status = if note.warning {
                Status::Warn
            } else {
                Status::Ok
            };
            report.add(status, format!("keystore {name}: {}", note.text));
        }
        for status in store.check_health().await {
            let healthy = status.health == EkmHealth::Active;
            report.add(
                if healthy { Status::Ok } else { Status::Fail },
                format!(
                    "keystore {name}: health {} {:?}{}",
                    status.id,
                    status.health,
                    status.detail.map(|d| format!(": {d}")).unwrap_or_default()
                ),
            );
        }
        match store.list_keys().await {
            Ok(keys) => {
                let names: Vec<String> = keys.iter().map(|k| k.id.to_string()).collect();
                report.add(
                    Status::Ok,
                    format!("keystore {name}: keys {}", names.join(", ")),
                );
                let listed = settings.backend.pkcs11().and_then(|p| p.keys.as_ref());
                for wanted in listed.into_iter().flatten() {
                    if !names.contains(wanted) {
                        report.add(
                            Status::Fail,
                            format!("keystore {name}: listed key {wanted:?} is not on the token"),
                        );
                    }
                }
            }
            Err(e) => report.add(
                Status::Fail,
                format!("keystore {name}: cannot list keys: {e}"),
            ),
        }
    }
}
