//! `credvault keys rotate|status|retire|rotate-root|bind-params`: key administration for people.

use std::path::PathBuf;

use super::client::{status_error, Connect};
use crate::config::Config;
use crate::crypto::RootKey;
use crate::proto::key_admin_client::KeyAdminClient;
use crate::proto::key_version_info::State;
use crate::proto::{self, RetireRequest, RotateRequest, StatusRequest};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Make a new key version primary; the vault then rewraps every data key under it.
    Rotate(Connected),
    /// Show key versions, their use, and rewrap progress.
    Status(Connected),
    /// Destroy a key version no credential uses any more.
    Retire {
        #[command(flatten)]
        connect: Connect,
        /// The key version to destroy (see `credvault keys status`); never the primary.
        #[arg(long)]
        version: u32,
    },
    /// Once after upgrading a database from before params were bound, with
    /// every replica stopped: bind each connection's params to its key.
    BindParams {
        /// The vault's configuration (it names the database and the root key).
        #[arg(long)]
        config: PathBuf,
    },
    /// Reseal every key under a new root key, with the vault stopped.
    RotateRoot {
        /// The vault's configuration (it names the database and the current root key).
        #[arg(long)]
        config: PathBuf,
        /// A file with the new root key: 64 hex characters, mode 0600.
        #[arg(
            long,
            required_unless_present = "new_root_config",
            conflicts_with = "new_root_config"
        )]
        new_root_key: Option<PathBuf>,
        /// A configuration whose `[keys]` names the new root key instead: a
        /// `[keys.pkcs11]` token key (to move onto an HSM, or to another key
        /// on it), or a file. Only its `[keys]` is read.
        #[arg(long)]
        new_root_config: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct Connected {
    #[command(flatten)]
    connect: Connect,
}

pub async fn run(command: KeysCommand) -> Result<(), String> {
    match command {
        KeysCommand::Rotate(c) => {
            let status = client(&c.connect)
                .await?
                .rotate(RotateRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "rotated: key version {} is now primary; rewrapping in the background",
                status.primary_version
            );
            print_status(&status);
        }
        KeysCommand::Status(c) => {
            let status = client(&c.connect)
                .await?
                .status(StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_status(&status);
        }
        KeysCommand::Retire { connect, version } => {
            let status = client(&connect)
                .await?
                .retire(RetireRequest { version })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("key version {version} retired: its key material is destroyed");
            print_status(&status);
        }
        KeysCommand::RotateRoot {
            config,
            new_root_key,
            new_root_config,
        } => rotate_root(&config, new_root_key.as_deref(), new_root_config.as_deref()).await?,
        KeysCommand::BindParams { config } => bind_params(&config).await?,
    }
    Ok(())
}

async fn client(connect: &Connect) -> Result<KeyAdminClient<tonic::transport::Channel>, String> {
    connect.channel("admin").await.map(KeyAdminClient::new)
}

fn print_status(s: &proto::KeyStatus) {
    let percent = if s.rewrap_total == 0 {
        100.0
    } else {
        s.rewrap_done as f64 * 100.0 / s.rewrap_total as f64
    };
    println!(
        "primary version {}; rewrap {}/{} credentials on it ({percent:.0}%)",
        s.primary_version, s.rewrap_done, s.rewrap_total
    );
    println!(
        "{:<8} {:<8} {:<26} {:>12} {:>12}",
        "VERSION", "STATE", "CREATED", "CREDENTIALS", "ENCRYPTIONS"
    );
    for v in &s.versions {
        let state = match State::try_from(v.state).unwrap_or(State::Unspecified) {
            State::Primary => "primary",
            State::Active => "active",
            State::Retired => "retired",
            State::Unspecified => "?",
        };
        let created = v
            .created_at
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        println!(
            "{:<8} {:<8} {:<26} {:>12} {:>12}",
            v.version, state, created, v.credentials, v.encryptions
        );
    }
}

async fn bind_params(config_path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let root = root_key(&config)?;
    let store = crate::store::open(&config.storage)
        .await
        .map_err(|e| e.to_string())?;
    let count = crate::domain::bind_legacy_params(store, &root)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "bound the params of {count} connection(s) to their keys in {}; start the vault",
        crate::store::describe(&config.storage)
    );
    Ok(())
}

/// The root key the configuration names.
fn root_key(config: &Config) -> Result<RootKey, String> {
    RootKey::load(config.keys.root_source()?).map_err(|e| e.to_string())
}

async fn rotate_root(
    config_path: &std::path::Path,
    new_root_key: Option<&std::path::Path>,
    new_root_config: Option<&std::path::Path>,
) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let old = root_key(&config)?;
    let (new, new_place) = match (new_root_key, new_root_config) {
        (Some(file), _) => (
            RootKey::from_file(file).map_err(|e| e.to_string())?,
            format!(
                "Point `keys.root_key_file` in {} at {}\n(or put the new key in place of the old \
                 file), keep a backup of it",
                config_path.display(),
                file.display()
            ),
        ),
        (None, Some(other)) => {
            let other_config = Config::load(other).map_err(|e| e.to_string())?;
            (
                root_key(&other_config)?,
                format!(
                    "Copy the [keys] root key settings of {} into {}, keep a backup of the new \
                     root key (for a token: its own backup)",
                    other.display(),
                    config_path.display()
                ),
            )
        }
        (None, None) => return Err("give --new-root-key or --new-root-config".into()),
    };
    if config.storage.backend == crate::config::Backend::Sqlite && !config.storage.path.exists() {
        return Err(format!(
            "{} does not exist: check storage.path in {}; nothing was changed",
            config.storage.path.display(),
            config_path.display()
        ));
    }
    let store = crate::store::open(&config.storage)
        .await
        .map_err(|e| e.to_string())?;
    let count = crate::domain::rotation::rotate_root(store, old, new)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "resealed {count} keys under the new root key in {}.\n\
         The old root key no longer opens this database. {new_place}, then start the vault.",
        crate::store::describe(&config.storage),
    );
    Ok(())
}
