//! History reads are bounded per page (issue 17): a page reads at most `MAX_HISTORY_SCAN`
//! stored readings, returns at most its limit of readings in at most `MAX_HISTORY_PAGE_BYTES`,
//! or at most `MAX_HISTORY_BUCKETS` buckets, and the continuation cursor loses nothing: a
//! bucket left open travels in it. Counted (stored readings read, items, bytes), never timed.
//! The quarantine list's page reads a bounded number of records too.

use serde_json::{Value, json};
use twinguard_core::store::{Mutation, Store, Table};
use twinguard_telemetry::history_page::HistoryCursor;
use twinguard_telemetry::manage::{
    HistoryPage, HistoryQuery, MAX_HISTORY, MAX_HISTORY_BUCKETS, MAX_HISTORY_PAGE_BYTES,
    MAX_HISTORY_SCAN, MAX_QUARANTINE_SCAN,
};
use twinguard_telemetry::records::{Quarantined, Review, StoredReading, downsample, history_key};

use super::pipeline::{Plant, T0};

/// Stores `n` readings of `twin`'s `name`, one a millisecond from `T0`, valued by `value`.
fn store_history(plant: &Plant, twin: &str, name: &str, n: u64, value: impl Fn(u64) -> Value) {
    let rows: Vec<Mutation> = (0..n)
        .map(|i| {
            let reading = StoredReading {
                value: value(i),
                anomaly_score: None,
                late: false,
            };
            Mutation::put(
                Table::History,
                history_key(twin, name, T0 + i as i64, "dev-1", i),
                serde_json::to_vec(&reading).unwrap(),
            )
        })
        .collect();
    plant.history.commit(&rows).unwrap();
}

/// Every page of a read, following the cursor.
fn pages(plant: &Plant, twin: &str, name: &str, query: HistoryQuery) -> Vec<HistoryPage> {
    let mut out = Vec::new();
    let mut cursor: Option<HistoryCursor> = None;
    loop {
        let page = plant
            .telemetry
            .history_page(&plant.admin, twin, name, query, cursor.take())
            .unwrap();
        // The cursor a client gets back as a token, parsed as the server parses it.
        cursor = page.next.as_ref().map(|c| {
            twinguard_telemetry::Telemetry::history_cursor(&c.token(), twin, name, &query)
                .expect("the server's own token is accepted")
        });
        let done = cursor.is_none();
        out.push(page);
        if done || out.len() > 1_000 {
            return out;
        }
    }
}

const N: u64 = 250_000;

#[tokio::test]
async fn a_history_larger_than_a_page_comes_back_whole_across_pages_each_within_its_bounds() {
    let plant = Plant::new().await;
    store_history(&plant, "boiler-1", "temperature", N, |i| json!(i as f64));
    let window = |interval_ms, limit| HistoryQuery {
        from_ms: T0,
        to_ms: T0 + N as i64,
        interval_ms,
        limit,
    };

    // Raw, at the largest limit: 25 pages of 10,000, every reading once and in order.
    let raw = pages(&plant, "boiler-1", "temperature", window(None, MAX_HISTORY));
    let mut seqs = Vec::new();
    for page in &raw {
        let readings = page.history.readings.as_ref().unwrap();
        assert!(readings.len() <= MAX_HISTORY);
        assert!(page.scanned <= MAX_HISTORY_SCAN);
        seqs.extend(readings.iter().map(|r| r.seq));
    }
    assert_eq!(
        seqs,
        (0..N).collect::<Vec<_>>(),
        "every reading once, in order"
    );
    assert_eq!(raw.len(), 25);
    assert!(raw.last().is_some_and(|p| !p.history.truncated));

    // Summarised in buckets of 7 s (7,000 readings): the scan bound ends pages inside a bucket,
    // which the next page finishes; the buckets are those of the whole history at once.
    let all: Vec<(i64, f64)> = (0..N).map(|i| (T0 + i as i64, i as f64)).collect();
    let expected: Vec<_> = downsample(&all, T0, 7_000)
        .into_iter()
        .map(|(_, b)| (b.count, b.min, b.max, b.last))
        .collect();
    let summarised = pages(&plant, "boiler-1", "temperature", window(Some(7_000), 1));
    assert!(summarised.len() >= 3, "{} page(s)", summarised.len());
    let mut got = Vec::new();
    for page in &summarised {
        assert!(page.scanned <= MAX_HISTORY_SCAN, "{}", page.scanned);
        got.extend(
            page.history
                .buckets
                .as_ref()
                .unwrap()
                .iter()
                .map(|b| (b.count, b.min, b.max, b.last)),
        );
    }
    assert_eq!(got, expected);

    // Buckets of 1 ms: at most 10,000 buckets a page, every reading in exactly one.
    let fine = pages(&plant, "boiler-1", "temperature", window(Some(1), 1));
    let mut counted = 0;
    for page in &fine {
        let buckets = page.history.buckets.as_ref().unwrap();
        assert!(buckets.len() <= MAX_HISTORY_BUCKETS);
        counted += buckets.iter().map(|b| b.count).sum::<u64>();
    }
    assert_eq!(counted, N);
    assert!(fine.len() >= 25);
}

