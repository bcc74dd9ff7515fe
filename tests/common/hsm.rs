//! Proxies on a fresh PKCS#11 token for the HSM tests: SoftHSM seen through the project's PKCS#11
//! emulator (with its control socket), or Kryoptic; `pkcs11-tool` and `config check` beside them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;
use xks_proxy::client::bodies;

use super::*;

pub const PIN: &str = "xks-PIN-fidelity-5521";

/// Which PKCS#11 module a test's proxy loads.
pub enum Hsm {
    /// SoftHSM through the emulator, with this initial behaviour.
    Emulated(Value),
    /// A Kryoptic token, directly.
    Kryoptic,
}

/// A proxy on a fresh token, and the emulator's control socket when there is one.
pub struct HsmProxy {
    pub proxy: TestProxy,
    _token: TempDir,
    /// The module under the emulator, or the one the proxy loads: what `pkcs11-tool` uses.
    real_module: PathBuf,
    token_env: (String, String),
    control: Option<PathBuf>,
    /// The server's environment less the emulator's control socket, for CLI runs beside it.
    cli_env: Vec<(String, String)>,
}

impl HsmProxy {
    /// Sends one request to the emulator's control socket and returns its reply.
    pub fn emulator(&self, request: Value) -> Value {
        let socket = self.control.as_ref().expect("an emulated token");
        let mut stream = UnixStream::connect(socket).expect("emulator control socket");
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).expect("a JSON reply");
        assert_eq!(reply["ok"], true, "emulator refused {request}: {reply}");
        reply
    }

    /// Makes the next call of `function` fail with `rv` (the emulator's injection), replacing
    /// any other behaviour.
    pub fn fail_next(&self, function: &str, rv: &str) {
        self.emulator(serde_json::json!({ "set": { "inject": [
            { "functions": [function], "rv": rv, "count": 1 }
        ] } }));
    }

    /// `pkcs11-tool` on this test's token, with `args` after the module and token.
    pub fn pkcs11_tool(&self, args: &[&str]) -> String {
        let output = Command::new("pkcs11-tool")
            .env(&self.token_env.0, &self.token_env.1)
            .arg("--module")
            .arg(&self.real_module)
            .args(["--token-label", "xks-proxy"])
            .args(args)
            .output()
            .expect("run pkcs11-tool");
        assert!(
            output.status.success(),
            "pkcs11-tool {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Writes `value` to the token as a private, sensitive AES-256 key labelled `label`.
    pub fn import_key(&self, label: &str, value: &[u8; 32]) {
        let file = self.proxy.dir.path().join("key.bin");
        std::fs::write(&file, value).unwrap();
        let file = file.display().to_string();
        self.pkcs11_tool(&[
            "--login",
            "--pin",
            PIN,
            "--write-object",
            &file,
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--label",
            label,
            "--private",
            "--sensitive",
        ]);
        std::fs::remove_file(&file).unwrap();
    }

    /// `xks-proxy config check` on this proxy's config, without the emulator's control socket
    /// (the serving process owns it). Returns stdout.
    pub fn config_check(&self) -> String {
        let output = Command::new(BIN)
            .args(["config", "check", "--config"])
            .arg(&self.proxy.config_file)
            .envs(self.cli_env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run config check");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// Starts a proxy on a fresh token of `hsm` (the four conformance keys and the health-check key),
/// with `pkcs11_extra` appended to `[keystore.pkcs11]`. `None` when a module is missing outside CI.
pub fn start(hsm: Hsm, pkcs11_extra: &str, server_extra: &str) -> Option<HsmProxy> {
    start_with_limits(hsm, pkcs11_extra, server_extra, "")
}

/// [`start`] with a `[limits]` table.
pub fn start_with_limits(
    hsm: Hsm,
    pkcs11_extra: &str,
    server_extra: &str,
    limits: &str,
) -> Option<HsmProxy> {
    let (module, real_module, token, token_env, control, mut env) = match hsm {
        Hsm::Emulated(behaviour) => {
            let emulator = emulator_module()?;
            let token = softhsm_token(PIN)?;
            let conf = token.path().join("softhsm2.conf").display().to_string();
            let socket = token.path().join("emulator.sock");
            let config = token.path().join("emulator.json");
            std::fs::write(&config, behaviour.to_string()).unwrap();
            let env = vec![
                (
                    "XKS_EMULATOR_MODULE".to_string(),
                    SOFTHSM_MODULE.to_string(),
                ),
                ("XKS_EMULATOR_SOCKET".into(), socket.display().to_string()),
                ("XKS_EMULATOR_CONFIG".into(), config.display().to_string()),
            ];
            (
                emulator,
                PathBuf::from(SOFTHSM_MODULE),
                token,
                ("SOFTHSM2_CONF".to_string(), conf),
                Some(socket),
                env,
            )
        }
        Hsm::Kryoptic => {
            let module = kryoptic_module()?;
            let token = kryoptic_token(&module, PIN);
            let conf = token.path().join("kryoptic.conf").display().to_string();
            (
                module.clone(),
                module,
                token,
                ("KRYOPTIC_CONF".to_string(), conf),
                None,
                Vec::new(),
            )
        }
    };
    env.push(token_env.clone());
    env.push(("XKS_HSM_PIN".into(), PIN.into()));
    let cli_env = env
        .iter()
        .filter(|(k, _)| k != "XKS_EMULATOR_SOCKET")
        .cloned()
        .collect();
    let backend = format!(
        "backend = \"pkcs11\"\n[keystore.pkcs11]\nmodule = \"{}\"\ntoken_label = \"xks-proxy\"\npin_env = \"XKS_HSM_PIN\"\n{pkcs11_extra}\n",
        module.display()
    );
    let proxy = TestProxy::start_with(ProxySpec {
        backend,
        create_keys: false,
        server_extra: server_extra.into(),
        limits: limits.into(),
        env,
    });
    Some(HsmProxy {
        proxy,
        _token: token,
        real_module,
        token_env,
        control,
        cli_env,
    })
}

/// Waits until the first background health check has passed, so that it cannot take a fault
/// injected for a request (the next one is 60 s away with `QUIET_HEALTH`).
pub async fn wait_until_active(proxy: &TestProxy) {
    let client = proxy.client();
    eventually("the first health check passed", || async {
        let health = client.call("/health", &bodies::health()).await.unwrap();
        health.body["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
    })
    .await;
}

/// Background health checks a minute apart: none runs while a test injects a fault.
pub const QUIET_HEALTH: &str = "health_interval_ms = 60000";
