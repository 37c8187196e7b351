//! Walks the chain and every signed head that vouches for it, and names the first broken link.

use super::{chain_hash, signature_ok, Checkpoint, StoredEvent, GENESIS, HASH_LEN};

/// A log to check: its events and the signed heads that vouch for them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Log<'a> {
    /// Every event, in sequence order, from event 1.
    pub events: &'a [StoredEvent],
    /// Heads kept beside the events (the database's checkpoints): whoever
    /// can delete events can delete these too.
    pub checkpoints: &'a [Checkpoint],
    /// Heads kept outside the database: a saved `audit head`, the lines of
    /// the anchor file, an export's last line.
    pub anchors: &'a [Checkpoint],
    /// The identity every head must name (heads from before identities name
    /// none); `None` when the log names none.
    pub database_id: Option<&'a [u8]>,
}

/// What an intact log holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub events: u64,
    pub last: u64,
    pub checkpoints: usize,
    pub anchors: usize,
}

/// The first thing found wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Broken {
    #[error("the log starts at event {0}, not at 1: the events before it were deleted")]
    StartsLate(u64),
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
    #[error(
        "a head kept outside the database is at event {0}, but the log ends at event {1}: \
         events were deleted, or this is an older copy of the database"
    )]
    BehindAnchor(u64, u64),
    #[error(
        "event {0} does not match the head kept outside the database: the history was rewritten"
    )]
    AnchorMismatch(u64),
    #[error("the head kept outside the database at event {0} has a bad signature")]
    AnchorBadSignature(u64),
    #[error("the head at event {0} was signed for another database, not this one")]
    OtherDatabase(u64),
}

/// Checks `log`: events from 1 with consecutive sequences, each event's
/// hash over its own canonical text and the previous hash, and every head's
/// signature (with `public_key`, when given), database and hash.
pub fn verify(log: &Log<'_>, public_key: Option<&[u8]>) -> Result<Checked, Broken> {
    let last = verify_chain(log.events)?;
    for (head, outside) in log
        .checkpoints
        .iter()
        .map(|h| (h, false))
        .chain(log.anchors.iter().map(|h| (h, true)))
    {
        if public_key.is_some_and(|key| !signature_ok(key, head)) {
            return Err(if outside {
                Broken::AnchorBadSignature(head.sequence)
            } else {
                Broken::BadSignature(head.sequence)
            });
        }
        let names_another =
            !head.database_id.is_empty() && log.database_id != Some(head.database_id.as_slice());
        if names_another {
            return Err(Broken::OtherDatabase(head.sequence));
        }
        let hash_at = match head.sequence {
            0 => Some(GENESIS.as_slice()),
            n => usize::try_from(n - 1)
                .ok()
                .and_then(|i| log.events.get(i))
                .map(|e| e.hash.as_slice()),
        };
        match (hash_at, outside) {
            (None, false) => return Err(Broken::Truncated(head.sequence, last)),
            (None, true) => return Err(Broken::BehindAnchor(head.sequence, last)),
            (Some(hash), false) if hash != head.hash.as_slice() => {
                return Err(Broken::CheckpointMismatch(head.sequence))
            }
            (Some(hash), true) if hash != head.hash.as_slice() => {
                return Err(Broken::AnchorMismatch(head.sequence))
            }
            (Some(_), _) => {}
        }
    }
    Ok(Checked {
        events: log.events.len() as u64,
        last,
        checkpoints: log.checkpoints.len(),
        anchors: log.anchors.len(),
    })
}

/// The chain from event 1; returns the last sequence (0 for no events).
fn verify_chain(events: &[StoredEvent]) -> Result<u64, Broken> {
    if let Some(first) = events.first().filter(|e| e.sequence != 1) {
        return Err(Broken::StartsLate(first.sequence));
    }
    verify_links(events, 0, &GENESIS).map(|(last, _)| last)
}

