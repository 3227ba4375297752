//! The process log's own bound (issue 17: 5 KB of garbage to the device plane used to produce
//! 168 KB of log lines). Every line comes from a call site in the code, and input can make a
//! call site fire once per message, so the log is rate-limited per call site: each may write a
//! burst of [`BURST`] lines, then [`PER_SECOND`] a second. What it drops is counted, and a
//! reporter writes, every [`REPORT_EVERY`], one line per call site that dropped any, saying how
//! many. A flood therefore costs at most a few lines a second per call site, however large.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Lines a call site may write at once.
pub const BURST: f64 = 20.0;
/// Lines a call site may write a second after its burst.
pub const PER_SECOND: f64 = 5.0;
/// How often the counts of dropped lines are written.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    dropped: u64,
    name: &'static str,
    target: &'static str,
}

/// A per-call-site token bucket, as a per-layer filter; clones share the buckets.
#[derive(Debug, Default, Clone)]
pub struct RateLimited {
    buckets: Arc<Mutex<HashMap<Identifier, Bucket>>>,
}

impl RateLimited {
    pub fn new() -> Self {
        Self::default()
    }

    /// The filter, and a thread that writes the counts of dropped lines every
    /// [`REPORT_EVERY`] for as long as the process runs.
    pub fn with_reporter() -> Self {
        let limiter = Self::new();
        let reporter = limiter.clone();
        let spawned = std::thread::Builder::new()
            .name("log-reporter".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(REPORT_EVERY);
                    reporter.report();
                }
            });
        if let Err(e) = spawned {
            eprintln!("twinguard: the log reporter did not start: {e}");
        }
        limiter
    }

    /// Writes one line per call site that dropped lines since the last report, and resets the
    /// counts. Call it outside any logging (it logs).
    pub fn report(&self) {
        let dropped: Vec<(u64, &'static str, &'static str)> = match self.buckets.lock() {
            Ok(mut buckets) => buckets
                .values_mut()
                .filter(|b| b.dropped > 0)
                .map(|b| (std::mem::take(&mut b.dropped), b.name, b.target))
                .collect(),
            Err(_) => return,
        };
        for (dropped, site, target) in dropped {
            tracing::warn!(
                dropped,
                site,
                target,
                "similar log lines were dropped (rate limited)"
            );
        }
    }

    /// Whether a line from the call site of `meta` may be written now.
    fn admit(&self, meta: &'static Metadata<'static>) -> bool {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let bucket = buckets.entry(meta.callsite()).or_insert(Bucket {
            tokens: BURST,
            updated: now,
            dropped: 0,
            name: meta.name(),
            target: meta.target(),
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * PER_SECOND).min(BURST);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            bucket.dropped += 1;
            false
        }
    }
}

impl<S> Filter<S> for RateLimited {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        self.admit(event.metadata())
    }
}

/// The server's log layer: JSON lines to `writer`, filtered by `filter`, then rate-limited per
/// call site by `limited` (`None` only for `serve --dangerous-unbounded-resources`).
///
/// The level filter is the outer one: it decides first, so a call site below the level is
/// disabled where it stands (its events and spans are never built) and never reaches the rate
/// limiter. The other way round, every `debug!` and `trace!` in every dependency (hyper, h2,
/// async-nats...) was built and counted against its call site's budget before being dropped.
pub fn layer<S, W>(
    writer: W,
    filter: tracing_subscriber::EnvFilter,
    limited: Option<RateLimited>,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    tracing_subscriber::fmt::layer()
        .json()
        .with_writer(writer)
        .with_filter(limited)
        .with_filter(filter)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;
    use std::sync::{Arc, Mutex as StdMutex};

    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, fmt};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<StdMutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_below_the_level_are_never_built_nor_counted() {
        let sink = Sink::default();
        let writer = sink.clone();
        let limiter = RateLimited::new();
        let subscriber = tracing_subscriber::registry().with(layer(
            move || writer.clone(),
            tracing_subscriber::EnvFilter::new("info"),
            Some(limiter.clone()),
        ));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1_000 {
                tracing::debug!(i, "below the level");
            }
            tracing::info!("at the level");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("below the level"));
        assert!(text.contains("at the level"));
        assert_eq!(
            limiter.buckets.lock().unwrap().len(),
            1,
            "only the call site at the level reached the rate limiter"
        );
    }

    #[test]
    fn a_flood_from_one_call_site_writes_a_burst_then_says_how_much_it_dropped() {
        let sink = Sink::default();
        let writer = sink.clone();
        let limiter = RateLimited::new();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .json()
                .with_writer(move || writer.clone())
                .with_filter(limiter.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10_000 {
                tracing::warn!(i, "telemetry message refused");
            }
            tracing::info!("another call site is not affected");
            limiter.report();
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let refused = text.matches("telemetry message refused").count();
        assert!(
            (20..=21).contains(&refused),
            "{refused} lines of a 10,000-line flood"
        );
        assert!(text.contains("another call site is not affected"));
        assert!(text.contains("similar log lines were dropped"), "{text}");
        assert!(
            text.contains(&format!("\"dropped\":{}", 10_000 - refused)),
            "every dropped line is counted: {text}"
        );
        assert!(text.len() < 20_000, "{} bytes", text.len());
    }
}
