//! Azurite, Microsoft's Azure Storage emulator, started by the tests on its
//! own 127.0.0.1 port and stopped by PID when its guard drops, plus the SAS
//! tokens that authorise requests to it (Azurite accepts no anonymous
//! requests, and a SAS in the query is what idemproxy can copy onto a
//! verification `GET` or a lease heartbeat).
//!
//! One service per process: `azurite-table` or `azurite-blob` (npm package
//! `azurite`, pinned in `tools/real-servers/`, installed by `tools/test`
//! into `target/real-servers/node`), always with `--inMemoryPersistence`
//! (nothing written to disk), `--disableTelemetry` (Azurite otherwise sends
//! telemetry to an Azure endpoint), `--skipApiVersionCheck` (current SDKs
//! send an `x-ms-version` newer than Azurite 3.35 knows) and `--silent`.
//!
//! Override: `TEST_AZURITE_DIR` (a directory holding `azurite-table` and
//! `azurite-blob`). `TEST_REAL_SERVERS=required` makes a missing Azurite a
//! failure; otherwise the test is skipped with a loud `SKIPPED` line.
//!
//! ```no_run
//! use testkit::TestProxy;
//! use testkit::azurite::{self, Azurite};
//!
//! # async fn example() {
//! let Some(table) = Azurite::table().await else { return };
//! let sas = azurite::table_sas("sessions", "raud");
//! let proxy = TestProxy::start(&table.url(), &["--profile", "azure-table"]).await;
//! let insert = proxy.url(&format!("/{}/sessions?{sas}", azurite::ACCOUNT));
//! # drop(insert);
//! # }
//! ```

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use sha2::{Digest, Sha256};

use crate::TempDir;
use crate::real_servers::{
    START_TIMEOUT, ServerProcess, free_port, is_executable, missing, repo_root, venv_python,
};

/// Azurite's well-known account name (path-style: the first path segment).
pub const ACCOUNT: &str = "devstoreaccount1";

/// Azurite's well-known account key (base64), published in its README.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The signed version of every SAS made here (every version since
/// 2020-12-06 has the string-to-sign layouts below).
pub const SAS_VERSION: &str = "2021-08-06";

/// The expiry of every SAS made here: far away, so that a token never
/// expires mid-test (and is the same for the same inputs).
pub const SAS_EXPIRY: &str = "2099-01-01T00:00:00Z";

/// The directory with Azurite's executables: `TEST_AZURITE_DIR`, else
/// `target/real-servers/node/node_modules/.bin` (where `tools/test` installs it).
pub fn azurite_dir() -> PathBuf {
    std::env::var_os("TEST_AZURITE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/real-servers/node/node_modules/.bin"))
}

/// Which Azurite service a process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// `azurite-table`.
    Table,
    /// `azurite-blob`.
    Blob,
}

impl Service {
    fn binary(self) -> &'static str {
        match self {
            Service::Table => "azurite-table",
            Service::Blob => "azurite-blob",
        }
    }

    /// The prefix of its `--xxxHost` / `--xxxPort` flags.
    fn flag(self) -> &'static str {
        match self {
            Service::Table => "table",
            Service::Blob => "blob",
        }
    }
}

/// One Azurite service on its own port, killed (by PID) when dropped.
pub struct Azurite {
    /// `http://127.0.0.1:PORT`, for `--upstream`.
    pub url: String,
    /// The service.
    pub service: Service,
    process: ServerProcess,
    _dir: TempDir,
}

impl Azurite {
    /// Starts `azurite-table`, or returns `None` after a loud skip (panics
    /// instead when [`required`](crate::real_servers::required)).
    pub async fn table() -> Option<Azurite> {
        Self::start(Service::Table).await
    }

    /// Starts `azurite-blob` (see [`Azurite::table`]).
    pub async fn blob() -> Option<Azurite> {
        Self::start(Service::Blob).await
    }

    /// Starts `service`; waits until its port accepts connections (Azurite
    /// binds only once it is ready).
    pub async fn start(service: Service) -> Option<Azurite> {
        let binary = azurite_dir().join(service.binary());
        if !is_executable(&binary) {
            return missing(
                "Azurite",
                &format!(
                    "no executable {} (set TEST_AZURITE_DIR to the directory with azurite-table and azurite-blob)",
                    binary.display()
                ),
            );
        }
        let mut last_error = String::new();
        // A port taken between `free_port` and Azurite's bind makes it exit: try again.
        for _ in 0..3 {
            match Self::try_start(service, &binary).await {
                Ok(azurite) => return Some(azurite),
                Err(e) => last_error = e,
            }
        }
        panic!("{} did not start: {last_error}", service.binary());
    }

