//! The PIN cache's logout timers (`pin_cache_seconds`): a token is logged out that long after
//! its last use. One timer task per token, whose deadline each use moves on — not one sleeping
//! task per signature (10 000 signatures on a 600 s cache held 10 000 tasks, ≈ 6 MiB).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Each token's logout deadline; a token has an entry while its timer task runs.
#[derive(Debug, Default, Clone)]
pub(super) struct LogoutTimers {
    deadlines: Arc<Mutex<HashMap<String, Instant>>>,
}

impl LogoutTimers {
    /// The token `key` was used now: `logout` runs `after` from now, unless it is used again
    /// before that (then `after` from that use). The first use starts the token's timer task;
    /// later ones only move its deadline (this call's `logout` is then dropped unused).
    pub(super) fn used<F>(&self, key: String, after: Duration, logout: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let deadline = Instant::now() + after;
        {
            let mut d = self.lock();
            if let Some(at) = d.get_mut(&key) {
                *at = deadline;
                return;
            }
            d.insert(key.clone(), deadline);
        }
        let timers = self.clone();
        tokio::spawn(async move {
            let mut until = deadline;
            loop {
                tokio::time::sleep_until(until).await;
                let moved = {
                    let mut d = timers.lock();
                    match d.get(&key) {
                        Some(&at) if at > Instant::now() => Some(at),
                        _ => {
                            d.remove(&key);
                            None
                        }
                    }
                };
                match moved {
                    Some(at) => until = at,
                    None => break,
                }
            }
            logout.await;
        });
    }

    /// Tokens with a running timer.
    #[cfg(test)]
    pub(super) fn running(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_timer_per_token_and_the_logout_follows_the_last_use() {
        let timers = LogoutTimers::default();
        let logouts = Arc::new(AtomicUsize::new(0));
        let use_token = |key: &str| {
            let logouts = Arc::clone(&logouts);
            timers.used(key.to_owned(), Duration::from_secs(600), async move {
                logouts.fetch_add(1, Ordering::SeqCst);
            });
        };
        for _ in 0..1000 {
            use_token("tok-a");
        }
        use_token("tok-b");
        assert_eq!(timers.running(), 2, "one timer per token, not per use");
        // Used again 500 s later: still logged in 600 s after the first use.
        tokio::time::sleep(Duration::from_secs(500)).await;
        use_token("tok-a");
        tokio::time::sleep(Duration::from_secs(101)).await;
        assert_eq!(logouts.load(Ordering::SeqCst), 1, "tok-b only");
        assert_eq!(timers.running(), 1);
        // 600 s after the last use of tok-a.
        tokio::time::sleep(Duration::from_secs(500)).await;
        assert_eq!(logouts.load(Ordering::SeqCst), 2);
        assert_eq!(timers.running(), 0);
        // A use after the logout starts a new timer.
        use_token("tok-a");
        assert_eq!(timers.running(), 1);
    }
}
