//! Refused calls are audited without letting a refused caller write one event per call.
//!
//! The first refusal of an (identity, method, outcome) in a window is written
//! at once, as any call's event is. Any more in the same window are counted,
//! and written as one event carrying their count when the window ends. So every
//! refused call is accounted for, and a flood of them costs at most two events
//! per window and key, not one fsync'd event each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::{self, Event};
use crate::domain::{Effect, Vault};

/// How long repeated refusals are counted before their event is written.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Keys counted at once; past this, refusals are counted under one key per
/// method and outcome, with the identity `(several)`.
const MAX_KEYS: usize = 1024;
/// What an aggregated field says when the refusals it sums differ in it.
const SEVERAL: &str = "(several)";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: String,
    method: String,
    outcome: &'static str,
}

/// Refusals after the first in the current window, for one key.
#[derive(Debug)]
struct Tally {
    count: u64,
    /// The first counted refusal's context; fields they do not share become `(several)`.
    context: audit::Context,
}

#[derive(Debug)]
pub struct Refusals {
    vault: Arc<Vault>,
    /// `None` for a key whose first refusal was written and none has followed.
    counting: Mutex<HashMap<Key, Option<Tally>>>,
}

impl Refusals {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self {
            vault,
            counting: Mutex::default(),
        }
    }

    /// Accounts for one refused call. Returns the event to write now when it
    /// is the first of its key in this window; a later one is only counted.
    fn count(&self, context: &audit::Context, outcome: &'static str) -> Option<Event> {
        // Only map operations run under the lock; a poisoned one is still whole.
        let mut counting = self.counting.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = Key {
            identity: context.identity.clone(),
            method: context.method.clone(),
            outcome,
        };
        if !counting.contains_key(&key) && counting.len() >= MAX_KEYS {
            key.identity = SEVERAL.to_owned();
        }
        match counting.get_mut(&key) {
            None => {
                counting.insert(key, None);
                Some(Event::new(context, outcome, audit::Details::default()))
            }
            Some(slot) => {
                match slot {
                    None => {
                        *slot = Some(Tally {
                            count: 1,
                            context: context.clone(),
                        })
                    }
                    Some(tally) => {
                        tally.count += 1;
                        merge(&mut tally.context, context);
                    }
                }
                None
            }
        }
    }

    /// Accounts for one refused call, writing its event first if it is the
    /// first of its key in this window.
    pub async fn refuse(&self, context: &audit::Context, outcome: &'static str) {
        if let Some(event) = self.count(context, outcome) {
            if let Err(e) = self.vault.audit().record(event, Effect::Inert).await {
                tracing::warn!(error = %e, "could not audit a refused call");
            }
        }
    }

    /// Ends the window: writes one event for each key with counted refusals,
    /// carrying their count, and forgets every key.
    pub async fn flush(&self) {
        let ended = std::mem::take(&mut *self.counting.lock().unwrap_or_else(|p| p.into_inner()));
        for (key, tally) in ended {
            let Some(tally) = tally else { continue };
            let mut event = Event::new(&tally.context, key.outcome, audit::Details::default());
            event.identity = key.identity;
            event.count = Some(tally.count);
            if let Err(e) = self.vault.audit().record(event, Effect::Inert).await {
                tracing::warn!(error = %e, count = tally.count, "could not audit refused calls");
            }
        }
    }

    /// Flushes every [`WINDOW`], for as long as the task runs.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WINDOW).await;
            self.flush().await;
        }
    }
}

fn merge(into: &mut audit::Context, other: &audit::Context) {
    for (mine, theirs) in [
        (&mut into.workspace_id, &other.workspace_id),
        (&mut into.provider, &other.provider),
        (&mut into.request_id, &other.request_id),
    ] {
        if mine != theirs {
            SEVERAL.clone_into(mine);
        }
    }
}
