//! `credvault check-config`: everything start-up would check, without serving.

use std::path::Path;
use std::sync::Arc;

use crate::config::{Backend, Config};
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
    let mut tls_parts = vec!["server certificate", "key (mode 0600)", "client CA"];
    if config.tls.crl_file.is_some() {
        tls_parts.push("CRL");
    }
    if !config.tls.trust_domains.is_empty() {
        tls_parts.push("trust domains");
    }
    report(
        &format!("TLS: {}", tls_parts.join(", ")),
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
    let source = config.keys.root_source();
    let what = match &source {
        Ok(crate::crypto::RootSource::Token(_)) => {
            "root key (the token, its PIN, a non-extractable AES-256 key)"
        }
        _ => "root key (file mode 0600, 64 hex characters)",
    };
    let root = source.and_then(|source| RootKey::load(source).map_err(|e| e.to_string()));
    let root_ok = root
        .as_ref()
        .map(|_| String::new())
        .map_err(ToString::to_string);
    report(what, root_ok);
    let store = open_store(&config).await;
    report(
        "the database opens",
        match &store {
            Ok(Some(_)) => Ok(format!(" ({})", crate::store::describe(&config.storage))),
            Ok(None) => Ok(not_created_yet(&config)),
            Err(e) => Err(e.clone()),
        },
    );
    if let (Ok(root), Ok(Some(store))) = (root, store) {
        report(
            "the root key opens the database",
            open_keys(store, &root).await,
        );
    }
    report(
        "files the vault writes: their folders exist and are writable",
        files_to_write(&config),
    );
    if let Some(anchor) = &config.audit.anchor_file {
        report("audit.anchor_file", anchor_reached(&config, anchor).await);
    }
    report(
        if config.outbound.extra_ca_file.is_some() {
            "outbound HTTP client (extra CA)"
        } else {
            "outbound HTTP client"
        },
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

/// The files `serve` creates or replaces (a read-only configuration mount
/// with the audit public key beside it fails here, not at start-up).
fn files_to_write(config: &Config) -> Result<String, String> {
    let mut files = Vec::new();
    if config.storage.backend == Backend::Sqlite {
        files.push(("storage.path", &config.storage.path));
    }
    if let Some(p) = &config.audit.public_key_file {
        files.push(("audit.public_key_file", p));
    }
    if let Some(p) = &config.audit.anchor_file {
        files.push(("audit.anchor_file", p));
    }
    let problems: Vec<String> = files
        .into_iter()
        .filter_map(|(key, path)| writable(path).err().map(|why| format!("{key}: {why}")))
        .collect();
    if problems.is_empty() {
        Ok(String::new())
    } else {
        Err(problems.join("; "))
    }
}

/// Whether this user may create or replace `path`: its folder exists and
/// is writable, and so is the file where it exists.
fn writable(path: &Path) -> Result<(), String> {
    use rustix::fs::{access, Access};
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(format!("the folder {} does not exist", folder.display()));
    }
    let target = if path.exists() { path } else { folder };
    access(target, Access::WRITE_OK).map_err(|e| {
        format!(
            "{} is not writable by this user ({e}): the vault writes it at start-up",
            target.display()
        )
    })
}

/// The configured store, after its own integrity check; `None` for a SQLite
/// file that does not exist yet.
async fn open_store(config: &Config) -> Result<Option<Arc<dyn Store>>, String> {
    let store = if config.storage.backend == Backend::Postgres {
        crate::store::open(&config.storage)
            .await
            .map_err(|e| e.to_string())?
    } else {
        match open_sqlite(&config.storage.path)? {
            Some(store) => store,
            None => return Ok(None),
        }
    };
    store.integrity_check().await.map_err(|e| e.to_string())?;
    Ok(Some(store))
}

fn not_created_yet(config: &Config) -> String {
    format!(
        " ({} does not exist yet; serve creates it)",
        config.storage.path.display()
    )
}

/// Whether the log reaches the anchor file's last head, as `serve` requires.
async fn anchor_reached(config: &Config, anchor: &Path) -> Result<String, String> {
    if !anchor.exists() {
        return Ok(format!(
            " ({} does not exist yet; serve creates it)",
            anchor.display()
        ));
    }
    let Some(highest) = crate::audit::anchor::highest(anchor)? else {
        return Ok(" (empty)".to_owned());
    };
    let Some(store) = open_store(config).await? else {
        return Err("the database does not exist, but the anchor file has heads".into());
    };
    match crate::domain::continues_from(&*store, &highest)
        .await
        .map_err(|e| e.to_string())?
    {
        None => Ok(format!(
            " (the log continues from its highest head, event {})",
            highest.sequence
        )),
        Some(why) => Err(format!(
            "the database's audit log does not continue from the file's highest head (event \
             {}): {why}; serve will refuse it, and `credvault audit verify --config` names what \
             is wrong",
            highest.sequence
        )),
    }
}

/// Whether the root key unwraps the stored key material, as `serve` would.
async fn open_keys(store: Arc<dyn Store>, root: &RootKey) -> Result<String, String> {
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

/// Opens the SQLite file; a missing file is fine.
fn open_sqlite(path: &std::path::Path) -> Result<Option<Arc<dyn Store>>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path).map_err(|e| e.to_string())?);
    Ok(Some(store))
}
