//! Durable audit appends per second, with a signed checkpoint every second, on this machine.
//!
//! 256 async writers append request-sized entries as fast as the log acknowledges them
//! (each append returns only once its group is fsynced). The reference, measured in the same
//! run on the same disk, is the floor of any durable log: the same bytes appended to a file in
//! the same group sizes with one `fdatasync` per group, and no hashing, no proofs, no
//! signatures. Run: `cargo bench -p twinguard-audit --bench append`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use twinguard_audit::log::{AuditLog, Options};
use twinguard_audit::note::NoteSigner;

const WRITERS: usize = 256;
const SECONDS: u64 = 5;

fn entry(i: u64) -> Vec<u8> {
    format!(
        r#"{{"kind":"request","time":"2026-11-22T06:00:00.000000Z","correlationId":"3f2b8c1e-9d4a-4c7b-8e1f-{i:012}","address":"127.0.0.1","method":"GET","path":"/digitaltwins/room-{i}","status":200,"outcome":"ok","principal":"6d4ef49f-9de3-483d-82ed-e4bd99ce5586"}}"#
    )
    .into_bytes()
}

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (signer, _) = NoteSigner::generate("bench/audit").map_err(|e| anyhow::anyhow!("{e}"))?;
    let log = AuditLog::open(
        &tmp.path().join("audit"),
        signer,
        Options {
            origin: "bench/audit".into(),
            checkpoint_every: Duration::from_secs(1),
            witness: None,
        },
    )?;
    // Writers are async tasks, as requests are in the server: an append parks a task, not a
    // thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (log, stop, done) = (log.clone(), stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut i = w as u64 * 1_000_000_000;
                    while !stop.load(Ordering::Relaxed) {
                        if log.append_async(entry(i)).await.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(SECONDS)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let appended = done.load(Ordering::Relaxed);
    let rate = appended as f64 / elapsed;
    std::thread::sleep(Duration::from_millis(1_200));
    let checkpoints = std::fs::read_to_string(tmp.path().join("audit/checkpoints.log"))?
        .matches("\x0c\n")
        .count();
    let groups = log.groups_committed().max(1);
    let group = ((appended / groups) as usize).max(1);

    // Reference: the same bytes, in groups of the size the log achieved, one fdatasync each.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp.path().join("reference.jsonl"))?;
    let reference_start = Instant::now();
    let mut written = 0u64;
    let mut buffer = Vec::new();
    while reference_start.elapsed() < Duration::from_secs(SECONDS) {
        buffer.clear();
        for k in 0..group as u64 {
            buffer.extend_from_slice(&entry(written + k));
            buffer.push(b'\n');
        }
        file.write_all(&buffer)?;
        file.sync_data()?;
        written += group as u64;
    }
    let reference = written as f64 / reference_start.elapsed().as_secs_f64();

    println!("audit appends (durable, acknowledged, {WRITERS} writers, {SECONDS} s):");
    println!(
        "  twinguard audit log:   {rate:>10.0} entries/s ({appended} entries, {checkpoints} signed checkpoints)"
    );
    println!("  groups: {groups}, {group} entries each on average");
    println!(
        "  reference (append + fdatasync per group of {group}, no hashing): {reference:>10.0} entries/s"
    );
    println!("  ratio log/reference:   {:.2}", rate / reference);
    println!(
        "  goal: 100000 entries/s -> {}",
        if rate >= 100_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
