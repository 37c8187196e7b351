//! A development vault in one folder: certificates, root key, configuration and database, made on first run.

pub mod certs;

use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;

use crate::config::{
    AuditConfig, Backend, Config, KeysConfig, Limits, OutboundConfig, ProvidersConfig,
    StorageConfig, TlsConfig, DEFAULT_LISTEN,
};
use crate::crypto::RootKey;
use certs::{CertError, DevCertPaths};

pub const CONFIG_FILE: &str = "credvault.toml";
pub const ROOT_KEY_FILE: &str = "root.key";
pub const DATABASE_FILE: &str = "credvault.db";
pub const CERTS_DIR: &str = "certs";
pub const AUDIT_PUBLIC_KEY_FILE: &str = "audit-signing.pub";
/// Beside the database only because this is a development vault: in
/// production it belongs where a database writer cannot reach.
pub const AUDIT_ANCHOR_FILE: &str = "audit-anchor.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Public(#[from] crate::hardening::FileError),
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("could not generate a root key")]
    Random,
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The outcome of [`prepare`].
#[derive(Debug)]
pub struct DevVault {
    pub config_path: PathBuf,
    /// Whether this run created the files (the first run in this folder).
    pub created: bool,
}

/// Makes `data_dir` a development vault, unless it already is one: its
/// configuration file exists. Returns where the configuration is.
pub fn prepare(data_dir: &Path) -> Result<DevVault, DevError> {
    let config_path = data_dir.join(CONFIG_FILE);
    if config_path.exists() {
        return Ok(DevVault {
            config_path,
            created: false,
        });
    }
    std::fs::create_dir_all(data_dir).map_err(|source| DevError::File {
        path: data_dir.to_owned(),
        source,
    })?;
    restrict_dir(data_dir)?;
    certs::init(&data_dir.join(CERTS_DIR))?;
    let (_, hex) = RootKey::generate(&SystemRandom::new()).map_err(|_| DevError::Random)?;
    certs::write_private(
        &data_dir.join(ROOT_KEY_FILE),
        format!("{}\n", *hex).as_bytes(),
    )?;
    // The config is written last: its presence marks a complete dev vault.
    let text = format!(
        "# credvault development configuration, generated on first run.\n\
         # Paths are relative to this file. Not for production: the CA key is thrown away\n\
         # and the root key sits beside the database.\n{}",
        dev_config().to_toml()
    );
    // Mode 0644: the vault refuses a configuration others may write.
    crate::hardening::write_public("configuration", &config_path, text.as_bytes())?;
    Ok(DevVault {
        config_path,
        created: true,
    })
}

/// The configuration a development vault runs with, paths relative to its folder.
fn dev_config() -> Config {
    let certs = DevCertPaths::new(Path::new(CERTS_DIR));
    Config {
        // A constant that parses.
        #[allow(clippy::expect_used)]
        listen: DEFAULT_LISTEN
            .parse()
            .expect("DEFAULT_LISTEN is an address"),
        tls: TlsConfig {
            cert_file: certs.server_cert,
            key_file: certs.server_key,
            client_ca_file: certs.ca.clone(),
            crl_file: None,
            reload_poll_ms: 2_000,
            trust_domains: [(certs::SPIFFE_DOMAIN.to_owned(), certs.ca)].into(),
        },
        storage: StorageConfig {
            backend: Backend::Sqlite,
            path: DATABASE_FILE.into(),
            ..StorageConfig::default()
        },
        keys: KeysConfig {
            root_key_file: Some(ROOT_KEY_FILE.into()),
            root_key_env: None,
            pkcs11: None,
            max_encryptions_per_version: 1 << 30,
            rewrap_batch: crate::config::DEFAULT_REWRAP_BATCH,
        },
        limits: Limits::default(),
        outbound: OutboundConfig::default(),
        providers: ProvidersConfig::default().with_defaults(),
        metrics: Default::default(),
        // Off: the dev vault's providers are the real ones.
        monitor: Default::default(),
        audit: AuditConfig {
            public_key_file: Some(AUDIT_PUBLIC_KEY_FILE.into()),
            anchor_file: Some(AUDIT_ANCHOR_FILE.into()),
            ..AuditConfig::default()
        },
        policy: crate::policy::dev_rules(),
        source: None,
    }
}

fn restrict_dir(dir: &Path) -> Result<(), DevError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        DevError::File {
            path: dir.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_creates_a_loadable_config_and_later_runs_reuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("vault");
        let first = prepare(&data).unwrap();
        assert!(first.created);
        let config = Config::load(&first.config_path).unwrap();
        assert_eq!(config.storage.path, data.join(DATABASE_FILE));
        assert!(RootKey::from_file(config.keys.root_key_file.as_ref().unwrap()).is_ok());
        assert_eq!(
            config.tls.trust_domains[certs::SPIFFE_DOMAIN],
            config.tls.client_ca_file,
            "--dev binds its trust domain to its CA"
        );
        let second = prepare(&data).unwrap();
        assert!(!second.created);
    }
}