/// Checks that `events` follow event `after`, whose hash is `previous`:
/// consecutive sequences, each event well formed, linked to the one before
/// and hashed over its own text. Returns the last sequence and hash.
pub fn verify_links(
    events: &[StoredEvent],
    after: u64,
    previous: &[u8; HASH_LEN],
) -> Result<(u64, [u8; HASH_LEN]), Broken> {
    let mut previous = *previous;
    let mut last = after;
    for e in events {
        let expected = last + 1;
        if e.sequence != expected {
            return Err(Broken::Missing(expected));
        }
        if e.event().is_none_or(|parsed| parsed.sequence != e.sequence) {
            return Err(Broken::Malformed(e.sequence));
        }
        if e.previous_hash != previous {
            return Err(Broken::Unlinked(e.sequence, last));
        }
        if chain_hash(&previous, &e.canonical) != e.hash {
            return Err(Broken::Edited(e.sequence));
        }
        previous = e.hash;
        last = e.sequence;
    }
    Ok((last, previous))
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

    fn chain(events: &[StoredEvent]) -> Log<'_> {
        Log {
            events,
            ..Log::default()
        }
    }

    const DB: &[u8] = &[7; 16];
    const OTHER_DB: &[u8] = &[8; 16];

    fn with<'a>(events: &'a [StoredEvent], checkpoints: &'a [Checkpoint]) -> Log<'a> {
        Log {
            events,
            checkpoints,
            database_id: Some(DB),
            ..Log::default()
        }
    }

    #[test]
    fn intact_log_verifies() {
        let events = log(5);
        let checked = verify(&chain(&events), None).unwrap();
        assert_eq!((checked.events, checked.last), (5, 5));
        assert!(verify(&chain(&[]), None).is_ok(), "an empty log");
    }

    #[test]
    fn names_the_first_broken_link() {
        let mut edited = log(5);
        edited[2].canonical = edited[2].canonical.replace("posthog", "amplitude");
        assert_eq!(verify(&chain(&edited), None), Err(Broken::Edited(3)));

        let mut deleted = log(5);
        deleted.remove(1);
        assert_eq!(verify(&chain(&deleted), None), Err(Broken::Missing(2)));

        let events = log(5);
        assert_eq!(
            verify(&chain(&events[2..]), None),
            Err(Broken::StartsLate(3)),
            "the first events deleted"
        );

        let mut reordered = log(5);
        reordered.swap(1, 2);
        assert!(matches!(
            verify(&chain(&reordered), None),
            Err(Broken::Missing(2))
        ));

        // Rows swapped but sequence numbers kept in place.
        let mut relabelled = log(5);
        let (a, b) = (relabelled[1].clone(), relabelled[2].clone());
        relabelled[1] = StoredEvent { sequence: 2, ..b };
        relabelled[2] = StoredEvent { sequence: 3, ..a };
        assert_eq!(verify(&chain(&relabelled), None), Err(Broken::Malformed(2)));
    }

    #[test]
    fn checkpoints_catch_truncation_and_forgery() {
        let rng = ring::rand::SystemRandom::new();
        let signer = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
        let events = log(5);
        let cp = signer.sign_head(DB, 5, &events[4].hash);
        let key = Some(signer.public_key());
        assert!(verify(&with(&events, std::slice::from_ref(&cp)), key).is_ok());
        assert_eq!(
            verify(&with(&events[..3], std::slice::from_ref(&cp)), key),
            Err(Broken::Truncated(5, 3))
        );
        let mut forged = cp.clone();
        forged.hash = vec![9; 32];
        assert_eq!(
            verify(&with(&events, std::slice::from_ref(&forged)), key),
            Err(Broken::BadSignature(5))
        );
        let elsewhere = Log {
            database_id: Some(OTHER_DB),
            ..with(&events, std::slice::from_ref(&cp))
        };
        assert_eq!(verify(&elsewhere, key), Err(Broken::OtherDatabase(5)));
    }

    #[test]
    fn a_head_kept_outside_catches_what_the_database_alone_cannot() {
        let rng = ring::rand::SystemRandom::new();
        let signer = Signer::from_pkcs8(&Signer::generate(&rng).unwrap()).unwrap();
        let key = Some(signer.public_key());
        let events = log(5);
        let saved = signer.sign_head(DB, 4, &events[3].hash);
        let anchored = |events| Log {
            events,
            anchors: std::slice::from_ref(&saved),
            database_id: Some(DB),
            ..Log::default()
        };
        assert_eq!(verify(&anchored(&events), key).unwrap().anchors, 1);
        // The tail deleted, with every checkpoint after it: the chain alone holds.
        assert!(verify(&chain(&events[..2]), key).is_ok());
        assert_eq!(
            verify(&anchored(&events[..2]), key),
            Err(Broken::BehindAnchor(4, 2))
        );
        // The history re-chained from event 1: every link holds, the anchor does not.
        let mut rewritten = log(5);
        rewritten[0].canonical = rewritten[0].canonical.replace("\"r\"", "\"x\"");
        let mut previous = GENESIS;
        for e in &mut rewritten {
            e.previous_hash = previous;
            e.hash = chain_hash(&previous, &e.canonical);
            previous = e.hash;
        }
        assert!(verify(&chain(&rewritten), key).is_ok());
        assert_eq!(
            verify(&anchored(&rewritten), key),
            Err(Broken::AnchorMismatch(4))
        );
        let genesis = signer.sign_head(DB, 0, &GENESIS);
        let empty = Log {
            anchors: std::slice::from_ref(&genesis),
            database_id: Some(DB),
            ..Log::default()
        };
        assert!(verify(&empty, key).is_ok(), "the head of an empty log");
    }
}