#[tokio::test]
async fn a_history_page_of_large_readings_stays_under_the_byte_cap() {
    let plant = Plant::new().await;
    // 3,000 readings of 4 KB strings: 12 MB, asked for 10,000 at a time.
    let text = "v".repeat(4 * 1024);
    store_history(&plant, "boiler-1", "valve", 3_000, |_| json!(text));
    let query = HistoryQuery {
        from_ms: T0,
        to_ms: T0 + 3_000,
        interval_ms: None,
        limit: MAX_HISTORY,
    };
    let all = pages(&plant, "boiler-1", "valve", query);
    let mut seqs = Vec::new();
    for page in &all {
        let readings = page.history.readings.as_ref().unwrap();
        let bytes: usize = readings
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len() + 1)
            .sum();
        assert!(bytes <= MAX_HISTORY_PAGE_BYTES, "a page of {bytes} bytes");
        seqs.extend(readings.iter().map(|r| r.seq));
    }
    assert!(all.len() >= 3, "{} page(s)", all.len());
    assert_eq!(seqs, (0..3_000).collect::<Vec<_>>());
}

/// Stores quarantine records with keys `q{i:08}` for `range`, with `status`.
fn store_quarantined(plant: &Plant, range: std::ops::Range<u32>, status: Review) {
    let rows: Vec<Mutation> = range
        .map(|i| {
            let id = format!("q{i:08}");
            let record = Quarantined {
                id: id.clone(),
                device: "dev-1".into(),
                seq: u64::from(i),
                twin: Some("boiler-1".into()),
                name: "temperature".into(),
                value: json!(500.0),
                source_time: "2027-01-15T08:00:00Z".into(),
                received: "2027-01-15T08:00:00Z".into(),
                reasons: vec!["above_max".into()],
                anomaly_score: None,
                status,
                decided_by: None,
                decided_at: None,
            };
            Mutation::put(Table::Quarantine, id, serde_json::to_vec(&record).unwrap())
        })
        .collect();
    plant.store.commit(&rows).unwrap();
}

#[tokio::test]
async fn a_quarantine_page_reads_a_bounded_number_of_records_however_many_are_decided() {
    // 25,000 discarded records, then 5 pending ones: a page of pending readings reads at most
    // MAX_QUARANTINE_SCAN records and says where to resume, and the pages find all five.
    let plant = Plant::new().await;
    store_quarantined(&plant, 0..25_000, Review::Discarded);
    store_quarantined(&plant, 25_000..25_005, Review::Pending);
    let mut after: Option<String> = None;
    let mut found = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        let page = plant
            .telemetry
            .quarantine_page(&plant.admin, None, after.as_deref(), 100)
            .unwrap();
        found.extend(page.items.iter().map(|q| q.id.clone()));
        match page.resume_after {
            Some(key) => {
                let read = key[1..].parse::<usize>().unwrap() + 1
                    - after
                        .as_deref()
                        .map_or(0, |a| a[1..].parse::<usize>().unwrap() + 1);
                assert_eq!(read, MAX_QUARANTINE_SCAN, "records read by one page");
                after = Some(key);
            }
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (25_000..25_005).map(|i| format!("q{i:08}")).collect();
    assert_eq!(found, expected);
}