    async fn try_start(service: Service, binary: &std::path::Path) -> Result<Azurite, String> {
        let dir = TempDir::new();
        let port = free_port();
        let flag = service.flag();
        let mut cmd = Command::new(binary);
        cmd.args(["--inMemoryPersistence", "--disableTelemetry"])
            .args(["--skipApiVersionCheck", "--silent"])
            .arg(format!("--{flag}Host"))
            .arg("127.0.0.1")
            .arg(format!("--{flag}Port"))
            .arg(port.to_string())
            // No --location: Azurite refuses it with --inMemoryPersistence.
            // It writes nothing in memory mode; the cwd is a temp dir anyway.
            .current_dir(dir.path())
            .stdin(Stdio::null());
        // Azurite reads AZURITE_* variables (e.g. AZURITE_ACCOUNTS); none applies.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AZURITE_") {
                cmd.env_remove(key);
            }
        }
        let log = dir.path().join(format!("{}.log", service.binary()));
        let mut process = ServerProcess::spawn(service.binary(), cmd, log, false);
        let started = Instant::now();
        loop {
            if let Some(status) = process.exited() {
                return Err(format!(
                    "{} exited ({status}):\n{}",
                    service.binary(),
                    process.log_tail()
                ));
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "{} not listening after {START_TIMEOUT:?}:\n{}",
                    service.binary(),
                    process.log_tail()
                ));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Azurite {
            url: format!("http://127.0.0.1:{port}"),
            service,
            process,
            _dir: dir,
        })
    }

    /// The base URL, for `--upstream`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`: the account's endpoint,
    /// to which table and container names are appended.
    pub fn account_url(&self) -> String {
        format!("{}/{ACCOUNT}", self.url)
    }

    /// The Azurite process.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------
// SAS tokens
// ---------------------------------------------------------------------------

/// A table service SAS for `table` (a query string without `?`). `perms`
/// in canonical order from `raud` (query, add, update, delete). It covers
/// the table's entities, not creating the table (use [`account_sas`]).
pub fn table_sas(table: &str, perms: &str) -> String {
    // sp st se resource si sip spr sv spk srk epk erk
    let resource = format!("/table/{ACCOUNT}/{}", table.to_ascii_lowercase());
    let fields = [
        perms,
        "",
        SAS_EXPIRY,
        &resource,
        "",
        "",
        "",
        SAS_VERSION,
        "",
        "",
        "",
        "",
    ];
    signed_query(
        &[
            ("sv", SAS_VERSION),
            ("tn", table),
            ("sp", perms),
            ("se", SAS_EXPIRY),
        ],
        &fields,
    )
}

/// A blob service SAS: for one blob (`sr=b`) or, with `blob` `None`, for
/// every blob of `container` (`sr=c`). `perms` in canonical order from
/// `racwd`; lease operations need `w`.
pub fn blob_sas(container: &str, blob: Option<&str>, perms: &str) -> String {
    let sr = if blob.is_some() { "b" } else { "c" };
    let mut resource = format!("/blob/{ACCOUNT}/{container}");
    if let Some(blob) = blob {
        resource.push('/');
        resource.push_str(blob);
    }
    // sp st se resource si sip spr sv sr snapshot ses rscc rscd rsce rscl rsct
    let fields = [
        perms,
        "",
        SAS_EXPIRY,
        &resource,
        "",
        "",
        "",
        SAS_VERSION,
        sr,
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ];
    signed_query(
        &[
            ("sv", SAS_VERSION),
            ("sr", sr),
            ("sp", perms),
            ("se", SAS_EXPIRY),
        ],
        &fields,
    )
}

