//! Walks the chain and the checkpoints and names the first broken link.

use super::{chain_hash, signature_ok, Checkpoint, StoredEvent, GENESIS};

/// What an intact log holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub events: u64,
    pub first: u64,
    pub last: u64,
    pub checkpoints: usize,
}

/// The first thing found wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Broken {
    #[error("event {0} is missing (deleted, or the events are out of order)")]
    Missing(u64),
    #[error("event {0} does not follow event {1}: inserted, or reordered")]
    Unlinked(u64, u64),
    #[error("event {0} was edited: its hash does not match its contents")]
    Edited(u64),
    #[error("event {0} is not a well-formed event, or names another sequence")]
    Malformed(u64),
    #[error("checkpoint at event {0} does not match the log: events at or before it were changed")]
    CheckpointMismatch(u64),
    #[error("checkpoint at event {0} is past the end of the log (event {1}): events were deleted")]
    Truncated(u64, u64),
    #[error("checkpoint at event {0} has a bad signature")]
    BadSignature(u64),
}

/// Checks `events` (in sequence order) and `checkpoints`: consecutive
/// sequences, each event's hash over its own canonical text and the previous
/// hash, and every checkpoint's signature (with `public_key`) and hash. A log
/// that starts after 1 (an export from the middle) trusts its first link.
pub fn verify(
    events: &[StoredEvent],
    checkpoints: &[Checkpoint],
    public_key: Option<&[u8]>,
) -> Result<Checked, Broken> {
    let mut expected_sequence = events.first().map_or(1, |e| e.sequence);
    let mut previous = events.first().map_or(GENESIS, |e| e.previous_hash);
    if expected_sequence == 1 && previous != GENESIS {
        return Err(Broken::Unlinked(1, 0));
    }
    for e in events {
        if e.sequence != expected_sequence {
            return Err(Broken::Missing(expected_sequence));
        }
        if e.event().is_none_or(|parsed| parsed.sequence != e.sequence) {
            return Err(Broken::Malformed(e.sequence));
        }
        if e.previous_hash != previous {
            return Err(Broken::Unlinked(e.sequence, e.sequence - 1));
        }
        if chain_hash(&previous, &e.canonical) != e.hash {
            return Err(Broken::Edited(e.sequence));
        }
        previous = e.hash;
        expected_sequence += 1;
    }
    let last = expected_sequence - 1;
    for cp in checkpoints {
        if let Some(key) = public_key {
            if !signature_ok(key, cp) {
                return Err(Broken::BadSignature(cp.sequence));
            }
        }
        if cp.sequence > last {
            return Err(Broken::Truncated(cp.sequence, last));
        }
        let at = events.iter().find(|e| e.sequence == cp.sequence);
        if at.is_some_and(|e| e.hash.as_slice() != cp.hash.as_slice()) {
            return Err(Broken::CheckpointMismatch(cp.sequence));
        }
    }
    Ok(Checked {
        events: events.len() as u64,
        first: events.first().map_or(0, |e| e.sequence),
        last,
        checkpoints: checkpoints.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Context, Details, Event, Signer, OUTCOME_OK};
    use super::*;

    fn log(n: u64) -> Vec<StoredEvent> {
        let ctx = Context {
            identity: "i".into(),
            method: "Credentials.Redact".into(),
            workspace_id: "w".into(),
            provider: "posthog".into(),
            request_id: "r".into(),
        };
        let mut previous = GENESIS;
        (1..=n)
            .map(|sequence| {
                let mut e = Event::new(&ctx, OUTCOME_OK, Details::default());
                e.sequence = sequence;
                let canonical = e.canonical();
                let hash = chain_hash(&previous, &canonical);
                let stored = StoredEvent {
                    sequence,
                    canonical,
                    previous_hash: previous,
                    hash,
                };
                previous = hash;
                stored
            })
            .collect()
    }

    #[test]
    fn intact_log_verifies() {
        let events = log(5);
        let checked = verify(&events, &[], None).unwrap();
        assert_eq!((checked.first, checked.last), (1, 5));
        assert!(
            verify(&events[2..], &[], None).is_ok(),
            "an export from the middle"
        );
    }

    #[test]
    fn names_the_first_broken_link() {
        let mut edited = log(5);
        edited[2].canonical = edited[2].canonical.replace("posthog", "amplitude");
        assert_eq!(verify(&edited, &[], None), Err(Broken::Edited(3)));

        let mut deleted = log(5);
        deleted.remove(1);
        assert_eq!(verify(&deleted, &[], None), Err(Broken::Missing(2)));

        let mut reordered = log(5);
        reordered.swap(1, 2);
        assert!(matches!(
            verify(&reordered, &[], None),
            Err(Broken::Missing(2))
        ));

        // Rows swapped but sequence numbers kept in place.
        let mut relabelled = log(5);
        let (a, b) = (relabelled[1].clone(), relabelled[2].clone());
        relabelled[1] = StoredEvent { sequence: 2, ..b };
        relabelled[2] = StoredEvent { sequence: 3, ..a };
        assert_eq!(verify(&relabelled, &[], None), Err(Broken::Malformed(2)));
    }

    #[test]
    fn checkpoints_catch_truncation_and_forgery() {
        let rng = ring::rand::SystemRandom::new();
        let signer = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
        let events = log(5);
        let cp = signer.sign_head(5, &events[4].hash);
        let key = Some(signer.public_key());
        assert!(verify(&events, std::slice::from_ref(&cp), key).is_ok());
        assert_eq!(
            verify(&events[..3], std::slice::from_ref(&cp), key),
            Err(Broken::Truncated(5, 3))
        );
        let mut forged = cp.clone();
        forged.hash = vec![9; 32];
        assert_eq!(
            verify(&events, &[forged], key),
            Err(Broken::BadSignature(5))
        );
    }
}
