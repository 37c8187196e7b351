//! The time the vault decides expiry by. Tests move it by hand, so that a
//! month passes without waiting for it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// The system's time, or a time that moves only when told to.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<Manual>>);

#[derive(Debug)]
struct Manual {
    now: Mutex<SystemTime>,
    moved: watch::Sender<()>,
}

impl Clock {
    /// The system's time.
    pub fn system() -> Self {
        Self(None)
    }

    /// A time that starts at `start` and moves only by [`Clock::advance`].
    pub fn manual(start: SystemTime) -> Self {
        Self(Some(Arc::new(Manual {
            now: Mutex::new(start),
            moved: watch::channel(()).0,
        })))
    }

    pub fn now(&self) -> SystemTime {
        match &self.0 {
            None => SystemTime::now(),
            Some(manual) => *manual.now.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Moves a manual clock forward and wakes whoever waits in
    /// [`Clock::sleep`]; the system's clock ignores it.
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.0 {
            *manual.now.lock().unwrap_or_else(|p| p.into_inner()) += by;
            manual.moved.send_replace(());
        }
    }

    /// Ticks for a periodic job: every `period` of real time, or, on a
    /// manual clock, each time it is moved (none missed between two waits).
    pub fn ticks(&self, period: Duration) -> Ticks {
        Ticks {
            period,
            moved: self.0.as_ref().map(|manual| manual.moved.subscribe()),
        }
    }
}

/// See [`Clock::ticks`].
#[derive(Debug)]
pub struct Ticks {
    period: Duration,
    moved: Option<watch::Receiver<()>>,
}

impl Ticks {
    pub async fn next(&mut self) {
        match &mut self.moved {
            None => tokio::time::sleep(self.period).await,
            Some(moved) => {
                if moved.changed().await.is_err() {
                    // The clock is gone: nothing will move it again.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