/// An account SAS, e.g. `account_sas("bt", "sco", "rwdlacu")`: services
/// (`b`lob, `t`able), resource types (`s`ervice, `c`ontainer, `o`bject) and
/// permissions. The one token that creates tables and containers.
pub fn account_sas(services: &str, resource_types: &str, perms: &str) -> String {
    // account sp ss srt st se sip spr sv ses, and a final newline
    let fields = [
        ACCOUNT,
        perms,
        services,
        resource_types,
        "",
        SAS_EXPIRY,
        "",
        "",
        SAS_VERSION,
        "",
        "",
    ];
    signed_query(
        &[
            ("sv", SAS_VERSION),
            ("ss", services),
            ("srt", resource_types),
            ("sp", perms),
            ("se", SAS_EXPIRY),
        ],
        &fields,
    )
}

/// `pairs` plus `sig`, the HMAC of the newline-joined `fields`, percent-encoded.
fn signed_query(pairs: &[(&str, &str)], fields: &[&str]) -> String {
    let key = base64_decode(ACCOUNT_KEY).expect("the account key is base64");
    let sig = crate::real_servers::base64(&hmac_sha256(&key, fields.join("\n").as_bytes()));
    pairs
        .iter()
        .copied()
        .chain([("sig", sig.as_str())])
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// HMAC-SHA256 (RFC 2104) over the `sha2` crate.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Standard base64 (with padding) to bytes; `None` if it is not base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The Azure Python SDKs
// ---------------------------------------------------------------------------

/// A python that can import the Azure SDKs `azure.data.tables` and
/// `azure.storage.blob`: `TEST_AZURE_PYTHON`, else the venv of `tools/test`.
/// Checked once per test binary; an error says why not.
pub fn sdk_python() -> Result<PathBuf, String> {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let python = std::env::var_os("TEST_AZURE_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(venv_python);
            if !python.exists() {
                return Err(format!("no python at {}", python.display()));
            }
            let out = Command::new(&python)
                .args(["-c", "import azure.data.tables, azure.storage.blob"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run {}: {e}", python.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} cannot import azure.data.tables / azure.storage.blob: {}",
                    python.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(python)
        })
        .clone()
}

/// [`sdk_python`], or `None` after a loud skip (a panic when required).
pub fn sdk_python_or_skip() -> Option<PathBuf> {
    match sdk_python() {
        Ok(p) => Some(p),
        Err(why) => missing(
            "the Azure Python SDKs (azure-data-tables, azure-storage-blob)",
            &why,
        ),
    }
}

/// Runs `script` with [`sdk_python`] and `args`, bounded by `timeout`;
/// returns its stdout, panicking with its stderr when it fails.
pub async fn run_python(
    python: &std::path::Path,
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> String {
    let run = tokio::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(timeout, run).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("run {}: {e}", python.display())),
        Err(_) => panic!("python script still running after {timeout:?}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python script failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn base64_round_trips_the_account_key() {
        let key = base64_decode(ACCOUNT_KEY).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(crate::real_servers::base64(&key), ACCOUNT_KEY);
        assert_eq!(base64_decode("a$"), None);
    }

    #[test]
    fn sas_tokens_are_signed_as_the_python_reference_signs_them() {
        // The same tokens from a reference implementation over Python's
        // hmac module (SAS_EXPIRY fixes the expiry), which Azurite accepted.
        let expiry = "se=2099-01-01T00%3A00%3A00Z";
        assert_eq!(
            table_sas("exp1", "raud"),
            format!(
                "sv=2021-08-06&tn=exp1&sp=raud&{expiry}&sig=m05CXpihzkooAX3qg%2B82d2hlPH31vy5UFiniR0%2Bfl%2Bs%3D"
            )
        );
        assert_eq!(
            blob_sas("cont", None, "racwd"),
            format!(
                "sv=2021-08-06&sr=c&sp=racwd&{expiry}&sig=PuK%2B6qA%2FTaA5W3HHOkMFj4gGHmHV54wp7RGXN6FEBgs%3D"
            )
        );
        assert_eq!(
            blob_sas("cont", Some("b"), "racwd"),
            format!(
                "sv=2021-08-06&sr=b&sp=racwd&{expiry}&sig=fTIPEGS5pNu%2BVSBxCTd9SijMJw53sAyJ%2BOjxMbINRbA%3D"
            )
        );
        assert_eq!(
            account_sas("bt", "sco", "rwdlacu"),
            format!(
                "sv=2021-08-06&ss=bt&srt=sco&sp=rwdlacu&{expiry}&sig=VlzBIEqhjhsabLN7bpKq594R3uPs01uMcIPaIJcPVtw%3D"
            )
        );
    }
}
