//! Start-up and shutdown: load keys and TLS material, open storage, serve until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Backend, Config, ROOT_KEY_ENV};
use crate::crypto::{RootKey, RootKeyError};
use crate::domain::{Vault, VaultError};
use crate::edge::{self, tls::TlsError};
use crate::outbound::{Outbound, OutboundError};
use crate::store::{SqliteStore, Store, StoreError};

/// Why the vault did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("keyring: {0}")]
    Keyring(#[from] VaultError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("in-flight calls did not finish within {0:?} of shutdown")]
    ShutdownTimeout(Duration),
}

/// Runs the vault on `listener` until `shutdown` resolves, then lets in-flight
/// calls finish within the configured grace period.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    crate::hardening::disable_core_dumps();
    let root = match &config.keys.root_key_file {
        Some(path) => RootKey::from_file(path)?,
        None => RootKey::from_env(config.keys.root_key_env.as_deref().unwrap_or(ROOT_KEY_ENV))?,
    };
    let tls = edge::tls::server_config(&config.tls)?;
    let store: Arc<dyn Store> = match config.storage.backend {
        Backend::Sqlite => {
            let path = config.storage.path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(StoreError::from)??,
            )
        }
    };
    let outbound = Outbound::new(&config.outbound)?;
    let vault = Arc::new(Vault::open(store, &root, outbound, &config.providers).await?);
    drop(root);
    tracing::info!(
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        key_version = vault.keyring().primary_version(),
        "credvault serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = edge::serve(vault, listener, tls, &config.limits, async {
        let _ = stop_rx.await;
    });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return Ok(result?),
        () = shutdown => {}
    }
    tracing::info!("shutting down: no new connections; finishing in-flight calls");
    let _ = stop_tx.send(());
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    match tokio::time::timeout(grace, serve).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ServeError::ShutdownTimeout(grace)),
    }
}
