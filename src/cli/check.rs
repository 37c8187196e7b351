//! `credvault check-config`: everything start-up would check, without serving.

use std::path::Path;
use std::sync::Arc;

use crate::config::{Backend, Config, ROOT_KEY_ENV};
use crate::crypto::{Keyring, RootKey};
use crate::edge::tls;
use crate::policy::Policy;
use crate::store::{SqliteStore, Store};

/// Runs every check, prints one line each, and fails if any failed.
pub async fn run(path: &Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| format!("✗ {e}"))?;
    println!("✓ configuration {} parses", path.display());
    let mut failed = 0;
    let mut report = |what: &str, result: Result<String, String>| match result {
        Ok(detail) => println!("✓ {what}{detail}"),
        Err(why) => {
            failed += 1;
            println!("✗ {what}: {why}");
        }
    };
    report(
        "TLS: server certificate, key (mode 0600), client CA, CRL, trust domains",
        tls::TlsMaterial::load(&config.tls)
            .map(|_| String::new())
            .map_err(|e| e.to_string()),
    );
    report(
        "policy",
        Policy::compile(&config.policy).map(|p| {
            if p.is_empty() {
                " (no rules: every call would be denied)".to_owned()
            } else {
                format!(" ({} rules)", config.policy.len())
            }
        }),
    );
    let root = match &config.keys.root_key_file {
        Some(file) => RootKey::from_file(file),
        None => RootKey::from_env(config.keys.root_key_env.as_deref().unwrap_or(ROOT_KEY_ENV)),
    };
    let root_ok = root
        .as_ref()
        .map(|_| String::new())
        .map_err(ToString::to_string);
    report("root key (file mode 0600, 64 hex characters)", root_ok);
    if let Ok(root) = root {
        report(
            "the root key opens the database",
            open_database(&config, &root).await,
        );
    }
    report(
        "outbound HTTP client (extra CA)",
        crate::outbound::Outbound::new(&config.outbound)
            .map(|_| String::new())
            .map_err(|e| e.to_string()),
    );
    if failed == 0 {
        println!("configuration OK");
        Ok(())
    } else {
        Err(format!("{failed} check(s) failed"))
    }
}

async fn open_database(config: &Config, root: &RootKey) -> Result<String, String> {
    let store = if config.storage.backend == Backend::Postgres {
        crate::store::open(&config.storage)
            .await
            .map_err(|e| e.to_string())?
    } else {
        let Some(store) = open_sqlite(&config.storage.path)? else {
            return Ok(format!(
                " ({} does not exist yet; serve creates it)",
                config.storage.path.display()
            ));
        };
        store
    };
    let Some(keys) = store.load_keys().await.map_err(|e| e.to_string())? else {
        return Ok(" (no keys yet; serve creates them)".to_owned());
    };
    let keyring = Keyring::unwrap(
        root,
        &keys.versions,
        &keys.fingerprint_key,
        keys.fingerprint_purpose,
    )
    .map_err(|_| "the root key does not open this database's key material".to_owned())?;
    crate::domain::refuse_unbound(&keys).map_err(|e| e.to_string())?;
    Ok(format!(
        " (primary key version {})",
        keyring.primary_version()
    ))
}

/// Opens the SQLite file after its integrity check; a missing file is fine.
fn open_sqlite(path: &std::path::Path) -> Result<Option<Arc<dyn Store>>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let store = Arc::new(SqliteStore::open(path).map_err(|e| e.to_string())?);
    let check: String =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
            .map_err(|e| format!("integrity check failed: {e}"))?;
    if check != "ok" {
        return Err(format!(
            "the database is corrupt ({check}); restore it from a backup"
        ));
    }
    Ok(Some(store))
}
