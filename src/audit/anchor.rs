//! Signed heads kept outside the database: the anchor file the vault appends
//! every checkpoint to, and the heads an audit consumer saves.

use std::path::Path;

use super::{Checkpoint, SignedHead};
use crate::hardening::FileError;

/// Appends `head` as one JSON line, on disk when this returns.
pub fn append(path: &Path, head: &SignedHead) -> Result<(), FileError> {
    crate::hardening::append_public("audit.anchor_file", path, &head.to_json())
}

/// Every head in `path`, in order: an anchor file (one JSON line each) or a
/// head saved from `credvault audit head` (one JSON value, any layout).
pub fn read(path: &Path) -> Result<Vec<SignedHead>, String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut crate::hardening::open_public("audit head file", path).map_err(|e| e.to_string())?,
        &mut text,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::Deserializer::from_str(&text)
        .into_iter::<SignedHead>()
        .enumerate()
        .map(|(i, head)| {
            head.map_err(|e| {
                format!(
                    "{}: head {} (line {}) is not a signed audit head as `credvault audit head` \
                     prints it",
                    path.display(),
                    i + 1,
                    e.line()
                )
            })
        })
        .collect()
}

/// The head with the highest sequence in `path` (not necessarily its last
/// line: an older head appended later must not count), `None` if it has none.
pub fn highest(path: &Path) -> Result<Option<Checkpoint>, String> {
    Ok(read(path)?
        .into_iter()
        .map(|h| h.head)
        .max_by_key(|h| h.sequence))
}

#[cfg(test)]
mod tests {
    use super::super::{Signer, GENESIS};
    use super::*;

    #[test]
    fn appended_heads_read_back_in_order_and_a_saved_head_may_be_pretty() {
        let dir = tempfile::tempdir().unwrap();
        let rng = ring::rand::SystemRandom::new();
        let signer = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
        let heads: Vec<SignedHead> = (0..3)
            .map(|n| SignedHead {
                head: signer.sign_head(&[1; 16], n, &GENESIS),
                public_key: signer.public_key().to_vec(),
            })
            .collect();
        let path = dir.path().join("anchor");
        for h in &heads {
            append(&path, h).unwrap();
        }
        assert_eq!(read(&path).unwrap(), heads);

        let saved = dir.path().join("head.json");
        std::fs::write(&saved, serde_json::to_string_pretty(&heads[2]).unwrap()).unwrap();
        assert_eq!(read(&saved).unwrap(), vec![heads[2].clone()]);

        std::fs::write(&saved, "{\"head\": 1}").unwrap();
        let err = read(&saved).unwrap_err();
        assert!(
            err.contains("head 1") && err.contains("audit head"),
            "{err}"
        );
    }
}
